"""The plane's tuner loop: observe each supervised deployment, decide its replica count with the SLO autoscaler,
record every decision, turn a change into a recommendation with its evidence, and in `auto` mode apply it
through the supervisor and roll it back if the SLO got worse.

Pure parts (`arrival_rate`, `observe`, `proposal_for`, `verdict`) take plain values; `Tuner` is the edge that reads
the router's counters, the store and the supervisor, on an injected clock. A reading that is missing or stale is
unknown (None) in the observation, and the autoscaler never scales down on unknown data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane import names
from controlplane.slo.model import LatencyTarget, Slo
from controlplane.slo.rows import SLI_COLUMNS, TOKENS, good_known
from controlplane.tuning.autoscaler import (
    CLOCK_STEP_TOLERANCE_S,
    DECISION_KIND,
    HOLD_AFTER_REVERSAL,
    HOLD_AT_ZERO,
    HOLD_COUNT_CHANGED,
    HOLD_JUDGING,
    HOLD_ROLLING,
    AutoscalerConfig,
    AutoscalerState,
    Decision,
    Observation,
    ReplicaReading,
    decide,
)
from controlplane.tuning.capacity import FleetCapacity, Objective, objectives_from_slos
from controlplane.tuning.recommendations import (
    APPLIED,
    OPEN,
    ROLLED_BACK,
    SUPERSEDED,
    Proposal,
    RecommendationError,
    Recommendations,
    engine_changed_since,
    too_old,
)

log = logging.getLogger(__name__)

ACTOR: Final = "tuner"
SAMPLE_SKEW_S: Final = 5.0  # an engine sample stamped further ahead of the clock than this is unknown
MAX_DOWN_HOLD_S: Final = 4 * 3600.0  # the longest hold on scale-downs after reversals in a row


# --- pure: what the tuner sees ---------------------------------------------------------------------------------
def arrival_rate(before: Mapping[str, int] | None, after: Mapping[str, int], dt_s: float) -> float | None:
    """Requests per second routed to a deployment's replicas between two snapshots of the router's counters.

    A replica present only in `after` joined during the interval (its counter started at 0). None when there is
    no earlier snapshot or no time passed: unknown, not zero."""
    if before is None or dt_s <= 0:
        return None
    total = 0
    for name, n in after.items():
        prev = before.get(name, 0)
        total += n - prev if n >= prev else n  # a counter that went down was recreated: count from zero
    return total / dt_s


def finished_between(rows: Iterable[Mapping[str, Any]], t0: float, t1: float) -> list[Mapping[str, Any]]:
    """Requests that finished in [t0, t1), at the time SLO windows count them (the stored finish time; for a
    row without one, arrival + e2e, and a row without either is left out)."""
    out = []
    for r in rows:
        end = r.get("finish_unix_s")
        if end is None:
            e2e = r.get("e2e_s")
            if e2e is None:
                continue
            end = float(r["arrival_unix_s"]) + float(e2e)
        if t0 <= float(end) < t1:
            out.append(r)
    return out


def good_count(rows: Sequence[Mapping[str, Any]], targets: Sequence[LatencyTarget]) -> tuple[int, int]:
    """(good, known) of stored request rows, by the SLO rows' own rule (`slo.rows.good_known`: three-valued, a
    one-token answer meets a TPOT / ITL target, a request that ended with no token after a TTFT threshold
    missed it), so the tuner and the SLO evaluation never judge a request differently."""
    columns = {SLI_COLUMNS[t.sli] for t in targets} | {"e2e_s", TOKENS}
    cols = {c: np.array([np.nan if r.get(c) is None else float(r[c]) for r in rows], dtype=np.float64)
            for c in columns}
    good, known = good_known(cols, targets)
    return int(good.sum()), int(known.sum())


def slo_counts(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Objective],
               objective: float) -> tuple[float, int]:
    """(good, known) of these requests against several SLOs, on the scale of `objective` (the strictest).

    Each SLO burns its own budget: its bad share over 1 - its objective. A request missing a lax SLO's target
    must not count against a strict one's budget, so the requests are not judged against every target at once.
    The worst burn is returned as the share of good requests that would burn `objective`'s budget as fast,
    over that SLO's known requests; with one SLO this is its plain good count. No known request: (0, 0)."""
    worst: tuple[float, int, int, float] | None = None  # (burn, known, good, that SLO's objective)
    for o in objectives:
        g, k = good_count(rows, o.targets)
        if k and (worst is None or ((1 - g / k) / (1 - o.objective), k) > worst[:2]):
            worst = ((1 - g / k) / (1 - o.objective), k, g, o.objective)
    if worst is None:
        return 0.0, 0
    burn, known, good, own = worst
    if own == objective:
        return float(good), known
    return max(0.0, 1.0 - burn * (1.0 - objective)) * known, known


