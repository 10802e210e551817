import numpy as np
import pytest

from controlplane.slo.spec import LatencyTarget
from controlplane.tuning import autoscaler as a
from controlplane.tuning import peers as p
from controlplane.tuning.autoscaler import Observation, ReplicaReading
from controlplane.tuning.capacity import Capacity, FleetCapacity, Objective, Prediction, Probe
from controlplane.tuning.workload import Workload


def obs(replicas: int, *, ready: int | None = None, running: int | None = 0, waiting: int | None = 0,
        kv: float | None = 0.1, rate: float | None = 10.0, ttft: float | None = None,
        tpot: float | None = None, readings: tuple[ReplicaReading, ...] | None = None) -> Observation:
    ready = replicas if ready is None else ready
    if readings is None:
        readings = tuple(ReplicaReading(f"r{i}", running, waiting, kv) for i in range(ready))
    return Observation("chat", replicas, ready, rate, readings, ttft_p99_s=ttft, tpot_p99_s=tpot)


# --- Ray Serve ---------------------------------------------------------------------------------------------
def test_ray_serve_scales_by_ongoing_requests_over_the_target_after_its_upscale_delay() -> None:
    ray = p.RayServe(target_ongoing_requests=10)
    state = ray.initial_state()
    decisions = []
    for k in range(3):  # 4 replicas, 25 ongoing each: ceil(4 * 25 / 10) = 10, once wanted for 30 s
        d, state = ray.decide(obs(4, running=20, waiting=5), state, k * 15.0)
        decisions.append(d)
    assert [d.reason for d in decisions] == [a.HOLD_UPSCALE_DELAY, a.HOLD_UPSCALE_DELAY, p.SCALE_UP]
    assert decisions[2].desired_replicas == 10 and decisions[2].inputs["avg_ongoing"] == 25


def test_ray_serve_waits_600_s_before_scaling_down_and_averages_over_its_look_back() -> None:
    ray = p.RayServe(target_ongoing_requests=10)
    state = ray.initial_state()
    d, state = ray.decide(obs(10, running=20), state, 0.0)
    d, state = ray.decide(obs(10, running=0), state, 15.0)
    assert d.inputs["avg_ongoing"] == 10.0 and d.reason == a.HOLD_STEADY  # (20 + 0) / 2 within the look-back
    for t in range(30, 630, 15):  # wanted from t=30 on
        d, state = ray.decide(obs(10, running=1), state, float(t))
        assert d.desired_replicas == 10
    d, state = ray.decide(obs(10, running=1), state, 630.0)
    assert d.reason == p.SCALE_DOWN and d.desired_replicas == 1


def test_ray_serve_decides_nothing_without_any_replica_reporting() -> None:
    ray = p.RayServe()
    d, _ = ray.decide(obs(3, running=None, waiting=None), ray.initial_state(), 0.0)
    assert d.reason == a.HOLD_UNKNOWN and d.desired_replicas == 3


# --- KEDA -------------------------------------------------------------------------------------------------
def test_keda_asks_for_one_replica_per_five_waiting_requests_at_once() -> None:
    keda = p.KedaQueue()
    d, _ = keda.decide(obs(2, waiting=23), keda.initial_state(), 0.0)  # 46 waiting -> ceil(46 / 5)
    assert d.reason == p.SCALE_UP and d.desired_replicas == 10


def test_keda_holds_within_its_tolerance_and_scales_down_only_after_the_cooldown() -> None:
    keda = p.KedaQueue()
    d, state = keda.decide(obs(4, waiting=5), keda.initial_state(), 0.0)  # exactly on target
    assert d.reason == a.HOLD_STEADY and d.desired_replicas == 4
    d, state = keda.decide(obs(4, waiting=0), state, 15.0)
    assert d.desired_replicas == 4  # the recommendation of 4 at t=0 is still in the 360 s window
    for t in range(30, 375, 15):
        d, state = keda.decide(obs(4, waiting=0), state, float(t))
    assert d.reason == p.SCALE_DOWN and d.desired_replicas == 1


def test_keda_reads_a_failed_scrape_as_an_empty_queue() -> None:
    # The lesson peers paid for: missing data counted as zero scales the fleet down.
    keda = p.KedaQueue()
    state = keda.initial_state()
    for t in range(0, 400, 15):
        d, state = keda.decide(obs(6, waiting=None), state, float(t))
    assert d.desired_replicas == 1


# --- llm-d saturation ---------------------------------------------------------------------------------------
def test_llm_d_adds_one_replica_at_a_time_when_spare_queue_capacity_runs_low() -> None:
    sat = p.LlmdSaturation()
    d, _ = sat.decide(obs(3, waiting=3, kv=0.3), None, 0.0)  # spare queue 5 - 3 = 2 < 3
    assert d.reason == p.SCALE_UP and d.desired_replicas == 4
    d, _ = sat.decide(obs(4, ready=3, waiting=3, kv=0.3), None, 15.0)  # the published rule does not wait
    assert d.desired_replicas == 5
    waiting = p.LlmdSaturation(wait_for_starting=True)
    d, _ = waiting.decide(obs(4, ready=3, waiting=3, kv=0.3), None, 15.0)
    assert d.reason == p.HOLD_STARTING and d.desired_replicas == 4
    d, _ = sat.decide(obs(3, kv=0.75), None, 0.0)  # spare KV 0.05 < 0.10
    assert d.desired_replicas == 4


