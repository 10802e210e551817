"""Rollup maintenance: incremental with late rows equals recomputation, exact counts, gaps, idempotence."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from controlplane.slo import rollup
from controlplane.slo import sketch as sk
from controlplane.slo.model import LatencyTarget
from controlplane.slo.models import SloRollupCount, SloRollupSketch, SloTarget
from controlplane.slo.rows import target_key
from controlplane.store.repo import Store
from tests.unit.slo.factories import NOW, brute_counts, insert_rows, random_rows, seed_fleet

TTFT = (("ttft", 0.2),)
GOODPUT = (("ttft", 0.2), ("tpot", 0.02))


def _key(targets: tuple[tuple[str, float], ...]) -> str:
    return target_key(LatencyTarget(s, t) for s, t in targets)  # type: ignore[arg-type]


def _snapshot(engine: Engine) -> tuple[list[Any], list[Any]]:
    """Rollup contents in a comparable form (target keys instead of ids, sketches decoded)."""
    with engine.connect() as c:
        keys = dict(c.execute(select(SloTarget.id, SloTarget.key)).all())
        counts = sorted((keys[r.target_id], r.level_s, r.bucket_start_unix_s, r.replica_id, r.good, r.total, r.unknown)
                        for r in c.execute(select(SloRollupCount.__table__)))
        sketches = []
        for r in c.execute(select(SloRollupSketch.__table__)):
            k, n = sk.decode(bytes(r.sketch))
            order = np.argsort(k)
            sketches.append((r.sli_column, r.level_s, r.bucket_start_unix_s, r.replica_id, r.n_values, r.n_nulls,
                             tuple(k[order].tolist()), tuple(n[order].tolist())))
    return counts, sorted(sketches)


def test_incremental_rollups_of_late_out_of_order_rows_equal_a_full_recomputation(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    rows = random_rows(4000, seed=1)
    order = np.random.default_rng(2).permutation(len(rows))  # ids follow insertion, arrival is shuffled
    waves = np.array_split(order, 4)
    first_id = 1
    for i, wave in enumerate(waves):
        part = rows.take(wave)
        part.ids = np.arange(first_id, first_id + len(part))
        first_id += len(part)
        insert_rows(engine, part)
        keys = {_key(TTFT)} if i == 0 else {_key(TTFT), _key(GOODPUT)}  # goodput added later: backfilled
        report = rollup.run(engine, keys, NOW + i, batch_rows=333, max_rows=None if i != 1 else 700)
        assert report.open_gaps == 0
    while rollup.run(engine, {_key(TTFT), _key(GOODPUT)}, NOW + 10, batch_rows=333).rows:
        pass
    incremental = _snapshot(engine)
    rollup.rebuild(engine, NOW + 20)
    rollup.run(engine, {_key(TTFT), _key(GOODPUT)}, NOW + 21, batch_rows=10_000)
    assert incremental == _snapshot(engine)
    assert len(incremental[0]) > 0 and len(incremental[1]) > 0


def test_rolled_up_good_counts_equal_a_brute_force_count_in_every_bucket(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    rows = random_rows(3000, seed=3, span_s=2 * 3600.0)
    insert_rows(engine, rows)
    rollup.run(engine, {_key(TTFT), _key(GOODPUT)}, NOW, batch_rows=1000)
    with engine.connect() as c:
        keys = dict(c.execute(select(SloTarget.id, SloTarget.key)).all())
        stored = list(c.execute(select(SloRollupCount.__table__)))
    by_level: dict[tuple[str, int], list[int]] = {}
    for r in stored:
        targets = TTFT if keys[r.target_id] == _key(TTFT) else GOODPUT
        expect = brute_counts(rows, targets, r.bucket_start_unix_s, r.bucket_start_unix_s + r.level_s, (r.replica_id,))
        assert (r.good, r.total, r.unknown) == expect
        tally = by_level.setdefault((keys[r.target_id], r.level_s), [0, 0, 0])
        for j, v in enumerate(expect):
            tally[j] += v
    for targets in (TTFT, GOODPUT):
        everything = brute_counts(rows, targets, 0, 2 * NOW, (1, 2, 3))
        for level in rollup.LEVELS_S:
            assert tuple(by_level[(_key(targets), level)]) == everything


def test_rows_committed_below_the_watermark_are_picked_up_from_their_gap(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    rows = random_rows(300, seed=4, span_s=3600.0)
    early, late = rows.take(np.r_[0:100, 150:300]), rows.take(np.r_[100:150])
    insert_rows(engine, early)
    report = rollup.run(engine, {_key(TTFT)}, NOW)
    assert (report.watermark_id, report.open_gaps) == (300, 1)
    insert_rows(engine, late)  # a transaction that took ids 101-150 earlier commits now
    report = rollup.run(engine, {_key(TTFT)}, NOW + 5)
    assert (report.rows, report.open_gaps) == (50, 0)
    _, sketches = _snapshot(engine)
    assert sum(s[4] + s[5] for s in sketches if s[0] == "ttft_s" and s[1] == 86400) == 300


def test_open_gaps_are_forgotten_after_the_settle_time(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    insert_rows(engine, random_rows(10, seed=5).take(np.r_[0:3, 6:10]))
    assert rollup.run(engine, {_key(TTFT)}, NOW, settle_s=60).open_gaps == 1
    assert rollup.run(engine, {_key(TTFT)}, NOW + 59, settle_s=60).open_gaps == 1
    assert rollup.run(engine, {_key(TTFT)}, NOW + 60, settle_s=60).open_gaps == 0


def test_running_again_with_nothing_new_changes_nothing(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    insert_rows(engine, random_rows(500, seed=6))
    rollup.run(engine, {_key(TTFT)}, NOW)
    before = _snapshot(engine)
    with engine.connect() as c:
        version = rollup.read_state(c).version
    assert rollup.run(engine, {_key(TTFT)}, NOW + 1).rows == 0
    with engine.connect() as c:
        assert rollup.read_state(c).version == version
    assert _snapshot(engine) == before


def test_requests_of_no_replica_are_passed_by_the_watermark_and_counted_nowhere(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    rows = random_rows(20, seed=7)
    rows.replica[:5] = -1  # NULL replica_id
    insert_rows(engine, rows)
    report = rollup.run(engine, {_key(TTFT)}, NOW)
    assert (report.watermark_id, report.open_gaps) == (20, 0)
    counts, _ = _snapshot(engine)
    assert sum(c[5] + c[6] for c in counts if c[1] == 86400) == 15  # known + unknown


def test_two_runners_at_once_never_count_a_row_twice(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    insert_rows(engine, random_rows(3000, seed=8))
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            rollup.run(engine, {_key(TTFT)}, NOW, batch_rows=200)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    concurrent = _snapshot(engine)
    rollup.rebuild(engine, NOW)
    rollup.run(engine, {_key(TTFT)}, NOW)
    assert concurrent == _snapshot(engine)


def test_a_target_no_longer_asked_for_is_retired_with_its_counts(store: Store) -> None:
    engine = store.engine
    seed_fleet(engine)
    insert_rows(engine, random_rows(100, seed=9))
    rollup.run(engine, {_key(TTFT), _key(GOODPUT)}, NOW)
    rollup.run(engine, {_key(TTFT)}, NOW + 1)
    counts, _ = _snapshot(engine)
    assert {c[0] for c in counts} == {_key(TTFT)}


def test_gap_bookkeeping_finds_subtracts_and_tests_id_ranges() -> None:
    assert rollup.gaps_between(10, np.array([11, 12, 15, 20])) == [(13, 14), (16, 19)]
    assert rollup.gaps_between(10, np.array([13])) == [(11, 12)]
    assert rollup.subtract_ids([[13, 19, 5.0]], np.array([13, 16])) == [[14, 15, 5.0], [17, 19, 5.0]]
    mask = rollup.in_ranges(np.array([1, 13, 14, 15, 16, 19, 20]), [[13, 14, 0.0], [16, 19, 0.0]])
    assert mask.tolist() == [False, True, True, False, True, True, False]
