import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from controlplane.slo.spec import LatencyTarget
from controlplane.tuning import autoscaler as a
from controlplane.tuning.autoscaler import AutoscalerConfig, Decision, Observation, SloAutoscaler
from controlplane.tuning.capacity import FleetCapacity, Objective
from controlplane.tuning.fleet_sim import FleetSimConfig, run_fleet
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Poisson, Uniform, Workload, synthetic

REPLICA = ReplicaModel(StepCost.linear(Coefficients(4e-3, 2e-5, 1e-7)), max_num_seqs=32, max_num_batched_tokens=512,
                       block_size=16, num_kv_blocks=2000, max_model_len=1200, gpus=2)
OBJ = [Objective("ttft", (LatencyTarget("ttft", 0.5),), 0.99)]
LOAD = synthetic(Poisson(20.0), Uniform(50, 300), Uniform(10, 120), n=3000, seed=2)


@dataclass
class Script:
    """A policy that asks for a scripted count from given times on, and keeps what it saw."""

    plan: dict[float, int]
    name: str = "script"
    seen: list[Observation] = field(default_factory=list)

    def initial_state(self) -> None:
        return None

    def decide(self, obs: Observation, state: None, now: float) -> tuple[Decision, None]:
        self.seen.append(obs)
        due = [t for t in self.plan if t <= now]
        return Decision(self.plan[max(due)] if due else obs.replicas, "scripted"), None


def cfg(**kw: object) -> FleetSimConfig:
    base: dict[str, object] = {"interval_s": 10.0, "startup_s": 30.0, "initial_replicas": 2}
    return FleetSimConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("replica", [REPLICA, dataclasses.replace(REPLICA, api_path_s=0.003,
                                                                  api_path_per_request_s=0.001)],
                         ids=["no API path", "an API path that grows with the load"])
def test_a_fleet_that_never_changes_serves_exactly_as_the_plain_simulator(replica: ReplicaModel) -> None:
    run = run_fleet(LOAD, replica, Script({}), OBJ, cfg(initial_replicas=3))
    ref = simulate(LOAD, [replica] * 3, sample_interval_s=None)
    assert np.array_equal(run.result.replica, ref.replica)
    for k in ("ttft_s", "e2e_s", "queue_s"):  # equal up to summation order (stretches are cut at each tick)
        assert np.allclose(getattr(run.result, k), getattr(ref, k), rtol=1e-9, atol=1e-12), k
    assert run.gpu_hours == pytest.approx(3 * 2 * LOAD.duration_s / 3600)  # 3 replicas x 2 GPUs, start to end


def test_a_new_replica_costs_from_its_request_and_serves_only_after_its_start_up() -> None:
    run = run_fleet(LOAD, REPLICA, Script({50.0: 3}), OBJ, cfg())
    new = run.spans[2]
    assert (new.start_s, new.ready_s) == (50.0, 80.0)
    served = run.result.replica == 2
    assert served.any() and LOAD.arrival_s[served].min() >= 80.0
    span = LOAD.duration_s
    assert run.gpu_hours == pytest.approx(2 * (2 * span + (span - 50.0)) / 3600)


def test_a_removed_replica_takes_no_new_requests_and_finishes_the_ones_it_holds() -> None:
    run = run_fleet(LOAD, REPLICA, Script({60.0: 1}), OBJ, cfg())
    assert run.result.completed.all()
    drained = [i for i, s in enumerate(run.spans) if s.drain_s is not None]
    assert len(drained) == 1
    i = drained[0]
    span = run.spans[i]
    assert span.end_s is not None
    mine = run.result.replica == i
    assert span.drain_s == 60.0 and LOAD.arrival_s[mine].max() < 60.0
    assert span.end_s == pytest.approx(run.result.finished_s[mine].max())  # its last request ends the drain
    assert span.end_s > 60.0  # it was busy when asked to stop
    keep = 1 - i
    assert run.gpu_hours == pytest.approx(2 * (LOAD.duration_s + span.end_s) / 3600)
    assert (run.result.replica == keep).sum() + mine.sum() == len(LOAD)


