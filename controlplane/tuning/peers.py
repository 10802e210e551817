"""Other projects' scaling policies, reimplemented from their published formulas as baselines, and the oracle.

Each is a pure policy in the `autoscaler.Policy` shape, so the fleet simulator drives all of them the same way.
Formulas (docs/design SLO_AND_TUNING.md); the code is ours:
- Ray Serve: desired = ceil(ready * avg_ongoing / target_ongoing_requests), averaged over a look-back, with
  upscale / downscale delays (30 s / 600 s).
- KEDA on vLLM's queue (vLLM production-stack): desired = ceil(sum(num_requests_waiting) / 5); scale-down
  stabilised over a 360 s cooldown, HPA's 10% tolerance. An empty query counts as 0 (KEDA's default).
- llm-d WVA saturation: a replica is saturated at KV >= 0.80 or queue >= 5; add one when the mean spare KV of
  the unsaturated ones < 0.10 or their spare queue < 3; remove one only with >= 2 unsaturated and the load
  spread over N-1 still clear of those triggers.
- Dynamo SLA planner: replicas = ceil(predicted rate / per-replica throughput at the TTFT/ITL targets), the
  targets corrected by observed/expected latency, load predicted by a constant or a Kalman filter.
- Oracle: knows the whole trace; per interval the fewest replicas whose capacity at the SLO (derated to
  `utilization`) covers the load of every minute until replicas asked for now are ready, so it asks early and
  keeps replicas through dips shorter than a start-up. bench/autoscale.py raises `utilization` as high as the
  run still keeps the SLO: the cheapest plan of this kind that does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import numpy as np

from controlplane.tuning.autoscaler import (
    HOLD_DOWNSCALE_DELAY,
    HOLD_STEADY,
    HOLD_UNKNOWN,
    HOLD_UPSCALE_DELAY,
    Decision,
    Observation,
)
from controlplane.tuning.capacity import Capacity, FleetCapacity, Objective
from controlplane.tuning.workload import Workload

SCALE_UP: Final = "scale_up_load"
SCALE_DOWN: Final = "scale_down_load"
HOLD_INTERVAL: Final = "hold_adjustment_interval"
HOLD_STARTING: Final = "hold_replicas_starting"
ORACLE_PLAN: Final = "oracle_plan"


def _clamp(n: int, lo: int, hi: int) -> int:
    return min(max(n, lo), hi)


def _move(obs: Observation, desired: int, inputs: dict[str, float | int | str | None]) -> Decision:
    n = obs.replicas
    return Decision(desired, SCALE_UP if desired > n else SCALE_DOWN if desired < n else HOLD_STEADY, inputs)


# --- Ray Serve -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayServeState:
    samples: tuple[tuple[float, float], ...] = ()  # (ts, mean ongoing requests per replica)
    up_since: float | None = None
    down_since: float | None = None


@dataclass(frozen=True)
class RayServe:
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 64
    name: str = "ray-serve"

    def initial_state(self) -> RayServeState:
        return RayServeState()

    def decide(self, obs: Observation, state: RayServeState, now: float) -> tuple[Decision, RayServeState]:
        known = [r for r in obs.readings if r.num_running is not None and r.num_waiting is not None]
        if not known:  # no replica reported: Ray makes no decision
            return Decision(obs.replicas, HOLD_UNKNOWN), state
        ongoing = sum((r.num_running or 0) + (r.num_waiting or 0) for r in known) / len(known)
        samples = tuple(s for s in state.samples if s[0] > now - self.look_back_period_s) + ((now, ongoing),)
        avg = sum(s[1] for s in samples) / len(samples)
        running = obs.ready_replicas or len(obs.readings)
        ratio = avg / self.target_ongoing_requests
        factor = self.upscaling_factor if ratio > 1 else self.downscaling_factor
        desired = _clamp(math.ceil(running * (1 + (ratio - 1) * factor)), self.min_replicas, self.max_replicas)
        inputs: dict[str, float | int | str | None] = {"avg_ongoing": avg, "running": running, "want": desired}
        state = replace(state, samples=samples)
        n = obs.replicas
        if desired > n:
            since = state.up_since if state.up_since is not None else now
            if now - since < self.upscale_delay_s:
                return Decision(n, HOLD_UPSCALE_DELAY, inputs), replace(state, up_since=since, down_since=None)
            return Decision(desired, SCALE_UP, inputs), replace(state, up_since=None, down_since=None)
        if desired < n:
            since = state.down_since if state.down_since is not None else now
            if now - since < self.downscale_delay_s:
                return Decision(n, HOLD_DOWNSCALE_DELAY, inputs), replace(state, down_since=since, up_since=None)
            return Decision(desired, SCALE_DOWN, inputs), replace(state, up_since=None, down_since=None)
        return Decision(n, HOLD_STEADY, inputs), replace(state, up_since=None, down_since=None)


# --- KEDA on the vLLM queue (production-stack) ----------------------------------------------------------
@dataclass(frozen=True)
class KedaState:
    recommendations: tuple[tuple[float, int], ...] = ()  # (ts, raw desired) within the cooldown


@dataclass(frozen=True)
class KedaQueue:
    waiting_per_replica: float = 5.0
    cooldown_s: float = 360.0
    tolerance: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 64
    name: str = "keda-queue"

    def initial_state(self) -> KedaState:
        return KedaState()

    def decide(self, obs: Observation, state: KedaState, now: float) -> tuple[Decision, KedaState]:
        total = sum(r.num_waiting or 0 for r in obs.readings)  # a failed scrape contributes 0, as KEDA reads it
        n = obs.replicas
        raw = math.ceil(total / self.waiting_per_replica)
        if n > 0 and abs(total / (self.waiting_per_replica * n) - 1) <= self.tolerance:
            raw = n
        raw = _clamp(raw, self.min_replicas, self.max_replicas)
        recs = tuple(r for r in state.recommendations if r[0] > now - self.cooldown_s) + ((now, raw),)
        # Up at once; down only to the highest recommendation of the cooldown (HPA's stabilisation window).
        desired = raw if raw >= n else min(n, max(r[1] for r in recs))
        return _move(obs, desired, {"waiting": total, "raw": raw}), KedaState(recs)


# --- llm-d workload-variant-autoscaler, saturation mode ---------------------------------------------------
@dataclass(frozen=True)
class LlmdSaturation:
    kv_saturated: float = 0.80
    queue_saturated: float = 5.0
    kv_spare_trigger: float = 0.10
    queue_spare_trigger: float = 3.0
    # The published rule adds a replica whenever spare capacity is short, also while the last one starts.
    wait_for_starting: bool = False
    min_replicas: int = 1
    max_replicas: int = 64
    name: str = "llm-d-saturation"

    def initial_state(self) -> None:
        return None

    def _spare(self, kv: Sequence[float], queue: Sequence[float]) -> tuple[float, float]:
        unsat = [(k, q) for k, q in zip(kv, queue, strict=True) if k < self.kv_saturated and q < self.queue_saturated]
        if not unsat:
            return 0.0, 0.0
        return (sum(self.kv_saturated - k for k, _ in unsat) / len(unsat),
                sum(self.queue_saturated - q for _, q in unsat) / len(unsat))

    def decide(self, obs: Observation, state: None, now: float) -> tuple[Decision, None]:
        known = [r for r in obs.readings if r.kv_usage_ratio is not None and r.num_waiting is not None]
        n = obs.replicas
        if not known:
            return Decision(n, HOLD_UNKNOWN), None
        kv = [float(r.kv_usage_ratio or 0.0) for r in known]
        queue = [float(r.num_waiting or 0) for r in known]
        spare_kv, spare_q = self._spare(kv, queue)
        inputs: dict[str, float | int | str | None] = {"spare_kv": spare_kv, "spare_queue": spare_q}
        if spare_kv < self.kv_spare_trigger or spare_q < self.queue_spare_trigger:
            if self.wait_for_starting and obs.ready_replicas is not None and obs.ready_replicas < n:
                return Decision(n, HOLD_STARTING, inputs), None  # the replica it added is not ready yet
            return _move(obs, min(n + 1, self.max_replicas), inputs), None
        unsat = sum(1 for k, q in zip(kv, queue, strict=True) if k < self.kv_saturated and q < self.queue_saturated)
        if n > self.min_replicas and unsat >= 2 and len(known) == n:
            after_kv = [sum(kv) / (n - 1)] * (n - 1)
            after_q = [sum(queue) / (n - 1)] * (n - 1)
            kv_after, q_after = self._spare(after_kv, after_q)
            if kv_after >= self.kv_spare_trigger and q_after >= self.queue_spare_trigger:
                return _move(obs, n - 1, inputs), None
        return Decision(n, HOLD_STEADY, inputs), None


# --- Dynamo SLA planner -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyProfile:
    """Per-replica rate -> the TTFT and ITL quantiles measured there (pre-deployment profiling)."""

    rps: tuple[float, ...]
    ttft_s: tuple[float, ...]
    itl_s: tuple[float, ...]

    @staticmethod
    def from_capacity(cap: Capacity, objectives: Sequence[Objective]) -> LatencyProfile:
        """From a one-replica capacity bisection's probes: the quantiles its TTFT and TPOT/ITL SLOs saw."""
        sli = {o.name: o.targets[0].sli for o in objectives if len(o.targets) == 1}
        rows: list[tuple[float, float, float]] = []
        for p in cap.probes:
            ttft = [q.quantile_s for q in p.predictions if sli.get(q.name) == "ttft" and q.quantile_s is not None]
            itl = [q.quantile_s for q in p.predictions
                   if sli.get(q.name) in ("tpot", "itl") and q.quantile_s is not None]
            if ttft and itl and math.isfinite(ttft[0]) and math.isfinite(itl[0]):
                rows.append((p.rps / cap.replicas, ttft[0], itl[0]))
        if len(rows) < 2:
            raise ValueError("a latency profile needs >= 2 probes with finite TTFT and TPOT/ITL quantiles")
        rows.sort()
        return LatencyProfile(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))

    def expected(self, rps: float) -> tuple[float, float]:
        return float(np.interp(rps, self.rps, self.ttft_s)), float(np.interp(rps, self.rps, self.itl_s))

    def throughput_at(self, ttft_s: float, itl_s: float) -> float:
        """The highest profiled rate whose TTFT and ITL stay under the targets (the lowest rate if none do)."""
        ok = [r for r, a, b in zip(self.rps, self.ttft_s, self.itl_s, strict=True) if a <= ttft_s and b <= itl_s]
        return max(ok) if ok else self.rps[0]