def _p99(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.quantile(vals, 0.99)) if vals else None


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def observe(deployment: str, *, desired: int, ready: Sequence[str], rate_rps: float | None,
            latest_samples: Mapping[str, Mapping[str, Any] | None], finished: Sequence[Mapping[str, Any]],
            objectives: Sequence[Objective], objective: float, now: float, stale_s: float,
            finished_window_s: float | None = None, lost: int = 0) -> Observation:
    """One interval of a deployment as the autoscaler sees it (`lost`: replicas counted in `desired` that are
    crash-looping).

    `latest_samples[replica]` is the newest engine sample of each ready replica (None: none stored); a failed or
    older-than-`stale_s` one is unknown. `finished` are the requests that finished in the interval; their good
    ratio is `slo_counts`'s, on the scale of `objective` (the autoscaler's)."""
    readings = []
    for name in ready:
        s = latest_samples.get(name)
        # A sample stamped in the future means the clock went back since: it says nothing of now.
        fresh = s is not None and bool(s.get("scrape_ok")) and -SAMPLE_SKEW_S <= now - float(s["ts_unix_s"]) <= stale_s
        if s is None or not fresh:
            readings.append(ReplicaReading(name))
            continue
        running, waiting, kv = (_finite(s.get(k)) for k in ("num_running", "num_waiting", "kv_usage_ratio"))
        readings.append(ReplicaReading(name, None if running is None else int(running),
                                       None if waiting is None else int(waiting), kv))
    good, known = slo_counts(finished, objectives, objective)
    # With no replica ready the router turns requests away before counting them: a rate of 0 would read as
    # "no demand" during an outage. Unknown instead.
    rate = rate_rps if ready else None
    return Observation(
        deployment=deployment, replicas=desired, ready_replicas=len(ready), arrival_rate_rps=rate,
        readings=tuple(readings), mean_prompt_tokens=_mean(finished, "prompt_tokens"),
        mean_output_tokens=_mean(finished, "completion_tokens"), ttft_p99_s=_p99(finished, "ttft_s"),
        tpot_p99_s=_p99(finished, "tpot_s"), slo_good_ratio=good / known if known else None,
        finished=known if objectives else None, finished_window_s=finished_window_s, lost_replicas=lost)


def _finite(v: Any) -> float | None:
    """A gauge as a number, or None (unknown) when missing or not finite: a NaN an exporter sends (PostgreSQL
    keeps it; SQLite turns it into NULL) must not pass a safety check that a known value would fail."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def action_of(decision: Decision, current: int) -> str:
    return "up" if decision.desired_replicas > current else "down" if decision.desired_replicas < current else "hold"


def proposal_for(deployment: str, decision: Decision, *, current: int, engine: Mapping[str, Any],
                 obs: Observation, capacity: FleetCapacity | None, capacity_note: str,
                 objective: float, price_per_replica_hour_usd: float) -> Proposal:
    """A scale recommendation with its evidence: what was observed, what the capacity model predicts at the
    current and the proposed count, and what the change costs."""
    target = decision.desired_replicas
    load = decision.inputs.get("load_rps")
    rate = obs.arrival_rate_rps
    basis = float(load) if isinstance(load, int | float) else rate
    predicted: dict[str, Any] = {"basis_load_rps": basis}
    if capacity is not None and basis is not None:
        for label, n in (("current", current), ("proposed", target)):
            total = capacity.total(n)
            predicted[label] = {"replicas": n, "capacity_rps": round(total, 4),
                                "utilization": round(basis / total, 4) if total > 0 else None}
    # Confidence: how much evidence the decision stands on. Observed trouble is direct evidence, weighted by
    # the number of finished requests it was judged on; a forecast-driven change leans on the capacity model.
    finished = obs.finished or 0
    if decision.reason.startswith("scale_up_slo_risk"):
        confidence = min(1.0, 0.5 + finished / 400)
    else:
        confidence = 0.7 if capacity is not None else 0.3
    return Proposal(
        deployment=deployment, kind="scale", reason=decision.reason,
        current={"replicas": current, "engine": dict(engine)}, proposed={"replicas": target},
        evidence={
            "observed": {"rate_rps": rate, "ready_replicas": obs.ready_replicas, "finished": obs.finished,
                         "slo_good_ratio": obs.slo_good_ratio, "objective": objective,
                         "ttft_p99_s": obs.ttft_p99_s, "tpot_p99_s": obs.tpot_p99_s,
                         "waiting": [r.num_waiting for r in obs.readings],
                         "kv_usage_ratio": [r.kv_usage_ratio for r in obs.readings]},
            "decision_inputs": dict(decision.inputs),
            "capacity": ({"sizes": list(capacity.sizes), "per_replica_rps": list(capacity.per_replica_rps),
                          "source": capacity_note} if capacity is not None else {"source": capacity_note}),
            "predicted": predicted,
            # A price of 0 is "not configured" (the spec's default), so unknown, not free.
            "cost": ({"price_per_replica_hour_usd": price_per_replica_hour_usd,
                      "usd_per_hour_current": current * price_per_replica_hour_usd,
                      "usd_per_hour_proposed": target * price_per_replica_hour_usd}
                     if price_per_replica_hour_usd > 0 else
                     {"price_per_replica_hour_usd": None, "usd_per_hour_current": None,
                      "usd_per_hour_proposed": None}),
        },
        confidence=round(confidence, 3))


KEPT, ROLL_BACK, UNDECIDED = "kept", "roll_back", "undecided"


def verdict(before: tuple[float, int], after: tuple[float, int], *, objective: float, min_requests: int,
            tolerance: float = 0.02) -> str:
    """After an applied change: keep it, roll it back (the SLO got worse), or wait for more requests.

    `before` / `after` are (good, known) counts of the requests that finished before the change and since it
    took effect. It is rolled back only when the share of good requests fell by more than `tolerance` (at most
    one error budget, 1 - objective: 2 points are a 20x burn at 99.9 %) and now misses the objective; too few
    requests on either side is undecided (unknown is not worse)."""
    if before[1] < min_requests or after[1] < min_requests:
        return UNDECIDED
    b, a = before[0] / before[1], after[0] / after[1]
    tol = min(tolerance, 1.0 - objective)
    return ROLL_BACK if a < b - tol and a < objective else KEPT


def slo_objectives(slos: Iterable[Slo], deployment: str) -> tuple[tuple[Objective, ...], float]:
    """The deployment's latency SLOs and the strictest objective (the scale `slo_counts` reports on)."""
    objectives, _ = objectives_from_slos(s for s in slos if s.deployment == deployment)
    return objectives, max((o.objective for o in objectives), default=0.99)