def test_a_replica_cancelled_while_starting_costs_only_until_the_cancel_and_serves_nothing() -> None:
    run = run_fleet(LOAD, REPLICA, Script({20.0: 4, 40.0: 2}), OBJ, cfg())
    cancelled = [s for s in run.spans if s.start_s == 20.0]
    assert len(cancelled) == 2 and all(s.end_s == 40.0 for s in cancelled)
    assert not np.isin(run.result.replica, [2, 3]).any()
    assert run.gpu_hours == pytest.approx(2 * (2 * LOAD.duration_s + 2 * 20.0) / 3600)


def test_the_last_ready_replica_is_never_drained() -> None:
    run = run_fleet(LOAD, REPLICA, Script({20.0: 3, 30.0: 1}), OBJ, cfg(initial_replicas=1))
    # At t=30 the only ready replica is the first; the starting ones go instead.
    assert run.spans[0].drain_s is None and run.result.completed.all()


def test_the_policy_sees_the_routers_rate_and_every_ready_replicas_scrape() -> None:
    policy = Script({})
    run_fleet(LOAD, REPLICA, policy, OBJ, cfg())
    first = policy.seen[0]
    assert first.arrival_rate_rps == pytest.approx(np.sum(LOAD.arrival_s < 10.0) / 10.0)
    assert first.replicas == first.ready_replicas == 2 and len(first.readings) == 2
    assert all(r.known for r in first.readings)
    later = [o for o in policy.seen if o.finished]
    assert later and all(o.slo_good_ratio is not None and 0 <= o.slo_good_ratio <= 1 for o in later)


def test_failed_scrapes_reach_the_policy_as_unknown_never_as_zero() -> None:
    policy = Script({})
    run_fleet(LOAD, REPLICA, policy, OBJ, cfg(unknown_probability=1.0))
    assert all(o.arrival_rate_rps is None for o in policy.seen)
    assert all(r.num_running is None and r.kv_usage_ratio is None for o in policy.seen for r in o.readings)


def test_the_autoscaler_in_the_loop_never_scales_down_on_an_interval_with_unknown_data() -> None:
    busy = synthetic(Poisson(60.0), Uniform(50, 300), Uniform(10, 120), duration_s=60.0, seed=3)
    quiet = synthetic(Poisson(8.0), Uniform(50, 300), Uniform(10, 120), duration_s=500.0, seed=4)
    falling = Workload(np.concatenate([busy.arrival_s, 60.0 + quiet.arrival_s]),
                       np.concatenate([busy.prompt_tokens, quiet.prompt_tokens]),
                       np.concatenate([busy.output_tokens, quiet.output_tokens]))
    cap = FleetCapacity((1, 2), (15.0, 16.0), in_flight_per_replica=20.0)
    pol = SloAutoscaler(AutoscalerConfig(cap, max_replicas=16, startup_s=30.0, interval_s=10.0))
    run = run_fleet(falling, REPLICA, pol, OBJ, cfg(initial_replicas=6, max_replicas=16, unknown_probability=0.05))
    downs = [(t, d) for t, d in zip(run.ticks, run.decisions, strict=True) if t.desired < t.current]
    assert downs, "the load fell: some scale-down was expected"
    for tick, rec in downs:
        assert tick.rate_rps is not None and rec.reason == a.SCALE_DOWN_SPARE
    unknown = [t for t in run.ticks if t.rate_rps is None]
    assert unknown and all(t.desired >= t.current for t in unknown)


def test_bad_fleet_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="initial_replicas"):
        FleetSimConfig(min_replicas=3, initial_replicas=2)
    with pytest.raises(ValueError, match="unknown_probability"):
        FleetSimConfig(unknown_probability=2.0)
