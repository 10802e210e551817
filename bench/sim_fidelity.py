"""Simulator fidelity: real vLLM (tiny model, CPU) vs the calibrated simulator, at several loads and configurations.

    .venv/bin/python bench/sim_fidelity.py [--requests 300] [--loads 0.3,0.6,0.85] [--configs A,B,C]
        [--capacity-requests 96] [--calibrate ramp|nearest|first|burst+first|all] [--core 1] [--engine vllm|sim]
        [--repeat 2] [--same-load] [--api-core 0] [--json OUT] [--replay FILE] [--sim-no-prefix-caching]
        [--constant-api-path]

For each configuration (max_num_seqs, max_num_batched_tokens, KV blocks) it starts vLLM pinned to one core
(after waiting until no other vLLM API server runs on this shared machine), measures the replica's capacity
with a burst, runs a calibration load whose Poisson rate climbs from 20% to 90% of that capacity, then drives
Poisson loads at fractions of it with streamed, token-id prompts (ignore_eos). Each request's timings are
vLLM's own: its `llm_request` spans, received over OTLP/gRPC and decoded by the plane's decoder. The simulator
is calibrated (controlplane/tuning/calibrate.py: step cost alpha + beta*tokens + gamma*KV read + delta*seqs,
and the API server's path with its growth per request in flight) from the calibration load of each
configuration, never from the loads it is judged on, and replays every judged load's exact arrivals and
lengths; a second table uses one calibration (the first configuration's) for every configuration, the way
the tuner would predict a config it has not run. Printed:
TTFT p50/p90 and TPOT p50, measured vs predicted, relative error, and whether within 15%.
`--repeat N` (2 or 3) runs every judged load N-1 more times with the same requests (same arrivals, lengths and
prompts), after all of them ran once: the reference for the simulator's error is then real vLLM's own, the first
rerun against the first run, on this shared host (reruns are not CPU-watched). The simulator is judged against
the first run as without it, and also against all runs pooled (the real distribution from N times the requests).
`--calibrate nearest` sends a calibration ramp of its own (new requests) right before every judged load and
calibrates each load from the ramp just before it, minutes closer in time than the configuration's one ramp: what
the plane's online calibration does, refitting on the latest separate traffic, on a host whose speed drifts.
`--same-load` adds a diagnostic table: step costs fitted on each judged load's own rows (see same_load).
`--api-core N` moves vLLM's API server to core N once it is ready, so that its engine core has --core to itself,
as on a GPU host where the API server never takes turns with the engine's compute (this client goes to a third
core where there is one, else shares N); the CPU columns then count the engine core alone.
`--engine sim` runs the same pipeline against the simulated engine (a self-check of the bench, no vLLM).
Every run saves its raw rows (JSON in --log-dir); `--replay FILE` redoes the analysis from them without vLLM,
e.g. with another `--calibrate` choice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu import CoreBusy, CoreWatch, move_api_server  # noqa: E402
from collectors.otlp.decode import RequestRow, decode_request  # noqa: E402
from collectors.promtext import parse  # noqa: E402
from collectors.vllm_metrics import read_engine  # noqa: E402
from controlplane import names  # noqa: E402
from controlplane.engines.sim_server import SimServer, SimServerConfig  # noqa: E402
from controlplane.engines.tiny_model import make_tiny_model  # noqa: E402
from controlplane.engines.vllm_server import VllmServer, VllmServerSpec  # noqa: E402
from controlplane.loadgen import RequestPlan, mixed_plans, ramp_offsets, run_load  # noqa: E402
from controlplane.stats import percentile  # noqa: E402
from controlplane.tuning import calibrate  # noqa: E402
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost  # noqa: E402
from controlplane.tuning.simulator import SimResult, simulate  # noqa: E402
from controlplane.tuning.workload import from_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK = 128  # vLLM's KV block on CPU
SIM_PREFIX_CACHING = True  # the simulator's model of vLLM's prefix cache (vLLM's is on); --sim-no-prefix-caching
API_PATH_GROWS = True  # calibrate the API path's growth with the requests in flight; --constant-api-path
TARGET = 0.15
RAMP = (0.2, 0.9)  # the calibration load's rate, from and to, as fractions of the measured capacity
PROMPT_TOKENS, OUTPUT_TOKENS = (32, 512), (16, 64)
VLLM_PATTERN = "vllm.entrypoints.openai.api_server"
console = Console(width=150)


@dataclass(frozen=True)
class Shape:
    """One engine configuration. `kv_blocks` is --num-gpu-blocks-override; vLLM keeps one block back."""

    name: str
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks: int

    @property
    def max_model_len(self) -> int:
        return min(2048, (self.kv_blocks - 1) * BLOCK)

    def replica(self, cost: StepCost, api_path_s: float = 0.0) -> ReplicaModel:
        return ReplicaModel(cost, max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                            block_size=BLOCK, num_kv_blocks=self.kv_blocks - 1, max_model_len=self.max_model_len,
                            name=self.name, api_path_s=api_path_s, prefix_caching=SIM_PREFIX_CACHING)


SHAPES = {s.name: s for s in (
    Shape("A", max_num_seqs=8, max_num_batched_tokens=512, kv_blocks=64),  # roomy KV, batch-limited
    Shape("B", max_num_seqs=16, max_num_batched_tokens=1024, kv_blocks=12),  # tight KV: admission-limited, preempts
    Shape("C", max_num_seqs=4, max_num_batched_tokens=256, kv_blocks=32),  # few sequences, prefills chunked
)}


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that decodes `llm_request` spans with the plane's decoder and keeps the rows."""

    def __init__(self) -> None:
        self.rows: dict[str, RequestRow] = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext  # noqa: N802
               ) -> ExportTraceServiceResponse:
        for row in decode_request(request).requests:
            self.rows[row["trace_id"]] = row
        return ExportTraceServiceResponse()

    def wait(self, trace_ids: list[str], timeout_s: float = 60.0) -> list[RequestRow]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(t in self.rows for t in trace_ids):
            time.sleep(0.2)
        missing = [t for t in trace_ids if t not in self.rows]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(trace_ids)} spans never arrived")
        return [self.rows[t] for t in trace_ids]


