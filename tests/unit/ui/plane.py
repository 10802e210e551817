"""A real in-process plane for the app's tests: the FastAPI app on a seeded SQLite store, served by uvicorn
on a free loopback port in a thread, with a fake supervisor that records what it is asked to do."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy import insert

from controlplane.api.app import create_app
from controlplane.slo.evaluate import Counts, SloStatus, build_status
from controlplane.store.db import make_engine, upgrade
from controlplane.store.models import SloAlert
from controlplane.store.repo import Store
from controlplane.tuning.recommendations import Proposal, Recommendations
from tests.unit.slo.rule_factories import make_slo

TOKEN = "ui-test-token"
PRICE_PER_REPLICA_HOUR_USD = 1.25
DEPLOYMENT = "tiny"
REAL, SIM, WATCHED, IDLE = "tiny-0", "tiny-sim-1", "watched-a", "tiny-2"
ENGINE = {"max_num_seqs": 8, "max_num_batched_tokens": 2048, "max_model_len": 512, "dtype": "auto",
          "quantization": None, "extra_args": []}


class FakeControl:
    """The supervisor as the API sees it: describes one deployment (one real, one simulated replica)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, str, str]] = []

    def describe(self) -> list[dict[str, Any]]:
        def member(name: str, port: int, runtime: dict[str, Any]) -> dict[str, Any]:
            return {"name": name, "state": "ready", "url": f"http://127.0.0.1:{port}", "slot": 0, "restarts": 1,
                    "outstanding": 2, "config": ENGINE, "since_unix_s": time.time() - 600, "runtime": runtime}

        return [{"name": DEPLOYMENT, "backend": "local", "desired_replicas": 2, "min_replicas": 1, "max_replicas": 4,
                 "engine": ENGINE, "rolling": False, "price_per_replica_hour_usd": PRICE_PER_REPLICA_HOUR_USD,
                 "replicas": [member(REAL, 8100, {"pid": 1}), member(SIM, 8101, {"pid": 2, "simulated": True})]}]

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        self.calls.append(("scale", deployment, replicas, actor, reason))
        return {"deployment": deployment, "replicas": replicas}

    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]:
        self.calls.append(("reconfigure", deployment, dict(changes), actor, reason))
        return {"deployment": deployment, "changed": True}


