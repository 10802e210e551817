"""The supervisor: the one owner of each deployment's replica count and configuration.

It converges the fleet to the desired state on a short tick: probes readiness and liveness, restarts
crashed replicas with back-off (or gives up on a crash loop), starts and drains replicas to match
the desired count, and rolls configuration changes one replica at a time (start new, wait ready,
shift traffic, drain old; roll back when the new one never becomes ready). Every action is stored
with its actor, reason code and the configuration before and after.

Rules live in `policy` (pure); side effects go through the injected backend, router, HTTP client
and store. Blocking calls (process start/stop, database writes) run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collectors.promtext import scrape
from collectors.vllm_metrics import read_engine
from controlplane import names
from controlplane.store.repo import Store
from controlplane.supervisor import policy
from controlplane.supervisor.backends import AdoptUnknown, Backend, Handle, LaunchRequest, LocalBackend
from controlplane.supervisor.policy import (
    ACTIVE_STATES,
    COUNTED_STATES,
    CRASHED,
    CRASHLOOP,
    DRAINING,
    FAILED,
    READY,
    STARTING,
    STOPPED,
    UNREADY,
)
from controlplane.supervisor.spec import Deployment, EngineConfig, ExternalBackend, SpecError

log = logging.getLogger(__name__)

# Actors and reason codes stored with every action.
ACTOR_USER, ACTOR_TUNER, ACTOR_SUPERVISOR = "user", "tuner", "supervisor"


class RouterControl(Protocol):
    def set_ready(self, name: str, url: str, model: str | None = None) -> None: ...
    def set_models(self, models: set[str]) -> None: ...
    def set_unready(self, name: str) -> None: ...
    def drain(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def outstanding(self, name: str) -> int: ...


class ActionError(ValueError):
    """A requested action that cannot be done as asked (bad count, unknown deployment, busy). `retryable`: the
    same request may succeed later (a rolling change or canary running, the plane shutting down)."""

    def __init__(self, message: str, status: int = 400, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass
class Member:
    name: str
    replica_id: int
    slot: int
    port: int
    config: EngineConfig
    handle: Handle | None
    state: str
    since: float
    candidate: bool = False  # started by a rolling change; a failure fails the change, no restart
    canary: bool = False  # a candidate for a trial: never routed, never traced, never counted, stopped after
    probe_failures: int = 0
    crashes: tuple[float, ...] = ()
    next_restart_at: float | None = None
    next_probe_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    core_index: int | None = None  # the backend's cpu_cores set it is pinned to (None: its slot's)
    announced: bool = False  # on_replica_up succeeded (it is scraped) and on_replica_gone has not run since
    fresh: bool = False  # launched by this plane and not restarted since: while starting, it loads its model
    unsaved_state: bool = False  # the store missed its last state change: written again each tick


@dataclass
class DeploymentRuntime:
    dep: Deployment
    deployment_id: int
    backend: Backend
    desired: int
    members: dict[str, Member] = field(default_factory=dict)
    rollout: asyncio.Task[None] | None = None
    canary: Member | None = None  # the canary trial's replica while one runs
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Held from choosing a new replica's slot and name until it is a member: two launches at once (a scale-up
    # in the loop, a rolling change, a canary) would otherwise both see the same slot, port and name free.
    launch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    converge_after: float = 0.0  # a blocked rolling change is retried from here on, not every tick
    next_launch_at: float = 0.0  # after a failed scale-up launch (e.g. the store down), not before this

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members.values() if m.state in ACTIVE_STATES and not m.candidate]

    @property
    def counted(self) -> list[Member]:
        """Members that hold a place in the desired count (crash-looping ones too)."""
        return [m for m in self.members.values() if m.state in COUNTED_STATES and not m.candidate]


def _cfg(c: EngineConfig) -> dict[str, Any]:
    return c.as_dict()


class Supervisor:
    def __init__(
        self,
        deployments: list[Deployment],
        backends: Mapping[str, Backend],
        store: Store,
        router: RouterControl,
        client: httpx.AsyncClient,
        *,
        log_dir: Path,
        otlp_endpoint: str | None,
        otlp_protocol: str = "grpc",
        on_replica_up: Callable[[str, str], None] = lambda name, url: None,
        on_replica_gone: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.5,
    ) -> None:
        self.specs = {d.name: d for d in deployments}
        self.backends = backends
        self.store = store
        self.router = router
        self.client = client
        self.log_dir = log_dir
        self.otlp_endpoint, self.otlp_protocol = otlp_endpoint, otlp_protocol
        self.on_replica_up, self.on_replica_gone = on_replica_up, on_replica_gone
        self.clock = clock
        self.tick_s = tick_s
        self.runtimes: dict[str, DeploymentRuntime] = {}
        self._stopping = False
        self._tick_lock = asyncio.Lock()
        self._abandoned: set[asyncio.Future[None]] = set()  # stops of launches cancelled mid-way

    # --- start: resume what the store recorded ------------------------------------------------
    async def start(self) -> None:
        self.router.set_models({d.served_name for d in self.specs.values()})
        await self._stop_orphans()  # first: a removed deployment's replica may hold a port a configured one needs
        for dep in self.specs.values():
            await self._resume(dep)

    async def _stop_orphans(self) -> None:
        """Replicas a previous plane recorded as running for a deployment no longer configured: stopped (this
        plane would neither route to, scale nor watch them). One whose backend this plane has no object for is
        only reported."""
        for stored in await asyncio.to_thread(self.store.deployments):
            if stored["name"] in self.specs:
                continue
            doc = stored["spec"] if isinstance(stored["spec"], dict) else {}
            kind = str(((doc.get("spec") or doc).get("backend") or {}).get("kind", "local"))
            for row in await asyncio.to_thread(self.store.deployment_replicas, stored["id"]):
                if row["state"] in (STOPPED, FAILED):
                    continue
                backend = self.backends.get(kind)
                if kind == "external" or not row["runtime"]:
                    await asyncio.to_thread(self.store.set_replica_state, row["id"], STOPPED)
                    continue  # never the plane's process: it only stops watching it
                if backend is None:
                    log.warning("%s: replica %s of the removed deployment may still run on the %s backend, which "
                                "this plane does not use; stop it by hand", stored["name"], row["name"], kind)
                    continue
                handle = await asyncio.to_thread(backend.adopt, row["name"], row["url"], row["runtime"])
                if handle is not None:
                    await asyncio.to_thread(backend.stop, handle, 30.0)
                await asyncio.to_thread(self.store.set_replica_state, row["id"], STOPPED)
                await self._record(row["id"], "replica_stopped", ACTOR_SUPERVISOR, "deployment_removed",
                                   message=f"{stored['name']} is no longer configured: "
                                           + ("stopped" if handle is not None else "its process was gone"))

    async def _resume(self, dep: Deployment) -> None:
        backend = self.backends[dep.backend.kind]
        stored = await asyncio.to_thread(self.store.deployment_state, dep.name)
        desired, engine, why = dep.initial_replicas, dep.engine, "new"
        if stored is not None:
            if stored["spec"] == dep.spec and stored["engine_config"] is not None:
                # Same file as last time: run-time changes (scale, rolling changes) survive the restart.
                if stored["desired_replicas"] is not None:  # 0 too: a deployment scaled to zero stays there
                    desired = int(stored["desired_replicas"])
                try:
                    engine = EngineConfig.from_dict(stored["engine_config"])
                except SpecError as exc:
                    log.warning("%s: stored engine config unusable (%s); using the spec's", dep.name, exc)
                why = "resumed"
            else:
                why = "spec_changed"
        if isinstance(dep.backend, ExternalBackend):
            desired = len(dep.backend.urls)
        dep = dep.with_engine(engine)
        dep_id = await asyncio.to_thread(
            self.store.save_deployment, dep.name, model=dep.served_name, spec=dep.spec,
            desired_replicas=desired, engine_config=_cfg(engine))
        rt = DeploymentRuntime(dep, dep_id, backend, desired)
        self.runtimes[dep.name] = rt
        await self._record(None, "deployment_started", ACTOR_USER if why == "spec_changed" else ACTOR_SUPERVISOR,
                           why, message=f"{dep.name}: {desired} replica(s) on the {backend.kind} backend",
                           after={"replicas": desired, **_cfg(engine)})
        now = self.clock()
        if isinstance(dep.backend, ExternalBackend):
            for i, url in enumerate(dep.backend.urls):
                name = f"{dep.name}-{i}"
                rid = await self._save(rt, name, url, STARTING, {}, engine)
                handle = backend.adopt(name, url, {})
                rt.members[name] = Member(name, rid, i, 0, engine, handle, STARTING, now)
            for row in await asyncio.to_thread(self.store.deployment_replicas, dep_id):
                if row["name"] not in rt.members and row["state"] not in (STOPPED, FAILED):
                    await asyncio.to_thread(self.store.set_replica_state, row["id"], STOPPED)  # a URL taken out
            return
        for row in await asyncio.to_thread(self.store.deployment_replicas, dep_id):
            if row["state"] in (STOPPED, FAILED) or not row["runtime"]:
                continue
            if row["state"] == CRASHLOOP and not row["runtime"].get("canary"):
                # It was given up on (its process stopped): a plane restart is no fix, so it stays given up and
                # counted, rather than relaunched with a clean crash history every time the plane restarts. A
                # scale-down removes it first; a rolling change replaces it.
                rt.members[row["name"]] = self._member_of(row, engine, None, CRASHLOOP, now)
                await self._record(row["id"], "replica_crashloop_kept", ACTOR_SUPERVISOR, "plane_restart",
                                   message="crash-looping when the plane went away: not restarted")
                continue
            try:
                handle = await asyncio.to_thread(backend.adopt, row["name"], row["url"], row["runtime"])
            except AdoptUnknown as exc:
                # Taken for gone it would keep its GPUs and port, unsupervised, beside a replacement: refuse to start.
                raise AdoptUnknown(f"{dep.name}: {exc}; the plane does not start a replacement that could leave it "
                                   "running unsupervised. Start the plane again once the cluster answers") from None
            if handle is not None and row["runtime"].get("canary"):
                # A canary trial's replica outlived the plane: it never served, so stop it, never adopt it.
                await asyncio.to_thread(backend.stop, handle, 10.0)
                await asyncio.to_thread(self.store.set_replica_state, row["id"], STOPPED)
                await self._record(row["id"], "replica_stopped", ACTOR_SUPERVISOR, "canary_abandoned",
                                   message="a canary trial's replica found running at start: stopped")
                continue
            if handle is None:
                await asyncio.to_thread(self.store.set_replica_state, row["id"], STOPPED)
                await self._record(row["id"], "replica_lost", ACTOR_SUPERVISOR, "plane_restart",
                                   message="recorded as running, but its process is gone")
                continue
            if row["state"] == DRAINING:
                # It was leaving (a scale-down, or replaced by a rolling change) when the plane went away: adopted
                # as starting it would be routed to again and kept. Its drain goes on, not counted.
                m = rt.members[row["name"]] = self._member_of(row, engine, handle, DRAINING, now)
                await self._record(row["id"], "replica_adopted", ACTOR_SUPERVISOR, "plane_restart",
                                   message=f"re-adopted {backend.kind} replica at {row['url']}, draining when the "
                                           "plane went away: its drain goes on", attributes={"runtime": row["runtime"]})
                self._spawn(rt, self._drain_and_stop(rt, m, ACTOR_SUPERVISOR, "drain_resumed"))
                continue
            rt.members[row["name"]] = self._member_of(row, engine, handle, STARTING, now)
            await self._record(row["id"], "replica_adopted", ACTOR_SUPERVISOR, "plane_restart",
                               message=f"re-adopted {backend.kind} replica at {row['url']}",
                               attributes={"runtime": row["runtime"]})

    @staticmethod
    def _member_of(row: dict[str, Any], engine: EngineConfig, handle: Handle | None, state: str,
                   now: float) -> Member:
        """The member a stored replica row describes (its own engine config when readable, else `engine`)."""
        try:
            config = EngineConfig.from_dict(row["config"] or {})
        except SpecError:
            config = engine
        runtime = row["runtime"]
        core = runtime.get("core_index")
        return Member(row["name"], row["id"], int(runtime.get("slot", 0)), int(runtime.get("port", 0)), config,
                      handle, state, now, core_index=int(core) if isinstance(core, int) else None)

    # --- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not end supervision
                log.exception("supervisor tick failed")
            try:
                await asyncio.wait_for(stop.wait(), self.tick_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        async with self._tick_lock:  # shutdown waits for a round in flight before it stops replicas
            await self._tick()

    async def _tick(self) -> None:
        now = self.clock()
        for rt in self.runtimes.values():
            if self._stopping:
                return
            try:  # one deployment's failure must not stop the supervision of the others
                for m in list(rt.members.values()):
                    if m.unsaved_state:
                        await self._save_state(m)
                results = await asyncio.gather(*(self._check(rt, m, now) for m in list(rt.members.values())),
                                               return_exceptions=True)
                for r in results:
                    if isinstance(r, Exception):
                        log.error("%s: checking a replica failed", rt.dep.name, exc_info=r)
                await self._reconcile(rt, now)
            except Exception:  # noqa: BLE001 - logged; the next tick tries again
                log.exception("%s: supervision round failed", rt.dep.name)

    async def _check(self, rt: DeploymentRuntime, m: Member, now: float) -> None:
        lc = rt.dep.lifecycle
        if m.state in (STOPPED, FAILED, CRASHLOOP):
            return
        if m.state == CRASHED:
            if m.next_restart_at is not None and now >= m.next_restart_at:
                await self._launch(rt, m.name, m.slot, m.config, restart_of=m)
            return
        # Each await below (exit code, probes) can see the replica drained, stopped or restarted meanwhile: an
        # answer about the state it had before is stale then, and is dropped.
        before = m.state
        if m.handle is not None and m.state != DRAINING:
            code = await asyncio.to_thread(rt.backend.exit_code, m.handle)  # a Ray call can take seconds
            if m.state != before:  # e.g. the end of a canary trial stopped it: its exit is not a crash
                return
            if code is not None:
                await self._crashed(rt, m, now, f"process exited with code {code}", "exited", code)
                return
        if m.state == DRAINING or now < m.next_probe_at:
            return
        m.next_probe_at = now + lc.probe_interval_s
        url = m.handle.url if m.handle else ""
        if m.state == STARTING:
            ready = await self._probe(url, lc.probe_timeout_s, ready=True)
            if m.state != before:
                return
            if ready:
                await self._set_state(rt, m, READY, "ready", f"ready after {now - m.since:.1f} s")
                if not m.canary and m.state == READY:  # a drain may have begun while the state was stored
                    self._announce(rt, m, url)
            elif now - m.since > lc.ready_timeout_s:
                await self._crashed(rt, m, now, f"not ready after {lc.ready_timeout_s:.0f} s", "ready_timeout",
                                    None)
            return
        ok = await self._probe(url, lc.probe_timeout_s, ready=False)
        if m.state != before:
            return
        verdict = policy.on_probe(m.probe_failures, ok, lc.liveness_failures)
        m.probe_failures = verdict.failures
        if ok and m.state == UNREADY:
            await self._set_state(rt, m, READY, "probe_ok", "liveness probe passes again")
            if not m.canary and m.state == READY:  # as above
                self._announce(rt, m, url)
        elif ok and m.state == READY and not m.canary:
            # The router marks a replica down on its own when a request to it fails; a passing probe puts it
            # back (idempotent), or a single reset connection would keep a healthy replica out for good.
            self._announce(rt, m, url)
        elif not ok and m.state == READY:
            await self._set_state(rt, m, UNREADY, "probe_failed", "liveness probe failed")
            self.router.set_unready(m.name)
        if verdict.dead:
            await self._crashed(rt, m, now, f"{verdict.failures} liveness probes failed in a row", "liveness", None)

    async def _probe(self, url: str, timeout_s: float, *, ready: bool) -> bool:
        paths = ("/health", "/v1/models") if ready else ("/health",)
        try:
            for p in paths:
                r = await self.client.get(url + p, timeout=timeout_s)
                if r.status_code != 200:
                    return False
            return True
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):  # a URL httpx refuses fails the probe too
            return False

    def _announce(self, rt: DeploymentRuntime, m: Member, url: str) -> None:
        """Route to the replica and have it scraped. Both are idempotent; a failure to add the scrape target
        (it registers the replica in the store) is logged and tried again at the next passing probe."""
        self.router.set_ready(m.name, url, rt.dep.served_name)
        if m.announced:
            return
        try:
            self.on_replica_up(m.name, url)
        except Exception:  # noqa: BLE001 - the replica serves anyway; the next probe tries again
            log.exception("%s: could not start scraping it; trying again at the next probe", m.name)
        else:
            m.announced = True

    def _withdraw(self, m: Member) -> None:
        self.router.remove(m.name)
        try:
            self.on_replica_gone(m.name)
        except Exception:  # noqa: BLE001 - it is out of the router; a scrape of it fails and is recorded
            log.exception("%s: could not stop scraping it", m.name)
        m.announced = False

    async def _crashed(self, rt: DeploymentRuntime, m: Member, now: float, message: str, reason: str,
                       code: int | None) -> None:
        was_announced = m.announced
        self._withdraw(m)
        if isinstance(rt.dep.backend, ExternalBackend):
            # Recorded once, when it is taken out; each later failed probe finds it out already.
            if was_announced or m.state != UNREADY:
                await self._set_state(rt, m, UNREADY, reason, message)
            return
        if m.handle is not None:
            # A replica that died (or hangs) may leave engine processes behind; kill its whole group.
            await asyncio.to_thread(rt.backend.stop, m.handle, 0.0 if code is not None else 5.0)
        m.last_exit = code
        if m.candidate:
            await self._set_state(rt, m, FAILED, reason, message)
            return
        lc = rt.dep.lifecycle
        decision = policy.on_crash(m.crashes, now, policy.RestartRules(
            lc.restart_backoff_initial_s, lc.restart_backoff_max_s, lc.crashloop_restarts, lc.crashloop_window_s))
        m.crashes = decision.crash_times
        if decision.action == "crashloop":
            await self._set_state(rt, m, CRASHLOOP, "crashloop",
                                  f"{message}; {decision.recent_crashes} crashes within "
                                  f"{lc.crashloop_window_s:.0f} s: not restarting again")
            return
        m.next_restart_at = now + decision.delay_s
        await self._set_state(rt, m, CRASHED, reason,
                              f"{message}; restart in {decision.delay_s:.0f} s "
                              f"(crash {decision.recent_crashes} of {lc.crashloop_restarts} allowed)")

    async def _reconcile(self, rt: DeploymentRuntime, now: float) -> None:
        if isinstance(rt.dep.backend, ExternalBackend) or (rt.rollout is not None and not rt.rollout.done()):
            return
        active = rt.counted
        if len(active) < rt.desired and now >= rt.next_launch_at:
            for _ in range(rt.desired - len(active)):
                try:
                    if await self._launch_new(rt, rt.dep.engine) is None:
                        break
                except Exception:
                    rt.next_launch_at = now + _retry_launch_after_s(rt)
                    raise
        elif len(active) > rt.desired:
            views = [policy.ReplicaView(m.name, m.state, m.slot, self.router.outstanding(m.name), m.since)
                     for m in active]
            for name in policy.scale_down_victims(views, len(active) - rt.desired):
                self._spawn(rt, self._drain_and_stop(rt, rt.members[name], ACTOR_SUPERVISOR, "scale_down"))
        elif any(m.config != rt.dep.engine for m in rt.counted) and now >= rt.converge_after:
            # Members on an old config (e.g. adopted after the spec changed, or crash-looping on it): roll them.
            rt.rollout = asyncio.create_task(self._rollout(rt, ACTOR_SUPERVISOR, "converge", None))

    async def _launch_new(self, rt: DeploymentRuntime, config: EngineConfig, *, candidate: bool = False,
                          canary: bool = False, replacing: Member | None = None) -> Member | None:
        """Launch a new replica on the lowest free slot (None: no slot free), slot and name reserved under the
        deployment's launch lock until the replica is a member. One `replacing` another takes its core set."""
        async with rt.launch_lock:
            slot = policy.free_slot(self._used_slots(rt), rt.dep.max_replicas + 1)
            if slot is None:
                return None
            name = policy.next_replica_name(rt.dep.name, await self._all_names(rt))
            core = (self._free_core_set(rt) if replacing is None
                    else replacing.slot if replacing.core_index is None else replacing.core_index)
            return await self._launch(rt, name, slot, config, candidate=candidate, canary=canary, core_index=core)

    def _free_core_set(self, rt: DeploymentRuntime) -> int | None:
        """The backend's core set that the fewest live replicas are pinned to (lowest first). Not the slot's: a
        rolling change leaves replicas on slots whose sets coincide (slots 0 and 2 of two sets), which would
        pin two replicas to one core and leave the other idle. A replacement takes the replaced one's set."""
        sets = getattr(rt.dep.backend, "cpu_cores", ())
        if not sets:
            return None
        live = [m.slot if m.core_index is None else m.core_index for m in rt.members.values()
                if m.state not in (STOPPED, FAILED)]
        return min(range(len(sets)), key=lambda i: (sum(1 for c in live if c % len(sets) == i), i))

    def _used_slots(self, rt: DeploymentRuntime) -> list[int]:
        return [m.slot for m in rt.members.values() if m.state not in (STOPPED, FAILED)]

    async def _all_names(self, rt: DeploymentRuntime) -> list[str]:
        rows = await asyncio.to_thread(self.store.deployment_replicas, rt.deployment_id)
        return [r["name"] for r in rows] + list(rt.members)

    def _spawn(self, rt: DeploymentRuntime, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        rt.tasks.add(task)
        task.add_done_callback(rt.tasks.discard)
        task.add_done_callback(_log_failure)

    # --- effects --------------------------------------------------------------------------------
    async def _launch(self, rt: DeploymentRuntime, name: str, slot: int, config: EngineConfig, *,
                      restart_of: Member | None = None, candidate: bool = False, canary: bool = False,
                      core_index: int | None = None) -> Member:
        if self._stopping:  # a tick that began before shutdown must not start what shutdown just stopped
            raise ActionError("the plane is shutting down", status=503, retryable=True)
        dep = rt.dep
        port = dep.backend.base_port + slot  # type: ignore[union-attr]
        # A canary exports no spans: its synthetic trial must not enter the deployment's request history.
        otlp = None if canary else self.otlp_endpoint
        if restart_of is not None:
            core_index = restart_of.core_index
        req = LaunchRequest(name, dep, config, slot, port, otlp, self.otlp_protocol, self.log_dir, core_index)
        now = self.clock()
        launching = asyncio.ensure_future(asyncio.to_thread(rt.backend.launch, req))
        try:
            handle = await asyncio.shield(launching)
        except asyncio.CancelledError:
            # Cancelled (a rolling change at shutdown) while the backend starts it: the process starts anyway, in
            # its own session, unrecorded. Stop it once it is up; shutdown waits for that.
            self._abandoned.add(stop := asyncio.ensure_future(self._stop_when_launched(rt, launching, name)))
            stop.add_done_callback(self._abandoned.discard)
            raise
        except Exception as exc:  # noqa: BLE001 - a launch failure is a crash of that replica
            log.exception("%s: launch failed", name)
            handle = None
            launch_error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            launch_error = None
        runtime = {**(handle.runtime if handle else {}), "slot": slot, "port": port,
                   **({"canary": True} if canary else {}), **({"core_index": core_index} if core_index is not None
                                                              else {})}
        if handle is not None:
            handle.runtime = runtime
        try:
            rid = await self._save(rt, name, handle.url if handle else None, STARTING, runtime, config)
        except Exception:
            # Not recorded, so not tracked: a process left running would be launched again next tick on top
            # of it (a port taken, a Ray actor's name, GPUs held). Stop it and try again after a back-off.
            if handle is not None:
                await asyncio.to_thread(rt.backend.stop, handle, 10.0)
            if restart_of is not None:
                restart_of.next_restart_at = now + _retry_launch_after_s(rt)
            raise
        if restart_of is not None:
            m = restart_of
            m.handle, m.state, m.since, m.restarts, m.fresh = handle, STARTING, now, m.restarts + 1, False
            m.next_restart_at, m.probe_failures, m.next_probe_at = None, 0, now
            await self._record(rid, "replica_restarted", ACTOR_SUPERVISOR, "crash",
                               message=f"restart {m.restarts} on port {port}", after=_cfg(config))
        else:
            m = Member(name, rid, slot, port, config, handle, STARTING, now, candidate=candidate or canary,
                       canary=canary, core_index=core_index, fresh=True)
            rt.members[name] = m
            why = "canary" if canary else "rollout" if candidate else "scale_up"
            await self._record(rid, "replica_started", ACTOR_SUPERVISOR, why,
                               message=f"{rt.backend.kind} replica on port {port}", after=_cfg(config),
                               attributes={"runtime": runtime})
        if launch_error is not None:
            await self._crashed(rt, m, now, f"could not launch: {launch_error}", "launch_failed", None)
        elif self._stopping and m.handle is not None and m.state != STOPPED:  # shutdown began meanwhile
            await asyncio.to_thread(rt.backend.stop, m.handle, 20.0)
            await self._set_state(rt, m, STOPPED, "shutdown", "the plane was stopped while it started")
            raise ActionError("the plane is shutting down", status=503, retryable=True)
        return m

    async def _stop_when_launched(self, rt: DeploymentRuntime, launching: asyncio.Future[Handle], name: str) -> None:
        try:
            handle = await launching
        except Exception:  # noqa: BLE001 - it did not start: nothing to stop
            return
        log.warning("%s: its launch was cancelled while it started; stopping it", name)
        await asyncio.to_thread(rt.backend.stop, handle, 10.0)

    async def _drain_and_stop(self, rt: DeploymentRuntime, m: Member, actor: str, reason: str) -> None:
        """No new requests, wait for the in-flight ones (router count and the engine's own gauges) up to
        the drain timeout, then stop."""
        t0 = self.clock()
        self.router.drain(m.name)  # first: whatever happens below, no new request goes to it
        await self._set_state(rt, m, DRAINING, reason, "draining: no new requests")
        timeout = rt.dep.lifecycle.drain_timeout_s
        left = self.router.outstanding(m.name)
        while self.clock() - t0 < timeout:
            left = self.router.outstanding(m.name)
            if left == 0 and await self._engine_idle(rt, m):
                break
            await asyncio.sleep(0.2)
        waited = self.clock() - t0
        self._withdraw(m)
        if m.handle is not None:
            await asyncio.to_thread(rt.backend.stop, m.handle, 30.0)
        await self._set_state(rt, m, STOPPED, reason,
                              f"drained in {waited:.1f} s" + (f"; {left} request(s) still in flight at the "
                                                               f"{timeout:.0f} s timeout" if left else ""),
                              actor=actor, attributes={"drain_s": waited, "in_flight_at_stop": left})

    async def _engine_idle(self, rt: DeploymentRuntime, m: Member) -> bool:
        """True when vLLM reports nothing running or waiting (requests that bypassed the router). An unreadable
        /metrics (or one without the two gauges) is unknown, not idle: the drain goes on waiting, up to its
        timeout, unless the process has ended (then nothing can be in flight)."""
        if m.handle is None:
            return True
        result = await scrape(self.client, m.handle.url + "/metrics", 3.0)
        reading = read_engine(result.samples) if result.ok else None
        if reading is None or reading.num_running is None or reading.num_waiting is None:
            return await asyncio.to_thread(rt.backend.exit_code, m.handle) is not None
        return reading.num_running + reading.num_waiting == 0

    async def _rollout(self, rt: DeploymentRuntime, actor: str, reason: str, before: EngineConfig | None) -> None:
        """`_roll`, and when it fails (e.g. a launch the store could not record), not again before 60 s: a
        converging change restarted every tick would load the model every tick."""
        try:
            await self._roll(rt, actor, reason, before)
        except Exception as exc:  # noqa: BLE001 - logged and recorded; the next converge waits
            rt.converge_after = self.clock() + 60.0
            log.exception("%s: rolling change failed", rt.dep.name)
            await self._record(None, "rollout_failed", actor, "error", after=_cfg(rt.dep.engine),
                               message=f"{rt.dep.name}: {type(exc).__name__}: {exc} (retried in 60 s)")

    async def _roll(self, rt: DeploymentRuntime, actor: str, reason: str, before: EngineConfig | None) -> None:
        """Replace every member whose config differs from the desired one, one at a time (surge 1)."""
        new = rt.dep.engine
        old_cfg = before
        await self._record(None, "rollout_started", actor, reason, before=_cfg(old_cfg) if old_cfg else None,
                           after=_cfg(new), message=f"{rt.dep.name}: rolling {len(rt.active)} replica(s)")
        while True:
            # Chosen one at a time from the members of the moment, under the launch lock: a scale-up launched
            # before the change (seconds on Ray) joins the members, on the old configuration, only when its
            # launch returns, and a list taken once at the start missed it (`rollout_finished` with it still
            # on the old one). A member stopped meanwhile (a scale-down) is not counted; a crash-looping one is.
            async with rt.launch_lock:
                old = next((m for m in rt.counted if m.config != new), None)
            if old is None:
                break
            cand = await self._launch_new(rt, new, candidate=True, replacing=old)
            waited_from = self.clock()
            limit = rt.dep.lifecycle.drain_timeout_s + 30.0  # a draining replica frees its slot within this
            while cand is None and self.clock() - waited_from < limit:
                await asyncio.sleep(0.5)
                cand = await self._launch_new(rt, new, candidate=True, replacing=old)
            if cand is None:
                left = [m.name for m in rt.counted if m.config != new]
                rt.converge_after = self.clock() + 60.0
                await self._record(None, "rollout_blocked", actor, "no_free_slot", after=_cfg(new),
                                   message=f"{rt.dep.name}: no free replica slot for {limit:.0f} s; still on the old "
                                           f"configuration: {', '.join(left)} (retried in 60 s)")
                return
            while cand.state == STARTING:
                await asyncio.sleep(0.25)
            if cand.state != READY:
                why = f"{cand.name} never became ready ({cand.state}, exit {cand.last_exit})"
                if cand.handle is not None:
                    await asyncio.to_thread(rt.backend.stop, cand.handle, 10.0)
                if cand.state != FAILED:
                    await self._set_state(rt, cand, FAILED, "rollout_failed", why)
                previous = old.config
                rt.dep = rt.dep.with_engine(previous)
                await self._persist(rt)
                # Replicas this change already replaced run the new configuration: the next converge rolls them
                # back to the previous one. Named, so the record says which replicas run what meanwhile.
                switched = sorted(m.name for m in rt.counted if m.config == new)
                await self._record(cand.replica_id, "rollout_rolled_back", actor, "new_replica_not_ready",
                                   message=why + f"; {old.name} keeps serving" + (
                                       f"; {', '.join(switched)} already on the new configuration, rolled back next"
                                       if switched else ""),
                                   before=_cfg(new), after=_cfg(previous), attributes={"switched": switched})
                return
            cand.candidate = False
            await self._drain_and_stop(rt, old, actor, "reconfigure")
        await self._record(None, "rollout_finished", actor, reason, after=_cfg(new),
                           message=f"{rt.dep.name}: every replica runs the new configuration")

    # --- actions (API / tuner) ------------------------------------------------------------------
    def _runtime(self, deployment: str) -> DeploymentRuntime:
        rt = self.runtimes.get(deployment)
        if rt is None:
            raise ActionError(f"unknown deployment {deployment!r}; known: {', '.join(self.runtimes) or 'none'}", 404)
        return rt

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        rt = self._runtime(deployment)
        if isinstance(rt.dep.backend, ExternalBackend):
            raise ActionError(f"{deployment} runs on the external backend; the plane cannot change its size", 409)
        if not rt.dep.min_replicas <= replicas <= rt.dep.max_replicas:
            raise ActionError(f"replicas must lie in [{rt.dep.min_replicas}, {rt.dep.max_replicas}] "
                              f"(spec.replicas min/max of {deployment}); got {replicas}", 422)
        if rt.rollout is not None and not rt.rollout.done():
            raise ActionError(f"{deployment}: a rolling change is in progress; retry when it ends", 409,
                              retryable=True)
        before = rt.desired
        rt.desired = replicas
        await self._persist(rt)
        await self._record(None, "scale", actor, reason, before={"replicas": before}, after={"replicas": replicas},
                           message=f"{deployment}: {before} -> {replicas} replica(s)")
        return {"deployment": deployment, "replicas_before": before, "replicas": replicas}

    def _changed_engine(self, deployment: str, changes: Mapping[str, Any],
                        what: str) -> tuple[DeploymentRuntime, EngineConfig]:
        """The runtime and its engine with `changes`, or the ActionError that says why `what` cannot start now:
        an external backend, a rolling change or a canary trial in progress, or a bad engine field."""
        rt = self._runtime(deployment)
        if isinstance(rt.dep.backend, ExternalBackend):
            raise ActionError(f"{deployment} runs on the external backend; the plane cannot {what}", 409)
        if rt.rollout is not None and not rt.rollout.done():
            raise ActionError(f"{deployment}: a rolling change is in progress; retry when it ends", 409,
                              retryable=True)
        if rt.canary is not None:
            raise ActionError(f"{deployment}: a canary trial is running ({rt.canary.name}); one at a time, "
                              "retry when it ends", 409, retryable=True)
        try:
            return rt, rt.dep.engine.with_changes(dict(changes))
        except SpecError as exc:
            raise ActionError(str(exc), 422) from None

    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]:
        rt, new = self._changed_engine(deployment, changes, "reconfigure it")
        before = rt.dep.engine
        if new == before:
            return {"deployment": deployment, "changed": False, "engine": _cfg(new)}
        rt.dep = rt.dep.with_engine(new)
        await self._persist(rt)
        rt.rollout = asyncio.create_task(self._rollout(rt, actor, reason, before))
        return {"deployment": deployment, "changed": True, "before": _cfg(before), "engine": _cfg(new)}

    async def start_canary(self, deployment: str, changes: Mapping[str, Any], *, actor: str, reason: str,
                           poll_s: float = 0.25) -> tuple[str, str | None]:
        """Start one replica of `deployment` with `changes` for a trial, outside the router and the count, and
        wait until it is ready or has failed. Returns (name, URL), URL None when it never became ready (it is
        then stopped and recorded as failed). One canary per deployment at a time."""
        rt, config = self._changed_engine(deployment, changes, "start a canary")
        async with rt.launch_lock:  # reserve the canary place before the launch (one at a time)
            if rt.canary is not None:
                raise ActionError(f"{deployment}: a canary trial is running ({rt.canary.name}); one at a time, "
                                  "retry when it ends", 409, retryable=True)
            slot = policy.free_slot(self._used_slots(rt), rt.dep.max_replicas + 1)
            if slot is None:
                raise ActionError(f"{deployment}: no free replica slot for a canary "
                                  f"({rt.dep.max_replicas} + 1 in use)", 409)
            name = policy.next_replica_name(rt.dep.name, await self._all_names(rt))
            rt.canary = m = await self._launch(rt, name, slot, config, canary=True, core_index=self._free_core_set(rt))
        try:
            await self._record(m.replica_id, "canary_started", actor, reason, after=_cfg(config),
                               message=f"{name}: trial of {dict(changes)}")
            while m.state == STARTING:
                await asyncio.sleep(poll_s)
        except asyncio.CancelledError:
            # The caller went away (a search cancelled, the plane stopping) before it got the canary to stop:
            # stopped here, or it would hold its slot (and every later trial's 409) until the plane restarts.
            # Only this one: another trial may have taken the place since.
            if rt.canary is m:
                await asyncio.shield(self.stop_canary(deployment, actor=actor, reason="canary_cancelled"))
            raise
        if m.state != READY:
            await self.stop_canary(deployment, actor=actor, reason="canary_not_ready")
            return name, None
        return name, m.handle.url if m.handle else None

    async def stop_canary(self, deployment: str, *, actor: str, reason: str) -> None:
        """Stop the deployment's canary (nothing to do when none runs)."""
        rt = self._runtime(deployment)
        m, rt.canary = rt.canary, None
        if m is None:
            return
        if m.handle is not None and m.state not in (STOPPED, FAILED):
            # Draining first: the health loop then reads its exit as the stop it is, not as a crash.
            await self._set_state(rt, m, DRAINING, reason, "canary trial over: stopping", actor=actor)
            await asyncio.to_thread(rt.backend.stop, m.handle, 10.0)
        if m.state != FAILED:
            await self._set_state(rt, m, STOPPED, reason, "canary trial over", actor=actor)
        await self._record(m.replica_id, "canary_stopped", actor, reason, message=f"{m.name}: {m.state}")

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for rt in self.runtimes.values():
            simulated = rt.dep.simulated is not None  # the simulated engine: every view labels it so
            out.append({
                "name": rt.dep.name, "backend": rt.backend.kind, "simulated": simulated,
                "desired_replicas": rt.desired,
                "min_replicas": rt.dep.min_replicas, "max_replicas": rt.dep.max_replicas,
                "engine": _cfg(rt.dep.engine), "rolling": rt.rollout is not None and not rt.rollout.done(),
                "price_per_replica_hour_usd": rt.dep.price_per_replica_hour_usd,
                "replicas": [{
                    "name": m.name, "simulated": simulated, "state": m.state,
                    "url": m.handle.url if m.handle else None, "slot": m.slot,
                    "restarts": m.restarts, "outstanding": self.router.outstanding(m.name), "canary": m.canary,
                    "config": _cfg(m.config), "since_unix_s": m.since,
                    "runtime": m.handle.runtime if m.handle else None,
                } for m in rt.members.values() if m.state not in (STOPPED, FAILED)],
            })
        return out

    async def wait_idle(self) -> None:
        """Wait for running drains and rollouts (tests and shutdown)."""
        for rt in self.runtimes.values():
            pending = list(rt.tasks) + ([rt.rollout] if rt.rollout else [])
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop every replica this plane runs (the plane is going away on purpose). No launch starts after
        this began, even from a tick already in flight."""
        self._stopping = True
        try:  # a round in flight may be launching: let it end (its launches see _stopping), then stop all
            await asyncio.wait_for(self._tick_lock.acquire(), timeout=30.0)
        except TimeoutError:
            log.warning("supervisor: a round still runs after 30 s; stopping the replicas anyway")
        else:
            self._tick_lock.release()
        for rt in list(self.runtimes.values()):
            tasks = [*rt.tasks, *([rt.rollout] if rt.rollout else [])]
            for task in tasks:
                task.cancel()
            if tasks:  # each ends at its next await
                await asyncio.wait(tasks, timeout=30.0)
            for m in list(rt.members.values()):
                if m.handle is None or m.state in (STOPPED, FAILED) or isinstance(rt.dep.backend, ExternalBackend):
                    continue
                self.router.remove(m.name)
                await asyncio.to_thread(rt.backend.stop, m.handle, 20.0)
                await self._set_state(rt, m, STOPPED, "shutdown", "the plane was stopped")
            if self._abandoned:
                await asyncio.wait(set(self._abandoned), timeout=120.0)
            rt.backend.close()

    # --- store helpers --------------------------------------------------------------------------
    async def _save(self, rt: DeploymentRuntime, name: str, url: str | None, state: str,
                    runtime: dict[str, Any], config: EngineConfig) -> int:
        return await asyncio.to_thread(
            self.store.save_replica, name, deployment_id=rt.deployment_id, url=url, backend=rt.backend.kind,
            state=state, runtime=runtime, config=_cfg(config))

    async def _persist(self, rt: DeploymentRuntime) -> None:
        await asyncio.to_thread(self.store.save_deployment, rt.dep.name, model=rt.dep.served_name,
                                spec=rt.dep.spec, desired_replicas=rt.desired, engine_config=_cfg(rt.dep.engine))

    async def _set_state(self, rt: DeploymentRuntime, m: Member, state: str, reason: str, message: str, *,
                         actor: str = ACTOR_SUPERVISOR, attributes: Mapping[str, Any] | None = None) -> None:
        before = m.state
        m.state = state
        if state != before:
            m.since = self.clock() if state in (READY, DRAINING, STOPPED) else m.since
        m.unsaved_state = True
        await self._save_state(m)
        log.info("%s: %s -> %s (%s) %s", m.name, before, state, reason, message)
        await self._record(m.replica_id, f"replica_{state}", actor, reason, message=message,
                           attributes={"from": before, **(attributes or {})})

    async def _save_state(self, m: Member) -> None:
        """Write the member's state to the store. A failed write is logged and retried each tick: what the
        supervisor does next (route, drain, stop, restart) must not hang on the store being reachable."""
        state = m.state
        try:
            await asyncio.to_thread(self.store.set_replica_state, m.replica_id, state)
        except Exception:  # noqa: BLE001 - logged; tick() writes it again
            log.exception("%s: could not store its state %s; trying again", m.name, state)
        else:
            m.unsaved_state = m.state != state  # changed meanwhile: that write may have come first

    async def _record(self, replica_id: int | None, kind: str, actor: str, reason: str, *,
                      message: str | None = None, before: Mapping[str, Any] | None = None,
                      after: Mapping[str, Any] | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        try:
            await asyncio.to_thread(self.store.record_action, replica_id, kind, actor=actor, reason=reason,
                                    message=message, before=before, after=after, attributes=attributes,
                                    ts_unix_s=self.clock())
        except Exception:  # noqa: BLE001 - losing an audit row must not stop supervision; it is logged
            log.exception("could not store action %s (%s)", kind, reason)


def _retry_launch_after_s(rt: DeploymentRuntime) -> float:
    """How long a launch that could not be recorded waits before it is tried again."""
    return max(rt.dep.lifecycle.restart_backoff_initial_s, 5.0)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task's exception would otherwise vanish with the task (a drain that failed silently)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("supervisor task failed", exc_info=task.exception())


class SupervisorMetrics(Collector):
    """Replica state for Prometheus, read at scrape time (no stale series for removed replicas)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(names.PLANE_REPLICA_UP, "1 when the replica is ready to serve",
                               labels=["deployment", "replica"])
        loop = GaugeMetricFamily(names.PLANE_REPLICA_CRASHLOOP, "1 when the supervisor gave up restarting",
                                 labels=["deployment", "replica"])
        starting = GaugeMetricFamily(names.PLANE_REPLICA_STARTING,
                                     "1 while a new replica loads its model (not a restart after a crash)",
                                     labels=["deployment", "replica"])
        restarts = CounterMetricFamily(names.PLANE_REPLICA_RESTARTS, "restarts after a crash or failed probes",
                                       labels=["deployment", "replica"])
        desired = GaugeMetricFamily(names.PLANE_DESIRED_REPLICAS, "replicas the supervisor converges to",
                                    labels=["deployment"])
        # The router's own count, not the engine's: a hung engine stops updating its gauges (before the first
        # step of a batch they read 0), while requests the router sent it stay in flight.
        in_flight = GaugeMetricFamily(names.PLANE_ROUTER_IN_FLIGHT,
                                      "requests the router sent to the replica that have not finished",
                                      labels=["deployment", "replica"])
        for rt in list(self.supervisor.runtimes.values()):
            desired.add_metric([rt.dep.name], rt.desired)
            for m in list(rt.members.values()):
                if m.state in (STOPPED, FAILED) or m.canary:  # a canary serves a trial, never users
                    continue
                labels = [rt.dep.name, m.name]
                up.add_metric(labels, 1.0 if m.state == READY else 0.0)
                loop.add_metric(labels, 1.0 if m.state == CRASHLOOP else 0.0)
                # Bounded by the ready timeout, after which a replica still starting is taken for crashed. Not a
                # restart after a crash, nor a replica adopted after a plane restart (it may be hung).
                starting.add_metric(labels, 1.0 if m.state == STARTING and m.fresh else 0.0)
                restarts.add_metric(labels, m.restarts)
                in_flight.add_metric(labels, self.supervisor.router.outstanding(m.name))
        yield from (up, loop, starting, restarts, desired, in_flight)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def default_backends(deployments: list[Deployment]) -> dict[str, Backend]:
    """One backend object per kind the deployments use (Ray is imported only when used)."""
    from controlplane.supervisor.backends import ExternalBackend as External
    from controlplane.supervisor.spec import LocalBackend as LocalSpec
    from controlplane.supervisor.spec import RayBackend as RaySpec

    out: dict[str, Backend] = {}
    for d in deployments:
        b = d.backend
        if isinstance(b, LocalSpec) and "local" not in out:
            out["local"] = LocalBackend(b.host, b.cpu_cores)
        elif isinstance(b, RaySpec) and "ray" not in out:
            from controlplane.supervisor.ray_backend import RayActorBackend

            out["ray"] = RayActorBackend(b)
        elif isinstance(b, ExternalBackend) and "external" not in out:
            out["external"] = External()
    return out


__all__ = ["ActionError", "Supervisor", "SupervisorMetrics", "default_backends", "CRASHED", "UNREADY"]
