"""A simulated vLLM engine: an OpenAI-compatible server whose timing comes from the simulator.

    python -m controlplane.engines.sim_server --model Llama-3.1-8B --accelerator H100-80GB \\
        --served-model-name llama-8b --port 8100 [--max-num-seqs N] [--max-num-batched-tokens N] \\
        [--otlp-traces-endpoint HOST:4317 | http://HOST:4318/v1/traces] [--speedup 1.0]

It takes vLLM's flags (the plane launches it with the argv it builds for vLLM) and answers like vLLM:
/health, /v1/models, /v1/completions, /v1/chat/completions, /metrics (vLLM 0.32 series) and one
`llm_request` span per request. Step times come from the roofline model of the catalog model on the
accelerator (or from calibrated coefficients, --step-coefficients); scheduling is the simulator's vLLM V1
scheduler run in real time (sim_engine). So the whole plane can run a GPU-sized fleet on a laptop; every
series, span and response says it is simulated.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

import uvicorn

from controlplane.engines.sim_api import ServedModel, build_app
from controlplane.engines.sim_engine import LiveEngine
from controlplane.engines.sim_metrics import RequestSpans, SimTelemetry
from controlplane.settings import host_port
from controlplane.tuning import catalog
from controlplane.tuning.catalog import CatalogError, KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, EngineArgs, ReplicaModel, StepCost, roofline

DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.32's default
DEFAULT_BLOCK_SIZE = 16  # vLLM's default on GPUs
_DTYPES = ("auto", "bfloat16", "float16", "half", "bf16")


class SimConfigError(ValueError):
    """A flag the simulated engine cannot honour, with what is allowed."""


@dataclass(frozen=True)
class SimServerConfig:
    replica: ReplicaModel
    served_model_name: str
    model: str  # the catalog model
    accelerator: str
    num_gpu_blocks: int  # as vLLM reports it: the usable blocks plus the one it keeps back (the null block)
    host: str = "127.0.0.1"
    port: int = 8000
    speedup: float = 1.0
    otlp_traces_endpoint: str | None = None
    otlp_protocol: str | None = None  # None: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else grpc (as vLLM)
    resource_attributes: Mapping[str, str] = field(default_factory=dict)  # over OTEL_RESOURCE_ATTRIBUTES
    stream_interval: int = 1
    access_log: bool = True
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None

    def cache_info(self) -> dict[str, str]:
        """vllm:cache_config_info's labels (the ones the plane reads, and a few vLLM always sets)."""
        bs, max_len = self.replica.block_size, self.replica.max_model_len
        # vLLM 0.32's arithmetic (kv_cache_utils.get_kv_cache_capacity): whole blocks per max-length request.
        concurrency = self.num_gpu_blocks / -(-max_len // bs)
        return {"block_size": str(bs), "num_gpu_blocks": str(self.num_gpu_blocks),
                "kv_cache_size_tokens": str(int(concurrency * max_len)),
                "kv_cache_max_concurrency": str(concurrency),
                "cache_dtype": self.kv_cache_dtype, "gpu_memory_utilization": str(self.gpu_memory_utilization),
                "enable_prefix_caching": str(self.replica.prefix_caching),
                "num_gpu_blocks_override": str(self.num_gpu_blocks_override),
                "simulated": "True"}


def replica_model(*, model: str, accelerator: str, served_name: str = "replica", max_num_seqs: int | None = None,
                  max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
                  gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, block_size: int = DEFAULT_BLOCK_SIZE,
                  tensor_parallel_size: int = 1, weights: WeightPrecision = WeightPrecision.BF16,
                  kv_cache: KvPrecision = KvPrecision.BF16, num_gpu_blocks_override: int | None = None,
                  step_cost: StepCost | None = None) -> tuple[ReplicaModel, int]:
    """The replica the engine simulates and the block count vLLM would report for it. As in vLLM, one block is
    kept back (the null block), so the usable KV cache is one block smaller than num_gpu_blocks says."""
    shape, accel = catalog.model(model), catalog.accelerator(accelerator)
    args = EngineArgs(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                      tensor_parallel_size=tensor_parallel_size, weights=weights, kv_cache=kv_cache)
    prior = roofline(shape, accel, args)
    total = num_gpu_blocks_override if num_gpu_blocks_override is not None else \
        prior.memory.kv_capacity_tokens // block_size
    usable_tokens = (total - 1) * block_size
    if usable_tokens < 1:
        raise SimConfigError(f"num_gpu_blocks {total} leaves no usable KV block (vLLM keeps one back); use >= 2")
    if max_model_len is not None and max_model_len > usable_tokens:
        raise SimConfigError(f"max_model_len {max_model_len} exceeds the KV cache's {usable_tokens} usable tokens "
                             f"({total} blocks of {block_size}, one kept back); lower it to at most {usable_tokens}")
    try:
        replica = ReplicaModel(
            step_cost=step_cost or prior.step_cost, max_num_seqs=prior.max_num_seqs,
            max_num_batched_tokens=prior.max_num_batched_tokens, block_size=block_size, num_kv_blocks=total - 1,
            max_model_len=max_model_len if max_model_len is not None else min(shape.max_position, usable_tokens),
            gpus=tensor_parallel_size,
            usd_per_hour=accel.usd_per_hour * tensor_parallel_size, name=served_name)
    except ValueError as exc:
        raise SimConfigError(str(exc)) from None
    return replica, total


# --- command line -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m controlplane.engines.sim_server",
                                 description="A simulated vLLM engine (OpenAI-compatible; timing from the simulator).")
    ap.add_argument("--model", required=True, help="a catalog model name or Hugging Face id (a path: its last part)")
    ap.add_argument("--accelerator", default="H100-80GB", help="a catalog accelerator (default H100-80GB)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per wall-clock second")
    ap.add_argument("--step-coefficients", default=None, metavar="ALPHA,BETA,GAMMA[,DELTA]",
                    help="calibrated step cost (s, s/token, s/KV token, s/seq) instead of the roofline")
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--max-num-batched-tokens", type=int)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION)
    ap.add_argument("--num-gpu-blocks-override", type=int)
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=sorted(catalog.VLLM_KV_CACHE_DTYPE))
    ap.add_argument("--quantization", "-q", default=None, choices=sorted(catalog.VLLM_QUANTIZATION))
    ap.add_argument("--dtype", default="auto", choices=_DTYPES)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, choices=[1],
                    help="only 1: pipeline parallelism is not simulated")
    ap.add_argument("--otlp-traces-endpoint", default=None)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--disable-uvicorn-access-log", action="store_true")
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="vLLM V1's default: on (a preempted request gets back the KV blocks not yet reused)")
    # Accepted so that vLLM argv works unchanged; they change nothing the simulation models.
    for flag in ("--disable-log-requests", "--disable-log-stats", "--enable-chunked-prefill", "--trust-remote-code",
                 "--enforce-eager"):
        ap.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--seed", "--distributed-executor-backend", "--uvicorn-log-level", "--swap-space"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    return ap


