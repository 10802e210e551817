"""What one engine step of a vLLM replica costs, and how many KV tokens the replica holds.

One cost form serves every replica: a step's time is the max of a few linear "roofs" in the step's
features (tokens computed, KV tokens read, sequences, attention query-key pairs). The roofline prior
from the catalog has two roofs, compute and memory; a calibrated replica (GPU or CPU) has one,
alpha + beta*tokens + gamma*kv_read + delta*seqs. Max-of-lines keeps the simulator's closed-form
decode stretches exact for both. Efficiencies (MFU, bandwidth fraction, overheads) are assumptions,
stated in `Efficiency`, to be replaced by calibration where a replica has been observed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from controlplane.tuning.catalog import (
    Accelerator,
    CatalogError,
    KvPrecision,
    ModelShape,
    WeightPrecision,
)

GIB = 2**30


@dataclass(frozen=True)
class Roof:
    """One linear bound on a step's time, in seconds per unit of each feature."""

    const_s: float = 0.0
    per_token_s: float = 0.0
    per_kv_token_s: float = 0.0
    per_seq_s: float = 0.0
    per_attn_pair_s: float = 0.0

    def at(self, tokens: float, kv_read: float, seqs: float, attn_pairs: float) -> float:
        return (self.const_s + self.per_token_s * tokens + self.per_kv_token_s * kv_read
                + self.per_seq_s * seqs + self.per_attn_pair_s * attn_pairs)

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return (self.const_s, self.per_token_s, self.per_kv_token_s, self.per_seq_s, self.per_attn_pair_s)


@dataclass(frozen=True)
class Coefficients:
    """The calibrated linear form: alpha + beta*tokens_in_step + gamma*kv_tokens_read + delta*seqs."""

    alpha_s: float
    beta_s_per_token: float
    gamma_s_per_kv_token: float
    delta_s_per_seq: float = 0.0

    def as_list(self) -> list[float]:
        return [self.alpha_s, self.beta_s_per_token, self.gamma_s_per_kv_token, self.delta_s_per_seq]


@dataclass(frozen=True)
class StepCost:
    """Seconds per engine step = max over `roofs` of each roof's linear function of the step."""

    roofs: tuple[Roof, ...]

    def __post_init__(self) -> None:
        if not self.roofs:
            raise ValueError("a step cost needs at least one roof")
        for i, r in enumerate(self.roofs):
            if any(v < 0 or not math.isfinite(v) for v in r.as_tuple()):
                raise ValueError(f"roof {i} has a negative or non-finite coefficient: {r}")
        # A step with one token must take time, or a simulation would never advance its clock.
        if max(r.const_s + r.per_token_s + r.per_seq_s + r.per_kv_token_s + r.per_attn_pair_s
               for r in self.roofs) <= 0:
            raise ValueError("a step cost must charge something for a one-token step (all coefficients are 0)")

    @staticmethod
    def linear(c: Coefficients) -> StepCost:
        return StepCost((Roof(const_s=c.alpha_s, per_token_s=c.beta_s_per_token,
                              per_kv_token_s=c.gamma_s_per_kv_token, per_seq_s=c.delta_s_per_seq),))

    def step_time(self, tokens: float, kv_read: float, seqs: float, attn_pairs: float | None = None) -> float:
        pairs = kv_read if attn_pairs is None else attn_pairs
        return max(r.at(tokens, kv_read, seqs, pairs) for r in self.roofs)

    def linear_bound(self) -> Coefficients:
        """Each coefficient's max over the roofs: a linear upper bound (features are non-negative),
        used as the prior a calibration shrinks towards. Attention pairs are folded into KV tokens."""
        return Coefficients(
            alpha_s=max(r.const_s for r in self.roofs),
            beta_s_per_token=max(r.per_token_s for r in self.roofs),
            gamma_s_per_kv_token=max(r.per_kv_token_s + r.per_attn_pair_s for r in self.roofs),
            delta_s_per_seq=max(r.per_seq_s for r in self.roofs),
        )

    def prefill_s(self, tokens: int) -> float:
        """One sequence's whole prompt in one step, nothing else in the batch."""
        return self.step_time(tokens, tokens, 1, tokens * (tokens + 1) / 2)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """A decode-only step: `batch` sequences with `context_tokens` each already cached."""
        kv = batch * (context_tokens + 1)
        return self.step_time(batch, kv, batch, kv)