def wait_for_no_vllm(limit_s: float = 1200.0, poll_s: float = 30.0) -> None:
    """CPU etiquette on the shared 2-core host: start only when no other vLLM API server runs."""
    deadline = time.monotonic() + limit_s
    while True:
        out = subprocess.run(["pgrep", "-fc", VLLM_PATTERN], capture_output=True, text=True).stdout.strip()
        if out in ("", "0"):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"another vLLM server still runs after {limit_s / 60:.0f} min ({out}); giving up")
        console.print(f"[yellow]{out} vLLM API server(s) running; waiting {poll_s:.0f} s[/]")
        time.sleep(poll_s)


class Engine:
    """A real vLLM server, or (--engine sim) the simulated engine with a CPU-like step cost."""

    def __init__(self, kind: str, shape: Shape, sink: SpanSink, core: int, log_dir: Path, ready_s: float,
                 api_core: int | None = None) -> None:
        self.kind, self.shape = kind, shape
        self.vllm: VllmServer | None = None
        self.sim: SimServer | None = None
        endpoint = f"127.0.0.1:{sink.port}"
        if kind == "sim":
            cost = StepCost.linear(Coefficients(8e-3, 6e-5, 2e-7))
            cfg = SimServerConfig(replica=shape.replica(cost), served_model_name="tiny", model="tiny",
                                  accelerator="H100-80GB", num_gpu_blocks=shape.kv_blocks, port=0, access_log=False,
                                  otlp_traces_endpoint=endpoint, otlp_protocol="grpc",
                                  resource_attributes={names.RES_REPLICA: f"fid-{shape.name}"})
            self.sim = SimServer(cfg).start()
            self.base_url = self.sim.base_url
            return
        wait_for_no_vllm()
        model_dir, _ = make_tiny_model(REPO / ".cache" / "tiny-model")
        port = _free_port()
        spec = VllmServerSpec(model_dir=model_dir, port=port, replica_name=f"fid-{shape.name}", otlp_endpoint=endpoint,
                              otlp_protocol="grpc", max_model_len=shape.max_model_len,
                              max_num_seqs=shape.max_num_seqs, max_num_batched_tokens=shape.max_num_batched_tokens,
                              num_gpu_blocks_override=shape.kv_blocks, cpu_cores=(core,))
        self.vllm = VllmServer(spec, log_dir / f"vllm-{shape.name}.log")
        self.vllm.start()
        where = f"pinned to core {core}"
        try:
            waited = self.vllm.wait_ready(timeout_s=ready_s)
            if api_core is not None:
                assert self.vllm.proc is not None
                move_api_server(self.vllm.proc.pid, {api_core})
                where = f"engine core pinned to core {core}, API server to core {api_core}"
        except BaseException:
            self.vllm.stop()  # the caller holds no Engine yet to stop it
            raise
        console.print(f"config {shape.name}: vLLM ready in {waited:.0f} s ({where})")
        self.base_url = spec.base_url

    def counters(self) -> dict[str, float | None]:
        return dict(read_engine(parse(httpx.get(self.base_url + "/metrics", timeout=10).text)).counters)

    def stop(self) -> None:
        if self.vllm:
            self.vllm.stop()
        if self.sim:
            self.sim.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(engine: Engine, sink: SpanSink, plans: list[RequestPlan]) -> list[RequestRow]:
    """Send the plans; the rows of the requests that completed. A connection the server closed while idle can
    fail a request now and then (vLLM's default 5 s keep-alive; servers started here keep 60 s): up to 1% are
    dropped, with a line saying so."""
    results = asyncio.run(run_load(engine.base_url, "tiny", plans, concurrency=len(plans)))
    failed = [r.error for r in results if not r.ok]
    if len(failed) > 0.01 * len(results):
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0]}")
    if failed:
        console.print(f"[yellow]{len(failed)} of {len(results)} requests failed and are left out: {failed[0]}[/]")
    return sink.wait([r.trace_id for r in results if r.ok])


