"""The Deployment spec (`apiVersion: controlplane/v1`, `kind: Deployment`) and its frozen domain form.

The YAML is validated by pydantic with unknown fields rejected, so a typo fails before anything
starts, with the field's path and what is allowed. `load_deployment` turns it into `Deployment`,
the only form the rest of the plane sees.

A deployment with a `simulated` section runs the simulated engine (controlplane.engines.sim_server) instead of
vLLM: an OpenAI-compatible server whose timing is the performance model's for a catalog model on the catalog
accelerator named in `hardware.accelerator`, started, probed, scaled and stopped like vLLM:

    spec:
      model: {served_name: llama-8b}           # path: not needed (nothing is loaded)
      simulated: {model: Llama-3.1-8B}         # a catalog model or its Hugging Face id; speedup: 1.0
      hardware: {accelerator: H100-80GB}       # price_per_hour_usd: the catalog's when not given
      engine: {max_num_seqs: 64}               # vLLM's flags, honoured by the simulated scheduler

Left out, `hardware.price_per_hour_usd` is the catalog's assumed price of that accelerator and
`hardware.count_per_replica` is `engine.tensor_parallel_size`; both are written into the stored spec, so the
cost figures use them. A vLLM deployment on an accelerator likewise defaults `count_per_replica` to tensor x
pipeline parallel. The engine flags are checked by the simulated engine's own parser when the spec loads.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from controlplane.engines.vllm_server import SimulatedEngine
from controlplane.tuning import catalog

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$"
# Flags the plane sets itself; passing them through extra_args would fight the supervisor.
RESERVED_FLAGS = ("--host", "--port", "--model", "--served-model-name", "--otlp-traces-endpoint")


class SpecError(ValueError):
    """A spec that cannot be used; the message names the source, the field and what is allowed."""


class _Strict(BaseModel):
    # NaN and infinity are never a setting (an infinite price reads as unknown, an infinite timeout never fires).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Strict):
    path: str | None = Field(default=None, min_length=1,
                             description="directory of a Hugging Face model (local; nothing is downloaded); "
                                         "required unless the deployment is simulated")
    served_name: str = Field(min_length=1, max_length=200)


def _a_number(v: Any) -> Any:
    """An engine count or fraction is a number: pydantic's lax mode would read true as 1 and "8" as 8, so a posted
    {"max_num_seqs": true} started a rolling change to 1 sequence. (A whole float, 2048.0, stays accepted.)"""
    if isinstance(v, bool | str | bytes):
        raise ValueError(f"must be a number, not {type(v).__name__} {v!r}")
    return v


Count = Annotated[int, BeforeValidator(_a_number)]
Fraction = Annotated[float, BeforeValidator(_a_number)]


class EngineSection(_Strict):
    max_num_seqs: Count | None = Field(default=None, ge=1, le=65536)
    max_num_batched_tokens: Count | None = Field(default=None, ge=16, le=4_194_304)
    max_model_len: Count | None = Field(default=None, ge=16, le=16_777_216)  # 16M tokens: past any model's
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = "auto"
    quantization: Literal["fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "awq", "gptq",
                          "compressed-tensors", "bitsandbytes", "int8", "w8a8"] | None = None
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    gpu_memory_utilization: Fraction | None = Field(default=None, gt=0.0, le=1.0)
    tensor_parallel_size: Count = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: Count = Field(default=1, ge=1, le=64)
    num_gpu_blocks_override: Count | None = Field(default=None, ge=2, le=16_777_216)
    kv_cache_space_gib: Count | None = Field(default=None, ge=1, le=65_536,
                                             description="CPU engine: VLLM_CPU_KVCACHE_SPACE")
    extra_args: tuple[str, ...] = ()

    @field_validator("extra_args")
    @classmethod
    def _no_reserved(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for arg in v:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_FLAGS:
                allowed = ", ".join(RESERVED_FLAGS)
                raise ValueError(f"{flag} is set by the plane; allowed: any vLLM flag except {allowed}")
        return v


class ReplicasSection(_Strict):
    min: int = Field(default=1, ge=0, le=1000)
    max: int = Field(default=1, ge=1, le=1000)
    initial: int | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicasSection:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must lie in [min, max] = [{self.min}, {self.max}]")
        return self


class HardwareSection(_Strict):
    accelerator: str = Field(default="cpu", min_length=1, description="'cpu' or a catalog name such as H100-80GB")
    count_per_replica: float = Field(default=1, gt=0, le=1024, description="accelerators (or CPU cores) per replica")
    price_per_hour_usd: float = Field(default=0.0, ge=0, le=10_000,
                                      description="price of ONE accelerator (or core) per hour")


class SimulatedSection(_Strict):
    """Run the simulated engine instead of vLLM (see the module doc)."""

    model: str = Field(min_length=1, description="a catalog model (e.g. Llama-3.1-8B) or its Hugging Face id")
    speedup: float = Field(default=1.0, gt=0, le=1000, description="simulated seconds per wall-clock second")


class LocalBackend(_Strict):
    kind: Literal["local"] = "local"
    host: str = "127.0.0.1"
    base_port: int = Field(default=8100, ge=1024, le=65000)
    cpu_cores: tuple[tuple[int, ...], ...] = Field(
        default=(), description="core sets that replica slots cycle through, e.g. [[0], [1]]; empty: no pinning. "
                                "vLLM's CPU engine otherwise binds every replica's compute thread to the same cores")


class RayBackend(_Strict):
    kind: Literal["ray"]
    address: str = Field(default="auto", description="Ray cluster address (host:port, ray://..., or auto)")
    namespace: str = "controlplane"
    num_cpus_per_replica: float = Field(default=1, ge=0)
    num_gpus_per_replica: float = Field(default=0, ge=0)
    base_port: int = Field(default=8200, ge=1024, le=65000)
    cpu_cores: tuple[tuple[int, ...], ...] = Field(
        default=(), description="CPU engines: core sets on the node that replica slots cycle through")


class ExternalBackend(_Strict):
    kind: Literal["external"]
    urls: tuple[str, ...] = Field(min_length=1)

    @field_validator("urls")
    @classmethod
    def _http(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for u in v:
            try:  # httpx parses it as the probes and the router will (a port like 8000x fails there, not here)
                ok = re.match(r"^https?://[^/\s]+", u) is not None and bool(httpx.URL(u).host)
            except (httpx.InvalidURL, ValueError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{u!r} is not an http(s) URL like http://10.0.0.5:8000")
        return v


class LifecycleSection(_Strict):
    ready_timeout_s: float = Field(default=600, gt=0, le=86_400,
                                   description="start-up longer than this counts as failed")
    probe_interval_s: float = Field(default=2, ge=0.001, le=3600)
    probe_timeout_s: float = Field(default=5, gt=0, le=3600)
    liveness_failures: int = Field(default=3, ge=1, description="consecutive failed /health probes -> restart")
    restart_backoff_initial_s: float = Field(default=5, ge=0, le=86_400)
    restart_backoff_max_s: float = Field(default=300, gt=0, le=86_400)
    crashloop_restarts: int = Field(default=5, ge=1, description="crashes within crashloop_window_s -> give up")
    crashloop_window_s: float = Field(default=600, gt=0, le=7 * 86_400)
    drain_timeout_s: float = Field(default=120, ge=0, le=86_400)


class QualitySection(_Strict):
    """How far a cheaper precision may drift from the current configuration (the tuner's quality guard)."""

    min_greedy_agreement: float = Field(default=0.9, ge=0, le=1, description="mean share of greedy tokens kept")
    max_logprob_drift: float = Field(default=0.5, ge=0, description="worst mean |delta logprob|, nats")


class TuningSection(_Strict):
    """What the configuration search (`POST /api/v1/deployments/{name}/search`) may try for this deployment."""

    max_num_seqs: tuple[int, ...] = Field(default=(), max_length=16,
                                          description="allowed values; empty: 1/4x to 2x the current one")
    max_num_batched_tokens: tuple[int, ...] = Field(default=(), max_length=16,
                                                    description="allowed values; empty: 1/2x to 2x the current one")
    kv_cache_dtype: tuple[Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"], ...] = Field(
        default=(), max_length=5, description="KV-cache dtypes the search may choose; empty: the current one only. "
                                              "A lower precision is recommended only after a canary trial and the "
                                              "quality guard")
    quantization: tuple[Literal["none", "fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block",
                                "bitsandbytes"], ...] = Field(
        default=(), max_length=6, description="weight quantizations the search may choose, among vLLM's that "
                                              "quantize the 16-bit checkpoint as it loads ('none': its own "
                                              "weights); empty: the current one only. A lower precision is "
                                              "recommended only after a canary trial and the quality guard")
    canary_trials: int = Field(default=0, ge=0, le=5, description="configurations tried for real on a canary "
                                                                  "replica before one is recommended (another "
                                                                  "precision that failed before any load does "
                                                                  "not count); 0: none")
    canary_requests: int = Field(default=200, ge=20, le=5000, description="requests of one canary trial")

    @field_validator("max_num_seqs", "max_num_batched_tokens")
    @classmethod
    def _positive_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(x < 1 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"values must be distinct whole numbers >= 1, got {list(v)}")
        return v

    @field_validator("kv_cache_dtype", "quantization")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {list(v)}")
        return v


class DeploymentBody(_Strict):
    model: ModelSection
    simulated: SimulatedSection | None = None
    engine: EngineSection = EngineSection()
    replicas: ReplicasSection = ReplicasSection()
    hardware: HardwareSection = HardwareSection()
    backend: LocalBackend | RayBackend | ExternalBackend = Field(default=LocalBackend(), discriminator="kind")
    lifecycle: LifecycleSection = LifecycleSection()
    quality: QualitySection = QualitySection()
    tuning: TuningSection = TuningSection()

    @model_validator(mode="after")
    def _kv_dtypes_apart(self) -> DeploymentBody:
        why = kv_dtype_conflict(self.engine.kv_cache_dtype, self.tuning.kv_cache_dtype)
        if why is not None:
            raise ValueError(f"tuning.kv_cache_dtype: {why}")
        why = quantization_conflict(self.engine.quantization, self.tuning.quantization)
        if why is not None:
            raise ValueError(f"tuning.quantization: {why}")
        return self


# vLLM's --kv-cache-dtype values that are another name of one format: "auto" is the model's own dtype (16-bit
# for the checkpoints this plane serves), and vLLM's "fp8" is e4m3.
_KV_FORMAT = {"auto": "bfloat16", "fp8": "fp8_e4m3"}


def _kv_width(kv_cache_dtype: str) -> float:
    """Bytes per KV element of a --kv-cache-dtype value (as the search tells precisions apart)."""
    return catalog.VLLM_KV_CACHE_DTYPE[kv_cache_dtype].bytes_per_element


def same_kv_format(a: str, b: str) -> bool:
    return _KV_FORMAT.get(a, a) == _KV_FORMAT.get(b, b)


def kv_dtype_conflict(running: str, allowed: Sequence[str]) -> str | None:
    """Why the search could not tell the allowed KV-cache dtypes apart, or None: it knows bytes per element only,
    so two formats of one width (fp8_e4m3 and fp8_e5m2, the running one included) would be one cell."""
    seen = {_kv_width(running): running}
    for d in allowed:
        first = seen.setdefault(_kv_width(d), d)
        if not same_kv_format(first, d):
            running_note = " (the running one)" if first == running else ""
            return (f"{d} and {first}{running_note} store different formats of one width, which the search cannot "
                    "tell apart (it knows bytes per element only); allow one of them")
    return None


def quantization_conflict(running: str | None, allowed: Sequence[str], *, checkpoint: str | None = None) -> str | None:
    """Why the search could not switch the weights among `allowed`, or None. It switches by vLLM's flag only, so
    the running weights must be the checkpoint's own (not saved quantized: `checkpoint`, from its config.json, when
    known) or an online quantization; and it knows bytes per weight only, so two quantizations of one width (fp8
    and fp8_per_channel, the running one included) would be one cell."""
    if not allowed:
        return None
    if checkpoint is not None:
        return (f"the checkpoint itself is quantized ({checkpoint}, in its config.json's quantization_config); the "
                "search cannot change its weights by a flag (serve another checkpoint instead), so allow no other "
                "quantization")
    if running is not None and running not in catalog.ONLINE_QUANTIZATION:
        return (f"the running weights come from a checkpoint quantized with {running}; the search cannot change "
                "them by a flag (serve another checkpoint instead), so allow no other quantization")
    seen = {catalog.vllm_weights(running): running or "none"}
    for q in allowed:
        first = seen.setdefault(catalog.vllm_weights(None if q == "none" else q), q)
        if first != q:
            running_note = " (the running one)" if first == (running or "none") else ""
            return (f"{q} and {first}{running_note} quantize to one width, which the search cannot tell apart (it "
                    "knows bytes per weight only); allow one of them")
    return None


class Metadata(_Strict):
    name: str = Field(pattern=NAME_RE, description="lower-case letters, digits and '-', at most 50 characters")
    labels: dict[str, str] = {}


class DeploymentDoc(_Strict):
    apiVersion: Literal["controlplane/v1"]  # noqa: N815 (the YAML key)
    kind: Literal["Deployment"]
    metadata: Metadata
    spec: DeploymentBody


# --- domain -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """What a replica runs with; hashable, stored as before/after of every change."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    num_gpu_blocks_override: int | None = None
    kv_cache_space_gib: int | None = None
    extra_args: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        """Validated like the spec: a stored or posted config with a bad field raises SpecError."""
        try:
            sec = EngineSection.model_validate(d)
        except ValidationError as exc:
            raise SpecError(_describe(exc, "engine config")) from exc
        return cls(**sec.model_dump())

    def with_changes(self, changes: dict[str, Any]) -> EngineConfig:
        return EngineConfig.from_dict({**self.as_dict(), **changes})

    @property
    def prefix_caching(self) -> bool:
        """Whether vLLM runs with its prefix cache: on (V1's default) unless extra_args turn it off; the last of
        --enable-prefix-caching / --no-enable-prefix-caching wins, as in vLLM's argparse."""
        return self._switch("prefix-caching")

    @property
    def chunked_prefill(self) -> bool:
        """Whether vLLM chunks prefills (V1's default), as `prefix_caching` reads its switch."""
        return self._switch("chunked-prefill")

    def _switch(self, name: str) -> bool:
        on = True
        for arg in self.extra_args:
            flag = arg.replace("_", "-")  # vLLM's parser takes --enable_prefix_caching too
            if flag in (f"--enable-{name}", f"--no-enable-{name}"):
                on = flag == f"--enable-{name}"
        return on

    def vllm_args(self) -> list[str]:
        """The vLLM command-line flags for this config (defaults left to vLLM)."""
        args: list[str] = []
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
                    "num_gpu_blocks_override", "quantization"):
            value = getattr(self, key)
            if value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.pipeline_parallel_size != 1:
            args += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        return args + list(self.extra_args)


