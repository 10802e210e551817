"""The supervisor with a fake backend, fake replicas behind httpx.MockTransport, a fake clock and a real store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.store.repo import Store
from controlplane.supervisor.backends import Handle, LaunchRequest
from controlplane.supervisor.spec import parse_deployment
from controlplane.supervisor.supervisor import ActionError, Supervisor, SupervisorMetrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeBackend:
    """Replicas that 'run' until told to exit; /health answers from `healthy`."""

    kind: str = "local"
    launched: list[LaunchRequest] = field(default_factory=list)
    exits: dict[str, int] = field(default_factory=dict)  # url -> exit code once the process "died"
    stopped: list[str] = field(default_factory=list)
    ready: dict[str, bool] = field(default_factory=dict)  # url -> /health and /v1/models answer 200
    fail_on_start: Callable[[LaunchRequest], bool] = lambda req: False
    adoptable: set[str] = field(default_factory=set)
    seq: int = 0

    def launch(self, req: LaunchRequest) -> Handle:
        self.seq += 1
        self.launched.append(req)
        url = f"http://{req.replica}.{self.seq}.fake:{req.port}"
        if self.fail_on_start(req):
            self.exits[url] = 1
        else:
            self.ready[url] = True
        return Handle(req.replica, url, {"pid": 1000 + self.seq})

    def exit_code(self, handle: Handle) -> int | None:
        return self.exits.get(handle.url)

    def stop(self, handle: Handle, timeout_s: float) -> None:
        self.stopped.append(handle.replica)
        self.exits.setdefault(handle.url, -15)
        self.ready[handle.url] = False

    def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
        return Handle(replica, url, dict(runtime)) if replica in self.adoptable else None

    def close(self) -> None:
        pass

    def running(self) -> list[str]:
        """The URLs of the replicas whose processes still run."""
        return [u for u, ok in self.ready.items() if ok]


@dataclass
class SlowBackend(FakeBackend):
    """Backend calls that take a while, as Ray's do: the supervisor meanwhile moves on (or shuts down)."""

    launch_s: float = 0.0
    stop_s: float = 0.0
    exit_code_s: float = 0.0

    def launch(self, req: LaunchRequest) -> Handle:
        time.sleep(self.launch_s)
        return super().launch(req)

    def stop(self, handle: Handle, timeout_s: float) -> None:
        time.sleep(self.stop_s)
        super().stop(handle, timeout_s)

    def exit_code(self, handle: Handle) -> int | None:
        time.sleep(self.exit_code_s)
        return super().exit_code(handle)


@dataclass
class FakeRouter:
    ready: dict[str, str] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)

    def set_ready(self, name: str, url: str, model: str | None = None) -> None:
        self.ready[name] = url
        self.log.append(("ready", name))

    def set_models(self, models: set[str]) -> None:
        self.log.append(("models", ",".join(sorted(models))))

    def set_unready(self, name: str) -> None:
        self.ready.pop(name, None)
        self.log.append(("unready", name))

    def drain(self, name: str) -> None:
        self.draining.add(name)
        self.log.append(("drain", name))

    def remove(self, name: str) -> None:
        self.ready.pop(name, None)
        self.log.append(("remove", name))

    def outstanding(self, name: str) -> int:
        return self.in_flight.get(name, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def spec(**lifecycle: Any) -> Any:
    return parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"}, "engine": {"max_num_seqs": 8},
                 "replicas": {"min": 1, "max": 3, "initial": 1},
                 "lifecycle": {"probe_interval_s": 0.001, "restart_backoff_initial_s": 10,
                               "crashloop_restarts": 3, "crashloop_window_s": 600, "drain_timeout_s": 60,
                               "ready_timeout_s": 300, **lifecycle}},
    })


@dataclass
class Harness:
    sup: Supervisor
    backend: FakeBackend
    router: FakeRouter
    clock: Clock
    store: Store

    async def ticks(self, n: int = 3) -> None:
        for _ in range(n):
            self.clock.now += 0.01  # past the next probe time (probe interval 1 ms)
            await self.sup.tick()
            await asyncio.sleep(0)

    async def until(self, cond: Callable[[], bool], what: str, max_ticks: int = 400) -> None:
        for _ in range(max_ticks):
            if cond():
                return
            self.clock.now += 0.01
            await self.sup.tick()
            await asyncio.sleep(0.02)
        raise AssertionError(f"never reached: {what}; states={self.states()}")

    def states(self) -> dict[str, str]:
        return {m.name: m.state for m in self.sup.runtimes["tiny"].members.values()}

    def events(self) -> list[tuple[str, str | None, str | None]]:
        return [(e["kind"], e["replica"], e["reason"]) for e in reversed(self.store.events())]


