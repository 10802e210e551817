"""Accelerators and model shapes the performance model knows, each with where its figures come from.

FLOP/s are *dense* tensor-core peaks: NVIDIA datasheets print the 2:4-sparsity figure (twice the
dense one) in the headline, and LLM serving runs dense matmuls. Memory sizes are the datasheet's
"GB"; the usable total nvidia-smi reports is a little different, so KV capacities derived from
these are estimates (a replica's own `vllm:cache_config_info` is the measured value). Prices are
assumptions, not quotes: pass your own to the what-if.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from controlplane.engines.tiny_model import TinyModelSpec

TERA = 1e12
GB = 1e9
GIB = 2**30


class WeightPrecision(StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bytes_per_weight(self) -> float:
        return {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}[self.value]


class KvPrecision(StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"

    @property
    def bytes_per_element(self) -> float:
        return {"bf16": 2.0, "fp8": 1.0}[self.value]


# vLLM's --quantization and --kv-cache-dtype values by the precision they store (the catalog's terms), for
# the simulated engine's flags and the search of a running deployment alike.
VLLM_QUANTIZATION: dict[str, WeightPrecision] = {
    "fp8": WeightPrecision.FP8, "awq": WeightPrecision.INT4, "awq_marlin": WeightPrecision.INT4,
    # vLLM's online FP8 shorthands: a 16-bit checkpoint quantized while it loads (per tensor, channel or block).
    "fp8_per_tensor": WeightPrecision.FP8, "fp8_per_channel": WeightPrecision.FP8,
    "fp8_per_block": WeightPrecision.FP8,
    "gptq": WeightPrecision.INT4, "gptq_marlin": WeightPrecision.INT4, "marlin": WeightPrecision.INT4,
    "bitsandbytes": WeightPrecision.INT4, "int8": WeightPrecision.INT8, "w8a8": WeightPrecision.INT8,
    # compressed-tensors checkpoints vary; INT8 (W8A8) is the common case. Say so in the config.
    "compressed-tensors": WeightPrecision.INT8}
# The --quantization values that quantize a 16-bit checkpoint as it loads, so a running deployment can switch to
# them (or back, "none") by a flag; the others need a checkpoint quantized beforehand (another model path).
# vLLM 0.32's CPU backend runs fp8_per_channel; its plain "fp8" lacks a CPU kernel (measured here).
ONLINE_QUANTIZATION: tuple[str, ...] = ("fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "bitsandbytes")
# "auto" stores the model's own dtype: 16-bit for the checkpoints this plane serves.
VLLM_KV_CACHE_DTYPE: dict[str, KvPrecision] = {
    "auto": KvPrecision.BF16, "bfloat16": KvPrecision.BF16, "float16": KvPrecision.BF16,
    "fp8": KvPrecision.FP8, "fp8_e4m3": KvPrecision.FP8, "fp8_e5m2": KvPrecision.FP8}


def vllm_weights(quantization: str | None) -> WeightPrecision:
    """The weight precision of vLLM's --quantization (None: the checkpoint's 16-bit weights)."""
    return WeightPrecision.BF16 if quantization is None else VLLM_QUANTIZATION[quantization]


class CatalogError(ValueError):
    """An unknown name or an impossible combination, with what is allowed."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense peak FLOP/s
    fp8_flops: float | None  # dense peak; None: no FP8 tensor cores (Ampere)
    # What CUDA reports as the device's total (cudaMemGetInfo), which vLLM multiplies by
    # gpu_memory_utilization: the board's marketed "80 GB" is neither 80e9 bytes nor all visible. Taken
    # from vLLM's own startup line "total_gpu_memory (… GiB)" where a public log names the card, else
    # nvidia-smi's total less the ~0.5 GiB the driver keeps (each source says which).
    memory_bytes: float
    memory_bw_bytes_s: float
    link_bytes_s: float  # GPU-to-GPU, one direction (what a ring all-reduce moves per step)
    usd_per_hour: float
    source: str
    price_source: str = "assumed: a typical 2025 on-demand price per GPU-hour, not a quote; override it"

    def peak_flops(self, weights: WeightPrecision) -> float:
        """FP8 checkpoints run FP8 matmuls where the hardware has them; everything else computes in
        16-bit (int8/int4 are modelled as weight-only kernels, as Marlin runs them: fewer bytes, same FLOP/s)."""
        if weights is WeightPrecision.FP8 and self.fp8_flops is not None:
            return self.fp8_flops
        return self.bf16_flops


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_position: int
    published_params: float | None  # the model card's figure, to cross-check the shape
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own parameters (none when tied to the embedding): for counting and memory."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def logits_params(self) -> int:
        """The logits matmul's matrix, tied or not (a tied model reads its embedding table for it): a matmul
        over the positions that sample (one per sequence), and a weight read every step."""
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        attention = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down
        return attention + mlp + 2 * self.hidden  # two RMSNorm weights

    @property
    def body_params(self) -> int:
        """Parameters every token multiplies through (all layers): 2 FLOPs each per token."""
        return self.layers * self.layer_params + self.hidden  # + final norm

    @property
    def params(self) -> int:
        return self.body_params + self.embed_params + self.head_params

    def kv_bytes_per_token(self, kv: KvPrecision) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv.bytes_per_element

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def _nvidia(kind: str) -> str:
    return f"NVIDIA {kind} datasheet (dense tensor-core figures: half of the with-sparsity headline)"


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("H100-80GB", bf16_flops=989.4 * TERA, fp8_flops=1978.9 * TERA, memory_bytes=79.1 * GIB,
                memory_bw_bytes_s=3.35 * TERA, link_bytes_s=450 * GB, usd_per_hour=3.00,
                source=_nvidia("H100 SXM5") + "; HBM3 3.35 TB/s; NVLink 900 GB/s bidirectional; "
                       "memory as CUDA sees it: 79.1 GiB (vLLM logs total_gpu_memory 79.11-79.19 GiB; nvidia-smi "
                       "81,559 MiB, vllm-project/vllm#55169)"),
    Accelerator("H200", bf16_flops=989.4 * TERA, fp8_flops=1978.9 * TERA, memory_bytes=139.8 * GIB,
                memory_bw_bytes_s=4.8 * TERA, link_bytes_s=450 * GB, usd_per_hour=3.80,
                source=_nvidia("H200 SXM") + "; HBM3e 141 GB at 4.8 TB/s; NVLink 900 GB/s bidirectional; "
                       "memory as CUDA sees it: 139.8 GiB (a vLLM log: total_gpu_memory 139.81 GiB)"),
    Accelerator("A100-80GB", bf16_flops=312 * TERA, fp8_flops=None, memory_bytes=79.2 * GIB,
                memory_bw_bytes_s=2.039 * TERA, link_bytes_s=300 * GB, usd_per_hour=1.80,
                source=_nvidia("A100 SXM4 80GB") + "; HBM2e 2,039 GB/s; NVLink 600 GB/s bidirectional; no FP8; "
                       "memory as CUDA sees it: 79.2 GiB (vLLM logs: total_gpu_memory 79.15-79.25 GiB)"),
    Accelerator("L40S", bf16_flops=362.05 * TERA, fp8_flops=733 * TERA, memory_bytes=44.3 * GIB,
                memory_bw_bytes_s=864 * GB, link_bytes_s=32 * GB, usd_per_hour=1.20,
                source=_nvidia("L40S") + "; GDDR6 864 GB/s; PCIe Gen4 x16 (64 GB/s bidirectional); "
                       "memory as CUDA sees it: 44.3 GiB (vLLM logs on L40S: total_gpu_memory 44.31-44.39 GiB)"),
    Accelerator("L4", bf16_flops=121 * TERA, fp8_flops=242.5 * TERA, memory_bytes=22.0 * GIB,
                memory_bw_bytes_s=300 * GB, link_bytes_s=32 * GB, usd_per_hour=0.70,
                source=_nvidia("L4") + "; GDDR6 300 GB/s; PCIe Gen4 x16; memory as CUDA sees "
                       "it: about 22.0 GiB (nvidia-smi 23,034 MiB less ~0.5 GiB; approximate)"),
    Accelerator("A10G", bf16_flops=70 * TERA, fp8_flops=None, memory_bytes=22.0 * GIB,
                memory_bw_bytes_s=600 * GB, link_bytes_s=32 * GB, usd_per_hour=1.00,
                source="AWS G5 variant of the A10; NVIDIA publishes no A10G datasheet. 24 GB GDDR6 at "
                       "600 GB/s (same as the A10) is certain; about 22.0 GiB of it visible to CUDA (nvidia-smi "
                       "23,028 MiB less ~0.5 GiB; approximate); the ~70 TFLOP/s BF16 tensor figure is "
                       "third-party (Baseten, 'A10 vs A10G') and approximate. No FP8."),
)}

