"""The supervisor on real vLLM (tiny model, CPU) through a real `controlplane up --config` process.

One fleet for the module (vLLM start-up is the slow part); each test leaves it at one ready replica.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from collectors.promtext import parse
from collectors.vllm_metrics import read_engine
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
NAME = "sv-local"
MARKER = f"--served-model-name {NAME}"


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("supervised")
    spec = write_spec(tmp / "deploy.yaml", NAME, tiny_model_dir,
                      {"kind": "local", "base_port": consecutive_free_ports(4), "cpu_cores": [[0], [1]]})
    fleet = start_fleet(tmp / "plane", NAME, spec)
    try:
        yield fleet
    finally:
        teardown_fleet(fleet, MARKER)


def _kinds(fleet: Fleet, since: float) -> list[tuple[str, str | None, str]]:
    return [(e["kind"], e["replica"], e["reason"]) for e in reversed(fleet.events()) if e["ts_unix_s"] >= since]


def test_scale_up_kill_9_and_drained_scale_down_under_20_streams(fleet: Fleet) -> None:
    t0 = time.time()
    with StreamLoad(fleet.plane.router, NAME, streams=20) as load:
        # 1 -> 2 while 20 streams run: nothing fails while the second replica starts and joins.
        assert fleet.post(f"/api/v1/deployments/{NAME}/scale", {"replicas": 2}).status_code == 202
        wait_for("two ready replicas", lambda: len(fleet.replicas("ready")) == 2, 600)
        wait_for("traffic on both replicas",
                 lambda: len({o.replica for o in load.outcomes if o.ok and o.started > time.time() - 10}) == 2, 60)
        assert load.failures() == [], load.failures()[:3]

        # kill -9 one replica under load: it is replaced, and the other one serves meanwhile.
        victim = fleet.replicas("ready")[0]
        survivor = next(r["name"] for r in fleet.replicas("ready") if r["name"] != victim["name"])
        kill_at = time.time()
        os.kill(victim["runtime"]["pid"], signal.SIGKILL)
        wait_for("the killed replica to be restarted and ready",
                 lambda: any(r["name"] == victim["name"] and r["state"] == "ready" and r["restarts"] == 1
                             for r in fleet.replicas()), 600)
        served_by_survivor = [o for o in load.outcomes if o.ok and o.started > kill_at + 2 and o.replica == survivor]
        assert len(served_by_survivor) >= 20, "the healthy replica must carry the traffic while the other restarts"
        late_failures = [o for o in load.failures() if o.started > kill_at + 5]
        assert late_failures == [], f"requests failed after the router dropped the dead replica: {late_failures[:3]}"
        assert not psutil.pid_exists(victim["runtime"]["pid"]) or \
            psutil.Process(victim["runtime"]["pid"]).status() == psutil.STATUS_ZOMBIE

        # 2 -> 1 with drain while the 20 streams go on: zero failed requests from here on.
        before_drain = len(load.outcomes)
        scale_at = time.time()
        assert fleet.post(f"/api/v1/deployments/{NAME}/scale", {"replicas": 1}).status_code == 202
        wait_for("one replica left", lambda: len(fleet.replicas()) == 1 and fleet.replicas("ready"), 300)
        time.sleep(3)
    drained_phase = [o for o in load.outcomes[before_drain:] if o.started >= scale_at]
    assert len(drained_phase) >= 20
    assert [o for o in drained_phase if not o.ok] == []

    kinds = _kinds(fleet, t0)
    assert ("scale", None, "user_request") in kinds
    assert ("replica_crashed", victim["name"], "exited") in kinds
    assert ("replica_restarted", victim["name"], "crash") in kinds
    assert any(k == "replica_draining" for k, _, _ in kinds) and any(
        k == "replica_stopped" and reason == "scale_down" for k, _, reason in kinds)


def test_rolling_change_of_max_num_seqs_loses_no_request_and_the_new_replica_runs_it(fleet: Fleet) -> None:
    old = fleet.replicas("ready")[0]
    t0 = time.time()
    with StreamLoad(fleet.plane.router, NAME, streams=20) as load:
        r = fleet.post(f"/api/v1/deployments/{NAME}/reconfigure", {"engine": {"max_num_seqs": 2}})
        assert r.status_code == 202, r.text
        assert r.json()["before"]["max_num_seqs"] == 8 and r.json()["engine"]["max_num_seqs"] == 2
        new = wait_for("the old replica replaced by a new one",
                       lambda: [x for x in fleet.replicas("ready") if x["name"] != old["name"]]
                       if len(fleet.replicas()) == 1 else None, 600)[0]
        # With 20 streams and max_num_seqs 2, the new engine runs at most 2 and queues the rest.
        running, waiting = [], []
        for _ in range(15):
            reading = read_engine(parse(httpx.get(new["url"] + "/metrics", timeout=10).text))
            assert reading.num_running is not None and reading.num_waiting is not None
            running.append(reading.num_running)
            waiting.append(reading.num_waiting)
            time.sleep(0.3)
    assert load.failures() == [], load.failures()[:3]
    assert max(running) == 2 and max(waiting) >= 1, (running, waiting)
    cmd = psutil.Process(new["runtime"]["pid"]).cmdline()
    assert cmd[cmd.index("--max-num-seqs") + 1] == "2"
    assert new["config"]["max_num_seqs"] == 2 and fleet.deployment()["engine"]["max_num_seqs"] == 2
    kinds = _kinds(fleet, t0)
    assert ("rollout_started", None, "user_request") in kinds and ("rollout_finished", None, "user_request") in kinds
    started = next(e for e in fleet.events() if e["kind"] == "rollout_started" and e["ts_unix_s"] >= t0)
    assert started["actor"] == "user"
    assert started["before_config"]["max_num_seqs"] == 8 and started["after_config"]["max_num_seqs"] == 2


def test_a_change_to_an_invalid_argument_is_rolled_back_and_the_old_replica_keeps_serving(fleet: Fleet) -> None:
    old = fleet.replicas("ready")[0]
    t0 = time.time()
    with StreamLoad(fleet.plane.router, NAME, streams=4) as load:
        # Valid for the spec, refused by vLLM at start-up (longer than the model's 2048 positions).
        r = fleet.post(f"/api/v1/deployments/{NAME}/reconfigure", {"engine": {"max_model_len": 999_999}})
        assert r.status_code == 202, r.text
        wait_for("the rollback", lambda: ("rollout_rolled_back", None, "new_replica_not_ready") in [
            (k, None, reason) for k, _, reason in _kinds(fleet, t0)], 300)
        time.sleep(2)
    assert load.failures() == [] and len(load.outcomes) > 0
    now = fleet.replicas()
    assert [(x["name"], x["state"], x["runtime"]["pid"]) for x in now] == [
        (old["name"], "ready", old["runtime"]["pid"])]
    assert fleet.deployment()["engine"]["max_model_len"] == 1920
    rolled = next(e for e in fleet.events() if e["kind"] == "rollout_rolled_back" and e["ts_unix_s"] >= t0)
    assert rolled["before_config"]["max_model_len"] == 999_999 and rolled["after_config"]["max_model_len"] == 1920
    # Bad input is refused before anything starts, with the field named.
    bad = fleet.post(f"/api/v1/deployments/{NAME}/reconfigure", {"engine": {"max_num_seqs": 0}})
    assert bad.status_code == 422 and "max_num_seqs" in bad.text


def test_a_restarted_plane_readopts_its_replica_and_sigterm_leaves_no_orphan(fleet: Fleet) -> None:
    replica = fleet.replicas("ready")[0]
    pid = replica["runtime"]["pid"]
    # kill -9 the plane: its replica keeps running (it is in its own session) ...
    fleet.plane.proc.kill()
    fleet.plane.proc.wait(timeout=30)
    assert psutil.pid_exists(pid)
    t0 = time.time()
    # ... and the next plane on the same store adopts it instead of starting another one.
    fleet.restart()
    wait_for("the adopted replica ready", lambda: fleet.replicas("ready"), 60)
    assert [(x["name"], x["runtime"]["pid"]) for x in fleet.replicas()] == [(replica["name"], pid)]
    assert ("replica_adopted", replica["name"], "plane_restart") in _kinds(fleet, t0)
    assert not any(k == "replica_started" for k, _, _ in _kinds(fleet, t0))
    r = httpx.post(fleet.plane.router + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200

    # SIGTERM: the plane stops every replica it runs; nothing is left in the process table.
    assert vllm_processes(MARKER)
    fleet.plane.proc.send_signal(signal.SIGTERM)
    assert fleet.plane.proc.wait(timeout=90) == 0
    time.sleep(1)
    assert vllm_processes(MARKER) == []
