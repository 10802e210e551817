"""The plane's cost to real vLLM throughput: traced and scraped every 1 s vs neither, measured in the same run.

    .venv/bin/python bench/overhead.py [--blocks 6] [--requests 400] [--concurrency 48] [--quick] [--json OUT]
        [--instrument both|trace|scrape] [--model tiny|small] [--api-core 0]

Two vLLM servers (CPU; the tiny model by default, or `--model small`) with the same configuration run pinned to
the same core: "with" exports its
`llm_request` spans over OTLP/gRPC to a running plane (`controlplane up`, SQLite in a temp dir) that also scrapes
its /metrics every second (`--watch`); "without" has no tracing and nobody scrapes it. They are never loaded at
the same time: blocks alternate with / without / without / with / with / without ... (ABBA), so drift on this
shared machine hits both alike. A block is a closed loop of a fixed number of streamed requests (token-id prompts,
`ignore_eos`) with more in flight than the engine batches, so the engine never idles; the two blocks of a pair
send the same requests, and every pair different ones (no prefix-cache reuse across blocks). Throughput is the
client's usage counts of output tokens (and requests) over the block's wall time, first send to last byte.

The plane and this client run on the other core, so the figure is the instrumentation's cost inside vLLM
(span creation and export, serving /metrics), not the plane's own CPU. While the "without" server is loaded the
plane is paused (SIGSTOP; every span of the last "with" block is in its store first), so its scrapes of the idle
traced server do not steal the shared core from the reference. A tiny model makes vLLM's API server (where spans
are made and /metrics is served) a larger share of each token's cost than a real model would, so a loss measured
here likely overstates the loss on a real model.
The loss is the median over pairs of 1 - with/without, with a percentile-bootstrap interval over the pairs.

`--api-core N` moves each server's API server (where spans are made and /metrics is served) to core N once it is
ready (the client and the plane go to a third core where there is one, else share N), leaving the engine core
alone on vLLM's core: the shape of a GPU host,
where the API server runs on CPU cores of its own and the engine's compute is elsewhere. The instrumentation's
CPU then slows the engine only if it delays the API server's feeding of the engine. On two cores the plane's own
CPU (paused in the reference blocks) shares the API servers' core, so it counts against the traced server.

Attribution: `--instrument trace` keeps only the tracing (the plane receives spans but scrapes nothing) and
`--instrument scrape` only the scraping (no OTLP exporter in vLLM). Each block also reads the CPU seconds the
server's processes (API server and engine core) used, so the extra CPU per request of the instrumented server
is printed next to the throughput loss: it is what the instrumentation costs inside vLLM, and is less exposed
to the host's noise than a wall-clock rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
from rich.console import Console
from rich.table import Table
from sqlalchemy import Select, func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu import CoreWatch, move_api_server  # noqa: E402
from controlplane.demo_loop import PlaneProcess  # noqa: E402
from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model  # noqa: E402
from controlplane.engines.vllm_server import VllmServer, VllmServerSpec  # noqa: E402
from controlplane.loadgen import ClientResult, RequestPlan, mixed_plans, run_load  # noqa: E402
from controlplane.store.db import make_engine  # noqa: E402
from controlplane.store.models import EngineSample, Request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# --model: the tests' tiny model (2 layers, hidden 256: about 14 ms of server CPU per request, most of it the API
# server's), or a small one with random weights (6 layers, hidden 768, 12 heads, GQA 4 KV heads: ~41M parameters,
# GPT-2-small's shape with a smaller vocabulary), where the engine's work per token is a larger share of a request,
# as it is on a real model. Both are built locally; nothing is downloaded.
MODELS = {"tiny": ("tiny-model", TinyModelSpec()),
          "small": ("small-model", TinyModelSpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                                                 num_attention_heads=12, num_key_value_heads=4))}
TARGET_LOSS = 0.02
Arm = Literal["with", "without"]
Instrument = Literal["both", "trace", "scrape"]
WITH: Arm = "with"
WITHOUT: Arm = "without"
VLLM_PATTERN = "vllm.entrypoints.openai.api_server"
PROMPT_TOKENS, OUTPUT_TOKENS = (16, 256), (16, 128)
progress = Console(stderr=True, width=120)
console = Console(width=120)


# --- pure parts -------------------------------------------------------------------------------------------------

def block_order(pairs: int) -> list[tuple[int, Arm]]:
    """(pair, arm) in ABBA order: with, without | without, with | with, without ... Each pair's two blocks are
    adjacent (the paired ratio sees little drift), and each arm goes first in every other pair (what drift is
    left favours neither)."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    order: list[tuple[int, Arm]] = []
    for i in range(pairs):
        first, second = (WITH, WITHOUT) if i % 2 == 0 else (WITHOUT, WITH)
        order += [(i, first), (i, second)]
    return order


