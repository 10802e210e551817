"""What the configuration search chooses among: per-replica cells built from allowed values, the replica model
of each (roofline prior or a calibrated fit), and a cheap first-order estimate of each cell's goodput that
orders the search (best first) before anything is simulated.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from controlplane.tuning.capacity import Objective
from controlplane.tuning.catalog import Accelerator, CatalogError, KvPrecision, ModelShape, WeightPrecision
from controlplane.tuning.perf_model import (
    Efficiency,
    EngineArgs,
    ReplicaModel,
    Roof,
    StepCost,
    replica_from_fit,
    roofline,
)
from controlplane.tuning.workload import Workload

# vLLM's --quantization for each weight precision (EngineConfig.quantization); int4 needs an AWQ checkpoint.
_QUANTIZATION: dict[WeightPrecision, str | None] = {
    WeightPrecision.BF16: None, WeightPrecision.FP8: "fp8", WeightPrecision.INT8: "int8", WeightPrecision.INT4: "awq"}


@dataclass(frozen=True, order=True)
class Cell:
    """One per-replica configuration."""

    max_num_seqs: int
    max_num_batched_tokens: int
    weights: WeightPrecision = WeightPrecision.BF16
    kv_cache: KvPrecision = KvPrecision.BF16
    tensor_parallel_size: int = 1
    # Only the batch limits are this cell's: precision and parallelism stay as the replica runs them (a search
    # calibrated on a running replica, which predicts only what it observed) ...
    limits_only: bool = False
    # ... except, given the (weights, KV) precision the replica runs, a precision that differs from it: the
    # search of a running deployment whose spec allows other KV-cache dtypes. Parallelism always stays.
    baseline: tuple[WeightPrecision, KvPrecision] | None = None
    kv_arg: str | None = None  # the exact --kv-cache-dtype the spec allows for this precision (default: auto / fp8)
    quant_arg: str | None = None  # likewise the exact --quantization ("none": the checkpoint's own weights)

    @property
    def precision_changed(self) -> bool:
        """A limits-only cell that also changes the running precision: predicted from the observed one by a
        prior, so it is recommended only once a canary trial has measured it (and the quality guard passed)."""
        return self.limits_only and self.baseline is not None and (self.weights, self.kv_cache) != self.baseline

    @property
    def lower_precision(self) -> bool:
        """Fewer bytes per weight or per KV element than the baseline: the quality guard must compare it."""
        if not self.precision_changed or self.baseline is None:
            return False
        w, kv = self.baseline
        return (self.weights.bytes_per_weight < w.bytes_per_weight
                or self.kv_cache.bytes_per_element < kv.bytes_per_element)

    def engine_changes(self) -> dict[str, Any]:
        """The change to the deployment's EngineConfig (field names of controlplane.supervisor.spec)."""
        limits: dict[str, Any] = {"max_num_seqs": self.max_num_seqs,
                                  "max_num_batched_tokens": self.max_num_batched_tokens}
        kv_arg = self.kv_arg or ("auto" if self.kv_cache is KvPrecision.BF16 else "fp8")
        if self.limits_only:
            if self.baseline is not None and self.kv_cache != self.baseline[1]:
                limits["kv_cache_dtype"] = kv_arg
            if self.baseline is not None and self.weights != self.baseline[0]:
                limits["quantization"] = (_QUANTIZATION[self.weights] if self.quant_arg is None
                                          else None if self.quant_arg == "none" else self.quant_arg)
            return limits
        return {**limits, "quantization": _QUANTIZATION[self.weights], "kv_cache_dtype": kv_arg,
                "tensor_parallel_size": self.tensor_parallel_size}

    def label(self) -> str:
        if self.limits_only:
            changed = "" if not self.precision_changed else (
                (f" w={self.quant_arg or self.weights.value}" if self.baseline and self.weights != self.baseline[0]
                 else "")
                + (f" kv={self.kv_arg or self.kv_cache.value}" if self.baseline and self.kv_cache != self.baseline[1]
                   else ""))
            return f"seqs={self.max_num_seqs} tokens={self.max_num_batched_tokens}{changed}"
        tp = f" tp{self.tensor_parallel_size}" if self.tensor_parallel_size != 1 else ""
        return (f"seqs={self.max_num_seqs} tokens={self.max_num_batched_tokens} "
                f"w={self.weights.value} kv={self.kv_cache.value}{tp}")


