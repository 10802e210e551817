"""CPU use on the core a benchmarked server is pinned to: its own share, and what other processes took (the noise
of a shared host), from psutil's per-core and per-process times between `start()` and `shares()`."""

from __future__ import annotations

import os
import time

import psutil


def core_busy_s(core: int) -> float:
    """CPU seconds the core has been busy since boot, every process together."""
    t = psutil.cpu_times(percpu=True)[core]
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


class CoreWatch:
    """How busy the server's core was and how much of it others took; unknown (None) without a core or a pid."""

    def __init__(self, core: int | None, pid: int | None, children_only: bool = False) -> None:
        # children_only: count the server's child processes only (vLLM's engine core, when its API server was
        # moved to another core by `move_api_server`).
        self.core, self.pid, self.children_only = core, pid, children_only
        self.t0: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _read(self) -> tuple[float, float, float]:
        assert self.core is not None and self.pid is not None
        busy = core_busy_s(self.core)
        own = 0.0
        root = psutil.Process(self.pid)
        for p in [*([] if self.children_only else [root]), *root.children(recursive=True)]:
            try:
                c = p.cpu_times()
                own += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        return time.monotonic(), busy, own

    def start(self) -> None:
        if self.core is not None and self.pid is not None:
            self.t0 = self._read()

    def seconds(self) -> tuple[float, float, float] | None:
        """(the server's CPU seconds, everything else's on its core, wall seconds) since start()."""
        if self.core is None or self.pid is None:
            return None
        (w0, b0, o0), (w1, b1, o1) = self.t0, self._read()
        return o1 - o0, max(0.0, (b1 - b0) - (o1 - o0)), w1 - w0

    def shares(self) -> tuple[float | None, float | None]:
        """(the server's CPU seconds, everything else's on its core) per wall second since start()."""
        got = self.seconds()
        if got is None:
            return None, None
        own, others, wall = got
        return own / wall, others / wall


class CoreBusy:
    """How busy one core was, all processes together, per wall second between start() and share(): e.g. the core
    vLLM's API server was moved to, which it shares with the load generator. None without a core."""

    def __init__(self, core: int | None) -> None:
        self.core = core
        self.t0 = (0.0, 0.0)

    def _read(self) -> tuple[float, float]:
        assert self.core is not None
        return time.monotonic(), core_busy_s(self.core)

    def start(self) -> None:
        if self.core is not None:
            self.t0 = self._read()

    def share(self) -> float | None:
        if self.core is None:
            return None
        (w0, b0), (w1, b1) = self.t0, self._read()
        return (b1 - b0) / (w1 - w0) if w1 > w0 else None


def move_api_server(pid: int, cores: set[int], passes: int = 5) -> int:
    """Pin every thread of a vLLM API server process (not its engine-core children) to `cores`, so that the
    engine core has its own core, as on a GPU host where the API server never shares the engine's compute. Threads
    it starts later inherit the affinity of the thread that starts them; one started while this runs, by a thread
    not yet moved, is caught by another pass. Returns how many threads are pinned."""
    for _ in range(passes):
        moved = 0
        for t in psutil.Process(pid).threads():
            try:
                if os.sched_getaffinity(t.id) != cores:
                    os.sched_setaffinity(t.id, cores)
                    moved += 1
            except ProcessLookupError:  # the thread ended meanwhile
                continue
        if moved == 0:
            return len(psutil.Process(pid).threads())
    raise RuntimeError(f"process {pid} kept starting threads outside cores {sorted(cores)}")