def answers(backend: FakeBackend) -> Callable[[httpx.Request], httpx.Response]:
    """The fake replicas' HTTP side: /metrics idle, /health and /v1/models 200 while `backend.ready` says so."""
    def answer(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")
        return httpx.Response(200 if backend.ready.get(url) else 503)
    return answer


def supervisor(store: Store, deployments: list[Any], backends: dict[str, Any],
               answer: Callable[[httpx.Request], httpx.Response], *, router: FakeRouter | None = None,
               clock: Clock | None = None) -> Supervisor:
    return Supervisor(deployments, backends, store, router or FakeRouter(),
                      httpx.AsyncClient(transport=httpx.MockTransport(answer)), log_dir=Path("/tmp"),
                      otlp_endpoint=None, clock=clock or Clock())


def make(store: Store, backend: FakeBackend | None = None, router: FakeRouter | None = None,
         clock: Clock | None = None, **lifecycle: Any) -> Harness:
    backend = backend or FakeBackend()
    router = router or FakeRouter()
    clock = clock or Clock()
    sup = supervisor(store, [spec(**lifecycle)], {"local": backend}, answers(backend), router=router, clock=clock)
    return Harness(sup, backend, router, clock, store)


async def test_starts_the_initial_replica_and_routes_to_it_once_ready(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.ticks()
    assert h.states() == {"tiny-0": "ready"}
    assert list(h.router.ready) == ["tiny-0"]
    assert [r.port for r in h.backend.launched] == [8100]
    assert ("replica_started", "tiny-0", "scale_up") in h.events()
    assert ("replica_ready", "tiny-0", "ready") in h.events()
    row = sqlite_store.deployment_state("tiny")
    assert row is not None and row["desired_replicas"] == 1 and row["engine_config"]["max_num_seqs"] == 8


async def test_a_crash_is_restarted_after_the_back_off_and_a_crash_loop_stops_retrying(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.ticks()
    m = h.sup.runtimes["tiny"].members["tiny-0"]
    assert m.handle is not None
    h.backend.exits[m.handle.url] = -9
    await h.ticks(1)
    assert h.states() == {"tiny-0": "crashed"} and "tiny-0" not in h.router.ready
    h.clock.now += 9  # back-off is 10 s: not yet
    await h.ticks()
    assert len(h.backend.launched) == 1
    h.clock.now += 2
    await h.ticks()
    assert len(h.backend.launched) == 2 and h.states() == {"tiny-0": "ready"} and m.restarts == 1
    # Crash 2 (back-off 20 s), crash 3: the third within 600 s is a crash loop.
    for _ in range(2):
        assert m.handle is not None
        h.backend.exits[m.handle.url] = 1
        await h.ticks(1)
        h.clock.now += 25
        await h.ticks()
    assert h.states() == {"tiny-0": "crashloop"}
    assert len(h.backend.launched) == 3  # no restart after the loop was detected, no replacement either
    h.clock.now += 1000
    await h.ticks()
    assert len(h.backend.launched) == 3
    registry = CollectorRegistry()
    registry.register(SupervisorMetrics(h.sup))
    h.router.in_flight["tiny-0"] = 3  # requests the router sent that have not finished (the stalled-engine alert)
    text = generate_latest(registry).decode()
    assert 'controlplane_router_in_flight{deployment="tiny",replica="tiny-0"} 3.0' in text
    assert 'controlplane_replica_crashloop{deployment="tiny",replica="tiny-0"} 1.0' in text
    assert 'controlplane_replica_restarts_total{deployment="tiny",replica="tiny-0"} 2.0' in text
    assert ("replica_crashloop", "tiny-0", "crashloop") in h.events()


async def test_failed_liveness_probes_restart_a_hung_replica(sqlite_store: Store) -> None:
    h = make(sqlite_store, liveness_failures=3)
    await h.sup.start()
    await h.ticks()
    m = h.sup.runtimes["tiny"].members["tiny-0"]
    assert m.handle is not None
    h.backend.ready[m.handle.url] = False  # process alive, /health failing
    await h.ticks(1)
    assert h.states() == {"tiny-0": "unready"} and "tiny-0" not in h.router.ready
    await h.ticks(2)
    assert h.states() == {"tiny-0": "crashed"}
    assert h.backend.stopped == ["tiny-0"]  # the hung process is killed before the restart
    assert ("replica_crashed", "tiny-0", "liveness") in h.events()


async def test_a_passing_probe_puts_back_a_replica_the_router_marked_down(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.ticks()
    h.router.set_unready("tiny-0")  # what the router does itself when one request to the replica fails
    assert "tiny-0" not in h.router.ready
    await h.ticks(1)
    assert "tiny-0" in h.router.ready and h.states() == {"tiny-0": "ready"}


async def test_scale_down_drains_before_stopping(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.sup.scale("tiny", 2, actor="user", reason="user_request")
    await h.until(lambda: list(h.states().values()) == ["ready", "ready"], "two ready replicas")
    h.router.in_flight["tiny-1"] = 2
    h.router.in_flight["tiny-0"] = 5
    await h.sup.scale("tiny", 1, actor="tuner", reason="low_load")
    await h.ticks(2)
    assert h.states()["tiny-1"] == "draining"  # the less busy one
    await asyncio.sleep(0.5)
    assert h.backend.stopped == []  # still two requests in flight
    h.router.in_flight["tiny-1"] = 0
    await h.sup.wait_idle()
    assert h.backend.stopped == ["tiny-1"] and h.states() == {"tiny-0": "ready", "tiny-1": "stopped"}
    assert h.router.log.index(("drain", "tiny-1")) < h.router.log.index(("remove", "tiny-1"))
    assert ("scale", None, "low_load") in h.events()
    scale = next(e for e in h.store.events() if e["kind"] == "scale" and e["reason"] == "low_load")
    assert (scale["actor"], scale["before_config"], scale["after_config"]) == ("tuner", {"replicas": 2},
                                                                               {"replicas": 1})


async def test_scale_requests_outside_the_spec_bounds_are_refused(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    with pytest.raises(ActionError, match=r"must lie in \[1, 3\]") as err:
        await h.sup.scale("tiny", 4, actor="user", reason="x")
    assert err.value.status == 422
    with pytest.raises(ActionError, match="unknown deployment") as err:
        await h.sup.scale("nope", 1, actor="user", reason="x")
    assert err.value.status == 404


async def test_a_rolling_change_starts_the_new_replica_before_draining_the_old(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.ticks()
    result = await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="tuner", reason="tune")
    assert result["changed"] and result["before"]["max_num_seqs"] == 8
    await h.until(lambda: h.states() == {"tiny-0": "stopped", "tiny-1": "ready"}, "old replaced by new")
    await h.sup.wait_idle()
    assert h.backend.launched[-1].engine.max_num_seqs == 2
    assert h.router.log.index(("ready", "tiny-1")) < h.router.log.index(("drain", "tiny-0"))
    assert ("rollout_finished", None, "tune") in h.events()
    assert sqlite_store.deployment_state("tiny")["engine_config"]["max_num_seqs"] == 2  # type: ignore[index]


async def test_a_change_whose_replica_never_becomes_ready_is_rolled_back(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.ticks()
    h.backend.fail_on_start = lambda req: req.engine.max_model_len == 999_999
    await h.sup.reconfigure("tiny", {"max_model_len": 999_999}, actor="user", reason="user_request")
    await h.until(lambda: h.states().get("tiny-1") == "failed", "the new replica to fail")
    await h.sup.wait_idle()
    assert h.states() == {"tiny-0": "ready", "tiny-1": "failed"}
    assert list(h.router.ready) == ["tiny-0"]
    assert h.sup.runtimes["tiny"].dep.engine.max_model_len is None
    assert sqlite_store.deployment_state("tiny")["engine_config"]["max_model_len"] is None  # type: ignore[index]
    rolled = next(e for e in h.store.events() if e["kind"] == "rollout_rolled_back")
    assert rolled["before_config"]["max_model_len"] == 999_999 and rolled["after_config"]["max_model_len"] is None
    await h.ticks(5)
    assert len(h.backend.launched) == 2  # no retry loop


async def test_a_restarted_supervisor_adopts_live_replicas_and_replaces_lost_ones(sqlite_store: Store) -> None:
    first = make(sqlite_store)
    await first.sup.start()
    await first.sup.scale("tiny", 2, actor="user", reason="user_request")
    await first.until(lambda: list(first.states().values()) == ["ready", "ready"], "two ready")
    # The plane dies (no shutdown). tiny-0 survived; tiny-1's process is gone.
    backend = FakeBackend(adoptable={"tiny-0"}, seq=100)
    backend.ready.update({m.handle.url: True for m in first.sup.runtimes["tiny"].members.values() if m.handle})
    second = make(sqlite_store, backend=backend)
    await second.sup.start()
    assert second.sup.runtimes["tiny"].desired == 2  # the run-time scale survives the restart
    await second.until(lambda: sorted(second.states().values()) == ["ready", "ready"], "two ready again")
    assert [r.replica for r in backend.launched] == ["tiny-2"]  # one replacement, tiny-0 adopted
    kinds = second.events()
    assert ("replica_adopted", "tiny-0", "plane_restart") in kinds
    assert ("replica_lost", "tiny-1", "plane_restart") in kinds


async def test_shutdown_stops_every_replica_it_runs(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.sup.scale("tiny", 2, actor="user", reason="user_request")
    await h.until(lambda: list(h.states().values()) == ["ready", "ready"], "two ready")
    await h.sup.shutdown()
    assert sorted(h.backend.stopped) == ["tiny-0", "tiny-1"]
    assert set(h.states().values()) == {"stopped"}


async def test_external_replicas_are_probed_and_routed_but_never_started_or_resized(sqlite_store: Store) -> None:
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "ext"},
        "spec": {"model": {"path": "/m", "served_name": "m"},
                 "backend": {"kind": "external", "urls": ["http://a.fake:1", "http://b.fake:2"]},
                 "lifecycle": {"probe_interval_s": 0.001}},
    })
    healthy = {"http://a.fake:1": True, "http://b.fake:2": False}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if healthy[f"http://{request.url.host}:{request.url.port}"] else 503)

    from controlplane.supervisor.backends import ExternalBackend

    clock, router = Clock(), FakeRouter()
    sup = supervisor(sqlite_store, [dep], {"external": ExternalBackend()}, answer, router=router, clock=clock)
    await sup.start()
    for _ in range(3):
        clock.now += 0.01
        await sup.tick()
    assert router.ready == {"ext-0": "http://a.fake:1"}
    healthy["http://b.fake:2"] = True
    for _ in range(2):
        clock.now += 0.01
        await sup.tick()
    assert set(router.ready) == {"ext-0", "ext-1"}
    with pytest.raises(ActionError, match="external backend") as err:
        await sup.scale("ext", 3, actor="user", reason="x")
    assert err.value.status == 409


async def _canary(h: Harness, changes: dict[str, Any]) -> tuple[str, str | None]:
    task = asyncio.ensure_future(h.sup.start_canary("tiny", changes, actor="tuner", reason="canary_trial",
                                                    poll_s=0.005))
    await h.until(task.done, "the canary to become ready or fail")
    return await task


async def test_a_canary_runs_the_changed_config_outside_the_router_the_count_and_the_traces(
        sqlite_store: Store) -> None:
    h = make(sqlite_store)
    h.sup.otlp_endpoint = "127.0.0.1:4317"
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    name, url = await _canary(h, {"max_num_seqs": 2})
    assert name == "tiny-1" and url is not None
    req = h.backend.launched[-1]
    assert req.engine.max_num_seqs == 2 and req.otlp_endpoint is None  # its trial never enters the history
    assert h.backend.launched[0].otlp_endpoint == "127.0.0.1:4317"
    await h.ticks(5)
    assert list(h.router.ready) == ["tiny-0"]  # never routed, even after liveness probes pass
    assert h.sup.runtimes["tiny"].desired == 1 and h.states()["tiny-1"] == "ready"  # not counted, not scaled away
    with pytest.raises(ActionError, match="canary trial is running"):
        await h.sup.reconfigure("tiny", {"max_num_seqs": 4}, actor="user", reason="user_request")
    with pytest.raises(ActionError, match="one at a time"):
        await h.sup.start_canary("tiny", {"max_num_seqs": 4}, actor="tuner", reason="canary_trial")
    assert h.sup.describe()[0]["replicas"][1]["canary"] is True
    reg = CollectorRegistry()
    reg.register(SupervisorMetrics(h.sup))
    assert b'replica="tiny-1"' not in generate_latest(reg) and b'replica="tiny-0"' in generate_latest(reg)
    await h.sup.stop_canary("tiny", actor="tuner", reason="canary_done")
    assert h.states() == {"tiny-0": "ready", "tiny-1": "stopped"} and h.backend.stopped == ["tiny-1"]
    kinds = h.events()
    assert ("canary_started", "tiny-1", "canary_trial") in kinds
    assert ("canary_stopped", "tiny-1", "canary_done") in kinds
    assert ("replica_started", "tiny-1", "canary") in kinds
    await h.sup.reconfigure("tiny", {"max_num_seqs": 4}, actor="user", reason="user_request")  # free again


async def test_a_canary_that_never_starts_is_reported_and_not_restarted(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    h.backend.fail_on_start = lambda req: req.engine.max_num_seqs == 3
    name, url = await _canary(h, {"max_num_seqs": 3})
    assert url is None and h.states()[name] == "failed"
    await h.ticks(5)
    assert len(h.backend.launched) == 2 and h.sup.runtimes["tiny"].canary is None
    with pytest.raises(ActionError, match="max_num_seqs: Input should be greater than or equal to 1"):
        await h.sup.start_canary("tiny", {"max_num_seqs": 0}, actor="tuner", reason="canary_trial")


async def test_a_canary_left_running_by_a_dead_plane_is_stopped_not_adopted(sqlite_store: Store) -> None:
    first = make(sqlite_store)
    await first.sup.start()
    await first.until(lambda: first.states() == {"tiny-0": "ready"}, "the first replica")
    await _canary(first, {"max_num_seqs": 2})
    backend = FakeBackend(adoptable={"tiny-0", "tiny-1"}, seq=100)  # the plane dies; both processes live on
    backend.ready.update({m.handle.url: True for m in first.sup.runtimes["tiny"].members.values() if m.handle})
    second = make(sqlite_store, backend=backend)
    await second.sup.start()
    assert backend.stopped == ["tiny-1"] and "tiny-1" not in second.states()
    assert ("replica_stopped", "tiny-1", "canary_abandoned") in second.events()
    await second.until(lambda: second.states() == {"tiny-0": "ready"}, "tiny-0 adopted, nothing else")
    assert list(second.router.ready) == ["tiny-0"]


# --- launches racing, a failing deployment, crash loops and full slots under a rolling change ------------------
async def test_a_scale_up_and_a_canary_launched_at_once_get_their_own_slot_port_and_name(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    canary = asyncio.ensure_future(h.sup.start_canary("tiny", {"max_num_seqs": 2}, actor="tuner",
                                                      reason="canary_trial", poll_s=0.005))
    h.clock.now += 0.01
    await h.sup.tick()  # the loop launches the scale-up replica while the canary's launch is under way
    await h.until(canary.done, "the canary to be ready", max_ticks=200)
    launched = [(r.replica, r.slot, r.port) for r in h.backend.launched]
    assert len({name for name, _, _ in launched}) == len({slot for _, slot, _ in launched}) == len(launched) == 3
    rt = h.sup.runtimes["tiny"]
    assert rt.canary is not None and rt.members[rt.canary.name] is rt.canary
    await h.sup.stop_canary("tiny", actor="tuner", reason="done")
    assert sorted(h.states().values()) == ["ready", "ready", "stopped"]


async def test_a_scale_up_and_a_rolling_change_at_once_never_share_a_port(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    h.clock.now += 0.01
    tick = asyncio.ensure_future(h.sup.tick())
    for _ in range(3):
        await asyncio.sleep(0)
    await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="test")
    await tick
    rt = h.sup.runtimes["tiny"]
    await h.until(lambda: rt.rollout is not None and rt.rollout.done() and not rt.tasks
                  and sorted(m.config.max_num_seqs for m in rt.active) == [2, 2], "both replicas on the new config")
    live = [(m.port, m.name) for m in rt.members.values() if m.state not in ("stopped", "failed")]
    assert len({port for port, _ in live}) == len(live) == 2


async def test_one_deployment_failing_its_round_does_not_stop_the_others(sqlite_store: Store) -> None:
    from controlplane.supervisor.backends import ExternalBackend

    class Broken(ExternalBackend):
        def exit_code(self, handle: Handle) -> int | None:
            raise RuntimeError("a backend bug")

    ext = parse_deployment({"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "ext"},
                            "spec": {"model": {"path": "/m", "served_name": "m"}, "replicas": {"min": 1, "max": 1},
                                     "backend": {"kind": "external", "urls": ["http://10.0.0.5:8000"]},
                                     "lifecycle": {"probe_interval_s": 0.001}}})
    backend, clock = FakeBackend(), Clock()
    sup = supervisor(sqlite_store, [ext, spec()], {"local": backend, "external": Broken()}, answers(backend),
                     clock=clock)
    await sup.start()
    for _ in range(20):
        clock.now += 0.01
        await sup.tick()
        await asyncio.sleep(0.01)
    assert {n: m.state for n, m in sup.runtimes["tiny"].members.items()} == {"tiny-0": "ready"}


async def test_a_rolling_change_replaces_a_crash_looping_replica(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    h.backend.fail_on_start = lambda req: req.engine.max_num_seqs == 8  # the running config keeps crashing
    h.backend.exits[h.sup.runtimes["tiny"].members["tiny-0"].handle.url] = 1  # type: ignore[union-attr]
    for _ in range(6):
        await h.ticks(2)
        h.clock.now += 100
    assert h.states() == {"tiny-0": "crashloop"}
    await h.sup.reconfigure("tiny", {"max_num_seqs": 4}, actor="user", reason="fix")
    await h.until(lambda: h.states() == {"tiny-0": "stopped", "tiny-1": "ready"}, "the crash loop replaced")
    rt = h.sup.runtimes["tiny"]
    await h.until(lambda: rt.rollout is not None and rt.rollout.done(), "the rolling change to end")
    assert list(h.router.ready) == ["tiny-1"]
    assert ("rollout_finished", None, "fix") in h.events()


async def test_a_rolling_change_with_every_slot_held_waits_for_one_and_then_rolls_every_replica(
        sqlite_store: Store) -> None:
    h = make(sqlite_store)  # max 3: slots 0..3
    await h.sup.start()
    await h.sup.scale("tiny", 3, actor="user", reason="test")
    await h.until(lambda: list(h.states().values()) == ["ready"] * 3, "three replicas")
    h.router.in_flight.update({"tiny-0": 5, "tiny-1": 5, "tiny-2": 1})  # tiny-2 goes, drained slowly
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    await h.ticks(2)
    await h.sup.scale("tiny", 3, actor="user", reason="test")
    await h.until(lambda: sorted(h.states().values()) == ["draining", "ready", "ready", "ready"], "4 slots held")
    await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="tune")
    rt = h.sup.runtimes["tiny"]
    await h.ticks(10)
    await asyncio.sleep(0.1)
    assert rt.rollout is not None and not rt.rollout.done()  # waiting for a slot, not "finished"
    assert [k for k, _, _ in h.events() if k.startswith("rollout")] == ["rollout_started"]
    h.router.in_flight.clear()  # the drain ends and frees its slot
    await h.until(lambda: rt.rollout.done(), "the rolling change", max_ticks=2000)  # type: ignore[union-attr]
    assert sorted(m.config.max_num_seqs for m in rt.active) == [2, 2, 2]
    assert [k for k, _, _ in h.events() if k.startswith("rollout")] == ["rollout_started", "rollout_finished"]


async def test_after_a_rolling_change_the_replicas_are_still_pinned_to_different_cores(sqlite_store: Store) -> None:
    backend, router, clock = FakeBackend(), FakeRouter(), Clock()
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"}, "engine": {"max_num_seqs": 8},
                 "backend": {"kind": "local", "cpu_cores": [[0], [1]]},
                 "replicas": {"min": 1, "max": 2, "initial": 2},
                 "lifecycle": {"probe_interval_s": 0.001, "drain_timeout_s": 60}}})
    sup = supervisor(sqlite_store, [dep], {"local": backend}, answers(backend), router=router, clock=clock)
    h = Harness(sup, backend, router, clock, sqlite_store)
    await sup.start()
    await h.until(lambda: list(h.states().values()) == ["ready", "ready"], "two replicas")
    await sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="test")
    await h.until(lambda: sorted(h.states().values()) == ["ready", "ready", "stopped", "stopped"], "the roll")
    pinned = {r.replica: r.cores(dep.backend.cpu_cores) for r in backend.launched}  # type: ignore[union-attr]
    live = sorted(pinned[n] for n, s in h.states().items() if s == "ready")
    assert live == [(0,), (1,)], pinned


async def test_a_late_probe_answer_does_not_crash_a_replica_stopped_meanwhile(sqlite_store: Store) -> None:
    h = make(sqlite_store, liveness_failures=1)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    old_url = h.sup.runtimes["tiny"].members["tiny-0"].handle.url  # type: ignore[union-attr]
    gate, slow = asyncio.Event(), {"on": False}

    async def answer(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")
        if url == old_url and request.url.path == "/health" and slow["on"]:
            await gate.wait()  # an overloaded replica: its /health answers late, and with a 503
            return httpx.Response(503)
        return httpx.Response(200 if h.backend.ready.get(url) else 503)

    h.sup.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="tune")
    for _ in range(100):
        if "tiny-1" in h.states():
            break
        await asyncio.sleep(0.01)
    slow["on"] = True
    h.clock.now += 0.01
    tick = asyncio.ensure_future(h.sup.tick())  # probes tiny-0 (hangs) and tiny-1 (ready)
    rollout = h.sup.runtimes["tiny"].rollout
    assert rollout is not None
    for _ in range(100):
        if rollout.done():
            break
        await asyncio.sleep(0.05)
    assert h.states() == {"tiny-0": "stopped", "tiny-1": "ready"}
    gate.set()
    await tick
    assert h.states() == {"tiny-0": "stopped", "tiny-1": "ready"}
    assert not any(kind == "replica_crashed" and name == "tiny-0" for kind, name, _ in h.events())


async def test_a_restarted_plane_stops_the_replicas_of_a_deployment_no_longer_configured(sqlite_store: Store) -> None:
    from controlplane.api import queries

    first = make(sqlite_store)
    await first.sup.start()
    await first.until(lambda: first.states() == {"tiny-0": "ready"}, "the first plane's replica")
    # The plane dies; its next configuration names only "other". tiny-0's process still runs.
    backend = FakeBackend(adoptable={"tiny-0"}, seq=100)
    other = parse_deployment({"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "other"},
                              "spec": {"model": {"path": "/m", "served_name": "other"},
                                       "replicas": {"min": 1, "max": 1, "initial": 1},
                                       "lifecycle": {"probe_interval_s": 0.001}}})
    sup = supervisor(sqlite_store, [other], {"local": backend}, lambda r: httpx.Response(200))
    await sup.start()
    assert backend.stopped == ["tiny-0"]
    states = {r["name"]: r["state"] for r in queries.replicas(sqlite_store.engine)}
    assert states["tiny-0"] == "stopped"
    kinds = [(k, n, why) for k, n, why in Harness(sup, backend, FakeRouter(), Clock(), sqlite_store).events()]
    assert ("replica_stopped", "tiny-0", "deployment_removed") in kinds


async def test_an_external_url_taken_out_of_the_spec_is_no_longer_shown_as_serving(sqlite_store: Store) -> None:
    from controlplane.api import queries
    from controlplane.supervisor.backends import ExternalBackend

    def ext(urls: list[str]) -> Any:
        return parse_deployment({"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "ext"},
                                 "spec": {"model": {"path": "/m", "served_name": "m"},
                                          "backend": {"kind": "external", "urls": urls},
                                          "lifecycle": {"probe_interval_s": 0.001}}})

    for urls in (["http://a.fake:1", "http://b.fake:2"], ["http://a.fake:1"]):
        await supervisor(sqlite_store, [ext(urls)], {"external": ExternalBackend()},
                         lambda r: httpx.Response(200)).start()
    states = {r["name"]: r["state"] for r in queries.replicas(sqlite_store.engine)}
    assert states["ext-1"] == "stopped" and states["ext-0"] != "stopped"


async def test_a_canary_stopped_while_its_exit_code_is_being_read_is_stopped_not_crashed(sqlite_store: Store) -> None:
    import threading

    gate = threading.Event()

    class Slow(FakeBackend):
        asked = threading.Event()

        def exit_code(self, handle: Handle) -> int | None:
            if handle.replica == "tiny-1" and not gate.is_set():
                self.asked.set()
                gate.wait(5)  # a slow Ray call, answered after the trial ended and the process exited
                return 0
            return super().exit_code(handle)

    backend = Slow()
    h = make(sqlite_store, backend=backend)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    canary = asyncio.ensure_future(h.sup.start_canary("tiny", {"max_num_seqs": 2}, actor="tuner",
                                                      reason="canary_trial", poll_s=0.005))
    gate.set()
    await h.until(canary.done, "the canary to be ready")
    gate.clear()
    h.clock.now += 0.01
    tick = asyncio.ensure_future(h.sup.tick())  # reads the canary's exit code, slowly
    await asyncio.to_thread(backend.asked.wait, 5)
    await h.sup.stop_canary("tiny", actor="tuner", reason="canary_done")
    gate.set()
    await tick
    assert h.states()["tiny-1"] == "stopped"
    assert not [k for k, name, _ in h.events() if name == "tiny-1" and k in ("replica_failed", "replica_crashed")]


def _stored_states(h: Harness) -> dict[str, str]:
    return {r["name"]: r["state"] for r in h.store.deployment_replicas(h.sup.runtimes["tiny"].deployment_id)}


class FlakyStore(Store):
    """The real store, whose replica writes fail while `down` (a PostgreSQL failover, a locked SQLite file)."""

    down = False

    def _fail(self) -> None:
        if self.down:
            from sqlalchemy.exc import OperationalError
            raise OperationalError("UPDATE replicas", {}, Exception("connection refused"))

    def save_replica(self, *args: Any, **kwargs: Any) -> int:
        self._fail()
        return super().save_replica(*args, **kwargs)

    def set_replica_state(self, *args: Any, **kwargs: Any) -> None:
        self._fail()
        super().set_replica_state(*args, **kwargs)


async def test_a_restart_the_store_cannot_record_is_stopped_and_tried_again_after_a_back_off(
    sqlite_store: Store,
) -> None:
    store = FlakyStore(sqlite_store.engine)
    h = make(store)
    await h.sup.start()
    await h.ticks()
    m = h.sup.runtimes["tiny"].members["tiny-0"]
    assert m.handle is not None
    h.backend.exits[m.handle.url] = -9
    await h.ticks(1)
    store.down = True
    h.clock.now += 11  # past the 10 s back-off
    await h.ticks(10)
    # One launch, stopped again because it could not be recorded; not one untracked process per tick.
    assert len(h.backend.launched) == 2 and h.backend.stopped.count("tiny-0") == 2
    assert not h.backend.running()
    store.down = False
    h.clock.now += 11
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "restarted once the store is back")
    assert h.backend.running() == [m.handle.url]


async def test_a_scale_up_the_store_cannot_record_backs_off_instead_of_launching_every_tick(
    sqlite_store: Store,
) -> None:
    store = FlakyStore(sqlite_store.engine)
    h = make(store)
    await h.sup.start()
    await h.ticks()
    store.down = True
    await h.sup.scale("tiny", 2, actor="user", reason="x")  # the deployment row is written; replica rows fail
    await h.ticks(10)
    assert len(h.backend.launched) == 2 and h.backend.stopped == ["tiny-1"]
    store.down = False
    h.clock.now += 6
    await h.until(lambda: h.states() == {"tiny-0": "ready", "tiny-1": "ready"}, "scaled up once the store is back")


async def test_a_drain_goes_on_when_the_store_misses_its_state_and_the_state_is_written_later(
    sqlite_store: Store,
) -> None:
    store = FlakyStore(sqlite_store.engine)
    h = make(store)
    await h.sup.start()
    await h.ticks()
    await h.sup.scale("tiny", 2, actor="user", reason="x")
    await h.until(lambda: h.states() == {"tiny-0": "ready", "tiny-1": "ready"}, "two ready")
    await h.sup.scale("tiny", 1, actor="user", reason="x")
    store.down = True
    await h.ticks(1)
    await h.sup.wait_idle()
    assert h.states() == {"tiny-0": "ready", "tiny-1": "stopped"}
    assert list(h.router.ready) == ["tiny-0"] and h.backend.stopped == ["tiny-1"]
    assert _stored_states(h)["tiny-1"] == "ready"  # not written yet
    store.down = False
    await h.ticks(1)
    assert _stored_states(h)["tiny-1"] == "stopped"


async def test_a_replica_whose_ready_state_was_not_stored_is_scraped_all_the_same(sqlite_store: Store) -> None:
    store = FlakyStore(sqlite_store.engine)
    h = make(store)
    scraped: set[str] = set()
    h.sup.on_replica_up = lambda name, url: scraped.add(name)
    await h.sup.start()
    await h.ticks(1)  # launched: starting
    store.down = True
    await h.ticks(2)
    store.down = False
    await h.ticks(2)
    assert h.states() == {"tiny-0": "ready"} and scraped == {"tiny-0"}
    assert _stored_states(h)["tiny-0"] == "ready"


async def test_an_external_replica_back_from_an_outage_is_scraped_again_and_its_outage_recorded_once(
    sqlite_store: Store,
) -> None:
    from controlplane.supervisor.backends import ExternalBackend
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "ext"},
        "spec": {"model": {"path": "/m", "served_name": "m"},
                 "backend": {"kind": "external", "urls": ["http://a.fake:1"]},
                 "lifecycle": {"probe_interval_s": 0.001, "liveness_failures": 3}}})
    healthy = {"ok": True}
    clock, router, scraped = Clock(), FakeRouter(), set()
    sup = supervisor(sqlite_store, [dep], {"external": ExternalBackend()},
                     lambda req: httpx.Response(200 if healthy["ok"] else 503), router=router, clock=clock)
    sup.on_replica_up = lambda name, url: scraped.add(name)
    sup.on_replica_gone = lambda name: scraped.discard(name)
    await sup.start()

    async def ticks(n: int) -> None:
        for _ in range(n):
            clock.now += 0.01
            await sup.tick()

    await ticks(3)
    assert scraped == {"ext-0"}
    healthy["ok"] = False
    await ticks(50)
    assert scraped == set() and router.ready == {}
    unready = [e for e in sqlite_store.events() if e["kind"] == "replica_unready"]
    assert [e["reason"] for e in reversed(unready)] == ["probe_failed", "liveness"]
    healthy["ok"] = True
    await ticks(3)
    assert scraped == {"ext-0"} and list(router.ready) == ["ext-0"]


