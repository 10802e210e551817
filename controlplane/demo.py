"""`controlplane demo` (foundation stage): the plane watching one tiny vLLM server under a short load.

Steps: build or reuse the tiny model, start the plane, start vLLM exporting traces to it, drive a
streamed load of mixed lengths, then read the requests back from the store and print per-phase
latency percentiles next to what the client measured.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from collectors.scrape_loop import Target
from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model
from controlplane.engines.vllm_server import VllmServer, VllmServerSpec, VllmStartError
from controlplane.loadgen import ClientResult, mixed_plans, run_load
from controlplane.plane import Endpoints, Plane
from controlplane.settings import Settings
from controlplane.stats import PHASES, Summary, phase_summaries, summarize


class PlaneThread:
    """Runs a Plane on its own event loop in a thread, for the demo and the tests."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.endpoints: Endpoints | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        plane.on_ready = self._on_ready
        self._thread = threading.Thread(target=self._main, name="plane", daemon=True)

    def _on_ready(self, e: Endpoints) -> None:
        self.endpoints = e
        self._ready.set()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(self.plane.run(self._stop))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def start(self, timeout_s: float = 60.0) -> Endpoints:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self.endpoints is None:
            raise RuntimeError(f"plane did not start: {self._error!r}")
        return self.endpoints

    def watch(self, target: Target) -> None:
        async def add() -> None:
            await asyncio.to_thread(self.plane.scraper_add, target)
        asyncio.run_coroutine_threadsafe(add(), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


def _fmt_ms(v: float | None) -> str:
    return "unknown" if v is None else f"{v * 1000:.1f}"


def summary_table(title: str, summaries: dict[str, Summary], client_ttft: Summary | None) -> Table:
    table = Table(title=title)
    for col in ("phase", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for phase in PHASES:
        s = summaries[phase]
        table.add_row(phase.removesuffix("_s"), str(s.count), _fmt_ms(s.p50), _fmt_ms(s.p90),
                      _fmt_ms(s.p99), _fmt_ms(s.mean))
    if client_ttft is not None:
        s = client_ttft
        table.add_row("ttft (client)", str(s.count), _fmt_ms(s.p50), _fmt_ms(s.p90), _fmt_ms(s.p99),
                      _fmt_ms(s.mean), style="dim")
    return table


def run_demo(settings: Settings, console: Console, n_requests: int = 120, concurrency: int = 4) -> int:
    data = settings.data_dir
    with console.status("building or reusing the tiny model") as status:
        model_dir, built = make_tiny_model(data / "models" / "tiny", TinyModelSpec(),
                                           progress=lambda m: status.update(m))
    console.print(f"[green]✓[/] tiny model {'built' if built else 'reused'}: {model_dir}")

    # Scrape every second in the demo (a short load would otherwise fall between two 5 s scrapes),
    # unless the user set an interval.
    if "scrape_interval_s" not in settings.model_fields_set:
        settings = settings.model_copy(update={"scrape_interval_s": 1.0})
    plane_thread = PlaneThread(Plane(settings))
    endpoints = plane_thread.start()
    console.print(f"[green]✓[/] plane up: API {endpoints.api}, OTLP/gRPC {endpoints.otlp_grpc}, "
                  f"store {settings.resolved_database_url()}")

    spec = VllmServerSpec(model_dir=model_dir, port=8100, replica_name="tiny-0",
                          otlp_endpoint=endpoints.otlp_grpc, otlp_protocol="grpc")
    server = VllmServer(spec, Path(data) / "logs" / "vllm-tiny-0.log")
    rc = 0
    try:
        server.start()
        with console.status("starting vLLM (CPU) — about a minute, longer the first time") as status:
            waited = server.wait_ready(tick=lambda s: status.update(
                f"starting vLLM (CPU): {s:.0f} s, log {server.log_path}"))
        console.print(f"[green]✓[/] vLLM ready in {waited:.0f} s at {spec.base_url} (pid {server.pid})")
        plane_thread.watch(Target(spec.replica_name, spec.base_url))

        plans = mixed_plans(n_requests, seed=7)
        started = time.time()
        results: list[ClientResult] = []
        with Progress(TextColumn("driving load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("load", total=len(plans))
            results = asyncio.run(run_load(spec.base_url, spec.served_name, plans, concurrency,
                                           on_done=lambda _: progress.advance(task)))
        failed = [r for r in results if not r.ok]
        console.print(f"[green]✓[/] {len(results) - len(failed)} of {len(results)} requests succeeded"
                      + (f" ([red]{len(failed)} failed[/]: {failed[0].error})" if failed else ""))

        store = plane_thread.plane.store
        rows: list[dict[str, object]] = []
        deadline = time.time() + 20
        with console.status("waiting for the last spans to be committed"):
            while time.time() < deadline:
                rows = store.requests(since_unix_s=started - 1, replica=spec.replica_name, limit=100_000)
                if len(rows) >= len(results) - len(failed):
                    break
                time.sleep(0.25)
        samples = store.engine_samples(since_unix_s=started - 1, replica=spec.replica_name, limit=100_000)
        phases = phase_summaries(rows)
        client_ttft = summarize(r.ttft_s for r in results if r.ok)
        console.print(summary_table(f"per-phase latency of {len(rows)} requests, read back from the store",
                                    phases, client_ttft))
        if phases["ttft_s"].p90 and client_ttft.p90 and client_ttft.p90 > 1.2 * phases["ttft_s"].p90 + 0.005:
            console.print("[dim]note: vLLM takes TTFT in its engine, from after the prompt is tokenised; the "
                          "client also sees the HTTP path and any stall of vLLM's API process (on a 2-core "
                          "host, CPU contention and each /metrics render). See the README.[/]")
        ok_samples = [s for s in samples if s["scrape_ok"]]
        if ok_samples:
            kv = [s["kv_usage_ratio"] for s in ok_samples if s["kv_usage_ratio"] is not None]
            waiting = [s["num_waiting"] for s in ok_samples if s["num_waiting"] is not None]
            console.print(f"engine samples: {len(samples)} scrapes ({len(samples) - len(ok_samples)} failed), "
                          f"KV capacity {ok_samples[0]['kv_capacity_tokens'] or 'unknown'} tokens, peak KV usage "
                          f"{f'{max(kv):.1%}' if kv else 'unknown'}, peak waiting "
                          f"{f'{max(waiting):.0f}' if waiting else 'unknown'}")
        if len(rows) < len(results) - len(failed):
            console.print(f"[yellow]only {len(rows)} of {len(results) - len(failed)} requests reached the store[/]")
            rc = 1
    except VllmStartError as exc:
        console.print(f"[red]vLLM failed to start:[/] {exc}")
        rc = 1
    finally:
        with console.status("stopping vLLM and the plane"):
            server.stop()
            plane_thread.stop()
    return rc
