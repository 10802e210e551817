"""The plane's tuner loop: pure observation/verdict helpers, and the Tuner against fakes on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from controlplane.slo.model import LatencyTarget
from controlplane.store.db import make_engine, upgrade
from controlplane.tuning.autoscaler import (
    HOLD_PROVEN,
    HOLD_UNCALIBRATED,
    SCALE_UP_FORECAST,
    SCALE_UP_SLO_RISK,
    AutoscalerConfig,
    AutoscalerState,
    Decision,
    Observation,
    decide,
)
from controlplane.tuning.capacity import FleetCapacity, Objective
from controlplane.tuning.loop import (
    KEPT,
    ROLL_BACK,
    UNDECIDED,
    Tuner,
    TunerOptions,
    arrival_rate,
    finished_between,
    good_count,
    observe,
    proposal_for,
    slo_counts,
    verdict,
)
from controlplane.tuning.recommendations import Recommendations
from tests.unit.slo.factories import make_slo

TTFT = (LatencyTarget("ttft", 0.5),)
TTFT_SLO = (Objective("ttft", TTFT, 0.99),)


# --- pure helpers -------------------------------------------------------------------------------------------
def test_arrival_rate_is_unknown_without_a_previous_snapshot_and_counts_new_and_recreated_replicas() -> None:
    assert arrival_rate(None, {"a": 10}, 15.0) is None
    assert arrival_rate({"a": 10}, {"a": 40}, 0.0) is None
    assert arrival_rate({"a": 10}, {"a": 40}, 15.0) == pytest.approx(2.0)
    # b joined in the interval (counted from 0); a was recreated (its counter went down: count from 0)
    assert arrival_rate({"a": 100}, {"a": 6, "b": 9}, 3.0) == pytest.approx(5.0)


def test_finished_between_uses_arrival_plus_e2e_and_skips_rows_without_e2e() -> None:
    rows = [{"arrival_unix_s": 90.0, "e2e_s": 12.0}, {"arrival_unix_s": 95.0, "e2e_s": 1.0},
            {"arrival_unix_s": 99.0, "e2e_s": None}, {"arrival_unix_s": 104.0, "e2e_s": 6.0}]
    got = finished_between(rows, 100.0, 110.0)
    assert [r["arrival_unix_s"] for r in got] == [90.0]


def test_good_count_is_three_valued() -> None:
    targets = (LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05))
    rows = [{"ttft_s": 0.1, "tpot_s": 0.01},  # good
            {"ttft_s": 0.9, "tpot_s": None},  # a known miss: bad although tpot is unknown
            {"ttft_s": 0.1, "tpot_s": None},  # unknown
            {"ttft_s": 0.1, "tpot_s": 0.2}]  # bad
    assert good_count(rows, targets) == (1, 3)
    # A one-token answer has no TPOT to miss: it is judged on TTFT alone, good or bad (never only ever bad).
    one = [{"ttft_s": 0.1, "tpot_s": None, "completion_tokens": 1},
           {"ttft_s": 0.9, "tpot_s": None, "completion_tokens": 1},
           {"ttft_s": 0.1, "tpot_s": None, "completion_tokens": 30}]  # a longer answer's missing TPOT: unknown
    assert good_count(one, targets) == (1, 2)
    # No first token, ended after the threshold (aborted in an overload): a TTFT miss, not unknown.
    aborted = [{"ttft_s": None, "e2e_s": 30.0, "tpot_s": None, "completion_tokens": 0},
               {"ttft_s": None, "e2e_s": 0.1, "tpot_s": None, "completion_tokens": 0},
               {"ttft_s": None, "e2e_s": 30.0, "tpot_s": 0.1, "completion_tokens": 200}]  # a reading missing: unknown
    assert good_count(aborted, (LatencyTarget("ttft", 0.5),)) == (0, 1)
    assert good_count(aborted[:2], (LatencyTarget("tpot", 0.05),)) == (0, 0)  # no token is no TPOT met


def test_each_slo_is_judged_against_its_own_objective_not_the_strictest_one() -> None:
    # TTFT <= 0.5 s at 99 % (all 200 met) and e2e <= 10 s at 90 % (186 of 200 met): both SLOs hold. Judging
    # every target at once against 99 % would read 93 % good, a 7x burn, and scale up for ever.
    slos = (Objective("ttft", TTFT, 0.99), Objective("e2e", (LatencyTarget("e2e", 10.0),), 0.90))
    rows = [{"ttft_s": 0.1, "e2e_s": 12.0 if i < 14 else 5.0} for i in range(200)]
    good, known = slo_counts(rows, slos, 0.99)
    assert known == 200 and good / known == pytest.approx(1 - (0.07 / 0.10) * 0.01)  # e2e burns 0.7x its budget
    cap = FleetCapacity((1,), (10.0,))
    cfg = AutoscalerConfig(capacity=cap, slo_objective=0.99, min_replicas=1, max_replicas=10)
    samples = {r: {"scrape_ok": True, "ts_unix_s": 100.0, "num_running": 4, "num_waiting": 0,
                   "kv_usage_ratio": 0.3} for r in ("r0", "r1")}
    obs = observe("d", desired=2, ready=["r0", "r1"], rate_rps=5.0, latest_samples=samples, finished=rows,
                  objectives=slos, objective=0.99, now=100.0, stale_s=20.0)
    state = AutoscalerState()
    for t in (100.0, 115.0, 130.0):
        decision, state = decide(obs, cfg, state, t)
        assert decision.desired_replicas <= 2 and decision.inputs["risk"] is None
    # e2e met by only 160 of 200 (80 % against 90 %: a 2x burn) is trouble, reported on the 99 % scale.
    rows = [{"ttft_s": 0.1, "e2e_s": 12.0 if i < 40 else 5.0} for i in range(200)]
    good, known = slo_counts(rows, slos, 0.99)
    assert (1 - good / known) / 0.01 == pytest.approx(2.0)
    # One SLO, or the strictest one the worst: the plain counts; nothing known: (0, 0).
    assert slo_counts(rows, slos[:1], 0.99) == (200.0, 200)
    assert slo_counts([{"ttft_s": None, "e2e_s": None}], slos, 0.99) == (0.0, 0)


def test_observe_marks_failed_and_stale_samples_unknown() -> None:
    now = 1000.0
    samples: dict[str, Mapping[str, Any] | None] = {
        "ok": {"ts_unix_s": 995.0, "scrape_ok": True, "num_running": 3.0, "num_waiting": 1.0, "kv_usage_ratio": 0.4},
        "failed": {"ts_unix_s": 999.0, "scrape_ok": False, "num_running": None, "num_waiting": None,
                   "kv_usage_ratio": None},
        "stale": {"ts_unix_s": 900.0, "scrape_ok": True, "num_running": 1.0, "num_waiting": 0.0,
                  "kv_usage_ratio": 0.1},
        "none": None}
    finished = [{"ttft_s": 0.1, "tpot_s": 0.01, "prompt_tokens": 10, "completion_tokens": 20}] * 3 + \
               [{"ttft_s": 2.0, "tpot_s": 0.01, "prompt_tokens": 30, "completion_tokens": 20}]
    obs = observe("d", desired=4, ready=["ok", "failed", "stale", "none"], rate_rps=2.5, latest_samples=samples,
                  finished=finished, objectives=TTFT_SLO, objective=0.99, now=now,
                  stale_s=20.0)
    known = {r.name: r.known for r in obs.readings}
    assert known == {"ok": True, "failed": False, "stale": False, "none": False}
    assert obs.readings[0].num_running == 3 and obs.readings[0].kv_usage_ratio == 0.4
    assert obs.slo_good_ratio == pytest.approx(0.75) and obs.finished == 4
    assert obs.mean_prompt_tokens == pytest.approx(15.0) and obs.ready_replicas == 4


def test_observe_without_finished_requests_has_unknown_attainment() -> None:
    obs = observe("d", desired=1, ready=["a"], rate_rps=None, latest_samples={}, finished=[],
                  objectives=TTFT_SLO, objective=0.99, now=0.0, stale_s=20.0)
    assert obs.slo_good_ratio is None and obs.ttft_p99_s is None and obs.arrival_rate_rps is None


def test_verdict() -> None:
    assert verdict((99, 100), (10, 20), objective=0.99, min_requests=50) == UNDECIDED
    assert verdict((99, 100), (80, 100), objective=0.99, min_requests=50) == ROLL_BACK
    assert verdict((99, 100), (98, 100), objective=0.99, min_requests=50) == KEPT  # within tolerance
    # worse, but still meeting the objective: kept
    assert verdict((100, 100), (995, 1000), objective=0.9, min_requests=50) == KEPT
    # At 99.9 % the tolerance is one budget (0.1 point), not 2 points: 98.1 % after 99.95 % is a 19x burn.
    assert verdict((9995, 10000), (981, 1000), objective=0.999, min_requests=50) == ROLL_BACK


def test_proposal_carries_prediction_at_both_counts_and_cost() -> None:
    cap = FleetCapacity((1, 2), (2.0, 2.5))
    obs = Observation("d", 1, 1, 3.0, finished=100, slo_good_ratio=0.7)
    p = proposal_for("d", Decision(2, SCALE_UP_SLO_RISK, {"load_rps": 3.0}), current=1, engine={"max_num_seqs": 8},
                     obs=obs, capacity=cap, capacity_note="test", objective=0.99, price_per_replica_hour_usd=2.0)
    pred = p.evidence["predicted"]
    assert pred["current"]["utilization"] == pytest.approx(1.5) and pred["proposed"]["capacity_rps"] == 5.0
    assert p.evidence["cost"]["usd_per_hour_proposed"] == 4.0 and p.proposed == {"replicas": 2}
    assert p.current["engine"] == {"max_num_seqs": 8} and 0 < (p.confidence or 0) <= 1


# --- the Tuner on fakes ---------------------------------------------------------------------------------------
@dataclass
class FakeMember:
    name: str
    state: str = "ready"
    candidate: bool = False


@dataclass
class FakeEngineCfg:
    max_num_seqs: int = 8

    def as_dict(self) -> dict[str, Any]:
        return {"max_num_seqs": self.max_num_seqs}


@dataclass
class FakeDep:
    name: str = "d"
    min_replicas: int = 1
    max_replicas: int = 3
    engine: FakeEngineCfg = field(default_factory=FakeEngineCfg)
    price_per_replica_hour_usd: float = 1.5


@dataclass
class FakeBackend:
    kind: str = "local"


@dataclass
class FakeRuntime:
    dep: FakeDep
    desired: int
    members: dict[str, FakeMember]
    backend: FakeBackend = field(default_factory=FakeBackend)


class FakeFleet:
    def __init__(self, rt: FakeRuntime) -> None:
        self._rt = rt
        self.calls: list[tuple[str, int, str, str]] = []

    @property
    def runtimes(self) -> Mapping[str, Any]:
        return {self._rt.dep.name: self._rt}

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        self.calls.append((deployment, replicas, actor, reason))
        rt = self._rt
        rt.desired = replicas
        while len(rt.members) < replicas:
            n = f"d-{len(rt.members)}"
            rt.members[n] = FakeMember(n, state="starting")
        for name in sorted(rt.members)[replicas:]:
            rt.members[name].state = "stopped"
        return {"deployment": deployment, "replicas": replicas}


class FakeRouter:
    def __init__(self) -> None:
        self.routed: dict[str, int] = {}

    def arrivals(self) -> dict[str, int]:
        return dict(self.routed)


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []

    def requests(self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
                 replica: str | None = None, limit: int = 1000, by: str = "arrival") -> list[dict[str, Any]]:
        def at(r: dict[str, Any]) -> float:
            return float(r["arrival_unix_s"]) + (float(r.get("e2e_s") or 0.0) if by == "finish" else 0.0)
        return [r for r in self.rows if r["replica"] == replica and (since_unix_s or 0) <= at(r)
                and at(r) < (until_unix_s or 1e18)][:limit]

    def engine_samples(self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
                       replica: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        got = [s for s in self.samples if s["replica"] == replica and s["ts_unix_s"] >= (since_unix_s or 0)
               and s["ts_unix_s"] <= (until_unix_s if until_unix_s is not None else 1e18)]
        return sorted(got, key=lambda s: -s["ts_unix_s"])[:limit]

    def record_action(self, replica_id: int | None, kind: str, *, actor: str, reason: str | None,
                      message: str | None = None, before: Mapping[str, Any] | None = None,
                      after: Mapping[str, Any] | None = None, attributes: Mapping[str, Any] | None = None,
                      ts_unix_s: float | None = None) -> None:
        self.actions.append({"kind": kind, "actor": actor, "reason": reason, "before": before, "after": after,
                             "attributes": attributes, "ts": ts_unix_s})

    def add_interval(self, replicas: list[str], t0: float, t1: float, n: int, ttft_s: float,
                     samples: bool = True) -> None:
        for i in range(n):
            arrival = t0 + (t1 - t0) * i / n - 0.5
            self.rows.append({"replica": replicas[i % len(replicas)], "arrival_unix_s": arrival, "e2e_s": 0.4,
                              "ttft_s": ttft_s, "tpot_s": 0.01, "prompt_tokens": 20, "completion_tokens": 10})
        for r in replicas if samples else ():
            self.samples.append({"replica": r, "ts_unix_s": t1 - 1, "scrape_ok": True, "num_running": 2.0,
                                 "num_waiting": 0.0, "kv_usage_ratio": 0.2})


class Clock:
    def __init__(self, t: float = 10_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _tuner(tmp_path: Path, mode: str, desired: int, *, capacity: FleetCapacity | None = None,
           ) -> tuple[Tuner, FakeFleet, FakeRouter, FakeStore, Clock, Recommendations]:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade(engine)
    clock = Clock()
    recs = Recommendations(engine, clock=clock)
    members = {f"d-{i}": FakeMember(f"d-{i}") for i in range(desired)}
    fleet = FakeFleet(FakeRuntime(FakeDep(), desired, members))
    router, store = FakeRouter(), FakeStore()
    slo = make_slo("ttft", (("ttft", 0.5),), objective=0.99, deployment="d")
    calibrate = (lambda rt, ready, now: (capacity, "given")) if capacity is not None else None
    tuner = Tuner(fleet, router, store, recs, [slo],
                  TunerOptions(mode=mode, interval_s=15.0, startup_s=30.0, min_finished=20, verify_s=30.0,
                               ingest_lag_s=0.0),
                  calibrate=calibrate, clock=clock)
    return tuner, fleet, router, store, clock, recs


def _interval(tuner: Tuner, router: FakeRouter, store: FakeStore, clock: Clock, replicas: list[str], n: int,
              ttft_s: float, samples: bool = True) -> Decision:
    t0 = clock.t
    clock.t += 15.0
    store.add_interval(replicas, t0, clock.t, n, ttft_s, samples)
    for i, r in enumerate(replicas):
        router.routed[r] = router.routed.get(r, 0) + n // len(replicas) + (i < n % len(replicas))
    return asyncio.run(tuner.tick())[0]


def _until_scaled_down(tuner: Tuner, fleet: FakeFleet, router: FakeRouter, store: FakeStore, clock: Clock) -> None:
    """Light load on two replicas until the tuner acts: after the downscale delay it proposes one (at most 8 rounds)."""
    for _ in range(8):
        _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
        if fleet.calls:
            return


def test_recommend_mode_proposes_a_replica_on_sustained_slo_burn_and_does_not_apply_it(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    assert _interval(tuner, router, store, clock, ["d-0"], 60, 0.1).reason == HOLD_UNCALIBRATED
    d1 = _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)  # one bad interval: a transient
    assert d1.desired_replicas == 1
    d2 = _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert (d2.desired_replicas, d2.reason) == (2, SCALE_UP_SLO_RISK)
    assert fleet.calls == []  # recommend mode: a person applies
    [rec] = recs.list(deployment="d")
    assert rec["status"] == "open" and rec["proposed"] == {"replicas": 2} and rec["mode"] == "recommend"
    assert rec["evidence"]["observed"]["slo_good_ratio"] == 0.0
    assert rec["evidence"]["observed"]["rate_rps"] == pytest.approx(4.0)
    # the same want again does not pile up recommendations, nor audit rows (nothing changed, nor its reason)
    for _ in range(3):
        _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert len(recs.list(deployment="d")) == 1
    ups = [a for a in store.actions if a["reason"] == SCALE_UP_SLO_RISK]
    assert len(ups) == 1 and ups[0]["actor"] == "tuner" and ups[0]["after"] == {"replicas": 2}
    assert ups[0]["attributes"]["deployment"] == "d"


def test_auto_mode_applies_through_the_supervisor_and_keeps_a_scale_up(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    for ttft in (0.1, 2.0, 2.0):
        _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    assert fleet.calls == [("d", 2, "tuner", fleet.calls[0][3])] and fleet.calls[0][3].startswith("recommendation_")
    [rec] = recs.list(deployment="d")
    assert rec["status"] == "applied" and rec["decided_by"] == "tuner" and rec["mode"] == "auto"
    fleet.runtimes["d"].members["d-1"].state = "ready"
    _interval(tuner, router, store, clock, ["d-0", "d-1"], 60, 0.1)  # in effect from this interval on
    _interval(tuner, router, store, clock, ["d-0", "d-1"], 60, 0.1)
    assert "verdict" not in (recs.get(rec["id"])["outcome"] or {})  # not judged before verify_s (30 s)
    for _ in range(2):
        _interval(tuner, router, store, clock, ["d-0", "d-1"], 60, 0.1)
    rec = recs.get(rec["id"])
    assert rec["status"] == "applied" and rec["outcome"]["verdict"] == KEPT
    assert rec["outcome"]["after"]["known"] >= 20 and fleet.calls[-1][1] == 2  # never scaled back down


def test_never_scales_down_on_unknown_readings(tmp_path: Path) -> None:
    # Capacity says one replica is plenty, but the engine samples are missing: no scale-down, ever.
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 3, capacity=FleetCapacity((1,), (100.0,)))
    for _ in range(20):
        _interval(tuner, router, store, clock, ["d-0", "d-1", "d-2"], 30, 0.1, samples=False)
    assert fleet.calls == [] and fleet.runtimes["d"].desired == 3
    assert any(a["reason"] == "hold_unknown_data" for a in store.actions)


def test_auto_scale_down_that_hurts_the_slo_is_rolled_back(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    _until_scaled_down(tuner, fleet, router, store, clock)
    assert fleet.calls and fleet.calls[0][1] == 1
    [rec] = recs.list(deployment="d")
    assert rec["status"] == "applied" and rec["reason"] == "scale_down_spare_capacity"
    for _ in range(3):  # the one replica left misses the SLO: the change is reversed before it is even judged
        _interval(tuner, router, store, clock, ["d-0"], 30, 2.0)
    assert fleet.calls[-1][1] == 2
    rec = recs.get(rec["id"])
    assert rec["status"] == "rolled_back" and rec["outcome"]["verdict"] == ROLL_BACK
    assert fleet.runtimes["d"].desired == 2


def test_a_scale_down_judged_worse_after_verify_s_is_scaled_back(tmp_path: Path) -> None:
    # Slightly worse (not risk-level trouble, so the autoscaler itself would not act): the verdict does.
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    _until_scaled_down(tuner, fleet, router, store, clock)
    [rec] = recs.list(deployment="d")
    for _ in range(4):  # 2 of 30 late per interval: 93% good, under the 99% objective but not a 4x burn
        store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
    assert fleet.calls[-1][1:] == (2, "tuner", f"rollback_recommendation_{rec['id']}")
    rec = recs.get(rec["id"])
    assert rec["status"] == "rolled_back" and rec["outcome"]["verdict"] == ROLL_BACK
    for _ in range(4):  # the capacity model still says one replica would do: no flapping back to it
        _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
    assert fleet.calls[-1][1] == 2 and len(recs.list(deployment="d")) == 1


def test_a_scale_down_held_after_a_reversal_is_recorded_as_held_not_as_a_scale_down(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    tuner.options = replace(tuner.options, verify_s=120.0)  # the hold after a reversal: 6 minutes
    _until_scaled_down(tuner, fleet, router, store, clock)
    while len(fleet.calls) < 2:  # 93 % good on one replica: scaled back
        store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
    fleet.runtimes["d"].members["d-1"].state = "ready"
    n = len(store.actions)
    for _ in range(20):  # 5 minutes in the hold: the policy wants one replica again all along
        d = _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
    assert len(fleet.calls) == 2
    assert (d.desired_replicas, d.reason) == (2, "hold_after_reversed_scale_down")
    assert d.inputs["proposed_replicas"] == 1 and d.inputs["proposed_reason"] == "scale_down_spare_capacity"
    # The audit log says it was held, once, and never that the count went to 1.
    assert [(x["reason"], x["after"]) for x in store.actions[n:] if x["after"] != {"replicas": 2}] == []
    assert [x["reason"] for x in store.actions[n:]].count("hold_after_reversed_scale_down") == 1


@pytest.mark.parametrize("step_back_s", [0.0, 3600.0])
def test_a_clock_stepped_back_neither_freezes_the_readings_nor_stalls_a_rollback(tmp_path: Path,
                                                                                 step_back_s: float) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    _until_scaled_down(tuner, fleet, router, store, clock)
    _interval(tuner, router, store, clock, ["d-0"], 30, 0.1)  # in effect
    clock.t -= step_back_s
    # The newest sample by time is now one stamped before the step, an hour "ahead": it says nothing of now.
    assert all(r.known for r in tuner.last_obs["d"].readings)
    for _ in range(8):  # 93 % good on the one replica left (2 of 30 late): worse than before the change
        store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        store.samples.append({"replica": "d-0", "ts_unix_s": clock.t + 14.0, "scrape_ok": False,
                              "num_running": None, "num_waiting": None, "kv_usage_ratio": None})
        d = _interval(tuner, router, store, clock, ["d-0"], 28, 0.1, samples=False)
        assert not tuner.last_obs["d"].readings[0].known  # the failed scrape is what is read, not an old one
        if len(fleet.calls) > 1:
            break
    assert [c[1] for c in fleet.calls] == [1, 2] and d.desired_replicas <= 2
    [rec] = recs.list(deployment="d")
    assert rec["status"] == "rolled_back" and rec["outcome"]["verdict"] == ROLL_BACK


def test_a_round_after_an_hour_of_failed_rounds_does_not_finish_a_scale_down_begun_before(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    for _ in range(4):  # light load: a scale-down is wanted, and waits out its delay
        d = _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
    assert d.reason == "hold_downscale_delay" and fleet.calls == []
    clock.t += 3600.0  # every round of that hour failed (the store was down): nothing was observed
    for _ in range(3):
        d = _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
        assert d.reason == "hold_downscale_delay" and fleet.calls == []


def test_an_auto_recommendation_a_person_applies_first_is_theirs(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    add = recs.add

    def add_then_a_person_applies(p: Any, mode: str) -> int:
        rid = add(p, mode)  # type: ignore[arg-type]
        recs.claim(rid, by="user")  # what POST /recommendations/{rid}/apply does, between the tuner's two calls
        return rid

    recs.add = add_then_a_person_applies  # type: ignore[method-assign]
    decisions = [_interval(tuner, router, store, clock, ["d-0"], 60, ttft) for ttft in (0.1, 2.0, 2.0)]
    assert decisions[-1].reason == SCALE_UP_SLO_RISK  # the round did not fail
    [rec] = recs.list(deployment="d")
    assert (rec["status"], rec["decided_by"]) == ("applied", "user") and fleet.calls == []


def test_tuner_metrics_expose_decisions_and_leave_unknown_capacity_out(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    _interval(tuner, router, store, clock, ["d-0"], 30, 0.1)
    _interval(tuner, router, store, clock, ["d-0"], 30, 0.1)
    reg = CollectorRegistry()
    reg.register(tuner)
    text = generate_latest(reg).decode()
    assert 'controlplane_tuner_decisions_total{action="hold",deployment="d",reason="hold_capacity_unknown"} 2.0' \
        in text
    assert 'controlplane_tuner_observed_rps{deployment="d"} 2.0' in text
    assert "controlplane_tuner_capacity_rps{" not in text


def test_an_outage_is_not_read_as_no_demand(tmp_path: Path) -> None:
    # Every replica down (the router turns requests away uncounted): the rate is unknown, nothing scales down.
    assert observe("d", desired=3, ready=[], rate_rps=0.0, latest_samples={}, finished=[], objectives=TTFT_SLO,
                   objective=0.99, now=0.0, stale_s=20.0).arrival_rate_rps is None
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 3, capacity=FleetCapacity((1,), (100.0,)))
    for m in fleet.runtimes["d"].members.values():
        m.state = "crashed"
    for _ in range(20):
        clock.t += 15.0
        asyncio.run(tuner.tick())
    assert fleet.calls == [] and fleet.runtimes["d"].desired == 3


def test_a_rollback_never_overwrites_a_count_changed_meanwhile(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    _until_scaled_down(tuner, fleet, router, store, clock)
    [rec] = recs.list(deployment="d")
    fleet.runtimes["d"].desired = 3  # a person scaled it meanwhile (outside the tuner)
    for _ in range(4):
        store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
    assert [c[1] for c in fleet.calls] == [1] and fleet.runtimes["d"].desired == 3
    assert recs.get(rec["id"])["outcome"]["verdict"] == "superseded"


def test_a_request_stored_after_its_round_is_counted_in_the_next(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    tuner.options = TunerOptions(mode="recommend", interval_s=15.0, min_finished=1, ingest_lag_s=5.0)
    clock.t += 15.0
    asyncio.run(tuner.tick())  # judges what finished up to 5 s ago
    # a request that finished 2 s before that round, stored only now (its span batch arrived late)
    store.rows.append({"replica": "d-0", "arrival_unix_s": clock.t - 3.0, "e2e_s": 1.0, "ttft_s": 0.1,
                       "tpot_s": 0.01, "prompt_tokens": 1, "completion_tokens": 1})
    clock.t += 15.0
    asyncio.run(tuner.tick())
    assert tuner.last_obs["d"].finished == 1


def test_a_pessimistic_model_is_overruled_by_observed_goodput_until_the_engine_is_reconfigured(
        tmp_path: Path) -> None:
    # The calibrated model says a replica sustains 1 req/s; the one replica serves 4 req/s, every request good.
    tuner, fleet, router, store, clock, _ = _tuner(tmp_path, "auto", 1, capacity=FleetCapacity((1,), (1.0,)))
    calls: list[float] = []
    given = tuner.calibrate
    assert given is not None
    tuner.calibrate = lambda rt, ready, now: (calls.append(now), given(rt, ready, now))[1]
    _interval(tuner, router, store, clock, ["d-0"], 60, 0.1)  # the first round has no rate yet
    for _ in range(3):
        d = _interval(tuner, router, store, clock, ["d-0"], 60, 0.1)
        assert (d.reason, d.desired_replicas) == (HOLD_PROVEN, 1)
    assert fleet.calls == [] and len(calls) == 1  # recalibrate_s (120 s) has not passed
    # Reconfigured: the floor proven on the old engine no longer counts, and the model is fitted again at once.
    fleet.runtimes["d"].dep.engine.max_num_seqs = 16
    t0 = clock.t
    clock.t += 15.0
    store.add_interval(["d-0"], t0, clock.t, 10, 0.1)  # too few finished to prove anything by itself
    router.routed["d-0"] += 60
    [d] = asyncio.run(tuner.tick())
    assert d.reason == SCALE_UP_FORECAST and len(calls) == 2
    assert fleet.calls and fleet.calls[-1][1] > 1


def test_a_replica_removed_between_rounds_still_counts_its_last_requests(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, _ = _tuner(tmp_path, "recommend", 2)
    _interval(tuner, router, store, clock, ["d-0", "d-1"], 60, 0.1)
    # d-1 takes 30 requests, then is drained and removed from the deployment before the next round.
    router.routed["d-0"] += 30
    router.routed["d-1"] += 30
    del fleet.runtimes["d"].members["d-1"]
    fleet.runtimes["d"].desired = 1
    clock.t += 15.0
    asyncio.run(tuner.tick())
    assert tuner.last_obs["d"].arrival_rate_rps == pytest.approx(60 / 15.0)



def _timed(fleet: FakeFleet, clock: Clock) -> list[tuple[float, int]]:
    """Record (time, replicas) of every scale the fleet is asked for."""
    times: list[tuple[float, int]] = []
    inner = fleet.scale

    async def scale(deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        times.append((clock.t, replicas))
        for m in fleet.runtimes[deployment].members.values():  # a stopped one is started again when needed
            if m.state == "stopped" and sum(x.state != "stopped" for x in
                                            fleet.runtimes[deployment].members.values()) < replicas:
                m.state = "starting"
        return await inner(deployment, replicas, actor=actor, reason=reason)

    fleet.scale = scale  # type: ignore[method-assign]
    return times


def test_a_scale_down_reversed_again_and_again_is_held_off_longer_each_time(tmp_path: Path) -> None:
    # One replica misses 2 of 30 requests (93 % good against 99 %, under the risk burn); two serve all. The
    # capacity model keeps saying one would do, so each rollback is followed by the same scale-down.
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    tuner.options = replace(tuner.options, verify_s=120.0)
    times = _timed(fleet, clock)
    for _ in range(200):  # 50 minutes of 15 s rounds; replicas come up within a round
        for m in fleet.runtimes["d"].members.values():
            m.state = "ready" if m.state == "starting" else m.state
        ready = sorted(n for n, m in fleet.runtimes["d"].members.items() if m.state == "ready")
        if len(ready) == 1:
            store.add_interval(ready, clock.t, clock.t + 15.0, 2, 2.0, samples=False)
            _interval(tuner, router, store, clock, ready, 28, 0.1)
        else:
            _interval(tuner, router, store, clock, ready, 30, 0.1)
    ups = [t for t, n in times if n == 2]
    downs = [t for t, n in times if n == 1]
    assert len(downs) >= 2 and len(ups) >= len(downs) - 1
    gaps = [d - u for u, d in zip(ups, downs[1:], strict=False)]  # from each rollback to the next scale-down
    assert gaps[0] >= 3 * 120.0 and all(b >= 2 * a - 15.0 for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert len(downs) <= 4, downs  # 6 before, one 6 minutes after each rollback


def test_a_crash_looping_replica_does_not_hold_back_an_slo_risk_scale_up(tmp_path: Path) -> None:
    # The supervisor keeps a crash-looping replica in the desired count and does not replace it: it is not
    # "starting", so the burning SLO gets a new replica.
    for capacity in (None, FleetCapacity((1,), (100.0,))):
        tuner, fleet, router, store, clock, recs = _tuner(tmp_path / str(capacity is None), "auto", 2,
                                                          capacity=capacity) \
            if (tmp_path / str(capacity is None)).mkdir() is None else _never()
        fleet.runtimes["d"].members["d-1"].state = "crashloop"
        for _ in range(4):
            _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
        assert [c[1] for c in fleet.calls] == [3], capacity


def _never() -> Any:
    raise AssertionError


def test_a_deployment_that_cannot_be_judged_does_not_stop_the_others(tmp_path: Path) -> None:
    # min 0 is a valid spec (scaled to nothing by hand); the autoscaler works from one replica up.
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    fleet.runtimes["d"].dep.min_replicas = 0
    for ttft in (0.1, 2.0, 2.0):
        _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    assert [c[1] for c in fleet.calls] == [2]

    class Broken:
        dep, backend = FakeDep(name="x"), FakeBackend()

        @property
        def members(self) -> dict[str, Any]:
            raise RuntimeError("a runtime the tuner cannot read")

    runtimes = {"x": Broken(), **fleet.runtimes}
    type(fleet).runtimes = property(lambda self: runtimes)  # type: ignore[assignment,method-assign]
    try:
        decisions = asyncio.run(tuner.tick())
    finally:
        type(fleet).runtimes = property(lambda self: {self._rt.dep.name: self._rt})  # type: ignore[assignment]
    assert len(decisions) == 1  # "d" was judged; "x" was logged and skipped


def test_nan_engine_gauges_are_unknown_not_numbers() -> None:
    sample = {"scrape_ok": True, "ts_unix_s": 0.0, "num_running": float("nan"), "num_waiting": float("inf"),
              "kv_usage_ratio": float("nan")}
    obs = observe("d", desired=1, ready=["r"], rate_rps=1.0, latest_samples={"r": sample}, finished=[],
                  objectives=TTFT_SLO, objective=0.99, now=1.0, stale_s=20.0)
    (r,) = obs.readings
    assert (r.num_running, r.num_waiting, r.kv_usage_ratio, r.known) == (None, None, None, False)


def test_a_rollback_the_supervisor_refuses_is_retried_and_not_recorded_as_done(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    _until_scaled_down(tuner, fleet, router, store, clock)
    [rec] = recs.list(deployment="d")
    inner = fleet.scale
    refuse = {"on": True}

    async def scale(deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        if refuse["on"] and reason.startswith("rollback_"):
            raise RuntimeError("d: a rolling change is in progress; retry when it ends")
        return await inner(deployment, replicas, actor=actor, reason=reason)

    fleet.scale = scale  # type: ignore[method-assign]
    for _ in range(5):  # 93 % good on one replica: judged worse, scaled back; the supervisor refuses
        store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
    assert recs.get(rec["id"])["status"] == "applied" and fleet.runtimes["d"].desired == 1
    assert any(a["reason"] == "rollback_failed" for a in store.actions)
    refuse["on"] = False
    store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
    _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
    assert recs.get(rec["id"])["status"] == "rolled_back" and fleet.runtimes["d"].desired == 2


def test_a_count_changed_while_the_round_decided_is_not_overwritten(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 2, capacity=FleetCapacity((1,), (100.0,)))
    add = recs.add

    def add_while_a_person_scales(p: Any, mode: Any) -> int:
        fleet.runtimes["d"].desired = 3  # POST /scale lands between the decision and the supervisor call
        fleet.runtimes["d"].members["d-2"] = FakeMember("d-2", state="starting")
        return add(p, mode)

    recs.add = add_while_a_person_scales  # type: ignore[method-assign]
    for _ in range(8):
        _interval(tuner, router, store, clock, ["d-0", "d-1"], 30, 0.1)
        if recs.list(deployment="d"):
            break
    [rec] = recs.list(deployment="d")
    assert fleet.calls == [] and fleet.runtimes["d"].desired == 3
    assert rec["status"] == "failed" and "changed from 2 to 3" in rec["outcome"]["error"]


def test_no_recommendation_is_made_while_a_rolling_change_runs(tmp_path: Path) -> None:
    class Running:
        def done(self) -> bool:
            return False

    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    fleet.runtimes["d"].rollout = Running()  # type: ignore[attr-defined]
    for ttft in (0.1, 2.0, 2.0, 2.0):
        d = _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    assert d.reason == "hold_rolling_change" and d.inputs["proposed_reason"] == "scale_up_slo_risk"
    assert d.desired_replicas == 1 and d.inputs["proposed_replicas"] == 2
    assert fleet.calls == [] and recs.list(deployment="d") == []


def test_a_deployment_scaled_to_zero_by_hand_is_left_there(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    rt = fleet.runtimes["d"]
    rt.dep.min_replicas, rt.desired, rt.members = 0, 0, {}
    for _ in range(3):
        clock.t += 15.0
        (d,) = asyncio.run(tuner.tick())
    assert (d.desired_replicas, d.reason) == (0, "hold_scaled_to_zero") and fleet.calls == []
    assert recs.list(deployment="d") == []


def test_recommend_mode_proposes_nothing_for_a_count_that_changed_during_the_round(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    _interval(tuner, router, store, clock, ["d-0"], 60, 0.1)
    _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    record = store.record_action

    def scaled_meanwhile(*a: Any, **kw: Any) -> None:
        fleet.runtimes["d"].desired = 3  # a person scales while the round writes its decision
        record(*a, **kw)

    store.record_action = scaled_meanwhile  # type: ignore[method-assign]
    d = _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert d.reason == "scale_up_slo_risk" and recs.list(deployment="d") == []  # "3 -> 2" was never proposed


def test_an_open_recommendation_made_for_another_count_is_superseded(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    for ttft in (0.1, 2.0, 2.0):
        _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    [old] = recs.list(deployment="d")
    assert old["status"] == "open" and old["current"]["replicas"] == 1
    fleet.runtimes["d"].desired = 2  # a person applied something else by hand
    fleet.runtimes["d"].members["d-1"] = FakeMember("d-1")
    _interval(tuner, router, store, clock, ["d-0", "d-1"], 60, 2.0)
    assert recs.get(old["id"])["status"] == "superseded"
    assert "made for 1 replica(s); the deployment has 2 now" in recs.get(old["id"])["outcome"]["why"]


def test_a_rollback_that_set_the_count_before_failing_counts_as_done_and_one_never_done_gives_up(
        tmp_path: Path) -> None:
    for partial in (True, False):
        tuner, fleet, router, store, clock, recs = _tuner(tmp_path / str(partial), "auto", 2,
                                                          capacity=FleetCapacity((1,), (100.0,))) \
            if (tmp_path / str(partial)).mkdir() is None else _never()
        _until_scaled_down(tuner, fleet, router, store, clock)
        [rec] = recs.list(deployment="d")
        _fail_rollbacks(fleet, partial)
        for _ in range(40):  # 10 minutes, longer than the tuner keeps retrying (3 x start-up + verify_s)
            store.add_interval(["d-0"], clock.t, clock.t + 15.0, 2, 2.0, samples=False)
            _interval(tuner, router, store, clock, ["d-0"], 28, 0.1)
        got = recs.get(rec["id"])
        if partial:
            assert got["status"] == "rolled_back" and fleet.runtimes["d"].desired == 2
        else:
            assert got["status"] == "applied" and got["outcome"]["verdict"] == "rollback_failed"
            assert "database is locked" in got["outcome"]["rollback_error"]
            fails = [a for a in store.actions if a["reason"] == "rollback_failed"]
            assert 2 <= len(fails) < 40  # retried, then given up
        assert tuner.state["d"].down_hold_s is not None  # either way, scale-downs were held off after it


def _fail_rollbacks(fleet: FakeFleet, partial: bool) -> None:
    """Every rollback fails; `partial`: after setting the count (as when the supervisor's store write fails)."""
    inner = fleet.scale

    async def scale(deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        if reason.startswith("rollback_"):
            if partial:
                fleet.runtimes[deployment].desired = replicas
            raise RuntimeError("database is locked")
        return await inner(deployment, replicas, actor=actor, reason=reason)

    fleet.scale = scale  # type: ignore[method-assign]


def test_the_tuner_reads_a_window_s_requests_as_the_slo_counts_them_by_finish_time(sqlite_store: Any) -> None:
    """A request of 950 s that finished in the window is in the SLO's window: the tuner sees it too (read
    by arrival with 600 s of slack, it was missed)."""
    from controlplane.tuning.loop import recent_requests

    def row(i: int, arrival: float, e2e: float, ttft: float) -> dict[str, Any]:
        return {"replica": "tiny-0", "request_id": f"q{i}", "arrival_unix_s": arrival, "e2e_s": e2e,
                "ttft_s": ttft, "trace_id": f"{i:032x}", "span_id": "1" * 16}

    now = 10_000.0
    sqlite_store.write_spans([row(i, now - 1000.0, 950.0, 30.0) for i in range(5)]
                             + [row(10 + i, now - 100.0, 1.0, 0.1) for i in range(5)], [])
    rows = finished_between(recent_requests(sqlite_store, ["tiny-0"], now - 300.0, now), now - 300.0, now)
    assert len(rows) == 10 and sum(1 for r in rows if r["ttft_s"] > 1.0) == 5


def test_the_round_that_scales_back_records_no_other_change(tmp_path: Path) -> None:
    # 3 -> 2 on light load; the load falls further (one replica would do) while the two miss the SLO a little:
    # the change is scaled back. The policy, deciding on the old count, wanted one replica that round: what is
    # recorded is a hold at the restored count, never "2 -> 1".
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 3, capacity=FleetCapacity((1,), (1.5,)))
    tuner.options = replace(tuner.options, verify_s=90.0)
    rt = fleet.runtimes["d"]
    for _ in range(40):
        for m in rt.members.values():
            m.state = "ready" if m.state == "starting" else m.state
        ready = sorted(n for n, m in rt.members.items() if m.state == "ready")
        if len(fleet.calls) == 1:
            store.add_interval(ready, clock.t, clock.t + 15.0, 2, 2.0, samples=False)
        d = _interval(tuner, router, store, clock, ready, 12 if fleet.calls else 30, 0.1)
        if len(fleet.calls) >= 2:
            break
    assert [c[1] for c in fleet.calls] == [2, 3]
    assert (d.desired_replicas, d.reason, d.inputs["proposed_replicas"]) == (3, "hold_after_reversed_scale_down", 1)
    changes = [(x["before"]["replicas"], x["after"]["replicas"]) for x in store.actions
               if x["kind"] == "autoscale_decision" and x["before"] != x["after"]]
    assert changes == [(3, 2)]  # the one change made


def test_a_want_made_on_a_count_changed_during_the_round_is_recorded_as_a_hold(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "auto", 1)
    verify = tuner._verify

    async def a_person_scales_meanwhile(*args: Any) -> bool:  # through the API, while the round awaits the store
        fleet.runtimes["d"].desired = 3
        return await verify(*args)

    for ttft in (0.1, 2.0):
        _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    tuner._verify = a_person_scales_meanwhile  # type: ignore[method-assign]
    d = _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)  # the policy wants 2 (SLO risk) for 1 replica
    assert (d.desired_replicas, d.reason) == (3, "hold_count_changed")
    assert (d.inputs["proposed_replicas"], d.inputs["proposed_reason"]) == (2, "scale_up_slo_risk")
    assert fleet.calls == [] and recs.list(deployment="d") == []
    assert [(x["before"], x["after"]) for x in store.actions if x["reason"] == "scale_up_slo_risk"] == []


