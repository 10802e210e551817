"""The autoscaler: how many replicas a deployment should have, from forecast load and per-replica goodput at the SLO.

Pure: `decide(observation, config, state, now) -> (Decision, state)`; nothing here talks to a replica, a clock or
the store. The supervisor owns the replica count and drains what it removes; a decision is a proposal with a
reason code and the inputs it used (`DecisionRecord`, written through an injected `record` callable).

How it decides. The request rate is forecast one lead time ahead (replica start-up + one interval: what is asked
for now serves from then) with a margin for what such forecasts missed before (`forecast`: fast level, robust
trend, learned surge margin), so steady ramps cost nothing extra and recurring bursts are provisioned for. The
forecast load over the fleet's capacity at the SLO, derated to `target_utilization`, is the replica count; the
derating deepens while the requests of the last ~10 minutes burn the error budget too fast (SLO feedback: the
capacity model is corrected by what the fleet attains). Scale-downs must clear a lower utilization
(hysteresis), be wanted for `downscale_delay_s` (then the count follows the highest want of that window, as
Kubernetes' HPA stabilises), happen in an interval whose readings are all known, and pass an N -> N' check on
the load observed now (requests in flight and KV per remaining replica). Observed trouble (bad requests burning
the budget `risk_burn_rate` times too fast, or queues building) for `risk_intervals` intervals in a row scales
up at once; a single interval of it is the transient of a step in load, which replicas arriving a start-up
later would not fix. A forecast scale-up is held while the fleet was recently seen serving that load within
the SLO (the observed-goodput floor), so a pessimistic capacity model does not buy replicas the fleet has shown
it does not need. A missing reading is unknown: it never scales down and never feeds the forecast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, TypeVar

from controlplane.tuning import forecast
from controlplane.tuning.capacity import FleetCapacity
from controlplane.tuning.forecast import ForecastConfig, ForecastState

# --- reason codes ------------------------------------------------------------------------------------------
SCALE_UP_SLO_RISK: Final = "scale_up_slo_risk"  # observed: attainment under objective or queues building
SCALE_UP_FORECAST: Final = "scale_up_forecast_load"  # the forecast load needs more replicas
SCALE_DOWN_SPARE: Final = "scale_down_spare_capacity"
SCALE_TO_BOUNDS: Final = "scale_to_bounds"  # the count was outside [min, max]
HOLD_STEADY: Final = "hold_steady"
HOLD_HYSTERESIS: Final = "hold_hysteresis"  # fewer would do at the target utilization, not at the scale-down one
HOLD_UNKNOWN: Final = "hold_unknown_data"
HOLD_UPSCALE_DELAY: Final = "hold_upscale_delay"
HOLD_DOWNSCALE_DELAY: Final = "hold_downscale_delay"
HOLD_N_MINUS_1: Final = "hold_n_minus_1_unsafe"
HOLD_STARTING: Final = "hold_replicas_starting"  # trouble observed, but the replicas that fix it are starting
HOLD_AT_MAX: Final = "hold_at_max_replicas"
HOLD_UNCALIBRATED: Final = "hold_capacity_unknown"  # no calibrated capacity yet: act on observed trouble only
# The model says the forecast load needs more replicas, but the fleet served at least that load within the SLO
# in the last proven_window_s (the observed-goodput floor): a pessimistic model does not buy replicas.
HOLD_PROVEN: Final = "hold_observed_goodput"
HOLD_AT_ZERO: Final = "hold_scaled_to_zero"  # a person scaled it to 0 (its spec allows it): theirs to bring back
# The plane's tuner loop holds a scale-down the policy wants: a recent one was reversed, one is still being judged,
# or (any change) a rolling change runs and the supervisor would refuse it.
HOLD_AFTER_REVERSAL: Final = "hold_after_reversed_scale_down"
HOLD_JUDGING: Final = "hold_judging_scale_down"
HOLD_ROLLING: Final = "hold_rolling_change"
HOLD_TROUBLE: Final = "hold_slo_trouble"  # fewer would do by the forecast, but the SLO burns or queues build now
HOLD_COUNT_CHANGED: Final = "hold_count_changed"  # a person changed the count while the round decided on the old one
CLOCK_STEP_TOLERANCE_S: Final = 1.0  # a clock going back by less (an NTP step) is not a step back
DECISION_KIND: Final = "autoscale_decision"  # the lifecycle-event kind a decision is recorded under


# --- what a policy sees and says ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaReading:
    """One ready replica's scrape; a field is None when the scrape failed or did not carry it."""

    name: str
    num_running: int | None = None
    num_waiting: int | None = None
    kv_usage_ratio: float | None = None

    @property
    def known(self) -> bool:
        return self.num_running is not None and self.num_waiting is not None and self.kv_usage_ratio is not None


