"""SLO evaluation over a month of requests: rollups + raw tail vs a naive full scan, same numbers, same run.

    .venv/bin/python bench/slo_query.py [--rows N] [--skip-pg] [--skip-sqlite] [--pg-url URL]

Generates N request rows (default 10,000,000) over the 31 days before a fixed `now`, for two deployments of
three replicas, with skewed latencies (lognormal bodies, Pareto tails) and NULL TPOTs (one-token outputs).
Rows get their ids in the order they are stored (finish + export delay), so finish times are out of id order
as in the plane; windows count a request at its finish. The rollup is built over all but the newest 2,000
rows, which are inserted after it (the evaluation reads them raw), then three 30-day SLOs are evaluated with
every burn window and p50/p90/p95/p99: a TTFT latency SLO, a goodput SLO (TTFT and TPOT) and an e2e SLO on
the other deployment. The naive reference computes the same counts with one SQL aggregate per window and the
exact quantiles from every value of the window (numpy, inverted CDF). The run fails loudly if any count
differs. SQLite uses a temporary file; PostgreSQL a fresh temporary database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, insert, make_url, text

from controlplane.slo import query, rollup
from controlplane.slo.evaluate import Counts, NoData, SloStatus
from controlplane.slo.model import Alerting, LatencyTarget, Slo, SloWindow
from controlplane.slo.monitor import rollup_keys
from controlplane.store.db import make_engine, upgrade
from controlplane.store.models import Deployment, Replica

DEFAULT_PG_URL = os.environ.get("CONTROLPLANE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
NOW = 1_717_245_296.5  # 2024-06-01T12:34:56.5Z, deliberately not aligned to a minute
SPAN_S = 31 * 86400.0
CHUNK = 200_000
HELD_BACK = 2_000  # newest rows inserted after the rollup build: the unrolled tail of a live plane
FLEET = {"chat": (1, 2, 3), "batch": (4, 5, 6)}
COLUMNS = ("id", "request_id", "replica_id", "model", "arrival_unix_s", "finish_unix_s", "queue_s", "ttft_s", "e2e_s",
           "tpot_s", "prompt_tokens", "completion_tokens", "trace_id", "span_id")
SLI_COLUMN = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s", "queue": "queue_s"}
console = Console(width=180)


def slos() -> list[Slo]:
    def slo(name: str, deployment: str, sli: str, targets: tuple[tuple[str, float], ...], objective: float) -> Slo:
        return Slo(name=name, deployment=deployment, sli=sli,  # type: ignore[arg-type]
                   targets=tuple(LatencyTarget(s, t) for s, t in targets),  # type: ignore[arg-type]
                   objective=objective, window=SloWindow("rolling", 30 * 86400.0), alerting=Alerting())

    return [slo("chat-ttft", "chat", "ttft", (("ttft", 0.5),), 0.99),
            slo("chat-goodput", "chat", "goodput", (("ttft", 0.5), ("tpot", 0.05)), 0.95),
            slo("batch-e2e", "batch", "e2e", (("e2e", 10.0),), 0.99)]


# --- data -------------------------------------------------------------------------------------------
def chunks(n: int, seed: int) -> Iterator[list[tuple[Any, ...]]]:
    """Rows in id order, CHUNK at a time, each chunk covering the next slice of the 31 days."""
    rng = np.random.default_rng(seed)
    replicas = np.array([r for rs in FLEET.values() for r in rs])
    next_id = 1
    for k in range(0, n, CHUNK):
        m = min(CHUNK, n - k)
        lo = NOW - SPAN_S + SPAN_S * k / n
        hi = NOW - SPAN_S + SPAN_S * (k + m) / n
        arrival = rng.uniform(lo, hi, m)
        ttft = rng.lognormal(np.log(0.15), 0.8, m) * np.where(rng.random(m) < 0.02, rng.pareto(1.5, m) + 1, 1)
        out_tokens = rng.geometric(1 / 150, m)
        tpot = rng.lognormal(np.log(0.025), 0.4, m)
        e2e = ttft + (out_tokens - 1) * tpot
        tpot[out_tokens <= 1] = np.nan  # no TPOT for a one-token output: unknown
        queue = np.where(rng.random(m) < 0.4, 0.0, rng.exponential(0.02, m))
        finish = arrival + e2e
        order = np.argsort(finish + rng.uniform(0, 5, m), kind="stable")  # stored after an export delay
        ids = np.arange(next_id, next_id + m)
        next_id += m
        cols = [a[order].tolist() for a in (arrival, finish, queue, ttft, e2e, tpot)]
        cols[5] = [None if x != x else x for x in cols[5]]
        rep = rng.choice(replicas, m)[order].tolist()
        prompt = rng.integers(16, 2048, m).tolist()
        toks = out_tokens[order].tolist()
        yield [(int(i), f"r{i}", rep[j], "bench", *(c[j] for c in cols),
                prompt[j], toks[j], f"{i:032x}", "0000000000000001") for j, i in enumerate(ids.tolist())]


def seed_fleet(engine: Engine) -> None:
    with engine.begin() as c:
        for d, (name, replicas) in enumerate(FLEET.items(), start=1):
            c.execute(insert(Deployment), {"id": d, "name": name, "created_unix_s": 0.0})
            for r in replicas:
                c.execute(insert(Replica), {"id": r, "deployment_id": d, "name": f"{name}-{r}", "backend": "local",
                                            "state": "ready", "config_version": 0, "created_unix_s": 0.0})


def load(engine: Engine, batch: list[tuple[Any, ...]]) -> None:
    """Bulk insert: executemany on SQLite, COPY on PostgreSQL (the fastest path of each driver)."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "sqlite":
            cur.executemany(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            batch)
        else:
            with cur.copy(f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)
        raw.commit()
    finally:
        raw.close()


