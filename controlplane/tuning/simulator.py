"""Discrete-event simulation of a vLLM V1 fleet: replicas behind a least-outstanding-requests router.

`simulate(workload, replicas)` replays arrivals in time order; each arrival goes to the replica with
the fewest requests routed and not yet finished (ties to the lowest index), and each replica runs
vLLM V1's scheduler (see simulator_engine). A request reaches its replica's engine `api_path_s` after
it arrives (the API server's share of TTFT), plus `api_path_per_request_s` for each request already on
that replica, in arrival order. Times are seconds from the workload's start. TTFT ends
with the step that samples the first output token; TPOT = (e2e - TTFT) / (output tokens - 1), as
the store computes it. A request longer than a replica's max_model_len is rejected there (vLLM
answers 400) and counts as not served.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator_engine import FastEngine
from controlplane.tuning.simulator_parts import Book
from controlplane.tuning.simulator_reference import ReferenceEngine
from controlplane.tuning.workload import FloatArray, IntArray, Workload


@dataclass(frozen=True, eq=False)
class ReplicaSeries:
    """One replica's state sampled at regular times (what a scrape would show), and its totals."""

    name: str
    t_s: FloatArray
    num_running: IntArray
    num_waiting: IntArray
    kv_usage_ratio: FloatArray
    steps: int
    tokens: int
    preemptions: int