def test_llm_d_removes_one_replica_only_if_the_rest_stay_clear_of_the_triggers() -> None:
    sat = p.LlmdSaturation()
    d, _ = sat.decide(obs(4, waiting=0, kv=0.2), None, 0.0)  # over 3: KV 0.27 each, spare 0.53
    assert d.reason == p.SCALE_DOWN and d.desired_replicas == 3
    d, _ = sat.decide(obs(4, waiting=0, kv=0.55), None, 0.0)  # over 3: KV 0.73, spare 0.07 < 0.10
    assert d.reason == a.HOLD_STEADY and d.desired_replicas == 4
    d, _ = sat.decide(obs(1, waiting=0, kv=0.0), None, 0.0)  # fewer than 2 unsaturated
    assert d.desired_replicas == 1


# --- Dynamo -------------------------------------------------------------------------------------------------
PROFILE = p.LatencyProfile(rps=(1.0, 2.0, 3.0, 4.0), ttft_s=(0.1, 0.2, 0.4, 0.8), itl_s=(0.02, 0.03, 0.04, 0.06))


def test_the_latency_profile_interpolates_and_finds_the_rate_that_keeps_both_targets() -> None:
    assert PROFILE.expected(2.5) == pytest.approx((0.3, 0.035))
    assert PROFILE.throughput_at(0.5, 0.05) == 3.0
    assert PROFILE.throughput_at(0.01, 0.01) == 1.0  # none keeps them: the lowest profiled rate


def test_dynamo_replicas_are_the_predicted_rate_over_the_profiled_throughput_at_the_targets() -> None:
    dyn = p.DynamoPlanner(PROFILE, ttft_target_s=0.5, itl_target_s=0.05, predictor="constant")
    d, state = dyn.decide(obs(4, rate=20.0), dyn.initial_state(), 0.0)
    assert d.desired_replicas == 7 and d.inputs["per_replica_rps"] == 3.0  # ceil(20 / 3)
    d, _ = dyn.decide(obs(7, rate=40.0), state, 30.0)
    assert d.reason == p.HOLD_INTERVAL and d.desired_replicas == 7


def test_dynamo_corrects_its_targets_by_observed_over_expected_latency() -> None:
    dyn = p.DynamoPlanner(PROFILE, ttft_target_s=0.5, itl_target_s=0.05, predictor="constant")
    # 4 replicas at 2 req/s each: expected TTFT 0.2 s; observed 0.4 s -> correction 2, target 0.25 s -> 2 req/s
    d, _ = dyn.decide(obs(4, rate=8.0, ttft=0.4, tpot=0.03), dyn.initial_state(), 0.0)
    assert d.inputs["ttft_correction"] == pytest.approx(2.0) and d.inputs["per_replica_rps"] == 2.0
    assert d.desired_replicas == 4


def test_dynamos_kalman_predictor_smooths_a_single_spike() -> None:
    dyn = p.DynamoPlanner(PROFILE, 0.5, 0.05, adjustment_interval_s=15.0)
    state = dyn.initial_state()
    for t in range(0, 300, 15):
        _, state = dyn.decide(obs(4, rate=9.0), state, float(t))
    d, _ = dyn.decide(obs(4, rate=30.0), state, 300.0)
    assert 9.0 < d.inputs["predicted_rps"] < 30.0  # type: ignore[operator]


def test_a_profile_is_built_from_a_capacity_bisections_probes() -> None:
    objs = [Objective("ttft", (LatencyTarget("ttft", 0.5),), 0.99),
            Objective("tpot", (LatencyTarget("tpot", 0.05),), 0.99)]

    def probe(rps: float, ttft: float, tpot: float) -> Probe:
        preds = (Prediction("ttft", 0.99, 1.0, 0.01, ttft, 0.5), Prediction("tpot", 0.99, 1.0, 0.01, tpot, 0.05))
        return Probe(rps, True, preds, 10.0)

    cap = Capacity(2, 6.0, 9.0, (probe(2.0, 0.1, 0.02), probe(6.0, 0.3, 0.04)), 100)
    prof = p.LatencyProfile.from_capacity(cap, objs)
    assert prof.rps == (1.0, 3.0) and prof.ttft_s == (0.1, 0.3) and prof.itl_s == (0.02, 0.04)


# --- the oracle ---------------------------------------------------------------------------------------------
def steps(levels: list[tuple[float, float]]) -> Workload:
    """Evenly spaced arrivals at each (duration_s, rate) in turn."""
    times, t = [], 0.0
    for dur, rate in levels:
        n = int(dur * rate)
        times += list(t + (np.arange(n) + 0.5) / rate)
        t += dur
    n = len(times)
    return Workload(np.array(times), np.full(n, 100), np.full(n, 10))


CAP = FleetCapacity((1,), (10.0,))


def test_the_oracle_asks_for_replicas_one_start_up_ahead_of_a_step() -> None:
    wl = steps([(600, 10.0), (600, 50.0)])
    plan = p.oracle_plan(wl, CAP, interval_s=15.0, startup_s=90.0)
    ready_needed = [k * 15.0 for k, n in enumerate(plan) if n >= 5]
    assert plan[0] == 1 and plan[-1] == 5
    assert ready_needed[0] == 600 - 90 - 15  # asked for one start-up + one interval before the step


def test_the_oracle_keeps_replicas_through_a_dip_shorter_than_a_start_up_but_not_a_long_one() -> None:
    short = p.oracle_plan(steps([(600, 50.0), (60, 10.0), (600, 50.0)]), CAP, interval_s=15.0, startup_s=90.0)
    assert min(short) == 5
    long = p.oracle_plan(steps([(600, 50.0), (600, 10.0), (600, 50.0)]), CAP, interval_s=15.0, startup_s=90.0)
    assert min(long) == 1


def test_the_oracle_policy_plays_its_plan() -> None:
    oracle = p.Oracle((2, 3, 4), 15.0)
    assert [oracle.decide(obs(1), None, t)[0].desired_replicas for t in (0.0, 15.0, 30.0, 45.0)] == [2, 3, 4, 4]
