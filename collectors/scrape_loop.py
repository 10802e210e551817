"""Scrape vLLM replicas on an interval and store one engine sample per scrape.

A failed scrape is stored as a row with `scrape_ok = false` and every reading NULL (unknown), and
the transition to / from failing is recorded once as a lifecycle event, not on every tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import SQLAlchemyError

from collectors.promtext import ScrapeResult, scrape
from collectors.vllm_metrics import CounterState, EngineReading, adjust_counters, counter_totals, read_engine
from controlplane import names
from controlplane.store.repo import Store

log = logging.getLogger(__name__)

# How long a removed target's counter state (and its scrape-count series) is kept for it to come back
# under its name: longer than any crash restart, short enough that replica churn (names are not reused)
# does not grow the plane's memory and /metrics without bound.
FORGET_AFTER_S = 3600.0
_RESULTS = ("ok", "error", "not_stored")


@dataclass(frozen=True)
class Target:
    """A vLLM server to scrape: `name` identifies the replica in the store and in OTLP resources."""

    name: str
    base_url: str

    @property
    def metrics_url(self) -> str:
        return self.base_url.rstrip("/") + "/metrics"

    @classmethod
    def from_watch(cls, spec: str) -> Target:
        """`URL` or `NAME=URL`; a bare URL's replica name is its host:port."""
        name, sep, url = spec.partition("=")
        expected = "expected an http(s) URL of a vLLM server, e.g. http://127.0.0.1:8000 or name=http://host:port"
        if not sep or "://" in name:  # a bare URL, which may hold "=" in its query
            name, url = "", spec
        elif not name.strip():
            raise ValueError(f"--watch {spec!r}: the replica name before '=' is empty; give one, or the bare URL "
                             "(then its host:port names the replica)")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
        except ValueError as exc:
            raise ValueError(f"--watch {spec!r}: {exc}; {expected}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--watch {spec!r}: {expected}")
        return cls(name or parts.netloc, url)


def sample_row(
    replica_id: int, result: ScrapeResult, reading: EngineReading | None,
    counters: Mapping[str, float | None], reset: bool,
) -> dict[str, Any]:
    """The engine_samples row for one scrape (pure)."""
    row: dict[str, Any] = {
        "replica_id": replica_id,
        "ts_unix_s": result.ts_unix_s,
        "scrape_ok": result.ok,
        "error": result.error,
        "scrape_duration_s": result.duration_s,
        "counter_reset": reset,
        "kv_usage_ratio": None, "kv_capacity_tokens": None, "kv_block_size_tokens": None,
        "num_running": None, "num_waiting": None,
        "preemptions_total": None, "prompt_tokens_total": None, "generation_tokens_total": None,
        "request_success_total": None, "request_errors_total": None,
        "prefix_cache_queries_total": None, "prefix_cache_hits_total": None,
    }
    if reading is not None:
        row.update(
            kv_usage_ratio=reading.kv_usage_ratio,
            kv_capacity_tokens=reading.kv_capacity_tokens,
            kv_block_size_tokens=reading.kv_block_size_tokens,
            num_running=reading.num_running,
            num_waiting=reading.num_waiting,
        )
        row.update(counters)
    return row


@dataclass
class _TargetState:
    replica_id: int
    counters: CounterState = field(default_factory=CounterState)
    failing: bool = False


class EngineScraper:
    def __init__(
        self, store: Store, client: httpx.AsyncClient, *, timeout_s: float,
        registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.client = client
        self.timeout_s = timeout_s
        self.targets: dict[str, Target] = {}
        self._state: dict[str, _TargetState] = {}
        self._removed: dict[str, float] = {}  # name -> when it was removed (clock)
        self._clock = clock
        registry = registry if registry is not None else CollectorRegistry()
        self.scrapes = Counter(names.PLANE_SCRAPES, "Engine scrapes", ["replica", "result"], registry=registry)
        self.duration = Histogram(names.PLANE_SCRAPE_DURATION, "Engine scrape duration", registry=registry)

    def add(self, target: Target, *, backend: str = "external") -> None:
        rid = self.store.register_replica(target.name, url=target.base_url, backend=backend)
        self.targets[target.name] = target
        self._removed.pop(target.name, None)
        self._state.setdefault(target.name, _TargetState(rid))
        self._forget_old()

    def remove(self, name: str) -> None:
        # The target's counter state stays for FORGET_AFTER_S: a supervised replica that crashed comes back under
        # its name, and its stored counters must carry on across the restart (reset offsets), not drop to the new
        # process's values.
        if self.targets.pop(name, None) is not None:
            self._removed[name] = self._clock()
        self._forget_old()

    def _forget_old(self) -> None:
        now = self._clock()
        for name, at in list(self._removed.items()):
            if now - at >= FORGET_AFTER_S:
                del self._removed[name]
                self._state.pop(name, None)
                for result in _RESULTS:
                    try:
                        self.scrapes.remove(name, result)
                    except KeyError:  # never counted with that result
                        pass

    async def scrape_once(self, target: Target) -> dict[str, Any]:
        result = await scrape(self.client, target.metrics_url, self.timeout_s)
        state = self._state.get(target.name)
        if state is None:  # removed while this scrape was in flight: nothing to store it against
            return {}
        rid = state.replica_id
        if result.ok:
            reading = read_engine(result.samples)
            series, state.counters, reset = adjust_counters(reading.counter_series, state.counters,
                                                            reading.process_start_s)
            counters = counter_totals(series)
            row = sample_row(rid, result, reading, counters, reset)
        else:
            row = sample_row(rid, result, None, {}, False)
        try:
            await asyncio.to_thread(self.store.write_engine_sample, row)
        except SQLAlchemyError as exc:
            # The store is down or busy: this sample is lost, the scraping goes on.
            log.error("%s: engine sample not stored: %s", target.name, exc)
            self.scrapes.labels(target.name, "not_stored").inc()
            return row
        self.scrapes.labels(target.name, "ok" if result.ok else "error").inc()
        self.duration.observe(result.duration_s)
        if result.ok == state.failing:  # a transition: record it once
            state.failing = not result.ok
            kind = "scrape_failed" if state.failing else "scrape_recovered"
            (log.warning if state.failing else log.info)("%s: %s %s", target.name, kind, result.error or "")
            try:
                await asyncio.to_thread(
                    self.store.record_event, rid, kind, actor="collector",
                    reason="scrape_error" if state.failing else "scrape_ok", message=result.error,
                )
            except SQLAlchemyError as exc:
                log.error("%s: %s event not stored: %s", target.name, kind, exc)
        return row

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Every interval, start a scrape of each target whose previous one has finished: a slow target skips
        rounds (each scrape ends within timeout_s) but never holds up the others' scrapes."""
        inflight: dict[str, asyncio.Task[dict[str, Any]]] = {}

        def reap(name: str, task: asyncio.Task[dict[str, Any]]) -> None:
            if not task.cancelled() and task.exception() is not None:  # never let one bad scrape end the loop
                log.error("%s: scrape failed unexpectedly", name, exc_info=task.exception())

        while not stop.is_set():
            for name, task in list(inflight.items()):
                if task.done():
                    reap(name, inflight.pop(name))
            for t in list(self.targets.values()):
                if t.name not in inflight:
                    inflight[t.name] = asyncio.create_task(self.scrape_once(t))
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass
        await asyncio.gather(*inflight.values(), return_exceptions=True)
        for name, task in inflight.items():
            reap(name, task)
