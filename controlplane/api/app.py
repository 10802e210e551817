"""REST API of the plane (FastAPI): health, fleet, stored requests and engine samples, SLOs and their
history, alerts, recommendations, the action audit log, cost per token, GPU summary, the plane's /metrics.

Bad query parameters get a 422 naming the parameter and what is allowed (FastAPI's validation);
errors are JSON `{"detail": ...}`; no handler lets an exception escape as a bare 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError

from controlplane import cost
from controlplane.api import queries
from controlplane.slo.model import Slo
from controlplane.slo.query import RollupBusy
from controlplane.store.repo import Store, simulated_deployments
from controlplane.tuning.recommendations import (
    APPLIED,
    DISMISSED,
    FAILED,
    OPEN,
    SUPERSEDED,
    RecommendationError,
    Recommendations,
    engine_changed_since,
    made_for_replicas,
    too_old,
)

log = logging.getLogger(__name__)

# UNIX seconds up to the year 5138: far enough for any window, and small enough that a float still steps by a
# fraction of a second (past 2**53 adding a step of 300 s to a bucket edge can leave it where it was).
MAX_UNIX_S = 1e11
Since = Annotated[float | None, Query(description="Window start, UNIX seconds (inclusive).", ge=0, le=MAX_UNIX_S,
                                      allow_inf_nan=False)]
Until = Annotated[float | None, Query(description="Window end, UNIX seconds (exclusive).", ge=0, le=MAX_UNIX_S,
                                      allow_inf_nan=False)]
# Free text reaches SQL as a bound parameter; PostgreSQL refuses a NUL byte in text (a 503 "store unavailable"
# for bad input), so control characters are refused here, as a 422 naming the parameter.
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
ReplicaQ = Annotated[str | None, Query(description="Replica name.", max_length=200, pattern=NO_CONTROL)]
Limit = Annotated[int, Query(description="Most rows returned, newest first.", ge=1, le=10_000)]
DeploymentQ = Annotated[str | None, Query(description="Deployment name.", max_length=50, pattern=r"^[a-z0-9-]+$")]
BeforeId = Annotated[int | None, Query(description="Only rows older than this one: `next_before_id` of the "
                                                   "previous page.", ge=1, le=2**62)]
ActorQ = Annotated[str | None, Query(description="Who acted: user, tuner or supervisor.",
                                     pattern=r"^(user|tuner|supervisor)$")]
SloName = Annotated[str, Path(max_length=200, pattern=NO_CONTROL, description="SLO name, as in /api/v1/slos.")]
HistoryStep = Annotated[int, Query(description="Step of the series in seconds, a whole number of minutes.",
                                   ge=60, le=86_400, multiple_of=60)]
CostStep = Annotated[int, Query(description="Step of the series in seconds.", ge=10, le=86_400)]

DEFAULT_RANGE_S = 86_400.0  # history, cost and GPU summary cover the last day unless told otherwise
MAX_POINTS = 2_000  # per series: bounds the work one request can ask for


class FleetControl(Protocol):
    """What the API may ask of the supervisor (the only owner of replica count and configuration)."""

    def describe(self) -> list[dict[str, Any]]: ...
    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]: ...
    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]: ...


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScaleBody(_Body):
    replicas: int = Field(ge=0, le=1000, strict=True,
                          description="Desired number of replicas (within the spec's min/max).")
    reason: str = Field(default="user_request", pattern=r"^[a-z0-9_]{1,64}$", description="Reason code stored.")


class ReconfigureBody(_Body):
    engine: dict[str, Any] = Field(description="Engine fields to change, e.g. {\"max_num_seqs\": 8}.")
    reason: str = Field(default="user_request", pattern=r"^[a-z0-9_]{1,64}$", description="Reason code stored.")


class SearchBody(_Body):
    target_rps: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False,
                                     description="Request rate to size the fleet for; default: the recorded mean.")
    window_s: float = Field(default=1800.0, ge=60, le=7 * 86_400, allow_inf_nan=False,
                            description="How far back the recorded requests (calibration and workload) reach.")
    canary_trials: int | None = Field(default=None, ge=0, le=5,
                                      description="Real trials on a canary replica; default: spec.tuning's.")
    mode: Literal["recommend", "auto"] | None = Field(
        default=None, description="recommend: store it for a person; auto: apply, judge, roll back if the SLO got "
                                  "worse. Default: the plane's CONTROLPLANE_TUNER_MODE.")


DeploymentName = Annotated[str, Path(max_length=50, pattern=r"^[a-z0-9-]+$")]
RecId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Recommendation id.")]  # a 32-bit column


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)[:200]
    return value


def _check_window(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, detail=f"since ({since}) must be earlier than until ({until})")


def _range(since: float | None, until: float | None, now: float, step_s: float) -> tuple[float, float]:
    """The window a series covers (default: the last day up to now), checked and bounded in points."""
    _check_window(since, until)
    end = until if until is not None else now
    start = since if since is not None else max(0.0, end - DEFAULT_RANGE_S)  # the default day, not before 1970
    if not start < end:
        raise HTTPException(400, detail=f"since ({start}) must be earlier than until ({end}); without until "
                                        "the window ends now")
    n = cost.step_count(start, end, step_s)
    if n > MAX_POINTS:
        raise HTTPException(422, detail=f"step_s={step_s:g} over [{start:g}, {end:g}) gives {n} points; at most "
                                        f"{MAX_POINTS} are allowed: use a larger step_s or a shorter window")
    return start, end


def _measured_range(since: float | None, until: float | None, now: float, step_s: float) -> tuple[float, float]:
    """`_range`, ending no later than now: time not yet lived has no measured up time (it would read as 0
    replicas up and $0), so the future part of a window is left out and a window wholly ahead is refused."""
    if since is not None and since >= now:
        raise HTTPException(400, detail=f"since ({since:g}) is not in the past (now {now:g}): nothing measured yet")
    start, end = _range(since, None if until is not None and until > now else until, now, step_s)
    return start, min(end, now)


def _known_query_params(request: Request) -> None:
    """A query parameter the endpoint does not take is refused, naming it and what is allowed: ignored, a
    misspelt filter (`?state=open`, `?deploymnet=x`) would answer with everything, as if it had matched."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed: frozenset[str] | None = getattr(route, "_allowed_query", None)  # kept on the route, which owns it
    if allowed is None:
        allowed = frozenset(p.alias for p in get_flat_dependant(route.dependant).query_params)
        route._allowed_query = allowed  # type: ignore[attr-defined]
    if unknown := sorted(set(request.query_params) - allowed):
        raise HTTPException(422, detail=f"unknown query parameter(s) {', '.join(map(repr, unknown))} on "
                                        f"{route.path}; allowed: {', '.join(sorted(allowed)) or 'none'}")
    # Every parameter takes one value: a repeated one (`?actor=user&actor=tuner`) would answer for its last
    # value only, as if the others had been read.
    if repeated := sorted(k for k in set(request.query_params) if len(request.query_params.getlist(k)) > 1):
        raise HTTPException(422, detail=f"query parameter(s) {', '.join(map(repr, repeated))} given more than once "
                                        f"on {route.path}; each takes one value")