def plans(n: int, seed: int, rate: float | None, output: tuple[int, int] = OUTPUT_TOKENS) -> list[RequestPlan]:
    return mixed_plans(n, seed=seed, prompt_words=PROMPT_TOKENS, max_tokens=output, rate_per_s=rate,
                       token_ids=(10, 2000))


def ramp_plans(n: int, seed: int, lo_rps: float, hi_rps: float) -> list[RequestPlan]:
    """Poisson arrivals whose rate climbs linearly from lo to hi over the n requests: the calibration load,
    covering small and full batches the way a day of traffic would, with its own seed (none of the judged
    loads' requests)."""
    offsets = ramp_offsets(n, lo_rps, hi_rps, seed)
    return [replace(plan, delay_s=t) for plan, t in zip(plans(n, seed=seed, rate=None), offsets, strict=True)]


@dataclass
class LoadRun:
    fraction: float
    offered_rps: float
    rows: list[RequestRow]
    preemptions: float | None
    engine_cpu: float | None = None  # vLLM's CPU seconds per wall second (its core)
    others_cpu: float | None = None  # other processes' CPU seconds per wall second on vLLM's core
    reruns: list[list[RequestRow]] = field(default_factory=list)  # --repeat: the same requests, sent again
    ramp: list[RequestRow] = field(default_factory=list)  # --calibrate nearest: the ramp sent just before this load
    api_core_busy: float | None = None  # --api-core: that core's busy share, every process on it (API server, client)


@dataclass
class ConfigRun:
    shape: Shape
    capacity_rps: float
    loads: list[LoadRun] = field(default_factory=list)
    burst: list[RequestRow] = field(default_factory=list)  # the capacity burst's rows (all sent at once)
    ramp: list[RequestRow] = field(default_factory=list)  # the calibration load's rows (rate climbing, RAMP)