async def test_no_replica_is_launched_once_shutdown_began(sqlite_store: Store) -> None:
    h = make(sqlite_store, backend=SlowBackend(exit_code_s=0.3))  # the tick is in flight when the plane stops
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "ready")
    h.clock.now += 0.01
    in_flight = asyncio.create_task(h.sup.tick())
    await asyncio.sleep(0.1)
    await h.sup.shutdown()
    await in_flight
    await h.ticks(2)
    assert h.states() == {"tiny-0": "stopped"}
    assert len(h.backend.launched) == 1 and not h.backend.running()


async def test_a_rolling_change_the_store_cannot_record_is_not_restarted_every_tick(sqlite_store: Store) -> None:
    store = FlakyStore(sqlite_store.engine)
    h = make(store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "ready")
    store.down = True
    await h.sup.reconfigure("tiny", {"max_num_seqs": 16}, actor="user", reason="x")
    for _ in range(10):
        await h.ticks(1)
        await asyncio.sleep(0.05)
    assert len(h.backend.launched) == 2  # the first replica, and one try of the change: not one per tick
    assert ("rollout_failed", None, "error") in h.events()


async def test_a_launch_in_flight_when_shutdown_begins_is_stopped_too(sqlite_store: Store) -> None:
    backend = SlowBackend(stop_s=0.3)
    h = make(sqlite_store, backend=backend)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "ready")
    backend.launch_s = 0.5  # a Ray actor's start
    await h.sup.scale("tiny", 3, actor="user", reason="x")
    h.clock.now += 0.01
    in_flight = asyncio.create_task(h.sup.tick())
    await asyncio.sleep(0.1)
    await h.sup.shutdown()  # raised "dictionary changed size during iteration" before
    await asyncio.gather(in_flight, return_exceptions=True)
    assert not backend.running()
    assert set(h.states().values()) == {"stopped"}