@dataclass(frozen=True)
class Observation:
    deployment: str
    replicas: int  # the supervisor's desired count now (ready + starting)
    ready_replicas: int | None
    arrival_rate_rps: float | None  # at the router over the last interval
    readings: tuple[ReplicaReading, ...] = ()  # one per ready replica
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    ttft_p99_s: float | None = None  # requests that finished in the last interval
    tpot_p99_s: float | None = None
    slo_good_ratio: float | None = None  # of those, the share meeting every SLO; None: none finished
    finished: int | None = None
    finished_window_s: float | None = None  # how long the window `finished` counts was (None: interval_s)
    lost_replicas: int = 0  # counted in `replicas` but not coming back by themselves (crash-looping)


@dataclass(frozen=True)
class Decision:
    desired_replicas: int
    reason: str
    inputs: Mapping[str, float | int | str | None] = field(default_factory=dict)


StateT = TypeVar("StateT")


class Policy(Protocol[StateT]):
    """A scaling policy with its configuration bound: the fleet simulator and the plane drive any of them."""

    @property
    def name(self) -> str: ...

    def initial_state(self) -> StateT: ...

    def decide(self, obs: Observation, state: StateT, now: float) -> tuple[Decision, StateT]: ...


# --- recording ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecisionRecord:
    ts_unix_s: float
    deployment: str
    policy: str
    current: int
    desired: int
    reason: str
    inputs: Mapping[str, float | int | str | None]

    def attributes(self) -> dict[str, Any]:
        return {"ts_unix_s": self.ts_unix_s, "deployment": self.deployment, "policy": self.policy,
                "current": self.current, "desired": self.desired, "inputs": dict(self.inputs)}


RecordFn = Callable[[str, str, Mapping[str, Any]], None]
"""record(kind, reason, attributes): the lead binds it to Store.record_action(actor="tuner")."""


def write_decision(record: RecordFn, rec: DecisionRecord) -> None:
    record(DECISION_KIND, rec.reason, rec.attributes())


