"""Router overhead: latency added and peak requests/s through the router vs calling the replica directly.

    .venv/bin/python bench/router.py [--requests N] [--concurrency C] [--upstream URL --model NAME]

By default the replica is a fast OpenAI-style stand-in (a streamed completion of 16 small SSE events,
no model), in its own process, so that the figure is the router's cost and not the engine's noise;
`--upstream` measures against a real vLLM server instead. The router runs in its own process as in
the plane (its own thread and event loop). The same aiohttp client measures both paths in the same
run, alternating direct and routed requests so that drift on this shared machine hits both alike.
Latency is to the last byte of the stream, one request at a time; throughput uses C concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.supervisor.router import Router  # noqa: E402

TARGET_ADDED_P50_MS = 2.0
console = Console(width=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_replica(port: int, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(16):
            await resp.write(b'data: {"choices":[{"index":0,"text":"tok%d"}]}\n\n' % i)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _router(port: int, upstream: str, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    router = Router("127.0.0.1", port)
    router.set_ready("replica-0", upstream)
    router.start()
    while True:
        time.sleep(3600)


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])), 1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for _ in resp.content.iter_any():
            pass
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    return time.perf_counter() - t0


async def _latency(direct: str, routed: str, n: int, body: dict[str, object]) -> tuple[list[float], list[float]]:
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # warm both connections and code paths
            await _one(session, direct, body)
            await _one(session, routed, body)
        d, r = [], []
        for _ in range(n):
            d.append(await _one(session, direct, body))
            r.append(await _one(session, routed, body))
    return d, r


async def _throughput(url: str, seconds: float, concurrency: int, body: dict[str, object]) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await _one(session, url, body)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=1000, method="inclusive")[int(q * 1000) - 1] if len(xs) > 1 else xs[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per path for latency")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent clients for throughput")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    ap.add_argument("--upstream", help="a real replica (e.g. vLLM) instead of the stand-in")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()

    ctx = multiprocessing.get_context("spawn")
    procs = []
    cores = sorted(os.sched_getaffinity(0))
    two = len(cores) >= 2
    if args.upstream:
        upstream = args.upstream.rstrip("/")
    else:
        port = _free_port()
        upstream = f"http://127.0.0.1:{port}"
        procs.append(ctx.Process(target=_fake_replica, args=(port, cores[0] if two else None), daemon=True))
    rport = _free_port()
    routed = f"http://127.0.0.1:{rport}"
    procs.append(ctx.Process(target=_router, args=(rport, upstream, cores[1] if two else None), daemon=True))
    for p in procs:
        p.start()
    try:
        _wait(upstream)
        _wait(routed)
        body: dict[str, object] = {"model": args.model, "prompt": "hello", "max_tokens": 16, "stream": True}
        console.print(f"latency: {args.requests} sequential requests per path, alternating ...")
        d, r = asyncio.run(_latency(upstream, routed, args.requests, body))
        console.print(f"throughput: {args.concurrency} clients x {args.seconds:.0f} s per path ...")
        tp_direct = asyncio.run(_throughput(upstream, args.seconds, args.concurrency, body))
        tp_routed = asyncio.run(_throughput(routed, args.seconds, args.concurrency, body))
    finally:
        for p in procs:
            p.kill()

    table = Table(title=f"router overhead ({'real replica' if args.upstream else 'stand-in replica'}; "
                        f"{len(cores)} cores)")
    for col in ("path", "p50 ms", "p99 ms", "max req/s"):
        table.add_column(col, justify="right")
    table.add_row("direct (reference)", f"{_pct(d, 0.5) * 1e3:.3f}", f"{_pct(d, 0.99) * 1e3:.3f}", f"{tp_direct:.0f}")
    table.add_row("through router", f"{_pct(r, 0.5) * 1e3:.3f}", f"{_pct(r, 0.99) * 1e3:.3f}", f"{tp_routed:.0f}")
    added = [(b - a) for a, b in zip(d, r, strict=True)]
    table.add_row("added (paired)", f"{_pct(added, 0.5) * 1e3:.3f}", f"{_pct(added, 0.99) * 1e3:.3f}",
                  f"{tp_routed / tp_direct:.2f}x")
    console.print(table)
    p50_added = (_pct(r, 0.5) - _pct(d, 0.5)) * 1e3
    ok = p50_added <= TARGET_ADDED_P50_MS
    console.print(f"added p50 latency {p50_added:.3f} ms (target <= {TARGET_ADDED_P50_MS} ms): "
                  f"{'[green]met[/]' if ok else '[red]not met[/]'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