async def test_a_rolling_change_cancelled_by_shutdown_mid_launch_leaves_no_process_behind(
        sqlite_store: Store) -> None:
    backend = SlowBackend()
    h = make(sqlite_store, backend=backend)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "ready")
    backend.launch_s = 0.5  # the process is starting, in its own session, when the rollout is cancelled
    await h.sup.reconfigure("tiny", {"max_num_seqs": 16}, actor="user", reason="x")
    await asyncio.sleep(0.1)
    await h.sup.shutdown()
    assert len(backend.launched) == 2 and not backend.running()


async def test_a_replica_drained_while_its_ready_state_is_stored_is_not_routed_to(sqlite_store: Store) -> None:
    # A rolling change drains a replica that was still starting; its ready probe passed just before, and the
    # store (a busy PostgreSQL) takes a while to record READY. Announcing it after that would route new requests
    # to a replica being drained.
    class SlowStateStore(Store):
        slow = False

        def set_replica_state(self, replica_id: int, state: str) -> None:
            if self.slow:
                time.sleep(0.3)
            super().set_replica_state(replica_id, state)

    store = SlowStateStore(sqlite_store.engine)
    h = make(store)
    await h.sup.start()
    launch = h.backend.launch

    def launch_unready(req: LaunchRequest) -> Handle:
        handle = launch(req)
        h.backend.ready[handle.url] = False
        return handle

    h.backend.launch = launch_unready  # type: ignore[method-assign]
    await h.ticks(1)
    rt = h.sup.runtimes["tiny"]
    m = rt.members["tiny-0"]
    assert m.state == "starting" and m.handle is not None
    h.backend.ready[m.handle.url] = True
    store.slow = True
    h.clock.now += 0.01
    tick = asyncio.ensure_future(h.sup.tick())
    await asyncio.sleep(0.1)  # the tick is storing READY now
    drain = asyncio.ensure_future(h.sup._drain_and_stop(rt, m, "supervisor", "scale_down"))
    await tick
    assert m.state == "draining" and "tiny-0" not in h.router.ready
    drain.cancel()


