"""A monitor tick rolls up, evaluates every SLO and publishes the statuses the exporter reads."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.exc import OperationalError

from controlplane import names
from controlplane.slo import query
from controlplane.slo.export import SloCollector
from controlplane.slo.monitor import SloMonitor, rollup_keys
from controlplane.store.repo import Store
from tests.unit.slo.factories import NOW, brute_counts, insert_rows, make_slo, random_rows, seed_fleet


def test_a_tick_rolls_up_evaluates_and_publishes_every_slo(store: Store) -> None:
    seed_fleet(store.engine)
    rows = random_rows(1500, seed=11)
    insert_rows(store.engine, rows)
    slos = [make_slo(name="lat"), make_slo("goodput", (("ttft", 0.2), ("tpot", 0.02)), name="gp"),
            make_slo("error_rate", (), name="err")]
    assert rollup_keys(slos) == {"ttft<=0.2", "tpot<=0.02&ttft<=0.2"}
    monitor = SloMonitor(store.engine, slos)
    report, statuses = monitor.tick(NOW)
    assert report.watermark_id == 1500 and report.backfilling == ()
    assert [s.slo.name for s in monitor.statuses()] == ["lat", "gp", "err"]
    assert (statuses[0].counts.good, statuses[0].counts.total, statuses[0].counts.unknown) == \
        brute_counts(rows, (("ttft", 0.2),), NOW - 2 * 86400.0, NOW)
    registry = CollectorRegistry()
    registry.register(SloCollector(monitor.statuses))
    text = generate_latest(registry).decode()
    assert f'{names.SLO_ATTAINMENT}{{deployment="d",sli="goodput",slo="gp"}}' in text


def test_one_failing_slo_is_left_out_and_the_others_still_publish(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(store.engine)
    real = query.evaluate

    def flaky(engine, slo, now):  # type: ignore[no-untyped-def]
        if slo.name == "bad":
            raise RuntimeError("boom")
        return real(engine, slo, now)

    monkeypatch.setattr("controlplane.slo.monitor.evaluate", flaky)
    monitor = SloMonitor(store.engine, [make_slo(name="bad"), make_slo(name="good")])
    monitor.tick(NOW)
    assert [s.slo.name for s in monitor.statuses()] == ["good"]


def test_a_failed_rollup_still_evaluates_every_slo_from_the_rows_as_they_are(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(store.engine)
    rows = random_rows(1500, seed=11)
    insert_rows(store.engine, rows)

    def locked(*a: object, **k: object) -> None:
        raise OperationalError("UPDATE rollup_state", {}, Exception("database is locked"))

    monkeypatch.setattr("controlplane.slo.monitor.run", locked)
    slo = make_slo(name="lat")
    report, statuses = SloMonitor(store.engine, [slo]).tick(NOW)
    assert report is None and [s.slo.name for s in statuses] == ["lat"]
    c = statuses[0].counts
    assert (c.good, c.total, c.unknown) == brute_counts(rows, (("ttft", 0.2),), NOW - 2 * 86400.0, NOW)


def test_each_slo_reports_how_long_ago_it_was_last_evaluated_for_the_stale_evaluation_alert(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_fleet(store.engine)
    real = query.evaluate
    broken = {"bad"}

    def flaky(engine, slo, now):  # type: ignore[no-untyped-def]
        if slo.name in broken:
            raise RuntimeError("boom")
        return real(engine, slo, now)

    monkeypatch.setattr("controlplane.slo.monitor.evaluate", flaky)
    monitor = SloMonitor(store.engine, [make_slo(name="bad"), make_slo(name="good")], started_unix_s=NOW - 100)
    monitor.tick(NOW)
    assert monitor.evaluation_ages(NOW + 30) == {("bad", "d"): 130.0, ("good", "d"): 30.0}
    broken.clear()
    monitor.tick(NOW + 60)
    assert monitor.evaluation_ages(NOW + 60) == {("bad", "d"): 0.0, ("good", "d"): 0.0}
    registry = CollectorRegistry()
    registry.register(SloCollector(monitor.statuses, age_provider=lambda: monitor.evaluation_ages(NOW + 75)))
    text = generate_latest(registry).decode()
    assert f'{names.PLANE_SLO_EVALUATION_AGE}{{deployment="d",slo="bad"}} 15.0' in text
