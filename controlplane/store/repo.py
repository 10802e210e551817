"""Reads and writes of the store. Every write is one transaction; callers ack only after it returns."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from controlplane import names
from controlplane.store.models import (
    Deployment,
    EngineSample,
    GpuSample,
    LifecycleEvent,
    Replica,
    ReplicaConfig,
    Request,
    finish_of,
)


def _insert_ignore_stmt(conn: Connection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, so a retried OTLP batch is stored once."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    raise RuntimeError(f"unsupported database dialect {dialect!r}")  # pragma: no cover


def _inserted(result: Any, attempted: int) -> int:
    return int(result.rowcount) if result.rowcount is not None and result.rowcount >= 0 else attempted


def _insert_ignore(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert the rows a unique key does not already hold; returns how many were written. PostgreSQL reports
    no row count for SQLAlchemy's batched executemany (the count fell back to every row tried, duplicates
    included): the ids the insert returns are counted there instead."""
    if not rows:
        return 0
    stmt = _insert_ignore_stmt(conn, table)
    if conn.dialect.name == "postgresql":
        return len(conn.execute(stmt.returning(*table.primary_key.columns), list(rows)).all())
    return _inserted(conn.execute(stmt, list(rows)), len(rows))


def _bulk_insert_ignore(
    conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], replica_ids: Mapping[str, int]
) -> int:
    """The hot-path variant of `_insert_ignore`, for rows naming their replica by `replica`.

    SQLAlchemy's executemany processes parameters row by row in Python, which cost about as much
    as the insert itself at ingest rates; here the statement is compiled once per dialect and the
    rows go to the driver's executemany as tuples (SQLite) or dicts (psycopg's named style).
    """
    if not rows:
        return 0
    cols = [c.name for c in table.columns if c.name != "id"]
    key = (conn.dialect.name, conn.dialect.paramstyle, table.name)
    sql = _COMPILED.get(key)
    if sql is None:
        sql = str(_insert_ignore_stmt(conn, table).compile(dialect=conn.dialect, column_keys=cols))
        _COMPILED[key] = sql
    params: list[Any]
    if conn.dialect.paramstyle == "qmark":
        at = cols.index("replica_id")
        rest = cols[:at] + cols[at + 1:]
        params = []
        for r in rows:
            values = [r.get(c) for c in rest]
            values.insert(at, replica_ids[r["replica"]])
            params.append(tuple(values))
    else:  # psycopg's named style
        params = [{**{c: r.get(c) for c in cols}, "replica_id": replica_ids[r["replica"]]} for r in rows]
    return _inserted(conn.exec_driver_sql(sql, params), len(rows))


_COMPILED: dict[tuple[str, str, str], str] = {}


log = logging.getLogger(__name__)


def spec_is_simulated(spec: Mapping[str, Any] | None) -> bool:
    """Whether a deployment's stored spec document runs the simulated engine (it has a `spec.simulated`
    section; the stored document of a vLLM deployment has none)."""
    inner = (spec or {}).get("spec")
    return isinstance(inner, Mapping) and inner.get("simulated") is not None


def simulated_deployments(engine: Engine) -> frozenset[str]:
    """The names of the deployments whose replicas run the simulated engine, so that their alerts, SLO
    statuses and replicas are labelled as simulated wherever they are shown."""
    with engine.connect() as conn:
        return frozenset(r.name for r in conn.execute(select(Deployment.name, Deployment.spec))
                         if spec_is_simulated(r.spec))


def scaled_to_zero_deployments(engine: Engine) -> frozenset[str]:
    """The deployments the plane keeps at 0 replicas on purpose (scaled down, or started at 0): nothing can
    finish there, so their SLO alerts do not hold on the long window's evidence (`alert_state.condition`)."""
    with engine.connect() as conn:
        return frozenset(conn.execute(select(Deployment.name).where(Deployment.desired_replicas == 0)).scalars())