@dataclass(frozen=True)
class DynamoState:
    last_adjust_s: float | None = None
    level: float | None = None  # Kalman (local level) estimate of the request rate, or the last value
    variance: float = 1.0


@dataclass(frozen=True)
class DynamoPlanner:
    profile: LatencyProfile
    ttft_target_s: float
    itl_target_s: float
    adjustment_interval_s: float = 60.0
    predictor: Literal["constant", "kalman"] = "kalman"
    kalman_q: float = 1.0  # process noise, (req/s)^2 per step
    kalman_r: float = 1.0  # measurement noise
    min_replicas: int = 1
    max_replicas: int = 64
    name: str = "dynamo-sla"

    def initial_state(self) -> DynamoState:
        return DynamoState()

    def decide(self, obs: Observation, state: DynamoState, now: float) -> tuple[Decision, DynamoState]:
        n = obs.replicas
        if state.last_adjust_s is not None and now - state.last_adjust_s < self.adjustment_interval_s:
            return Decision(n, HOLD_INTERVAL), state
        if obs.arrival_rate_rps is None:
            return Decision(n, HOLD_UNKNOWN), state
        rate = obs.arrival_rate_rps
        if self.predictor == "constant" or state.level is None:
            level, var = rate, self.kalman_r
        else:
            p = state.variance + self.kalman_q
            gain = p / (p + self.kalman_r)
            level, var = state.level + gain * (rate - state.level), (1 - gain) * p
        ttft_corr = itl_corr = 1.0
        ready = obs.ready_replicas or n
        exp_ttft, exp_itl = self.profile.expected(rate / max(ready, 1))
        if obs.ttft_p99_s is not None and exp_ttft > 0:
            ttft_corr = obs.ttft_p99_s / exp_ttft
        if obs.tpot_p99_s is not None and exp_itl > 0:
            itl_corr = obs.tpot_p99_s / exp_itl
        per_replica = self.profile.throughput_at(self.ttft_target_s / ttft_corr, self.itl_target_s / itl_corr)
        desired = _clamp(math.ceil(level / per_replica) if level > 0 else 0, self.min_replicas, self.max_replicas)
        inputs: dict[str, float | int | str | None] = {"predicted_rps": level, "ttft_correction": ttft_corr,
                                                      "itl_correction": itl_corr, "per_replica_rps": per_replica}
        return _move(obs, desired, inputs), DynamoState(now, level, var)


