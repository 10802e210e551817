"""bench/cpu.py against real processes: moving an API server's threads leaves its children where they were."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from bench.cpu import CoreBusy, move_api_server

CORES = sorted(os.sched_getaffinity(0))

# A parent with a second thread and a child process, like vLLM's API server and its engine core.
PARENT = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to move a process between")
def test_the_api_server_moves_with_every_thread_and_its_children_stay() -> None:
    api_core, engine_core = CORES[0], CORES[-1]
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {engine_core}))  # noqa: PLW1509
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        moved = move_api_server(proc.pid, {api_core})
        assert moved >= 2  # the main thread and the sleeper
        assert {frozenset(os.sched_getaffinity(t.id)) for t in psutil.Process(proc.pid).threads()} == {
            frozenset({api_core})}
        assert os.sched_getaffinity(child) == {engine_core}
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()


def test_core_busy_reads_a_pinned_busy_loop_and_is_unknown_without_a_core() -> None:
    core = CORES[-1]
    busy = CoreBusy(core)
    loop = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.6: pass"
    spin = subprocess.Popen([sys.executable, "-c", loop],
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))  # noqa: PLW1509
    busy.start()
    spin.wait()
    share = busy.share()
    assert share is not None and 0.5 < share <= 1.05  # the loop alone fills most of the core
    assert CoreBusy(None).share() is None
