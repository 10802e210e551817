"""Fetch and parse Prometheus text exposition (parsing is prometheus_client's own parser)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class ScrapeResult:
    """What one GET /metrics gave: text on success, otherwise the reason it failed."""

    ts_unix_s: float
    duration_s: float
    text: str | None = None
    error: str | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def parse(text: str) -> list[Sample]:
    """Parse exposition text into flat samples; raises ValueError on malformed text."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


_IDENTITY = {"Accept-Encoding": "identity"}
# vLLM's /metrics is ~50 KB; a target answering far more (a wrong URL, a runaway exporter) is refused rather
# than read whole into the plane's memory.
MAX_EXPOSITION_BYTES = 16 * 1024 * 1024


async def scrape(client: httpx.AsyncClient, url: str, timeout_s: float) -> ScrapeResult:
    """GET `url` and parse it. Never raises: a failure becomes a ScrapeResult with `error` set."""
    start = time.time()
    t0 = time.perf_counter()
    try:
        # Uncompressed: prometheus_client gzips /metrics (at level 9) for a client that accepts it, and that CPU
        # is spent in the replica's API server, on the serving path. The plane is near its replicas; bytes are cheap.
        # httpx's timeout bounds each connect and each read, not the whole answer: a target trickling bytes
        # would hold its scrape (and the round every target waits for) for ever. The deadline is total.
        async with asyncio.timeout(timeout_s), client.stream("GET", url, timeout=timeout_s, headers=_IDENTITY) as resp:
            if resp.status_code != 200:
                return ScrapeResult(start, time.perf_counter() - t0, error=f"HTTP {resp.status_code} from {url}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_EXPOSITION_BYTES:
                    return ScrapeResult(start, time.perf_counter() - t0,
                                        error=f"exposition larger than {MAX_EXPOSITION_BYTES} bytes from {url}")
        text = bytes(body).decode(resp.encoding or "utf-8", errors="replace")
        # Off the event loop the plane's API, receivers and other scrapes share (~9 ms for vLLM's exposition).
        samples = await asyncio.to_thread(parse, text)
    except TimeoutError:
        return ScrapeResult(start, time.perf_counter() - t0, error=f"no complete answer in {timeout_s:g} s ({url})")
    except httpx.HTTPError as exc:
        return ScrapeResult(start, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc} ({url})")
    except ValueError as exc:
        return ScrapeResult(start, time.perf_counter() - t0, error=f"unparsable exposition from {url}: {exc}")
    return ScrapeResult(start, time.perf_counter() - t0, text=text, samples=samples)


def by_name(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.name, []).append(s)
    return out
