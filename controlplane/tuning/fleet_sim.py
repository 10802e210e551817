"""Closed-loop fleet simulation: a scaling policy decides every interval while the simulator serves the load.

Replicas are the simulator's event-driven engines, added and removed as the policy asks: a new replica costs
GPU time from the moment it is asked for and takes `startup_s` before the router sends it anything; a removed
replica stops receiving requests and finishes the ones it holds (drain), costing GPU time until its last one
ends; a replica still starting when the count drops is cancelled at once. The router is least-outstanding
over ready replicas, as in `simulator.simulate`. Each interval the policy gets an `Observation` built like the
plane builds it: the router's arrival rate, each ready replica's scrape (running, waiting, KV usage), and
latency/SLO figures of the requests that finished in the interval; `unknown_probability` drops readings (a
failed scrape is None, never zero). GPU-hours run from 0 to the last arrival.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from controlplane.tuning.autoscaler import DecisionRecord, Observation, Policy, ReplicaReading
from controlplane.tuning.capacity import Objective, Prediction, good_mask, judge
from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator import SimResult, entry_time
from controlplane.tuning.simulator_engine import FastEngine
from controlplane.tuning.simulator_parts import Book
from controlplane.tuning.workload import Workload


@dataclass(frozen=True)
class FleetSimConfig:
    interval_s: float = 15.0
    startup_s: float = 90.0  # asked for -> ready (GPU replica: image pull, weights load, CUDA graphs)
    initial_replicas: int = 1  # ready at time 0
    min_replicas: int = 1
    max_replicas: int = 64
    unknown_probability: float = 0.0  # per interval, per reading: the scrape (or the router's count) failed
    seed: int = 0
    deployment: str = "sim"
    latency_lookback_s: float = 600.0  # how far back to look for requests that finished in an interval

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.startup_s < 0:
            raise ValueError(f"fleet sim: interval_s must be > 0 and startup_s >= 0, got {self.interval_s} and "
                             f"{self.startup_s}")
        if not 1 <= self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"fleet sim: need 1 <= min_replicas ({self.min_replicas}) <= initial_replicas "
                             f"({self.initial_replicas}) <= max_replicas ({self.max_replicas})")
        if not 0 <= self.unknown_probability <= 1:
            raise ValueError(f"fleet sim: unknown_probability must be in [0, 1], got {self.unknown_probability}")


@dataclass(frozen=True)
class ReplicaSpan:
    start_s: float
    ready_s: float
    drain_s: float | None  # asked to stop (None: still serving at the end)
    end_s: float | None  # last request done, or cancelled while starting (None: alive at the end)


@dataclass(frozen=True)
class Tick:
    t_s: float
    current: int  # ready + starting before the decision
    desired: int
    ready: int
    draining: int
    reason: str
    rate_rps: float | None


@dataclass(frozen=True, eq=False)
class FleetRun:
    policy: str
    result: SimResult
    ticks: tuple[Tick, ...]
    decisions: tuple[DecisionRecord, ...]
    spans: tuple[ReplicaSpan, ...]
    horizon_s: float
    gpus_per_replica: int

    @property
    def gpu_hours(self) -> float:
        total = 0.0
        for s in self.spans:
            end = self.horizon_s if s.end_s is None else min(s.end_s, self.horizon_s)
            total += max(0.0, end - s.start_s)
        return total * self.gpus_per_replica / 3600.0

    def predictions(self, objectives: Sequence[Objective]) -> tuple[Prediction, ...]:
        return judge(self.result, objectives)

    def good_ratio(self, objectives: Sequence[Objective]) -> float:
        """Share of all requests that met every objective (goodput / total)."""
        ok = np.ones(len(self.result.workload), dtype=bool)
        for o in objectives:
            ok &= good_mask(self.result, o)
        return float(ok.mean()) if len(ok) else math.nan


class _Member:
    __slots__ = ("engine", "span_start", "ready_s", "drain_s", "end_s", "name", "last_entry")

    def __init__(self, engine: FastEngine, start: float, ready: float, name: str) -> None:
        self.engine, self.span_start, self.ready_s, self.name = engine, start, ready, name
        self.drain_s: float | None = None
        self.end_s: float | None = None
        self.last_entry = -math.inf  # its API server takes requests in arrival order (simulator.entry_time)


class _Fleet:
    """The mutable half of a run: members, routing, scaling. Kept apart from the loop for readability."""

    def __init__(self, replica: ReplicaModel, book: Book, cfg: FleetSimConfig) -> None:
        self.replica, self.book, self.cfg = replica, book, cfg
        self.members: list[_Member] = []
        self.paths = np.zeros(len(book.t_first), dtype=np.float64)  # each routed request's API path
        for _ in range(cfg.initial_replicas):
            self.add(0.0, ready=0.0)

    def add(self, t: float, *, ready: float) -> None:
        i = len(self.members)
        self.members.append(_Member(FastEngine(self.replica, self.book, i, None), t, ready, f"r{i}"))

    def live(self) -> list[_Member]:
        return [m for m in self.members if m.end_s is None]

    def counted(self) -> list[_Member]:
        """Ready or starting, not draining: the count the supervisor holds."""
        return [m for m in self.members if m.end_s is None and m.drain_s is None]

    def routable(self, t: float) -> list[_Member]:
        return [m for m in self.members if m.end_s is None and m.drain_s is None and m.ready_s <= t]

    def route(self, r: int, t: float) -> int:
        cands = self.routable(t)
        if not cands:  # never happens while the last ready replica is never drained; refuse loudly if it does
            raise RuntimeError(f"no ready replica at t={t:.1f} s")
        best, best_load = cands[0], -1
        for m in cands:
            m.engine.advance(t, len(cands) == 1)
            load = m.engine.outstanding_at(t)
            if best_load < 0 or load < best_load:
                best, best_load = m, load
        entry = best.last_entry = entry_time(self.replica, t, best_load, best.last_entry)
        best.engine.advance(entry, True)
        if not best.engine.enqueue(r, entry):
            return -1
        self.paths[r] = entry - t
        return best.engine.index

    def settle(self, t: float) -> None:
        """Advance everyone to t; a draining replica with nothing left ends at its last step."""
        for m in self.live():
            m.engine.advance(t, True)
            if m.drain_s is not None and not m.engine.busy():
                m.end_s = max(m.drain_s, m.engine.clock)

    def scale(self, desired: int, t: float) -> None:
        counted = self.counted()
        if desired > len(counted):
            for _ in range(desired - len(counted)):
                self.add(t, ready=t + self.cfg.startup_s)
            return
        surplus = len(counted) - desired
        for m in sorted((m for m in counted if m.ready_s > t), key=lambda m: -m.span_start):
            if surplus == 0:
                return
            m.drain_s = m.end_s = t  # cancelled while starting
            surplus -= 1
        ready = sorted((m for m in counted if m.ready_s <= t),
                       key=lambda m: (m.engine.outstanding_at(t), -m.span_start))
        for m in ready[:max(0, min(surplus, len(ready) - 1))]:
            m.drain_s = t
            if not m.engine.busy():
                m.end_s = t


def _latency(book: Book, wl: Workload, lo: int, hi: int, t0: float, t1: float,
             objectives: Sequence[Objective]) -> tuple[float | None, float | None, float | None, int]:
    """p99 TTFT, p99 TPOT and the good ratio of requests (indices lo..hi) that finished in (t0, t1]."""
    if hi <= lo:
        return None, None, None, 0
    sl = slice(lo, hi)
    fin = np.asarray(book.t_fin[sl], dtype=np.float64)
    done = (fin > t0) & (fin <= t1)
    count = int(done.sum())
    if not count:
        return None, None, None, 0
    part = Workload(wl.arrival_s[sl], wl.prompt_tokens[sl], wl.output_tokens[sl])
    res = SimResult(part, np.zeros(hi - lo, dtype=np.int64), np.asarray(book.t_sched[sl], dtype=np.float64),
                    np.asarray(book.t_first[sl], dtype=np.float64), fin, np.zeros(hi - lo, dtype=np.int64), ())
    ttft = res.ttft_s[done]
    tpot = res.tpot_s[done]
    tpot = tpot[~np.isnan(tpot)]
    ok = np.ones(hi - lo, dtype=bool)
    for o in objectives:
        ok &= good_mask(res, o)
    return (float(np.quantile(ttft, 0.99)), float(np.quantile(tpot, 0.99)) if len(tpot) else None,
            float(ok[done].mean()), count)


def run_fleet(workload: Workload, replica: ReplicaModel, policy: Policy[Any], objectives: Sequence[Objective],
              config: FleetSimConfig | None = None) -> FleetRun:
    """Replay `workload` through a fleet that `policy` sizes every `interval_s`."""
    cfg = config or FleetSimConfig()
    if not len(workload):
        raise ValueError(f"workload {workload.name!r} is empty")
    rng = np.random.default_rng(cfg.seed)
    book = Book(workload.prompt_tokens.tolist(), workload.output_tokens.tolist())
    fleet = _Fleet(replica, book, cfg)
    routed = np.full(len(workload), -1, dtype=np.int64)
    state = policy.initial_state()
    ticks: list[Tick] = []
    records: list[DecisionRecord] = []
    arrivals = workload.arrival_s.tolist()
    horizon = float(arrivals[-1])
    next_tick = cfg.interval_s
    window_start = 0  # first arrival of the current interval
    lookback = 0  # first arrival within latency_lookback_s
    i = 0

    def tick(t: float) -> None:
        nonlocal state, window_start, lookback
        fleet.settle(t)
        counted = fleet.counted()
        ready = fleet.routable(t)
        readings = []
        for m in ready:
            if rng.random() < cfg.unknown_probability:
                readings.append(ReplicaReading(m.name))
            else:
                run, wait, kv = m.engine.snapshot()
                readings.append(ReplicaReading(m.name, run, wait, kv))
        n_new = i - window_start
        rate = None if rng.random() < cfg.unknown_probability else n_new / cfg.interval_s
        while lookback < i and arrivals[lookback] < t - cfg.latency_lookback_s:
            lookback += 1
        ttft, tpot, good, finished = _latency(book, workload, lookback, i, t - cfg.interval_s, t, objectives)
        sl = slice(window_start, i)
        obs = Observation(
            deployment=cfg.deployment, replicas=len(counted), ready_replicas=len(ready), arrival_rate_rps=rate,
            readings=tuple(readings),
            mean_prompt_tokens=float(workload.prompt_tokens[sl].mean()) if n_new else None,
            mean_output_tokens=float(workload.output_tokens[sl].mean()) if n_new else None,
            ttft_p99_s=ttft, tpot_p99_s=tpot, slo_good_ratio=good, finished=finished)
        decision, state = policy.decide(obs, state, t)
        desired = min(max(decision.desired_replicas, cfg.min_replicas), cfg.max_replicas)
        draining = sum(1 for m in fleet.live() if m.drain_s is not None)
        ticks.append(Tick(t, len(counted), desired, len(ready), draining, decision.reason, rate))
        records.append(DecisionRecord(t, cfg.deployment, policy.name, len(counted), desired, decision.reason,
                                      decision.inputs))
        fleet.scale(desired, t)
        window_start = i

    for i, t in enumerate(arrivals):
        while next_tick <= t:
            tick(next_tick)
            next_tick += cfg.interval_s
        routed[i] = fleet.route(i, t)
    i = len(arrivals)
    for m in fleet.members:
        m.engine.advance(math.inf, True)
        if m.drain_s is not None and m.end_s is None:
            m.end_s = max(m.drain_s, m.engine.clock)
    result = SimResult(workload=workload, replica=routed, scheduled_s=np.asarray(book.t_sched),
                       first_token_s=np.asarray(book.t_first), finished_s=np.asarray(book.t_fin),
                       preemptions=np.asarray(book.preempt, dtype=np.int64), series=(),
                       api_path_s=fleet.paths if replica.api_path_s or replica.api_path_per_request_s else None)
    spans = tuple(ReplicaSpan(m.span_start, m.ready_s, m.drain_s, m.end_s) for m in fleet.members)
    return FleetRun(policy.name, result, tuple(ticks), tuple(records), spans, horizon, replica.gpus)
