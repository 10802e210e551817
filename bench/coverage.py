"""Span coverage read (the `controlplane_span_coverage_ratio` gauge's query) against a naive read, same store,
same run.

    .venv/bin/python bench/coverage.py [--spans N] [--rate R] [--lost-every K] [--repeat M]

Stores N router spans of inference requests (default 1,000,000: about 1.9 hours at R = 150 req/s) on one
replica in a temporary SQLite store, and the `llm_request` spans of all but every K-th (default 100: 1 %
lost). Then reads the coverage of the gauge's window (ended 30 s to 5.5 min before the last request) with
`coverage.span_coverage`, M times (median), next to a naive read of the same window: every router span and
every stored span of the window fetched by SQL and matched in Python per (trace id, replica). The run fails
loudly if the two counts differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from sqlalchemy import Engine, insert, select

from controlplane.coverage import DEFAULT_GRACE_S, DEFAULT_WINDOW_S, INFERENCE_PATHS, MAX_REQUEST_S, span_coverage
from controlplane.store.db import make_engine, upgrade
from controlplane.store.models import Replica, Request, RouterSpan
from controlplane.store.repo import Store

console = Console()
REPLICA = "bench-0"


def fill(store: Store, n: int, rate: float, lost_every: int) -> None:
    batch = 50_000
    for lo in range(0, n, batch):
        ks = range(lo, min(n, lo + batch))
        with store.engine.begin() as conn:
            conn.execute(insert(RouterSpan), [
                {"trace_id": f"{k:032x}", "span_id": f"{k:016x}", "parent_span_id": None, "tenant": None,
                 "replica": REPLICA, "started_unix_s": k / rate, "ended_unix_s": k / rate + 1.0, "status": 200,
                 "ok": True, "method": "POST", "path": INFERENCE_PATHS[k % 2]} for k in ks])
        store.write_spans([{"replica": REPLICA, "request_id": f"r{k}", "arrival_unix_s": k / rate,
                            "prompt_tokens": 10, "completion_tokens": 4, "trace_id": f"{k:032x}",
                            "span_id": f"{k + n:016x}"} for k in ks if k % lost_every], [])


def naive(engine: Engine, since: float, until: float) -> tuple[int, int]:
    """(served, with a stored span) by fetching both sides of the window and matching in Python."""
    rs = RouterSpan
    with engine.connect() as conn:
        served: Counter[tuple[str, str | None]] = Counter((t, r) for t, r in conn.execute(
            select(rs.trace_id, rs.replica).where(rs.ended_unix_s >= since, rs.ended_unix_s < until,
                                                  rs.status == 200, rs.ok.is_(True), rs.method == "POST",
                                                  rs.path.in_(INFERENCE_PATHS), rs.replica.is_not(None))).all())
        stored: Counter[tuple[str, str | None]] = Counter((t, r) for t, r in conn.execute(
            select(Request.trace_id, Replica.name).join(Replica, Replica.id == Request.replica_id)
            .where(Request.arrival_unix_s >= since - 2 * MAX_REQUEST_S, Request.arrival_unix_s < until)).all())
    return sum(served.values()), sum(min(n, stored[key]) for key, n in served.items())


def timed(fn, repeat: int):  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--lost-every", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.spans < 1 or args.rate <= 0 or args.lost_every < 2 or args.repeat < 1:
        sys.exit("--spans, --repeat must be >= 1, --rate > 0, --lost-every >= 2")
    with tempfile.TemporaryDirectory() as d:
        engine = make_engine(f"sqlite:///{Path(d) / 'bench.db'}")
        upgrade(engine)
        t0 = time.perf_counter()
        with console.status(f"storing {args.spans:,} router spans and their llm_request spans"):
            fill(Store(engine), args.spans, args.rate, args.lost_every)
        console.print(f"stored {args.spans:,} router spans in {time.perf_counter() - t0:.0f} s")
        until = args.spans / args.rate - DEFAULT_GRACE_S
        since = until - DEFAULT_WINDOW_S
        q_s, got = timed(lambda: span_coverage(engine, since, until), args.repeat)
        n_s, ref = timed(lambda: naive(engine, since, until), args.repeat)
        cov = got[REPLICA]
        if (cov.served, cov.with_span) != ref:
            sys.exit(f"MISMATCH: the gauge's query counted {(cov.served, cov.with_span)}, the naive read {ref}")
        console.print(f"window: {cov.served:,} served, {cov.with_span:,} with a stored span "
                      f"({cov.ratio():.2%}); counts equal to the naive read")
        console.print(f"gauge query: [bold]{q_s * 1e3:.1f} ms[/] (median of {args.repeat}); naive read (SQL fetch "
                      f"of both sides + Python match): {n_s * 1e3:.1f} ms; {n_s / q_s:.1f}x")
        engine.dispose()


if __name__ == "__main__":
    main()