def recent_requests(store: Any, replicas: Iterable[str], since: float, until: float) -> list[dict[str, Any]]:
    """The stored requests of these replicas that finished in [since, until), as the SLO windows count them
    (by arrival, a request longer than the slack read before the window would be missed)."""
    rows: list[dict[str, Any]] = []
    for r in sorted(replicas):
        rows += store.requests(since_unix_s=since, until_unix_s=until, replica=r, limit=100_000, by="finish")
    return rows


# --- the edge -----------------------------------------------------------------------------------------------
class FleetView(Protocol):
    """What the tuner reads from and asks of the supervisor."""

    @property
    def runtimes(self) -> Mapping[str, Any]: ...

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]: ...


class RouterView(Protocol):
    def arrivals(self) -> dict[str, int]: ...


class StoreView(Protocol):
    def requests(self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
                 replica: str | None = None, limit: int = 1000, by: str = "arrival") -> list[dict[str, Any]]: ...
    def engine_samples(self, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
                       replica: str | None = None, limit: int = 1000) -> list[dict[str, Any]]: ...
    def record_action(self, replica_id: int | None, kind: str, *, actor: str, reason: str | None,
                      message: str | None = None, before: Mapping[str, Any] | None = None,
                      after: Mapping[str, Any] | None = None, attributes: Mapping[str, Any] | None = None,
                      ts_unix_s: float | None = None) -> None: ...


CapacityFn = Callable[[Any, Sequence[str], float], tuple[FleetCapacity, str] | None]
"""calibrate(runtime, ready replica names, now) -> (capacity, note) or None: the plane binds it to the
calibrated simulator; tests inject their own."""


def calibrated_capacity(store: Any, slos: Sequence[Slo], *, window_s: float = 1800.0, min_requests: int = 200,
                        sizes: Sequence[int] = (1, 2, 4)) -> CapacityFn:
    """The plane's capacity source: fit the step-time model of a ready replica from its recent requests and
    engine samples, then bisect the rate at which 1, 2, 4 such replicas meet the SLOs in the simulator, on a
    workload drawn from the lengths just observed. None while there is too little to fit."""
    from controlplane.tuning.calibrate import calibrated_replica
    from controlplane.tuning.capacity import measure_fleet_capacity
    from controlplane.tuning.workload import from_rows

    def fn(rt: Any, ready: Sequence[str], now: float) -> tuple[FleetCapacity, str] | None:
        objectives, _ = objectives_from_slos(s for s in slos if s.deployment == rt.dep.name)
        eng = rt.dep.engine
        if not objectives or eng.max_num_seqs is None or eng.max_num_batched_tokens is None:
            return None
        replica = ready[0]
        rows = store.requests(since_unix_s=now - window_s, replica=replica, limit=20_000)
        if len(rows) < min_requests:
            return None
        model, fit = calibrated_replica(store, replica, max_num_seqs=eng.max_num_seqs,
                                        max_num_batched_tokens=eng.max_num_batched_tokens,
                                        since_unix_s=now - window_s, max_model_len=eng.max_model_len,
                                        # fit_per_seq as bench/sim_fidelity.py measured it
                                        fit_per_seq=True, prefix_caching=eng.prefix_caching)
        fc = measure_fleet_capacity(model, from_rows(rows), objectives, sizes=sizes, requests=800)
        rmse = "unknown" if fit.rel_rmse is None else f"{fit.rel_rmse:.3f}"
        return fc, (f"calibrated on {replica} ({fit.rows} steps, relative RMSE {rmse}, API path "
                    f"{model.api_path_s * 1e3:.1f} ms + {model.api_path_per_request_s * 1e3:.2f} ms per request in "
                    f"flight) at {now:.0f}")

    return fn


