"""OTLP ingest throughput: vLLM `llm_request` spans over OTLP/HTTP into the store, vs a raw executemany.

    .venv/bin/python bench/ingest.py [--spans N] [--pg-spans N] [--batch B] [--pg-url URL] [--skip-pg]

The OTLP/HTTP receiver (uvicorn + Starlette + Ingestor + Store, as in the plane) runs in its own process
pinned to one core; the httpx client (standing in for the exporters) is pinned to another core, and the
raw executemany reference runs pinned to the receiver's core: both figures are "on one core". Payloads
are built before the clock starts. Peak RSS is the receiver process's own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, make_url

from collectors.otlp.decode import decode_request
from collectors.otlp.receiver import Ingestor, http_app
from controlplane import names
from controlplane.store.db import make_engine, upgrade
from controlplane.store.models import Request
from controlplane.store.repo import Store

REPLICA = "bench-0"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MAX_BODY_BYTES = 16 * 1024 * 1024  # the plane's default otlp_max_body_bytes
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# vLLM sets these on llm_request too; the store does not keep them, so names.py does not own them.
ATTR_TEMPERATURE, ATTR_TOP_P = "gen_ai.request.temperature", "gen_ai.request.top_p"
ATTR_N = "gen_ai.request.n"
TARGET_SPANS_S, TARGET_RATIO = 20_000.0, 0.5
console = Console(width=120)


@dataclass
class Result:
    database: str
    path: str
    spans: int
    seconds: float
    rss_mib: float
    raw_rate: float | None = None

    @property
    def rate(self) -> float:
        return self.spans / self.seconds


def peak_rss_mib() -> float:
    """Peak RSS of this address space. Not ru_maxrss: Linux carries that across fork + exec, so a
    spawned receiver would report its parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _kv(key: str, value: str | int | float) -> KeyValue:
    kind = {str: "string_value", int: "int_value", float: "double_value"}[type(value)]
    field: dict[str, Any] = {kind: value}
    return KeyValue(key=key, value=AnyValue(**field))


def _span(rng: random.Random, arrival_ns: int) -> Span:
    queue, prefill = rng.expovariate(1 / 0.05), rng.uniform(0.01, 0.4)
    prompt, max_tokens = rng.randint(16, 4096), rng.choice((128, 256, 512, 1024))
    completion = rng.randint(1, max_tokens)
    decode = completion * rng.uniform(0.008, 0.03)
    ttft = queue + prefill + rng.uniform(0.001, 0.01)
    e2e = ttft + decode + rng.uniform(0.001, 0.02)
    attrs: list[tuple[str, str | int | float]] = [
        (names.ATTR_RESPONSE_MODEL, MODEL), (names.ATTR_REQUEST_ID, f"chatcmpl-{uuid.uuid4().hex}"),
        (ATTR_TEMPERATURE, rng.choice((0.0, 0.7, 1.0))), (ATTR_TOP_P, rng.choice((0.9, 0.95, 1.0))),
        (names.ATTR_MAX_TOKENS, max_tokens), (ATTR_N, 1),
        (names.ATTR_PROMPT_TOKENS, prompt), (names.ATTR_COMPLETION_TOKENS, completion),
        (names.ATTR_QUEUE, queue), (names.ATTR_TTFT, ttft), (names.ATTR_E2E, e2e),
        (names.ATTR_PREFILL, prefill), (names.ATTR_DECODE, decode), (names.ATTR_INFERENCE, prefill + decode),
    ]
    return Span(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name=names.SPAN_LLM_REQUEST,
                kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=arrival_ns,
                end_time_unix_nano=arrival_ns + int(e2e * 1e9), attributes=[_kv(k, v) for k, v in attrs])


def build(n: int, batch: int, replica_id: int) -> tuple[list[bytes], list[list[dict[str, Any]]]]:
    """OTLP payloads, and the dict rows Store.write_spans would insert for them (replica id resolved).

    Requests arrive at 200/s; as the OTel SDK's BatchSpanProcessor exports them, a batch is in end-time order.
    """
    rng, t0_ns = random.Random(n), time.time_ns() - n * 5_000_000 - 60 * 10**9
    payloads, rows = [], []
    for lo in range(0, n, batch):
        msg = ExportTraceServiceRequest()
        rs = msg.resource_spans.add()
        rs.resource.attributes.extend([_kv(names.RES_REPLICA, REPLICA), _kv(names.RES_SERVICE_NAME, "vllm")])
        ss = rs.scope_spans.add()
        ss.scope.name = "vllm.llm_engine"
        spans = [_span(rng, t0_ns + i * 5_000_000) for i in range(lo, min(lo + batch, n))]
        ss.spans.extend(sorted(spans, key=lambda sp: sp.end_time_unix_nano))
        payloads.append(msg.SerializeToString())
        rows.append([{**{k: v for k, v in r.items() if k != "replica"}, "replica_id": replica_id}
                     for r in decode_request(msg).requests])
    return payloads, rows


