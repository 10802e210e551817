"""The demo's own edges, without a plane: ports, progress without a terminal, stopping, an exited plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from controlplane import demo
from controlplane.demo_loop import LoopConfig, LoopResult, PlaneProcess, run_closed_loop
from controlplane.settings import Settings
from tests.conftest import free_port


def test_replica_ports_skip_the_planes_own_which_are_free_until_it_binds_them() -> None:
    base = demo._free_port_run(2)
    assert demo._free_port_run(2, reserved=(base, base + 1)) not in (base - 1, base)


def test_without_a_terminal_long_steps_and_changes_of_state_still_print() -> None:
    out = StringIO()
    console = Console(file=out, width=200)  # not a terminal: a spinner prints nothing
    with demo._step(console, "starting the plane"):
        pass
    with demo._step(console, "load") as st:
        tick = demo._Ticker(console, st)
        tick("burst: 9 req/s, 3 in flight")
        tick("burst: 9 req/s, 4 in flight")  # the same kind within 15 s: not printed
        tick("one replica carried 9 req/s within the SLO for 20 s: raising the burst to 9.45 req/s")
    lines = out.getvalue().splitlines()
    assert any(ln.endswith("starting the plane ...") for ln in lines)
    assert any("starting the plane: done in 0 s" in ln for ln in lines)
    assert sum("in flight" in ln for ln in lines) == 1 and any("raising the burst" in ln for ln in lines)


def test_the_load_ends_as_soon_as_the_plane_has_exited() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = LoopConfig(probe_s=0, steady_s=0.1, max_s=600.0)
    asked: list[int] = []

    def gone() -> str:
        asked.append(1)
        return "the plane exited with code 1"

    r = run_closed_loop(cfg, router_url=dead, api_url=dead, token="t", gone=gone)
    # Asked once, at the first round: not waited out to max_s (which notes "did not complete within 600 s").
    assert asked == [1] and r.notes == ["the story stopped: the plane exited with code 1"]


def test_an_interrupted_load_does_not_wait_for_its_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane import demo_loop

    waits: list[float] = []
    stop = demo_loop.OpenLoopLoad.stop

    def recorded(self: Any, timeout_s: float = 120.0) -> None:
        waits.append(timeout_s)
        stop(self, timeout_s)

    def interrupt() -> None:
        raise KeyboardInterrupt  # Ctrl-C during the load

    monkeypatch.setattr(demo_loop.OpenLoopLoad, "stop", recorded)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = LoopConfig(probe_s=0, steady_s=0.1, max_s=600.0)
    with pytest.raises(KeyboardInterrupt):
        run_closed_loop(cfg, router_url=dead, api_url=dead, token="t", gone=interrupt)  # type: ignore[arg-type]
    assert waits == [5.0]  # not the 120 s a finished run gives its requests in flight
    run_closed_loop(cfg, router_url=dead, api_url=dead, token="t", gone=lambda: "gone")
    assert waits == [5.0, 120.0]


def _fake_plane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, calls: list[str],
                on_stop: Callable[[], None] = lambda: None) -> None:
    """The demo around a fake plane that records its start and stop, its first replica ready at once."""

    class Plane:
        proc = None
        log_path = tmp_path / "plane.log"

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def start(self) -> None:
            calls.append("plane.start")

        def stop(self) -> None:
            on_stop()
            calls.append("plane.stop")

    monkeypatch.setattr(demo, "PlaneProcess", Plane)
    monkeypatch.setattr(demo, "wait_ready", lambda *a, **k: 1.0)


def _story_without_app(monkeypatch: pytest.MonkeyPatch, report: Callable[..., Path]) -> None:
    """A load that ends at once, the app's port taken (no app), and `report` writing the report."""
    result = LoopResult(0.0, 1.0, {}, [], None, None, None, None, [])
    monkeypatch.setattr(demo, "_free_port_run", lambda *a, **k: 8100)
    monkeypatch.setattr(demo, "ports_free", lambda *a, **k: False)
    monkeypatch.setattr(demo, "run_closed_loop", lambda *a, **k: result)
    monkeypatch.setattr(demo, "_report", report)