@dataclass
class Applied:
    rid: int
    at: float
    from_replicas: int
    to_replicas: int
    before: tuple[float, int]
    effective_at: float | None = None  # when the ready count first reached the new size
    rollback_failed_at: float | None = None  # the first failed attempt to scale it back


@dataclass
class _DeploymentState:
    policy: AutoscalerState = field(default_factory=AutoscalerState)
    counters: dict[str, int] | None = None
    counters_at: float | None = None
    cut: float | None = None  # requests that finished before this were judged in an earlier round
    capacity: FleetCapacity | None = None
    capacity_note: str = "not calibrated yet"
    calibrated_at: float | None = None
    last_reason: str | None = None
    # The last change recorded (action, from, to, reason): in recommend mode the same want comes back every round
    # until a person applies it, and is one decision, not one audit row per round while its recommendation stays
    # open. Forgotten when a hold comes in between: a renewed want is recorded.
    last_change: tuple[str, int, int, str] | None = None
    applied: Applied | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (finish-interval end, good, known)
    no_down_until: float = 0.0  # after a rolled-back scale-down, no other one before this time
    down_hold_s: float | None = None  # the last hold after a reversed scale-down (doubles while they repeat)
    engine: str | None = None  # the engine configuration the capacity model and the proven floor belong to
    last_now: float | None = None  # the clock at the last round (a step back is seen against it)


def _clock_stepped_back(name: str, st: _DeploymentState, delta: float) -> None:
    """The wall clock went back by -delta since the last round: every time kept from before is ahead of it. The
    change being judged, its holds and the SLO history move with the clock, so they keep their meaning; the
    rate and the round's window start over (unknown this round), and so does the policy's learned state (its
    forecast, proofs and scale-down run are stamped in the old frame): it acts on observed trouble and holds
    otherwise until it has learned again, never scaling down on what it saw before the step."""
    log.warning("tuner: the clock went back %.1f s since the last round of %s; its state starts over", -delta, name)
    st.counters = st.counters_at = st.cut = None
    st.policy = AutoscalerState()
    st.history = [(t + delta, g, k) for t, g, k in st.history]
    st.no_down_until += delta
    if st.calibrated_at is not None:
        st.calibrated_at += delta
    if st.applied is not None:
        a = st.applied
        st.applied = replace(a, at=a.at + delta,
                             effective_at=None if a.effective_at is None else a.effective_at + delta,
                             rollback_failed_at=None if a.rollback_failed_at is None else a.rollback_failed_at + delta)


@dataclass(frozen=True)
class TunerOptions:
    mode: str = "recommend"  # off | recommend | auto
    interval_s: float = 15.0
    startup_s: float = 90.0
    stale_s: float = 20.0  # an engine sample older than this is unknown
    recalibrate_s: float = 120.0
    verify_s: float = 120.0  # after an applied change is in effect, judge it on this long of requests
    min_finished: int = 50
    lookback_s: float = 300.0  # requests finishing this long before a change are its "before"
    # A request reaches the store when its span is exported (batched, every 0.5-5 s): each round judges the
    # requests that finished up to this long ago, so one stored just after a round is counted in the next.
    ingest_lag_s: float = 5.0


