import math

import numpy as np
import pytest

from controlplane.slo.spec import LatencyTarget, Slo, SloWindow
from controlplane.tuning.capacity import (
    CapacityProbe,
    FleetCapacity,
    Objective,
    at_rate,
    capacity_at_slo,
    good_mask,
    judge,
    measure_fleet_capacity,
    objectives_from_slos,
)
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Poisson, Uniform, Workload, synthetic

COST = StepCost.linear(Coefficients(4e-3, 2e-5, 1e-7))
WINDOW = SloWindow("rolling", 28 * 86_400.0)


def replica(seqs: int = 32) -> ReplicaModel:
    return ReplicaModel(COST, max_num_seqs=seqs, max_num_batched_tokens=512, block_size=16, num_kv_blocks=2000,
                        max_model_len=1200)


def ttft(threshold: float, objective: float = 0.99) -> Objective:
    return Objective("ttft", (LatencyTarget("ttft", threshold),), objective)


LOAD = synthetic(Poisson(1.0), Uniform(50, 300), Uniform(10, 120), n=3000, seed=4)


def test_latency_and_goodput_slos_become_objectives_and_an_error_rate_slo_is_set_aside_with_a_note() -> None:
    slos = [Slo("a", "d", "ttft", (LatencyTarget("ttft", 0.5),), 0.99, WINDOW),
            Slo("b", "d", "goodput", (LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05)), 0.95, WINDOW),
            Slo("c", "d", "error_rate", (), 0.999, WINDOW)]
    objectives, notes = objectives_from_slos(slos)
    assert [(o.name, len(o.targets), o.objective) for o in objectives] == [("a", 1, 0.99), ("b", 2, 0.95)]
    assert len(notes) == 1 and "'c'" in notes[0] and "errors" in notes[0]


def test_a_request_is_good_when_every_target_holds_and_unfinished_ones_are_bad() -> None:
    wl = Workload(np.array([0.0, 0.0, 1.0]), np.array([100, 1000, 10]), np.array([5, 300, 1]))
    res = simulate(wl, [replica()])  # the second is longer than max_model_len: rejected
    both = Objective("g", (LatencyTarget("ttft", 1.0), LatencyTarget("tpot", 1.0)), 0.9)
    assert good_mask(res, both).tolist() == [True, False, True]  # the one-token output has no TPOT: judged on TTFT
    tight = Objective("t", (LatencyTarget("ttft", 1e-4),), 0.9)
    assert good_mask(res, tight).tolist() == [False, False, False]
    [p] = judge(res, [both])
    assert p.attainment == pytest.approx(2 / 3) and p.margin == pytest.approx(2 / 3 - 0.9) and not p.holds


def test_judge_reports_the_sli_at_the_objective_quantile_and_the_headroom_to_the_threshold() -> None:
    res = simulate(at_rate(LOAD, 20.0, 1000), [replica()])
    [p] = judge(res, [ttft(0.5, 0.9)])
    assert p.quantile_s is not None
    assert p.quantile_s == pytest.approx(float(np.quantile(res.ttft_s, 0.9)))
    assert p.headroom_ratio == pytest.approx(1 - p.quantile_s / 0.5)
    assert p.attainment == pytest.approx(float(np.mean(res.ttft_s <= 0.5)))


def test_at_rate_keeps_the_requests_and_their_order_and_sets_the_mean_rate() -> None:
    wl = at_rate(LOAD, 7.5, 500)
    assert len(wl) == 500 and wl.arrival_s[0] == 0.0
    assert (len(wl) - 1) / wl.duration_s == pytest.approx(7.5)
    assert np.array_equal(wl.prompt_tokens, LOAD.prompt_tokens[:500])
    assert np.allclose(wl.arrival_s, (LOAD.arrival_s[:500] - LOAD.arrival_s[0]) * wl.arrival_s[-1]
                       / (LOAD.arrival_s[499] - LOAD.arrival_s[0]))
    with pytest.raises(ValueError, match="rate must be > 0"):
        at_rate(LOAD, 0.0)


def test_capacity_is_bracketed_by_a_passing_rate_and_a_failing_one_within_the_tolerance() -> None:
    probe = CapacityProbe(replica(), LOAD, [ttft(0.1)], requests=800)  # an edge below the throughput
    cap = probe.capacity(rel_tol=0.03)
    assert 0 < cap.rps < cap.saturation_rps
    assert cap.at_capacity is not None and cap.at_capacity.passed
    failing = [p.rps for p in cap.probes if not p.passed]
    assert failing and min(f for f in failing if f > cap.rps) <= cap.rps * 1.03 + 1e-9
    assert cap.simulations == len(cap.probes) + 1 and cap.requests_simulated == 800 * cap.simulations
    # The capacity really is the edge: the rate meets the SLO, 10% more does not.
    assert probe.passes(cap.rps) and not probe.passes(cap.rps * 1.10)


def test_a_loose_slo_never_puts_the_capacity_at_or_past_the_throughput() -> None:
    # A finite probe past saturation still passes a loose SLO (its backlog has not grown enough yet); such a
    # load would queue without bound, so the capacity stays strictly under the replica's throughput.
    probe = CapacityProbe(replica(), LOAD, [ttft(60.0, 0.9)], requests=800)
    assert probe.passes(probe.saturation_rps() * 1.03)  # the finite probe alone would have allowed it
    cap = probe.capacity(rel_tol=0.02)
    assert cap.rps <= cap.saturation_rps * 0.98 + 1e-9


def test_an_slo_tighter_than_an_idle_replicas_prefill_has_no_capacity() -> None:
    cap = capacity_at_slo(replica(), LOAD, [ttft(1e-3)], requests=300)
    assert cap.rps == 0.0 and cap.at_capacity is None


def test_fleet_capacity_interpolates_between_sizes_and_sizes_a_load() -> None:
    fc = FleetCapacity((1, 2, 4), (10.0, 12.0, 13.0))
    assert fc.per_replica(3) == pytest.approx(12.0 + (math.log2(3) - 1) * 1.0)
    assert fc.per_replica(100) == 13.0 and fc.total(2) == 24.0
    assert fc.replicas_for(0.0) == 0 and fc.replicas_for(10.0) == 1 and fc.replicas_for(10.5) == 2
    assert fc.replicas_for(24.0) == 2 and fc.replicas_for(24.0, utilization=0.9) == 3
    assert fc.replicas_for(130.0) == 10
    with pytest.raises(ValueError, match="ascending"):
        FleetCapacity((2, 1), (1.0, 1.0))
    with pytest.raises(ValueError, match="utilization"):
        fc.replicas_for(1.0, utilization=1.5)


def test_two_replicas_behind_the_router_carry_at_least_twice_one_replicas_rate() -> None:
    fc = measure_fleet_capacity(replica(), LOAD, [ttft(0.3)], sizes=(1, 2), requests=600, rel_tol=0.05)
    assert fc.per_replica_rps[1] >= fc.per_replica_rps[0] > 0
    assert fc.in_flight_per_replica is not None and fc.in_flight_per_replica > 0
    with pytest.raises(ValueError, match="no rate"):
        measure_fleet_capacity(replica(), LOAD, [ttft(1e-3)], sizes=(1,), requests=200)