@dataclass(frozen=True, eq=False)
class SimResult:
    workload: Workload
    replica: IntArray  # index into `series`; -1: rejected
    scheduled_s: FloatArray  # first scheduled (NaN: never)
    first_token_s: FloatArray
    finished_s: FloatArray
    preemptions: IntArray
    series: tuple[ReplicaSeries, ...]
    api_path_s: FloatArray | None = None  # per request: arrival -> the engine's queue (None: all 0)

    @property
    def rejected(self) -> NDArray[np.bool_]:
        return self.replica < 0

    @property
    def completed(self) -> NDArray[np.bool_]:
        return np.isfinite(self.finished_s)

    @property
    def queue_s(self) -> FloatArray:
        """In the engine's queue: from entering the engine to being scheduled, the wait for the step running then
        included. vLLM stamps its queue time only after that step, so its spans show that wait in
        TTFT - queue - prefill instead (see calibrate.api_path_s)."""
        queued = self.scheduled_s - self.workload.arrival_s
        return queued if self.api_path_s is None else queued - self.api_path_s

    @property
    def prefill_s(self) -> FloatArray:
        return self.first_token_s - self.scheduled_s

    @property
    def decode_s(self) -> FloatArray:
        return self.finished_s - self.first_token_s

    @property
    def ttft_s(self) -> FloatArray:
        return self.first_token_s - self.workload.arrival_s

    @property
    def e2e_s(self) -> FloatArray:
        return self.finished_s - self.workload.arrival_s

    @property
    def tpot_s(self) -> FloatArray:
        """NaN for one-token outputs: they have no inter-token time."""
        steps = (self.workload.output_tokens - 1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(steps > 0, self.decode_s / np.where(steps > 0, steps, 1.0), np.nan)

    @property
    def makespan_s(self) -> float:
        """From the first arrival to the last finish."""
        done = self.finished_s[self.completed]
        if not len(done):
            return 0.0
        return float(done.max() - self.workload.arrival_s[0])

    def rows(self, *, base_unix_s: float = 0.0, model: str | None = None) -> list[dict[str, Any]]:
        """Per-request rows shaped like the store's `requests` table (None where unknown)."""

        def known(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        wl = self.workload
        cols = (wl.arrival_s, self.queue_s, self.prefill_s, self.decode_s, self.ttft_s, self.e2e_s, self.tpot_s,
                self.finished_s - self.scheduled_s)
        out = []
        for i, (arr, q, p, d, ttft, e2e, tpot, inf) in enumerate(zip(*(c.tolist() for c in cols), strict=True)):
            rep = int(self.replica[i])
            out.append({
                "request_id": f"sim-{i}", "model": model, "arrival_unix_s": base_unix_s + arr,
                "queue_s": known(q), "prefill_s": known(p), "decode_s": known(d), "inference_s": known(inf),
                "ttft_s": known(ttft), "e2e_s": known(e2e), "tpot_s": known(tpot),
                "prompt_tokens": int(wl.prompt_tokens[i]), "completion_tokens": int(wl.output_tokens[i]),
                "max_tokens": int(wl.output_tokens[i]),
                "replica": self.series[rep].name if rep >= 0 else None,
            })
        return out


Engine = FastEngine | ReferenceEngine


def simulate(workload: Workload, replicas: Sequence[ReplicaModel], *, sample_interval_s: float | None = 1.0,
             reference: bool = False) -> SimResult:
    """Run the workload through the replicas. `reference=True` uses the naive step-by-step engine."""
    if not replicas:
        raise ValueError("simulate needs at least one replica")
    if sample_interval_s is not None and sample_interval_s <= 0:
        raise ValueError(f"sample_interval_s must be > 0 or None, got {sample_interval_s}")
    book = Book(workload.prompt_tokens.tolist(), workload.output_tokens.tolist())
    kind = ReferenceEngine if reference else FastEngine
    engines: list[Engine] = [kind(m, book, i, sample_interval_s) for i, m in enumerate(replicas)]
    routed = [-1] * len(workload)
    arrivals = workload.arrival_s.tolist()
    paths: FloatArray | None
    if len(engines) == 1 and not replicas[0].api_path_per_request_s:
        # A constant delay keeps the arrivals in time order, so it only shifts when they enter: the hot path.
        only, d = engines[0], replicas[0].api_path_s
        # Nothing here asks how many are in flight, so finish times need not be kept: a deque of length 0
        # drops them (a million requests would otherwise hold 8-32 MB of floats until the run ends).
        only.fins = deque(maxlen=0)
        for i, t in enumerate(arrivals):
            only.advance(t + d, True)
            if only.enqueue(i, t + d):
                routed[i] = 0
        paths = np.where(np.asarray(routed) >= 0, d, 0.0) if d else None
    else:
        paths = _route(engines, replicas, arrivals, routed)
        if not any(m.api_path_s or m.api_path_per_request_s for m in replicas):
            paths = None
    for e in engines:
        e.advance(math.inf, True)
    unique = len({r.name for r in replicas}) == len(replicas)
    series = tuple(
        ReplicaSeries(name=m.name if unique else f"{m.name}-{i}",
                      t_s=np.asarray(e.samples.t_s, dtype=np.float64),
                      num_running=np.asarray(e.samples.running, dtype=np.int64),
                      num_waiting=np.asarray(e.samples.waiting, dtype=np.int64),
                      kv_usage_ratio=np.asarray(e.samples.kv_usage, dtype=np.float64),
                      steps=e.steps, tokens=e.tokens, preemptions=e.preemptions)
        for i, (m, e) in enumerate(zip(replicas, engines, strict=True)))
    return SimResult(workload=workload, replica=np.asarray(routed, dtype=np.int64),
                     scheduled_s=np.asarray(book.t_sched), first_token_s=np.asarray(book.t_first),
                     finished_s=np.asarray(book.t_fin), preemptions=np.asarray(book.preempt, dtype=np.int64),
                     series=series, api_path_s=paths)


def _least_outstanding(engines: Sequence[Engine], t: float) -> tuple[Engine, int]:
    """The replica with the fewest requests routed to it and not finished at t (the first on a tie), and that
    count; every replica is advanced to t."""
    best, best_load = engines[0], -1
    for e in engines:
        e.advance(t, False)
        load = e.outstanding_at(t)
        if best_load < 0 or load < best_load:
            best, best_load = e, load
    return best, best_load


def entry_time(model: ReplicaModel, t: float, in_flight: int, last_entry: float) -> float:
    """When a request arriving at t reaches the engine of a replica with `in_flight` requests routed to it and not
    finished: `api_path_s + api_path_per_request_s * in_flight` later, and never before the one that arrived before
    it there (`last_entry`; the API server's one event loop takes them in order)."""
    return max(last_entry, t + model.api_path_s + model.api_path_per_request_s * in_flight)


def _route(engines: Sequence[Engine], replicas: Sequence[ReplicaModel], arrivals: list[float],
           routed: list[int]) -> FloatArray:
    """Least-outstanding routing, each request entering its replica's engine at `entry_time`. Returns each
    request's API path (0 for a rejected one)."""
    last_entry = [-math.inf] * len(engines)
    paths = np.zeros(len(arrivals), dtype=np.float64)
    for i, t in enumerate(arrivals):
        best, load = _least_outstanding(engines, t)
        k = best.index
        entry = last_entry[k] = entry_time(replicas[k], t, load, last_entry[k])
        best.advance(entry, True)
        if best.enqueue(i, entry):
            routed[i] = k
            paths[i] = entry - t
    return paths


@dataclass(frozen=True)
class Slo:
    """Per-request latency objectives; None: not judged. A request is good when all judged ones hold."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None


@dataclass(frozen=True)
class Goodput:
    good: int
    total: int
    window_s: float

    @property
    def ratio(self) -> float | None:
        return self.good / self.total if self.total else None

    @property
    def rps(self) -> float | None:
        return self.good / self.window_s if self.window_s > 0 else None


def goodput(result: SimResult, slo: Slo) -> Goodput:
    """Requests meeting every judged SLO, over the makespan. Rejected or unfinished requests are not good;
    a one-token output has no TPOT and is judged on the rest."""
    ok = result.completed.copy()
    if slo.ttft_s is not None:
        ok &= result.ttft_s <= slo.ttft_s
    if slo.tpot_s is not None:
        tpot = result.tpot_s
        ok &= np.isnan(tpot) | (tpot <= slo.tpot_s)
    if slo.e2e_s is not None:
        ok &= result.e2e_s <= slo.e2e_s
    return Goodput(good=int(ok.sum()), total=len(result.workload), window_s=result.makespan_s)