def test_a_want_renewed_after_a_person_decided_it_is_recorded_again(tmp_path: Path) -> None:
    # Recommend mode: the 1 -> 2 want is one row while its recommendation waits; a person dismisses it; the same
    # want, renewed, is a new decision: a new row and a new recommendation.
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    for _ in range(4):
        _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert len([a for a in store.actions if a["reason"] == SCALE_UP_SLO_RISK]) == 1
    [rec] = recs.list(deployment="d")
    recs.decide(rec["id"], "dismissed", by="person")
    _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert len([a for a in store.actions if a["reason"] == SCALE_UP_SLO_RISK]) == 2
    assert [r["status"] for r in recs.list(deployment="d")] == ["open", "dismissed"]


def test_auto_mode_records_every_change_it_applies(tmp_path: Path) -> None:
    # Auto mode: the tuner scales 1 -> 2; a person scales back to 1 before the next round; the tuner scales up again.
    tuner, fleet, router, store, clock, _ = _tuner(tmp_path, "auto", 1)
    for _ in range(4):
        _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
        if fleet.calls:
            break
    assert [c[1:3] for c in fleet.calls] == [(2, "tuner")]
    asyncio.run(fleet.scale("d", 1, actor="person", reason="manual"))  # before the tuner's next round
    for _ in range(4):
        _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
        if len(fleet.calls) == 3:
            break
    applied = [c for c in fleet.calls if c[2] == "tuner"]
    ups = [a for a in store.actions if a["kind"] == "autoscale_decision" and a["after"] == {"replicas": 2}
           and a["before"] == {"replicas": 1}]
    assert len(applied) == 2 and len(ups) == 2


def test_an_open_recommendation_too_old_to_apply_or_made_for_other_engine_args_is_superseded(tmp_path: Path) -> None:
    tuner, fleet, router, store, clock, recs = _tuner(tmp_path, "recommend", 1)
    for ttft in (0.1, 2.0, 2.0):
        _interval(tuner, router, store, clock, ["d-0"], 60, ttft)
    [old] = recs.list(deployment="d")
    assert old["status"] == "open"
    clock.t += 2 * 3600  # nobody applied it: it stands on the load of two hours ago, which the API refuses
    _interval(tuner, router, store, clock, ["d-0"], 60, 2.0)
    assert recs.get(old["id"])["status"] == "superseded" and "h ago" in recs.get(old["id"])["outcome"]["why"]
    [new] = recs.list(deployment="d", status="open")  # proposed again on today's load
    assert new["id"] != old["id"]
