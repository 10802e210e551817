"""Evaluation from the store: exact counts and in-bound quantiles with the rollup ahead, behind or absent."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import insert

from controlplane.slo import query, rollup
from controlplane.slo import sketch as sk
from controlplane.slo.evaluate import Counts, NoData
from controlplane.slo.model import LatencyTarget
from controlplane.slo.rows import SLI_COLUMNS, target_key
from controlplane.store.models import EngineSample
from controlplane.store.repo import Store
from tests.unit.slo.factories import NOW, Rows, brute_counts, insert_rows, make_slo, random_rows, seed_fleet

TTFT = (("ttft", 0.2),)
GOODPUT = (("ttft", 0.2), ("tpot", 0.02))


def _key(targets: tuple[tuple[str, float], ...]) -> str:
    return target_key(LatencyTarget(s, t) for s, t in targets)  # type: ignore[arg-type]


def _as_tuple(c: Counts) -> tuple[float, float, float]:
    return c.good, c.total, c.unknown


def _load(store: Store, n: int = 4000, seed: int = 0) -> Rows:
    """Rows over 3 days; the rollup covers the first 70% of ids, the rest arrives after it ran."""
    seed_fleet(store.engine)
    rows = random_rows(n, seed=seed)
    cut = int(n * 0.7)
    insert_rows(store.engine, rows.take(np.s_[:cut]))
    rollup.run(store.engine, {_key(TTFT), _key(GOODPUT)}, NOW, batch_rows=1000)
    insert_rows(store.engine, rows.take(np.s_[cut:]))
    return rows


@pytest.mark.parametrize("targets", [TTFT, GOODPUT], ids=["ttft", "goodput"])
def test_window_and_burn_window_counts_are_exact_with_part_of_the_rows_not_yet_rolled_up(
    store: Store, targets: tuple[tuple[str, float], ...]
) -> None:
    rows = _load(store)
    slo = make_slo("ttft" if len(targets) == 1 else "goodput", targets, window_s=2 * 86400.0 + 37.25)
    status = query.evaluate(store.engine, slo, NOW)
    assert _as_tuple(status.counts) == brute_counts(rows, targets, status.window_start_unix_s, NOW)
    assert status.counts.method == "exact"
    for tier in status.burn:
        for burn in (tier.long, tier.short):
            assert _as_tuple(burn.counts) == brute_counts(rows, targets, NOW - burn.window_s, NOW), burn.label
    good, total, _ = brute_counts(rows, targets, status.window_start_unix_s, NOW)
    assert status.attainment == pytest.approx(good / total)
    assert status.budget_remaining == pytest.approx(1 - (total - good) / (total * 0.1))


def test_quantiles_are_within_one_percent_of_exact_and_say_how_many_requests_they_cover(store: Store) -> None:
    rows = _load(store, n=6000, seed=1)
    slo = make_slo("goodput", GOODPUT)
    status = query.evaluate(store.engine, slo, NOW)
    inside = (rows.finish >= NOW - 2 * 86400.0) & np.isin(rows.replica, [1, 2])
    for q in status.quantiles:
        values = rows.cols[SLI_COLUMNS[q.sli]][inside]
        values = values[~np.isnan(values)]
        assert q.count == values.size
        for level, got in q.values:
            exact = float(np.quantile(values, level, method="inverted_cdf"))
            assert isinstance(got, float)
            assert abs(got - exact) <= 0.01 * exact, (q.sli, level)
    assert [q.sli for q in status.quantiles] == ["ttft", "tpot"]


def test_evaluation_is_exact_even_when_the_rollup_never_ran(store: Store) -> None:
    seed_fleet(store.engine)
    rows = random_rows(800, seed=2)
    insert_rows(store.engine, rows)
    status = query.evaluate(store.engine, make_slo("goodput", GOODPUT), NOW)
    assert _as_tuple(status.counts) == brute_counts(rows, GOODPUT, NOW - 2 * 86400.0, NOW)


def test_a_deployment_without_traffic_reports_no_data_not_zero_or_nan(store: Store) -> None:
    _load(store, n=300)
    for deployment in ("nobody-home", "d"):
        slo = make_slo(deployment=deployment)
        status = query.evaluate(store.engine, slo, NOW + 10 * 86400.0)  # 'd' has no requests in this window
        assert (status.counts.total, status.counts.unknown) == (0, 0)
        assert isinstance(status.attainment, NoData) and isinstance(status.budget_remaining, NoData)
        assert all(isinstance(r, NoData) for r in status.burn_rates().values())
        assert all(isinstance(v, NoData) for q in status.quantiles for _, v in q.values)


def test_an_ad_hoc_threshold_comes_from_the_sketch_with_bounds_that_hold_the_exact_count(store: Store) -> None:
    rows = _load(store, n=5000, seed=3)
    start = NOW - 2.5 * 86400.0
    for threshold in (0.05, 0.137, 0.3, 1.0):
        c = query.threshold_counts(store.engine, "d", "ttft", threshold, start, NOW)
        # A sketch of TTFTs cannot tell a request that ended without a first token past the threshold: unknown.
        good, total, unknown = brute_counts(rows, (("ttft", threshold),), start, NOW, censored_ttft=False)
        assert (c.total, c.unknown, c.method) == (total, unknown, "sketch")
        assert c.good_bounds is not None and c.good_bounds[0] <= good <= c.good_bounds[1]
        assert c.good_bounds[1] - c.good_bounds[0] <= 0.02 * total
    exact = query.threshold_counts(store.engine, "d", "ttft", 0.2, start, NOW)
    assert (exact.method, _as_tuple(exact)) == ("exact", brute_counts(rows, TTFT, start, NOW))


def test_attainment_over_time_adds_up_to_the_window_and_marks_empty_buckets_as_no_data(store: Store) -> None:
    rows = _load(store, n=3000, seed=4)
    slo = make_slo()
    start, end = NOW - 86400.0 - 1234.5, NOW + 7200.0  # ragged start, two hours with no traffic at the end
    series = query.attainment_series(store.engine, slo, start, end, 3600)
    assert series[0].start_unix_s == start and series[-1].end_unix_s == end
    assert all(b.start_unix_s == a.end_unix_s for a, b in zip(series, series[1:], strict=False))
    assert (sum(p.good for p in series), sum(p.total for p in series), sum(p.unknown for p in series)) == \
        brute_counts(rows, TTFT, start, end)
    assert series[-1].attainment is None and series[-1].total == 0
    for p in series[:-2]:
        good, total, unknown = brute_counts(rows, TTFT, p.start_unix_s, p.end_unix_s)
        assert (p.good, p.total, p.unknown) == (good, total, unknown)
        assert p.attainment == pytest.approx(good / total)


def test_a_resolution_that_is_not_whole_minutes_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="whole number of minutes"):
        query.attainment_series(store.engine, make_slo(), NOW - 3600, NOW, 90)


def test_a_calendar_month_window_counts_from_the_first_of_the_month_utc(store: Store) -> None:
    rows = _load(store, n=2000, seed=5)
    status = query.evaluate(store.engine, make_slo(kind="calendar_month", window_s=30 * 86400.0), NOW)
    month = datetime(2024, 6, 1, tzinfo=UTC).timestamp()
    assert status.window_start_unix_s == month
    assert _as_tuple(status.counts) == brute_counts(rows, TTFT, month, NOW)


def test_timeslices_budgeting_counts_good_minutes(store: Store) -> None:
    rows = _load(store, n=3000, seed=6)
    slo = make_slo(budgeting="timeslices", window_s=6 * 3600.0, objective=0.6)
    status = query.evaluate(store.engine, slo, NOW)
    good = total = 0
    minute = np.floor(NOW / 60) * 60
    for b in np.arange(minute - 6 * 3600 - 60, minute + 60, 60):
        lo, hi = max(b, NOW - 6 * 3600.0), min(b + 60, NOW)
        if lo >= hi:
            continue
        g, t, _ = brute_counts(rows, TTFT, lo, hi)
        if t:
            total += 1
            good += g / t >= 0.6
    assert (status.counts.good, status.counts.total) == (good, total) and total > 100
    assert status.budgeting == "timeslices"


def test_an_evaluation_overlapping_a_rollup_commit_is_read_again(store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _load(store, n=200)
    answers = iter([False, True])
    monkeypatch.setattr(query.Reader, "unchanged", lambda self: next(answers))
    query.evaluate(store.engine, make_slo(), NOW)  # the first read is discarded, the second kept
    monkeypatch.setattr(query.Reader, "unchanged", lambda self: False)
    with pytest.raises(query.RollupBusy, match="3 evaluation attempts"):
        query.evaluate(store.engine, make_slo(), NOW, attempts=3)


def _samples(store: Store, replica: int, points: list[tuple[float, float | None, float | None]]) -> None:
    with store.engine.begin() as c:
        c.execute(insert(EngineSample), [
            {"replica_id": replica, "ts_unix_s": ts, "scrape_ok": s is not None, "request_success_total": s,
             "request_errors_total": e} for ts, s, e in points])


def test_error_rate_comes_from_counter_deltas_and_skips_unknown_samples(store: Store) -> None:
    seed_fleet(store.engine)
    t0 = NOW - 7200.0
    # replica 1: 100 successes + 2 errors before the window, then +900 / +8 inside it, across a failed scrape
    _samples(store, 1, [(t0 - 600, 0.0, 0.0), (t0 - 10, 100.0, 2.0), (t0 + 5, 100.0, 2.0), (t0 + 1000, None, None),
                        (t0 + 3000, 700.0, 6.0), (NOW - 1, 1000.0, 10.0)])
    # replica 2 first seen inside the window: its first sample is the baseline
    _samples(store, 2, [(t0 + 100, 50.0, 50.0), (t0 + 200, 60.0, 50.0)])
    # replica 3 is another deployment's
    _samples(store, 3, [(t0 - 10, 0.0, 0.0), (NOW - 1, 0.0, 1000.0)])
    slo = make_slo("error_rate", (), window_s=7200.0, objective=0.99)
    status = query.evaluate(store.engine, slo, NOW)
    assert _as_tuple(status.counts) == (910.0, 918.0, 0.0)
    assert status.counts.method == "counters"
    assert status.quantiles == ()
    assert status.budget_remaining == pytest.approx(1 - 8 / (918 * 0.01))


def test_errors_of_a_gap_in_the_scrapes_are_spread_over_it_not_paged_on_when_scraping_recovers(
        store: Store) -> None:
    seed_fleet(store.engine)
    # 1 req/s, scraped every 5 s; the scrapes fail for 3,000 s, during the first 600 s of which every request
    # failed; then all succeed. The first good scrape after the gap must not put 600 errors in its 5 minutes.
    t0 = NOW - 3000.0
    points: list[tuple[float, float | None, float | None]] = [
        (t0 - 3600 + 5 * k, 5.0 * k, 0.0) for k in range(720)]  # an hour of successes up to t0
    points += [(t0 + 5 * k, None, None) for k in range(600)]  # the gap
    points += [(NOW, 3600.0 + 2400.0, 600.0)]  # 2,400 successes and 600 errors over the gap
    _samples(store, 1, points)
    slo = make_slo("error_rate", (), window_s=86400.0, objective=0.999)
    five = query.evaluate(store.engine, slo, NOW + 1).burn
    short = {b.short.window_s: b.short.counts for b in five}[300.0]
    # Its ~300 s of the 3,005 s step (the evaluation's clock is whole seconds): 60 errors, not 600.
    assert short.total == pytest.approx(3000 * 300 / 3005, rel=0.005)
    assert short.total - short.good == pytest.approx(600 * 300 / 3005, rel=0.005)
    # A gap inside a window is counted whole.
    day = query.evaluate(store.engine, slo, NOW + 1).counts
    assert (day.good, day.total) == (6000.0, 6600.0)
    series = query.attainment_series(store.engine, slo, NOW - 300, NOW + 1, 60)
    assert sum(p.total for p in series) == pytest.approx(3000 * 300 / 3005, rel=0.005)


def test_error_rate_leaves_out_a_step_where_a_stored_counter_dropped(store: Store) -> None:
    seed_fleet(store.engine)
    t0 = NOW - 3600.0
    _samples(store, 1, [(t0 - 5, 1000.0, 10.0), (t0 + 10, 1100.0, 11.0), (t0 + 20, 50.0, 0.0), (t0 + 30, 80.0, 1.0)])
    c = query.evaluate(store.engine, make_slo("error_rate", (), window_s=3600.0), NOW).counts
    assert _as_tuple(c) == (130.0, 132.0, 0.0)  # +100/+1, the drop is unknown, then +30/+1
    series = query.attainment_series(store.engine, make_slo("error_rate", (), window_s=3600.0), t0, NOW, 60)
    assert (sum(p.good for p in series), sum(p.total for p in series)) == (130.0, 132.0)


def test_window_decomposition_covers_the_range_exactly_once_with_aligned_buckets() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        start = NOW - rng.uniform(0, 40 * 86400)
        end = start + rng.choice([rng.uniform(0, 120), rng.uniform(0, 40 * 86400)])
        levels = rollup.LEVELS_S[: rng.integers(1, 4)]
        pieces = query.decompose(start, end, levels)
        assert sum(p.hi - p.lo for p in pieces) == pytest.approx(end - start)
        assert all(a.hi == b.lo for a, b in zip(pieces, pieces[1:], strict=False))
        assert not pieces or (pieces[0].lo == start and pieces[-1].hi == end)
        for p in pieces:
            if p.level_s is not None:
                assert p.lo % p.level_s == 0 and p.hi % p.level_s == 0 and p.level_s in levels
            else:  # a partial minute at an edge, or a whole range holding no full minute
                assert p.hi - p.lo < (60 if len(pieces) > 1 else 120)
        assert sum(p.level_s is None for p in pieces) <= 2
        if end - start > 3 * 86400 and len(levels) == 3:
            assert len(pieces) <= 7


def test_sketch_accuracy_is_stated_with_the_quantiles(store: Store) -> None:
    _load(store, n=200)
    (q,) = query.evaluate(store.engine, make_slo(), NOW).quantiles
    assert q.relative_error == sk.RELATIVE_ACCURACY <= 0.01


@pytest.mark.parametrize("rolled_up", [False, True], ids=["raw", "rolled-up"])
def test_a_request_counts_when_it_finishes_so_slow_ones_reach_the_short_burn_window(
    store: Store, rolled_up: bool
) -> None:
    """A request is stored only once it has finished. Counted by arrival, the 5-minute window would
    hold only the fast requests (the slow ones arrived before it opened) and read no burn at all."""
    seed_fleet(store.engine)

    def row(i: int, arrival: float, e2e: float) -> dict[str, object]:
        return {"replica": "r1", "request_id": f"q{i}", "arrival_unix_s": arrival, "e2e_s": e2e,
                "ttft_s": 0.01, "trace_id": f"{i:032x}", "span_id": "1" * 16}

    # Slow: arrived 510 s ago, finished 120 s ago (in whole rollup minutes of the window, not its edges).
    slow = [row(i, NOW - 510.0, 390.0) for i in range(10)]
    fast = [row(100 + i, NOW - 101.0, 1.0) for i in range(10)]
    store.write_spans([*slow, *fast], [])
    slo = make_slo("e2e", (("e2e", 60.0),), objective=0.99)
    if rolled_up:
        rollup.run(store.engine, {_key((("e2e", 60.0),))}, NOW)
    short = {b.window_s: b for tier in query.evaluate(store.engine, slo, NOW).burn for b in (tier.short,)}[300.0]
    assert _as_tuple(short.counts) == (10, 20, 0)
    assert short.rate == pytest.approx(0.5 / 0.01)