def _coefficients(text: str) -> StepCost:
    try:
        values = [float(x) for x in text.split(",")]
        if len(values) not in (3, 4):
            raise ValueError
        return StepCost.linear(Coefficients(*values))
    except ValueError as exc:
        why = f": {exc}" if str(exc) else ""
        raise SimConfigError(f"--step-coefficients {text!r}: want 3 or 4 comma-separated non-negative numbers "
                             f"(alpha s, beta s/token, gamma s/KV token[, delta s/seq]){why}") from None


def _catalog_name(model: str) -> str:
    """vLLM's --model is often a path; the simulated engine looks its last part up in the catalog."""
    try:
        return catalog.model(model).name
    except CatalogError:
        try:
            return catalog.model(PurePath(model).name).name
        except CatalogError:
            raise CatalogError(f"unknown model {model!r}; known: {', '.join(catalog.MODELS)} "
                               "(or their Hugging Face ids, or a path ending in one)") from None


def config_from_args(argv: Sequence[str]) -> SimServerConfig:
    """Parse vLLM-style flags into a config; raises SimConfigError (or CatalogError) naming the bad flag."""
    ap = _parser()
    a = ap.parse_args(list(argv))
    for flag, value, low in (("--speedup", a.speedup, 0.0), ("--stream-interval", a.stream_interval, 0),
                             ("--gpu-memory-utilization", a.gpu_memory_utilization, 0.0)):
        if not (value > low and math.isfinite(value)):
            raise SimConfigError(f"{flag} must be a finite number > {low:g}, got {value}")
    if a.gpu_memory_utilization > 1:
        raise SimConfigError(f"--gpu-memory-utilization is a fraction of the GPU's memory, at most 1; "
                             f"got {a.gpu_memory_utilization}")
    for flag, value in (("--max-num-seqs", a.max_num_seqs), ("--max-num-batched-tokens", a.max_num_batched_tokens),
                        ("--max-model-len", a.max_model_len), ("--num-gpu-blocks-override", a.num_gpu_blocks_override),
                        ("--block-size", a.block_size), ("--tensor-parallel-size", a.tensor_parallel_size)):
        if value is not None and value < 1:  # 0 is not "the default": vLLM refuses it too
            raise SimConfigError(f"{flag} must be >= 1, got {value}")
    model = _catalog_name(a.model)
    replica, total = replica_model(
        model=model, accelerator=a.accelerator, served_name=a.served_model_name or a.model,
        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
        gpu_memory_utilization=a.gpu_memory_utilization, block_size=a.block_size,
        tensor_parallel_size=a.tensor_parallel_size,
        weights=catalog.vllm_weights(a.quantization),
        kv_cache=catalog.VLLM_KV_CACHE_DTYPE[a.kv_cache_dtype], num_gpu_blocks_override=a.num_gpu_blocks_override,
        step_cost=_coefficients(a.step_coefficients) if a.step_coefficients else None)
    return SimServerConfig(
        replica=replace(replica, prefix_caching=a.enable_prefix_caching),
        served_model_name=a.served_model_name or a.model, model=model,
        accelerator=catalog.accelerator(a.accelerator).name, num_gpu_blocks=total, host=a.host, port=a.port,
        speedup=a.speedup, otlp_traces_endpoint=a.otlp_traces_endpoint, stream_interval=a.stream_interval,
        access_log=not a.disable_uvicorn_access_log, gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_dtype=a.kv_cache_dtype, num_gpu_blocks_override=a.num_gpu_blocks_override)


