"""The running plane: store, OTLP receivers, engine scraper, GPU collector and REST API in one process.

Everything binds to `settings.bind_host` (loopback by default). `Plane.run` returns when `stop` is
set; the CLI sets it on SIGINT / SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import httpx
import uvicorn
from prometheus_client import CollectorRegistry

from collectors.gpu.collector import GpuCollector
from collectors.otlp.receiver import Ingestor, grpc_server, http_app
from collectors.scrape_loop import EngineScraper, Target
from controlplane import cost, coverage
from controlplane.api.app import create_app
from controlplane.api.queries import cost_source
from controlplane.settings import Settings
from controlplane.slo.alerter import Alerter
from controlplane.slo.export import SloCollector
from controlplane.slo.model import Slo
from controlplane.slo.monitor import SloMonitor
from controlplane.store.db import make_engine, upgrade
from controlplane.store.repo import Store
from controlplane.supervisor.router import Router, SpanWriter
from controlplane.supervisor.spec import Deployment
from controlplane.supervisor.supervisor import Supervisor, SupervisorMetrics, default_backends
from controlplane.tuning.config_search import SearchJobs
from controlplane.tuning.loop import Tuner, TunerOptions, calibrated_capacity
from controlplane.tuning.recommendations import Recommendations

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    """uvicorn server that leaves signal handling to the plane (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Endpoints:
    api: str
    otlp_http: str
    otlp_grpc: str
    router: str | None = None


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror}; is another plane running?") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Plane:
    def __init__(self, settings: Settings, watch: list[Target] | None = None,
                 on_ready: Callable[[Endpoints], None] | None = None,
                 deployments: list[Deployment] | None = None, slos: list[Slo] | None = None) -> None:
        self.settings = settings
        self.watch = list(watch or [])
        self.deployments = list(deployments or [])
        self.slos = list(slos or [])
        self.supervisor: Supervisor | None = None
        self.alerter: Alerter | None = None
        self.tuner: Tuner | None = None
        self.on_ready = on_ready
        self.registry = CollectorRegistry()
        self.engine = make_engine(settings.resolved_database_url())
        self.store = Store(self.engine)
        self.monitor: SloMonitor | None = SloMonitor(self.engine, self.slos) if self.slos else None
        self._scraper: EngineScraper | None = None

    def scraper_add(self, target: Target) -> None:
        """Start watching another vLLM server (call from any thread once the plane is ready)."""
        if self._scraper is None:
            raise RuntimeError("the plane is not running")
        self._scraper.add(target)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        await asyncio.to_thread(upgrade, self.engine)
        ingestor = Ingestor(self.store, self.registry)
        # Bind every socket first so a busy port fails fast, before anything runs.
        api_sock = _bind(s.bind_host, s.api_port)
        otlp_sock = _bind(s.bind_host, s.otlp_http_port)
        grpc_srv, grpc_port = grpc_server(ingestor, s.bind_host, s.otlp_grpc_port, s.otlp_max_body_bytes)
        router: Router | None = None
        if self.deployments:
            router = Router(s.bind_host, s.router_port, registry=self.registry,
                            recorder=SpanWriter(self.engine, registry=self.registry),
                            read_timeout_s=s.router_read_timeout_s)
            await asyncio.to_thread(router.start)
        async with httpx.AsyncClient() as client:
            scraper = EngineScraper(self.store, client, timeout_s=s.scrape_timeout_s, registry=self.registry)
            self._scraper = scraper
            supervisor: Supervisor | None = None
            if router is not None:
                if warning := s.replica_spans_warning():
                    log.warning("%s", warning)
                supervisor = Supervisor(
                    self.deployments, default_backends(self.deployments), self.store, router, client,
                    log_dir=s.data_dir / "replicas", otlp_endpoint=s.replica_spans_endpoint(grpc_port),
                    on_replica_up=lambda name, url: scraper.add(Target(name, url), backend="supervised"),
                    on_replica_gone=scraper.remove,
                )
                self.supervisor = supervisor
                self.registry.register(SupervisorMetrics(supervisor))
                if s.tuner_mode != "off":
                    self.tuner = Tuner(
                        supervisor, router, self.store, Recommendations(self.engine), self.slos,
                        TunerOptions(mode=s.tuner_mode, interval_s=s.tuner_interval_s, startup_s=s.tuner_startup_s,
                                     stale_s=max(20.0, 4 * s.scrape_interval_s),
                                     min_finished=s.tuner_min_finished),
                        calibrate=calibrated_capacity(self.store, self.slos))
                    self.registry.register(self.tuner)
            api_url = s.local_url(api_sock.getsockname()[1])
            gap = max(cost.DEFAULT_MAX_GAP_S, 3 * s.scrape_interval_s)  # a replica is "up" between close scrapes
            self.registry.register(cost.CostCollector(
                cost_source(self.engine, watched_price=s.watched_price_per_replica_hour_usd, max_gap_s=gap),
                window_s=s.cost_interval_s * 5, lag_s=2 * s.scrape_interval_s))
            self.registry.register(coverage.SpanCoverageCollector(partial(coverage.span_coverage, self.engine)))
            if self.monitor is not None:
                self.alerter = await asyncio.to_thread(
                    Alerter, self.engine, alertmanager_url=s.alertmanager_url, resend_s=s.slo_interval_s,
                    api_url=api_url, configured=[slo.name for slo in self.monitor.slos])
                monitor = self.monitor
                self.registry.register(SloCollector(monitor.statuses, self.alerter.states,
                                                    lambda: monitor.evaluation_ages(time.time())))
            else:  # no SLO: what a previous plane left open is closed (and Alertmanager told), not left firing
                self.alerter = await asyncio.to_thread(
                    Alerter, self.engine, alertmanager_url=s.alertmanager_url, resend_s=s.slo_interval_s,
                    api_url=api_url, configured=[])
            servers = [
                _QuietServer(uvicorn.Config(
                    create_app(self.store, self.registry, control=supervisor, api_token=s.api_token,
                               slo_statuses=self.monitor.statuses if self.monitor else None,
                               configured_slos=self.slos,
                               searches=(SearchJobs(self.store, Recommendations(self.engine), supervisor, self.slos,
                                                    mode=s.tuner_mode)
                                         if supervisor is not None else None),
                               watched_price_per_replica_hour_usd=s.watched_price_per_replica_hour_usd,
                               cost_max_gap_s=gap),
                    log_level="warning", access_log=False, lifespan="off")),
                _QuietServer(uvicorn.Config(http_app(ingestor, s.otlp_max_body_bytes), log_level="warning",
                                            access_log=False, lifespan="off")),
            ]
            tasks = [asyncio.create_task(srv.serve(sockets=[sock]))
                     for srv, sock in zip(servers, (api_sock, otlp_sock), strict=True)]
            for target in self.watch:
                await asyncio.to_thread(scraper.add, target)
            gpu = GpuCollector(self.store.write_gpu_samples, dcgm_url=s.dcgm_url, client=client,
                               nvml_module=None, log=log)
            tasks.append(asyncio.create_task(scraper.run(stop, s.scrape_interval_s)))
            tasks.append(asyncio.create_task(gpu.run(stop, s.gpu_interval_s)))
            if supervisor is not None:
                await supervisor.start()
                tasks.append(asyncio.create_task(supervisor.run(stop)))
            tuner_task: asyncio.Task[None] | None = None
            if self.tuner is not None:
                tuner_task = asyncio.create_task(self.tuner.run(stop))
                tasks.append(tuner_task)
            if self.monitor is not None:
                tasks.append(asyncio.create_task(self._slo_loop(stop, s.slo_interval_s)))
            else:
                tasks.append(asyncio.create_task(self._retire_loop(stop, s.slo_interval_s)))
            while not all(srv.started for srv in servers):
                if any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.02)
            endpoints = Endpoints(  # as reached from this host (a wildcard bind on loopback)
                api=api_url,
                otlp_http=f"{s.local_url(otlp_sock.getsockname()[1])}/v1/traces",
                otlp_grpc=s.local_address(grpc_port),
                router=s.local_url(router.bound_port) if router is not None and router.bound_port else None,
            )
            if self.on_ready:
                self.on_ready(endpoints)
            try:
                await stop.wait()
            finally:
                if tuner_task is not None:  # no decision may start a replica while they are being stopped
                    tuner_task.cancel()
                if supervisor is not None:
                    # Stop every replica this plane started before anything else goes away.
                    await supervisor.shutdown()
                if router is not None:
                    await asyncio.to_thread(router.stop)  # joins its thread: not on this loop
                for srv in servers:
                    srv.should_exit = True
                grpc_srv.stop(grace=2).wait()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                        log.error("plane task ended with %r", r)
                self.engine.dispose()


    async def _slo_loop(self, stop: asyncio.Event, interval_s: float) -> None:
        """Roll up, evaluate every SLO, decide and send alerts; a failed round is logged and retried."""
        assert self.monitor is not None and self.alerter is not None
        while not stop.is_set():
            now = time.time()
            try:
                _, statuses = await asyncio.to_thread(self.monitor.tick, now)
                await asyncio.to_thread(self.alerter.evaluate, statuses, now)
            except Exception:  # noqa: BLE001 - the next round retries; the store may be back by then
                log.exception("SLO evaluation round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


    async def _retire_loop(self, stop: asyncio.Event, interval_s: float) -> None:
        """With no SLO configured: close the episodes a previous plane left open (a firing page is resolved and
        Alertmanager told), retrying a failed round, then end."""
        assert self.alerter is not None
        while not stop.is_set() and not self.alerter.idle():
            try:
                await asyncio.to_thread(self.alerter.evaluate, [], time.time())
            except Exception:  # noqa: BLE001 - the next round retries; the store may be back by then
                log.exception("closing the alerts of SLOs no longer configured failed")
            if self.alerter.idle():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


def run_blocking(plane: Plane, install_signals: bool = True) -> None:
    """Run until SIGINT / SIGTERM."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await plane.run(stop)

    asyncio.run(main())