def measure(engine: Engine, sink: SpanSink, args: argparse.Namespace) -> ConfigRun:
    drive(engine, sink, plans(24, seed=99, rate=None, output=(4, 16)))  # warm-up: first shapes are slow on CPU
    burst = drive(engine, sink, plans(args.capacity_requests, seed=1, rate=None))
    start = min(r["arrival_unix_s"] for r in burst)
    end = max(r["arrival_unix_s"] + (r["e2e_s"] or 0.0) for r in burst)
    run = ConfigRun(engine.shape, len(burst) / (end - start), burst=burst)
    console.print(f"config {engine.shape.name}: capacity {run.capacity_rps:.2f} req/s ({len(burst)} requests at once)")
    lo, hi = RAMP
    run.ramp = drive(engine, sink, ramp_plans(args.requests, 7, lo * run.capacity_rps, hi * run.capacity_rps))
    watch = CoreWatch(args.core, engine.vllm.pid if engine.vllm else None, children_only=args.api_core is not None)
    api_busy = CoreBusy(args.api_core if engine.vllm else None)
    for k, fraction in enumerate(args.loads):
        ramp = run.ramp
        if args.calibrate == "nearest" and k > 0:  # a fresh ramp (its own requests) just before this load
            ramp = drive(engine, sink, ramp_plans(args.requests, 70 + k, lo * run.capacity_rps,
                                                  hi * run.capacity_rps))
        before = engine.counters().get("preemptions_total")
        watch.start()
        api_busy.start()
        rows = drive(engine, sink, load_plans(args, k, fraction, run.capacity_rps))
        own, others = watch.shares()
        api_share = api_busy.share()
        after = engine.counters().get("preemptions_total")
        arrivals = sorted(r["arrival_unix_s"] for r in rows)
        offered = (len(rows) - 1) / (arrivals[-1] - arrivals[0])
        run.loads.append(LoadRun(fraction, offered, rows, None if before is None or after is None else after - before,
                                 own, others, ramp=ramp if args.calibrate == "nearest" else [],
                                 api_core_busy=api_share))
    for _ in range(args.repeat - 1):  # every load once more, in the same order, after all of them ran once
        for k, load in enumerate(run.loads):
            load.reruns.append(drive(engine, sink, load_plans(args, k, load.fraction, run.capacity_rps)))
        console.print(f"config {engine.shape.name}: every load sent again with the same requests")
    return run


def load_plans(args: argparse.Namespace, k: int, fraction: float, capacity_rps: float) -> list[RequestPlan]:
    """The k-th judged load: the same requests every time it is asked for (its own seed)."""
    return plans(args.requests, seed=10 + k, rate=fraction * capacity_rps)


def measure_all(args: argparse.Namespace, shapes: list[Shape]) -> list[ConfigRun]:
    sink = SpanSink()
    runs: list[ConfigRun] = []
    try:
        for shape in shapes:
            engine = Engine(args.engine, shape, sink, args.core, args.log_dir, args.ready_timeout, args.api_core)
            try:
                runs.append(measure(engine, sink, args))
            finally:
                engine.stop()
    finally:
        sink.server.stop(None)
    return runs


def dump_runs(runs: list[ConfigRun]) -> list[dict[str, Any]]:
    """Everything measured, raw rows included, so the analysis can be redone without vLLM (--replay)."""
    return [{"config": r.shape.name, "capacity_rps": r.capacity_rps, "burst": r.burst, "ramp": r.ramp,
             "loads": [{"fraction": x.fraction, "offered_rps": x.offered_rps, "preemptions": x.preemptions,
                        "engine_cpu": x.engine_cpu, "others_cpu": x.others_cpu, "rows": x.rows,
                        "reruns": x.reruns, "ramp": x.ramp, "api_core_busy": x.api_core_busy} for x in r.loads]}
            for r in runs]


def load_runs(path: Path) -> list[ConfigRun]:
    doc = json.loads(path.read_text())
    if "runs" not in doc:
        raise SystemExit(f"{path} holds no raw measurements ('runs'); only files written by this version can replay")
    return [ConfigRun(SHAPES[r["config"]], r["capacity_rps"],
                      [LoadRun(x["fraction"], x["offered_rps"], x["rows"], x["preemptions"], x["engine_cpu"],
                               x["others_cpu"], x.get("reruns", []), x.get("ramp", []), x.get("api_core_busy"))
                       for x in r["loads"]],
                      r.get("burst", []),
                      r.get("ramp", []))
            for r in doc["runs"]]


CALIBRATIONS = ("ramp", "nearest", "first", "burst+first", "all")