# --- configuration and state -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoscalerConfig:
    # Per-replica goodput at the SLO (simulated from the calibrated model). None: not calibrated yet; then only
    # observed trouble scales up and nothing scales down (unknown capacity is unknown data).
    capacity: FleetCapacity | None
    min_replicas: int = 1
    max_replicas: int = 64
    # Capacity is already the rate at which the SLO holds (stationary load, and below the replica's throughput);
    # the forecast's surge margin covers forecast misses. 1.0: the cheapest setting of bench/autoscale.py's
    # sweep that keeps 99 % on both traces once capacity was capped below saturation (0.95 was chosen when it
    # could reach 1.05x the throughput, i.e. the same operating point).
    target_utilization: float = 1.0  # of capacity at the SLO, at the forecast load plus margin
    scale_down_utilization: float = 0.9  # fewer replicas only if they would run at or under this
    startup_s: float = 90.0  # replica start-up: the lead time the forecast looks ahead
    interval_s: float = 15.0  # how often decide() is called
    upscale_delay_s: float = 0.0  # a forecast-driven scale-up must be wanted this long (observed risk: at once)
    # None: one lead time (start-up + interval). Removing a replica needed again sooner costs more than keeping it.
    downscale_delay_s: float | None = None
    # Unknown intervals pause the downscale delay; a run of them longer than this (and than the delay) is a
    # blackout after which what was learned before is stale, and the delay starts over. Counted in intervals
    # (plus any time between two decisions beyond two intervals, which nothing observed), and long, so a large
    # fleet in which some scrape fails in most intervals still scales.
    down_blackout_s: float = 600.0
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    slo_objective: float = 0.99
    risk_burn_rate: float = 4.0  # an interval's bad share over (1 - objective) at or above this is risk
    min_finished: int = 50  # ... judged on at least this many finished requests
    waiting_risk_per_replica: float = 8.0  # mean queued requests per ready replica that count as risk
    risk_step_ratio: float = 0.25  # on risk, add max(1, ceil(ratio * N))
    risk_intervals: int = 2  # consecutive intervals of trouble before it counts
    # SLO feedback: when the requests that finished over about `feedback_window_s` burn the error budget faster
    # than it lasts, the utilization targets are lowered by 1 + feedback_gain * (burn - 1), down to
    # min_utilization: the capacity model is corrected by what the fleet actually attains.
    feedback_window_s: float = 600.0
    feedback_gain: float = 0.05
    min_utilization: float = 0.7
    kv_safe_ratio: float = 0.9  # N -> N' check: KV in use per remaining replica must stay under this
    # Observed-goodput floor: an interval in which every replica was ready and known, the requests that finished
    # met the objective (on at least min_finished of them), queues stayed under proven_waiting_per_replica and
    # KV under kv_safe_ratio proves the fleet serves that rate per replica. A forecast scale-up to a load at or
    # under the best such rate of the last proven_window_s is held: the model's prediction is overruled by what
    # the fleet was seen to do. It never drives a scale-down (a floor says nothing about fewer replicas).
    proven_window_s: float = 600.0
    proven_waiting_per_replica: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"autoscaler: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if not 0 < self.scale_down_utilization < self.target_utilization <= 1:
            raise ValueError(f"autoscaler: need 0 < scale_down_utilization ({self.scale_down_utilization}) < "
                             f"target_utilization ({self.target_utilization}) <= 1")
        if not 0 < self.min_utilization <= self.scale_down_utilization:
            raise ValueError(f"autoscaler: need 0 < min_utilization ({self.min_utilization}) <= "
                             f"scale_down_utilization ({self.scale_down_utilization})")
        if self.feedback_window_s <= 0 or self.feedback_gain < 0:
            raise ValueError("autoscaler: feedback_window_s must be > 0 and feedback_gain >= 0")
        if not 0 < self.slo_objective < 1 or self.risk_burn_rate <= 0 or self.risk_intervals < 1:
            raise ValueError("autoscaler: slo_objective must be in (0, 1), risk_burn_rate > 0, risk_intervals >= 1")
        if self.proven_window_s <= 0 or self.proven_waiting_per_replica < 0:
            raise ValueError("autoscaler: proven_window_s must be > 0 and proven_waiting_per_replica >= 0")
        if self.down_blackout_s < 0:
            raise ValueError("autoscaler: down_blackout_s must be >= 0")
        if self.interval_s <= 0 or self.startup_s < 0 or self.upscale_delay_s < 0 or self.down_delay_s < 0:
            raise ValueError("autoscaler: interval_s must be > 0; startup and delays >= 0")

    @property
    def down_delay_s(self) -> float:
        return self.startup_s + self.interval_s if self.downscale_delay_s is None else self.downscale_delay_s


@dataclass(frozen=True)
class AutoscalerState:
    forecast: ForecastState = ForecastState()
    up_since: float | None = None
    # (ts, replicas wanted at the scale-down utilization) of the known-data intervals of the last
    # downscale_delay_s of known data; a scale-down goes to the most of these (HPA's stabilisation window), so
    # a falling load is followed with a lag of the delay rather than held for a delay per step.
    down_wants: tuple[tuple[float, int], ...] = ()
    # Seconds of known data in the current run of intervals wanting fewer (None: no such run); intervals with
    # unknown readings in between neither count nor end the run.
    down_known_s: float | None = None
    down_paused_s: float = 0.0  # unknown time in a row since the last known interval of that run
    troubled: int = 0  # consecutive intervals with observed SLO trouble
    recent_good: float = 0.0  # finished requests meeting every SLO, exponentially decayed over feedback_window_s
    recent_finished: float = 0.0
    proven: tuple[tuple[float, float], ...] = ()  # (ts, rate per ready replica served within the SLO)
    last_at: float | None = None  # when decide last ran


