"""The Ray backend's bookkeeping against a fake `ray` module: detached actors are never left behind, and a
slow cluster is not read as a dead replica. (The real Ray head is in tests/integration/test_supervisor_ray.py.)"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import ray

from controlplane.supervisor import ray_backend as rb
from controlplane.supervisor.backends import Handle, LaunchRequest
from controlplane.supervisor.spec import parse_deployment

DEP = parse_deployment({"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "r"},
                        "spec": {"model": {"path": "/m", "served_name": "r"},
                                 "backend": {"kind": "ray", "num_gpus_per_replica": 1}}})


class FakeRay:
    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.killed: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (actor, method called or "kill"), in order
        self.exceptions = ray.exceptions

    def get(self, ref: tuple[str, str], timeout: float | None = None) -> Any:
        self.calls.append(ref)
        v = self.answers.get(ref[1]) if ref[1] == "stop" else self.answers[ref[1]]
        if isinstance(v, Exception):
            raise v
        return v

    def kill(self, actor: Any, no_restart: bool = True) -> None:
        self.killed.append(actor.name)
        self.calls.append((actor.name, "kill"))

    def is_initialized(self) -> bool:
        return True

    util = types.SimpleNamespace(get_node_ip_address=lambda: "10.0.0.5")  # the plane's node

    def get_actor(self, name: str, namespace: str | None = None) -> Any:
        return _Actor(name)


class _Actor:
    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, method: str) -> Any:
        return types.SimpleNamespace(remote=lambda *a: (self.name, method))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeRay, rb.RayActorBackend]:
    f = FakeRay()
    monkeypatch.setattr(rb, "ray", f)
    backend = rb.RayActorBackend(DEP.backend, call_timeout_s=0.1)  # type: ignore[arg-type]
    backend._actor_cls = types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(
        remote=lambda: _Actor(kw["name"])))
    return f, backend


def test_a_launch_that_fails_kills_the_detached_actor_it_created(fake: tuple[FakeRay, rb.RayActorBackend]) -> None:
    f, backend = fake
    f.answers["start"] = ray.exceptions.GetTimeoutError("no GPU free: the actor is still pending")
    with pytest.raises(ray.exceptions.GetTimeoutError):
        backend.launch(LaunchRequest("r-0", DEP, DEP.engine, 0, 8200, None, "grpc", Path("/tmp")))
    assert f.killed == ["r-0"]
    # vLLM may have started before the call timed out: the actor stops it before it dies (else it is orphaned).
    assert f.calls == [("r-0", "start"), ("r-0", "stop"), ("r-0", "kill")]


def test_an_actor_adoption_refuses_is_killed_not_left_holding_its_resources(
        fake: tuple[FakeRay, rb.RayActorBackend]) -> None:
    f, backend = fake
    f.answers.update(info={"url": "http://10.0.0.2:8200"}, exit_code=1)  # its vLLM exited
    assert backend.adopt("r-1", "http://10.0.0.2:8200", {"actor": "r-1"}) is None
    f.answers.update(exit_code=None)
    assert backend.adopt("r-2", "http://10.0.0.9:8200", {"actor": "r-2"}) is None  # another URL than stored
    assert f.killed == ["r-1", "r-2"]
    assert f.calls[-2:] == [("r-2", "stop"), ("r-2", "kill")]  # its vLLM still runs: stopped, not orphaned
    assert backend.adopt("r-3", "http://10.0.0.2:8200", {"actor": "r-3"}) is not None and f.killed == ["r-1", "r-2"]


def test_an_adopted_replica_on_another_node_with_a_loopback_spans_endpoint_is_warned_about(
        fake: tuple[FakeRay, rb.RayActorBackend], caplog: pytest.LogCaptureFixture) -> None:
    f, backend = fake
    f.answers.update(info={"url": "http://10.0.0.7:8200", "otlp_endpoint": "127.0.0.1:4317"}, exit_code=None)
    assert backend.adopt("r-5", "http://10.0.0.7:8200", {"actor": "r-5", "node_ip": "10.0.0.7"}) is not None
    assert [r for r in caplog.records if "r-5 runs on node 10.0.0.7" in r.getMessage()]


def test_a_slow_cluster_is_unknown_and_a_dead_actor_is_lost(fake: tuple[FakeRay, rb.RayActorBackend]) -> None:
    f, backend = fake
    handle = Handle("r-4", "http://x", {}, private=_Actor("r-4"))
    f.answers["exit_code"] = ray.exceptions.GetTimeoutError("GCS slow")
    assert backend.exit_code(handle) is None
    f.answers["exit_code"] = ray.exceptions.RayActorError()
    assert backend.exit_code(handle) == rb.LOST
    # A RayActorError too, but Ray says the actor may come back (its worker's connection broke for a moment).
    f.answers["exit_code"] = ray.exceptions.ActorUnavailableError("connection to actor's worker lost", b"\x00" * 16)
    assert backend.exit_code(handle) is None
    f.answers["exit_code"] = 3
    assert backend.exit_code(handle) == 3


def test_a_launch_on_another_node_with_a_loopback_spans_endpoint_logs_a_warning(
        fake: tuple[FakeRay, rb.RayActorBackend], caplog: pytest.LogCaptureFixture) -> None:
    f, backend = fake
    f.answers["start"] = {"pid": 7, "node_ip": "10.0.0.7", "url": "http://10.0.0.7:8200", "port": 8200, "log": "x"}
    handle = backend.launch(LaunchRequest("r-0", DEP, DEP.engine, 0, 8200, "127.0.0.1:4317", "grpc", Path("/tmp")))
    assert handle.url == "http://10.0.0.7:8200" and f.killed == []
    assert [r.getMessage() for r in caplog.records if "r-0 runs on node 10.0.0.7" in r.getMessage()]
    caplog.clear()
    f.answers["start"] = {**f.answers["start"], "node_ip": "10.0.0.5"}  # the plane's own node: its loopback
    backend.launch(LaunchRequest("r-1", DEP, DEP.engine, 1, 8201, "127.0.0.1:4317", "grpc", Path("/tmp")))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_replica_on_another_node_sending_spans_to_loopback_is_warned_about() -> None:
    warn = rb.lost_spans_warning("r-0", "127.0.0.1:4317", "10.0.0.7", "10.0.0.5")
    assert warn is not None and "10.0.0.7" in warn and "CONTROLPLANE_REPLICA_OTLP_ENDPOINT" in warn
    assert rb.lost_spans_warning("r-0", "[::1]:4317", "10.0.0.7", "10.0.0.5") is not None
    assert rb.lost_spans_warning("r-0", "localhost:4317", "10.0.0.7", "10.0.0.5") is not None
    assert rb.lost_spans_warning("r-0", "LOCALHOST.:4317", "10.0.0.7", "10.0.0.5") is not None
    assert rb.lost_spans_warning("r-0", "0.0.0.0:4317", "10.0.0.7", "10.0.0.5") is not None  # reaches itself too
    # the plane's own node, an address the node can reach, a name, no tracing, an unknown plane IP: no warning
    assert rb.lost_spans_warning("r-0", "127.0.0.1:4317", "10.0.0.5", "10.0.0.5") is None
    assert rb.lost_spans_warning("r-0", "10.0.0.5:4317", "10.0.0.7", "10.0.0.5") is None
    assert rb.lost_spans_warning("r-0", "plane.internal:4317", "10.0.0.7", "10.0.0.5") is None
    assert rb.lost_spans_warning("r-0", None, "10.0.0.7", "10.0.0.5") is None
    assert rb.lost_spans_warning("r-0", "127.0.0.1:4317", "10.0.0.7", None) is None


def test_adopting_answers_gone_for_a_dead_or_missing_actor_and_unknown_for_a_slow_cluster(
        fake: tuple[FakeRay, rb.RayActorBackend]) -> None:
    from controlplane.supervisor.backends import AdoptUnknown

    f, backend = fake
    f.answers["info"] = ray.exceptions.GetTimeoutError("GCS slow")
    f.answers["exit_code"] = None
    with pytest.raises(AdoptUnknown, match="r-1: the cluster did not say"):  # taken for gone, it would leak
        backend.adopt("r-1", "http://10.0.0.2:8200", {"actor": "r-1"})
    assert f.killed == []
    f.answers["info"] = ray.exceptions.ActorUnavailableError("connection to actor's worker lost", b"\x00" * 16)
    with pytest.raises(AdoptUnknown, match="r-1: its actor is unreachable for now"):
        backend.adopt("r-1", "http://10.0.0.2:8200", {"actor": "r-1"})
    f.answers["info"] = ray.exceptions.RayActorError()
    assert backend.adopt("r-1", "http://10.0.0.2:8200", {"actor": "r-1"}) is None