@dataclass(frozen=True)
class ReplicaModel:
    """Everything the simulator needs to know about one replica."""

    step_cost: StepCost
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    reserve_full_sequence: bool = True  # vLLM's scheduler_reserve_full_isl (on by default)
    # vLLM V1's prefix cache (on by default): a preempted request gets back the blocks not yet reused
    prefix_caching: bool = True
    gpus: int = 1
    usd_per_hour: float | None = None  # the whole replica; None: unknown
    name: str = "replica"
    # The API server's path, outside the engine's steps: a request reaches the engine's queue this long after
    # it arrives (HTTP, input processing, the hop to the engine core; on a shared CPU core also the output hop
    # back). vLLM's spans show it as TTFT - queue - prefill; `calibrate.api_path_s` measures it.
    api_path_s: float = 0.0
    # ... plus this much per request already on the replica when it arrives (in the engine or on its way there):
    # the API server's one event loop also streams their tokens, so a new request waits its turn longer the more
    # it serves. `calibrate.api_path_per_request_s` measures it; 0 keeps the path constant.
    api_path_per_request_s: float = 0.0

    def __post_init__(self) -> None:
        for fld, path in (("api_path_s", self.api_path_s), ("api_path_per_request_s", self.api_path_per_request_s)):
            if not (math.isfinite(path) and path >= 0):
                raise ValueError(f"{self.name}: {fld} must be a finite number >= 0, got {path}")
        limits = {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                  "block_size": self.block_size, "num_kv_blocks": self.num_kv_blocks,
                  "max_model_len": self.max_model_len}
        for fld, value in limits.items():
            if value < 1:
                raise ValueError(f"{self.name}: {fld} must be >= 1, got {value}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"{self.name}: max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}), as vLLM requires")
        if self.kv_capacity_tokens < self.max_model_len:
            raise ValueError(f"{self.name}: the KV cache holds {self.kv_capacity_tokens} tokens, fewer than "
                             f"max_model_len {self.max_model_len}; lower max_model_len or give it more memory")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the datasheet peaks and fixed costs: assumptions until calibrated."""

    mfu: float = 0.5  # the worked example in SLO_AND_TUNING.md
    bandwidth: float = 0.8
    step_overhead_s: float = 0.0003  # scheduler + launch per step (CUDA graphs on)
    allreduce_latency_s: float = 10e-6  # per all-reduce call
    runtime_reserve_bytes: float = 1.0 * GIB  # CUDA graphs, NCCL buffers, non-torch memory

    def __post_init__(self) -> None:
        if not (0 < self.mfu <= 1 and 0 < self.bandwidth <= 1):
            raise ValueError(f"mfu and bandwidth must be in (0, 1], got {self.mfu} and {self.bandwidth}")
        if self.step_overhead_s < 0 or self.allreduce_latency_s < 0 or self.runtime_reserve_bytes < 0:
            raise ValueError("overheads must be >= 0")


@dataclass(frozen=True)
class EngineArgs:
    """The vLLM engine arguments the model depends on. None: vLLM's default for the hardware."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.92  # vLLM 0.32's default
    block_size: int = 16
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    weights: WeightPrecision = WeightPrecision.BF16
    kv_cache: KvPrecision = KvPrecision.BF16

    def resolved_limits(self, accel: Accelerator) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) as vLLM 0.32's OpenAI server picks them
        (engine/arg_utils.py: >= 160 GiB: 1024/16384; >= 70 GiB and not A100: 1024/8192; else 256/2048)."""
        mem = accel.memory_bytes
        if mem >= 160 * GIB:
            seqs, tokens = 1024, 16384
        elif mem >= 70 * GIB and "a100" not in accel.name.lower():
            seqs, tokens = 1024, 8192
        else:
            seqs, tokens = 256, 2048
        return (seqs if self.max_num_seqs is None else self.max_num_seqs,
                tokens if self.max_num_batched_tokens is None else self.max_num_batched_tokens)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes: where the memory goes, and the replica's KV capacity."""

    gpu_bytes: float
    usable_bytes: float
    weight_bytes: float
    activation_bytes: float
    kv_bytes: float
    kv_bytes_per_token: float  # whole replica (all TP shards)
    kv_capacity_tokens: int  # whole replica