def _proven_rate(obs: Observation, cfg: AutoscalerConfig, trouble: str | None) -> float | None:
    """The rate per replica this interval proved the fleet serves within the SLO, or None if it proved nothing."""
    ready = obs.ready_replicas
    if (trouble or obs.arrival_rate_rps is None or not ready or ready != obs.replicas
            or len(obs.readings) < ready or not all(r.known for r in obs.readings)):
        return None
    if obs.slo_good_ratio is None or obs.finished is None or obs.finished < cfg.min_finished:
        return None
    if obs.slo_good_ratio < cfg.slo_objective:
        return None
    waiting = sum(r.num_waiting or 0 for r in obs.readings) / ready
    if waiting > cfg.proven_waiting_per_replica or any((r.kv_usage_ratio or 0.0) > cfg.kv_safe_ratio
                                                       for r in obs.readings):
        return None
    # At the onset of a burst the arrivals jump while the requests finishing (and judged good) are still those
    # of the load before it: the arrival rate is proven only when the goodput kept up with it (within 10%: the
    # requests finishing in an interval lag those arriving by their service time); otherwise only the goodput.
    window_s = obs.finished_window_s if obs.finished_window_s and obs.finished_window_s > 0 else cfg.interval_s
    goodput = obs.slo_good_ratio * obs.finished / window_s
    rate = obs.arrival_rate_rps if goodput >= 0.9 * obs.arrival_rate_rps else goodput
    return rate / ready


def _remember_proven(state: AutoscalerState, obs: Observation, cfg: AutoscalerConfig, trouble: str | None,
                     now: float) -> AutoscalerState:
    kept = tuple(p for p in state.proven if p[0] > now - cfg.proven_window_s)
    rate = _proven_rate(obs, cfg, trouble)
    return replace(state, proven=kept + (((now, rate),) if rate is not None else ()))


def _risk(obs: Observation, cfg: AutoscalerConfig) -> str | None:
    if obs.slo_good_ratio is not None and obs.finished is not None and obs.finished >= cfg.min_finished:
        burn = (1 - obs.slo_good_ratio) / (1 - cfg.slo_objective)
        if burn >= cfg.risk_burn_rate:
            return f"good ratio {obs.slo_good_ratio:.4f}: burning the error budget {burn:.1f}x"
    waiting = [r.num_waiting for r in obs.readings if r.num_waiting is not None]
    if waiting and sum(waiting) / len(waiting) >= cfg.waiting_risk_per_replica:
        return f"{sum(waiting) / len(waiting):.1f} requests queued per replica"
    return None


def _remember_slo(state: AutoscalerState, obs: Observation, cfg: AutoscalerConfig) -> AutoscalerState:
    keep = math.exp(-cfg.interval_s / cfg.feedback_window_s)
    good = state.recent_good * keep
    finished = state.recent_finished * keep
    if obs.slo_good_ratio is not None and obs.finished:
        good += obs.slo_good_ratio * obs.finished
        finished += obs.finished
    return replace(state, recent_good=good, recent_finished=finished)


def _feedback(state: AutoscalerState, cfg: AutoscalerConfig) -> float:
    """1 while the recent requests keep the objective; more when they burn the budget faster than it lasts."""
    if state.recent_finished < cfg.min_finished:
        return 1.0
    burn = (1 - state.recent_good / state.recent_finished) / (1 - cfg.slo_objective)
    return 1.0 + cfg.feedback_gain * max(0.0, burn - 1.0)


def _n_prime_unsafe(obs: Observation, n_new: int, cfg: AutoscalerConfig) -> str | None:
    """Would the load observed now, spread over n_new replicas, keep each one safe?"""
    if cfg.capacity is None:
        return "capacity unknown"
    in_flight = sum((r.num_running or 0) + (r.num_waiting or 0) for r in obs.readings)
    limit = cfg.capacity.in_flight_per_replica
    if limit is not None and in_flight / n_new > limit * cfg.scale_down_utilization:
        return f"{in_flight} requests in flight over {n_new} replicas exceeds {limit * cfg.scale_down_utilization:.1f}"
    kv = sum(r.kv_usage_ratio or 0.0 for r in obs.readings)
    if kv / n_new > cfg.kv_safe_ratio:
        return f"KV in use would be {kv / n_new:.2f} per replica (> {cfg.kv_safe_ratio})"
    rate = obs.arrival_rate_rps or 0.0
    if rate > cfg.capacity.total(n_new) * cfg.scale_down_utilization:
        return f"the current {rate:.2f} req/s exceeds {n_new} replicas' capacity at the scale-down utilization"
    return None


