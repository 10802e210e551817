"""Per-replica goodput at the SLO: the highest request rate at which simulated replicas still meet every SLO.

This one number per configuration is what the search ranks (per dollar), what the autoscaler divides the
forecast load by, and what the oracle and the Dynamo-style baseline plan with. It is measured, not
derived: the workload's own requests are replayed at a chosen rate (arrival times scaled, so bursts keep
their shape and every probe sees the same requests), and the rate is bisected between "meets every SLO"
and "does not". SLOs are the slo package's domain values; the simulator models no errors, so an
error-rate SLO cannot be predicted here and is set aside with a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from controlplane.slo.spec import LatencyTarget, Slo
from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator import SimResult, simulate
from controlplane.tuning.workload import FloatArray, Workload

Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class Objective:
    """One SLO as the simulator judges it: a request is good when all `targets` hold; the share of good
    requests must reach `objective`."""

    name: str
    targets: tuple[LatencyTarget, ...]
    objective: float

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"objective {self.name!r} has no latency target")
        if not 0 < self.objective < 1:
            raise ValueError(f"objective {self.name!r}: {self.objective} must lie strictly between 0 and 1")


def objectives_from_slos(slos: Iterable[Slo]) -> tuple[tuple[Objective, ...], tuple[str, ...]]:
    """The SLOs the simulator can predict, and a note for each it cannot (error_rate)."""
    kept: list[Objective] = []
    notes: list[str] = []
    for s in slos:
        if not s.targets:
            notes.append(f"SLO {s.name!r} ({s.sli}) is not predicted: the simulator models latency, not errors")
            continue
        kept.append(Objective(s.name, s.targets, s.objective))
    return tuple(kept), tuple(notes)


def _values(result: SimResult, sli: str) -> FloatArray:
    if sli == "ttft":
        return result.ttft_s
    if sli in ("tpot", "itl"):  # itl: the per-request mean inter-token latency, which is TPOT here
        return result.tpot_s
    if sli == "e2e":
        return result.e2e_s
    if sli == "queue":
        return result.queue_s
    raise ValueError(f"unknown latency SLI {sli!r}; allowed: ttft, tpot, itl, e2e, queue")


def good_mask(result: SimResult, objective: Objective) -> Mask:
    """Requests that meet every target. Rejected or unfinished requests are bad; a one-token output has no
    inter-token time and is judged on its other targets."""
    ok = result.completed.copy()
    for t in objective.targets:
        v = _values(result, t.sli)
        with np.errstate(invalid="ignore"):
            ok &= (v <= t.threshold_s) | (np.isnan(v) & (t.sli in ("tpot", "itl")))
    return ok


@dataclass(frozen=True)
class Prediction:
    """Predicted attainment of one SLO, and how far it is from failing."""

    name: str
    objective: float
    attainment: float | None  # None: no request to judge
    margin: float | None  # attainment - objective (positive: holds)
    # Single-target SLOs: the SLI's value at the objective quantile, and the threshold it must stay under.
    quantile_s: float | None = None
    threshold_s: float | None = None

    @property
    def holds(self) -> bool:
        return self.margin is not None and self.margin >= 0

    @property
    def headroom_ratio(self) -> float | None:
        """1 - quantile/threshold: 0.2 means the tail could grow 25% before the SLO breaks."""
        if self.quantile_s is None or self.threshold_s is None or not math.isfinite(self.quantile_s):
            return None
        return 1.0 - self.quantile_s / self.threshold_s


def judge(result: SimResult, objectives: Sequence[Objective]) -> tuple[Prediction, ...]:
    out = []
    n = len(result.workload)
    for o in objectives:
        att = float(good_mask(result, o).mean()) if n else None
        q = thr = None
        if len(o.targets) == 1 and n:
            t = o.targets[0]
            v = _values(result, t.sli)
            if t.sli in ("tpot", "itl"):
                v = np.where(np.isnan(v) & result.completed, 0.0, v)
            v = np.where(np.isnan(v), np.inf, v)  # unfinished: slower than any threshold
            q, thr = float(np.quantile(v, o.objective)), t.threshold_s
        out.append(Prediction(o.name, o.objective, att, None if att is None else att - o.objective, q, thr))
    return tuple(out)


def all_hold(predictions: Iterable[Prediction]) -> bool:
    return all(p.holds for p in predictions)


def at_rate(workload: Workload, rps: float, n: int | None = None) -> Workload:
    """The first `n` requests replayed at a mean rate of `rps`: arrival times scaled, lengths kept."""
    if rps <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rps}")
    wl = workload if n is None or n >= len(workload) else workload.head(n)
    if len(wl) < 2:
        raise ValueError(f"workload {workload.name!r} needs at least 2 requests to set a rate, has {len(wl)}")
    t = wl.arrival_s - wl.arrival_s[0]
    span = float(t[-1])
    scale = 1.0 if span <= 0 else (len(wl) - 1) / span / rps
    times = t * scale if span > 0 else np.arange(len(wl), dtype=np.float64) / rps
    return Workload(times, wl.prompt_tokens, wl.output_tokens, f"{workload.name}@{rps:.3g}rps")


@dataclass(frozen=True)
class Probe:
    rps: float  # offered to the whole group of replicas
    passed: bool
    predictions: tuple[Prediction, ...]
    in_flight_per_replica: float  # mean requests in the engine (running + waiting), by Little's law


@dataclass(frozen=True)
class Capacity:
    replicas: int
    rps: float  # highest rate found that meets every SLO (0: none does); for all `replicas` together
    saturation_rps: float  # completions per second when the group is flooded: an upper bound on `rps`
    probes: tuple[Probe, ...]
    requests_simulated: int

    @property
    def per_replica_rps(self) -> float:
        return self.rps / self.replicas

    @property
    def at_capacity(self) -> Probe | None:
        passing = [p for p in self.probes if p.passed and p.rps == self.rps]
        return passing[0] if passing else None

    @property
    def simulations(self) -> int:
        return len(self.probes) + 1


class CapacityProbe:
    """Bisects the rate at which `replicas` copies of a replica meet every SLO; each rate is simulated once.

    `passes(rps)` answers one question cheaply (the search asks "could this configuration beat the best
    so far?" before paying for a full bisection)."""

    def __init__(self, replica: ReplicaModel, workload: Workload, objectives: Sequence[Objective], *,
                 replicas: int = 1, requests: int = 2000) -> None:
        if not objectives:
            raise ValueError("capacity at the SLO needs at least one latency objective")
        if replicas < 1 or requests < 2:
            raise ValueError(f"replicas must be >= 1 and requests >= 2, got {replicas} and {requests}")
        self.replica, self.objectives, self.replicas = replica, tuple(objectives), replicas
        self.base = workload.head(min(len(workload), requests * replicas))
        self.probes: dict[float, Probe] = {}
        self.requests_simulated = 0
        self._saturation: float | None = None

    def _run(self, rps: float) -> SimResult:
        wl = at_rate(self.base, rps)
        self.requests_simulated += len(wl)
        return simulate(wl, [self.replica] * self.replicas, sample_interval_s=None)

    def saturation_rps(self) -> float:
        """Completions per second with every request arriving within a moment: the group's throughput."""
        if self._saturation is None:
            res = self._run(1e6)
            done = int(res.completed.sum())
            self._saturation = done / res.makespan_s if res.makespan_s > 0 else 0.0
        return self._saturation

    def probe(self, rps: float) -> Probe:
        if rps not in self.probes:
            res = self._run(rps)
            preds = judge(res, self.objectives)
            e2e = res.e2e_s[res.completed]
            in_flight = rps * float(e2e.mean()) / self.replicas if len(e2e) else math.inf
            self.probes[rps] = Probe(rps, all_hold(preds), preds, in_flight)
        return self.probes[rps]

    @property
    def simulations(self) -> int:
        return len(self.probes) + (self._saturation is not None)

    def passes(self, rps: float) -> bool:
        return self.probe(rps).passed

    def capacity(self, *, rel_tol: float = 0.02, known_pass_rps: float | None = None) -> Capacity:
        """Bisect (geometrically) until the passing and failing rates are within `rel_tol` of each other."""
        if not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol}")
        sat = self.saturation_rps()
        # Below the throughput, never at it: a finite probe past saturation can still pass (its backlog has not
        # grown enough yet), but such a load queues without bound in steady state.
        hi = sat * (1.0 - rel_tol)
        if sat <= 0:
            return self._result(0.0)
        lo = known_pass_rps if known_pass_rps is not None and known_pass_rps < hi else None
        if lo is None:
            guess = 0.6 * sat
            if self.passes(guess):
                lo = guess
            else:
                hi, lo = guess, None
                floor = sat * 0.01
                trial = guess / 4
                while trial >= floor:
                    if self.passes(trial):
                        lo = trial
                        break
                    hi, trial = trial, trial / 4
                if lo is None:
                    return self._result(0.0)  # even a nearly idle replica misses the SLO
        if self.passes(hi):
            return self._result(hi)
        while hi / lo - 1 > rel_tol:
            mid = math.sqrt(lo * hi)
            if self.passes(mid):
                lo = mid
            else:
                hi = mid
        return self._result(lo)

    def _result(self, rps: float) -> Capacity:
        return Capacity(self.replicas, rps, self.saturation_rps(), tuple(sorted(self.probes.values(),
                                                                                key=lambda p: p.rps)),
                        self.requests_simulated)