_TINY = TinyModelSpec()

MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("Llama-3.1-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
               vocab=128256, tied_embeddings=False, max_position=131072, published_params=8.03e9,
               source="meta-llama/Llama-3.1-8B config.json; 8.03B parameters (model card)",
               aliases=("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                        "meta-llama/Meta-Llama-3.1-8B-Instruct")),
    ModelShape("Llama-3.1-70B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
               vocab=128256, tied_embeddings=False, max_position=131072, published_params=70.6e9,
               source="meta-llama/Llama-3.1-70B config.json; 70.6B parameters (model card)",
               aliases=("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                        "meta-llama/Meta-Llama-3.1-70B-Instruct")),
    ModelShape("Qwen2.5-7B", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
               vocab=152064, tied_embeddings=False, max_position=32768, published_params=7.61e9,
               source="Qwen/Qwen2.5-7B-Instruct config.json (32768 positions; 131072 with YaRN); 7.61B "
                      "parameters (model card). q/k/v biases not counted",
               aliases=("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct")),
    ModelShape("Qwen2.5-32B", layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648,
               vocab=152064, tied_embeddings=False, max_position=32768, published_params=32.5e9,
               source="Qwen/Qwen2.5-32B-Instruct config.json (32768 positions; 131072 with YaRN); 32.5B "
                      "parameters (model card). q/k/v biases not counted",
               aliases=("Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct")),
    ModelShape("Mistral-7B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
               vocab=32768, tied_embeddings=False, max_position=32768, published_params=7.25e9,
               source="mistralai/Mistral-7B-v0.3 config.json; 7.25B parameters (model card)",
               aliases=("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3")),
    ModelShape("tiny", layers=_TINY.num_hidden_layers, hidden=_TINY.hidden_size, heads=_TINY.num_attention_heads,
               kv_heads=_TINY.num_key_value_heads, head_dim=_TINY.hidden_size // _TINY.num_attention_heads,
               intermediate=_TINY.intermediate_size, vocab=_TINY.vocab_size, tied_embeddings=False,
               max_position=_TINY.max_position_embeddings, published_params=None,
               source="controlplane/engines/tiny_model.py TinyModelSpec (the locally built test model; "
                      "the trained tokenizer may hold slightly fewer than vocab_size tokens)",
               aliases=("controlplane-tiny",)),
)}


def _key(name: str) -> str:
    return name.strip().lower()


_ACCEL_INDEX = {_key(a.name): a for a in ACCELERATORS.values()} | {
    "h100": ACCELERATORS["H100-80GB"], "h100-sxm": ACCELERATORS["H100-80GB"],
    "h200-141gb": ACCELERATORS["H200"], "a100": ACCELERATORS["A100-80GB"],
}
_MODEL_INDEX = {_key(alias): m for m in MODELS.values() for alias in (m.name, *m.aliases)}


def accelerator(name: str) -> Accelerator:
    try:
        return _ACCEL_INDEX[_key(name)]
    except KeyError:
        raise CatalogError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}") from None


def model(name: str) -> ModelShape:
    try:
        return _MODEL_INDEX[_key(name)]
    except KeyError:
        raise CatalogError(f"unknown model {name!r}; known: {', '.join(MODELS)} "
                           "(or their Hugging Face ids)") from None


_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def shape_from_hf_config(config: Mapping[str, Any], name: str) -> ModelShape:
    """A dense decoder's shape from its Hugging Face config.json (Llama-style keys, as vLLM reads them), so a model
    the catalog does not list still gets a roofline. Raises CatalogError naming a missing or bad key, and for a
    mixture of experts (the roofline models dense layers only). A missing `tie_word_embeddings` is taken as
    untied, the default of the Llama, Mistral and Qwen2 config classes."""
    experts = [k for k in _EXPERT_KEYS if config.get(k)]
    if experts:
        raise CatalogError(f"{name}: config.json describes a mixture of experts ({', '.join(experts)}); the roofline "
                           "models dense layers only")

    def whole(key: str, default: int | None = None) -> int:
        value = config.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CatalogError(f"{name}: config.json has no whole number >= 1 for {key!r} (got {value!r})")
        return value

    hidden, heads = whole("hidden_size"), whole("num_attention_heads")
    return ModelShape(name, layers=whole("num_hidden_layers"), hidden=hidden, heads=heads,
                      kv_heads=whole("num_key_value_heads", heads), head_dim=whole("head_dim", hidden // heads),
                      intermediate=whole("intermediate_size"), vocab=whole("vocab_size"),
                      tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                      max_position=whole("max_position_embeddings", 2048), published_params=None,
                      source=f"{name}: its config.json")


def weight_precision(name: str) -> WeightPrecision:
    try:
        return WeightPrecision(_key(name))
    except ValueError:
        raise CatalogError(f"unknown weight precision {name!r}; allowed: "
                           f"{', '.join(p.value for p in WeightPrecision)}") from None


def kv_precision(name: str) -> KvPrecision:
    try:
        return KvPrecision(_key(name))
    except ValueError:
        raise CatalogError(f"unknown KV-cache precision {name!r}; allowed: "
                           f"{', '.join(p.value for p in KvPrecision)}") from None