def decide(obs: Observation, cfg: AutoscalerConfig, state: AutoscalerState,
           now: float) -> tuple[Decision, AutoscalerState]:
    n = obs.replicas
    if not cfg.min_replicas <= n <= cfg.max_replicas:
        target = min(max(n, cfg.min_replicas), cfg.max_replicas)
        return Decision(target, SCALE_TO_BOUNDS, {"current": n}), _no_down(replace(state, up_since=None))
    state = _unobserved(state, now, cfg)
    known_rate = obs.arrival_rate_rps is not None
    lead = cfg.startup_s + cfg.interval_s
    fstate, fc = forecast.step(state.forecast, obs.arrival_rate_rps, now, lead, cfg.forecast)
    state = replace(state, forecast=fstate)
    state = _remember_slo(state, obs, cfg)
    trouble = _risk(obs, cfg)
    state = replace(state, troubled=state.troubled + 1 if trouble else 0)
    state = _remember_proven(state, obs, cfg, trouble, now)
    risk = trouble if state.troubled >= cfg.risk_intervals else None
    # Replicas on their way to ready. A crash-looping one is counted by the supervisor but will not get there:
    # taken for "starting" it would hold every SLO-risk scale-up and every scale-down for as long as it loops.
    starting = obs.ready_replicas is not None and obs.ready_replicas < n - obs.lost_replicas
    inputs: dict[str, float | int | str | None] = {
        "rate_rps": obs.arrival_rate_rps, "ready": obs.ready_replicas, "good_ratio": obs.slo_good_ratio,
        "capacity_rps_per_replica": cfg.capacity.per_replica(max(n, 1)) if cfg.capacity else None, "risk": trouble,
        "troubled_intervals": state.troubled}
    if cfg.capacity is None:  # not calibrated: observed trouble may add replicas, nothing else moves
        if risk and not starting:
            step = max(1, math.ceil(cfg.risk_step_ratio * n))
            return _up(n + step, n, cfg, SCALE_UP_SLO_RISK, inputs, state, now, at_once=True)
        return Decision(n, HOLD_STARTING if risk else HOLD_UNCALIBRATED, inputs), _no_down(state)
    if fc is None:  # nothing known yet: no forecast
        if risk and not starting:
            return _up(n + 1, n, cfg, SCALE_UP_SLO_RISK, inputs, state, now, at_once=True)
        return Decision(n, HOLD_UNKNOWN, inputs), _no_down(state)
    load = fc.load_rps
    factor = _feedback(state, cfg)
    up_u = max(cfg.min_utilization, cfg.target_utilization / factor)
    capacity = cfg.capacity
    want_up = capacity.replicas_for(load, up_u)
    want_down = capacity.replicas_for(load, up_u * cfg.scale_down_utilization / cfg.target_utilization)
    inputs["utilization_target"] = up_u
    inputs |= {"level_rps": fc.level_rps, "trend_rps_per_s": fc.slope_rps_per_s, "surge_rps": fc.margin_rps,
               "load_rps": load, "want_up": want_up, "want_down": want_down}
    if risk:
        step = max(1, math.ceil(cfg.risk_step_ratio * n))
        if want_up > n or not starting:
            return _up(max(want_up, n + step), n, cfg, SCALE_UP_SLO_RISK, inputs, state, now, at_once=True)
        return Decision(n, HOLD_STARTING, inputs), _no_down(state)
    proven = max((p[1] for p in state.proven), default=None)
    inputs["proven_rps_per_replica"] = proven
    # A crash-looping replica is counted in n but serves nothing: the forecast's want is met by the others.
    serving = n - obs.lost_replicas
    if want_up > serving and proven is not None and load <= proven * serving:
        return Decision(n, HOLD_PROVEN, inputs), _no_down(replace(state, up_since=None))
    if want_up > serving:
        return _up(want_up + obs.lost_replicas, n, cfg, SCALE_UP_FORECAST, inputs, state, now, at_once=False)
    state = replace(state, up_since=None)
    if trouble and want_down < n:
        # Trouble seen for fewer intervals than a risk scale-up needs is still no time to remove a replica.
        return Decision(n, HOLD_TROUBLE, inputs), _no_down(state)
    # Replicas still starting (or lost) mean the readings cover part of the fleet: not enough to scale down on.
    all_known = (known_rate and obs.ready_replicas is not None and len(obs.readings) >= obs.ready_replicas
                 and all(r.known for r in obs.readings) and not starting)
    if want_up == n or want_down >= n:
        hold = HOLD_UNKNOWN if not all_known else HOLD_STEADY if want_up == n else HOLD_HYSTERESIS
        return Decision(n, hold, inputs), _no_down(state)
    # Fewer replicas would do. An interval with any reading unknown never scales down; it pauses the delay
    # (a reset would starve a large fleet, where some scrape fails in most intervals, of every scale-down), so
    # the delay and the window of wants are counted in intervals of known data, never in unobserved time.
    if not all_known:
        return Decision(n, HOLD_UNKNOWN, inputs), replace(state, down_paused_s=state.down_paused_s + cfg.interval_s)
    if state.down_paused_s > max(cfg.down_blackout_s, cfg.down_delay_s):
        state = _no_down(state)  # a blackout: start the delay over rather than scale down right after it
    state = replace(state, down_paused_s=0.0)
    known_s = 0.0 if state.down_known_s is None else state.down_known_s + cfg.interval_s
    keep = math.ceil(cfg.down_delay_s / cfg.interval_s) + 1
    wants = (state.down_wants + ((now, want_down),))[-keep:]
    state = replace(state, down_known_s=known_s, down_wants=wants)
    target = max(max(w[1] for w in wants), cfg.min_replicas)
    inputs |= {"wanted_for_s": known_s, "stable_want": target}
    if known_s < cfg.down_delay_s or target >= n:
        return Decision(n, HOLD_DOWNSCALE_DELAY, inputs), state
    unsafe = _n_prime_unsafe(obs, target, cfg)
    if unsafe:
        inputs["unsafe"] = unsafe
        return Decision(n, HOLD_N_MINUS_1, inputs), state
    return Decision(target, SCALE_DOWN_SPARE, inputs), state