class Store:
    """The plane's handle on the database: replica ids cached, SQLite writes serialised in-process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._replica_ids: dict[str, int] = {}
        # SQLite has one writer at a time; serialising here avoids busy-waits between our threads.
        self._write_lock: AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    # --- replicas -----------------------------------------------------------------------------
    def ensure_replica(
        self,
        conn: Connection,
        name: str,
        *,
        url: str | None = None,
        backend: str = "external",
        state: str = "watched",
        pending: dict[str, int],
        created: set[str] | None = None,
    ) -> int:
        """The replica's id, created if new. New ids go to `pending`: the caller caches them only
        after its transaction commits, so a rolled-back insert never leaves a stale id behind. The name of a
        replica this call created goes to `created`."""
        if name in self._replica_ids:
            return self._replica_ids[name]
        table = Replica.__table__
        rid = conn.execute(select(Replica.id).where(Replica.name == name)).scalar()
        if rid is not None:  # in the store already (written by an earlier plane, or another writer)
            pending[name] = int(rid)
            return int(rid)
        _insert_ignore(
            conn,
            table,  # type: ignore[arg-type]
            [{"name": name, "url": url, "backend": backend, "state": state, "config_version": 0,
              "created_unix_s": time.time()}],
        )
        rid = int(conn.execute(select(Replica.id).where(Replica.name == name)).scalar_one())
        pending[name] = rid
        if created is not None:
            created.add(name)
        return rid

    def register_replica(
        self, name: str, *, url: str | None, backend: str, config: Mapping[str, Any] | None = None
    ) -> int:
        """Create the replica if new; store `config` as a new version when it differs from the last."""
        pending: dict[str, int] = {}
        with self._write_lock, self.engine.begin() as conn:
            rid = self.ensure_replica(conn, name, url=url, backend=backend, pending=pending)
            if config is not None:
                last = conn.execute(
                    select(ReplicaConfig.version, ReplicaConfig.config)
                    .where(ReplicaConfig.replica_id == rid)
                    .order_by(ReplicaConfig.version.desc())
                    .limit(1)
                ).first()
                if last is None or dict(last.config) != dict(config):
                    version = 1 if last is None else last.version + 1
                    conn.execute(
                        insert(ReplicaConfig),
                        {"replica_id": rid, "version": version, "config": dict(config),
                         "created_unix_s": time.time()},
                    )
                    conn.execute(
                        update(Replica).where(Replica.id == rid).values(config_version=version)
                    )
        self._replica_ids.update(pending)
        return rid

    # --- supervised deployments -----------------------------------------------------------------
    def deployment_state(self, name: str) -> dict[str, Any] | None:
        """The stored row of a deployment (spec as last applied, desired replicas, engine config)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Deployment.__table__).where(Deployment.name == name)).first()
        return dict(row._mapping) if row else None

    def save_deployment(
        self, name: str, *, model: str | None, spec: Mapping[str, Any], desired_replicas: int,
        engine_config: Mapping[str, Any],
    ) -> int:
        """Create or update a deployment's row; returns its id."""
        now = time.time()
        values = {"model": model, "spec": dict(spec), "desired_replicas": desired_replicas,
                  "engine_config": dict(engine_config), "updated_unix_s": now}
        with self._write_lock, self.engine.begin() as conn:
            rid = conn.execute(select(Deployment.id).where(Deployment.name == name)).scalar()
            if rid is None:
                conn.execute(insert(Deployment), {"name": name, "created_unix_s": now, **values})
                rid = conn.execute(select(Deployment.id).where(Deployment.name == name)).scalar_one()
            else:
                conn.execute(update(Deployment).where(Deployment.id == rid).values(**values))
        return int(rid)

    def save_replica(
        self, name: str, *, deployment_id: int | None, url: str | None, backend: str, state: str,
        runtime: Mapping[str, Any] | None, config: Mapping[str, Any] | None,
    ) -> int:
        """Register a supervised replica (new config version when it changed) with its state and handle."""
        rid = self.register_replica(name, url=url, backend=backend, config=config)
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(update(Replica).where(Replica.id == rid).values(
                deployment_id=deployment_id, url=url, backend=backend, state=state,
                runtime=dict(runtime) if runtime is not None else None, updated_unix_s=time.time()))
        return rid

    def set_replica_state(self, replica_id: int, state: str) -> None:
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(update(Replica).where(Replica.id == replica_id).values(
                state=state, updated_unix_s=time.time()))

    def deployment_replicas(self, deployment_id: int) -> list[dict[str, Any]]:
        """Replicas recorded for a deployment, each with its latest engine config."""
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                select(Replica.__table__).where(Replica.deployment_id == deployment_id).order_by(Replica.id))]
            for r in rows:
                r["config"] = conn.execute(
                    select(ReplicaConfig.config).where(ReplicaConfig.replica_id == r["id"],
                                                       ReplicaConfig.version == r["config_version"])
                ).scalar()
        return rows

    def deployments(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(Deployment.__table__).order_by(Deployment.id))]

    def record_action(
        self, replica_id: int | None, kind: str, *, actor: str, reason: str | None, message: str | None = None,
        before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None,
        attributes: Mapping[str, Any] | None = None, ts_unix_s: float | None = None,
    ) -> None:
        """One audited action or lifecycle change: who (actor), why (reason code), config before/after."""
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(
                insert(LifecycleEvent),
                {"replica_id": replica_id, "ts_unix_s": time.time() if ts_unix_s is None else ts_unix_s,
                 "kind": kind, "actor": actor, "reason": reason, "message": message,
                 "attributes": dict(attributes or {}),
                 "before_config": dict(before) if before is not None else None,
                 "after_config": dict(after) if after is not None else None},
            )

    # --- writes -------------------------------------------------------------------------------
    def write_spans(
        self, requests: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]
    ) -> tuple[int, int]:
        """Store request rows and lifecycle events (with a `replica` name key) in one transaction."""
        # Rows from the span decoder carry their finish time; other writers (the simulator, fixtures)
        # may give only arrival and e2e.
        requests = [r if r.get("finish_unix_s") is not None else
                    {**r, "finish_unix_s": finish_of(r["arrival_unix_s"], r.get("e2e_s"))} for r in requests]
        events = list(events)
        pending: dict[str, int] = {}
        created: set[str] = set()
        with self._write_lock, self.engine.begin() as conn:
            ids = {r: self.ensure_replica(conn, r, pending=pending, created=created)
                   for r in {x["replica"] for x in [*requests, *events]}}
            ev_rows = [
                {"replica_id": ids[e["replica"]], "ts_unix_s": e["ts_unix_s"], "kind": e["kind"],
                 "actor": "engine", "duration_s": e["duration_s"], "attributes": e["attributes"],
                 "dedupe_key": e["dedupe_key"]}
                for e in events
            ]
            n_req = _bulk_insert_ignore(conn, Request.__table__, requests, ids)  # type: ignore[arg-type]
            n_ev = _insert_ignore(conn, LifecycleEvent.__table__, ev_rows)  # type: ignore[arg-type]
        self._replica_ids.update(pending)
        for name in sorted(created):  # once: from now on the replica is known
            log.warning("spans name replica %r, which no deployment or --watch has registered: they are stored "
                        "under a new watched replica without a URL, whose /metrics nobody scrapes (set the "
                        "engine's OTEL resource attribute %s, or its service.name, to the replica's name)",
                        name, names.RES_REPLICA)
        return n_req, n_ev

    def write_engine_sample(self, row: Mapping[str, Any]) -> None:
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(insert(EngineSample), dict(row))

    def write_gpu_samples(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(insert(GpuSample), [dict(r) for r in rows])

    def record_event(
        self, replica_id: int | None, kind: str, *, actor: str, reason: str | None = None,
        message: str | None = None, attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self.record_action(replica_id, kind, actor=actor, reason=reason, message=message, attributes=attributes)

    # --- reads --------------------------------------------------------------------------------
    def replica_names(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            return {int(i): str(n) for i, n in conn.execute(select(Replica.id, Replica.name))}

    def requests(
        self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
        replica: str | None = None, limit: int = 1000, by: str = "arrival",
    ) -> list[dict[str, Any]]:
        """Requests that arrived (by="arrival") or finished (by="finish", as SLO windows count them) in the
        window, newest first."""
        col = Request.finish_unix_s if by == "finish" else Request.arrival_unix_s
        return self._window(Request, col, since_unix_s, until_unix_s, replica, limit, Request.replica_id)

    def engine_samples(
        self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
        replica: str | None = None, limit: int = 1000,
    ) -> list[dict[str, Any]]:
        return self._window(EngineSample, EngineSample.ts_unix_s, since_unix_s, until_unix_s, replica, limit,
                            EngineSample.replica_id)

    def events(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        return self._window(LifecycleEvent, LifecycleEvent.ts_unix_s, None, None, None, limit,
                            LifecycleEvent.replica_id)

    def gpu_samples(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        return self._window(GpuSample, GpuSample.ts_unix_s, None, None, None, limit, None)

    def _window(
        self, model: Any, ts_col: Any, since: float | None, until: float | None,
        replica: str | None, limit: int, replica_col: Any,
    ) -> list[dict[str, Any]]:
        """Rows in [since, until), newest first, with the replica's name joined in where there is one."""
        stmt = (select(model.__table__, Replica.name.label("replica")).outerjoin(Replica, Replica.id == replica_col)
                if replica_col is not None else select(model.__table__))
        if since is not None:
            stmt = stmt.where(ts_col >= since)
        if until is not None:
            stmt = stmt.where(ts_col < until)
        if replica is not None:
            stmt = stmt.where(Replica.name == replica)
        # Ties broken by id (newest stored first): with many rows at one timestamp, which ones a limit keeps
        # (and in what order) would otherwise be up to the database and its plan.
        stmt = stmt.order_by(ts_col.desc(), model.__table__.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def count(self, model: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(model.__table__)).scalar_one())
