"""REST API of the plane (FastAPI): health, stored requests and engine samples, the plane's /metrics.

Bad query parameters get a 422 naming the parameter and what is allowed (FastAPI's validation);
no handler lets an exception escape as a bare 500.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from controlplane.store.repo import Store

log = logging.getLogger(__name__)

Since = Annotated[float | None, Query(description="Window start, UNIX seconds (inclusive).", ge=0)]
Until = Annotated[float | None, Query(description="Window end, UNIX seconds (exclusive).", ge=0)]
ReplicaQ = Annotated[str | None, Query(description="Replica name.", max_length=200)]
Limit = Annotated[int, Query(description="Most rows returned, newest first.", ge=1, le=10_000)]


def _check_window(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, detail=f"since ({since}) must be earlier than until ({until})")


def create_app(store: Store, registry: CollectorRegistry, started_unix_s: float | None = None) -> FastAPI:
    app = FastAPI(title="vLLM SLO control plane", version="0.1.0")
    started = started_unix_s or time.time()

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("store error: %s", exc)
        return JSONResponse({"detail": f"store unavailable: {type(exc).__name__}"}, status_code=503)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "uptime_s": round(time.time() - started, 3),
                "database": store.engine.dialect.name}

    @app.get("/api/v1/requests")
    def requests(since: Since = None, until: Until = None, replica: ReplicaQ = None,
                 limit: Limit = 1000) -> dict[str, Any]:
        _check_window(since, until)
        rows = store.requests(since_unix_s=since, until_unix_s=until, replica=replica, limit=limit)
        return {"count": len(rows), "items": rows}

    @app.get("/api/v1/engine-samples")
    def engine_samples(since: Since = None, until: Until = None, replica: ReplicaQ = None,
                       limit: Limit = 1000) -> dict[str, Any]:
        _check_window(since, until)
        rows = store.engine_samples(since_unix_s=since, until_unix_s=until, replica=replica, limit=limit)
        return {"count": len(rows), "items": rows}

    @app.get("/api/v1/replicas")
    def replicas() -> dict[str, Any]:
        items = [{"id": i, "name": n} for i, n in sorted(store.replica_names().items())]
        return {"count": len(items), "items": items}

    @app.get("/api/v1/events")
    def events(limit: Limit = 1000) -> dict[str, Any]:
        rows = store.events(limit=limit)
        return {"count": len(rows), "items": rows}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