@dataclass(frozen=True)
class SearchSpace:
    """The allowed values; the search never leaves them."""

    max_num_seqs: tuple[int, ...]
    max_num_batched_tokens: tuple[int, ...]
    weights: tuple[WeightPrecision, ...] = (WeightPrecision.BF16,)
    kv_cache: tuple[KvPrecision, ...] = (KvPrecision.BF16,)
    tensor_parallel_size: tuple[int, ...] = (1,)
    limits_only: bool = False  # the cells change the batch limits only (see Cell.limits_only) ...
    baseline: tuple[WeightPrecision, KvPrecision] | None = None  # ... and a precision other than this one
    kv_args: tuple[tuple[KvPrecision, str], ...] = ()  # the exact --kv-cache-dtype of each KV precision, if given
    quant_args: tuple[tuple[WeightPrecision, str], ...] = ()  # likewise the --quantization of each weight precision

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "weights", "kv_cache", "tensor_parallel_size"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"search space: {name} allows no value; give at least one")
            if len(set(values)) != len(values):
                raise ValueError(f"search space: {name} lists a value twice: {values}")
        b = self.baseline
        if b is not None and (b[0] not in self.weights or b[1] not in self.kv_cache):
            raise ValueError(f"search space: the running precision {self.baseline} must be among the allowed ones")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            bad = [v for v in getattr(self, name) if v < 1]
            if bad:
                raise ValueError(f"search space: {name} must be >= 1, got {bad}")

    def cells(self) -> list[Cell]:
        args, quants = dict(self.kv_args), dict(self.quant_args)
        grid = itertools.product(self.max_num_seqs, self.max_num_batched_tokens, self.weights, self.kv_cache,
                                 self.tensor_parallel_size)
        return [Cell(s, t, w, k, tp, self.limits_only, self.baseline, args.get(k), quants.get(w))
                for s, t, w, k, tp in grid]

    def __len__(self) -> int:
        return (len(self.max_num_seqs) * len(self.max_num_batched_tokens) * len(self.weights) * len(self.kv_cache)
                * len(self.tensor_parallel_size))


ReplicaFactory = Callable[[Cell], ReplicaModel]
"""Builds a cell's replica model; raises ValueError (CatalogError included) naming why the cell cannot run."""


@dataclass(frozen=True)
class RooflineFactory:
    """Replicas from the catalog's roofline prior: KV capacity, price and step cost follow the cell."""

    model: ModelShape
    accelerator: Accelerator
    efficiency: Efficiency = field(default_factory=Efficiency)
    gpu_memory_utilization: float = 0.92
    max_model_len: int | None = 8192
    usd_per_gpu_hour: float | None = None

    def __call__(self, cell: Cell) -> ReplicaModel:
        args = EngineArgs(max_num_seqs=cell.max_num_seqs, max_num_batched_tokens=cell.max_num_batched_tokens,
                          gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                          tensor_parallel_size=cell.tensor_parallel_size, weights=cell.weights, kv_cache=cell.kv_cache)
        prior = roofline(self.model, self.accelerator, args, self.efficiency)
        return prior.replica(name=cell.label(), usd_per_gpu_hour=self.usd_per_gpu_hour)


@dataclass(frozen=True)
class WeightPrior:
    """How another weight precision moves a calibrated replica: its step cost and (memory-sized) KV capacity are
    multiplied by these. The default claims nothing: the canary trial measures it."""

    step_scale: float = 1.0
    kv_scale: float = 1.0
    basis: str = "none: no roofline for this hardware and model, the calibrated figures are kept"
    cannot_run: str | None = None  # why the precision cannot run there (the roofline's reason): the cell is rejected