async def test_a_deployment_scaled_to_zero_stays_at_zero_after_a_plane_restart(sqlite_store: Store) -> None:
    def zero_min() -> Any:
        d = spec()
        body = {**d.spec}
        body["spec"] = {**body["spec"], "replicas": {"min": 0, "max": 3, "initial": 1}}
        return parse_deployment(body)

    backend = FakeBackend()
    first = supervisor(sqlite_store, [zero_min()], {"local": backend}, answers(backend))
    await first.start()
    await first.scale("tiny", 0, actor="user", reason="user_request")
    assert sqlite_store.deployment_state("tiny")["desired_replicas"] == 0  # type: ignore[index]
    again = FakeBackend(seq=100)
    second = supervisor(sqlite_store, [zero_min()], {"local": again}, answers(again))
    await second.start()
    await second.tick()
    assert second.runtimes["tiny"].desired == 0 and again.launched == []  # the GPU the operator turned off stays off


async def test_a_backend_that_cannot_say_whether_a_replica_still_runs_stops_the_plane_starting(
        sqlite_store: Store) -> None:
    from controlplane.supervisor.backends import AdoptUnknown

    first = make(sqlite_store)
    await first.sup.start()
    await first.until(lambda: list(first.states().values()) == ["ready"], "ready")

    class Unsure(FakeBackend):
        def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
            raise AdoptUnknown(f"ray replica {replica}: the cluster did not say (GetTimeoutError)")

    backend = Unsure(seq=100)
    second = make(sqlite_store, backend=backend)
    with pytest.raises(AdoptUnknown, match="does not start a replacement"):
        await second.sup.start()
    assert backend.launched == [] and _stored_states(second) == {"tiny-0": "ready"}  # not taken for gone