def _unobserved(state: AutoscalerState, now: float, cfg: AutoscalerConfig) -> AutoscalerState:
    """Time between two decisions beyond two intervals was not observed at all (tuner rounds that failed, a
    deployment held at 0 replicas, a clock stepped forward): it counts as unknown time, so a long enough gap
    restarts the scale-down delay as a blackout of unknown readings does, rather than letting the first known
    interval after it finish a run begun before it. A clock stepped back puts the run's times in the future:
    it starts over."""
    last, state = state.last_at, replace(state, last_at=now)
    if last is None:
        return state
    if now < last - CLOCK_STEP_TOLERANCE_S:
        return _no_down(state)
    # Rounds up to two intervals apart are tolerated (a slow round); beyond that the excess is unobserved time,
    # counted without a jump at the threshold.
    return replace(state, down_paused_s=state.down_paused_s + max(0.0, now - last - 2 * cfg.interval_s))


def _no_down(state: AutoscalerState) -> AutoscalerState:
    return replace(state, down_known_s=None, down_wants=(), down_paused_s=0.0)


def _up(target: int, n: int, cfg: AutoscalerConfig, reason: str, inputs: dict[str, float | int | str | None],
        state: AutoscalerState, now: float, *, at_once: bool) -> tuple[Decision, AutoscalerState]:
    state = _no_down(state)
    target = min(target, cfg.max_replicas)
    if target <= n:
        return Decision(n, HOLD_AT_MAX, inputs), replace(state, up_since=None)
    since = state.up_since if state.up_since is not None else now
    if not at_once and now - since < cfg.upscale_delay_s:
        return Decision(n, HOLD_UPSCALE_DELAY, inputs), replace(state, up_since=since)
    return Decision(target, reason, inputs), replace(state, up_since=None)


@dataclass(frozen=True)
class SloAutoscaler:
    """This project's policy, with its configuration bound (the `Policy` shape)."""

    config: AutoscalerConfig
    name: str = "controlplane"

    def initial_state(self) -> AutoscalerState:
        return AutoscalerState()

    def decide(self, obs: Observation, state: AutoscalerState, now: float) -> tuple[Decision, AutoscalerState]:
        return decide(obs, self.config, state, now)