class FakeSearches:
    """The plane's search jobs as the API sees them: records what was started, answers one finished job."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Any]] = []

    def start(self, deployment: str, params: Any) -> dict[str, Any]:
        self.started.append((deployment, params))
        return {"id": len(self.started), "deployment": deployment, "status": "running", "progress": []}

    def list(self) -> list[dict[str, Any]]:
        return [{"id": i + 1, "deployment": d, "status": "done", "started_unix_s": time.time(),
                 "progress": [{"unix_s": time.time(), "line": "searching 12 configurations"}], "error": None,
                 "result": {"outcome": "same_cost_more_headroom: seqs=16", "recommendation_id": 7}}
                for i, (d, _) in enumerate(self.started)]

    def get(self, job_id: int) -> dict[str, Any]:
        return self.list()[job_id - 1]


@dataclass
class Seeded:
    store: Store
    now: float
    statuses: list[SloStatus]
    recommendation_id: int
    control: FakeControl = field(default_factory=FakeControl)
    searches: FakeSearches = field(default_factory=FakeSearches)


def propose(store: Store, replicas: int = 3) -> int:
    return Recommendations(store.engine).add(Proposal(
        DEPLOYMENT, "scale", "scale_up_slo_risk", {"replicas": 2}, {"replicas": replicas},
        {"inputs": {"rate_per_s": 3.5, "window_s": 300}, "predicted_attainment": 0.9962,
         "slos": [{"name": "ttft-fast", "objective": 0.99, "attainment": 0.9962, "margin": 0.0062}],
         "candidates": [{"config": "2 replicas", "replicas": 2, "usd_per_hour": 2.5, "attainment": 0.97},
                        {"config": f"{replicas} replicas", "replicas": replicas, "usd_per_hour": 3.75,
                         "attainment": 0.9962}]}, 0.8), mode="recommend")


def seed(path: Path, *, gpu: bool = False) -> Seeded:
    """A store with a supervised deployment, a watched replica, requests, engine samples, actions,
    an SLO alert episode and one open recommendation, all in the last ten minutes."""
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    store = Store(engine)
    now = time.time()
    spec = {"spec": {"hardware": {"price_per_hour_usd": PRICE_PER_REPLICA_HOUR_USD, "count_per_replica": 1}}}
    dep_id = store.save_deployment(DEPLOYMENT, model="tiny", spec=spec, desired_replicas=2, engine_config=ENGINE)
    ids = {name: store.save_replica(name, deployment_id=dep_id, url=f"http://127.0.0.1:{8100 + i}", backend="local",
                                    state="ready", runtime={"pid": i}, config=ENGINE)
           for i, name in enumerate((REAL, SIM, IDLE))}
    ids[WATCHED] = store.register_replica(WATCHED, url="http://10.0.0.5:8000", backend="external")

    requests = []
    for i in range(60):
        replica = REAL if i % 2 else SIM
        q, p, d = 0.002 * (i % 7), 0.03 + 0.001 * i, 0.2 + 0.01 * (i % 11)
        requests.append({"request_id": f"req-{i:03d}", "replica": replica, "model": "tiny",
                         "arrival_unix_s": now - 590 + i * 9, "queue_s": q, "prefill_s": p, "decode_s": d,
                         "inference_s": p + d, "ttft_s": q + p, "e2e_s": q + p + d, "tpot_s": d / 31,
                         "prompt_tokens": 40 + i, "completion_tokens": 32, "max_tokens": 32,
                         "trace_id": f"{i:032x}", "span_id": f"{i:016x}"})
    # A request whose span carried no prefill / decode split: those phases are unknown, not zero.
    requests.append({"request_id": "req-partial", "replica": REAL, "arrival_unix_s": now - 5, "queue_s": 0.004,
                     "ttft_s": None, "e2e_s": 0.5, "trace_id": "f" * 32, "span_id": "f" * 16})
    store.write_spans(requests, [])

    for k in range(60):
        ts = now - 600 + k * 10
        for name, base in ((REAL, 0.2), (SIM, 0.5)):
            ok = not (name == REAL and k == 30)  # one lost scrape: every reading unknown
            store.write_engine_sample({
                "replica_id": ids[name], "ts_unix_s": ts, "scrape_ok": ok, "error": None if ok else "timeout",
                "kv_usage_ratio": min(1.0, base + 0.005 * k) if ok else None, "kv_capacity_tokens": 4096,
                "num_running": float((k + (2 if name == SIM else 0)) % 5) if ok else None,
                "num_waiting": float(k % 3 if name == REAL else k % 4) if ok else None,
                "preemptions_total": float(k // 6 if name == REAL else k // 10) if ok else None,
                "prompt_tokens_total": 100.0 * k if ok else None, "generation_tokens_total": 80.0 * k if ok else None})
    # The watched replica has been scraped but reports no KV usage (an engine without the gauge).
    store.write_engine_sample({"replica_id": ids[WATCHED], "ts_unix_s": now - 20, "scrape_ok": True,
                               "kv_usage_ratio": None, "num_running": 0.0, "num_waiting": 0.0})
    if gpu:
        store.write_gpu_samples([{"ts_unix_s": now - 30 + j, "source": "nvml", "host": "gpu-host", "gpu_index": 0,
                                  "uuid": "GPU-1234", "model_name": "NVIDIA H100", "util_ratio": 0.5 + 0.1 * j,
                                  "fb_used_bytes": 40 * 2**30, "fb_free_bytes": 40 * 2**30, "power_w": 300.0,
                                  "temp_c": 60.0 + j, "xid_errors": 0.0} for j in range(3)])

    store.record_action(ids[REAL], "scale", actor="user", reason="user_request", message="scale 1 -> 2",
                        before={"replicas": 1}, after={"replicas": 2}, ts_unix_s=now - 400)
    store.record_action(ids[REAL], "reconfigure", actor="tuner", reason="recommendation_7",
                        before={"max_num_seqs": 4}, after={"max_num_seqs": 8}, ts_unix_s=now - 300)
    with engine.begin() as c:
        c.execute(insert(SloAlert), [
            {"slo": "ttft-fast", "deployment": DEPLOYMENT, "severity": "page", "alertname": "SLOBurnPage",
             "state": "firing", "started_unix_s": now - 480, "fired_unix_s": now - 420, "resolved_unix_s": None,
             "last_eval_unix_s": now - 10, "evidence": {"burn_rate": 15.0}},
            {"slo": "ttft-fast", "deployment": DEPLOYMENT, "severity": "ticket", "alertname": "SLOBurnTicket",
             "state": "resolved", "started_unix_s": now - 550, "fired_unix_s": now - 520,
             "resolved_unix_s": now - 200, "last_eval_unix_s": now - 200, "evidence": {}}])

    busy, idle = make_slo(name="ttft-fast", objective=0.99), make_slo(name="e2e-idle", sli="e2e", objective=0.95)
    windows = {w: Counts(good=90, total=100) for b in busy.alerting.windows for w in (b.long_s, b.short_s)}
    empty = {w: Counts(good=0, total=0) for w in windows}
    statuses = [build_status(busy, now, (now - 86400 * 30, now), Counts(good=985, total=1000), windows),
                build_status(idle, now, (now - 86400 * 30, now), Counts(good=0, total=0), empty)]
    return Seeded(store, now, statuses, propose(store))


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """An ASGI app over HTTP on a free loopback port (the socket is bound before uvicorn starts)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test plane did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def serve(seeded: Seeded, token: str | None = TOKEN) -> Iterator[str]:
    """The plane's REST API on the seeded store, with the fake supervisor."""
    app = create_app(seeded.store, CollectorRegistry(), control=seeded.control, api_token=token,
                     slo_statuses=lambda: seeded.statuses, searches=seeded.searches)
    try:
        with serve_app(app) as url:
            yield url
    finally:
        seeded.store.engine.dispose()