_CORES = sorted(os.sched_getaffinity(0))
# With two or more cores the receiver (and the raw reference) get one, the client another.
SERVER_CORE: int | None = _CORES[0] if len(_CORES) >= 2 else None
CLIENT_CORE: int | None = _CORES[1] if len(_CORES) >= 2 else None


def _serve(url: str, port: int, core: int | None, stop: Any, rss: Any) -> None:
    """The receiver process: the plane's OTLP/HTTP app on one core until `stop` is set."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    engine = make_engine(url)
    server = uvicorn.Server(uvicorn.Config(http_app(Ingestor(Store(engine)), MAX_BODY_BYTES), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False, lifespan="off"))
    threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
    server.run()
    rss.put(peak_rss_mib())


def run_otlp(url: str, payloads: list[bytes], n: int) -> tuple[float, float]:
    """Returns (seconds, peak RSS MiB of the receiver process)."""
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: its RSS is the receiver's alone
    stop, rss = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_serve, args=(url, port, SERVER_CORE, stop, rss), daemon=True)
    proc.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/v1/traces")
                    break
                except httpx.TransportError:
                    if not proc.is_alive() or time.monotonic() > deadline:
                        sys.exit("OTLP receiver failed to start")
                    time.sleep(0.05)
            headers = {"Content-Type": "application/x-protobuf"}
            t0 = time.perf_counter()
            for i, body in enumerate(payloads):
                resp = client.post("/v1/traces", content=body, headers=headers)
                if resp.status_code != 200:
                    sys.exit(f"batch {i}: HTTP {resp.status_code}: {resp.text[:300]}")
            elapsed = time.perf_counter() - t0
        stop.set()
        peak = float(rss.get(timeout=30))
    finally:
        stop.set()
        proc.join(10)
    engine = make_engine(url)
    check_count("OTLP", Store(engine).count(Request), n)
    engine.dispose()
    return elapsed, peak


def check_count(what: str, got: int, want: int) -> None:
    if got != want:
        console.print(f"[bold red]FAIL[/]: {what}: requests table holds {got} rows, expected {want}")
        sys.exit(1)


def run_raw(engine: Engine, rows: list[list[dict[str, Any]]], n: int) -> float:
    """executemany on the driver's own connection (sqlite3 / psycopg), with make_engine's pragmas."""
    cols, ph = list(rows[0][0]), ":{}" if engine.dialect.name == "sqlite" else "%({})s"
    sql = (f"INSERT INTO {names.T_REQUESTS} ({', '.join(cols)}) VALUES "
           f"({', '.join(ph.format(c) for c in cols)}) ON CONFLICT DO NOTHING")
    pooled = engine.raw_connection()
    if SERVER_CORE is not None:
        os.sched_setaffinity(0, {SERVER_CORE})
    try:
        conn: Any = pooled.driver_connection
        cur = conn.cursor()
        t0 = time.perf_counter()
        for chunk in rows:
            cur.executemany(sql, chunk)
            conn.commit()
        elapsed = time.perf_counter() - t0
        if CLIENT_CORE is not None:
            os.sched_setaffinity(0, {CLIENT_CORE})
        cur.execute(f"SELECT count(*) FROM {names.T_REQUESTS}")
        check_count("raw", int(cur.fetchone()[0]), n)
    finally:
        pooled.close()
    return elapsed


def phase(db: str, n: int, batch: int, otlp_url: str, raw_url: str) -> list[Result]:
    otlp_engine, raw_engine = make_engine(otlp_url), make_engine(raw_url)
    try:
        console.print(f"[{db}] building {n:,} spans in batches of {batch} ...")
        upgrade(raw_engine)
        payloads, rows = build(n, batch, Store(raw_engine).register_replica(REPLICA, url=None,
                                                                            backend="external"))
        mib = sum(map(len, payloads)) / 2**20
        console.print(f"[{db}] {len(payloads)} payloads, {mib:.1f} MiB protobuf; raw executemany ...")
        raw = Result(db, "raw executemany", n, run_raw(raw_engine, rows, n), peak_rss_mib())
        del rows
        console.print(f"[{db}] raw {raw.rate:,.0f} spans/s; OTLP/HTTP ...")
        upgrade(otlp_engine)
        seconds, receiver_rss = run_otlp(otlp_url, payloads, n)
        otlp = Result(db, "OTLP/HTTP -> Store", n, seconds, receiver_rss, raw.rate)
        console.print(f"[{db}] OTLP {otlp.rate:,.0f} spans/s")
        return [raw, otlp]
    finally:
        otlp_engine.dispose()
        raw_engine.dispose()


def pg_phase(n: int, batch: int, url: str) -> list[Result]:
    base = make_url(url)
    admin_dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    dbs = [f"cp_bench_{os.getpid()}", f"cp_bench_{os.getpid()}_raw"]
    try:
        admin = psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise ConnectionError(f"cannot connect to {base.render_as_string()}: {str(exc).strip()}") from exc
    try:
        for db in dbs:
            admin.execute(f'CREATE DATABASE "{db}"')
        otlp_url, raw_url = (base.set(drivername="postgresql+psycopg", database=db)
                             .render_as_string(hide_password=False) for db in dbs)
        return phase("PostgreSQL", n, batch, otlp_url, raw_url)
    finally:
        for db in dbs:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def report(results: list[Result]) -> None:
    table = Table(title="OTLP ingest, receiver and raw reference each on one core")
    for col in ("database", "path", "spans", "seconds", "spans/s", "ratio vs raw", "peak RSS MiB"):
        table.add_column(col, justify="left" if col in ("database", "path") else "right")
    for r in results:
        rel = f"{r.rate / r.raw_rate:.2f}" if r.raw_rate else "1.00"
        table.add_row(r.database, r.path, f"{r.spans:,}", f"{r.seconds:.2f}", f"{r.rate:,.0f}", rel,
                      f"{r.rss_mib:.0f}")
    console.print(table)
    console.print("Peak RSS: the receiver process for OTLP rows; the benchmark process (holding every prebuilt "
                  "payload and row) for raw rows.")
    sq = next((r for r in results if r.database == "SQLite" and r.raw_rate), None)
    if sq is None or sq.raw_rate is None:
        return
    ratio = sq.rate / sq.raw_rate
    rate_ok, ratio_ok = sq.rate >= TARGET_SPANS_S, ratio >= TARGET_RATIO
    console.print(
        f"Targets (SQLite, OTLP/HTTP): >= {TARGET_SPANS_S:,.0f} spans/s: {sq.rate:,.0f} "
        f"{'PASS' if rate_ok else 'MISS'}; >= {TARGET_RATIO} of raw insert rate: {ratio:.2f} "
        f"{'PASS' if ratio_ok else 'MISS'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=100_000, help="spans for SQLite (default 100000)")
    ap.add_argument("--pg-spans", type=int, default=None, help="spans for PostgreSQL (default min(N, 30000))")
    ap.add_argument("--batch", type=int, default=512, help="spans per OTLP request / raw executemany")
    ap.add_argument("--pg-url", default=None, help=f"PostgreSQL server URL (default {DEFAULT_PG_URL})")
    ap.add_argument("--skip-pg", action="store_true", help="SQLite only")
    args = ap.parse_args()
    if CLIENT_CORE is not None:
        os.sched_setaffinity(0, {CLIENT_CORE})
    pg_spans = args.pg_spans if args.pg_spans is not None else min(args.spans, 30_000)
    if args.spans < 1 or pg_spans < 1 or args.batch < 1:
        ap.error("--spans, --pg-spans and --batch must be positive")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        results += phase("SQLite", args.spans, args.batch, f"sqlite:///{tmp}/otlp.db", f"sqlite:///{tmp}/raw.db")
    pg_error = None
    if not args.skip_pg:
        try:
            results += pg_phase(pg_spans, args.batch, args.pg_url or DEFAULT_PG_URL)
        except ConnectionError as exc:
            pg_error = f"PostgreSQL skipped: {exc}"
            console.print(f"[yellow]{pg_error}[/]")
    report(results)
    if pg_error and args.pg_url is not None:
        sys.exit(pg_error)  # an explicit --pg-url must work


if __name__ == "__main__":
    main()
