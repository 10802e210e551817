"""A simulated replica as the backends start it: the simulated engine's argv, and a real one launched and stopped."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from controlplane import loadgen, names
from controlplane.engines import sim_server, vllm_server
from controlplane.engines.sim_server import config_from_args
from controlplane.engines.vllm_server import SIM_ENTRYPOINT, VLLM_ENTRYPOINT
from controlplane.store.repo import Store
from controlplane.supervisor import router
from controlplane.supervisor.backends import LaunchRequest, LocalBackend
from controlplane.supervisor.spec import Deployment, parse_deployment
from controlplane.supervisor.supervisor import Supervisor
from tests.conftest import free_port
from tests.unit.supervisor.test_supervisor import Clock, FakeBackend, FakeRouter


def deployment(simulated: bool, **engine: Any) -> Deployment:
    spec: dict[str, Any] = {"model": {"path": "/models/llama", "served_name": "llama-8b"},
                            "engine": engine, "hardware": {"accelerator": "H100-80GB"}}
    if simulated:
        spec["simulated"] = {"model": "Llama-3.1-8B", "speedup": 2}
    return parse_deployment({"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "chat"},
                             "spec": spec})


def launch_request(dep: Deployment, port: int, log_dir: Path = Path("/tmp/logs")) -> LaunchRequest:
    return LaunchRequest("chat-0", dep, dep.engine, slot=0, port=port, otlp_endpoint="127.0.0.1:4317",
                         otlp_protocol="grpc", log_dir=log_dir)


def test_a_simulated_replica_starts_the_simulated_engine_with_the_planes_and_the_engines_flags() -> None:
    dep = deployment(True, max_num_seqs=32, max_num_batched_tokens=4096, max_model_len=4096, kv_cache_dtype="fp8")
    spec = launch_request(dep, 8105).server_spec("127.0.0.1")
    assert spec.argv() == [
        sys.executable, "-m", SIM_ENTRYPOINT, "--model", "Llama-3.1-8B", "--accelerator", "H100-80GB",
        "--speedup", "2", "--served-model-name", "llama-8b", "--host", "127.0.0.1", "--port", "8105",
        "--disable-uvicorn-access-log", "--otlp-traces-endpoint", "127.0.0.1:4317",
        "--max-num-seqs", "32", "--max-num-batched-tokens", "4096", "--max-model-len", "4096",
        "--kv-cache-dtype", "fp8"]
    # Spans name the replica, as vLLM's do.
    assert "replica=chat-0" in spec.environ()["OTEL_RESOURCE_ATTRIBUTES"]


def test_the_operators_resource_attributes_are_kept_beside_the_replicas_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.resources import OTELResourceDetector

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"deployment.environment=prod,{names.RES_REPLICA}=stale")
    env = launch_request(deployment(True), 8105).server_spec("127.0.0.1").environ()
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", env["OTEL_RESOURCE_ATTRIBUTES"])
    attrs = OTELResourceDetector().detect().attributes  # read as the engine's SDK reads it
    assert (attrs["deployment.environment"], attrs[names.RES_REPLICA]) == ("prod", "chat-0")


def test_the_simulated_engine_reads_that_argv_as_the_spec_meant_it() -> None:
    dep = deployment(True, max_num_seqs=32, max_num_batched_tokens=4096, tensor_parallel_size=2)
    argv = launch_request(dep, 8105).server_spec("127.0.0.1").argv()
    config = config_from_args(argv[3:])  # after `python -m module`
    assert (config.model, config.accelerator, config.speedup) == ("Llama-3.1-8B", "H100-80GB", 2.0)
    assert (config.served_model_name, config.port, config.otlp_traces_endpoint) == ("llama-8b", 8105, "127.0.0.1:4317")
    r = config.replica
    assert (r.max_num_seqs, r.max_num_batched_tokens, r.gpus) == (32, 4096, 2)


def test_a_vllm_replica_still_starts_vllm_on_its_model_directory() -> None:
    argv = launch_request(deployment(False, max_num_seqs=32), 8105).server_spec("127.0.0.1").argv()
    assert argv[:5] == [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", "/models/llama"]
    assert SIM_ENTRYPOINT not in argv and "--accelerator" not in argv and "--speedup" not in argv


def _wait_ready(url: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return dict(httpx.get(url + "/v1/models", timeout=2).json()["data"][0])
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no simulated engine at {url} after {timeout_s:.0f} s")


def test_the_local_backend_launches_adopts_and_stops_a_real_simulated_replica(tmp_path: Path) -> None:
    backend = LocalBackend()
    dep = deployment(True, max_num_seqs=8)
    req = LaunchRequest("chat-0", dep, dep.engine, slot=0, port=free_port(), otlp_endpoint=None,
                        otlp_protocol="grpc", log_dir=tmp_path)
    handle = backend.launch(req)
    try:
        served = _wait_ready(handle.url)
        assert (served["id"], served["simulated"], served["accelerator"]) == ("llama-8b", True, "H100-80GB")
        assert backend.exit_code(handle) is None
        # A restarted plane finds the same process again from what it stored.
        adopted = backend.adopt("chat-0", handle.url, handle.runtime)
        assert adopted is not None and backend.exit_code(adopted) is None
    finally:
        backend.stop(handle, timeout_s=10)
    assert backend.exit_code(handle) is not None
    pid = handle.runtime["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "simulated engine: Llama-3.1-8B on H100-80GB" in (tmp_path / "chat-0.log").read_text()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_describe_marks_a_simulated_deployment_and_its_replicas_and_only_those(sqlite_store: Store,
                                                                                     anyio_backend: str) -> None:
    sim, real = deployment(True), dataclasses.replace(deployment(False), name="real")
    backend = FakeBackend()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if backend.ready.get(f"http://{request.url.host}:{request.url.port}") else 503)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        sup = Supervisor([sim, real], {"local": backend}, sqlite_store, FakeRouter(), client, log_dir=Path("/tmp"),
                         otlp_endpoint=None, clock=Clock())
        await sup.start()
        await sup.tick()
        described = {d["name"]: d for d in sup.describe()}
    assert [r.deployment.simulated is not None for r in backend.launched] == [True, False]
    assert described["chat"]["simulated"] is True and described["real"]["simulated"] is False
    assert [r["simulated"] for r in described["chat"]["replicas"]] == [True]
    assert [r["simulated"] for r in described["real"]["replicas"]] == [False]


def test_a_replica_keeps_idle_connections_longer_than_its_clients_pool_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a request sent on a connection the replica is closing is lost with no response (a ReadError)."""
    monkeypatch.delenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", raising=False)
    spec = launch_request(deployment(False), 8105).server_spec("127.0.0.1")
    server_s = int(spec.environ()["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"])
    assert server_s == vllm_server.KEEPALIVE_S > router.KEEPALIVE_S > loadgen.KEEPALIVE_S
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "90")  # the operator's setting wins
    assert spec.environ()["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "90"
    pinned = dataclasses.replace(spec, env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "120"})  # and a spec's own env over that
    assert pinned.environ()["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "120"


def test_the_simulated_engine_keeps_connections_as_long_as_its_environment_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(sim_server.uvicorn, "run", lambda app, **kw: seen.update(kw))
    dep = deployment(True, max_num_seqs=8)
    argv = launch_request(dep, 8105).server_spec("127.0.0.1").argv()[3:]
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(vllm_server.KEEPALIVE_S))
    sim_server.main(argv)
    assert seen["timeout_keep_alive"] == vllm_server.KEEPALIVE_S
    monkeypatch.delenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
    sim_server.main(argv)
    assert seen["timeout_keep_alive"] == 5  # vLLM's own default when nothing says otherwise