def calibration_rows(run: ConfigRun, which: str) -> list[RequestRow]:
    """The rows a configuration is calibrated from. 'ramp' (default): a load of its own whose rate climbs from
    20% to 90% of the capacity, measured before the judged loads ('nearest': the same for the configuration's
    own fit, and each load its own ramp, see `nearest`); 'first': the first judged load; 'burst+first':
    with the capacity burst too (its arrival storm loads the shared core, so its steps look slower than steady
    ones); 'all' pools every load (an upper bound on what calibration can do: it sees the loads it predicts)."""
    if which in ("ramp", "nearest"):
        return run.ramp
    if which == "first":
        return run.loads[0].rows
    if which == "burst+first":
        return run.burst + run.loads[0].rows
    if which == "all":
        return run.burst + [r for load in run.loads for r in load.rows]
    raise SystemExit(f"unknown calibration {which!r}; allowed: {', '.join(CALIBRATIONS)}")


@dataclass(frozen=True)
class Calibrated:
    fit: calibrate.Fit
    api_path_s: float
    api_path_per_request_s: float = 0.0

    def replica(self, shape: Shape) -> ReplicaModel:
        return replace(shape.replica(self.fit.step_cost, self.api_path_s),
                       api_path_per_request_s=self.api_path_per_request_s)


def fit_on(rows: list[RequestRow], shape: Shape, per_seq: bool) -> Calibrated:
    """Step costs and the API path fitted on these rows, for this configuration's token budget."""
    dicts = [dict(r) for r in rows]
    fit, path = calibrate.fit_rows(dicts, max_num_batched_tokens=shape.max_num_batched_tokens, fit_per_seq=per_seq)
    per_request = 0.0
    if API_PATH_GROWS:
        per_request = calibrate.api_path_per_request_s(dicts, shape.replica(fit.step_cost, path)) or 0.0
    return Calibrated(fit, path, per_request)


def calibrate_run(run: ConfigRun, which: str, per_seq: bool = False) -> Calibrated:
    rows = calibration_rows(run, which)
    if not rows:
        raise SystemExit(f"config {run.shape.name}: no rows for calibration {which!r} (a file from an older version "
                         "of this bench has no burst or ramp rows; use --calibrate first)")
    return fit_on(rows, run.shape, per_seq)


def _p(values: list[float], q: float) -> float:
    return percentile(sorted(values), q)


STATS = ("ttft_p50", "ttft_p90", "tpot_p50")


def stats_of(rows: list[RequestRow]) -> dict[str, float]:
    """TTFT p50/p90 and TPOT p50 (seconds) of measured rows."""
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in rows if r["tpot_s"] is not None]
    return {"ttft_p50": _p(ttft, 50), "ttft_p90": _p(ttft, 90), "tpot_p50": _p(tpot, 50)}


def predicted_stats(res: SimResult) -> dict[str, float]:
    """TTFT p50/p90 and TPOT p50 (seconds) of a simulation."""
    p_ttft = res.ttft_s[np.isfinite(res.ttft_s)].tolist()
    p_tpot = res.tpot_s[np.isfinite(res.tpot_s)].tolist()
    return {"ttft_p50": _p(p_ttft, 50), "ttft_p90": _p(p_ttft, 90), "tpot_p50": _p(p_tpot, 50)}


def compare(rows: list[RequestRow], res: SimResult) -> dict[str, tuple[float, float]]:
    """Measured and predicted TTFT p50/p90 and TPOT p50 (seconds)."""
    measured, predicted = stats_of(rows), predicted_stats(res)
    return {k: (measured[k], predicted[k]) for k in STATS}