@dataclass(frozen=True)
class RooflinePrior:
    model: ModelShape
    accelerator: Accelerator
    args: EngineArgs
    efficiency: Efficiency
    step_cost: StepCost
    memory: MemoryPlan
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    notes: tuple[str, ...] = field(default=())

    def replica(self, name: str = "replica", usd_per_gpu_hour: float | None = None) -> ReplicaModel:
        tp = self.args.tensor_parallel_size
        price = self.accelerator.usd_per_hour if usd_per_gpu_hour is None else usd_per_gpu_hour
        return ReplicaModel(
            step_cost=self.step_cost, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, block_size=self.args.block_size,
            num_kv_blocks=self.memory.kv_capacity_tokens // self.args.block_size,
            max_model_len=self.max_model_len, gpus=tp, usd_per_hour=price * tp, name=name)


def roofline(model: ModelShape, accel: Accelerator, args: EngineArgs | None = None,
             eff: Efficiency | None = None) -> RooflinePrior:
    """The first-order model of SLO_AND_TUNING.md, per step instead of per phase.

    Counted exactly: 2 FLOPs per body parameter per token, the LM head only on sampled positions (one per
    sequence: vLLM computes logits for those alone), 4*layers*heads*head_dim FLOPs per attention query-key
    pair, every weight read once per step (the embedding table is gathered, not read), KV read per token
    in context, 2 ring all-reduces per layer under tensor parallelism. Not counted: activation traffic,
    kernel efficiency beyond `eff`, quantisation scales.
    """
    args = args or EngineArgs()
    eff = eff or Efficiency()
    tp = args.tensor_parallel_size
    if tp < 1 or model.heads % tp != 0 or not (model.kv_heads % tp == 0 or tp % model.kv_heads == 0):
        raise CatalogError(f"tensor_parallel_size {tp} must divide {model.name}'s {model.heads} attention heads "
                           f"and divide or be a multiple of its {model.kv_heads} KV heads")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise CatalogError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.block_size < 1:
        raise CatalogError(f"block_size must be >= 1, got {args.block_size}")
    max_seqs, max_tokens = args.resolved_limits(accel)
    notes: list[str] = []

    b_w = args.weights.bytes_per_weight
    # Quantised checkpoints keep the embedding and LM head in 16 bits.
    weight_bytes = (model.body_params * b_w + (model.embed_params + model.head_params) * 2.0) / tp
    act_bytes = (max_tokens * (4 * model.hidden + 2 * model.intermediate // tp) * 2.0
                 + max_seqs * model.vocab * 4.0 + eff.runtime_reserve_bytes)
    usable = accel.memory_bytes * args.gpu_memory_utilization
    kv_heads_per_gpu = max(1, model.kv_heads // tp)
    kv_per_token_gpu = 2.0 * model.layers * kv_heads_per_gpu * model.head_dim * args.kv_cache.bytes_per_element
    kv_bytes = usable - weight_bytes - act_bytes
    if kv_bytes <= 0:
        raise CatalogError(
            f"{model.name} ({args.weights.value}) does not fit on {tp} x {accel.name} at "
            f"gpu_memory_utilization {args.gpu_memory_utilization}: weights {weight_bytes / GIB:.1f} GiB + "
            f"activations {act_bytes / GIB:.1f} GiB per GPU exceed {usable / GIB:.1f} GiB; "
            "raise tensor_parallel_size or quantise")
    kv_tokens = int(kv_bytes // kv_per_token_gpu)
    kv_tokens -= kv_tokens % args.block_size
    if kv_tokens < args.block_size:
        raise CatalogError(
            f"{model.name} ({args.weights.value}) leaves no room for a KV cache block on {tp} x {accel.name} at "
            f"gpu_memory_utilization {args.gpu_memory_utilization} ({kv_bytes / GIB:.3f} GiB per GPU after weights "
            "and activations): raise gpu_memory_utilization or tensor_parallel_size, or quantise")
    max_len = args.max_model_len
    if max_len is not None and max_len > model.max_position:
        raise CatalogError(f"max_model_len {max_len} exceeds {model.name}'s context of {model.max_position} "
                           f"tokens; allowed: at most {model.max_position}")
    if max_len is None:
        max_len = min(model.max_position, kv_tokens)
        if max_len < model.max_position:
            notes.append(f"max_model_len lowered to the KV capacity ({max_len} tokens) from the model's "
                         f"{model.max_position}")
    elif max_len > kv_tokens:
        raise CatalogError(f"max_model_len {max_len} exceeds the KV cache's {kv_tokens} tokens on {tp} x "
                           f"{accel.name}; lower it to at most {kv_tokens}")

    flops = accel.peak_flops(args.weights) * tp * eff.mfu
    bw = accel.memory_bw_bytes_s * tp * eff.bandwidth
    comm_const = comm_per_token = 0.0
    if tp > 1:
        calls = 2 * model.layers
        comm_const = calls * eff.allreduce_latency_s
        comm_per_token = calls * 2.0 * (tp - 1) / tp * model.hidden * 2.0 / accel.link_bytes_s
    const = eff.step_overhead_s + comm_const
    compute = Roof(const_s=const, per_token_s=2.0 * model.body_params / flops + comm_per_token,
                   per_seq_s=2.0 * model.logits_params / flops,
                   per_attn_pair_s=4.0 * model.layers * model.attention_width / flops)
    weights_read = model.body_params * b_w + model.logits_params * 2.0
    memory = Roof(const_s=const + weights_read / bw, per_token_s=comm_per_token,
                  per_kv_token_s=kv_per_token_gpu * tp / bw)
    if kv_heads_per_gpu * tp > model.kv_heads:
        notes.append(f"{model.kv_heads} KV heads replicated over {tp} GPUs")
    plan = MemoryPlan(gpu_bytes=accel.memory_bytes, usable_bytes=usable, weight_bytes=weight_bytes,
                      activation_bytes=act_bytes, kv_bytes=kv_bytes, kv_bytes_per_token=kv_per_token_gpu * tp,
                      kv_capacity_tokens=kv_tokens)
    return RooflinePrior(model=model, accelerator=accel, args=args, efficiency=eff,
                         step_cost=StepCost((compute, memory)), memory=plan, max_num_seqs=max_seqs,
                         max_num_batched_tokens=max_tokens, max_model_len=max_len, notes=tuple(notes))


def replica_from_fit(cost: StepCost, *, kv_capacity_tokens: int, block_size: int, max_num_seqs: int,
                     max_num_batched_tokens: int, max_model_len: int | None = None, gpus: int = 1,
                     usd_per_hour: float | None = None, name: str = "replica",
                     api_path_s: float = 0.0, prefix_caching: bool = True,
                     api_path_per_request_s: float = 0.0) -> ReplicaModel:
    """A replica from calibrated coefficients and its measured KV capacity (`vllm:cache_config_info`)."""
    blocks = kv_capacity_tokens // block_size
    return ReplicaModel(step_cost=cost, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        block_size=block_size, num_kv_blocks=blocks,
                        max_model_len=max_model_len or blocks * block_size, gpus=gpus,
                        usd_per_hour=usd_per_hour, name=name, api_path_s=api_path_s, prefix_caching=prefix_caching,
                        api_path_per_request_s=api_path_per_request_s)
