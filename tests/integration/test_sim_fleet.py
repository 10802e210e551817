"""A simulated GPU fleet run by a real `controlplane up --config ... --slo ...` process: the supervisor starts the
simulated engine (Llama-3.1-8B on H100-80GB) as it would vLLM, requests through the router reach the store with
their phases, and the API marks the deployment and its replicas as simulated. No vLLM needed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from controlplane.demo_loop import PlaneProcess, slo_doc
from controlplane.demo_sim import SIM_ACCELERATOR, sim_deployment_doc, sim_loop_config
from controlplane.engines.vllm_server import SIM_ENTRYPOINT
from controlplane.loadgen import ClientResult, RequestPlan, stream_one
from tests.conftest import free_port
from tests.integration.fleet import TOKEN, vllm_processes, wait_for

CFG = sim_loop_config()
NAME = CFG.deployment
MARKER = f"--served-model-name {NAME}"


def replica_base_port(n: int = 4) -> int:
    """A run of `n` free ports below the kernel's ephemeral range (32768 up): inside it, an outgoing connection of
    the router or a client can take a replica's port between this check and the replica's bind."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports in 20000-32000")


@dataclass
class SimPlane:
    plane: PlaneProcess
    tmp: Path

    def get(self, path: str) -> Any:
        r = httpx.get(self.plane.api_url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def deployment(self) -> dict[str, Any]:
        return next(d for d in self.get("/api/v1/deployments")["items"] if d["name"] == NAME)

    def replicas(self, state: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.deployment()["replicas"] if state is None or r["state"] == state]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimPlane]:
    tmp = tmp_path_factory.mktemp("sim-fleet")
    dep, slo = tmp / "deployment.yaml", tmp / "slos.yaml"
    dep.write_text(yaml.safe_dump(sim_deployment_doc(CFG, replica_base_port())))
    slo.write_text(yaml.safe_dump(slo_doc(CFG)))
    api, router = free_port(), free_port()
    env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(tmp), "CONTROLPLANE_API_PORT": str(api),
           "CONTROLPLANE_ROUTER_PORT": str(router), "CONTROLPLANE_OTLP_HTTP_PORT": str(free_port()),
           "CONTROLPLANE_OTLP_GRPC_PORT": str(free_port()), "CONTROLPLANE_SCRAPE_INTERVAL_S": "1",
           "CONTROLPLANE_SLO_INTERVAL_S": "2", "CONTROLPLANE_TUNER_MODE": "off", "CONTROLPLANE_API_TOKEN": TOKEN}
    argv = ["nice", "-n", "10", str(Path(sys.executable).parent / "controlplane"), "up",
            "--config", str(dep), "--slo", str(slo)]
    plane = PlaneProcess(argv, env, tmp / "plane.log", f"http://127.0.0.1:{api}", f"http://127.0.0.1:{router}")
    plane.start(timeout_s=90)
    try:
        yield SimPlane(plane, tmp)
    finally:
        plane.stop()
        for p in vllm_processes(MARKER):  # whatever the plane left behind (it should leave nothing)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


async def _send(router: str, plans: list[RequestPlan]) -> list[ClientResult]:
    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(stream_one(client, router, NAME, p) for p in plans)))


def test_the_supervisor_runs_a_simulated_replica_and_its_requests_reach_the_store_with_phases(sim: SimPlane) -> None:
    ready = wait_for("the simulated replica to be ready", lambda: sim.replicas("ready"), 120)[0]
    dep = sim.deployment()
    assert dep["simulated"] is True and ready["simulated"] is True
    # The catalog's H100 price, filled in because the spec gives none.
    assert dep["price_per_replica_hour_usd"] == pytest.approx(3.0)

    # It is the simulated engine, started by the supervisor with the spec's flags.
    cmd = psutil.Process(ready["runtime"]["pid"]).cmdline()
    assert SIM_ENTRYPOINT in cmd
    assert cmd[cmd.index("--accelerator") + 1] == SIM_ACCELERATOR
    assert cmd[cmd.index("--max-num-seqs") + 1] == str(CFG.max_num_seqs)
    served = httpx.get(ready["url"] + "/v1/models", timeout=5).json()["data"][0]
    assert (served["id"], served["simulated"], served["accelerator"]) == (NAME, True, SIM_ACCELERATOR)

    # A few requests through the router, with prompts of ~100 tokens (4 characters per token).
    plans = [RequestPlan("x" * 396 + f"{i:04d}", 8 + i) for i in range(6)]
    results = asyncio.run(_send(sim.plane.router_url, plans))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.completion_tokens for r in results] == [p.max_tokens for p in plans]

    # Their llm_request spans reach the plane: one row per request, attributed to the replica, with every phase.
    want = {r.trace_id for r in results}

    def stored() -> list[dict[str, Any]] | None:
        rows = [r for r in sim.get(f"/api/v1/requests?since={time.time() - 300}")["items"] if r["trace_id"] in want]
        return rows if len(rows) == len(want) else None

    rows = wait_for("the requests' spans in the store", stored, 60)
    for row in rows:
        assert row["replica"] == ready["name"]
        assert row["prompt_tokens"] == 100
        for phase in ("queue_s", "prefill_s", "decode_s", "ttft_s", "e2e_s"):
            assert row[phase] is not None and row[phase] >= 0, (phase, row)
        assert row["ttft_s"] <= row["e2e_s"]
    by_trace = {row["trace_id"]: row for row in rows}
    assert sorted(by_trace[r.trace_id]["completion_tokens"] for r in results) == [p.max_tokens for p in plans]

    # Its vLLM-compatible /metrics are scraped into engine samples.
    samples = wait_for("a successful scrape of the simulated replica",
                       lambda: [s for s in sim.get(f"/api/v1/engine-samples?replica={ready['name']}")["items"]
                                if s["scrape_ok"] and s["num_running"] is not None], 30)
    assert samples[0]["num_waiting"] is not None


def test_a_scaled_up_simulated_replica_is_marked_and_stopped_with_the_plane(sim: SimPlane) -> None:
    r = httpx.post(sim.plane.api_url + f"/api/v1/deployments/{NAME}/scale", json={"replicas": 2}, timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    ready = wait_for("two simulated replicas ready", lambda: (lambda rs: rs if len(rs) == 2 else None)(
        sim.replicas("ready")), 120)
    assert all(x["simulated"] for x in ready)
    assert len({x["url"] for x in ready}) == 2
    pids = [x["runtime"]["pid"] for x in ready]
    sim.plane.stop()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