def test_the_plane_is_stopped_before_the_app_and_a_second_interrupt_cannot_skip_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake_plane(monkeypatch, tmp_path, calls)

    class Proc:
        pid = 1

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the load

    def terminate(proc: Any, timeout_s: float) -> None:
        calls.append("terminate(ui)")
        raise KeyboardInterrupt  # and again while the app is stopped

    monkeypatch.setattr(demo, "_start_ui", lambda *a, **k: Proc())
    monkeypatch.setattr(demo, "_wait_ui", lambda *a, **k: True)
    monkeypatch.setattr(demo, "ports_free", lambda *a, **k: True)
    monkeypatch.setattr(demo, "run_closed_loop", interrupted)
    monkeypatch.setattr(demo, "terminate", terminate)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(Settings(data_dir=tmp_path), Console(file=StringIO()), engine="sim")
    assert calls == ["plane.start", "plane.stop", "terminate(ui)"]


def test_a_report_that_cannot_be_written_fails_the_run_without_a_traceback_and_still_stops_the_plane(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake_plane(monkeypatch, tmp_path, calls)

    def full_disk(*a: Any, **k: Any) -> Path:
        raise OSError(28, "No space left on device")

    _story_without_app(monkeypatch, full_disk)
    out = StringIO()
    assert demo.run_demo(Settings(data_dir=tmp_path), Console(file=out, width=300), engine="sim") == 1
    assert "the report could not be written: OSError" in out.getvalue() and "No space left" in out.getvalue()
    assert calls == ["plane.start", "plane.stop"]


def test_a_signal_during_the_cleanup_is_held_until_the_plane_is_stopped_then_acted_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    # a second SIGTERM (a CI cancel) while the plane stops
    _fake_plane(monkeypatch, tmp_path, calls, on_stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    _story_without_app(monkeypatch, lambda *a, **k: tmp_path / "report.md")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        demo.run_demo(Settings(data_dir=tmp_path), Console(file=StringIO(), width=300), engine="sim")
    assert ended.value.code == 128 + signal.SIGTERM  # not dropped: the demo ends as terminated
    assert calls == ["plane.start", "plane.stop"] and signal.getsignal(signal.SIGTERM) == before


def _recorded_replica(store: Any) -> psutil.Process:
    """A replica in its own session, as the plane starts them, recorded in the run's store; not this test's child
    (the plane's), so that once stopped it is reaped by init, not left a zombie here. Returns its process."""
    launcher = subprocess.Popen(["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & echo $!"],
                                stdout=subprocess.PIPE, start_new_session=True)
    assert launcher.stdout is not None
    sleeper = psutil.Process(int(launcher.stdout.readline()))
    launcher.wait()
    store.save_replica("tiny-0", deployment_id=None, url="http://127.0.0.1:8100", backend="local",
                       state="ready", runtime={"pid": launcher.pid, "pgid": launcher.pid}, config={})
    return sleeper


def _stop_and_expect_replica_gone(tmp_path: Path, plane: subprocess.Popen[bytes], sleeper: psutil.Process,
                                  expect_code: int | None = None) -> None:
    p = PlaneProcess([], {"CONTROLPLANE_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"},
                     tmp_path / "plane.log", "", "", proc=plane)
    try:
        p.stop(timeout_s=0.5)
        if expect_code is not None:
            assert plane.returncode == expect_code
        sleeper.wait(timeout=15)  # stopped by the demo, not left to run on
    finally:
        if plane.poll() is None:
            plane.kill()
            plane.wait()
        if sleeper.is_running():
            sleeper.kill()
    assert not sleeper.is_running()


def test_a_plane_killed_before_it_stopped_its_replicas_does_not_leave_them_running(
        tmp_path: Path, sqlite_store: Any) -> None:
    sleeper = _recorded_replica(sqlite_store)
    # A plane that ignores SIGTERM (stuck): it is killed after the timeout, its replicas still running.
    plane = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, start_new_session=True)
    assert plane.stdout is not None and plane.stdout.readline() == b"up\n"
    _stop_and_expect_replica_gone(tmp_path, plane, sleeper, expect_code=-9)


def test_the_replicas_of_a_plane_that_died_during_the_run_are_stopped(tmp_path: Path, sqlite_store: Any) -> None:
    sleeper = _recorded_replica(sqlite_store)
    plane = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # it died on its own (OOM, a bug)
    plane.wait()
    _stop_and_expect_replica_gone(tmp_path, plane, sleeper)