def capacity_at_slo(replica: ReplicaModel, workload: Workload, objectives: Sequence[Objective], *,
                    replicas: int = 1, requests: int = 2000, rel_tol: float = 0.02) -> Capacity:
    return CapacityProbe(replica, workload, objectives, replicas=replicas, requests=requests).capacity(rel_tol=rel_tol)


@dataclass(frozen=True)
class FleetCapacity:
    """Per-replica goodput at the SLO as a function of fleet size: a least-outstanding router pools the
    queueing of N replicas, so N of them meet the SLO at more than N times one replica's rate.
    Measured at a few sizes; interpolated in log2(N) between them, flat beyond the largest."""

    sizes: tuple[int, ...]
    per_replica_rps: tuple[float, ...]
    in_flight_per_replica: float | None = None  # at one replica's capacity: the concurrency it sustains

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.per_replica_rps):
            raise ValueError("FleetCapacity needs one per-replica rate per size, at least one size")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"sizes must be ascending, distinct and >= 1, got {self.sizes}")
        if any(r <= 0 or not math.isfinite(r) for r in self.per_replica_rps):
            raise ValueError(f"per-replica capacities must be finite and > 0, got {self.per_replica_rps}")

    def per_replica(self, n: int) -> float:
        if n <= self.sizes[0]:
            return self.per_replica_rps[0]
        if n >= self.sizes[-1]:
            return self.per_replica_rps[-1]
        x = math.log2(n)
        xs = [math.log2(s) for s in self.sizes]
        return float(np.interp(x, xs, self.per_replica_rps))

    def total(self, n: int) -> float:
        return n * self.per_replica(n) if n > 0 else 0.0

    def replicas_for(self, load_rps: float, utilization: float = 1.0, *, limit: int = 10_000) -> int:
        """The fewest replicas whose capacity, derated to `utilization`, covers the load (0 for no load)."""
        if not 0 < utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization}")
        if load_rps <= 0:
            return 0
        n = max(1, math.ceil(load_rps / (self.per_replica_rps[-1] * utilization)))
        while n > 1 and self.total(n - 1) * utilization >= load_rps:
            n -= 1
        while self.total(n) * utilization < load_rps and n < limit:
            n += 1
        return n


def measure_fleet_capacity(replica: ReplicaModel, workload: Workload, objectives: Sequence[Objective], *,
                           sizes: Sequence[int] = (1, 2, 4, 8), requests: int = 2000, rel_tol: float = 0.02,
                           progress: Callable[[int, Capacity], None] | None = None) -> FleetCapacity:
    """Bisect the capacity at each fleet size. Raises ValueError when even one idle replica misses the SLO."""
    rates: list[float] = []
    in_flight: float | None = None
    for n in sizes:
        cap = capacity_at_slo(replica, workload, objectives, replicas=n, requests=requests, rel_tol=rel_tol)
        if cap.rps <= 0:
            raise ValueError(f"{n} replica(s) of {replica.name} meet the SLOs at no rate: even a nearly idle "
                             "replica misses them (thresholds below the model's unloaded latency?)")
        if progress:
            progress(n, cap)
        if in_flight is None and cap.at_capacity is not None:
            in_flight = cap.at_capacity.in_flight_per_replica
        rates.append(max(cap.per_replica_rps, rates[-1] if rates else 0.0))  # pooling never hurts
    return FleetCapacity(tuple(sizes), tuple(rates), in_flight)