@dataclass(frozen=True)
class BlockFigures:
    requests: int
    output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s


def block_figures(results: Sequence[ClientResult]) -> BlockFigures:
    """Output tokens and requests over the wall time from the first send to the last completion.
    Raises ValueError when a request failed: a block with errors measures the errors, not the engine."""
    if not results:
        raise ValueError("a block needs at least one request")
    failed = [r for r in results if not r.ok or r.e2e_s is None]
    if failed:
        raise ValueError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0].error}")
    start = min(r.sent_unix_s for r in results)
    end = max(r.sent_unix_s + (r.e2e_s or 0.0) for r in results)
    if end <= start:
        raise ValueError(f"a block's wall time must be positive, got {end - start:.6f} s")
    return BlockFigures(len(results), sum(r.completion_tokens for r in results), end - start)


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    min: float
    max: float

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: how far apart the blocks of one arm were."""
        return (self.max - self.min) / self.median if self.median else float("inf")


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values is undefined")
    return Spread(len(values), statistics.median(values), min(values), max(values))


def paired_losses(with_: Sequence[float], without: Sequence[float]) -> list[float]:
    """1 - with/without for each pair (positive: the instrumented server was slower)."""
    if len(with_) != len(without) or not with_:
        raise ValueError(f"need the same, non-zero number of blocks per arm; got {len(with_)} and {len(without)}")
    if any(b <= 0 for b in without):
        raise ValueError("a reference block with no throughput cannot be compared against")
    return [1.0 - a / b for a, b in zip(with_, without, strict=True)]


def bootstrap_median(values: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median. By hand (a dozen lines) rather than scipy.stats.bootstrap:
    scipy is not a dependency of the project, and its BCa default degenerates on the handful of pairs here."""
    if not values:
        raise ValueError("bootstrap of no values is undefined")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    lo_i = int(tail * (resamples - 1))
    hi_i = int(round((1 - tail) * (resamples - 1)))
    return meds[lo_i], meds[hi_i]


@dataclass(frozen=True)
class Loss:
    point: float  # median over pairs of 1 - with/without
    lo: float  # bootstrap interval of that median
    hi: float
    min: float  # the best and worst single pair
    max: float
    pairs: int


def loss(with_: Sequence[float], without: Sequence[float], level: float = 0.95) -> Loss:
    per_pair = paired_losses(with_, without)
    lo, hi = bootstrap_median(per_pair, level)
    return Loss(statistics.median(per_pair), lo, hi, min(per_pair), max(per_pair), len(per_pair))


def verdict(x: Loss, target: float = TARGET_LOSS) -> Literal["met", "not met", "inconclusive"]:
    """Met when the whole interval is within the target, not met when the whole interval is past it."""
    if x.hi <= target:
        return "met"
    if x.lo > target:
        return "not met"
    return "inconclusive"


# --- side effects -----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _other_vllm(mine: set[int]) -> int:
    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if VLLM_PATTERN in cmd and p.info["pid"] not in mine:
            n += 1
    return n


def wait_for_no_vllm(limit_s: float, poll_s: float = 30.0) -> None:
    """Start only when no other vLLM server runs on this shared host (CPU etiquette, and less noise)."""
    deadline = time.monotonic() + limit_s
    while (n := _other_vllm(set())) > 0:
        if time.monotonic() > deadline:
            sys.exit(f"another vLLM server still runs after {limit_s:.0f} s ({n}); giving up (see --wait-s)")
        progress.print(f"[yellow]{n} other vLLM API server(s) running; waiting {poll_s:.0f} s[/]")
        time.sleep(poll_s)


