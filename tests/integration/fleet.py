"""Helpers for tests that drive a supervised fleet through a real `controlplane up --config` process."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from controlplane.demo_loop import ports_free
from tests.integration.conftest import PlaneProc, start_plane, stop_plane

TOKEN = "test-token"
T = TypeVar("T")


def consecutive_free_ports(n: int) -> int:
    """A base port with `n` free ports from it (replica slots take base + slot)."""
    for _ in range(50):
        # Below the kernel's ephemeral range (32768-60999): an outgoing connection cannot take a replica's
        # port between this check and the replica's bind (seen under load: a crash loop on EADDRINUSE).
        base = random.randrange(20000, 32000 - n)
        if ports_free(base, n):
            return base
    raise RuntimeError("no run of free ports found")


def write_spec(path: Path, name: str, model_dir: Path, backend: dict[str, Any], *, max_replicas: int = 3,
               engine: dict[str, Any] | None = None) -> Path:
    doc = {
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "model": {"path": str(model_dir), "served_name": name},
            # 16 KV blocks of 128 tokens (one kept back by vLLM): small and quick to start on a CPU.
            "engine": {"max_model_len": 1920, "num_gpu_blocks_override": 16, "max_num_seqs": 8,
                       **(engine or {})},
            "replicas": {"min": 1, "max": max_replicas, "initial": 1},
            "backend": backend,
            "lifecycle": {"ready_timeout_s": 420, "probe_interval_s": 1, "restart_backoff_initial_s": 1,
                          "drain_timeout_s": 90},
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Fleet:
    plane: PlaneProc
    name: str
    tmp: Path

    def get(self, path: str) -> Any:
        r = httpx.get(self.plane.api + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.plane.api + path, json=body, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"})

    def deployment(self) -> dict[str, Any]:
        items = self.get("/api/v1/deployments")["items"]
        return next(d for d in items if d["name"] == self.name)

    def replicas(self, state: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.deployment()["replicas"] if state is None or r["state"] == state]

    def events(self, limit: int = 500) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/events?limit={limit}")["items"])

    def restart(self) -> None:
        self.plane = start_plane(self.tmp, [], reuse=self.plane)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, StopIteration, KeyError) as exc:
            last_error = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error!r})")


def start_fleet(tmp: Path, name: str, spec: Path, slos: list[Path] | None = None) -> Fleet:
    plane = start_plane(tmp, [], scrape_interval_s=5.0, configs=[spec], slos=slos,
                        env_extra={"CONTROLPLANE_API_TOKEN": TOKEN})
    fleet = Fleet(plane, name, tmp)
    wait_for("the first replica to be ready", lambda: fleet.replicas("ready"), 600)
    return fleet


def vllm_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `marker` (the deployment's model directory)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def teardown_fleet(fleet: Fleet, marker: str) -> None:
    """Stop the plane and make sure nothing it started outlives the test session."""
    stop_plane(fleet.plane)
    for p in vllm_processes(marker):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
