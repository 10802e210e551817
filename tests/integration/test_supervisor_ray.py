"""The Ray backend on a real local Ray head: a configuration search's canary trial as a Ray actor, then scale
1 -> 2 -> 1 with drain under 20 streams, no orphans."""

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
import yaml

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
                       "num_cpus_per_replica": 1, "cpu_cores": [[0], [1]]},
                      engine={"max_num_batched_tokens": 2048})  # a search fits the running limits: both set
    slo = tmp / "slo.yaml"
    slo.write_text(yaml.safe_dump({
        "apiVersion": "controlplane/v1", "kind": "SLO", "metadata": {"name": f"{NAME}-ttft"},
        "spec": {"deployment": NAME, "sli": "ttft", "threshold": "2s", "objective": 0.9, "window": "1d"}}))
    fleet = start_fleet(tmp / "plane", NAME, spec, slos=[slo])
    try:
        yield fleet
    finally:
        teardown_fleet(fleet, MARKER)


def _named_actors(ray_head: str) -> set[str]:
    ray.init(address=ray_head, namespace="controlplane", log_to_driver=False)
    try:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()


def test_a_searched_configuration_is_tried_on_a_canary_ray_actor_that_is_removed_after(fleet: Fleet,
                                                                                      ray_head: str) -> None:
    first = fleet.replicas("ready")[0]["name"]
    with StreamLoad(fleet.plane.router, NAME, streams=8):  # the history the search calibrates on
        wait_for("220 recorded requests", lambda: len(fleet.get(f"/api/v1/requests?replica={first}&limit=300")
                                                      ["items"]) >= 220, 300)
        # The fit reads the KV capacity from a scrape (every 5 s here): the requests can come in sooner.
        wait_for("a scrape that knows the KV capacity", lambda: any(
            s["kv_capacity_tokens"] for s in fleet.get(f"/api/v1/engine-samples?replica={first}")["items"]), 60)
    r = fleet.post(f"/api/v1/deployments/{NAME}/search", {"canary_trials": 1, "mode": "recommend"})
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    job = wait_for("the search to finish", lambda: (j := fleet.get(f"/api/v1/searches/{sid}"))["status"] != "running"
                   and j, 600, every_s=2)
    assert job["status"] == "done", (job.get("error"), job.get("progress"))
    progress = "\n".join(p["line"] for p in job["progress"])
    assert "canary 1: starting a replica" in progress, progress
    events = fleet.events()
    started = [e for e in events if e["kind"] == "canary_started"]
    assert len(started) == 1, events[:10]
    canary = started[0]["replica"]
    kinds = [e["kind"] for e in sorted(events, key=lambda e: e["id"]) if e["replica"] == canary]
    assert {"replica_ready", "canary_stopped"} <= set(kinds) and kinds[-1] in ("canary_stopped", "replica_stopped")
    # It ran as a named Ray actor of its own and is gone; the deployment kept its one replica, never routed to it.
    assert canary != first and canary not in _named_actors(ray_head)
    assert [m["name"] for m in fleet.replicas()] == [first]
    assert fleet.get(f"/api/v1/requests?replica={canary}&limit=10")["items"] == []


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
