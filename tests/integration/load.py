"""A steady streaming load through the router, on a background thread, recording every request."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx

from controlplane.supervisor.router import REPLICA_HEADER


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    ok: bool
    status: int | None
    replica: str | None
    error: str | None


@dataclass
class StreamLoad:
    """`streams` clients, each streaming short completions back to back until `stop()`."""

    base_url: str
    model: str
    streams: int = 20
    max_tokens: int = 12
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> StreamLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        return self.outcomes

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.streams, max_keepalive_connections=self.streams)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.streams)))

    async def _worker(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": self.model, "prompt": f"stream {i} asks for a few tokens", "max_tokens": self.max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0.0}
        while not self._stop.is_set():
            t0 = time.time()
            status: int | None = None
            replica: str | None = None
            try:
                async with client.stream("POST", self.base_url + "/v1/completions", json=body) as resp:
                    status, replica = resp.status_code, resp.headers.get(REPLICA_HEADER)
                    text = "".join([chunk async for chunk in resp.aiter_text()])
                ok = status == 200 and text.rstrip().endswith("data: [DONE]")
                err = None if ok else f"HTTP {status}: {text[-200:]}"
            except httpx.HTTPError as exc:
                ok, err = False, f"{type(exc).__name__}: {exc}"
            self.outcomes.append(Outcome(t0, time.time(), ok, status, replica, err))
            if not ok:
                await asyncio.sleep(0.2)  # a failing fleet should not be hammered in a tight loop

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]
