"""Where replicas run: one small interface, three backends (local processes, Ray actors, external).

A backend only launches, polls, stops and re-finds processes; every decision (when to restart, what
to drain) is the supervisor's. Each handle carries a JSON-safe `runtime` dict that the supervisor
stores, so a restarted plane can find the same replica again (`adopt`) instead of leaking it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from controlplane.engines.vllm_server import VllmServer, VllmServerSpec
from controlplane.supervisor.spec import Deployment, EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchRequest:
    replica: str
    deployment: Deployment
    engine: EngineConfig
    slot: int
    port: int
    otlp_endpoint: str | None
    otlp_protocol: str
    log_dir: Path
    core_index: int | None = None  # which of the backend's cpu_cores sets (None: the slot's)

    def cores(self, cpu_cores: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        """The core set this replica is pinned to; () when the backend pins nothing."""
        if not cpu_cores:
            return ()
        return cpu_cores[(self.slot if self.core_index is None else self.core_index) % len(cpu_cores)]

    def server_spec(self, host: str, cpu_cores: tuple[int, ...] = ()) -> VllmServerSpec:
        """How to start this replica: vLLM, or the simulated engine with the same flags (both backends use it)."""
        return VllmServerSpec(
            model_dir=Path(self.deployment.model_path), served_name=self.deployment.served_name,
            host=host, port=self.port, replica_name=self.replica, otlp_endpoint=self.otlp_endpoint,
            otlp_protocol=self.otlp_protocol, max_model_len=None,
            kv_cache_space_gib=self.engine.kv_cache_space_gib or 1, extra_args=tuple(self.engine.vllm_args()),
            cpu_cores=cpu_cores, simulated=self.deployment.simulated,
        )


@dataclass
class Handle:
    replica: str
    url: str
    runtime: dict[str, Any]
    # Backend-private objects (a Popen, an actor handle); not stored.
    private: Any = field(default=None, repr=False, compare=False)


class AdoptUnknown(RuntimeError):
    """The backend cannot tell whether a recorded replica still runs: taken for gone, it would keep its GPUs and
    port unsupervised while a replacement starts."""


class Backend(Protocol):
    kind: str

    def launch(self, req: LaunchRequest) -> Handle: ...

    def exit_code(self, handle: Handle) -> int | None:
        """None while the replica's process runs; its exit code (negative: signal) once it ended."""
        ...

    def stop(self, handle: Handle, timeout_s: float) -> None: ...

    def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
        """The handle of a replica a previous plane started, if it still runs as recorded; None when it is gone.
        AdoptUnknown when the backend cannot tell (a cluster not answering)."""
        ...

    def close(self) -> None: ...


# --- local processes ----------------------------------------------------------------------------

LOST = -1000  # exit code for "the process is gone and we could not read its status"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# psutil's create_time is boot time + start ticks, and Linux derives boot time from the wall clock at each read:
# an NTP step or slew since the launch moves it, and a live replica compared to 0.01 s was taken for gone (left
# running unsupervised, its port taken by the replacement). Without the ticks (rows from before they were recorded)
# the wall-clock times are compared with this much slack; the port in the command line is checked as well.
CREATE_TIME_SLACK_S = 2.0


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): unlike a wall-clock start
    time it never moves. None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)": state is field 3
    except (OSError, ValueError, IndexError):
        return None


def _same_start(proc: psutil.Process, created: float, ticks: Any) -> bool:
    """Whether `proc` is the process recorded as started at `created` (wall clock) / `ticks` (since boot)."""
    now_ticks = _start_ticks(proc.pid) if isinstance(ticks, int) else None
    if now_ticks is not None:
        return bool(now_ticks == ticks)
    return bool(abs(proc.create_time() - created) <= CREATE_TIME_SLACK_S)


def _stop_orphans(replica: str, runtime: dict[str, Any], timeout_s: float = 10.0) -> None:
    """The recorded server process is gone, but its process group may live on: vLLM's engine core (or a
    worker) outlives an API server that was killed (the OOM killer), holding the replica's port and GPU memory,
    which its replacement then cannot get. Such a group is ours: Linux gives no new process the group's id while
    the group has members, so it cannot be another program's. It is stopped (TERM, then KILL)."""
    try:
        pgid = int(runtime["pgid"])
    except (KeyError, ValueError, TypeError):
        return
    if pgid <= 1 or not _group_alive(pgid):
        return
    log.warning("%s: its server process is gone but its process group %d lives on (an engine core or worker "
                "holding its port and memory); stopping it", replica, pgid)
    _stop_group(pgid, timeout_s, lambda: _group_alive(pgid))


