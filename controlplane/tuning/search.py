"""Configuration search: the per-replica engine settings and replica count that serve a load at the lowest cost
while every SLO holds, with the evidence a recommendation needs.

Strategy (branch and bound on goodput per dollar). Every allowed cell gets a replica model (cells vLLM would
refuse, or whose weights/KV do not fit, are rejected with the reason) and a first-order goodput estimate;
cells are visited best estimate first. The first is bisected to its capacity at the SLO (the highest rate
one replica sustains with every SLO holding). Each later cell must beat the best so far by `rel_tol` per
dollar, i.e. sustain r_need = best_per_dollar * its price * (1 + rel_tol): one simulation at r_need says
whether it can; only if it can is it bisected (and becomes the best). A cell whose estimate, even
`model_slack` times larger, stays below r_need is skipped unsimulated. The grid (`grid`) bisects every cell.
Then the replica count for the target load is sized by simulating the fleet (pooling makes N replicas
carry more than N times one), the cheapest fleet among the evaluated cells wins, and optionally the top
cells are tried for real on a canary (at most `canary_trials` trials); with a canary, only a configuration that
passed its trial is recommended. Cells that change a running deployment's precision (`Cell.precision_changed`) are
bounded and sized per precision, apart from the running one's, are never chosen without a canary (`needs_canary`),
go after the running precision at an equal cost, and a precision that
failed before any load on one cell (refused by the quality guard, never ready, or not comparable) is not started
again on another and does not count as a trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from controlplane.tuning.capacity import (
    CapacityProbe,
    Objective,
    Prediction,
    all_hold,
    at_rate,
    judge,
)
from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.search_space import Cell, ReplicaFactory, SearchSpace, estimate_rps, price_per_hour
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Workload

Goal = Literal["usd_per_hour", "usd_per_million_tokens"]

# Why a cell was not recommended (Candidate.reason).
CHOSEN = "chosen"
INVALID = "invalid_config"  # vLLM would refuse it, or the catalog cannot build it (does not fit, KV too small)
SLO_UNREACHABLE = "slo_unreachable"  # misses an SLO even nearly idle
CANNOT_BEAT_BEST = "cannot_beat_best"  # simulated at the rate it would need to beat the best so far: misses an SLO
MODEL_BOUND = "model_bound"  # the perf model puts it far below that rate: not simulated
OUTRANKED = "outranked"  # fully evaluated, a cheaper fleet exists
TOO_MANY_REPLICAS = "too_many_replicas"  # the target load needs more replicas than allowed
CANARY_FAILED = "canary_failed"
CANARY_UNKNOWN = "canary_unknown"  # the canary trial could not measure attainment
NEEDS_CANARY = "needs_canary"  # another precision, predicted by a prior: recommended only after a canary trial
QUALITY_REFUSED = "quality_refused"  # a lower precision drifted from the current one past the quality budget


@dataclass(frozen=True)
class Candidate:
    cell: Cell
    reason: str
    detail: str = ""
    estimate_rps: float | None = None  # first-order model, per replica
    capacity_rps: float | None = None  # simulated, per replica, at the SLO (bisected)
    usd_per_hour: float | None = None  # one replica (GPU count where no price is known)
    replicas: int | None = None  # for the target load
    simulations: int = 0

    @property
    def goodput_per_usd(self) -> float | None:
        """Requests served within every SLO per dollar, at capacity."""
        if self.capacity_rps is None or not self.usd_per_hour:
            return None
        return self.capacity_rps * 3600.0 / self.usd_per_hour


@dataclass(frozen=True)
class CanaryVerdict:
    """What a real trial of a configuration measured. An attainment of None is unknown, never a pass."""

    predictions: tuple[Prediction, ...]
    note: str = ""
    started: bool = True  # False: the configuration never served (it failed to start): a fail, not unknown
    quality: Mapping[str, Any] | None = None  # the quality guard's report, where a lower precision was compared
    refused: str | None = None  # why the quality guard refused it (a fail)

    @property
    def passed(self) -> bool | None:
        if not self.started or self.refused is not None:
            return False
        if not self.predictions or any(p.attainment is None for p in self.predictions):
            return None
        return all_hold(self.predictions)


class Canary(Protocol):
    """Runs one replica with `changes` at `rps` for real and reports attainment (the lead wires the supervisor)."""

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict: ...


@dataclass(frozen=True)
class SearchResult:
    chosen: Cell | None
    replicas: int | None
    target_rps: float
    predictions: tuple[Prediction, ...]  # the chosen fleet at the target load
    usd_per_hour: float | None  # the fleet
    usd_per_million_tokens: float | None  # at the target load (prompt + output tokens)
    capacity_rps_per_replica: float | None
    goodput_per_usd: float | None
    candidates: tuple[Candidate, ...]
    simulations: int
    simulated_requests: int
    cpu_s: float
    validated: bool | None = None  # None: no canary was asked for
    notes: tuple[str, ...] = ()
    # False: no price was known, and the usd_* figures above are GPU-hours (the search's currency then); the
    # evidence then says so instead of showing them as dollars.
    priced: bool = True
    canary: Mapping[str, Any] | None = None  # the chosen configuration's passing trial: its note and quality report

    @property
    def engine_changes(self) -> dict[str, Any]:
        return self.chosen.engine_changes() if self.chosen else {}

    def evidence(self) -> dict[str, Any]:
        """JSON-ready: what a recommendation stores as its evidence."""

        usd = self.priced

        def cand(c: Candidate) -> dict[str, Any]:
            return {"config": c.cell.label(), "engine": c.cell.engine_changes(), "reason": c.reason,
                    "detail": c.detail, "estimate_rps": c.estimate_rps, "capacity_rps": c.capacity_rps,
                    "usd_per_hour": c.usd_per_hour if usd else None,
                    "goodput_per_usd": c.goodput_per_usd if usd else None, "replicas": c.replicas,
                    "simulations": c.simulations}

        return {
            "cost_unit": "USD" if usd else "GPU-hours (no price configured)",
            "cost_per_hour": self.usd_per_hour,  # in cost_unit, what the search minimised
            "config": self.chosen.label() if self.chosen else None, "engine": self.engine_changes,
            "replicas": self.replicas, "target_rps": self.target_rps,
            "slos": [{"name": p.name, "objective": p.objective, "attainment": p.attainment, "margin": p.margin,
                      "quantile_s": p.quantile_s, "threshold_s": p.threshold_s} for p in self.predictions],
            "usd_per_hour": self.usd_per_hour if usd else None,
            "usd_per_million_tokens": self.usd_per_million_tokens if usd else None,
            "capacity_rps_per_replica": self.capacity_rps_per_replica,
            "goodput_per_usd": self.goodput_per_usd if usd else None,
            "validated": self.validated, "simulations": self.simulations,
            "simulated_requests": self.simulated_requests, "cpu_s": self.cpu_s, "notes": list(self.notes),
            "canary": dict(self.canary) if self.canary is not None else None,
            "candidates": [cand(c) for c in self.candidates],
        }


@dataclass(frozen=True)
class SearchOptions:
    goal: Goal = "usd_per_hour"
    rel_tol: float = 0.02  # bisection precision, and how much better per dollar a cell must be to replace the best
    model_slack: float = 2.0  # skip a cell unsimulated only if its estimate * slack < the rate it would need
    probe_requests: int = 2000  # requests per replica per simulation
    min_replicas: int = 1
    max_replicas: int = 64
    canary_trials: int = 2  # at most this many real trials
    fleet_candidates: int = 3  # evaluated cells (best per dollar first) sized for the target load
    # The running (max_num_seqs, max_num_batched_tokens): that cell of the running precision is always sized for
    # the load, so a search whose better-ranked cells fail their canary trials still has it to try.
    running: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.rel_tol < 0.5 or self.model_slack < 1 or self.probe_requests < 50:
            raise ValueError("search options: rel_tol must be in (0, 0.5), model_slack >= 1, probe_requests >= 50")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"search options: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if self.canary_trials < 1 or self.fleet_candidates < 1:
            raise ValueError("search options: canary_trials and fleet_candidates must be >= 1")


@dataclass
class _Tally:  # mutable working state of one search, never returned
    simulations: int = 0
    requests: int = 0


@dataclass
class _Eval:
    cell: Cell
    model: ReplicaModel
    estimate: float
    price: float
    probe: CapacityProbe
    capacity: float | None = None


def _build(cells: Sequence[Cell], factory: ReplicaFactory, workload: Workload, objectives: Sequence[Objective],
           opts: SearchOptions) -> tuple[list[_Eval], list[Candidate]]:
    ok: list[_Eval] = []
    rejected: list[Candidate] = []
    for c in cells:
        if c.max_num_batched_tokens < c.max_num_seqs:
            rejected.append(Candidate(c, INVALID, f"max_num_batched_tokens {c.max_num_batched_tokens} < "
                                                  f"max_num_seqs {c.max_num_seqs}: vLLM refuses it"))
            continue
        try:
            m = factory(c)
        except ValueError as exc:
            rejected.append(Candidate(c, INVALID, str(exc)))
            continue
        probe = CapacityProbe(m, workload, objectives, requests=opts.probe_requests)
        ok.append(_Eval(c, m, estimate_rps(m, workload, objectives), price_per_hour(m), probe))
    return ok, rejected


def _sims(e: _Eval) -> int:
    return e.probe.simulations


def _evaluate_all(evals: list[_Eval], opts: SearchOptions, exhaustive: bool) -> list[Candidate]:
    """Branch and bound (or, exhaustive, bisect every cell). Sets `capacity` on the cells fully evaluated.
    Cells that change the running precision are bounded apart from the others: they are recommended only once a
    canary proved them, and a bound set by one of them must not leave the running precision's best unevaluated
    for when it fails (or no canary is allowed)."""
    groups: dict[tuple[Any, Any] | None, list[_Eval]] = {}
    for e in evals:
        groups.setdefault(_group(e.cell), []).append(e)
    return [c for g in groups.values() for c in _bound(g, opts, exhaustive)]


def _group(cell: Cell) -> tuple[Any, Any] | None:
    """Cells bounded and ranked together: the running precision's (None), and each changed precision's own, so
    that one precision failing its canary before any load (dropped) never leaves another unevaluated."""
    return (cell.weights, cell.kv_cache) if cell.precision_changed else None


def _bound(evals: list[_Eval], opts: SearchOptions, exhaustive: bool) -> list[Candidate]:
    out: list[Candidate] = []
    best: _Eval | None = None
    for e in sorted(evals, key=lambda x: (-x.estimate / x.price, x.cell)):
        if best is None or exhaustive:
            cap = e.probe.capacity(rel_tol=opts.rel_tol)
        else:
            assert best.capacity is not None
            need = best.capacity / best.price * e.price * (1 + opts.rel_tol)
            if e.estimate * opts.model_slack < need:
                out.append(Candidate(e.cell, MODEL_BOUND, f"the perf model estimates {e.estimate:.3g} req/s, "
                                     f"under 1/{opts.model_slack:g} of the {need:.3g} req/s needed to beat "
                                     f"{best.cell.label()}", e.estimate, usd_per_hour=e.price))
                continue
            p = e.probe.probe(need)
            if not p.passed:
                worst = min(p.predictions, key=lambda q: q.margin if q.margin is not None else -1.0)
                att = "unknown" if worst.attainment is None else format(worst.attainment, ".4f")
                out.append(Candidate(e.cell, CANNOT_BEAT_BEST, f"at {need:.3g} req/s (needed to beat "
                                     f"{best.cell.label()}) SLO {worst.name!r} attains {att} < "
                                     f"{worst.objective}", e.estimate, usd_per_hour=e.price, simulations=_sims(e)))
                continue
            cap = e.probe.capacity(rel_tol=opts.rel_tol, known_pass_rps=need)
        if cap.rps <= 0:
            out.append(Candidate(e.cell, SLO_UNREACHABLE, "misses an SLO even at 1% of its throughput",
                                 e.estimate, 0.0, e.price, simulations=_sims(e)))
            continue
        e.capacity = cap.rps
        if best is None or best.capacity is None or cap.rps / e.price > best.capacity / best.price:
            best = e
    return out


def _fleet(e: _Eval, workload: Workload, objectives: Sequence[Objective], target: float, opts: SearchOptions,
           tally: _Tally) -> tuple[int | None, tuple[Prediction, ...]]:
    """The fewest replicas of the cell that meet every SLO at the target load (None: more than allowed)."""
    assert e.capacity is not None
    n = min(max(opts.min_replicas, math.ceil(target / e.capacity)), opts.max_replicas)
    seen: dict[int, tuple[bool, tuple[Prediction, ...]]] = {}

    saturation = e.probe.saturation_rps()

    def check(k: int) -> bool:
        if k not in seen:
            wl = at_rate(workload, target, opts.probe_requests * k)
            res = simulate(wl, [e.model] * k, sample_interval_s=None)
            tally.simulations += 1
            tally.requests += len(wl)
            preds = judge(res, objectives)
            # A finite probe can pass at a per-replica load past the replica's throughput; it would not last.
            sustainable = target / k < saturation * (1.0 - opts.rel_tol)
            seen[k] = (all_hold(preds) and sustainable, preds)
        return seen[k][0]

    if check(n):
        while n - 1 >= opts.min_replicas and check(n - 1):
            n -= 1
        return n, seen[n][1]
    while n < opts.max_replicas:
        n += 1
        if check(n):
            return n, seen[n][1]
    return None, seen[n][1]


def _is_running(cell: Cell, opts: SearchOptions) -> bool:
    return not cell.precision_changed and (cell.max_num_seqs, cell.max_num_batched_tokens) == opts.running


def _mean_tokens(workload: Workload) -> float:
    return float(np.mean(workload.prompt_tokens + workload.output_tokens))


def search(space: SearchSpace, factory: ReplicaFactory, objectives: Sequence[Objective], workload: Workload, *,
           target_rps: float | None = None, options: SearchOptions | None = None, canary: Canary | None = None,
           exhaustive: bool = False, clock: Callable[[], float] = time.process_time) -> SearchResult:
    """The cheapest configuration and replica count that keep every objective at `target_rps` (default: the
    workload's own mean rate). `exhaustive=True` bisects every cell (the grid the search is measured against)."""
    opts = options or SearchOptions()
    start = clock()
    if not objectives:
        raise ValueError("the search needs at least one latency SLO to judge configurations by")
    if len(workload) < 2:
        raise ValueError(f"workload {workload.name!r} has {len(workload)} request(s); the search needs >= 2")
    target = target_rps if target_rps is not None else (len(workload) - 1) / max(workload.duration_s, 1e-9)
    if target <= 0:
        raise ValueError(f"target_rps must be > 0, got {target}")
    evals, rejected = _build(space.cells(), factory, workload, objectives, opts)
    # With canary trials a candidate can fail for real: every cell is then bisected and more are sized, so a
    # trial that fails leaves the next ones evaluated rather than pruned against the one that failed.
    decided = _evaluate_all(evals, opts, exhaustive or canary is not None)
    notes: list[str] = []
    if any(not e.model.usd_per_hour for e in evals):
        notes.append("no price known for some configurations: they are priced at 1 per GPU-hour (goodput per GPU)")
    tally = _Tally()
    for e in evals:
        tally.simulations += _sims(e)
        tally.requests += e.probe.requests_simulated
    full = sorted((e for e in evals if e.capacity), key=lambda e: -(e.capacity or 0.0) / e.price)
    sized_per_group = opts.fleet_candidates + (opts.canary_trials if canary is not None else 0)
    rank: dict[tuple[Any, Any] | None, int] = {}  # per group (see _evaluate_all): each keeps its own candidates
    sized: list[tuple[float, float, _Eval, int, tuple[Prediction, ...]]] = []
    finals: list[Candidate] = []
    for e in full:
        group = _group(e.cell)
        rank[group] = rank.get(group, 0) + 1
        if rank[group] > sized_per_group and not _is_running(e.cell, opts):
            finals.append(Candidate(e.cell, OUTRANKED, "lower goodput per dollar than the cells sized for the load",
                                    e.estimate, e.capacity, e.price, simulations=_sims(e)))
            continue
        n, preds = _fleet(e, workload, objectives, target, opts, tally)
        if n is None:
            finals.append(Candidate(e.cell, TOO_MANY_REPLICAS, f"{opts.max_replicas} replicas do not meet every SLO "
                                    f"at {target:.3g} req/s", e.estimate, e.capacity, e.price,
                                    simulations=_sims(e)))
            continue
        per_dollar = (e.capacity or 0.0) / e.price
        key = n * e.price if opts.goal == "usd_per_hour" else 1.0 / per_dollar
        sized.append((key, -per_dollar, e, n, preds))
    # At an equal cost the running precision goes first, whatever headroom another is predicted to have: another
    # one needs a canary and risks quality for no saving.
    sized.sort(key=lambda s: (s[0], s[2].cell.precision_changed, s[1], s[2].cell))
    chosen: tuple[_Eval, int, tuple[Prediction, ...]] | None = None
    validated: bool | None = None if canary is None else False
    passing: Mapping[str, Any] | None = None
    trials = 0
    # A changed precision that failed before any load (refused by the quality guard, never ready, or the guard
    # could not compare) failed as a precision, whatever the batch limits: precision -> (reason, the cell).
    dropped: dict[tuple[Any, Any], tuple[str, str]] = {}
    for _, _, e, n, preds in sized:
        precision = (e.cell.weights, e.cell.kv_cache)
        if chosen is None and precision in dropped:
            code, on = dropped[precision]
            finals.append(Candidate(e.cell, code, f"not tried: this precision failed before any load on {on}",
                                    e.estimate, e.capacity, e.price, n, _sims(e)))
            continue
        if chosen is not None or (canary is not None and trials >= opts.canary_trials):
            finals.append(Candidate(e.cell, OUTRANKED, _priced(n, e.price),
                                    e.estimate, e.capacity, e.price, n, _sims(e)))
            continue
        if canary is None and e.cell.precision_changed:
            finals.append(Candidate(e.cell, NEEDS_CANARY, "another precision than the running one is predicted by "
                                    "a prior, not by the calibration: it is recommended only after a canary trial "
                                    "(and, for a lower one, the quality guard)", e.estimate, e.capacity, e.price, n,
                                    _sims(e)))
            continue
        if canary is not None:
            verdict = canary.trial(e.cell, e.cell.engine_changes(), target / n)
            code = (QUALITY_REFUSED if verdict.refused is not None else
                    CANARY_UNKNOWN if verdict.passed is None else CANARY_FAILED)
            # `canary_trials` bounds the trials of the running precision and the load trials: a changed precision
            # that failed before its load (no predictions judged) must not use up the trial of the running
            # precision's best, to fall back on, and is not started again with other limits.
            if e.cell.precision_changed and not verdict.predictions and verdict.passed is not True:
                dropped[precision] = (code, e.cell.label())
            else:
                trials += 1
            if verdict.passed is not True:
                detail = verdict.refused or verdict.note or "the canary did not confirm the prediction"
                finals.append(Candidate(e.cell, code, detail, e.estimate, e.capacity, e.price, n, _sims(e)))
                continue
            validated = True
            passing = {"note": verdict.note, "quality": dict(verdict.quality) if verdict.quality else None}
        chosen = (e, n, preds)
        finals.append(Candidate(e.cell, CHOSEN, _priced(n, e.price), e.estimate, e.capacity,
                                e.price, n, _sims(e)))
    if chosen is None and canary is not None and sized:
        more = f", {len(dropped)} precision(s) failed before any load" if dropped else ""
        notes.append(f"no configuration passed its canary trial ({trials} trial(s){more}): nothing recommended")
    cpu = clock() - start
    cands = tuple(rejected + decided + finals)
    if chosen is None:
        return SearchResult(None, None, target, (), None, None, None, None, cands, tally.simulations,
                            tally.requests, cpu, validated, tuple(notes))
    e, n, preds = chosen
    usd_h = n * e.price
    tokens_per_h = target * _mean_tokens(workload) * 3600.0
    cap = e.capacity or 0.0
    return SearchResult(e.cell, n, target, preds, usd_h, usd_h / tokens_per_h * 1e6, cap, cap * 3600.0 / e.price,
                        cands, tally.simulations, tally.requests, cpu, validated, tuple(notes),
                        priced=bool(e.model.usd_per_hour), canary=passing)


def _priced(n: int, price: float) -> str:
    return f"{n} replica{'' if n == 1 else 's'} at ${n * price:.2f}/h"