# Steps the roofline's ratio is taken at (tokens, KV tokens read, sequences): one decode, a full batch of
# decodes, a prefill chunk. The prior keeps the smallest gain of the three.
def _prior_steps(max_num_seqs: int, max_num_batched_tokens: int, context: int) -> list[tuple[int, int, int]]:
    return [(1, context, 1), (max_num_seqs, max_num_seqs * context, max_num_seqs),
            (max_num_batched_tokens, 0, 1)]


@functools.lru_cache(maxsize=512)
def roofline_weight_prior(model: ModelShape, accelerator: Accelerator, args: EngineArgs,
                          weights: WeightPrecision, context: int = 1024) -> WeightPrior:
    """The roofline's view of switching `args` (batch limits included) to `weights` on this accelerator: the step
    cost scales by the largest new/old step-time ratio of `_prior_steps` (the smallest gain), the KV capacity by
    the ratio of the memory left for it. Where the roofline cannot model `args` itself, it claims nothing; where
    it says the new precision cannot run there (weights that do not fit), the prior says so (`cannot_run`)."""
    where = f"roofline of {model.name} on {accelerator.name}"
    try:
        old = roofline(model, accelerator, args)
    except CatalogError as exc:
        return WeightPrior(basis=f"none: the {where} cannot model the running precision here ({exc}); the "
                                 "calibrated figures are kept")
    try:
        new = roofline(model, accelerator, replace(args, weights=weights))
    except CatalogError as exc:
        return WeightPrior(basis=where, cannot_run=f"{weights.value} weights: {exc}")
    ratio = max(new.step_cost.step_time(t, kv, s) / old.step_cost.step_time(t, kv, s)
                for t, kv, s in _prior_steps(old.max_num_seqs, old.max_num_batched_tokens, context))
    kv = (new.memory.kv_capacity_tokens / old.memory.kv_capacity_tokens if old.memory.kv_capacity_tokens > 0
          else 1.0)
    return WeightPrior(ratio, kv, f"{where}: {args.weights.value} -> {weights.value} at {old.max_num_seqs} "
                                  f"sequences, {old.max_num_batched_tokens} tokens, {context}-token context: a step "
                                  f"x{ratio:.3f} (least gain of a decode, a full batch and a prefill chunk), the "
                                  f"KV cache x{kv:.3f}")