# --- the naive reference --------------------------------------------------------------------------------
def _scan_counts(engine: Engine, slo: Slo, start: float, end: float) -> tuple[int, int, int]:
    """(good, known, unknown) with one SQL aggregate over the raw rows of the window (three-valued)."""
    miss = " OR ".join(f"({SLI_COLUMN[t.sli]} > {t.threshold_s!r})" for t in slo.targets)
    met = " AND ".join(f"({SLI_COLUMN[t.sli]} <= {t.threshold_s!r})" for t in slo.targets)
    sql = (f"SELECT SUM(CASE WHEN {met} THEN 1 ELSE 0 END), SUM(CASE WHEN ({met}) OR ({miss}) THEN 1 ELSE 0 END), "
           f"COUNT(*) FROM requests WHERE replica_id IN ({', '.join(map(str, FLEET[slo.deployment]))}) "
           f"AND finish_unix_s >= :start AND finish_unix_s < :end")
    with engine.connect() as c:
        good, known, rows = c.execute(text(sql), {"start": start, "end": end}).one()
    return int(good or 0), int(known or 0), int(rows) - int(known or 0)


def _scan_values(engine: Engine, slo: Slo, column: str, start: float, end: float) -> np.ndarray:
    sql = (f"SELECT {column} FROM requests WHERE replica_id IN ({', '.join(map(str, FLEET[slo.deployment]))}) "
           f"AND finish_unix_s >= :start AND finish_unix_s < :end AND {column} IS NOT NULL")
    parts = []
    with engine.connect() as c:
        result = c.execute(text(sql), {"start": start, "end": end})
        while rows := result.fetchmany(500_000):
            parts.append(np.array(rows, dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class Naive:
    counts: dict[float, tuple[int, int, int]]  # window length (SLO window: its own) -> counts
    quantiles: dict[str, dict[float, float]]


def naive(engine: Engine, slo: Slo) -> Naive:
    start = NOW - slo.window.duration_s
    counts = {slo.window.duration_s: _scan_counts(engine, slo, start, NOW)}
    for s in sorted({x for w in slo.alerting.windows for x in (w.long_s, w.short_s)}):
        counts[s] = _scan_counts(engine, slo, NOW - s, NOW)
    qs: dict[str, dict[float, float]] = {}
    for sli in dict.fromkeys(t.sli for t in slo.targets):
        values = _scan_values(engine, slo, SLI_COLUMN[sli], start, NOW)
        qs[sli] = {q: float(np.quantile(values, q, method="inverted_cdf")) for q in query.QUANTILES}
    return Naive(counts, qs)


def compare(status: SloStatus, ref: Naive) -> float:
    """Exit on any count difference; return the largest relative quantile error."""
    def tup(c: Counts) -> tuple[int, int, int]:
        return int(c.good), int(c.total), int(c.unknown)

    got = {status.slo.window.duration_s: tup(status.counts)}
    for tier in status.burn:
        for b in (tier.long, tier.short):
            got[b.window_s] = tup(b.counts)
    if got != ref.counts:
        console.print(f"[red]{status.slo.name}: counts differ[/red]\n  eval:  {got}\n  naive: {ref.counts}")
        sys.exit(1)
    worst = 0.0
    for q in status.quantiles:
        for level, value in q.values:
            exact = ref.quantiles[q.sli][level]
            assert not isinstance(value, NoData)
            worst = max(worst, abs(value - exact) / exact)
    return worst


# --- one store --------------------------------------------------------------------------------------------
@dataclass
class Result:
    store: str
    rows: int
    generate_s: float
    rollup_s: float
    eval_s: float
    eval_cold_s: float
    eval_cpu_s: float  # this process only (the database server's share is not in it)
    naive_s: float
    max_q_err: float
    rollup_rows: int


def bench_store(name: str, engine: Engine, n: int, seed: int) -> Result:
    upgrade(engine)
    seed_fleet(engine)
    console.print(f"[bold]{name}[/bold]: generating {n:,} rows ...")
    t = time.perf_counter()
    held: list[tuple[Any, ...]] = []
    for batch in chunks(n, seed):
        if batch[-1][0] > n - HELD_BACK:
            keep = [r for r in batch if r[0] <= n - HELD_BACK]
            held += [r for r in batch if r[0] > n - HELD_BACK]
            batch = keep
        if batch:
            load(engine, batch)
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            c.execute(text("ANALYZE requests"))  # what autovacuum would have done on a live store
            c.commit()
    generate_s = time.perf_counter() - t
    console.print(f"  generated in {generate_s:.1f} s; building the rollup ...")
    keys = rollup_keys(slos())
    t = time.perf_counter()
    report = rollup.run(engine, keys, NOW, batch_rows=100_000)
    rollup_s = time.perf_counter() - t
    load(engine, held)
    with engine.connect() as c:
        rollup_rows = sum(int(c.execute(text(f"SELECT COUNT(*) FROM {tb}")).scalar_one())
                          for tb in ("slo_rollup_counts", "slo_rollup_sketches"))
    console.print(f"  rollup over {report.rows:,} rows in {rollup_s:.1f} s ({rollup_rows:,} rollup rows); "
                  f"{len(held):,} newer rows left raw; evaluating ...")
    timings, cpu = [], []
    statuses: list[SloStatus] = []
    for _ in range(5):
        t, t_cpu = time.perf_counter(), time.process_time()
        statuses = [query.evaluate(engine, s, NOW) for s in slos()]
        timings.append(time.perf_counter() - t)
        cpu.append(time.process_time() - t_cpu)
    console.print(f"  evaluation (3 SLOs): {', '.join(f'{x * 1000:.0f} ms' for x in timings)} wall, "
                  f"{', '.join(f'{x * 1000:.0f} ms' for x in cpu)} CPU of this process; "
                  f"load average {os.getloadavg()[0]:.1f}; naive scan ...")
    t = time.perf_counter()
    refs = [naive(engine, s) for s in slos()]
    naive_s = time.perf_counter() - t
    worst = max(compare(st, ref) for st, ref in zip(statuses, refs, strict=True))
    return Result(name, n, generate_s, rollup_s, statistics.median(timings), timings[0], statistics.median(cpu),
                  naive_s, worst, rollup_rows)


def sqlite_phase(n: int, seed: int) -> Result:
    tmp = tempfile.mkdtemp(prefix="slo-bench-")
    engine = make_engine(f"sqlite:///{tmp}/store.db")
    try:
        return bench_store("SQLite", engine, n, seed)
    finally:
        engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)


def pg_phase(n: int, seed: int, url: str) -> Result:
    admin_url = make_url(url).set(drivername="postgresql")
    admin_dsn = admin_url.render_as_string(hide_password=False)
    db = f"cp_slo_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    engine = make_engine(admin_url.set(database=db).render_as_string(hide_password=False))
    try:
        return bench_store("PostgreSQL", engine, n, seed)
    finally:
        engine.dispose()
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def report(results: list[Result]) -> None:
    table = Table(title="30-day evaluation of 3 SLOs (all burn windows, p50/p90/p95/p99) vs a naive full scan")
    for col in ("store", "rows", "generate s", "rollup build s", "rollup rows", "eval s (median of 5)",
                "eval s (first)", "eval CPU s", "naive s", "speed-up", "max quantile rel. error", "counts"):
        table.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        table.add_row(r.store, f"{r.rows:,}", f"{r.generate_s:.1f}", f"{r.rollup_s:.1f}", f"{r.rollup_rows:,}",
                      f"{r.eval_s:.3f}", f"{r.eval_cold_s:.3f}", f"{r.eval_cpu_s:.3f}", f"{r.naive_s:.1f}",
                      f"{r.naive_s / r.eval_s:,.0f}x",
                      f"{r.max_q_err:.3%}", "equal")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="request rows per store (default 10000000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"PostgreSQL server (default {DEFAULT_PG_URL})")
    ap.add_argument("--skip-pg", action="store_true", help="SQLite only")
    ap.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    args = ap.parse_args()
    if args.rows <= HELD_BACK:
        ap.error(f"--rows must be more than {HELD_BACK} (the newest {HELD_BACK} are inserted after the rollup)")
    results = []
    if not args.skip_sqlite:
        results.append(sqlite_phase(args.rows, args.seed))
    if not args.skip_pg:
        results.append(pg_phase(args.rows, args.seed, args.pg_url))
    report(results)
    console.print(f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f} (wall times include "
                  "waiting for a CPU; the CPU column does not). Quantile error: against numpy's inverted-CDF "
                  "quantiles of every value in the window.")


if __name__ == "__main__":
    main()
