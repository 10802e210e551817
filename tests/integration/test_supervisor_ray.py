"""The Ray backend on a real local Ray head: scale 1 -> 2 -> 1 with drain under 20 streams, no orphans."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.conftest import free_port
from tests.integration.fleet import (
    Fleet,
    consecutive_free_ports,
    start_fleet,
    teardown_fleet,
    vllm_processes,
    wait_for,
    write_spec,
)
from tests.integration.load import StreamLoad

pytestmark = pytest.mark.vllm
NAME = "sv-ray"
MARKER = f"--served-model-name {NAME}"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A real Ray head on loopback, started by the test (Ray's socket paths must stay short: /tmp)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="raycp-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(ray_head: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("supervised-ray")
    spec = write_spec(tmp / "deploy.yaml", NAME, tiny_model_dir,
                      {"kind": "ray", "address": ray_head, "base_port": consecutive_free_ports(4),
                       "num_cpus_per_replica": 1, "cpu_cores": [[0], [1]]})
    fleet = start_fleet(tmp / "plane", NAME, spec)
    try:
        yield fleet
    finally:
        teardown_fleet(fleet, MARKER)


def test_scale_1_2_1_on_ray_with_drain_loses_no_request_and_stops_every_actor(fleet: Fleet, ray_head: str) -> None:
    first = fleet.replicas("ready")[0]
    assert first["runtime"]["actor"] == first["name"] and first["runtime"]["namespace"] == "controlplane"
    with StreamLoad(fleet.plane.router, NAME, streams=20) as load:
        assert fleet.post(f"/api/v1/deployments/{NAME}/scale", {"replicas": 2}).status_code == 202
        both = wait_for("two ready Ray replicas", lambda: [r["name"] for r in fleet.replicas("ready")]
                        if len(fleet.replicas("ready")) == 2 else None, 900)
        wait_for("traffic on both replicas",
                 lambda: len({o.replica for o in load.outcomes if o.ok and o.started > time.time() - 10}) == 2, 60)
        assert fleet.post(f"/api/v1/deployments/{NAME}/scale", {"replicas": 1}).status_code == 202
        wait_for("one replica left", lambda: len(fleet.replicas()) == 1, 300)
        time.sleep(3)
    assert len(load.outcomes) > 40
    assert load.failures() == [], load.failures()[:3]

    # The actors are detached and named (a later plane finds them); the drained one was removed.
    left = fleet.replicas()[0]["name"]
    drained = set(both) - {left}
    ray.init(address=ray_head, namespace="controlplane", log_to_driver=False)
    try:
        def named() -> set[str]:
            return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}  # type: ignore[no-untyped-call]

        wait_for("the drained replica's actor to be gone", lambda: left in named() and not drained & named(), 60)
    finally:
        ray.shutdown()

    # SIGTERM: the plane stops its Ray replicas; no vLLM process is left behind.
    fleet.plane.proc.send_signal(signal.SIGTERM)
    assert fleet.plane.proc.wait(timeout=120) == 0
    wait_for("no vLLM process left", lambda: vllm_processes(MARKER) == [], 30)