@dataclass(frozen=True)
class RooflineWeightPriors:
    """Each cell's weight prior from the roofline, at the cell's own batch limits (the ratio moves with the batch:
    Llama-3.1-8B on an H100, bf16 -> fp8, scales a step by about 0.61 at 16 sequences and 0.86 at 256)."""

    model: ModelShape
    accelerator: Accelerator
    running: EngineArgs  # the running configuration: its precision, memory and model length
    context: int = 1024  # context tokens per decoding sequence (the workload's mean prompt + half its output)

    def __call__(self, weights: WeightPrecision, max_num_seqs: int, max_num_batched_tokens: int) -> WeightPrior:
        args = replace(self.running, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        return roofline_weight_prior(self.model, self.accelerator, args, weights, self.context)

    def limits_kv_scale(self, max_num_seqs: int, max_num_batched_tokens: int) -> float:
        """How other batch limits move the memory-sized KV cache: vLLM profiles its activations at
        max_num_batched_tokens tokens and its sampler at max_num_seqs sequences before sizing the cache, so larger
        limits leave less for it. The roofline's ratio, cell over running; ValueError naming the reason when the
        roofline says the cell cannot run (the cache too small for max_model_len, say)."""
        return limits_kv_scale(self.model, self.accelerator, self.running, max_num_seqs, max_num_batched_tokens)


@functools.lru_cache(maxsize=512)
def limits_kv_scale(model: ModelShape, accelerator: Accelerator, running: EngineArgs, max_num_seqs: int,
                    max_num_batched_tokens: int) -> float:
    try:
        old = roofline(model, accelerator, running)
    except CatalogError:
        return 1.0  # the roofline cannot model the running configuration: it claims nothing
    try:
        new = roofline(model, accelerator, replace(running, max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max_num_batched_tokens))
    except CatalogError as exc:
        raise ValueError(f"the roofline of {model.name} on {accelerator.name} says it cannot run: {exc}") from None
    return new.memory.kv_capacity_tokens / old.memory.kv_capacity_tokens if old.memory.kv_capacity_tokens > 0 else 1.0


WeightPriors = Callable[[WeightPrecision, int, int], WeightPrior]
"""(weights, max_num_seqs, max_num_batched_tokens) -> the prior of that cell's weights."""


@dataclass(frozen=True)
class CalibratedFactory:
    """Replicas from a calibrated step cost (any hardware, CPU included): the batch limits vary; parallelism stays
    as observed (nothing calibrated says how it would move the step cost).

    Another weight precision is predicted by `weight_priors`: the roofline's ratios at the cell's batch limits,
    where the accelerator is in the catalog and the model's shape is known; otherwise nothing is claimed and the
    step cost and KV capacity stay as observed (on vLLM's CPU backend an fp8 weight is converted on every read,
    and the sign of the change is the hardware's). Either way, such a cell is recommended only after a canary
    trial has measured it.

    Another KV-cache precision is predicted by a prior: the KV capacity scales with the bytes per element
    (exact where vLLM sizes the cache from memory; with `kv_capacity_scales` False, as under
    `num_gpu_blocks_override`, the block count stays), and the step cost is the observed one (an fp8 cache
    halves the bytes a GPU reads, but vLLM's CPU backend converts on every read: the sign of the change is the
    hardware's, so the prior claims none and the canary trial measures it)."""

    step_cost: StepCost
    kv_capacity_tokens: int
    block_size: int
    weights: WeightPrecision = WeightPrecision.BF16
    kv_cache: KvPrecision = KvPrecision.BF16
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    usd_per_hour: float | None = None
    api_path_s: float = 0.0  # the API server's path (calibrate.api_path_s); the batch limits do not move it
    api_path_per_request_s: float = 0.0  # its growth per request in flight (calibrate.api_path_per_request_s)
    prefix_caching: bool = True  # the running engine's (EngineConfig.prefix_caching); no cell changes it
    kv_capacity_scales: bool = True  # False: the KV block count is fixed (num_gpu_blocks_override)
    weight_priors: WeightPriors | None = None  # None: WeightPrior() for every cell (claims nothing)
    # (max_num_seqs, max_num_batched_tokens) -> the KV capacity's factor at those limits (ValueError: cannot run);
    # None: the calibrated capacity for every cell (as where vLLM's cache is sized without profiling, on a CPU)
    limits_kv: Callable[[int, int], float] | None = None

    def weight_prior(self, weights: WeightPrecision, max_num_seqs: int, max_num_batched_tokens: int) -> WeightPrior:
        if self.weight_priors is None:
            return WeightPrior()
        return self.weight_priors(weights, max_num_seqs, max_num_batched_tokens)

    def __call__(self, cell: Cell) -> ReplicaModel:
        if cell.tensor_parallel_size != self.tensor_parallel_size or (
                cell.weights != self.weights and not cell.precision_changed):
            raise ValueError(f"the calibration observed weights {self.weights.value}, tp "
                             f"{self.tensor_parallel_size}; it cannot predict {cell.label()}"
                             + ("" if cell.tensor_parallel_size != self.tensor_parallel_size else
                                " (another precision only for a cell that carries the running one, baseline, so "
                                "that the search proves it on a canary)"))
        if cell.max_num_batched_tokens < cell.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens {cell.max_num_batched_tokens} < max_num_seqs "
                             f"{cell.max_num_seqs}: vLLM refuses it")
        kv_tokens = self.kv_capacity_tokens
        if self.limits_kv is not None and self.kv_capacity_scales:
            kv_tokens = int(kv_tokens * self.limits_kv(cell.max_num_seqs, cell.max_num_batched_tokens))
        if cell.kv_cache != self.kv_cache:
            if not cell.precision_changed:
                raise ValueError(f"the calibration observed KV {self.kv_cache.value}; {cell.label()} can only be "
                                 "predicted by a prior, for a cell that carries the running precision (baseline) so "
                                 "that the search proves it on a canary")
            if self.kv_capacity_scales:
                kv_tokens = int(kv_tokens * self.kv_cache.bytes_per_element / cell.kv_cache.bytes_per_element)
        cost = self.step_cost
        if cell.weights != self.weights:
            prior = self.weight_prior(cell.weights, cell.max_num_seqs, cell.max_num_batched_tokens)
            if prior.cannot_run is not None:
                raise ValueError(prior.cannot_run)
            cost = scaled(cost, prior.step_scale)
            if self.kv_capacity_scales:
                kv_tokens = int(kv_tokens * prior.kv_scale)
        if self.max_model_len is not None and kv_tokens < self.max_model_len:
            raise ValueError(f"{cell.label()}: a KV cache of {kv_tokens} tokens cannot hold one max_model_len "
                             f"({self.max_model_len}) request; vLLM refuses to start it")
        return replica_from_fit(cost, kv_capacity_tokens=kv_tokens,
                                block_size=self.block_size, max_num_seqs=cell.max_num_seqs,
                                max_num_batched_tokens=cell.max_num_batched_tokens, max_model_len=self.max_model_len,
                                gpus=self.tensor_parallel_size, usd_per_hour=self.usd_per_hour, name=cell.label(),
                                api_path_s=self.api_path_s, prefix_caching=self.prefix_caching,
                                api_path_per_request_s=self.api_path_per_request_s)