async def test_a_crash_looping_replica_stays_given_up_across_a_plane_restart(sqlite_store: Store) -> None:
    h = make(sqlite_store, restart_backoff_initial_s=0.001)
    await h.sup.start()
    for _ in range(4):  # crashes until it is a crash loop
        await h.ticks()
        m = h.sup.runtimes["tiny"].members["tiny-0"]
        if m.state == "crashloop":
            break
        assert m.handle is not None
        h.backend.exits[m.handle.url] = 1
        await h.ticks(1)
        h.clock.now += 1
    assert h.states() == {"tiny-0": "crashloop"}
    launched = len(h.backend.launched)
    again = FakeBackend(seq=100)
    second = make(sqlite_store, backend=again)
    await second.sup.start()
    await second.ticks()
    assert second.states() == {"tiny-0": "crashloop"} and again.launched == []  # not relaunched with a clean slate
    assert ("replica_crashloop_kept", "tiny-0", "plane_restart") in second.events() and launched >= 3
    registry = CollectorRegistry()
    registry.register(SupervisorMetrics(second.sup))
    assert 'controlplane_replica_crashloop{deployment="tiny",replica="tiny-0"} 1.0' in generate_latest(
        registry).decode()


async def test_a_rolling_change_also_replaces_a_replica_whose_launch_was_in_flight_when_it_began(
        sqlite_store: Store) -> None:
    # A scale-up's launch (seconds on Ray) holds the old configuration while it runs; the replica joins the members
    # only when the launch returns. A change made meanwhile must replace it too, in the same rolling change,
    # before it says every replica runs the new configuration.
    backend = SlowBackend()
    h = make(sqlite_store, backend=backend)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "ready")
    backend.launch_s = 0.3
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    h.clock.now += 0.01
    tick = asyncio.create_task(h.sup.tick())  # launches tiny-1 on the old configuration
    await asyncio.sleep(0.1)
    assert h.states() == {"tiny-0": "ready"} and not tick.done()  # tiny-1's launch is in flight
    await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="tune")
    await tick
    rt = h.sup.runtimes["tiny"]
    await h.until(lambda: rt.rollout is not None and rt.rollout.done(), "the rolling change", max_ticks=2000)
    assert sorted(m.config.max_num_seqs for m in rt.counted) == [2, 2]
    assert [k for k, _, _ in h.events() if k.startswith("rollout")] == ["rollout_started", "rollout_finished"]


