"""REST API of the plane (FastAPI): health, stored requests and engine samples, the plane's /metrics.

Bad query parameters get a 422 naming the parameter and what is allowed (FastAPI's validation);
no handler lets an exception escape as a bare 500.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError

from controlplane.store.repo import Store
from controlplane.tuning.recommendations import APPLIED, DISMISSED, FAILED, RecommendationError, Recommendations

log = logging.getLogger(__name__)

Since = Annotated[float | None, Query(description="Window start, UNIX seconds (inclusive).", ge=0)]
Until = Annotated[float | None, Query(description="Window end, UNIX seconds (exclusive).", ge=0)]
ReplicaQ = Annotated[str | None, Query(description="Replica name.", max_length=200)]
Limit = Annotated[int, Query(description="Most rows returned, newest first.", ge=1, le=10_000)]


class FleetControl(Protocol):
    """What the API may ask of the supervisor (the only owner of replica count and configuration)."""

    def describe(self) -> list[dict[str, Any]]: ...
    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]: ...
    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]: ...


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScaleBody(_Body):
    replicas: int = Field(ge=0, le=1000, description="Desired number of replicas (within the spec's min/max).")
    reason: str = Field(default="user_request", pattern=r"^[a-z0-9_]{1,64}$", description="Reason code stored.")


class ReconfigureBody(_Body):
    engine: dict[str, Any] = Field(description="Engine fields to change, e.g. {\"max_num_seqs\": 8}.")
    reason: str = Field(default="user_request", pattern=r"^[a-z0-9_]{1,64}$", description="Reason code stored.")


DeploymentName = Annotated[str, Path(max_length=50, pattern=r"^[a-z0-9-]+$")]
RecId = Annotated[int, Path(ge=1, le=2**62, description="Recommendation id.")]


def _check_window(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, detail=f"since ({since}) must be earlier than until ({until})")


def create_app(store: Store, registry: CollectorRegistry, started_unix_s: float | None = None, *,
               control: FleetControl | None = None, api_token: str | None = None,
               slo_statuses: Callable[[], Sequence[Any]] | None = None) -> FastAPI:
    app = FastAPI(title="vLLM SLO control plane", version="0.1.0")
    started = started_unix_s or time.time()

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        """Mutating endpoints: a bearer token from settings; with none configured they are off."""
        if not api_token:
            raise HTTPException(403, detail="mutating endpoints are disabled: start the plane with "
                                            "CONTROLPLANE_API_TOKEN set and send 'Authorization: Bearer <token>'")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_token.encode()):
            raise HTTPException(401, detail="missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def need_control() -> FleetControl:
        if control is None:
            raise HTTPException(409, detail="this plane supervises no deployment (start it with --config FILE)")
        return control

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

    @app.get("/api/v1/deployments")
    def deployments() -> dict[str, Any]:
        if control is not None:
            items = control.describe()
        else:
            items = [{"name": d["name"], "desired_replicas": d["desired_replicas"], "engine": d["engine_config"]}
                     for d in store.deployments()]
        return {"count": len(items), "items": items}

    async def _act(call: Any) -> dict[str, Any]:
        from controlplane.supervisor.supervisor import ActionError

        try:
            result: dict[str, Any] = await call
        except ActionError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        return result

    @app.post("/api/v1/deployments/{name}/scale", status_code=202, dependencies=[Depends(require_token)])
    async def scale(name: DeploymentName, body: ScaleBody) -> dict[str, Any]:
        """Set the desired replica count; the supervisor starts or drains replicas to reach it."""
        return await _act(need_control().scale(name, body.replicas, actor="user", reason=body.reason))

    @app.post("/api/v1/deployments/{name}/reconfigure", status_code=202, dependencies=[Depends(require_token)])
    async def reconfigure(name: DeploymentName, body: ReconfigureBody) -> dict[str, Any]:
        """Change engine arguments; applied by a rolling replacement, rolled back if the new replica fails."""
        return await _act(need_control().reconfigure(name, body.engine, actor="user", reason=body.reason))

    @app.get("/api/v1/slos")
    def slos() -> dict[str, Any]:
        """Each SLO's latest evaluation: attainment, budget left, burn rate per alert window, quantiles."""
        from controlplane.slo.views import status_json

        items = [status_json(s) for s in (slo_statuses() if slo_statuses else [])]
        return {"count": len(items), "items": items}

    @app.get("/api/v1/alerts")
    def alerts(slo: Annotated[str | None, Query(max_length=200)] = None, limit: Limit = 200) -> dict[str, Any]:
        """SLO alert episodes, newest first: pending / firing / resolved with their times and evidence."""
        from controlplane.slo.alerter import list_alerts

        rows = list_alerts(store.engine, limit=limit, slo=slo)
        return {"count": len(rows), "items": rows}

    recs = Recommendations(store.engine)

    def _rec_call(fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        try:
            out: dict[str, Any] = fn(*args, **kw)
        except RecommendationError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        return out

    @app.get("/api/v1/recommendations")
    def recommendations(deployment: Annotated[str | None, Query(max_length=50)] = None,
                        status: Annotated[str | None, Query(pattern=r"^(open|applied|dismissed|superseded|"
                                                                    r"rolled_back|failed)$")] = None,
                        limit: Limit = 100) -> dict[str, Any]:
        """Proposed changes, newest first, each with its evidence (inputs, predicted effect, comparison)."""
        items = recs.list(deployment=deployment, status=status, limit=limit)
        return {"count": len(items), "items": items}

    @app.get("/api/v1/recommendations/{rid}")
    def recommendation(rid: RecId) -> dict[str, Any]:
        return _rec_call(recs.get, rid)

    @app.post("/api/v1/recommendations/{rid}/apply", dependencies=[Depends(require_token)])
    async def apply_recommendation(rid: RecId) -> dict[str, Any]:
        """Apply an open recommendation through the supervisor (audited as a user action)."""
        rec = _rec_call(recs.get, rid)
        if rec["status"] != "open":
            raise HTTPException(409, detail=f"recommendation {rid} is {rec['status']}; only open ones can be applied")
        ctl = need_control()
        reason = f"recommendation_{rid}"
        try:
            if rec["kind"] == "scale":
                result = await _act(ctl.scale(rec["deployment"], int(rec["proposed"]["replicas"]), actor="user",
                                              reason=reason))
            else:
                result = await _act(ctl.reconfigure(rec["deployment"], dict(rec["proposed"]["engine"]),
                                                    actor="user", reason=reason))
        except HTTPException as exc:
            _rec_call(recs.decide, rid, FAILED, by="user", outcome={"error": exc.detail})
            raise
        return _rec_call(recs.decide, rid, APPLIED, by="user", outcome={"applied": result})

    @app.post("/api/v1/recommendations/{rid}/dismiss", dependencies=[Depends(require_token)])
    def dismiss_recommendation(rid: RecId) -> dict[str, Any]:
        return _rec_call(recs.decide, rid, DISMISSED, by="user")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