# --- the oracle -------------------------------------------------------------------------------------------
def oracle_plan(workload: Workload, capacity: FleetCapacity, *, interval_s: float, startup_s: float,
                window_s: float = 60.0, min_replicas: int = 1, max_replicas: int = 64,
                utilization: float = 1.0) -> tuple[int, ...]:
    """Desired replicas at each decision time k * interval_s (k = 0, 1, ...): the most any window of the
    trace needs from now until replicas asked for at the next decision would be ready."""
    if window_s <= 0 or interval_s <= 0:
        raise ValueError("window_s and interval_s must be > 0")
    end = workload.duration_s
    edges = np.arange(0.0, end + window_s, window_s)
    counts, _ = np.histogram(workload.arrival_s, bins=edges)
    need = [_clamp(capacity.replicas_for(c / window_s, utilization), min_replicas, max_replicas) for c in counts]
    plan = []
    k = 0
    while k * interval_s <= end:
        t = k * interval_s
        first = int(t // window_s)
        last = int(min(t + startup_s + interval_s, end) // window_s)
        plan.append(max(need[first:last + 1]) if need[first:last + 1] else min_replicas)
        k += 1
    return tuple(plan)


@dataclass(frozen=True)
class Oracle:
    plan: tuple[int, ...]
    interval_s: float
    name: str = "oracle"

    def initial_state(self) -> None:
        return None

    def decide(self, obs: Observation, state: None, now: float) -> tuple[Decision, None]:
        k = min(int(round(now / self.interval_s)), len(self.plan) - 1)
        return Decision(self.plan[k], ORACLE_PLAN, {"planned": self.plan[k]}), None