async def test_a_drain_waits_while_the_engine_s_metrics_cannot_be_read(sqlite_store: Store) -> None:
    # Requests sent straight to the replica (not through the router) show only in vLLM's own gauges. An
    # unreadable /metrics is unknown, not idle: stopping then would cut them off.
    h = make(sqlite_store)
    await h.sup.start()
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    await h.until(lambda: list(h.states().values()) == ["ready", "ready"], "two replicas")
    victim = h.sup.runtimes["tiny"].members["tiny-1"]
    assert victim.handle is not None
    broken = victim.handle.url

    def answer(request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            return httpx.Response(500) if url == broken else httpx.Response(
                200, text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")
        return httpx.Response(200 if h.backend.ready.get(url) else 503)

    h.sup.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    await h.sup.scale("tiny", 1, actor="user", reason="test")
    await h.ticks(2)
    await asyncio.sleep(0.6)  # three rounds of the drain's checks
    assert h.states()["tiny-1"] == "draining" and "tiny-1" not in h.backend.stopped
    h.backend.exits[broken] = 0  # the process ended: nothing can be in flight any more
    await h.until(lambda: h.states()["tiny-1"] == "stopped", "the drain to end once the process is gone")
    stop = next(e for e in h.store.events() if e["kind"] == "replica_stopped" and e["replica"] == "tiny-1")
    assert stop["reason"] == "scale_down" and stop["message"].startswith("drained in")


async def test_a_replica_draining_when_the_plane_died_finishes_its_drain_and_is_never_routed_again(
        sqlite_store: Store) -> None:
    first = make(sqlite_store)
    await first.sup.start()
    await first.sup.scale("tiny", 2, actor="user", reason="test")
    await first.until(lambda: list(first.states().values()) == ["ready", "ready"], "two replicas")
    first.router.in_flight.update({"tiny-0": 5, "tiny-1": 3})  # tiny-1 goes, drained slowly: the plane dies
    await first.sup.scale("tiny", 1, actor="user", reason="test")
    await first.until(lambda: first.states()["tiny-1"] == "draining", "tiny-1 draining")
    backend = FakeBackend(adoptable={"tiny-0", "tiny-1"}, seq=100)  # the plane dies; both processes live on
    backend.ready.update({m.handle.url: True for m in first.sup.runtimes["tiny"].members.values() if m.handle})
    second = make(sqlite_store, backend=backend)
    await second.sup.start()
    await second.until(lambda: second.states() == {"tiny-0": "ready", "tiny-1": "stopped"}, "the drain to end")
    assert backend.stopped == ["tiny-1"] and list(second.router.ready) == ["tiny-0"]
    assert ("ready", "tiny-1") not in second.router.log and ("drain", "tiny-1") in second.router.log
    assert not backend.launched  # one replica wanted, one kept: nothing started
    assert ("replica_stopped", "tiny-1", "drain_resumed") in second.events()
    for task in list(first.sup.runtimes["tiny"].tasks):
        task.cancel()


async def test_a_change_rolled_back_part_way_names_the_replicas_already_on_it(sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.sup.scale("tiny", 2, actor="user", reason="test")
    await h.until(lambda: list(h.states().values()) == ["ready", "ready"], "two replicas")
    launches = {"n": 0}

    def second_new_one_fails(req: LaunchRequest) -> bool:  # the first replacement starts, the second does not
        if req.engine.max_num_seqs != 2:
            return False
        launches["n"] += 1
        return launches["n"] == 2

    h.backend.fail_on_start = second_new_one_fails
    await h.sup.reconfigure("tiny", {"max_num_seqs": 2}, actor="user", reason="tune")
    rt = h.sup.runtimes["tiny"]
    await h.until(lambda: rt.rollout is not None and rt.rollout.done(), "the change to roll back", max_ticks=2000)
    rolled = next(e for e in h.store.events() if e["kind"] == "rollout_rolled_back")
    on_new = sorted(m.name for m in rt.counted if m.config.max_num_seqs == 2)
    assert on_new == ["tiny-2"]
    assert "tiny-2 already on the new configuration, rolled back next" in rolled["message"]
    assert rolled["attributes"]["switched"] == ["tiny-2"]


async def test_a_canary_whose_caller_is_cancelled_while_it_starts_is_stopped_not_left_holding_its_place(
        sqlite_store: Store) -> None:
    h = make(sqlite_store)
    await h.sup.start()
    await h.until(lambda: h.states() == {"tiny-0": "ready"}, "the first replica")
    task = asyncio.ensure_future(h.sup.start_canary("tiny", {"max_num_seqs": 2}, actor="tuner",
                                                    reason="canary_trial", poll_s=0.005))
    for _ in range(100):  # launched, not yet probed ready (no tick runs)
        if h.sup.runtimes["tiny"].canary is not None:
            break
        await asyncio.sleep(0.01)
    name = h.sup.runtimes["tiny"].canary.name  # type: ignore[union-attr]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.sup.runtimes["tiny"].canary is None and name in h.backend.stopped
    assert h.states()[name] == "stopped"
    again, _ = await _canary(h, {"max_num_seqs": 3})  # its place is free: no 409
    assert again != name


async def test_a_new_replica_loading_its_model_is_starting_for_the_down_page_and_a_restart_is_not(
        sqlite_store: Store) -> None:
    h = make(sqlite_store)
    registry = CollectorRegistry()
    registry.register(SupervisorMetrics(h.sup))
    h.backend.ready.clear()
    launch = h.backend.launch

    def loading(req: LaunchRequest) -> Handle:  # up, but /health not answering yet: the model loads
        handle = launch(req)
        h.backend.ready[handle.url] = False
        return handle

    h.backend.launch = loading  # type: ignore[method-assign]
    await h.sup.start()
    await h.ticks(2)
    assert h.states() == {"tiny-0": "starting"}
    text = generate_latest(registry).decode()
    assert 'controlplane_replica_starting{deployment="tiny",replica="tiny-0"} 1.0' in text
    assert 'controlplane_replica_up{deployment="tiny",replica="tiny-0"} 0.0' in text
    m = h.sup.runtimes["tiny"].members["tiny-0"]
    h.backend.exits[m.handle.url] = 1  # type: ignore[union-attr]  # it crashed while loading
    await h.ticks(1)
    h.clock.now += 11  # past the restart back-off: restarted, loading again
    await h.ticks(2)
    assert h.states() == {"tiny-0": "starting"} and m.restarts == 1
    assert 'controlplane_replica_starting{deployment="tiny",replica="tiny-0"} 0.0' in generate_latest(
        registry).decode()  # a restart after a crash is no grace for the page


async def test_a_replica_adopted_after_a_plane_restart_gets_no_cold_start_grace(sqlite_store: Store) -> None:
    first = make(sqlite_store)
    await first.sup.start()
    await first.until(lambda: first.states() == {"tiny-0": "ready"}, "the first replica")
    backend = FakeBackend(adoptable={"tiny-0"}, seq=100)  # the plane dies; the process lives on, hung
    second = make(sqlite_store, backend=backend)
    registry = CollectorRegistry()
    registry.register(SupervisorMetrics(second.sup))
    await second.sup.start()
    assert second.states() == {"tiny-0": "starting"}  # adopted; its /health does not answer (hung)
    assert 'controlplane_replica_starting{deployment="tiny",replica="tiny-0"} 0.0' in generate_latest(
        registry).decode()