class Plane:
    """`controlplane up` watching the traced server; its store is read back to prove the instrumentation ran."""

    def __init__(self, data_dir: Path, scrape_s: float) -> None:
        self.data_dir, self.scrape_s = data_dir, scrape_s
        self.api_url = f"http://127.0.0.1:{_free_port()}"
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.proc: PlaneProcess | None = None
        self.db = make_engine(f"sqlite:///{(data_dir / 'controlplane.db').resolve()}")
        self.paused = False

    @property
    def log_path(self) -> Path:
        return self.data_dir / "plane.log"

    def start(self, watch: tuple[str, str] | None) -> None:
        env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(self.data_dir), "CONTROLPLANE_BIND_HOST": "127.0.0.1",
               "CONTROLPLANE_API_PORT": self.api_url.rsplit(":", 1)[1],
               "CONTROLPLANE_OTLP_HTTP_PORT": str(self.http_port), "CONTROLPLANE_OTLP_GRPC_PORT": str(self.grpc_port),
               "CONTROLPLANE_SCRAPE_INTERVAL_S": f"{self.scrape_s:g}"}
        exe = str(Path(sys.executable).parent / "controlplane")
        # No deployments: nothing is supervised, so there is no router and its URL is never used.
        argv = [exe, "up"] + (["--watch", f"{watch[0]}={watch[1]}"] if watch is not None else [])
        self.proc = PlaneProcess(argv, env, self.log_path, self.api_url, "")
        self.proc.start()

    def pause(self, paused: bool) -> None:
        if self.proc is not None and self.proc.proc is not None and paused != self.paused:
            os.kill(self.proc.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)
            self.paused = paused

    def _count(self, q: Select[Any]) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def spans(self, trace_ids: Sequence[str] | None = None) -> int:
        q = select(func.count()).select_from(Request)
        return self._count(q if trace_ids is None else q.where(Request.trace_id.in_(list(trace_ids))))

    def scrapes(self) -> int:
        return self._count(select(func.count()).select_from(EngineSample).where(EngineSample.scrape_ok.is_(True)))

    def wait_spans(self, trace_ids: Sequence[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (got := self.spans(trace_ids)) < len(trace_ids):
            if time.monotonic() > deadline:
                sys.exit(f"the plane stored {got} of {len(trace_ids)} spans of a traced block in {timeout_s:.0f} s; "
                         f"see {self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.pause(False)  # a stopped process cannot act on SIGTERM
        if self.proc is not None:
            self.proc.stop()
        self.db.dispose()


@dataclass(frozen=True)
class Block:
    index: int
    pair: int
    arm: Arm
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    others_cpu: float | None  # CPU share on the vLLM core taken by other processes during the block
    other_vllm: int  # other vLLM API servers running on the host when the block started
    server_cpu_s: float | None  # CPU seconds of the server's processes (API server + engine core) in the block
    engine_cpu_s: float | None = None  # of which the engine core's (the API server's is the rest)


@dataclass(frozen=True)
class MetricSummary:
    with_plane: Spread
    without_plane: Spread
    loss: Loss
    verdict: str


def plans_for(pair: int, n: int) -> list[RequestPlan]:
    return mixed_plans(n, seed=1000 + pair, prompt_words=PROMPT_TOKENS, max_tokens=OUTPUT_TOKENS,
                       token_ids=(10, 2000))


def drive(server: VllmServer, plans: list[RequestPlan], concurrency: int) -> tuple[list[ClientResult], BlockFigures]:
    results = asyncio.run(run_load(server.spec.base_url, server.spec.served_name, plans, concurrency=concurrency))
    try:
        return results, block_figures(results)
    except ValueError as exc:
        sys.exit(f"{server.spec.replica_name}: {exc}; last lines of {server.log_path}:\n{server.tail()}")


def start_server(name: str, model_dir: Path, core: int | None, log_dir: Path, max_num_seqs: int,
                 otlp: str | None, protocol: str = "grpc", api_core: int | None = None) -> VllmServer:
    spec = VllmServerSpec(model_dir=model_dir, port=_free_port(), replica_name=name, otlp_endpoint=otlp,
                          otlp_protocol=protocol, max_num_seqs=max_num_seqs,
                          cpu_cores=(core,) if core is not None else ())
    server = VllmServer(spec, log_dir / f"vllm-{name}.log")
    progress.print(f"{name}: starting vLLM on core {core if core is not None else 'any'}"
                   f"{' with tracing to the plane' if otlp else ' (no tracing)'} ...")
    server.start()
    try:
        waited = server.wait_ready(timeout_s=600)
        if api_core is not None and server.pid is not None:
            move_api_server(server.pid, {api_core})
    except BaseException:
        server.stop()  # in its own session, it would outlive this bench; the caller holds no handle on it yet
        raise
    progress.print(f"{name}: ready in {waited:.0f} s at {spec.base_url}"
                   + (f" (API server moved to core {api_core})" if api_core is not None else ""))
    return server


def run(args: argparse.Namespace, log_dir: Path) -> tuple[list[Block], dict[str, int]]:
    cores = sorted(os.sched_getaffinity(0))
    vllm_core = args.vllm_core if args.vllm_core is not None else (cores[-1] if len(cores) >= 2 else None)
    # client and plane: the other cores; with --api-core, the cores neither vLLM process has where there are any
    client_cores = {c for c in cores if c not in (vllm_core, args.api_core)} or {c for c in cores if c != vllm_core}
    os.sched_setaffinity(0, client_cores or set(cores))
    wait_for_no_vllm(args.wait_s)
    folder, recipe = MODELS[args.model]
    model_dir, _ = make_tiny_model(REPO / ".cache" / folder, recipe, progress=progress.print)
    plane = Plane(log_dir / "plane", args.scrape_s)
    servers: dict[Arm, VllmServer] = {}
    traced, scraped = args.instrument in ("both", "trace"), args.instrument in ("both", "scrape")
    try:
        endpoint = (f"127.0.0.1:{plane.grpc_port}" if args.otlp_protocol == "grpc"
                    else f"http://127.0.0.1:{plane.http_port}/v1/traces")
        servers[WITH] = start_server("traced", model_dir, vllm_core, log_dir, args.max_num_seqs,
                                     endpoint if traced else None, args.otlp_protocol, args.api_core)
        progress.print("plane: starting controlplane up"
                       + (f", scraping the instrumented server every {args.scrape_s:g} s" if scraped else
                          " (receiving spans, scraping nothing)") + " ...")
        plane.start(("traced", servers[WITH].spec.base_url) if scraped else None)
        progress.print(f"plane: up at {plane.api_url} (log {plane.log_path})")
        servers[WITHOUT] = start_server("reference", model_dir, vllm_core, log_dir, args.max_num_seqs, None,
                                        api_core=args.api_core)
        progress.print(f"warm-up: {args.warmup} unmeasured requests on each server ...")
        for arm in (WITH, WITHOUT):
            plane.pause(arm == WITHOUT)
            results, _ = drive(servers[arm], plans_for(-1, args.warmup), args.concurrency)
            if arm == WITH and traced:  # every span in the store before the plane is paused, here and after each
                plane.wait_spans([r.trace_id for r in results])  # block
        blocks: list[Block] = []
        order = block_order(args.blocks)
        mine = {p.pid for p in psutil.Process().children(recursive=True)}
        for k, (pair, arm) in enumerate(order):
            server = servers[arm]
            plane.pause(arm == WITHOUT)
            if arm == WITH and scraped:
                time.sleep(1.5 * args.scrape_s)  # the scraper back in its rhythm before the clock starts
            others_vllm = _other_vllm(mine)
            watch = CoreWatch(vllm_core, server.pid)  # the server's CPU, API server included, wherever it runs
            engine_watch = CoreWatch(vllm_core, server.pid, children_only=True)  # the engine core's alone
            watch.start()
            engine_watch.start()
            results, fig = drive(server, plans_for(pair, args.requests), args.concurrency)
            secs, engine_secs = watch.seconds(), engine_watch.seconds()
            # what else ran on vLLM's core: with the API server moved away, only the engine core is vLLM's there
            on_core = secs if args.api_core is None else engine_secs
            others = None if on_core is None else on_core[1] / on_core[2]
            if arm == WITH and traced:
                plane.wait_spans([r.trace_id for r in results])
            blocks.append(Block(k, pair, arm, fig.requests, fig.output_tokens, fig.wall_s, fig.tokens_per_s,
                                fig.requests_per_s, others, others_vllm, None if secs is None else secs[0],
                                None if engine_secs is None else engine_secs[0]))
            progress.print(f"block {k + 1}/{len(order)} ({arm:>7}, pair {pair + 1}): {fig.tokens_per_s:7.1f} "
                           f"output tok/s, {fig.requests_per_s:5.2f} req/s in {fig.wall_s:5.1f} s"
                           + ("" if others is None else f"; others on the vLLM core {others:.0%}")
                           + (f" [yellow]({others_vllm} other vLLM server(s) on the host)[/]" if others_vllm else ""))
        plane.pause(False)
        return blocks, {"spans_stored": plane.spans(), "scrapes_ok": plane.scrapes()}
    finally:
        plane.stop()  # first: it would log its failed scrapes of a stopped server
        for s in servers.values():
            s.stop()


def _arm(blocks: Sequence[Block], arm: Arm) -> list[Block]:
    return sorted((b for b in blocks if b.arm == arm), key=lambda b: b.pair)


def summarise(blocks: Sequence[Block]) -> dict[str, MetricSummary]:
    out = {}
    for metric, w, wo in (
        ("tokens_per_s", [b.tokens_per_s for b in _arm(blocks, WITH)], [b.tokens_per_s for b in _arm(blocks, WITHOUT)]),
        ("requests_per_s", [b.requests_per_s for b in _arm(blocks, WITH)],
         [b.requests_per_s for b in _arm(blocks, WITHOUT)]),
    ):
        x = loss(w, wo)
        out[metric] = MetricSummary(spread(w), spread(wo), x, verdict(x))
    # Requests per CPU second of the server's processes: the throughput the server would have if CPU were all it
    # waited for, so its loss is the instrumentation's own cost, with less of the host's noise in it.
    if all(b.server_cpu_s for b in blocks):
        w = [b.requests / (b.server_cpu_s or 1.0) for b in _arm(blocks, WITH)]
        wo = [b.requests / (b.server_cpu_s or 1.0) for b in _arm(blocks, WITHOUT)]
        x = loss(w, wo)
        out["requests_per_cpu_s"] = MetricSummary(spread(w), spread(wo), x, verdict(x))
    return out


def _loss_line(what: str, s: MetricSummary) -> str:
    x = s.loss
    colour = {"met": "green", "not met": "red"}.get(s.verdict, "yellow")
    return (f"{what} loss {x.point:+.2%}, 95% bootstrap interval {x.lo:+.2%} .. {x.hi:+.2%} "
            f"(median of {x.pairs} pairs; single pairs {x.min:+.2%} .. {x.max:+.2%}); "
            f"target <= {TARGET_LOSS:.0%}: [{colour}]{s.verdict}[/]")


def _api_share(blocks: Sequence[Block]) -> str:
    """'; API server x / y ms of it (with / without)': where a request's server CPU goes."""
    per_arm = []
    for arm in (WITH, WITHOUT):
        api = [((b.server_cpu_s or 0.0) - b.engine_cpu_s) / b.requests for b in _arm(blocks, arm)
               if b.server_cpu_s is not None and b.engine_cpu_s is not None]
        if not api:
            return ""
        per_arm.append(f"{1e3 * statistics.median(api):.2f}")
    return f"; the API server's part: {per_arm[0]} / {per_arm[1]} ms"


def report(blocks: list[Block], evidence: dict[str, int], args: argparse.Namespace) -> dict[str, MetricSummary]:
    summary = summarise(blocks)
    what = {"both": "traced + scraped", "trace": "traced only", "scrape": "scraped only"}[args.instrument]
    table = Table(title=f"vLLM throughput with and without the plane ({what}): {args.blocks} blocks each of "
                        f"{args.requests} requests, {args.concurrency} in flight ({args.model} model, CPU, "
                        + ("one core)" if args.api_core is None else
                           f"engine core alone on a core, API server on core {args.api_core})"))
    for col in ("server", "output tok/s", "min .. max", "spread", "req/s", "min .. max", "others on core"):
        table.add_column(col, justify="left" if col == "server" else "right")
    tok, req = summary["tokens_per_s"], summary["requests_per_s"]
    for arm, label, t, r in ((WITH, f"with plane ({what})", tok.with_plane, req.with_plane),
                             (WITHOUT, "without (reference)", tok.without_plane, req.without_plane)):
        noise = [b.others_cpu for b in _arm(blocks, arm) if b.others_cpu is not None]
        table.add_row(label, f"{t.median:.1f}", f"{t.min:.1f} .. {t.max:.1f}", f"{t.rel_spread:.1%}",
                      f"{r.median:.2f}", f"{r.min:.2f} .. {r.max:.2f}",
                      f"{statistics.median(noise):.0%}" if noise else "?")
    console.print(table)
    console.print("Medians over blocks; spread = (max - min) / median. With plane: "
                  + (f"vLLM traced over OTLP ({args.otlp_protocol}) to `controlplane up`"
                     if args.instrument != "scrape" else "`controlplane up`, no tracing")
                  + (f", which scrapes its /metrics every {args.scrape_s:g} s" if args.instrument != "trace" else
                     ", which scrapes nothing")
                  + ". Others on core: CPU share on vLLM's core taken by other processes (the host's noise).")
    console.print(_loss_line("output tok/s", tok))
    if abs(req.loss.point - tok.loss.point) > 1e-9 or req.verdict != tok.verdict:
        console.print(_loss_line("req/s", req))
    else:  # a pair's two blocks send the same requests, so the two ratios are one
        console.print("req/s loss: the same (a pair's two blocks send the same requests)")
    cpu = summary.get("requests_per_cpu_s")
    if cpu is not None:
        console.print(f"Server CPU per request: with {1e3 / cpu.with_plane.median:.2f} ms, without "
                      f"{1e3 / cpu.without_plane.median:.2f} ms (API server and engine core, medians over blocks)"
                      + _api_share(blocks))
        console.print(_loss_line("CPU-bound throughput (requests per server CPU second)", cpu))
    console.print(f"Instrumentation ran: {evidence['spans_stored']} llm_request spans in the plane's store, "
                  f"{evidence['scrapes_ok']} successful scrapes of the traced server.")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=6, help="blocks per arm (at least 3; default 6)")
    ap.add_argument("--requests", type=int, default=400, help="requests per block (default 400)")
    ap.add_argument("--concurrency", type=int, default=48, help="requests in flight (default 48)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="vLLM --max-num-seqs (default 32)")
    ap.add_argument("--warmup", type=int, default=48, help="unmeasured requests per server first (default 48)")
    ap.add_argument("--scrape-s", type=float, default=1.0, help="the plane's scrape interval (default 1 s)")
    ap.add_argument("--vllm-core", type=int, default=None, help="core for both vLLM servers (default: the last)")
    ap.add_argument("--api-core", type=int, default=None,
                    help="move both servers' API servers to this core once ready (the client and the plane go to "
                         "a third core if there is one), so each engine core has --vllm-core to itself, as on a GPU "
                         "host (default: they share it)")
    ap.add_argument("--wait-s", type=float, default=1200.0,
                    help="wait this long for other vLLM servers on the host to finish (default 1200)")
    ap.add_argument("--instrument", choices=("both", "trace", "scrape"), default="both",
                    help="what the instrumented server gets: tracing and scraping (default), or one of them")
    ap.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"), default="grpc",
                    help="how vLLM exports its spans to the plane (default grpc)")
    ap.add_argument("--model", choices=tuple(MODELS), default="tiny",
                    help="tiny (the tests' model, default) or small (6 layers, hidden 768; see MODELS)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 3 blocks per arm of 96 requests")
    ap.add_argument("--json", type=Path, help="write the blocks and the summary here")
    ap.add_argument("--log-dir", type=Path, help="keep vLLM and plane logs and the store here (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.requests, args.warmup = 3, 96, 24
    if args.blocks < 3:
        ap.error(f"--blocks must be at least 3 (a median and an interval need them), got {args.blocks}")
    for name in ("requests", "concurrency", "max_num_seqs", "warmup"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.scrape_s <= 0:
        ap.error(f"--scrape-s must be positive, got {args.scrape_s}")
    cores = sorted(os.sched_getaffinity(0))
    if args.vllm_core is not None and args.vllm_core not in cores:
        ap.error(f"--vllm-core {args.vllm_core} is not one of this process's cores {cores}")
    if args.api_core is not None and (args.api_core not in cores or args.api_core == args.vllm_core
                                      or (args.vllm_core is None and args.api_core == cores[-1])):
        ap.error(f"--api-core {args.api_core} must be one of this process's cores {cores} other than vLLM's")
    if len(cores) < 2:
        progress.print("[yellow]one core: vLLM, the plane and the client share it; the loss includes the plane's "
                       "own CPU[/]")
    with tempfile.TemporaryDirectory(prefix="cp-overhead-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            blocks, evidence = run(args, log_dir)
        except RuntimeError as exc:  # a server or the plane that did not start: say which, and where its log is
            progress.print(f"[red]error:[/] {exc}")
            return 1
    summary = report(blocks, evidence, args)
    if args.json:
        doc = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "target_loss": TARGET_LOSS, "blocks": [asdict(b) for b in blocks], "evidence": evidence,
               "summary": {k: asdict(v) for k, v in summary.items()}}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        progress.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
