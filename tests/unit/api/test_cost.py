"""Cost per token arithmetic, against hand-computed figures; unknown stays null, never 0 or infinity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import event, update

from controlplane import cost, names
from controlplane.api.queries import cost_usage
from controlplane.store.models import Replica
from controlplane.store.repo import Store
from controlplane.supervisor.spec import parse_deployment


def steady(start: float, end: float, *, every_s: float = 10.0, prompt_per_s: float = 0.0,
           completion_per_s: float = 0.0, ok: bool = True) -> list[tuple[float, bool, float | None, float | None]]:
    """A replica scraped every `every_s` from start to end (inclusive), counters growing at a fixed rate."""
    ts = [float(t) for t in np.arange(start, end + every_s / 2, every_s)]
    return [(t, ok, (t - start) * prompt_per_s if ok else None, (t - start) * completion_per_s if ok else None)
            for t in ts]


def one_step(start: float, end: float) -> cost.FloatArray:
    return np.array([start, end])


def test_two_replicas_up_for_half_an_hour_at_two_dollars_an_hour_cost_two_dollars() -> None:
    replicas = [cost.Samples.from_rows(steady(0, 1800)), cost.Samples.from_rows(steady(0, 1800))]
    t = cost.totals(cost.usage("tiny", 2.0, replicas, one_step(0, 3600)))
    assert t.replica_hours == pytest.approx(1.0)
    assert t.usd == pytest.approx(2.0)


def test_per_million_figures_set_the_step_cost_against_each_token_kind() -> None:
    # One replica up the whole hour at $3.60/h: $3.60; 360k prompt and 120k completion tokens.
    s = cost.Samples.from_rows(steady(0, 3600, prompt_per_s=100, completion_per_s=100 / 3))
    (p,) = cost.points(cost.usage("tiny", 3.6, [s], one_step(0, 3600)))
    assert p.replicas_up == pytest.approx(1.0) and p.usd_per_hour == pytest.approx(3.6)
    assert p.prompt_tokens == pytest.approx(360_000) and p.completion_tokens == pytest.approx(120_000)
    assert p.usd_per_1m_prompt_tokens == pytest.approx(10.0)
    assert p.usd_per_1m_completion_tokens == pytest.approx(30.0)
    assert p.usd_per_1m_tokens == pytest.approx(7.5)


def test_tokens_are_counter_deltas_through_an_engine_restart() -> None:
    # The scraper stores counters reset-adjusted: an engine restart (raw 140 -> 3) is stored as 143.
    s = cost.Samples.from_rows([(0, True, 100, 10), (10, True, 140, 20), (20, True, 143, 21)])
    u = cost.usage("tiny", 1.0, [s], one_step(0, 30))
    assert cost.totals(u).prompt_tokens == pytest.approx(43) and cost.totals(u).completion_tokens == pytest.approx(11)


def test_a_dropping_stored_counter_is_left_out_not_counted_negative() -> None:
    # The plane restarted and lost its offset: the stored series falls from 140 to 5, then grows again.
    # The step that holds the drop is unknown, not short of the interval's tokens with its full cost.
    s = cost.Samples.from_rows([(0, True, 100, 0), (10, True, 140, 40), (20, True, 5, 45), (30, True, 25, 65)])
    u = cost.usage("tiny", 3600.0, [s], np.array([0.0, 10.0, 20.0, 30.0]))
    assert [p.prompt_tokens for p in cost.points(u)] == [pytest.approx(40), None, pytest.approx(20)]
    t = cost.totals(u)
    assert t.prompt_tokens == pytest.approx(60)
    # $30 for the two known steps against their 60 + 60 tokens: $250k per 1M, not $30 against fewer tokens.
    assert t.usd_per_1m_tokens == pytest.approx(20.0 / 120 * 1e6)
    # Over one step the window's tokens and $/1M are unknown: part of what it paid for was not counted.
    one = cost.totals(cost.usage("tiny", 3600.0, [s], one_step(0, 30)))
    assert one.prompt_tokens is None and one.usd_per_1m_tokens is None and one.usd == pytest.approx(30.0)


def test_a_silence_longer_than_the_gap_is_unknown_time_not_free_time() -> None:
    # Scraped for 10 minutes, then nothing stored for 30 (plane or store down) while the replica kept
    # serving, then scraped again: the silence is neither up time nor free, and its tokens are not counted.
    rows = steady(0, 600, prompt_per_s=100) + [(t + 2400.0, ok, None if p is None else p + 240_000.0, c)
                                                 for t, ok, p, c in steady(0, 600, prompt_per_s=100)]
    u = cost.usage("tiny", 10.0, [cost.Samples.from_rows(rows)], np.arange(0.0, 3001.0, 600.0))
    pts = cost.points(u)
    assert [p.usd_per_hour for p in pts] == [pytest.approx(10.0), None, None, None, pytest.approx(10.0)]
    assert [p.prompt_tokens for p in pts][1:4] == [None, None, None]
    assert [p.replicas_unknown for p in pts][1:4] == [pytest.approx(1.0)] * 3
    t = cost.totals(u)
    assert t.usd is None and t.unknown_replica_hours == pytest.approx(0.5)
    # The $/1M of the known steps only: $10/h against 100 tokens/s, not the silence's tokens at no cost.
    assert t.usd_per_1m_tokens == pytest.approx(10.0 / 360_000 * 1e6)


def test_failed_scrapes_are_skipped_for_tokens_and_make_the_cost_unknown_not_smaller() -> None:
    s = cost.Samples.from_rows([(0, True, 0, 0), (10, False, None, None), (20, True, 50, 5), (30, True, 60, 6)])
    u = cost.usage("tiny", 3600.0, [s], one_step(0, 30))
    t = cost.totals(u)
    assert t.prompt_tokens == pytest.approx(60)  # the counter kept counting through the failed scrape
    assert t.replica_hours * 3600 == pytest.approx(10)  # only 20..30 had both ends scraped OK
    # 0..20 the replica did not answer: still billed, so the window's cost is unknown, not $10.
    assert t.unknown_replica_hours * 3600 == pytest.approx(20)
    assert t.usd is None and t.usd_per_1m_tokens is None


def test_a_step_whose_every_scrape_failed_has_an_unknown_cost_not_zero() -> None:
    s = cost.Samples.from_rows([(0, True, 0, 0), (10, True, 10, 1), (20, False, None, None), (30, False, None, None),
                                (40, False, None, None), (50, True, 40, 4), (60, True, 50, 5)])
    points = cost.points(cost.usage("tiny", 3600.0, [s], np.array([0.0, 10.0, 45.0, 60.0])))
    assert points[0].usd_per_hour == pytest.approx(3600.0) and points[0].replicas_unknown == 0
    assert points[1].replicas_up == 0 and points[1].replicas_unknown == pytest.approx(1.0)
    assert points[1].usd_per_hour is None and points[1].usd_per_1m_tokens is None
    assert points[2].usd_per_hour is None  # 45..50 still between a failed and a good scrape
    live = cost.points(cost.usage("tiny", 3600.0, [s], np.array([50.0, 60.0])))
    assert live[0].usd_per_hour == pytest.approx(3600.0) and live[0].replicas_unknown == 0


def test_a_silence_longer_than_the_gap_limit_is_not_up_time() -> None:
    s = cost.Samples.from_rows([(0, True, 0, 0), (100, True, 10, 1), (110, True, 20, 2)])
    assert cost.up_seconds(s, one_step(0, 200), max_gap_s=60) == pytest.approx([10])
    assert cost.up_seconds(s, one_step(0, 200), max_gap_s=100) == pytest.approx([110])


def test_an_interval_straddling_a_step_edge_is_split_between_the_steps() -> None:
    s = cost.Samples.from_rows([(0, True, 0, None), (60, True, 600, None), (120, True, 1200, None)])
    edges = np.array([0.0, 30.0, 120.0])
    assert cost.up_seconds(s, edges) == pytest.approx([30, 90])
    inc, known = cost.counter_increase(s.ts_unix_s, s.prompt_tokens_total, edges)
    assert inc == pytest.approx([300, 900]) and known.tolist() == [True, True]


def test_steps_are_aligned_to_the_step_and_clipped_to_the_window() -> None:
    assert cost.step_edges(10, 610, 300).tolist() == [10, 300, 600, 610]
    assert cost.step_edges(0, 600, 300).tolist() == [0, 300, 600]
    for since, until, step in [(10, 610, 300), (0, 600, 300), (1, 2, 300), (299, 301, 300), (7, 1000, 13)]:
        assert cost.step_count(since, until, step) == len(cost.step_edges(since, until, step)) - 1
    with pytest.raises(ValueError, match="earlier"):
        cost.step_edges(5, 5, 60)


def test_an_unknown_price_gives_null_costs_but_known_usage() -> None:
    s = cost.Samples.from_rows(steady(0, 600, prompt_per_s=1))
    u = cost.usage("watched", None, [s], one_step(0, 600))
    (p,) = cost.points(u)
    t = cost.totals(u)
    assert p.usd_per_hour is None and p.usd_per_1m_tokens is None and p.usd_per_1m_prompt_tokens is None
    assert t.usd is None and t.usd_per_1m_tokens is None
    assert t.replica_hours == pytest.approx(600 / 3600) and t.prompt_tokens == pytest.approx(600)


def test_a_step_without_tokens_has_a_null_price_per_million_not_zero_or_infinity() -> None:
    idle = cost.Samples.from_rows(steady(0, 600))  # up, counters flat
    (p,) = cost.points(cost.usage("tiny", 2.0, [idle], one_step(0, 600)))
    assert p.prompt_tokens == 0 and p.usd_per_hour == pytest.approx(2.0)
    assert p.usd_per_1m_tokens is None and p.usd_per_1m_prompt_tokens is None


def test_a_step_without_counter_readings_has_unknown_tokens() -> None:
    s = cost.Samples.from_rows([(0, True, 0, 0), (10, True, 5, 5)])
    points = cost.points(cost.usage("tiny", 1.0, [s], np.array([0.0, 10.0, 20.0])))
    assert points[0].prompt_tokens == pytest.approx(5)
    assert points[1].prompt_tokens is None and points[1].replicas_up == 0 and points[1].usd_per_1m_tokens is None


def test_the_json_view_never_holds_nan() -> None:
    s = cost.Samples.from_rows([(0, True, None, None), (10, True, None, None)])
    body = cost.cost_json(cost.usage("tiny", 1.0, [s], np.array([0.0, 10.0, 20.0])))
    assert body["points"][0]["prompt_tokens"] is None and body["totals"]["prompt_tokens"] is None
    assert body["totals"]["replica_hours"] == pytest.approx(10 / 3600)
    assert "nan" not in repr(body).lower()


def _doc(hardware: dict[str, object] | None = None) -> dict[str, object]:
    spec: dict[str, object] = {"model": {"path": "/m", "served_name": "tiny"}}
    if hardware is not None:
        spec["hardware"] = hardware
    return {"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"}, "spec": spec}


@pytest.mark.parametrize(("hardware", "price"), [
    ({"accelerator": "H100-80GB", "count_per_replica": 2, "price_per_hour_usd": 2.5}, 5.0),
    ({"accelerator": "cpu", "count_per_replica": 4, "price_per_hour_usd": 0.05}, 0.2),  # a core is the accelerator
    ({"accelerator": "cpu", "count_per_replica": 4}, None),  # the default price 0 is "not configured"
    (None, None),
])
def test_the_replica_price_comes_from_the_stored_spec(hardware: dict[str, object] | None,
                                                      price: float | None) -> None:
    stored = parse_deployment(_doc(hardware)).spec
    assert cost.price_per_replica_hour(stored) == (pytest.approx(price) if price is not None else None)


@pytest.mark.parametrize("stored", [None, {}, {"spec": None}, {"spec": {"hardware": {"price_per_hour_usd": "x"}}}])
def test_a_malformed_stored_spec_has_an_unknown_price(stored: object) -> None:
    assert cost.price_per_replica_hour(stored) is None  # type: ignore[arg-type]


def _scrape(collector: cost.CostCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_the_collector_exports_known_figures_and_nothing_for_unknown_ones() -> None:
    busy = cost.Samples.from_rows(steady(700, 1000, prompt_per_s=1000, completion_per_s=1000))
    seen: list[list[float]] = []

    def source(edges: cost.FloatArray) -> Sequence[cost.Usage]:
        seen.append(edges.tolist())
        return [cost.usage("tiny", 36.0, [busy], edges), cost.usage("watched", None, [busy], edges),
                cost.usage("idle", 36.0, [], edges)]

    text = _scrape(cost.CostCollector(source, window_s=300, clock=lambda: 1000.0))
    assert seen == [[700.0, 1000.0]]
    # 300 s up at $36/h = $3 for 600k tokens: $5 per 1M; $3 over 300 s is $36/h.
    assert f'{names.PLANE_COST_PER_MTOK}{{deployment="tiny"}} 5.0' in text
    assert f'{names.PLANE_COST_USD_PER_HOUR}{{deployment="tiny"}} 36.0' in text
    assert 'deployment="watched"' not in text  # no price: unknown, not 0
    assert f'{names.PLANE_COST_PER_MTOK}{{deployment="idle"}}' not in text  # no tokens: unknown
    assert f'{names.PLANE_COST_USD_PER_HOUR}{{deployment="idle"}} 0.0' in text  # priced, nothing up: $0/h


def test_a_failing_source_yields_no_cost_series() -> None:
    def broken(_edges: cost.FloatArray) -> Sequence[cost.Usage]:
        raise RuntimeError("store down")

    assert "controlplane_cost" not in _scrape(cost.CostCollector(broken, window_s=300, clock=lambda: 1000.0))


def test_a_billed_replica_with_unknown_tokens_makes_the_step_unknown_not_cheaper_per_token() -> None:
    # Two replicas up for the hour at $1/h each; only the first one's counters could be read. Counting
    # the second one's cost against the first one's tokens would double the $/1M.
    known = cost.Samples.from_rows(steady(0, 3600, prompt_per_s=100, completion_per_s=100))
    blind = cost.Samples.from_rows([(t, True, None, None) for t, *_ in steady(0, 3600)])
    u = cost.usage("tiny", 1.0, [known, blind], np.array([0.0, 1800.0, 3600.0]))
    for p in cost.points(u):
        assert p.usd_per_hour == pytest.approx(2.0)
        assert p.prompt_tokens is None and p.usd_per_1m_tokens is None and p.usd_per_1m_prompt_tokens is None
    t = cost.totals(u)
    assert t.usd == pytest.approx(2.0) and t.usd_per_1m_tokens is None


def test_the_window_price_per_token_leaves_out_the_cost_of_steps_whose_tokens_are_unknown() -> None:
    # One replica at $3.60/h for two half-hours; its counters are unreadable in the second one.
    rows = steady(0, 1800, prompt_per_s=50, completion_per_s=50)
    rows += [(t, True, None, None) for t, *_ in steady(1810, 3600)]
    u = cost.usage("tiny", 3.6, [cost.Samples.from_rows(rows)], np.array([0.0, 1800.0, 3600.0]))
    first, second = cost.points(u)
    assert first.usd_per_1m_tokens == pytest.approx(1.8 / 180_000 * 1e6)
    assert second.prompt_tokens is None and second.usd_per_1m_tokens is None
    t = cost.totals(u)
    assert t.usd == pytest.approx(3.6, rel=0.01)  # the whole hour is billed
    assert t.usd_per_1m_tokens == pytest.approx(first.usd_per_1m_tokens)  # but only the counted half is priced


def test_a_replicas_cost_for_tenants_is_unknown_in_a_step_with_failed_scrapes() -> None:
    up, unknown = np.array([10.0, 0.0, 5.0]), np.array([0.0, 10.0, 5.0])
    assert cost.replica_usd(up, 3600.0, unknown)[0] == pytest.approx(10.0)
    assert np.isnan(cost.replica_usd(up, 3600.0, unknown)[1:]).all()
    assert cost.replica_usd(up, 3600.0).tolist() == [10.0, 0.0, 5.0]


def test_replicas_stopped_before_the_window_cost_no_queries_per_replica(sqlite_store: Store) -> None:
    # Names are never reused, so stopped replicas accumulate; each used to cost 4 edge queries per cost read
    # (and per /metrics scrape). One replica runs across the window and must still be costed whole.
    store = sqlite_store
    for i in range(50):
        rid = store.register_replica(f"old-{i}", url="http://127.0.0.1:9", backend="external")
        store.write_engine_sample({"replica_id": rid, "ts_unix_s": 100.0, "scrape_ok": True})
        store.set_replica_state(rid, "stopped")  # stamped now, long after t=100: not skipped yet
    live = store.register_replica("live", url="http://127.0.0.1:9", backend="external")
    for t in range(3000, 3700, 10):
        store.write_engine_sample({"replica_id": live, "ts_unix_s": float(t), "scrape_ok": True})
    with store.engine.begin() as conn:  # they were stopped at t=200, before the window
        conn.execute(update(Replica).where(Replica.name.like("old-%")).values(updated_unix_s=200.0))
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    (watched,) = cost_usage(store.engine, np.array([3100.0, 3600.0]), watched_price=3.6)
    assert len(statements) < 20
    assert cost.totals(watched).usd == pytest.approx(0.5)  # the live replica's 500 s at $3.60/h


def test_the_collectors_window_ends_before_the_last_scrape_so_the_hour_rate_is_whole() -> None:
    # Scraped every 5 s, the last time 4 s ago: a window ending now leaves those 4 s out of the up time.
    replica = cost.Samples.from_rows(steady(0, 995, every_s=5.0))

    def source(edges: cost.FloatArray) -> Sequence[cost.Usage]:
        return [cost.usage("tiny", 3.6, [replica], edges)]

    rate = f'{names.PLANE_COST_USD_PER_HOUR}{{deployment="tiny"}}'
    assert f"{rate} 3.6\n" in _scrape(cost.CostCollector(source, window_s=300, lag_s=10, clock=lambda: 999.0))
    assert f"{rate} 3.6\n" not in _scrape(cost.CostCollector(source, window_s=300, clock=lambda: 999.0))


def test_a_launched_replica_is_billed_from_its_launch_serving_nothing_until_its_first_sample() -> None:
    # Launched at 0, loading its model until its first scrape at 100, then serving 100 prompt tokens/s.
    # The start-up is billed (the hardware is held) and, serving nothing, makes the first step's tokens a
    # known 0, not unknown; the second step's $/1M carries its 100 s of start-up.
    s = cost.Samples.from_rows(steady(100, 3600, prompt_per_s=100), launched_unix_s=0.0)
    u = cost.usage("tiny", 3.6, [s], np.array([0.0, 50.0, 3600.0]))
    first, second = cost.points(u)
    assert first.replicas_up == pytest.approx(1.0) and first.usd_per_hour == pytest.approx(3.6)
    assert first.prompt_tokens == 0.0 and first.usd_per_1m_tokens is None
    assert second.prompt_tokens == pytest.approx(350_000)
    assert second.usd_per_1m_prompt_tokens == pytest.approx(3.55 / 350_000 * 1e6)
    t = cost.totals(u)
    assert t.replica_hours == pytest.approx(1.0) and t.usd == pytest.approx(3.6)
    assert t.usd_per_1m_tokens == pytest.approx(3.6 / 350_000 * 1e6)


def test_a_replica_that_never_came_up_is_billed_until_it_stopped_or_to_the_window_end() -> None:
    starting = cost.Samples.from_rows([], launched_unix_s=600.0)
    failed = cost.Samples.from_rows([], launched_unix_s=600.0, ended_unix_s=1500.0)
    edges = one_step(0, 3600)
    assert cost.up_seconds(starting, edges).tolist() == [3000.0]
    assert cost.up_seconds(failed, edges).tolist() == [900.0]
    watched = cost.Samples.from_rows(steady(100, 3600))  # a watched replica: up from its first scrape only
    assert cost.up_seconds(watched, edges).tolist() == [3500.0]
    u = cost.usage("tiny", 3.6, [failed], edges)
    assert cost.totals(u).usd == pytest.approx(0.9) and cost.totals(u).prompt_tokens == 0.0


def test_cost_reads_bill_a_supervised_replicas_start_up_from_the_store(sqlite_store: Store) -> None:
    # A replica the plane launched at 1000 whose first scrape came at 1090 (its model load); a watched
    # one first scraped at 1090 as well. Only the first one's 90 s of start-up are billed.
    store = sqlite_store
    launched = store.save_replica("launched", deployment_id=None, url="http://127.0.0.1:9", backend="local",
                                  state="ready", runtime={"pid": 1}, config=None)
    watched = store.register_replica("watched", url="http://127.0.0.1:8", backend="external")
    for rid in (launched, watched):
        for t in range(1090, 1400, 10):
            store.write_engine_sample({"replica_id": rid, "ts_unix_s": float(t), "scrape_ok": True,
                                       "prompt_tokens_total": float(t - 1090), "generation_tokens_total": 0.0})
    with store.engine.begin() as conn:
        conn.execute(update(Replica).values(created_unix_s=1000.0))
    (u,) = cost_usage(store.engine, np.array([900.0, 1390.0]), watched_price=3.6)
    assert cost.totals(u).replica_hours == pytest.approx((390 + 300) / 3600)
    assert cost.totals(u).prompt_tokens == pytest.approx(600)


def test_a_replica_given_up_on_before_it_ever_served_is_billed_until_then_not_forever(sqlite_store: Store) -> None:
    # Launched at 1000, crash-looping until the supervisor gave up at 1300 (its process stopped): 300 s billed.
    store = sqlite_store
    rid = store.save_replica("looping", deployment_id=None, url="http://127.0.0.1:9", backend="local",
                             state="crashloop", runtime={"pid": 1}, config=None)
    with store.engine.begin() as conn:
        conn.execute(update(Replica).values(created_unix_s=1000.0, updated_unix_s=1300.0))
    (u,) = cost_usage(store.engine, np.array([0.0, 90_000.0]), watched_price=3.6)
    assert cost.totals(u).replica_hours == pytest.approx(300 / 3600)
    (later,) = cost_usage(store.engine, np.array([80_000.0, 90_000.0]), watched_price=3.6)
    assert cost.totals(later).replica_hours == 0.0 and rid