def scaled(cost: StepCost, factor: float) -> StepCost:
    """Every coefficient of every roof times `factor`."""
    if factor == 1.0:
        return cost
    return StepCost(tuple(Roof(*(v * factor for v in r.as_tuple())) for r in cost.roofs))


def price_per_hour(model: ReplicaModel) -> float:
    """The replica's price; without one, GPUs are the currency (goodput per GPU-hour)."""
    return model.usd_per_hour if model.usd_per_hour else float(model.gpus)


def _tightest(objectives: Sequence[Objective], slis: tuple[str, ...]) -> float | None:
    values = [t.threshold_s for o in objectives for t in o.targets if t.sli in slis]
    return min(values) if values else None


def estimate_rps(model: ReplicaModel, workload: Workload, objectives: Sequence[Objective]) -> float:
    """First-order goodput of one replica (requests/s), no queueing: the best steady batch b whose step time
    keeps the tightest TPOT target, where each step decodes b tokens and prefills the prompts of the b/O
    requests that finish in it, within the token budget and the KV cache (each sequence reserved in full).
    Only an ordering heuristic: the simulation decides."""
    if not len(workload):
        return 0.0
    prompt = float(np.mean(workload.prompt_tokens))
    output = max(float(np.mean(workload.output_tokens)), 1.0)
    cost, budget = model.step_cost, model.max_num_batched_tokens
    ttft = _tightest(objectives, ("ttft", "e2e"))
    chunks = math.ceil(prompt / budget)
    if ttft is not None and chunks * cost.step_time(min(prompt, budget), prompt, 1, prompt * prompt / 2) > ttft:
        return 0.0  # even an idle replica's prefill misses the TTFT target
    tpot = _tightest(objectives, ("tpot", "itl"))
    b_max = max(1.0, min(float(model.max_num_seqs), model.kv_capacity_tokens / (prompt + output)))
    best = 0.0
    for b in np.unique(np.geomspace(1.0, b_max, 48)):
        pre = max(0.0, min(budget - b, b * prompt / output))
        step = cost.step_time(b + pre, b * (prompt + output / 2) + pre, b + pre / prompt,
                              b * (prompt + output / 2) + pre * min(prompt, budget) / 2)
        if tpot is not None and step > tpot:
            break
        best = max(best, min(b / output, pre / prompt) / step)
    return best