def errors(measured: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    return {k: (other[k] - measured[k]) / measured[k] for k in STATS}


def noise_floor(runs: list[ConfigRun], models: dict[str, Calibrated]) -> list[dict[str, Any]]:
    """--repeat: real vLLM's rerun against its first run (the same requests), next to the simulator against the
    first run and against both runs pooled."""
    table = Table(title="real vLLM against itself (the same requests sent again) next to the simulator "
                        "(calibrated per configuration, from its one ramp)")
    for col in ("config", "load", "rerun vs first: TTFT p50 / p90 / TPOT p50", "<=15%",
                "simulator vs first", "<=15%", "simulator vs all runs pooled", "<=15%"):
        table.add_column(col, justify="left" if col == "config" else "right")
    out = []

    def fmt(e: dict[str, float]) -> list[str]:
        ok = all(abs(x) <= TARGET for x in e.values())
        return [" / ".join(f"{e[k]:+.0%}" for k in STATS), "[green]yes[/]" if ok else "[red]no[/]"]

    for run in runs:
        replica = models[run.shape.name].replica(run.shape)
        for load in run.loads:
            if not load.reruns:
                continue
            predicted = predicted_stats(simulate(from_rows([dict(r) for r in load.rows]), [replica],
                                                 sample_interval_s=None))
            first = stats_of(load.rows)
            rerun = errors(first, stats_of(load.reruns[0]))
            vs_first = errors(first, predicted)
            pooled = errors(stats_of(load.rows + [r for rr in load.reruns for r in rr]), predicted)
            table.add_row(run.shape.name, f"{load.fraction:.0%}", *fmt(rerun), *fmt(vs_first), *fmt(pooled))
            out.append({"config": run.shape.name, "load": load.fraction, "rerun_vs_first": rerun,
                        "simulator_vs_first": vs_first, "simulator_vs_pooled": pooled})
    console.print(table)
    for key, what in (("rerun_vs_first", "real vLLM rerun vs its first run"),
                      ("simulator_vs_first", "simulator vs the first run"),
                      ("simulator_vs_pooled", "simulator vs all runs pooled")):
        judged = [r for r in out if r["load"] <= 0.85 + 1e-9]
        ok = sum(all(abs(x) <= TARGET for x in r[key].values()) for r in judged)
        console.print(f"{what}: {ok} of {len(judged)} cells within 15% on all three statistics")
    return out


def _share(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


ModelFor = Callable[[ConfigRun, LoadRun], ReplicaModel]


def per_config(models: dict[str, Calibrated]) -> ModelFor:
    return lambda run, load: models[run.shape.name].replica(run.shape)


def nearest(models: dict[str, Calibrated], per_seq: bool) -> ModelFor:
    """--calibrate nearest: each judged load calibrated from the ramp sent just before it (never from its own rows);
    the first load's is the configuration's ramp."""
    def model(run: ConfigRun, load: LoadRun) -> ReplicaModel:
        if load is run.loads[0]:
            return models[run.shape.name].replica(run.shape)
        if not load.ramp:
            raise SystemExit(f"config {run.shape.name}, load {load.fraction:.0%}: no ramp of its own was measured; "
                             "only a run made with --calibrate nearest can be replayed with it")
        return fit_on(load.ramp, run.shape, per_seq).replica(run.shape)
    return model


def same_load(per_seq: bool) -> ModelFor:
    """--same-load (a diagnostic, not a prediction): step costs fitted on the judged load's own rows, so the
    simulator's scheduling and queueing are judged given the engine's speed at that moment; its TTFT and TPOT
    percentiles are still the simulation's, never read from the rows."""
    def model(run: ConfigRun, load: LoadRun) -> ReplicaModel:
        return fit_on(load.rows, run.shape, per_seq).replica(run.shape)
    return model


def report(title: str, runs: list[ConfigRun], models: ModelFor) -> list[dict[str, Any]]:
    table = Table(title=title)
    for col in ("config", "load", "req/s", "n", "TTFT p50 ms meas/pred", "err", "TTFT p90 ms meas/pred", "err",
                "TPOT p50 ms meas/pred", "err", "<=15%", "preempt meas/pred", "vLLM/others CPU",
                "API core busy"):
        table.add_column(col, justify="left" if col in ("config", "<=15%") else "right")
    out = []
    for run in runs:
        for load in run.loads:
            replica = models(run, load)
            res = simulate(from_rows([dict(r) for r in load.rows]), [replica], sample_interval_s=None)
            stats = compare(load.rows, res)
            errs = {k: (pred - meas) / meas for k, (meas, pred) in stats.items()}
            ok = all(abs(e) <= TARGET for e in errs.values())
            cells = []
            for k in ("ttft_p50", "ttft_p90", "tpot_p50"):
                meas, pred = stats[k]
                cells += [f"{meas * 1e3:.1f} / {pred * 1e3:.1f}", f"{errs[k]:+.0%}"]
            judged = load.fraction <= 0.85 + 1e-9
            verdict = ("[green]yes[/]" if ok else "[red]no[/]") if judged else "(not judged)"
            table.add_row(run.shape.name, f"{load.fraction:.0%}", f"{load.offered_rps:.2f}", str(len(load.rows)),
                          *cells, verdict,
                          f"{load.preemptions if load.preemptions is not None else '?'} / "
                          f"{int(res.preemptions.sum())}", f"{_share(load.engine_cpu)} / {_share(load.others_cpu)}",
                          _share(load.api_core_busy))
            out.append({"config": run.shape.name, "load": load.fraction, "offered_rps": load.offered_rps,
                        "n": len(load.rows), **{k: {"measured_s": m, "predicted_s": p, "rel_error": errs[k]}
                                                for k, (m, p) in stats.items()},
                        "within_15pct": ok, "api_path_s": replica.api_path_s,
                        "vllm_cpu_share": load.engine_cpu, "others_cpu_share_on_vllm_core": load.others_cpu,
                        "api_core_busy_share": load.api_core_busy,
                        "preemptions_measured": load.preemptions, "preemptions_predicted": int(res.preemptions.sum())})
    console.print(table)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    ap.add_argument("--configs", default="A,B,C", help=f"subset of {','.join(SHAPES)}")
    ap.add_argument("--loads", default="0.3,0.6,0.85", help="fractions of the measured capacity")
    ap.add_argument("--requests", type=int, default=300, help="requests per load")
    ap.add_argument("--capacity-requests", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=1, choices=(1, 2, 3),
                    help="send every judged load this many times (2: real vLLM's rerun is the reference)")
    ap.add_argument("--calibrate", choices=CALIBRATIONS, default="ramp",
                    help="which rows calibrate each configuration (see calibration_rows)")
    ap.add_argument("--core", type=int, default=1, help="the CPU core vLLM is pinned to")
    ap.add_argument("--api-core", type=int, default=None,
                    help="move vLLM's API server to this core once it is ready, leaving the engine core alone on "
                         "--core (default: both share --core)")
    ap.add_argument("--client-core", type=int, default=None,
                    help="pin this process (client, span receiver) here; default: another core than vLLM's")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--log-dir", type=Path, default=REPO / ".cache" / "sim-fidelity")
    ap.add_argument("--json", type=Path, default=None,
                    help="write figures and raw rows as JSON here (default: a file in --log-dir)")
    ap.add_argument("--replay", type=Path, default=None, help="analyse a saved JSON instead of measuring")
    ap.add_argument("--same-load", action="store_true",
                    help="also a table with step costs fitted on each judged load's own rows (see same_load)")
    ap.add_argument("--sim-no-prefix-caching", action="store_true",
                    help="simulate as if a preempted request recomputed everything (vLLM itself is unchanged)")
    ap.add_argument("--constant-api-path", action="store_true",
                    help="keep the API path constant (as before 2026-12-07) instead of fitting its growth per request "
                         "in flight (calibrate.api_path_per_request_s)")
    ap.add_argument("--no-fit-per-seq", dest="fit_per_seq", action="store_false",
                    help="leave out the per-sequence step cost (delta): one token sampled and streamed per sequence")
    args = ap.parse_args()
    args.loads = [float(x) for x in args.loads.split(",")]
    global SIM_PREFIX_CACHING, API_PATH_GROWS
    SIM_PREFIX_CACHING = not args.sim_no_prefix_caching
    API_PATH_GROWS = not args.constant_api_path
    if args.api_core is not None and args.api_core == args.core:
        ap.error(f"--api-core {args.api_core} is vLLM's --core; give the API server another core, or leave it out")
    shapes = [SHAPES[name.strip()] for name in args.configs.split(",")]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.engine == "vllm" and not args.replay:
        allowed = os.sched_getaffinity(0)
        if args.api_core is not None and args.api_core not in allowed:
            ap.error(f"--api-core {args.api_core} is not one of this process's cores {sorted(allowed)}")
        others = sorted(allowed - {args.core})
        if args.api_core is not None:  # a core of its own for the client where there is one, else the API server's
            others = sorted(allowed - {args.core, args.api_core}) or [args.api_core]
        client = args.client_core if args.client_core is not None else (others[0] if others else None)
        if client is not None:
            os.sched_setaffinity(0, {client})  # the client must not take vLLM's core

    t0 = time.monotonic()
    if args.replay:
        runs = load_runs(args.replay)
        saved = json.loads(args.replay.read_text())
        args.engine, args.api_core = saved.get("engine", args.engine), saved.get("api_core", args.api_core)
        console.print(f"replaying the measurements saved in {args.replay} (no engine started)")
    else:
        runs = measure_all(args, shapes)
        args.json = args.json or args.log_dir / f"{args.engine}-{int(time.time())}.json"

    models = {run.shape.name: calibrate_run(run, args.calibrate, args.fit_per_seq) for run in runs}
    for name, m in models.items():
        f, c = m.fit, m.fit.coefficients
        r2 = "?" if f.r2 is None else f"{f.r2:.3f}"
        rmse = "?" if f.rel_rmse is None else f"{f.rel_rmse:.3f}"
        console.print(f"config {name} calibrated from {args.calibrate} ({f.rows} rows): alpha "
                      f"{c.alpha_s * 1e3:.2f} ms, beta {c.beta_s_per_token * 1e6:.1f} us/token, gamma "
                      f"{c.gamma_s_per_kv_token * 1e9:.1f} ns/KV token, delta {c.delta_s_per_seq * 1e6:.0f} us/seq; "
                      f"R^2 {r2}, rel RMSE {rmse}, outliers {f.outliers}; API path {m.api_path_s * 1e3:.2f} ms "
                      f"+ {m.api_path_per_request_s * 1e3:.2f} ms per request in flight")
    engine_name = "real vLLM 0.32 (CPU, tiny model)" if args.engine == "vllm" else "the SIMULATED engine (self-check)"
    if args.replay:
        engine_name += " (replayed from saved rows)"
    each = report(f"{engine_name}: measured vs simulator calibrated per configuration ({args.calibrate})", runs,
                  nearest(models, args.fit_per_seq) if args.calibrate == "nearest" else per_config(models))
    first = runs[0].shape.name
    once_from = "ramp" if args.calibrate == "nearest" else args.calibrate
    once = report(f"{engine_name}: measured vs simulator calibrated once (config {first}, {once_from}) for all",
                  runs, per_config({run.shape.name: models[first] for run in runs}))
    tables = [("per-configuration calibration", each), ("one calibration for all", once)]
    if args.same_load:
        tables.append(("step costs fitted on each judged load (diagnostic)", report(
            f"{engine_name}: measured vs simulator with step costs fitted on the judged load itself (a diagnostic "
            "of the scheduler model given the engine's speed then; not a prediction)", runs,
            same_load(args.fit_per_seq))))
    for name, rows in tables:
        judged = [r for r in rows if r["load"] <= 0.85 + 1e-9]
        console.print(f"{name}: {sum(r['within_15pct'] for r in judged)} of {len(judged)} (config, load) cells "
                      "within 15% on all three statistics")
    floor = noise_floor(runs, models) if any(load.reruns for run in runs for load in run.loads) else []
    console.print(f"wall time {time.monotonic() - t0:.0f} s. The API path (vLLM's TTFT - queue - prefill on the "
                  "calibration rows that found the replica idle, and its growth per request in flight) is part of the "
                  "replica model: a request enters the engine that long after it arrives. 'vLLM/others CPU' = CPU "
                  "seconds per second on vLLM's core taken by vLLM"
                  + (f" (its engine core alone: the API server ran on core {args.api_core})"
                     if args.api_core is not None else "")
                  + " and by every other process (the shared host)."
                  + (" 'API core busy' = that core's busy share, every process on it: vLLM's API server, this "
                     "client and its span receiver (near 100%: the load generator, not the engine, set the pace)."
                     if args.api_core is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"engine": args.engine, "calibration": args.calibrate, "per_config": each,
                                         "core": args.core, "api_core": args.api_core,
                                         "calibrated_once": once, "noise_floor": floor, "runs": dump_runs(runs),
                                         "capacity_rps": {r.shape.name: r.capacity_rps for r in runs},
                                         "fits": {n: m.fit.coefficients.as_list() for n, m in models.items()},
                                         "api_path_s": {n: m.api_path_s for n, m in models.items()}}, indent=2))


if __name__ == "__main__":
    main()