@dataclass(frozen=True)
class Deployment:
    name: str
    model_path: str
    served_name: str
    engine: EngineConfig
    min_replicas: int
    max_replicas: int
    initial_replicas: int
    accelerator: str
    accelerators_per_replica: float
    price_per_accelerator_hour_usd: float
    backend: LocalBackend | RayBackend | ExternalBackend
    lifecycle: LifecycleSection
    quality: QualitySection = QualitySection()
    tuning: TuningSection = TuningSection()
    spec: dict[str, Any] = field(default_factory=dict, compare=False)  # the document as given, for the store
    simulated: SimulatedEngine | None = None  # None: vLLM

    @property
    def price_per_replica_hour_usd(self) -> float:
        return self.accelerators_per_replica * self.price_per_accelerator_hour_usd

    def with_engine(self, engine: EngineConfig) -> Deployment:
        return replace(self, engine=engine)


def port_conflicts(deployments: Sequence[Deployment], reserved: Mapping[str, int] | None = None) -> list[str]:
    """Why the deployments' replica ports would collide, if they would: each local deployment takes the ports
    base_port .. base_port + max (one more slot than max, for the surge of a rolling change) on this host,
    each Ray deployment the same on the nodes of the one Ray cluster the plane joins (the first Ray
    deployment's address: see `default_backends`); `reserved` names ports the plane listens on."""
    ranges = []
    for d in deployments:
        b = d.backend
        if isinstance(b, LocalBackend | RayBackend):
            where = "this host" if isinstance(b, LocalBackend) else "the Ray cluster"
            ranges.append((d.name, where, b.base_port, b.base_port + d.max_replicas))
    out = []
    for i, (name, where, lo, hi) in enumerate(ranges):
        for other, where2, lo2, hi2 in ranges[i + 1:]:
            if where == where2 and lo <= hi2 and lo2 <= hi:
                out.append(f"{name} (ports {lo}-{hi}) and {other} (ports {lo2}-{hi2}) overlap on {where}: "
                           f"give one of them another backend.base_port")
        if where == "this host":
            for what, port in (reserved or {}).items():
                if port and lo <= port <= hi:
                    out.append(f"{name} (ports {lo}-{hi}) takes the {what} port {port}: "
                               f"change its backend.base_port or the {what} port")
    return out


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(document)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; see the Deployment spec in the README)"
        elif err["type"] == "literal_error":
            msg = f"{msg}, got {err.get('input')!r}"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_deployment(doc: Any, source: str = "deployment spec") -> Deployment:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a mapping with apiVersion, kind, metadata, spec; got {type(doc).__name__}")
    try:
        d = DeploymentDoc.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_describe(exc, source)) from exc
    s = d.spec
    if s.replicas.max < 1:
        raise SpecError(f"{source}: spec.replicas.max must be >= 1")
    if isinstance(s.backend, ExternalBackend):
        n = len(s.backend.urls)
        initial = n
    else:
        initial = s.replicas.initial if s.replicas.initial is not None else max(s.replicas.min, 1)
        if initial > s.replicas.max:
            raise SpecError(f"{source}: spec.replicas: initial {initial} exceeds max {s.replicas.max}")
    if isinstance(s.backend, LocalBackend | RayBackend) and any(not cores for cores in s.backend.cpu_cores):
        raise SpecError(f"{source}: spec.backend.cpu_cores: every core set needs at least one core, e.g. [[0], [1]]")
    engine = EngineConfig(**s.engine.model_dump())
    stored = d.model_dump(mode="json")
    if s.simulated is None:
        del stored["spec"]["simulated"]  # a vLLM deployment's stored document stays as it was before the section
    if s.tuning == TuningSection():
        del stored["spec"]["tuning"]  # likewise: a spec without the section is stored as before it existed
    hardware = s.hardware
    simulated = None
    if s.simulated is not None:
        simulated, hardware = _simulated(s, engine, source)
        stored["spec"]["hardware"] = hardware.model_dump(mode="json")
    elif s.model.path is None and s.backend.kind != "external":  # the plane starts nothing of an external one
        raise SpecError(f"{source}: spec.model.path: required (a local model directory) unless the deployment is "
                        "simulated (spec.simulated) or external (backend kind external)")
    else:
        hardware = _vllm_hardware(s, engine, source)
        if hardware != s.hardware:  # a default filled in: stored, as the simulated engine's (else stored as given)
            stored["spec"]["hardware"] = hardware.model_dump(mode="json")
    return Deployment(
        name=d.metadata.name, model_path=s.model.path or "", served_name=s.model.served_name, engine=engine,
        min_replicas=s.replicas.min, max_replicas=s.replicas.max, initial_replicas=initial,
        accelerator=hardware.accelerator, accelerators_per_replica=hardware.count_per_replica,
        price_per_accelerator_hour_usd=hardware.price_per_hour_usd,
        backend=s.backend, lifecycle=s.lifecycle, quality=s.quality, tuning=s.tuning, spec=stored,
        simulated=simulated,
    )


