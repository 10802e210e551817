"""One real plane process and one real vLLM server (tiny model, CPU) shared by the integration tests.

vLLM is the slow part (about a minute to start), so it is started once per session. Its KV cache is
shrunk with --num-gpu-blocks-override so that saturation and preemption can be provoked on demand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controlplane.engines.vllm_server import VllmServer, VllmServerSpec
from tests.conftest import free_port

KV_BLOCKS = 16  # x 128 tokens per block on the CPU backend = 2048 tokens of KV cache
BLOCK_SIZE = 128


@dataclass(frozen=True)
class PlaneProc:
    proc: subprocess.Popen[bytes]
    api: str
    otlp_http: str
    otlp_grpc: str
    db_path: Path
    log_path: Path
    router: str
    env: dict[str, str]
    argv: list[str]


def start_plane(tmp: Path, watch: list[str], scrape_interval_s: float = 0.5, nice: int = 0,
                configs: list[Path] | None = None, env_extra: dict[str, str] | None = None,
                reuse: PlaneProc | None = None, slos: list[Path] | None = None) -> PlaneProc:
    """`controlplane up` as a real subprocess on free loopback ports, ready when /healthz answers.

    `reuse` starts a plane again with the same ports, store and arguments (a restart)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if reuse is not None:
        env, argv = reuse.env, reuse.argv
    else:
        api_port, http_port, grpc_port, router_port = free_port(), free_port(), free_port(), free_port()
        env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(tmp), "CONTROLPLANE_API_PORT": str(api_port),
               "CONTROLPLANE_OTLP_HTTP_PORT": str(http_port), "CONTROLPLANE_OTLP_GRPC_PORT": str(grpc_port),
               "CONTROLPLANE_ROUTER_PORT": str(router_port),
               "CONTROLPLANE_SCRAPE_INTERVAL_S": str(scrape_interval_s), **(env_extra or {})}
        argv = [str(Path(sys.executable).parent / "controlplane"), "up"]
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        for w in watch:
            argv += ["--watch", w]
        for c in configs or []:
            argv += ["--config", str(c)]
        for c in slos or []:
            argv += ["--slo", str(c)]
    log_path = tmp / "plane.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{env['CONTROLPLANE_API_PORT']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"plane exited early: {log_path.read_text()}")
        try:
            if httpx.get(api + "/healthz", timeout=1).status_code == 200:
                return PlaneProc(proc, api, f"http://127.0.0.1:{env['CONTROLPLANE_OTLP_HTTP_PORT']}/v1/traces",
                                 f"127.0.0.1:{env['CONTROLPLANE_OTLP_GRPC_PORT']}", tmp / "controlplane.db",
                                 log_path, f"http://127.0.0.1:{env['CONTROLPLANE_ROUTER_PORT']}", env, argv)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"plane not healthy in 60 s: {log_path.read_text()}")


def stop_plane(plane: PlaneProc) -> None:
    if plane.proc.poll() is None:
        plane.proc.send_signal(signal.SIGTERM)
        try:
            plane.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            plane.proc.kill()


@dataclass(frozen=True)
class RealVllm:
    server: VllmServer
    plane: PlaneProc
    replica: str

    @property
    def base_url(self) -> str:
        return self.server.spec.base_url

    @property
    def model(self) -> str:
        return self.server.spec.served_name


@pytest.fixture(scope="session")
def real_vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    tmp = tmp_path_factory.mktemp("real-vllm")
    port = free_port()
    replica = "tiny-0"
    # The default 5 s scrape: each scrape blocks vLLM's API event loop while it renders /metrics
    # (8-175 ms measured here), which a faster interval would add to the client's TTFT.
    # Lower CPU priority for the plane: on 2 cores it shares one with vLLM's API server, which it would
    # not in production, and every ms it takes there shows up in the client's TTFT.
    plane = start_plane(tmp / "plane", [f"{replica}=http://127.0.0.1:{port}"], scrape_interval_s=5.0, nice=10)
    spec = VllmServerSpec(model_dir=tiny_model_dir, port=port, replica_name=replica,
                          otlp_endpoint=plane.otlp_grpc, otlp_protocol="grpc",
                          num_gpu_blocks_override=KV_BLOCKS,
                          # vLLM keeps one block back (the null block): the longest request is one block less.
                          max_model_len=(KV_BLOCKS - 1) * BLOCK_SIZE)
    server = VllmServer(spec, tmp / "vllm.log")
    server.start()
    try:
        waited = server.wait_ready(timeout_s=600)
        print(f"\nvLLM ready in {waited:.0f} s", file=sys.stderr)
        yield RealVllm(server, plane, replica)
    finally:
        server.stop()
        stop_plane(plane)