class Tuner:
    def __init__(self, fleet: FleetView, router: RouterView, store: StoreView, recs: Recommendations,
                 slos: Sequence[Slo], options: TunerOptions, *, calibrate: CapacityFn | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.fleet, self.router, self.store, self.recs = fleet, router, store, recs
        self.options, self.calibrate, self.clock = options, calibrate, clock
        self.slos = list(slos)
        self.state: dict[str, _DeploymentState] = {}
        self.decisions: dict[tuple[str, str, str], int] = {}  # (deployment, action, reason) -> count
        self.last_obs: dict[str, Observation] = {}

    def _targets(self, deployment: str) -> tuple[tuple[Objective, ...], float]:
        return slo_objectives(self.slos, deployment)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one starts from fresh readings
                log.exception("tuner round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.interval_s)

    async def tick(self) -> list[Decision]:
        out = []
        for name, rt in list(self.fleet.runtimes.items()):
            if rt.backend.kind == "external":  # the plane cannot change the size of what it only watches
                continue
            try:
                out.append(await self._tick_one(name, rt))
            except Exception:  # noqa: BLE001 - one deployment that cannot be judged must not stop the others
                log.exception("tuner round for %s failed", name)
        return out

    async def _tick_one(self, name: str, rt: Any) -> Decision:
        now = self.clock()
        st = self.state.setdefault(name, _DeploymentState())
        if st.last_now is not None and now < st.last_now - CLOCK_STEP_TOLERANCE_S:
            _clock_stepped_back(name, st, now - st.last_now)
        st.last_now = now
        opts = self.options
        engine = repr(sorted(rt.dep.engine.as_dict().items())) if hasattr(rt.dep.engine, "as_dict") else None
        if engine != st.engine:
            if st.engine is not None:  # reconfigured: what was learned of the old engine says nothing of the new
                st.capacity, st.calibrated_at = None, None
                st.capacity_note = "not calibrated yet (engine reconfigured)"
                st.policy = replace(st.policy, proven=())
            st.engine = engine
        members = [m for m in rt.members.values() if not getattr(m, "candidate", False)]
        ready = sorted(m.name for m in members if m.state == "ready")
        lost = sum(1 for m in members if m.state == "crashloop")
        member_names = {m.name for m in rt.members.values()}
        # A replica counted last round and removed since still has its last requests in the router's count.
        known = member_names | set(st.counters or ())
        counters = {n: c for n, c in self.router.arrivals().items() if n in known}
        rate = arrival_rate(st.counters, counters, now - st.counters_at if st.counters_at is not None else 0.0)
        st.counters, st.counters_at = counters, now
        cut = now - opts.ingest_lag_s
        window_start = st.cut if st.cut is not None else cut - opts.interval_s
        st.cut = cut
        objectives, objective = self._targets(name)
        rows = await asyncio.to_thread(self._recent_requests, member_names, window_start, now)
        finished = finished_between(rows, window_start, cut)
        samples = await asyncio.to_thread(self._latest_samples, ready, now)
        obs = observe(name, desired=rt.desired, ready=ready, rate_rps=rate, latest_samples=samples,
                      finished=finished, objectives=objectives, objective=objective, now=now,
                      stale_s=opts.stale_s, finished_window_s=cut - window_start, lost=lost)
        self.last_obs[name] = obs
        g, k = slo_counts(finished, objectives, objective)
        st.history.append((cut, g, k))
        st.history = [h for h in st.history if h[0] > now - 3600]
        await self._maybe_calibrate(name, rt, st, ready, now)
        if rt.desired == 0 and rt.dep.min_replicas == 0:
            # Scaled to nothing by hand, as its spec allows: bringing it back is a person's call, not a bound.
            st.last_change = None
            decision = Decision(0, HOLD_AT_ZERO, {"current": 0})
            if decision.reason != st.last_reason:
                await asyncio.to_thread(
                    self.store.record_action, None, DECISION_KIND, actor=ACTOR, reason=decision.reason,
                    message=f"{name}: scaled to 0 replicas; the autoscaler leaves it there",
                    before={"replicas": 0}, after={"replicas": 0}, attributes={"deployment": name}, ts_unix_s=now)
                st.last_reason = decision.reason
            return decision
        # Otherwise min 0 means one replica to the autoscaler, as to the configuration search.
        cfg = AutoscalerConfig(capacity=st.capacity, min_replicas=max(1, rt.dep.min_replicas),
                               max_replicas=rt.dep.max_replicas, startup_s=opts.startup_s,
                               interval_s=opts.interval_s, slo_objective=objective,
                               min_finished=opts.min_finished)
        wanted, st.policy = decide(obs, cfg, st.policy, now)
        scaled_back = await self._verify(name, rt, st, objective, now)
        current = rt.desired  # after a scale-back, the count it restored: the policy's want is held against it
        decision = self._held(rt, st, wanted, current, now, decided_for=obs.replicas, scaled_back=scaled_back)
        action = action_of(decision, current)
        key = (name, action, decision.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        change = (action, current, decision.desired_replicas, decision.reason)
        # Only a recommendation still waiting for a person repeats: in auto mode every change wanted is one applied,
        # and once a person applied or dismissed it, wanting it again is a new decision.
        repeat = opts.mode == "recommend" and change == st.last_change and await self._still_proposed(
            name, current, decision.desired_replicas)
        if (action != "hold" and not repeat) or (action == "hold" and decision.reason != st.last_reason):
            await asyncio.to_thread(
                self.store.record_action, None, DECISION_KIND, actor=ACTOR, reason=decision.reason,
                message=f"{name}: {current} -> {decision.desired_replicas} replicas ({decision.reason})",
                before={"replicas": current}, after={"replicas": decision.desired_replicas},
                attributes={"deployment": name, "policy": "controlplane", "mode": opts.mode,
                            "inputs": _jsonable(decision.inputs), "capacity_source": st.capacity_note},
                ts_unix_s=now)
            st.last_reason = decision.reason
            st.last_change = change if action != "hold" else None
        if scaled_back or decision is not wanted:
            return decision  # scaled back this round (the policy decided on the old count), or held
        if opts.mode != "off":
            await self._recommend(name, rt, st, obs, decision, objective, now)
        return decision

    @staticmethod
    def _held(rt: Any, st: _DeploymentState, decision: Decision, current: int, now: float, *, decided_for: int,
              scaled_back: bool) -> Decision:
        """The policy's decision, or a hold of the current count with the loop's own reason (the policy's
        proposal kept in the inputs), so the audit log never shows a change that was not going to be made."""
        hold = None
        if current != decided_for:  # the policy decided on a count this round changed (a scale-back, a person)
            hold = HOLD_AFTER_REVERSAL if scaled_back else HOLD_COUNT_CHANGED
        elif getattr(rt, "rollout", None) is not None and not rt.rollout.done():
            hold = HOLD_ROLLING if decision.desired_replicas != current else None  # the supervisor would refuse
        elif decision.desired_replicas < current and now < st.no_down_until:
            hold = HOLD_AFTER_REVERSAL  # a scale-down was rolled back recently: do not flap back to it
        elif decision.desired_replicas < current and st.applied is not None and \
                st.applied.to_replicas < st.applied.from_replicas:
            hold = HOLD_JUDGING  # one scale-down at a time: the last one is still being judged
        if hold is None:
            return decision
        return Decision(current, hold, {**decision.inputs, "proposed_replicas": decision.desired_replicas,
                                        "proposed_reason": decision.reason})

    def _recent_requests(self, replicas: set[str], since: float, until: float) -> list[dict[str, Any]]:
        return recent_requests(self.store, replicas, since, until)

    def _latest_samples(self, ready: Sequence[str], now: float) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for r in ready:
            got = self.store.engine_samples(since_unix_s=now - 3 * self.options.stale_s,
                                            until_unix_s=now + SAMPLE_SKEW_S, replica=r, limit=1)
            out[r] = got[0] if got else None
        return out

    async def _maybe_calibrate(self, name: str, rt: Any, st: _DeploymentState, ready: Sequence[str],
                               now: float) -> None:
        if self.calibrate is None or not ready:
            return
        if st.calibrated_at is not None and now - st.calibrated_at < self.options.recalibrate_s:
            return
        st.calibrated_at = now
        try:
            got = await asyncio.to_thread(self.calibrate, rt, ready, now)
        except Exception as exc:  # noqa: BLE001 - keep the last capacity; say why in the decision record
            log.warning("tuner: calibration of %s failed: %s", name, exc)
            st.capacity_note = f"calibration failed: {exc}"[:300] if st.capacity is None else st.capacity_note
            return
        if got is not None:
            st.capacity, st.capacity_note = got

    async def _still_proposed(self, name: str, current: int, desired: int) -> bool:
        """Whether an open scale recommendation from `current` to `desired` replicas waits for a person."""
        open_recs = await asyncio.to_thread(self.recs.list, deployment=name, status=OPEN, limit=10)
        return any(r["kind"] == "scale" and int(r["proposed"]["replicas"]) == desired
                   and (r.get("current") or {}).get("replicas") in (None, current) for r in open_recs)

    async def _recommend(self, name: str, rt: Any, st: _DeploymentState, obs: Observation, decision: Decision,
                         objective: float, now: float) -> None:
        current = rt.desired
        if current != obs.replicas:
            return  # a person changed the count while this round read the store: the next round decides on it
        open_recs = await asyncio.to_thread(self.recs.list, deployment=name, status=OPEN, limit=10)
        open_scale = [r for r in open_recs if r["kind"] == "scale"]
        for r in open_scale:  # made for another count: the API refuses it as stale, so it would stay open
            was = (r.get("current") or {}).get("replicas")
            if was is not None and was != current:
                with contextlib.suppress(RecommendationError):  # a person decided it meanwhile: theirs stands
                    await asyncio.to_thread(self.recs.decide, r["id"], SUPERSEDED, by=ACTOR, outcome={
                        "why": f"made for {was} replica(s); the deployment has {current} now"})
        open_scale = [r for r in open_scale if (r.get("current") or {}).get("replicas") in (None, current)]
        engine = rt.dep.engine.as_dict() if hasattr(rt.dep.engine, "as_dict") else {}
        for r in list(open_scale):  # too old, or made for other engine args: the API refuses it, so it would stay
            why = too_old(r, now) or (f"made for {changed}" if (changed := engine_changed_since(r, engine)) else None)
            if why:
                open_scale.remove(r)
                with contextlib.suppress(RecommendationError):
                    await asyncio.to_thread(self.recs.decide, r["id"], SUPERSEDED, by=ACTOR, outcome={"why": why})
        if decision.desired_replicas == current:
            for r in open_scale:  # nothing to change any more: what was proposed is stale
                if int(r["proposed"]["replicas"]) != current:
                    try:
                        await asyncio.to_thread(self.recs.decide, r["id"], SUPERSEDED, by=ACTOR, outcome={
                            "why": f"no longer needed: the autoscaler holds at {current}"})
                    except RecommendationError:
                        pass  # a person applied or dismissed it meanwhile: theirs stands
            return
        if any(int(r["proposed"]["replicas"]) == decision.desired_replicas for r in open_scale):
            return  # already proposed; waiting for a person
        p = proposal_for(name, decision, current=current, engine=engine, obs=obs, capacity=st.capacity,
                         capacity_note=st.capacity_note, objective=objective,
                         price_per_replica_hour_usd=float(rt.dep.price_per_replica_hour_usd))
        mode = "auto" if self.options.mode == "auto" else "recommend"
        rid = await asyncio.to_thread(self.recs.add, p, mode)  # type: ignore[arg-type]
        if mode != "auto":
            return
        before = self._counts_since(st, now - self.options.lookback_s)
        try:
            await asyncio.to_thread(self.recs.claim, rid, by=ACTOR)
        except RecommendationError:
            return  # a person applied or dismissed it between its storing and this claim: theirs stands
        if rt.desired != obs.replicas:
            # Changed while this round read the store (a person, through the API): the decision was made for
            # another count, and its N-1 check and rollback would be wrong for this one. Nothing awaits between
            # this check and the supervisor setting the new count.
            await asyncio.to_thread(self.recs.decide, rid, "failed", by=ACTOR, expect=(APPLIED,), outcome={
                "error": f"the count changed from {obs.replicas} to {rt.desired} while this was decided; "
                         "the next round decides again"})
            return
        try:
            result = await self.fleet.scale(name, decision.desired_replicas, actor=ACTOR,
                                            reason=f"recommendation_{rid}")
        except Exception as exc:  # noqa: BLE001 - the supervisor refused: the recommendation failed, say why
            await asyncio.to_thread(self.recs.decide, rid, "failed", by=ACTOR, outcome={"error": str(exc)},
                                    expect=(APPLIED,))
            return
        await asyncio.to_thread(self.recs.decide, rid, APPLIED, by=ACTOR, expect=(APPLIED,),
                                outcome={"applied": _jsonable(result), "before": {"good": before[0],
                                                                                   "known": before[1]}})
        old = st.applied
        if old is not None:  # a change still being judged is closed by this one
            reversed_down = old.to_replicas < old.from_replicas and decision.desired_replicas > old.to_replicas
            if reversed_down:
                self._hold_down_after_reversal(st, now)
            await asyncio.to_thread(
                self.recs.decide, old.rid, ROLLED_BACK if reversed_down else APPLIED, by=ACTOR, expect=(APPLIED,),
                outcome={"verdict": ROLL_BACK if reversed_down else "superseded", "by": f"recommendation_{rid}",
                         "why": decision.reason, "judged_unix_s": now})
        st.applied = Applied(rid, now, current, decision.desired_replicas, before)

    def _counts_since(self, st: _DeploymentState, since: float, until: float = math.inf) -> tuple[float, int]:
        sel = [(g, k) for t, g, k in st.history if since < t <= until]
        return sum(g for g, _ in sel), sum(k for _, k in sel)

    async def _verify(self, name: str, rt: Any, st: _DeploymentState, objective: float, now: float) -> bool:
        """An auto-applied change, once in effect, is judged on the requests that finished since: a scale-down
        that made the SLO worse is scaled back; anything else is kept, with the before/after counts stored."""
        a = st.applied
        if a is None:
            return False
        give_up = self.options.startup_s * 3 + self.options.verify_s
        if a.effective_at is None:
            ready = sum(1 for m in rt.members.values() if m.state == "ready" and not getattr(m, "candidate", False))
            if ready == a.to_replicas or (a.to_replicas > a.from_replicas and ready >= a.to_replicas):
                a.effective_at = now
            elif now - a.at > give_up:
                st.applied = None
                await asyncio.to_thread(self.recs.decide, a.rid, APPLIED, by=ACTOR, expect=(APPLIED,), outcome={
                    "verdict": "not_in_effect", "why": f"{ready} ready of {a.to_replicas} after {now - a.at:.0f} s"})
            return False
        if now - a.effective_at < self.options.verify_s:
            return False  # judge on verify_s of requests, not on the backlog the change has just started to drain
        after = self._counts_since(st, a.effective_at)
        v = verdict(a.before, after, objective=objective, min_requests=self.options.min_finished)
        if v == UNDECIDED and now - a.effective_at < give_up:
            return False
        st.applied = None
        outcome: dict[str, Any] = {"verdict": v, "after": {"good": after[0], "known": after[1]},
                                   "in_effect_unix_s": a.effective_at, "judged_unix_s": now}
        if a.to_replicas > a.from_replicas and v == ROLL_BACK:
            # Fewer replicas would not serve better: a scale-up is kept, and the worse SLO is put on record.
            outcome |= {"verdict": KEPT, "slo_worse_after": True}
        if v == ROLL_BACK and a.to_replicas < a.from_replicas and rt.desired not in (a.to_replicas, a.from_replicas):
            outcome |= {"verdict": "superseded", "why": f"the count was changed to {rt.desired} meanwhile; "
                                                         "not scaled back"}
        elif v == ROLL_BACK and a.to_replicas < a.from_replicas:
            try:
                if rt.desired != a.from_replicas:  # a failed attempt may have set the count before it raised
                    await self.fleet.scale(name, a.from_replicas, actor=ACTOR,
                                           reason=f"rollback_recommendation_{a.rid}")
            except Exception as exc:  # noqa: BLE001 - retried next round for as long as a change may take
                a.rollback_failed_at = a.rollback_failed_at or now
                log.warning("tuner: scaling %s back to %d replicas failed: %s", name, a.from_replicas, exc)
                await asyncio.to_thread(
                    self.store.record_action, None, DECISION_KIND, actor=ACTOR, reason="rollback_failed",
                    message=f"{name}: scaling back to {a.from_replicas} failed: {exc}"[:500],
                    before={"replicas": rt.desired}, after={"replicas": a.from_replicas},
                    attributes={"deployment": name, "recommendation": a.rid}, ts_unix_s=now)
                if now - a.rollback_failed_at < give_up:
                    st.applied = a  # judged again next round, and scaled back if still worse
                    return True
                outcome |= {"verdict": "rollback_failed", "rollback_error": str(exc)[:500]}
                await asyncio.to_thread(self.recs.decide, a.rid, APPLIED, by=ACTOR, outcome=outcome,
                                        expect=(APPLIED,))
                self._hold_down_after_reversal(st, now)
                return True
            await asyncio.to_thread(self.recs.decide, a.rid, ROLLED_BACK, by=ACTOR, outcome=outcome,
                                    expect=(APPLIED,))
            self._hold_down_after_reversal(st, now)
            return True
        if a.to_replicas < a.from_replicas and v == KEPT:
            st.down_hold_s = None  # a scale-down that held: the model's spare capacity was real
        await asyncio.to_thread(self.recs.decide, a.rid, APPLIED, by=ACTOR, outcome=outcome, expect=(APPLIED,))
        return False

    def _hold_down_after_reversal(self, st: _DeploymentState, now: float) -> None:
        """A scale-down was reversed (rolled back, or undone by SLO risk): the capacity model that proposed it was
        optimistic, and it will propose it again. Hold scale-downs off, twice as long after each reversal in a
        row (3 x verify_s first, at most MAX_DOWN_HOLD_S), until one holds."""
        first = 3 * self.options.verify_s
        if st.down_hold_s is not None and now - st.no_down_until > MAX_DOWN_HOLD_S:
            st.down_hold_s = None  # the last reversal is long past: not "in a row"
        st.down_hold_s = first if st.down_hold_s is None else min(2 * st.down_hold_s, max(first, MAX_DOWN_HOLD_S))
        st.no_down_until = max(st.no_down_until, now + st.down_hold_s)

    # --- metrics --------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        dec = CounterMetricFamily(names.PLANE_TUNER_DECISIONS, "Autoscaler decisions by action and reason code.",
                                  labels=[names.LABEL_DEPLOYMENT, names.LABEL_ACTION, names.LABEL_REASON])
        for (dep, action, reason), n in sorted(self.decisions.items()):
            dec.add_metric([dep, action, reason], n)
        yield dec
        cap = GaugeMetricFamily(names.PLANE_TUNER_CAPACITY_RPS,
                                "Predicted request rate the deployment's desired replicas sustain within its SLOs "
                                "(absent while not calibrated).", labels=["deployment"])
        seen = GaugeMetricFamily(names.PLANE_TUNER_OBSERVED_RPS, "Request rate routed to the deployment over "
                                 "the last tuner interval (absent while unknown).", labels=["deployment"])
        for name, st in sorted(self.state.items()):
            rt = self.fleet.runtimes.get(name)
            if st.capacity is not None and rt is not None:
                cap.add_metric([name], st.capacity.total(rt.desired))
            obs = self.last_obs.get(name)
            if obs is not None and obs.arrival_rate_rps is not None:
                seen.add_metric([name], obs.arrival_rate_rps)
        yield cap
        yield seen

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif isinstance(v, Mapping):
            out[k] = _jsonable(v)
        elif isinstance(v, int | float | str | bool | list) or v is None:
            out[k] = v
        else:
            out[k] = str(v)
    return out