def _stop_group(pgid: int, timeout_s: float, running: Callable[[], bool]) -> None:
    """SIGTERM the process group, poll `running` until it says False or timeout_s passes, then SIGKILL whatever
    is left in the group (for processes that are not our children: no wait status to wait on)."""
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        time.sleep(0.1)
    _killpg(pgid, signal.SIGKILL)


def stop_recorded_groups(engine: Any) -> list[str]:
    """Stop the process groups of the local replicas a store records as not stopped: for a plane that was killed
    (SIGKILL) before it could stop its replicas, which run in their own sessions and would run on. Returns the
    replicas whose groups were found alive. Only for right after that plane died (a group id is only known to be
    ours while the group lives)."""
    from sqlalchemy import select

    from controlplane.store.models import Replica

    with engine.connect() as conn:
        rows = conn.execute(select(Replica.name, Replica.runtime).where(
            Replica.backend == "local", Replica.state.not_in(("stopped", "failed")))).all()
    alive = []
    for name, runtime in rows:
        if isinstance(runtime, dict) and isinstance(runtime.get("pgid"), int) and _group_alive(runtime["pgid"]):
            alive.append(name)
            _stop_orphans(name, runtime)
    return alive


class LocalBackend:
    """vLLM (or simulated-engine) servers as processes on this host, each in its own session (process group)."""

    kind = "local"

    def __init__(self, host: str = "127.0.0.1", cpu_cores: tuple[tuple[int, ...], ...] = ()) -> None:
        self.host = host
        self.cpu_cores = cpu_cores

    def launch(self, req: LaunchRequest) -> Handle:
        cores = req.cores(self.cpu_cores)
        spec = req.server_spec(self.host, cores)
        server = VllmServer(spec, req.log_dir / f"{req.replica}.log")
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        runtime = {"pid": pid, "pgid": pid, "create_time": psutil.Process(pid).create_time(),
                   "start_ticks": _start_ticks(pid), "port": req.port, "host": self.host,
                   "log": str(server.log_path), "cpu_cores": list(cores)}
        return Handle(req.replica, spec.base_url, runtime, private=server)

    def exit_code(self, handle: Handle) -> int | None:
        server = handle.private
        if isinstance(server, VllmServer) and server.proc is not None:
            return server.proc.poll()
        # Adopted: not our child, so no wait status; psutil tells whether the same process runs.
        proc = handle.private if isinstance(handle.private, psutil.Process) else None
        if proc is None:
            return LOST
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return LOST

    def stop(self, handle: Handle, timeout_s: float) -> None:
        """SIGTERM the replica's process group, wait, then SIGKILL whatever is left in it."""
        server = handle.private
        if isinstance(server, VllmServer):
            server.stop(timeout_s)
            return
        # Adopted (not our child): no wait status, so poll the group until it is gone.
        pgid = int(handle.runtime["pgid"])
        _stop_group(pgid, timeout_s, lambda: self.exit_code(handle) is None or _group_alive(pgid))

    def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
        try:
            pid, created = int(runtime["pid"]), float(runtime["create_time"])
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                _stop_orphans(replica, runtime)
                raise
            # The pid must still be the process we started (pids are reused) and still a vLLM server
            # on the recorded port.
            if not _same_start(proc, created, runtime.get("start_ticks")) or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmd = proc.cmdline()
            if "--port" not in cmd or cmd[cmd.index("--port") + 1] != str(runtime["port"]):
                return None
        except (KeyError, ValueError, TypeError, IndexError, psutil.Error):
            return None
        return Handle(replica, url, dict(runtime), private=proc)

    def close(self) -> None:
        pass


# --- external replicas ----------------------------------------------------------------------------


class ExternalBackend:
    """Replicas the plane did not start: it probes and routes to them, never starts or stops them."""

    kind = "external"

    def launch(self, req: LaunchRequest) -> Handle:
        raise RuntimeError("the external backend cannot start replicas; add their URLs to spec.backend.urls")

    def exit_code(self, handle: Handle) -> int | None:
        return None  # only probes can tell

    def stop(self, handle: Handle, timeout_s: float) -> None:
        pass

    def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
        return Handle(replica, url, dict(runtime))

    def close(self) -> None:
        pass
