import subprocess
import sys

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from collectors.otlp.decode import decode_request, event_dict
from controlplane.slo import rollup
from controlplane.store.db import alembic_config, make_engine, upgrade
from controlplane.store.models import Base, ReplicaConfig
from controlplane.store.repo import Store
from tests.spans import export, llm_span


def _write(store: Store, spans: list, replica: str = "r0") -> None:  # type: ignore[type-arg]
    batch = decode_request(export(spans, replica=replica))
    store.write_spans(batch.requests, [event_dict(e) for e in batch.events])


def test_migrations_build_exactly_the_schema_the_models_declare(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_upgrading_twice_is_harmless(store: Store) -> None:
    upgrade(store.engine)
    assert "requests" in inspect(store.engine).get_table_names()


def test_time_window_queries_are_indexed(store: Store) -> None:
    insp = inspect(store.engine)
    indexed = {tuple(ix["column_names"]) for t in ("requests", "engine_samples", "gpu_samples",
                                                     "lifecycle_events") for ix in insp.get_indexes(t)}
    assert ("arrival_unix_s",) in indexed and ("replica_id", "arrival_unix_s") in indexed
    assert ("replica_id", "finish_unix_s") in indexed
    assert ("replica_id", "ts_unix_s") in indexed and ("ts_unix_s",) in indexed


def test_requests_are_returned_by_window_replica_and_limit_newest_first(store: Store) -> None:
    base = 1_700_000_000
    _write(store, [llm_span(start_ns=(base + i) * 10**9) for i in range(5)], replica="a")
    _write(store, [llm_span(start_ns=(base + 10) * 10**9)], replica="b")
    rows = store.requests(since_unix_s=base + 1, until_unix_s=base + 4, replica="a")
    assert [r["arrival_unix_s"] for r in rows] == [base + 3, base + 2, base + 1]
    assert {r["replica"] for r in rows} == {"a"}
    assert len(store.requests(limit=2)) == 2
    assert store.requests(limit=1)[0]["replica"] == "b"


def test_unknown_engine_readings_are_stored_as_null_not_zero(store: Store) -> None:
    rid = store.register_replica("r0", url="http://x", backend="external")
    store.write_engine_sample({"replica_id": rid, "ts_unix_s": 1.0, "scrape_ok": False, "error": "refused",
                               "kv_usage_ratio": None, "num_waiting": None})
    (row,) = store.engine_samples()
    assert row["scrape_ok"] is False and row["kv_usage_ratio"] is None and row["num_waiting"] is None


def test_engine_configuration_is_versioned_only_when_it_changes(store: Store) -> None:
    store.register_replica("r0", url=None, backend="local", config={"max_num_seqs": 8})
    store.register_replica("r0", url=None, backend="local", config={"max_num_seqs": 8})
    store.register_replica("r0", url=None, backend="local", config={"max_num_seqs": 16})
    assert store.count(ReplicaConfig) == 2
    assert Store(store.engine).register_replica("r0", url=None, backend="local") == \
        store.register_replica("r0", url=None, backend="local")


def test_gpu_samples_round_trip(store: Store) -> None:
    store.write_gpu_samples([{"ts_unix_s": 5.0, "source": "nvml", "uuid": "GPU-1", "fb_used_bytes": 2**36,
                              "util_ratio": 0.5}])
    (row,) = store.gpu_samples()
    assert row["fb_used_bytes"] == 2**36 and row["util_ratio"] == 0.5 and row["power_w"] is None


def test_a_rolled_back_batch_leaves_no_stale_replica_id_behind(store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest
    from sqlalchemy.exc import OperationalError

    import controlplane.store.repo as repo

    real = repo._bulk_insert_ignore

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("simulated failure after the replica insert"))

    monkeypatch.setattr(repo, "_bulk_insert_ignore", boom)
    with pytest.raises(OperationalError):
        _write(store, [llm_span()], replica="a")
    monkeypatch.setattr(repo, "_bulk_insert_ignore", real)
    _write(store, [llm_span()], replica="b")  # may reuse the id "a" never got
    _write(store, [llm_span()], replica="a")
    by_replica = {}
    for r in store.requests():
        by_replica[r["replica"]] = by_replica.get(r["replica"], 0) + 1
    assert by_replica == {"a": 1, "b": 1}


def test_the_finish_time_migration_fills_existing_rows_and_starts_the_rollups_over(bare_engine: Engine) -> None:
    """Rows stored before 0007 get finish = arrival + e2e (arrival where e2e is unknown), and the
    rollups, bucketed by arrival until then, are emptied for the next run to rebuild."""
    upgrade(bare_engine, "0006")
    with bare_engine.begin() as conn:
        conn.execute(text("INSERT INTO deployments (id, name, created_unix_s) VALUES (1, 'd', 0)"))
        conn.execute(text("INSERT INTO replicas (id, deployment_id, name, backend, state, config_version, "
                          "created_unix_s) VALUES (1, 1, 'r1', 'local', 'ready', 0, 0)"))
        conn.execute(text("INSERT INTO requests (id, request_id, replica_id, arrival_unix_s, e2e_s, trace_id, "
                          "span_id) VALUES (1, 'a', 1, 1000.0, 400.0, 't1', 's'), "
                          "(2, 'b', 1, 1000.0, NULL, 't2', 's'), (3, 'c', 1, 1000.0, 1e15, 't3', 's')"))
        conn.execute(text("INSERT INTO slo_rollup_state (name, watermark_id, gaps, version, updated_unix_s) "
                          "VALUES ('requests', 2, '[]', 7, 0)"))
        conn.execute(text("INSERT INTO slo_rollup_targets (id, key, backfill_upto_id, backfill_done_id, "
                          "backfill_excluded, created_unix_s) VALUES (1, 'e2e<=60.0', 2, 2, '[]', 0)"))
        conn.execute(text("INSERT INTO slo_rollup_counts VALUES (1, 60, 960, 1, 1, 2, 0)"))
    upgrade(bare_engine, "0007")
    with bare_engine.connect() as conn:
        assert conn.execute(text("SELECT id, finish_unix_s FROM requests ORDER BY id")).all() == [
            (1, 1400.0), (2, 1000.0), (3, 1000.0)]
        assert conn.execute(text("SELECT count(*) FROM slo_rollup_counts")).scalar() == 0
        assert conn.execute(text("SELECT watermark_id, version FROM slo_rollup_state")).one() == (0, 8)
        assert conn.execute(text("SELECT backfill_upto_id, backfill_done_id FROM slo_rollup_targets")).one() == (0, 0)
    upgrade(bare_engine)
    rollup.run(bare_engine, {"e2e<=60.0"}, 2000.0)  # the rebuild puts request 1 in its finish minute
    with bare_engine.connect() as conn:
        minutes = conn.execute(text("SELECT bucket_start_unix_s, total, unknown FROM slo_rollup_counts "
                                    "WHERE level_s = 60 ORDER BY bucket_start_unix_s")).all()
    assert minutes == [(960, 1, 1), (1380, 1, 0)]  # 3 (bad, absurd e2e) at its arrival; 2 unknown


def test_downgrading_to_base_and_back_works_with_data_in_the_store(bare_engine: Engine) -> None:
    # A batch migration on SQLite rebuilds referenced tables: with foreign keys enforced that failed and left a
    # temporary table behind, so neither the downgrade nor a retry could finish.
    upgrade(bare_engine)
    store = Store(bare_engine)
    rid = store.register_replica("r0", url="http://127.0.0.1:9", backend="external")
    store.write_engine_sample({"replica_id": rid, "ts_unix_s": 1.0, "scrape_ok": True})
    command.downgrade(alembic_config(bare_engine), "base")
    with bare_engine.connect() as conn:
        left = set(inspect(conn).get_table_names()) - {"alembic_version"}
    assert left == set()
    upgrade(bare_engine)
    assert Store(bare_engine).engine_samples() == []
    if bare_engine.dialect.name == "sqlite":
        with bare_engine.connect() as conn:  # the pooled connection enforces foreign keys again
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.postgres
def test_two_planes_migrating_a_fresh_postgresql_at_once_both_succeed() -> None:
    # Two processes (Alembic's context is process-global): before the migration lock, the second failed on a
    # unique violation while both created the schema.
    from tests.conftest import new_pg_database

    code = "import sys; from controlplane.store.db import make_engine, upgrade; upgrade(make_engine(sys.argv[1]))"
    with new_pg_database() as url:
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        finally:
            engine.dispose()


def test_spans_of_a_replica_nobody_registered_are_kept_and_warned_about_once(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.register_replica("known", url="http://127.0.0.1:8100", backend="local")
    with caplog.at_level("WARNING", logger="controlplane.store.repo"):
        _write(store, [llm_span(request_id="x1")], replica="known")
        _write(store, [llm_span(request_id="x2")], replica="vllm")  # e.g. vLLM's default service name
        _write(store, [llm_span(request_id="x3")], replica="vllm")
        Store(store.engine).write_spans(  # a restarted plane: the replica is in the store already
            decode_request(export([llm_span(request_id="x4")], replica="vllm")).requests, [])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'vllm'" in warned[0] and "controlplane.replica" in warned[0]
    assert sorted(r["replica"] for r in store.requests()) == ["known", "vllm", "vllm", "vllm"]


def test_the_one_token_goodput_migration_starts_the_rollups_over(bare_engine: Engine) -> None:
    """Counts made under the older rule (a one-token answer's TPOT unknown) are emptied for the next run."""
    upgrade(bare_engine, "0008")
    store = Store(bare_engine)
    _write(store, [llm_span(request_id="one", completion=1, ttft=0.1)])
    rollup.run(bare_engine, {"tpot<=0.05&ttft<=0.5"}, 2e9)
    counts = "SELECT sum(good), sum(total), sum(unknown) FROM slo_rollup_counts WHERE level_s = 60"
    with bare_engine.connect() as conn:
        assert tuple(conn.execute(text(counts)).one()) == (1, 1, 0)  # this code counts it good at once
        conn.execute(text("UPDATE slo_rollup_counts SET good = 0, total = 0, unknown = 1"))  # as 0008's code did
        conn.commit()
    upgrade(bare_engine)
    with bare_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM slo_rollup_counts")).scalar() == 0
        assert conn.execute(text("SELECT watermark_id FROM slo_rollup_state")).scalar() == 0
    rollup.run(bare_engine, {"tpot<=0.05&ttft<=0.5"}, 2e9)
    with bare_engine.connect() as conn:
        assert tuple(conn.execute(text(counts)).one()) == (1, 1, 0)


def test_write_spans_counts_the_events_it_stored_not_those_it_was_given(store: Store) -> None:
    def event(key: str) -> dict[str, object]:
        return {"replica": "r0", "ts_unix_s": 1_700_000_000.0, "kind": "span:Load weights", "duration_s": 1.0,
                "attributes": {}, "dedupe_key": key}

    batch = [event("d1"), event("d1"), event("d2")]  # one repeated within the batch
    assert store.write_spans([], batch) == (0, 2)
    assert store.write_spans([], batch) == (0, 0)  # a retried batch writes nothing (PostgreSQL said 3, then 3)
    assert len([e for e in store.events() if e["kind"] == "span:Load weights"]) == 2


def test_rows_at_one_timestamp_come_newest_stored_first_and_a_limit_keeps_the_newest(store: Store) -> None:
    rid = store.register_replica("r0", url="http://127.0.0.1:9", backend="external")
    for k in range(5):
        store.write_engine_sample({"replica_id": rid, "ts_unix_s": 100.0, "scrape_ok": True,
                                   "num_running": float(k)})
    rows = store.engine_samples(limit=3)
    assert [r["num_running"] for r in rows] == [4.0, 3.0, 2.0]