# --- running it -----------------------------------------------------------------------------------
def build(config: SimServerConfig) -> tuple[Any, LiveEngine, SimTelemetry]:
    """The app, its engine and its telemetry (the engine's clock starts now)."""
    spans = None
    if config.otlp_traces_endpoint:
        spans = RequestSpans(config.otlp_traces_endpoint, protocol=config.otlp_protocol,
                             resource_attributes=config.resource_attributes)
    telemetry = SimTelemetry(served_name=config.served_model_name, model=config.model,
                             accelerator=config.accelerator, cache_info=config.cache_info(), spans=spans)
    engine = LiveEngine(config.replica, speedup=config.speedup, observer=telemetry)
    telemetry.watch(engine)
    served = ServedModel(config.served_model_name, config.model, config.accelerator)
    return build_app(engine, telemetry, served, stream_interval=config.stream_interval), engine, telemetry


def keepalive_s() -> int:
    """Idle seconds before a kept-alive connection is closed: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, as vLLM reads it (default
    5 s; the replicas the plane starts get 60 s, see vllm_server.KEEPALIVE_S)."""
    return int(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))


def serve_in_thread(app: Any, host: str, port: int, *, access_log: bool = False,
                    timeout_s: float = 30.0, keep_alive_s: int = 5) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Serve an ASGI app from a daemon thread (its own event loop); port 0 picks a free port. Returns once
    it accepts connections: the server (set `should_exit` to stop it), the thread and the bound port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=access_log,
                                           timeout_keep_alive=keep_alive_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{bound}")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{bound}")
        time.sleep(0.01)
    return server, thread, bound


class SimServer:
    """The simulated engine in a background thread of this process (tests, benches, a fleet in one process)."""

    def __init__(self, config: SimServerConfig) -> None:
        self.config = config
        self.app, self.engine, self.telemetry = build(config)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = config.port

    @property
    def base_url(self) -> str:
        return f"http://{host_port(self.config.host, self.port)}"

    def start(self, timeout_s: float = 30.0) -> SimServer:
        self._server, self._thread, self.port = serve_in_thread(
            self.app, self.config.host, self.config.port, access_log=self.config.access_log, timeout_s=timeout_s,
            keep_alive_s=keepalive_s())
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving; spans still batched are flushed on the way out."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
            self._server = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = config_from_args(sys.argv[1:] if argv is None else argv)
    except (SimConfigError, CatalogError) as exc:
        _parser().error(str(exc))
    app, _, _ = build(config)
    r = config.replica
    print(f"simulated engine: {config.model} on {config.accelerator} x{r.gpus} as {config.served_model_name!r}; "
          f"max_num_seqs {r.max_num_seqs}, max_num_batched_tokens {r.max_num_batched_tokens}, KV "
          f"{config.num_gpu_blocks} blocks of {r.block_size} ({r.kv_capacity_tokens} usable tokens), max_model_len "
          f"{r.max_model_len}, speedup {config.speedup:g}; pid {os.getpid()}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=config.access_log,
                timeout_keep_alive=keepalive_s())


if __name__ == "__main__":
    main()
