"""Store reads behind the REST API's views: paged requests, replicas, the action audit log, SLO history,
cost inputs (per deployment and per tenant) and the GPU summary. Reads only; every function takes the
engine and returns plain rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
from sqlalchemy import ColumnElement, Engine, Integer, and_, cast, exists, func, or_, select

from controlplane import cost
from controlplane.slo.model import Slo
from controlplane.slo.query import Reader, RollupBusy, attainment_series
from controlplane.slo.rows import SLI_COLUMNS
from controlplane.store.models import (
    Deployment,
    EngineSample,
    GpuSample,
    LifecycleEvent,
    Recommendation,
    Replica,
    ReplicaConfig,
    Request,
    RouterSpan,
)
from controlplane.store.repo import spec_is_simulated
from controlplane.supervisor.policy import CRASHED, CRASHLOOP, FAILED, STOPPED

# Who acts on the fleet; events by the engine or the collector are observations, not actions.
ACTION_ACTORS: Final = ("user", "tuner", "supervisor")
HISTORY_QUANTILES: Final = ((0.5, "p50_s"), (0.9, "p90_s"), (0.99, "p99_s"))
# Deployment-level supervisor events carry no replica; their message starts with "<deployment>: ".
_MESSAGE_DEPLOYMENT = re.compile(r"^([a-z0-9-]+): ")
# How long before a request's arrival at the engine its router span may have started (queueing in the
# router is short; the margin also covers clock skew between the plane and a remote engine host).
ROUTER_SPAN_LEAD_S: Final = 3600.0


class NotFound(LookupError):
    """A named thing the caller asked for does not exist; the message says what exists."""


# --- requests ----------------------------------------------------------------------------------------
def requests_page(
    engine: Engine, *, since: float | None, until: float | None, replica: str | None, before_id: int | None,
    limit: int,
) -> tuple[list[dict[str, Any]], int | None]:
    """Requests in [since, until), newest arrival first (ties by id), older than the row `before_id`.

    Returns the rows and the cursor of the next page (the last row's id), or None when no older row
    matches. Keyset pagination: each page is an index range scan, whatever the depth.
    """
    stmt = select(Request.__table__, Replica.name.label("replica")).outerjoin(Replica, Replica.id == Request.replica_id)
    if since is not None:
        stmt = stmt.where(Request.arrival_unix_s >= since)
    if until is not None:
        stmt = stmt.where(Request.arrival_unix_s < until)
    if replica is not None:
        stmt = stmt.where(Replica.name == replica)
    with engine.connect() as conn:
        if before_id is not None:
            arrival = conn.execute(select(Request.arrival_unix_s).where(Request.id == before_id)).scalar()
            if arrival is None:
                raise NotFound(f"no stored request has id {before_id}; pass next_before_id from a previous page")
            stmt = stmt.where(or_(Request.arrival_unix_s < arrival,
                                  and_(Request.arrival_unix_s == arrival, Request.id < before_id)))
        stmt = stmt.order_by(Request.arrival_unix_s.desc(), Request.id.desc()).limit(limit + 1)
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (int(rows[-1]["id"]) if more else None)


# --- replicas --------------------------------------------------------------------------------------
def replicas(engine: Engine) -> list[dict[str, Any]]:
    """Every known replica with its deployment (None for watched ones), its latest engine config and whether
    its deployment runs the simulated engine."""
    stmt = (select(Replica.id, Replica.name, Deployment.name.label("deployment"), Replica.backend, Replica.state,
                   Replica.url, Replica.created_unix_s, Replica.updated_unix_s, Replica.config_version,
                   ReplicaConfig.config, Deployment.spec)
            .outerjoin(Deployment, Deployment.id == Replica.deployment_id)
            .outerjoin(ReplicaConfig, and_(ReplicaConfig.replica_id == Replica.id,
                                           ReplicaConfig.version == Replica.config_version))
            .order_by(Replica.id))
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for r in rows:
        r["simulated"] = spec_is_simulated(r.pop("spec"))
    return rows


# --- the action audit log --------------------------------------------------------------------------------
def actions(
    engine: Engine, *, deployment: str | None, actor: str | None, since: float | None, until: float | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Lifecycle events whose actor is a person, the tuner or the supervisor, newest first.

    The deployment of an event is its replica's; for events about a whole deployment (no replica) it is
    the `deployment` attribute (tuner decisions) or the "<deployment>: " prefix of the supervisor's message.
    """
    e = LifecycleEvent
    attr_dep = e.attributes["deployment"].as_string()
    stmt = (select(e.id, e.ts_unix_s, Replica.name.label("replica"), Deployment.name.label("deployment"), e.kind,
                   e.actor, e.reason, e.message, e.before_config, e.after_config, e.attributes, e.replica_id,
                   attr_dep.label("attr_deployment"))
            .outerjoin(Replica, Replica.id == e.replica_id)
            .outerjoin(Deployment, Deployment.id == Replica.deployment_id)
            .where(e.actor.in_([actor] if actor is not None else ACTION_ACTORS)))
    if since is not None:
        stmt = stmt.where(e.ts_unix_s >= since)
    if until is not None:
        stmt = stmt.where(e.ts_unix_s < until)
    if deployment is not None:
        # The message's own prefix, compared exactly: LIKE ignores case on SQLite and not on PostgreSQL.
        prefix = f"{deployment}: "
        stmt = stmt.where(or_(Deployment.name == deployment, attr_dep == deployment,
                              and_(e.replica_id.is_(None), func.substr(e.message, 1, len(prefix)) == prefix)))
    stmt = stmt.order_by(e.ts_unix_s.desc(), e.id.desc()).limit(limit)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for r in rows:
        attr = r.pop("attr_deployment")
        rid = r.pop("replica_id")
        if r["deployment"] is None:
            m = _MESSAGE_DEPLOYMENT.match(r["message"] or "") if rid is None else None
            r["deployment"] = attr if attr is not None else (m.group(1) if m else None)
    return rows


def _unknown_deployment(name: str, known: Sequence[str]) -> NotFound:
    return NotFound(f"unknown deployment {name!r}; known: {', '.join(known) or 'none'}")


def check_replica_known(engine: Engine, replica: str) -> None:
    """NotFound when the store has no replica of that name: a filter on a misspelt name would answer with an
    empty list, as if it had served nothing."""
    with engine.connect() as conn:
        if conn.scalar(select(Replica.id).where(Replica.name == replica)) is None:
            raise NotFound(f"unknown replica {replica!r}; GET /api/v1/replicas lists the replicas the plane knows")


def check_deployment_known(engine: Engine, deployment: str) -> None:
    """NotFound naming the deployments the store knows (its deployments and those of its recommendations) when
    `deployment` is none of them: a filter on a misspelt name would answer with an empty list, as if nothing
    had happened to it."""
    with engine.connect() as conn:
        known = set(conn.scalars(select(Deployment.name))) | set(conn.scalars(
            select(Recommendation.deployment).distinct()))
    if deployment not in known:
        raise _unknown_deployment(deployment, sorted(known))


# --- SLO history -------------------------------------------------------------------------------------------
def quantile_sli(slo: Slo) -> str:
    """The latency SLI whose quantiles the history shows: the SLO's first target, e2e for error-rate SLOs."""
    return slo.targets[0].sli if slo.targets else "e2e"


def slo_history(engine: Engine, slo: Slo, since: float, until: float, step_s: int,
                *, attempts: int = 5) -> dict[str, Any]:
    """Attainment and latency quantiles per UTC-aligned step (whole minutes) over [since, until).

    The quantiles are re-read when the rollup committed while they were read, as the SLO evaluation does.
    """
    series = attainment_series(engine, slo, since, until, step_s, attempts=attempts)
    sli = quantile_sli(slo)
    column = SLI_COLUMNS[sli]
    for _ in range(attempts):
        with engine.connect() as conn:
            reader = Reader(conn, slo.deployment)
            quantiles = []
            for p in series:
                sketch, _ = reader.sketch(column, p.start_unix_s, p.end_unix_s)
                quantiles.append({key: sketch.quantile(q) for q, key in HISTORY_QUANTILES})
            if reader.unchanged():
                break
    else:
        raise RollupBusy(f"the SLO rollup committed during each of {attempts} reads of {slo.name}; try again")
    pts = [{"ts_unix_s": p.start_unix_s, "end_unix_s": p.end_unix_s, "requests": p.total, "good": p.good,
            "unknown": p.unknown, "attainment": p.attainment, **q} for p, q in zip(series, quantiles, strict=True)]
    return {"slo": slo.name, "deployment": slo.deployment, "objective": slo.objective, "step_s": step_s,
            "quantile_sli": sli, "points": pts}


# --- cost --------------------------------------------------------------------------------------------------
_GONE_STATES: Final = (STOPPED, FAILED)
_NOT_RUNNING: Final = (STOPPED, FAILED, CRASHED, CRASHLOOP)  # states in which no engine process runs
EXTERNAL: Final = "external"  # the backend of a replica the plane only watches (its row made at its first scrape)
def _samples(engine: Engine, replica_ids: Sequence[int], since: float, until: float) -> dict[int, cost.Samples]:
    """Each replica's samples in [since, until) plus its neighbours outside: the last sample and the last
    successful one before `since`, the first and the first successful one from `until` on, so intervals
    straddling the window's edges are split like any other (up time and counter increases)."""
    s = EngineSample
    cols = (s.ts_unix_s, s.scrape_ok, s.prompt_tokens_total, s.generation_tokens_total)
    rows: dict[int, set[Any]] = {int(r): set() for r in replica_ids}
    if not rows:
        return {}
    with engine.connect() as conn:
        # Replicas stopped for good before the window (names are never reused, so they only accumulate) have no
        # sample in it or after it: their edge lookups, 4 queries each, are skipped.
        gone = set(conn.scalars(select(Replica.id).where(
            Replica.id.in_(list(rows)), Replica.state.in_(_GONE_STATES),
            Replica.updated_unix_s < since - cost.DEFAULT_MAX_GAP_S)))
        # When the plane launched each replica it supervises (a watched one's row is made at its first scrape),
        # and when it stopped running: its start-up is billed (see `cost.Samples.starting`) until its first
        # sample, or while it never had one, until it stopped, failed, crashed or was given up on (crash loop).
        # A restart keeps the first launch time: the back-off between crashes before any sample is billed too.
        launched: dict[int, tuple[float, float | None]] = {
            int(i): (float(c), float(u) if st in _NOT_RUNNING and u is not None else None)
            for i, c, st, u in conn.execute(
                select(Replica.id, Replica.created_unix_s, Replica.state, Replica.updated_unix_s).where(
                    Replica.id.in_([r for r in rows if r not in gone]), Replica.backend != EXTERNAL))}
        before, after = (s.ts_unix_s < since, s.ts_unix_s.desc()), (s.ts_unix_s >= until, s.ts_unix_s.asc())
        for rid in (r for r in rows if r not in gone):
            for (edge, order), only_ok in ((before, False), (before, True), (after, False), (after, True)):
                q = select(*cols).where(s.replica_id == rid, edge)
                row = conn.execute((q.where(s.scrape_ok.is_(True)) if only_ok else q).order_by(order).limit(1)).first()
                if row is not None:
                    rows[rid].add(tuple(row))
        in_window = select(s.replica_id, *cols).where(s.ts_unix_s >= since, s.ts_unix_s < until,
                                                       s.replica_id.in_(list(rows)))
        for rid, *rest in conn.execute(in_window):
            rows[int(rid)].add(tuple(rest))
    out = {}
    for rid, r in rows.items():
        start, end = launched.get(rid, (None, None))
        out[rid] = cost.Samples.from_rows(r, launched_unix_s=start, ended_unix_s=end)
    return out


def _cost_groups(engine: Engine, watched_price: float | None,
                 deployment: str | None) -> list[tuple[str, float | None, list[int]]]:
    """(deployment, price per replica-hour, replica ids): stored deployments, then the watched replicas as
    `cost.WATCHED`; only `deployment` when given. Raises NotFound for a `deployment` that is neither."""
    with engine.connect() as conn:
        deps = [(int(i), str(n), d) for i, n, d in conn.execute(
            select(Deployment.id, Deployment.name, Deployment.spec).order_by(Deployment.id))]
        reps = [(int(i), d) for i, d in conn.execute(select(Replica.id, Replica.deployment_id))]
    groups: list[tuple[str, float | None, list[int]]] = [
        (name, cost.price_per_replica_hour(spec), [r for r, d in reps if d == dep_id]) for dep_id, name, spec in deps]
    watched = [r for r, d in reps if d is None]
    if watched:
        groups.append((cost.WATCHED, watched_price, watched))
    if deployment is not None:
        groups = [g for g in groups if g[0] == deployment]
        if not groups:
            known = [n for _, n, _ in deps] + ([cost.WATCHED] if watched else [])
            raise _unknown_deployment(deployment, known)
    return groups


def cost_usage(
    engine: Engine, edges: cost.FloatArray, *, watched_price: float | None,
    max_gap_s: float = cost.DEFAULT_MAX_GAP_S, deployment: str | None = None,
) -> list[cost.Usage]:
    """Usage per deployment (stored deployments, then the watched replicas as `cost.WATCHED`) over the steps.

    Raises NotFound for a `deployment` that is neither stored nor the watched group.
    """
    groups = _cost_groups(engine, watched_price, deployment)
    samples = _samples(engine, [r for g in groups for r in g[2]], float(edges[0]), float(edges[-1]))
    return [cost.usage(name, price, [samples[r] for r in ids], edges, max_gap_s) for name, price, ids in groups]


def cost_source(engine: Engine, *, watched_price: float | None,
                max_gap_s: float = cost.DEFAULT_MAX_GAP_S) -> cost.UsageSource:
    """`cost_usage` bound to a store, for `cost.CostCollector`."""
    def source(edges: cost.FloatArray) -> list[cost.Usage]:
        return cost_usage(engine, edges, watched_price=watched_price, max_gap_s=max_gap_s)
    return source


def _step_number(engine: Engine, ts: Any, step_s: int) -> ColumnElement[Any]:
    """floor(ts / step_s) in SQL: SQLite has no floor() in every build, but truncation is the same for ts >= 0."""
    if engine.dialect.name == "sqlite":
        return cast(ts / step_s, Integer)
    return func.floor(ts / step_s)


def tenant_tokens(engine: Engine, since: float, until: float, step_s: int,
                  replica_ids: Sequence[int] | None = None) -> list[cost.TenantTokens]:
    """Requests arriving in [since, until) summed per replica, step (`cost.step_edges` numbering) and tenant.

    A request's tenant is that of the router span with the same trace id (vLLM's span carries the trace
    the router sent upstream); no router span, or one without a tenant: tenant None. Should one trace
    hold router spans of several tenants (a client reusing a traceparent), the least tenant name wins.
    A group holding a request whose token count is unknown (NULL: its span carried no usage) has unknown
    tokens of that kind (NaN), not the known requests' sum. `replica_ids`: only requests of these replicas.
    """
    rs, rq = RouterSpan, Request
    tenants = (select(rs.trace_id, func.min(rs.tenant).label("tenant"))
               .where(rs.started_unix_s >= since - ROUTER_SPAN_LEAD_S, rs.started_unix_s < until)
               .group_by(rs.trace_id).subquery())
    bucket = _step_number(engine, rq.arrival_unix_s, step_s).label("bucket")
    stmt = (select(rq.replica_id, bucket, tenants.c.tenant, func.count().label("requests"),
                   func.coalesce(func.sum(rq.prompt_tokens), 0), func.coalesce(func.sum(rq.completion_tokens), 0),
                   func.count(rq.prompt_tokens), func.count(rq.completion_tokens))
            .outerjoin(tenants, tenants.c.trace_id == rq.trace_id)
            .where(rq.arrival_unix_s >= since, rq.arrival_unix_s < until)
            .group_by(rq.replica_id, bucket, tenants.c.tenant))
    if replica_ids is not None:
        stmt = stmt.where(rq.replica_id.in_(list(replica_ids)))
    first = math.floor(since / step_s)
    with engine.connect() as conn:
        return [cost.TenantTokens(None if rid is None else int(rid), int(b) - first, tenant, int(n),
                                  float(p) if np_ == n else math.nan, float(c) if nc == n else math.nan)
                for rid, b, tenant, n, p, c, np_, nc in conn.execute(stmt)]


def tenant_cost(
    engine: Engine, since: float, until: float, step_s: int, *, watched_price: float | None,
    max_gap_s: float = cost.DEFAULT_MAX_GAP_S, deployment: str | None = None,
) -> cost.TenantCosts:
    """Cost per tenant over the steps of [since, until): each replica's cost (up time x its deployment's
    price) split between tenants by `cost.tenant_costs`. Raises NotFound for an unknown `deployment`."""
    edges = cost.step_edges(since, until, step_s)
    groups = _cost_groups(engine, watched_price, deployment)
    prices = {rid: price for _, price, ids in groups for rid in ids}
    samples = _samples(engine, list(prices), since, until)
    replica_cost = {rid: cost.replica_usd(cost.up_seconds(samples[rid], edges, max_gap_s), price,
                                          cost.unknown_seconds(samples[rid], edges, max_gap_s))
                    for rid, price in prices.items()}
    rows = tenant_tokens(engine, since, until, step_s, None if deployment is None else list(prices))
    seen = {rid: cost.seen_near(samples[rid], edges, max_gap_s) for rid in prices}
    return cost.tenant_costs(edges, replica_cost, rows, seen)


# --- GPU summary -----------------------------------------------------------------------------------------
_GPU_KEY: Final = (GpuSample.uuid, GpuSample.mig_instance, GpuSample.host, GpuSample.gpu_index, GpuSample.source)
_GPU_LATEST: Final = ("ts_unix_s", "util_ratio", "mem_copy_util_ratio", "fb_used_bytes", "fb_free_bytes", "power_w",
                      "energy_j", "temp_c", "sm_clock_mhz", "xid_errors", "gr_engine_active_ratio",
                      "tensor_active_ratio", "dram_active_ratio")


def gpu_summary(engine: Engine, since: float, until: float) -> dict[str, Any]:
    """Per GPU (uuid, host, index, source): its latest reading in [since, until), mean utilisation and peak
    temperature there. `available` says whether any GPU sample was ever stored."""
    g = GpuSample
    agg = (select(*_GPU_KEY, func.max(g.ts_unix_s).label("last_ts"), func.avg(g.util_ratio).label("mean_util"),
                  func.max(g.temp_c).label("max_temp"))
           .where(g.ts_unix_s >= since, g.ts_unix_s < until).group_by(*_GPU_KEY).subquery())
    latest = (select(g.__table__, agg.c.mean_util, agg.c.max_temp)
              .join(agg, and_(*(col.is_not_distinct_from(agg.c[col.key]) for col in _GPU_KEY),
                              g.ts_unix_s == agg.c.last_ts))
              # NULLs first on both databases (PostgreSQL sorts them last by default, SQLite first)
              .order_by(g.host.nulls_first(), g.gpu_index.nulls_first(), g.uuid.nulls_first(),
                        g.mig_instance.nulls_first(), g.id.desc()))
    with engine.connect() as conn:
        available = bool(conn.execute(select(exists().where(g.id.is_not(None)))).scalar())
        rows = [dict(r._mapping) for r in conn.execute(latest)] if available else []
    gpus: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:  # two readings of one GPU at the same second: keep the last stored
        key = (r["uuid"], r["mig_instance"], r["host"], r["gpu_index"], r["source"])
        if key in gpus:
            continue
        gpus[key] = {"uuid": r["uuid"], "mig_instance": r["mig_instance"], "gpu_index": r["gpu_index"],
                     "host": r["host"], "model_name": r["model_name"], "source": r["source"],
                     "latest": {k: r[k] for k in _GPU_LATEST},
                     "mean_util_ratio": _float(r["mean_util"]), "max_temp_c": _float(r["max_temp"])}
    return {"available": available, "gpus": list(gpus.values())}


def _float(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if np.isfinite(v) else None