def _vllm_hardware(s: DeploymentBody, engine: EngineConfig, source: str) -> HardwareSection:
    """A vLLM deployment's hardware: on an accelerator, a replica holds tensor x pipeline parallel of them, which is
    `count_per_replica` when left out (at 1, a TP 4 replica was priced as one GPU); a Ray actor must reserve as
    many GPUs as vLLM will use."""
    gpus = engine.tensor_parallel_size * engine.pipeline_parallel_size
    if isinstance(s.backend, RayBackend) and 0 < s.backend.num_gpus_per_replica < gpus:
        raise SpecError(f"{source}: spec.backend.num_gpus_per_replica: vLLM uses tensor_parallel_size x "
                        f"pipeline_parallel_size = {gpus} GPUs per replica, but the actor reserves "
                        f"{s.backend.num_gpus_per_replica:g}; reserve {gpus} (or 0 to leave placement to vLLM)")
    if s.hardware.accelerator == "cpu" or "count_per_replica" in s.hardware.model_fields_set:
        return s.hardware
    return s.hardware.model_copy(update={"count_per_replica": gpus})


def _simulated(s: DeploymentBody, engine: EngineConfig, source: str) -> tuple[SimulatedEngine, HardwareSection]:
    """The simulated engine of a spec and its hardware with the catalog's defaults filled in; SpecError naming the
    field when a name is not in the catalog, the backend cannot run it, or the engine would refuse its flags."""
    assert s.simulated is not None
    where = f"{source}: spec"
    if isinstance(s.backend, ExternalBackend):
        raise SpecError(f"{where}.simulated: the external backend runs replicas the plane does not start; "
                        "a simulated deployment needs the local or ray backend")
    if isinstance(s.backend, RayBackend) and s.backend.num_gpus_per_replica > 0:
        raise SpecError(f"{where}.backend.num_gpus_per_replica: the simulated engine uses no GPU; set it to 0 "
                        f"(got {s.backend.num_gpus_per_replica:g})")
    try:
        model = catalog.model(s.simulated.model).name
    except catalog.CatalogError as exc:
        raise SpecError(f"{where}.simulated.model: {exc}") from None
    try:
        accelerator = catalog.accelerator(s.hardware.accelerator)
    except catalog.CatalogError as exc:
        raise SpecError(f"{where}.hardware.accelerator: the simulated engine needs a catalog accelerator: "
                        f"{exc}") from None
    sim = SimulatedEngine(model, accelerator.name, s.simulated.speedup)
    _check_engine_flags(sim, engine, f"{where}.engine")
    given = s.hardware.model_fields_set
    hardware = s.hardware.model_copy(update={
        "accelerator": accelerator.name,
        "count_per_replica": s.hardware.count_per_replica if "count_per_replica" in given
        else engine.tensor_parallel_size,
        "price_per_hour_usd": s.hardware.price_per_hour_usd if "price_per_hour_usd" in given
        else accelerator.usd_per_hour,
    })
    return sim, hardware


def _check_engine_flags(sim: SimulatedEngine, engine: EngineConfig, where: str) -> None:
    """Parse the flags a replica would get with the simulated engine's own parser, so a flag it cannot honour
    (a dtype it does not model, an unknown extra arg, max_model_len beyond the KV cache) fails here, not as a
    crash loop. argparse reports a bad flag on stderr and exits; both are caught and turned into the error."""
    from controlplane.engines.sim_server import SimConfigError, config_from_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config_from_args([*sim.args(), *engine.vllm_args()])
    except (SimConfigError, catalog.CatalogError) as exc:
        raise SpecError(f"{where}: the simulated engine refuses it: {exc}") from None
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        why = lines[-1].split("error:", 1)[-1].strip() if lines else "bad flags"
        raise SpecError(f"{where}: the simulated engine refuses it: {why}") from None


def load_deployment(path: Path) -> Deployment:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_deployment(doc, str(path))
