"""`controlplane demo`: the closed loop on real vLLM (CPU, tiny model), shown end to end.

Steps: build or reuse the tiny model; write a Deployment and an SLO spec; start `controlplane up` (SQLite store,
one supervised vLLM replica with tracing, the router, the API, the tuner in auto mode) and the Streamlit app; drive
a steady load, then a burst that breaks the TTFT SLO; the plane pages, the tuner adds a replica, attainment
recovers; then write a Markdown report with plots, read back from the plane, and print where it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from controlplane.demo_loop import (
    LoopConfig,
    LoopResult,
    PlaneProcess,
    ports_free,
    run_closed_loop,
    slo_doc,
    terminate,
    wait_ready,
    write_specs,
)
from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model
from controlplane.report import STORY_TOLD, ReportInput, fetch, render
from controlplane.settings import Settings, is_loopback_host

UI_READY_TIMEOUT_S = 30.0


class _Ticker:
    """A status line on a terminal; without one (CI, a log file), a plain line every `every_s` seconds, and at
    once for a message of another kind (a burst raised, the load ending: not only the next figures)."""

    def __init__(self, console: Console, st: Any, every_s: float = 15.0) -> None:
        self.console, self.st, self.every_s, self.last, self.kind = console, st, every_s, 0.0, ""

    def __call__(self, message: str) -> None:
        self.st.update(message)
        kind = re.sub(r"[-+]?\d[\d.,:%]*", "#", message)  # the message less its figures
        if not self.console.is_terminal and (kind != self.kind or time.monotonic() - self.last >= self.every_s):
            self.last, self.kind = time.monotonic(), kind
            self.console.print(f"  {time.strftime('%H:%M:%S')} {message}", soft_wrap=True)


@contextlib.contextmanager
def _step(console: Console, message: str) -> Iterator[Any]:
    """A spinner on a terminal; without one (CI, a log file), where a spinner prints nothing, a line when the
    step starts and one when it ends, so a long step is not silent."""
    t0 = time.monotonic()
    with console.status(message) as st:
        if not console.is_terminal:
            console.print(f"  {time.strftime('%H:%M:%S')} {message} ...", soft_wrap=True)
        yield st
    if not console.is_terminal:
        console.print(f"  {time.strftime('%H:%M:%S')} {message}: done in {time.monotonic() - t0:.0f} s",
                      soft_wrap=True)


def _pct(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.1%}"


def _free_port_run(n: int, reserved: Iterable[int] = ()) -> int:
    """A base port with n free ports after it, in 8100-9000 (below the kernel's ephemeral range), none of them
    `reserved` (the plane's and the app's own ports, which are free until the plane binds them)."""
    taken = set(reserved)
    for base in range(8100, 9000, 10):
        if not taken & set(range(base, base + n)) and ports_free(base, n):
            return base
    raise RuntimeError("no free run of ports in 8100-9000 for the replicas")


def run_demo(settings: Settings, console: Console, *, engine: str = "vllm", keep_running: bool = False,
             cfg: LoopConfig | None = None) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = (settings.data_dir / "demo" / stamp).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        console.print(f"[red]error:[/] CONTROLPLANE_DATA_DIR {settings.data_dir}: cannot make {run_dir}: "
                      f"{exc.strerror or exc}", soft_wrap=True)
        return 2
    token = settings.api_token or secrets.token_urlsafe(16)
    own_ports = (settings.api_port, settings.router_port, settings.otlp_http_port, settings.otlp_grpc_port,
                 settings.ui_port)
    if not is_loopback_host(settings.bind_host, wildcard=False):
        console.print(f"[yellow]the demo listens on {settings.bind_host}, not loopback only[/] "
                      "(CONTROLPLANE_BIND_HOST): anyone who reaches it reads the plane, and its Streamlit app holds "
                      "the API token (it can apply and dismiss recommendations)", soft_wrap=True)

    if engine == "sim":
        from controlplane.demo_sim import sim_deployment_doc, sim_loop_config

        cfg = cfg or sim_loop_config()
        import yaml

        dep_path, slo_path = run_dir / "deployment.yaml", run_dir / "slos.yaml"
        dep_path.write_text(yaml.safe_dump(sim_deployment_doc(cfg, _free_port_run(4, own_ports)), sort_keys=False))
        slo_path.write_text(yaml.safe_dump(slo_doc(cfg), sort_keys=False))
        engine_label = "a simulated Llama-3.1-8B on H100-80GB fleet (the simulated engine: timing from the " \
                       "performance model, labelled simulated)"
        startup_s, ready_timeout = "10", 60.0
    else:
        cfg = cfg or LoopConfig()
        where = settings.data_dir / "models" / "tiny"
        try:
            with _step(console, "building or reusing the tiny model") as status:
                model_dir, built = make_tiny_model(where, TinyModelSpec(), progress=lambda m: status.update(m))
        except OSError as exc:  # e.g. a file where the model's directory belongs
            console.print(f"[red]error:[/] the tiny model at {where} (CONTROLPLANE_DATA_DIR): {exc.strerror or exc}",
                          soft_wrap=True)
            return 2
        console.print(f"[green]✓[/] tiny model {'built' if built else 'reused'}: {model_dir}")
        dep_path, slo_path = write_specs(cfg, run_dir, model_dir.resolve(), _free_port_run(2, own_ports))
        engine_label = "vLLM (CPU, tiny model)"
        startup_s, ready_timeout = "60", 420.0
    console.print(f"[green]✓[/] specs written: {dep_path}, {slo_path}", soft_wrap=True)

    s = settings
    # The run's own SQLite store, whatever CONTROLPLANE_DATABASE_URL says: the story is told from this run's
    # rows only (another store's desired count, pages and recommendations would be taken for this run's).
    env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(run_dir), "CONTROLPLANE_API_TOKEN": token,
           "CONTROLPLANE_DATABASE_URL": f"sqlite:///{run_dir / 'controlplane.db'}",
           "CONTROLPLANE_BIND_HOST": s.bind_host, "CONTROLPLANE_API_PORT": str(s.api_port),
           "CONTROLPLANE_ROUTER_PORT": str(s.router_port), "CONTROLPLANE_OTLP_HTTP_PORT": str(s.otlp_http_port),
           "CONTROLPLANE_OTLP_GRPC_PORT": str(s.otlp_grpc_port), "HF_HUB_OFFLINE": "1"}
    # The demo's clock: decisions every 10 s, SLOs every 5 s, a scrape every 2 s (all overridable).
    for key, value in {"CONTROLPLANE_TUNER_MODE": "auto", "CONTROLPLANE_TUNER_INTERVAL_S": "10",
                       "CONTROLPLANE_SLO_INTERVAL_S": "5", "CONTROLPLANE_SCRAPE_INTERVAL_S": "2",
                       "CONTROLPLANE_TUNER_MIN_FINISHED": "20", "CONTROLPLANE_TUNER_STARTUP_S": startup_s}.items():
        env.setdefault(key, value)
    if s.alertmanager_url:
        env["CONTROLPLANE_ALERTMANAGER_URL"] = s.alertmanager_url
    exe = str(Path(sys.executable).parent / "controlplane")
    api_url, router_url = s.local_url(s.api_port), s.local_url(s.router_port)
    plane = PlaneProcess([exe, "up", "--config", str(dep_path), "--slo", str(slo_path)], env,
                         run_dir / "plane.log", api_url, router_url)
    ui_proc: subprocess.Popen[bytes] | None = None
    ui_url = s.local_url(s.ui_port)
    rc = 1
    leave_up = ui_up = False
    # SIGTERM / SIGHUP (a CI cancel, `timeout`, a closed terminal) end the demo as Ctrl-C does: through the
    # `finally` below, which stops the plane, its replicas and the app (each in its own session, so a signal
    # to the demo's group does not reach them).
    previous = ({sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        with _step(console, "starting the plane"):
            plane.start()
        console.print(f"[green]✓[/] plane up: API {api_url}, router {router_url}, log {plane.log_path}",
                      soft_wrap=True)
        with _step(console, "starting the first replica") as st:
            waited = wait_ready(api_url, cfg.deployment, 1, ready_timeout, _Ticker(console, st))
        console.print(f"[green]✓[/] first replica of {cfg.deployment} ready in {waited:.0f} s ({engine_label})")
        # The story goes on without the app (the report and the API tell it too), saying why.
        if not ports_free(s.ui_port, 1, s.bind_host):
            console.print(f"[yellow]the Streamlit app was not started:[/] port {s.ui_port} is taken (another "
                          "`controlplane ui`?); set CONTROLPLANE_UI_PORT to another port")
        else:
            with _step(console, "starting the Streamlit app"):
                ui_proc = _start_ui(exe, api_url, s.bind_host, s.ui_port, run_dir, token)
                ui_up = ui_proc is not None and _wait_ui(ui_url, ui_proc, UI_READY_TIMEOUT_S)
            if ui_up:
                console.print(f"[green]✓[/] Streamlit app: {ui_url}")
            else:
                console.print(f"[yellow]the Streamlit app did not answer at {ui_url}[/] within "
                              f"{UI_READY_TIMEOUT_S:.0f} s; its log: {run_dir / 'streamlit.log'}")

        if cfg.probe_s > 0:
            console.print(f"driving the load: {cfg.steady_factor:g}x what one replica serves (measured first, "
                          f"{cfg.probe_s:.0f} s) for {cfg.steady_s:.0f} s, then {cfg.burst_factor:g}x (raised "
                          f"{cfg.raise_factor - 1:.0%} after each {cfg.raise_after_s:.0f} s one replica carries it) "
                          f"until the plane has reacted and recovered (SLO: TTFT <= {cfg.ttft_threshold_s:g} s for "
                          f"{cfg.objective:.0%})")
        else:
            console.print(f"driving the load: {cfg.steady_rps:g} req/s for {cfg.steady_s:.0f} s, then "
                          f"{cfg.burst_rps:g} req/s until the plane has reacted and recovered "
                          f"(SLO: TTFT <= {cfg.ttft_threshold_s:g} s for {cfg.objective:.0%})")
        with _step(console, "load") as st:
            result = run_closed_loop(cfg, router_url=router_url, api_url=api_url, token=token,
                                     status=_Ticker(console, st), gone=lambda: _exited(plane))
        rc = _summarise(console, cfg, result)
        try:
            with _step(console, "writing the report"):
                report = _report(cfg, result, api_url, token, run_dir, engine_label)
        except (httpx.HTTPError, OSError, ValueError) as exc:  # the run's story stands; a missing report fails it
            console.print(f"[red]the report could not be written:[/] {type(exc).__name__}: {exc} (the plane's data "
                          f"stays in {run_dir / 'controlplane.db'})", soft_wrap=True)
            rc = 1
        else:
            console.print(f"[green]✓[/] report: {report}", soft_wrap=True)
        if keep_running:
            console.print(f"[bold]still running[/] (--keep-running): API {api_url}, "
                          f"Streamlit {ui_url if ui_up else '(not up)'}, token in "
                          f"{run_dir / 'token'}; stop with: kill -TERM {plane.proc.pid}"
                          + (f" {ui_proc.pid}" if ui_proc else ""), soft_wrap=True)
            fd = os.open(run_dir / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            leave_up = True
            return rc
        if ui_up:
            console.print(f"Streamlit was at {ui_url} (run with --keep-running to explore it after the demo)")
    except (RuntimeError, httpx.HTTPError) as exc:
        console.print(f"[red]demo failed:[/] {exc} (the plane's log and the replicas' logs: {run_dir})",
                      soft_wrap=True)
        rc = 1
    finally:
        # The plane first (it stops the replicas, each in its own session: nothing else would), then the app. A
        # second Ctrl-C or SIGTERM during it would leave them running: it is held until the cleanup is done,
        # then acted on (the demo ends as interrupted, not with the story's exit code).
        caught: list[int] = []
        if not leave_up:
            main = threading.current_thread() is threading.main_thread()
            held = {sig: signal.signal(sig, lambda signum, _f: caught.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
            try:
                with _step(console, "stopping the plane and its replicas"):
                    try:
                        plane.stop()
                    finally:
                        if ui_proc is not None:
                            terminate(ui_proc, 10.0)
            finally:
                for sig, handler in held.items():
                    signal.signal(sig, handler)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught and sys.exc_info()[0] is None:  # held off during the cleanup, then acted on: not dropped
            if caught[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + caught[0])
    return rc


def _exited(plane: PlaneProcess) -> str | None:
    """Why the plane is no longer there (it exited), or None while it runs."""
    code = plane.proc.poll() if plane.proc is not None else None
    return None if code is None else f"the plane exited with code {code} (its log: {plane.log_path})"


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _start_ui(exe: str, api_url: str, host: str, port: int, run_dir: Path,
              token: str) -> subprocess.Popen[bytes] | None:
    env = {**os.environ, "CONTROLPLANE_API_TOKEN": token}
    try:
        with (run_dir / "streamlit.log").open("ab") as log:
            return subprocess.Popen([exe, "ui", "--api-url", api_url, "--host", host, "--port", str(port)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError:
        return None


def _wait_ui(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once Streamlit's health endpoint answers; False if the app exited (a taken port) or took too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/_stcore/health", timeout=2.0).status_code == 200:
                return proc.poll() is None  # ours, not an app that held the port before it
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _summarise(console: Console, cfg: LoopConfig, r: LoopResult) -> int:
    t0 = r.started_unix_s
    table = Table(title="SLO attainment by phase (client-side TTFT)")
    for col in ("phase", "from", "to", "requests", f"TTFT <= {cfg.ttft_threshold_s:g} s", "failed"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, (a, b) in r.phases.items():
        share, n = r.client_attainment(name, cfg.ttft_threshold_s)
        failed = sum(1 for x in r.sent if x.phase == name and not x.result.ok)
        table.add_row(name, f"+{a - t0:.0f} s", f"+{b - t0:.0f} s", str(n), _pct(share), str(failed))
    console.print(table)
    if r.probed_rps is not None:
        console.print(f"one replica served {r.probed_rps:.2f} req/s in the probe: steady {r.steady_rps:g} req/s, "
                      f"burst {r.burst_rps:g} req/s")

    def at(v: float | None) -> str:
        return "never" if v is None else f"+{v - t0:.0f} s"

    caught_up = r.phases.get("recovered", (None, None))[0]
    console.print(f"page fired: {at(r.alert_fired_unix_s)}; tuner's scale-up applied: {at(r.scaled_unix_s)}; "
                  f"second replica ready: {at(r.second_ready_unix_s)}; backlog drained: {at(caught_up)}")
    failed = sum(1 for x in r.sent if not x.result.ok)
    if failed > 0.01 * max(1, len(r.sent)):
        console.print(f"[yellow]{failed} of {len(r.sent)} requests failed[/] (they are not in the attainment)")
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}")
    ok, why = verdict(cfg, r)
    if ok:
        console.print(f"[green]✓[/] {STORY_TOLD}")
    else:
        console.print(f"[yellow]the story did not complete:[/] {'; '.join(why)} (see the table and the report)")
    return 0 if ok else 1


# The recovered phase must be judged on enough requests: at least this share of what the burst rate sends in it
# (a phase of a handful of answered requests, most of the rest failed, proved nothing), and at least MIN_JUDGED.
RECOVERED_SHARE = 0.5
MIN_JUDGED = 20


def verdict(cfg: LoopConfig, r: LoopResult) -> tuple[bool, list[str]]:
    """Whether the demo's story happened, and if not, why not (pure: the terminal and the report say the same).
    A note means the story ran out of time (the recovered phase cut short, or never reached): not a success."""
    why = list(r.notes)
    if r.alert_fired_unix_s is None:
        why.append("no page fired")
    if r.scaled_unix_s is None:
        why.append("no scale-up was applied")
    recovered, n = r.client_attainment("recovered", cfg.ttft_threshold_s)
    start, end = r.phases.get("recovered", (0.0, 0.0))
    in_phase = [x for x in r.sent if x.phase == "recovered"]
    failed_in_phase = sum(1 for x in in_phase if not x.result.ok)
    expected = RECOVERED_SHARE * r.burst_rps * max(0.0, end - start)
    if recovered is None:
        why.append("no request was answered after the backlog drained")
    elif recovered < cfg.objective:
        why.append(f"attainment after the backlog drained {recovered:.1%} < the objective {cfg.objective:.0%}")
    if recovered is not None and n < max(MIN_JUDGED, expected):
        why.append(f"only {n} requests answered after the backlog drained (at least {max(MIN_JUDGED, expected):.0f} "
                   "needed to judge it)")
    if failed_in_phase > 0.01 * max(1, len(in_phase)):
        why.append(f"{failed_in_phase} of {len(in_phase)} requests failed after the backlog drained")
    failed = sum(1 for x in r.sent if not x.result.ok)
    if failed > 0.01 * max(1, len(r.sent)):
        why.append(f"{failed} of {len(r.sent)} requests failed")
    return not why, why


def _report(cfg: LoopConfig, r: LoopResult, api_url: str, token: str, run_dir: Path, engine_label: str) -> Path:
    slo_name = f"{cfg.deployment}-ttft"
    time.sleep(3.0)  # the last spans and scrapes reach the store
    data = fetch(api_url, deployment=cfg.deployment, slo_name=slo_name, since=r.started_unix_s,
                 until=r.ended_unix_s, token=token)
    client = {name: r.client_attainment(name, cfg.ttft_threshold_s) for name in r.phases}
    inp = ReportInput(deployment=cfg.deployment, slo_name=slo_name, ttft_threshold_s=cfg.ttft_threshold_s,
                      objective=cfg.objective, since=r.started_unix_s, until=r.ended_unix_s, phases=r.phases,
                      requests=data["requests"], samples=data["samples"], cost=data["cost"], alerts=data["alerts"],
                      actions=data["actions"], recommendations=data["recommendations"], client=client,
                      engine=engine_label,
                      failed={name: sum(1 for x in r.sent if x.phase == name and not x.result.ok)
                              for name in r.phases},
                      verdict=verdict(cfg, r))
    return render(inp, run_dir)

