"""Re-adoption and stopping of local replica processes (a sleeping Python stands in for vLLM)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from controlplane.supervisor.backends import LOST, LocalBackend

CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); " \
        "time.sleep(120)"


@pytest.fixture
def replica() -> Iterator[subprocess.Popen[bytes]]:
    # Like vLLM: a server process in its own session with a child (the engine core) in its group.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "--port", "8123"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield proc
    with contextlib.suppress(ProcessLookupError):  # the whole group: its child too, not left to sleep on
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def runtime_of(proc: subprocess.Popen[bytes], **over: object) -> dict[str, object]:
    return {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
            "port": 8123, **over}


def test_a_running_replica_is_adopted_and_its_whole_group_stopped(replica: subprocess.Popen[bytes]) -> None:
    backend = LocalBackend()
    child = psutil.Process(replica.pid).children()[0]
    handle = backend.adopt("r-0", "http://127.0.0.1:8123", runtime_of(replica))
    assert handle is not None and backend.exit_code(handle) is None
    backend.stop(handle, timeout_s=5)
    replica.wait(timeout=5)
    assert backend.exit_code(handle) == LOST
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("override", [
    {"create_time": 1.0},  # the pid was reused by another process
    {"port": 9999},  # not the server on the recorded port
    {"pid": 2**22 + 12345, "pgid": 2**22 + 12345},  # gone, and its group with it
    {"pid": "not-a-pid"},
])
def test_a_process_that_is_not_the_recorded_replica_is_not_adopted(replica: subprocess.Popen[bytes],
                                                                   override: dict[str, object]) -> None:
    assert LocalBackend().adopt("r-0", "http://127.0.0.1:8123", runtime_of(replica, **override)) is None


def test_a_replica_whose_server_died_but_whose_engine_lives_on_is_not_adopted_and_its_group_is_stopped(
        replica: subprocess.Popen[bytes]) -> None:
    # The API server OOM-killed, its engine core (the child) still in the group, holding the port and memory
    # the replacement needs.
    child = psutil.Process(replica.pid).children()[0]
    runtime = runtime_of(replica)
    replica.kill()
    replica.wait()
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    assert LocalBackend().adopt("r-0", "http://127.0.0.1:8123", runtime) is None
    child.wait(timeout=10)  # stopped by adopt, not left running unsupervised
    assert not child.is_running()


def test_a_replica_is_recognised_by_its_start_in_ticks_since_boot_whatever_the_wall_clock_did(
        replica: subprocess.Popen[bytes]) -> None:
    from controlplane.supervisor.backends import _start_ticks

    ticks = _start_ticks(replica.pid)
    assert isinstance(ticks, int) and ticks > 0
    backend = LocalBackend()
    # The clock stepped 5 minutes since the launch: psutil's create_time moved with it, the ticks did not.
    stepped = runtime_of(replica, start_ticks=ticks, create_time=psutil.Process(replica.pid).create_time() - 300)
    assert backend.adopt("r-0", "http://127.0.0.1:8123", stepped) is not None
    # Another process that got the pid: another start, whatever the wall-clock times say.
    assert backend.adopt("r-0", "http://127.0.0.1:8123", runtime_of(replica, start_ticks=ticks + 1)) is None
    # A row from before the ticks were recorded: the wall-clock times, with a little slack for a clock slew.
    slewed = runtime_of(replica, create_time=psutil.Process(replica.pid).create_time() - 1.5)
    assert backend.adopt("r-0", "http://127.0.0.1:8123", slewed) is not None