def create_app(store: Store, registry: CollectorRegistry, started_unix_s: float | None = None, *,
               control: FleetControl | None = None, api_token: str | None = None,
               slo_statuses: Callable[[], Sequence[Any]] | None = None,
               configured_slos: Sequence[Slo] | None = None,
               searches: Any = None,
               watched_price_per_replica_hour_usd: float | None = None,
               cost_max_gap_s: float = cost.DEFAULT_MAX_GAP_S,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The API over `store`. `configured_slos` are the SLOs (for their history; without them the SLOs of
    the latest statuses are used); watched replicas are priced at `watched_price_per_replica_hour_usd`
    (unknown when None); `cost_max_gap_s` is the longest silence between scrapes still counted as up time."""
    app = FastAPI(title="vLLM SLO control plane", version="0.1.0", dependencies=[Depends(_known_query_params)])
    started = started_unix_s or clock()

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        """Mutating endpoints: a bearer token from settings; with none configured they are off."""
        if not api_token:
            raise HTTPException(403, detail="mutating endpoints are disabled: start the plane with "
                                            "CONTROLPLANE_API_TOKEN set and send 'Authorization: Bearer <token>'")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_token.encode()):
            raise HTTPException(401, detail="missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    async def no_body(request: Request) -> None:
        """Endpoints that take no body refuse one (an empty JSON object aside): silently dropped, a `reason` or
        an option sent with them would look accepted."""
        body = (await request.body()).strip()
        if body and body != b"{}":
            raise HTTPException(422, detail=f"{request.url.path} takes no body; got {len(body)} byte(s) "
                                            f"({body[:60]!r}): send none")

    @app.middleware("http")
    async def _token_first(request: Request, call_next: Any) -> Any:
        """FastAPI reads and validates a body before it runs a route's dependencies. Every mutating route needs
        the token, so it is checked first here: a caller without it is told so, whatever the body, and never
        what the endpoint expects of one (the routes check it again)."""
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            try:
                require_token(request.headers.get("authorization"))
            except HTTPException as denied:
                return JSONResponse({"detail": denied.detail}, status_code=denied.status_code, headers=denied.headers)
        return await call_next(request)

    def need_control() -> FleetControl:
        if control is None:
            raise HTTPException(409, detail="this plane supervises no deployment (start it with --config FILE)")
        return control

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("store error: %s", exc)
        return JSONResponse({"detail": f"store unavailable: {type(exc).__name__}"}, status_code=503)

    @app.exception_handler(RollupBusy)
    async def _busy(_request: Request, exc: RollupBusy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422 echoes each bad input back, and fails to render NaN, Infinity or undecodable bytes
        (a 500 for bad input): those are echoed as their repr instead."""
        return JSONResponse({"detail": [{k: _json_safe(v) for k, v in e.items()} for e in exc.errors()]},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not bad input: logged with its traceback, answered as JSON rather than a text page."""
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the plane's log"},
                            status_code=500)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "uptime_s": round(clock() - started, 3),
                "database": store.engine.dialect.name}

    def _known(check: Callable[[Any, str], None], name: str) -> None:
        """A 404 naming what is known when `name` is unknown to `check` (a queries.check_*_known)."""
        try:
            check(store.engine, name)
        except queries.NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from None

    @app.get("/api/v1/requests")
    def requests(since: Since = None, until: Until = None, replica: ReplicaQ = None, limit: Limit = 1000,
                 before_id: BeforeId = None) -> dict[str, Any]:
        """Stored requests, newest arrival first; page back with `before_id` = the answer's `next_before_id`
        (null on the last page)."""
        _check_window(since, until)
        try:
            rows, next_id = queries.requests_page(store.engine, since=since, until=until, replica=replica,
                                                  before_id=before_id, limit=limit)
        except queries.NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from None
        if not rows and replica is not None:
            _known(queries.check_replica_known, replica)
        return {"count": len(rows), "items": rows, "next_before_id": next_id}

    @app.get("/api/v1/engine-samples")
    def engine_samples(since: Since = None, until: Until = None, replica: ReplicaQ = None,
                       limit: Limit = 1000) -> dict[str, Any]:
        _check_window(since, until)
        rows = store.engine_samples(since_unix_s=since, until_unix_s=until, replica=replica, limit=limit)
        if not rows and replica is not None:
            _known(queries.check_replica_known, replica)
        return {"count": len(rows), "items": rows}

    @app.get("/api/v1/replicas")
    def replicas() -> dict[str, Any]:
        """Every replica the plane knows (supervised or watched; deployment null when watched), with its
        latest engine configuration (null when none was recorded)."""
        items = queries.replicas(store.engine)
        return {"count": len(items), "items": items}

    @app.get("/api/v1/actions")
    def actions(deployment: DeploymentQ = None, actor: ActorQ = None, since: Since = None, until: Until = None,
                limit: Limit = 200) -> dict[str, Any]:
        """The audit log: what a user, the tuner or the supervisor did, why, and the config before and after."""
        _check_window(since, until)
        rows = queries.actions(store.engine, deployment=deployment, actor=actor, since=since, until=until,
                               limit=limit)
        if not rows and deployment is not None:
            _known(queries.check_deployment_known, deployment)
        return {"count": len(rows), "items": rows}

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

        statuses = slo_statuses() if slo_statuses else []
        sim: frozenset[str] | None = frozenset()
        if statuses:
            try:
                sim = simulated_deployments(store.engine)
            except SQLAlchemyError:  # the statuses come from memory: served all the same, the label unknown
                log.warning("reading which deployments are simulated failed; /api/v1/slos says null")
                sim = None
        items = [{**status_json(s), "simulated": None if sim is None else s.slo.deployment in sim} for s in statuses]
        return {"count": len(items), "items": items}

    def known_slos() -> dict[str, Slo]:
        if configured_slos is not None:
            return {s.name: s for s in configured_slos}
        return {s.slo.name: s.slo for s in (slo_statuses() if slo_statuses else [])}

    @app.get("/api/v1/slos/{name}/history")
    def slo_history(name: SloName, since: Since = None, until: Until = None,
                    step_s: HistoryStep = 300) -> dict[str, Any]:
        """Attainment (null for a step without requests) and latency quantiles per step, UTC-aligned;
        the first and last step are clipped to the window. Default window: the last day."""
        slo = known_slos().get(name)
        if slo is None:
            raise HTTPException(404, detail=f"unknown SLO {name!r}; known: {', '.join(known_slos()) or 'none'}")
        start, end = _range(since, until, clock(), step_s)
        return queries.slo_history(store.engine, slo, start, end, step_s)

    @app.get("/api/v1/alerts")
    def alerts(slo: Annotated[str | None, Query(max_length=200, pattern=NO_CONTROL)] = None,
               limit: Limit = 200) -> dict[str, Any]:
        """SLO alert episodes, newest first: pending / firing / resolved with their times and evidence."""
        from controlplane.slo.alerter import list_alerts

        rows = list_alerts(store.engine, limit=limit, slo=slo)
        if not rows and slo is not None and slo not in known_slos():  # a misspelt name, not a quiet SLO
            raise HTTPException(404, detail=f"unknown SLO {slo!r}; known: {', '.join(known_slos()) or 'none'}")
        return {"count": len(rows), "items": rows}

    recs = Recommendations(store.engine)

    def _rec_call(fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        try:
            out: dict[str, Any] = fn(*args, **kw)
        except RecommendationError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None
        return out

    def _search_call(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        from controlplane.tuning.config_search import SearchInputError

        if searches is None:
            raise HTTPException(409, detail="this plane supervises no deployment (start it with --config FILE)")
        try:
            return fn(searches, *args)
        except SearchInputError as exc:
            raise HTTPException(exc.status, detail=str(exc)) from None

    @app.post("/api/v1/deployments/{name}/search", status_code=202, dependencies=[Depends(require_token)])
    async def start_search(name: DeploymentName, body: SearchBody | None = None) -> dict[str, Any]:
        """Search the deployment's batch limits and replica count on its own recorded requests (optionally with
        canary trials) in the background; poll GET /api/v1/searches/{id}. The outcome is a recommendation."""
        from controlplane.tuning.config_search import SearchParams

        b = body or SearchBody()
        params = SearchParams(target_rps=b.target_rps, window_s=b.window_s, canary_trials=b.canary_trials,
                              mode=b.mode)
        return _search_call(lambda s, n, p: s.start(n, p), name, params)

    @app.get("/api/v1/searches")
    def list_searches() -> dict[str, Any]:
        """Configuration searches this plane ran since it started, newest first (none without a supervisor)."""
        items = searches.list() if searches is not None else []
        return {"count": len(items), "items": items}

    @app.get("/api/v1/searches/{sid}")
    def get_search(sid: Annotated[int, Path(ge=1, le=2**62, description="Search id.")]) -> dict[str, Any]:
        return _search_call(lambda s, i: s.get(i), sid)

    @app.get("/api/v1/recommendations")
    def recommendations(deployment: DeploymentQ = None,
                        status: Annotated[str | None, Query(pattern=r"^(open|applied|dismissed|superseded|"
                                                                    r"rolled_back|failed)$")] = None,
                        limit: Limit = 100) -> dict[str, Any]:
        """Proposed changes, newest first, each with its evidence (inputs, predicted effect, comparison)."""
        items = recs.list(deployment=deployment, status=status, limit=limit)
        if not items and deployment is not None:
            _known(queries.check_deployment_known, deployment)
        return {"count": len(items), "items": items}

    @app.get("/api/v1/recommendations/{rid}")
    def recommendation(rid: RecId) -> dict[str, Any]:
        return _rec_call(recs.get, rid)

    @app.post("/api/v1/recommendations/{rid}/apply", dependencies=[Depends(require_token), Depends(no_body)])
    async def apply_recommendation(rid: RecId) -> dict[str, Any]:
        """Apply an open recommendation through the supervisor (audited as a user action). A refusal for now
        (a rolling change or canary running) leaves it open, to be applied when that ends."""
        from controlplane.supervisor.supervisor import ActionError

        async def rec_call(fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
            # The store off the event loop the plane's API, receivers, scraper and supervisor share: a locked
            # SQLite waits out its busy timeout here, not on them.
            return await asyncio.to_thread(_rec_call, fn, *args, **kw)

        rec = await rec_call(recs.get, rid)
        if rec["status"] != "open":
            raise HTTPException(409, detail=f"recommendation {rid} is {rec['status']}; only open ones can be applied")
        ctl = need_control()
        live_dep = next((d for d in ctl.describe() if d.get("name") == rec["deployment"]), {})
        live = live_dep.get("desired_replicas")
        was = made_for_replicas(rec)
        if was is not None and live is not None and was != live:
            # A count is relative to the count it was decided on (its predicted effect, its N-1 check, a later
            # rollback), and so is a searched configuration's, sized for the load of its search: a fleet grown
            # since would be cut back to it.
            raise HTTPException(409, detail=f"recommendation {rid} was made for {was} replica(s) of "
                                            f"{rec['deployment']}, which now has {live}; it is stale: dismiss it "
                                            "and ask for a new one")
        if changed := engine_changed_since(rec, live_dep.get("engine")):
            raise HTTPException(409, detail=f"recommendation {rid} was made for {rec['deployment']} with "
                                            f"{changed}; it is stale: dismiss it and ask for a new one")
        if old := too_old(rec, clock()):
            raise HTTPException(409, detail=f"recommendation {rid} was {old}; it is stale: dismiss it and ask "
                                            "for a new one")
        reason = f"recommendation_{rid}"
        await rec_call(recs.claim, rid, by="user")  # 409 if someone applied, dismissed or superseded it meanwhile

        def settle(error: Any, *, reopen: bool = False) -> str | None:
            """Record the failure (or, for a refusal for now, reopen it); its new status, None if not stored.
            Synchronous, on purpose: on a cancelled request an await here would be cancelled too and leave the
            recommendation claimed ("applied") for ever. Only the failure path pays for it."""
            try:
                if reopen:
                    return str(recs.release(rid, note=str(error))["status"])
                return str(recs.decide(rid, FAILED, by="user", outcome={"error": error}, expect=(APPLIED,))["status"])
            except Exception:  # noqa: BLE001 - the store is what failed; the claim says when it was tried
                log.exception("recommendation %s: could not record that applying it failed", rid)
                return None

        try:
            if rec["kind"] == "scale":
                result = await ctl.scale(rec["deployment"], int(rec["proposed"]["replicas"]), actor="user",
                                         reason=reason)
            else:  # a searched configuration comes with its replica count
                from controlplane.tuning.config_search import resize_then_roll

                result = await resize_then_roll(
                    ctl, rec["deployment"], rec["proposed"]["engine"], rec["proposed"].get("replicas"),
                    current_replicas=live if live is not None else was, actor="user", reason=reason)
        except ActionError as exc:
            now = settle(str(exc), reopen=exc.retryable)
            after = {OPEN: f"; recommendation {rid} stays open",
                     SUPERSEDED: f"; recommendation {rid} is superseded by a newer one"}.get(now or "", "")
            raise HTTPException(exc.status, detail=str(exc) + after) from None
        except (KeyError, TypeError, ValueError) as exc:
            detail = (f"recommendation {rid} cannot be applied: its proposal is malformed "
                      f"({type(exc).__name__}: {exc})")
            settle(detail)
            raise HTTPException(422, detail=detail) from None
        except BaseException as exc:  # a store error (503 below) or a cancelled request: never left "applied"
            settle(f"{type(exc).__name__}: {exc}")
            raise
        return await rec_call(recs.decide, rid, APPLIED, by="user", outcome={"applied": result}, expect=(APPLIED,))

    @app.post("/api/v1/recommendations/{rid}/dismiss", dependencies=[Depends(require_token), Depends(no_body)])
    def dismiss_recommendation(rid: RecId) -> dict[str, Any]:
        return _rec_call(recs.decide, rid, DISMISSED, by="user")

    @app.get("/api/v1/cost")
    def cost_per_token(deployment: DeploymentQ = None, since: Since = None, until: Until = None,
                       step_s: CostStep = 300) -> dict[str, Any]:
        """Replica-hours x price and tokens per step, per deployment (watched replicas as "watched").
        Unknown price: null costs; a step without tokens: null $/1M. Default window: the last day."""
        start, end = _measured_range(since, until, clock(), step_s)
        try:
            usages = queries.cost_usage(store.engine, cost.step_edges(start, end, step_s),
                                        watched_price=watched_price_per_replica_hour_usd,
                                        max_gap_s=cost_max_gap_s, deployment=deployment)
            sim = simulated_deployments(store.engine)
        except queries.NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from None
        items = [cost.cost_json(u) for u in usages]  # a simulated fleet's cost is labelled, as its SLOs are
        return {"since": start, "until": end, "step_s": step_s,
                "items": [{**i, "simulated": i["deployment"] in sim} for i in items]}

    @app.get("/api/v1/cost/tenants")
    def cost_per_tenant(deployment: DeploymentQ = None, since: Since = None, until: Until = None,
                        step_s: CostStep = 300) -> dict[str, Any]:
        """Requests, tokens and allocated cost per tenant (the router's tenant header) and step, of every
        deployment or of `deployment`. A replica's cost in a step is split between tenants by their share
        of the tokens it processed then; requests without a tenant are the tenant null; replica time with
        no request tokens is `unallocated`. Unknown price: null costs. Default window: the last day."""
        start, end = _measured_range(since, until, clock(), step_s)
        try:
            costs = queries.tenant_cost(store.engine, start, end, step_s,
                                        watched_price=watched_price_per_replica_hour_usd,
                                        max_gap_s=cost_max_gap_s, deployment=deployment)
        except queries.NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from None
        return {"since": start, "until": end, "step_s": step_s, "deployment": deployment,
                **cost.tenant_cost_json(costs)}

    @app.get("/api/v1/gpu")
    def gpu(since: Since = None, until: Until = None) -> dict[str, Any]:
        """Per GPU: latest reading, mean utilisation and peak temperature in the window (default: last day).
        `available` is false, with no GPUs, when no GPU sample was ever stored."""
        _check_window(since, until)
        end = until if until is not None else clock()
        start = since if since is not None else max(0.0, end - DEFAULT_RANGE_S)
        if not start < end:
            raise HTTPException(400, detail=f"since ({start}) must be earlier than until ({end}); without until "
                                            "the window ends now")
        return queries.gpu_summary(store.engine, start, end)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
