"""The router_spans table (migrations 0005 and 0006) on SQLite and PostgreSQL, and the SpanWriter that fills it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from prometheus_client import CollectorRegistry
from sqlalchemy import inspect, select

from controlplane import names
from controlplane.store.db import alembic_config, make_engine, upgrade
from controlplane.store.models import RouterSpan
from controlplane.store.repo import Store
from controlplane.supervisor.router import RouterRecord, SpanWriter


def record(k: int, tenant: str | None = "acme") -> RouterRecord:
    return RouterRecord(f"{k:032x}", f"{k:016x}", None, tenant, "tiny-0", 100.0 + k, 101.0 + k, 200, True)


def test_migration_0005_adds_router_spans_and_comes_off_again(store: Store) -> None:
    cfg = alembic_config(store.engine)
    command.downgrade(cfg, "0004")
    try:
        assert names.T_ROUTER_SPANS not in inspect(store.engine).get_table_names()
    finally:
        upgrade(store.engine)
    insp = inspect(store.engine)
    assert names.T_ROUTER_SPANS in insp.get_table_names()
    indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes(names.T_ROUTER_SPANS)}
    unique = {tuple(u["column_names"]) for u in insp.get_unique_constraints(names.T_ROUTER_SPANS)}
    assert ("started_unix_s",) in indexed
    assert ("trace_id", "span_id") in unique | indexed  # serves lookups by trace id (its leading column)


def test_the_writer_stores_every_recorded_span_by_the_time_it_is_closed(store: Store) -> None:
    writer = SpanWriter(store.engine, max_batch=7)  # several batches
    for k in range(1, 31):
        writer.record(record(k, tenant=None if k % 10 == 0 else "acme"))
    writer.close()
    with store.engine.connect() as conn:
        rows = conn.execute(select(RouterSpan.trace_id, RouterSpan.tenant, RouterSpan.status, RouterSpan.ok)
                            .order_by(RouterSpan.trace_id)).all()
    assert len(rows) == 30
    assert rows[0] == (f"{1:032x}", "acme", 200, True)
    assert [r.tenant for r in rows].count(None) == 3


def test_a_failed_write_is_counted_and_the_writer_carries_on(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")  # no router_spans table: every write fails
    registry = CollectorRegistry()
    writer = SpanWriter(engine, registry=registry)
    writer.record(record(1))
    writer.record(record(2))
    writer.close()
    assert registry.get_sample_value(f"{names.PLANE_ROUTER_SPANS_DROPPED}_total", {"reason": "store_error"}) == 2
    engine.dispose()


def test_migration_0006_adds_method_and_path_and_keeps_the_spans_either_way(store: Store) -> None:
    writer = SpanWriter(store.engine)
    writer.record(RouterRecord(f"{1:032x}", f"{1:016x}", None, None, "tiny-0", 100.0, 101.0, 200, True, "POST",
                               "/v1/completions"))
    writer.close()
    cfg = alembic_config(store.engine)
    command.downgrade(cfg, "0005")
    try:
        cols = {c["name"] for c in inspect(store.engine).get_columns(names.T_ROUTER_SPANS)}
        assert "method" not in cols and "path" not in cols
    finally:
        upgrade(store.engine)
    with store.engine.connect() as conn:
        rows = conn.execute(select(RouterSpan.trace_id, RouterSpan.method, RouterSpan.path)).all()
    assert rows == [(f"{1:032x}", None, None)]  # kept; what the old schema could not hold is unknown
