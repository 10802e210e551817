"""Configuration search vs the exhaustive grid (simulated), and, with --real, a measured grid on real vLLM (CPU).

    .venv/bin/python bench/tune.py [--target-rps 100] [--probe-requests 2000] [--seed 3]
    .venv/bin/python bench/tune.py --real [--real-steps 4] [--real-trial-s 20]      # starts vLLM: ~15 minutes

Simulated part. Llama-3.1-8B on one H100 (roofline prior), the space max_num_seqs {16..1024} x
max_num_batched_tokens {512..16384} x weights {bf16, fp8} x KV cache {bf16, fp8} (168 cells), max_model_len
8192; Poisson load with lognormal prompts (median 800 tokens) and outputs (median 200); SLOs TTFT <= 500 ms and
TPOT <= 30 ms for 99% of requests. The grid bisects every cell's capacity at the SLO (the highest rate one replica
sustains with both SLOs holding) with the same probes as the search; goodput per dollar = that rate x 3600 /
price per hour. The search (controlplane.tuning.search) must reach >= 95% of the grid's best goodput per dollar
in <= 30 s of CPU (time.process_time, same process, same run). The ratio uses the grid's own figure for the
search's pick, so both sides are measured identically.

Real part (--real; not run in CI): the tiny model on vLLM's CPU engine, pinned to one core, over a 3 x 3 grid
of max_num_seqs x max_num_batched_tokens. The middle cell is calibrated as the plane calibrates a replica: vLLM's
`llm_request` spans of a load climbing from 20% to 90% of its saturated throughput, fitted to alpha + beta *
tokens + gamma * KV tokens + delta * sequences, plus the API server's path; the search, on that calibrated
model, picks a cell. Then every cell is started for real and its capacity at the SLO measured the way the search
defines it (the highest Poisson rate at which the SLOs hold), by bisecting between 0.3x and 1x the cell's
saturated throughput; the pick's measured capacity is compared with the best cell's. Every cell costs the
same (one replica), so capacity ranks goodput per dollar.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from controlplane.slo.spec import LatencyTarget, Slo, SloWindow
from controlplane.tuning import catalog
from controlplane.tuning.capacity import objectives_from_slos
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.search import Candidate, SearchOptions, SearchResult, search
from controlplane.tuning.search_space import Cell, RooflineFactory, SearchSpace
from controlplane.tuning.workload import LogNormal, Poisson, Workload, synthetic

console = Console(width=150)
SPACE = SearchSpace((16, 32, 64, 128, 256, 512, 1024), (512, 1024, 2048, 4096, 8192, 16384),
                    (WeightPrecision.BF16, WeightPrecision.FP8), (KvPrecision.BF16, KvPrecision.FP8))
TARGET_RATIO, TARGET_CPU_S = 0.95, 30.0


def slos(ttft_s: float, tpot_s: float, objective: float = 0.99) -> list[Slo]:
    window = SloWindow("rolling", 28 * 86_400.0)
    return [Slo("ttft", "bench", "ttft", (LatencyTarget("ttft", ttft_s),), objective, window),
            Slo("tpot", "bench", "tpot", (LatencyTarget("tpot", tpot_s),), objective, window)]


def _gpd(c: Candidate) -> float:
    return c.goodput_per_usd or 0.0


def _pick_table(res: SearchResult, title: str) -> Table:
    t = Table(title=title)
    for col in ("", "value"):
        t.add_column(col)
    assert res.chosen is not None
    t.add_row("configuration", res.chosen.label())
    t.add_row("replicas for the target", f"{res.replicas} at ${res.usd_per_hour:,.2f}/h, "
                                         f"${res.usd_per_million_tokens:,.4f} per 1M tokens")
    t.add_row("capacity at the SLO", f"{res.capacity_rps_per_replica:,.2f} req/s per replica, "
                                     f"{res.goodput_per_usd:,.0f} requests per dollar")
    for p in res.predictions:
        q = "-" if p.quantile_s is None else f"{p.quantile_s * 1e3:,.1f} ms"
        thr = "-" if p.threshold_s is None else f"{p.threshold_s * 1e3:g} ms"
        t.add_row(f"SLO {p.name}", f"attainment {p.attainment:.4f} (objective {p.objective}, margin "
                                   f"{p.margin:+.4f}); p{p.objective * 100:g} {q} vs {thr}")
    t.add_row("work", f"{res.simulations} simulations, {res.simulated_requests:,} requests, {res.cpu_s:.2f} CPU s")
    return t


def simulated(args: argparse.Namespace) -> None:
    objectives, _ = objectives_from_slos(slos(0.5, 0.03))
    factory = RooflineFactory(catalog.model("Llama-3.1-8B"), catalog.accelerator("H100-80GB"), max_model_len=8192)
    wl = synthetic(Poisson(20.0), LogNormal(800, 0.9, 16, 6000), LogNormal(200, 0.8, 8, 1500), n=20_000,
                   seed=args.seed)
    opts = SearchOptions(probe_requests=args.probe_requests)
    console.print(f"space: {len(SPACE)} cells; load: lognormal prompts (median 800) and outputs (median 200); "
                  f"target {args.target_rps:g} req/s; SLOs TTFT <= 500 ms, TPOT <= 30 ms at 99%")
    smart = search(SPACE, factory, objectives, wl, target_rps=args.target_rps, options=opts)
    grid = search(SPACE, factory, objectives, wl, target_rps=args.target_rps, options=opts, exhaustive=True)
    if smart.chosen is None or grid.chosen is None:
        console.print("[red]no configuration meets the SLOs[/]")
        return
    console.print(_pick_table(smart, "the search's pick"))
    ranked = sorted((c for c in grid.candidates if c.capacity_rps), key=lambda c: -_gpd(c))
    best = ranked[0]
    own = next(c for c in grid.candidates if c.cell == smart.chosen)
    table = Table(title="grid: the 10 best cells by goodput per dollar (every cell bisected)")
    for col in ("rank", "configuration", "capacity req/s", "requests per $", "vs best", "search's pick"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for i, c in enumerate(ranked[:10], 1):
        table.add_row(str(i), c.cell.label(), f"{c.capacity_rps:,.2f}", f"{_gpd(c):,.0f}",
                      f"{_gpd(c) / _gpd(best):.3f}", "<--" if c.cell == smart.chosen else "")
    console.print(table)
    rank = 1 + ranked.index(own) if own in ranked else None
    ratio = _gpd(own) / _gpd(best)
    reasons = Counter(c.reason for c in smart.candidates)
    summary = Table(title="search vs grid")
    for col in ("", "search", "grid", "search / grid"):
        summary.add_column(col, justify="left" if col == "" else "right")
    summary.add_row("CPU s", f"{smart.cpu_s:.2f}", f"{grid.cpu_s:.2f}", f"{smart.cpu_s / grid.cpu_s:.3f}")
    summary.add_row("simulations", str(smart.simulations), str(grid.simulations),
                    f"{smart.simulations / grid.simulations:.3f}")
    summary.add_row("simulated requests", f"{smart.simulated_requests:,}", f"{grid.simulated_requests:,}",
                    f"{smart.simulated_requests / grid.simulated_requests:.3f}")
    summary.add_row("goodput per $ (grid's figure for each pick)", f"{_gpd(own):,.0f}", f"{_gpd(best):,.0f}",
                    f"{ratio:.3f}")
    summary.add_row("fleet for the target", f"{smart.replicas} x ${smart.usd_per_hour / smart.replicas:,.2f}/h",  # type: ignore[operator]
                    f"{grid.replicas} x ${grid.usd_per_hour / grid.replicas:,.2f}/h", "")  # type: ignore[operator]
    console.print(summary)
    console.print(f"search's pick ranks {rank} of {len(ranked)} in the grid; its cells: "
                  + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    ok_ratio, ok_cpu = ratio >= TARGET_RATIO, smart.cpu_s <= TARGET_CPU_S
    verdict = "[green]meets[/]" if ok_ratio and ok_cpu else "[red]misses[/]"
    console.print(f"target: >= {TARGET_RATIO:.0%} of the grid's goodput per dollar in <= {TARGET_CPU_S:g} CPU s: "
                  f"{verdict} ({ratio:.1%}, {smart.cpu_s:.1f} s)")


# --- real vLLM (CPU) ---------------------------------------------------------------------------------------
# Budgets >= max_model_len (512): vLLM's CPU engine may run without chunked prefill, which requires it.
REAL_SEQS, REAL_TOKENS, REAL_MAX_LEN = (2, 4, 16), (512, 1024, 2048), 512


def bisect_capacity(attain: Callable[[float], float], lo: float, hi: float, steps: int,
                    objective: float) -> tuple[float | None, list[tuple[float, float]]]:
    """The highest rate in [lo, hi] found to meet `objective`, by geometric bisection (rates span a factor of a
    few, so halving the ratio, not the difference, spends the trials evenly); with every midpoint failing, `lo`
    itself is tried. Returns (capacity or None when even `lo` fails, the (rate, attainment) trials in order)."""
    if not 0 < lo < hi or steps < 1:
        raise ValueError(f"need 0 < lo ({lo}) < hi ({hi}) and steps >= 1 ({steps})")
    trials: list[tuple[float, float]] = []
    best: float | None = None
    a, b = lo, hi
    for _ in range(steps):
        mid = math.sqrt(a * b)
        got = attain(mid)
        trials.append((mid, got))
        if got >= objective:
            best, a = mid, mid
        else:
            b = mid
    if best is None:
        got = attain(lo)
        trials.append((lo, got))
        best = lo if got >= objective else None
    return best, trials


def _real(args: argparse.Namespace) -> None:
    """Measure every cell's capacity at the SLO on real vLLM (tiny model, CPU) and compare the search's pick."""
    import os

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `bench` importable
    from bench.sim_fidelity import SpanSink
    from collectors.promtext import parse
    from collectors.vllm_metrics import read_engine
    from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model
    from controlplane.engines.vllm_server import VllmServer, VllmServerSpec
    from controlplane.loadgen import ClientResult, RequestPlan, ramp_offsets, run_load
    from controlplane.tuning import calibrate
    from controlplane.tuning.search_space import CalibratedFactory

    ttft_s, tpot_s = args.real_ttft_ms / 1e3, args.real_tpot_ms / 1e3
    objective = args.real_objective
    objectives, _ = objectives_from_slos(slos(ttft_s, tpot_s, objective))
    data = Path(args.data_dir)
    model_dir, _ = make_tiny_model(data / "models" / "tiny", TinyModelSpec())
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1] if len(cores) >= 2 else None  # one replica = one core; this client on the others
    if core is not None:
        os.sched_setaffinity(0, set(cores) - {core})
    rng = np.random.default_rng(args.seed)
    n = 4000  # the request mix; a trial at rate r sends the first r x trial_s of it, spaced r times faster
    gaps = rng.exponential(1.0, size=n)
    prompts = rng.integers(16, 400, size=n)
    outputs = rng.integers(8, 64, size=n)
    ids = [[int(x) for x in rng.integers(100, 1000, size=int(p))] for p in prompts]
    unit_arrivals = np.cumsum(gaps) - gaps[0]

    def plans_at(rate: float, count: int) -> list[RequestPlan]:
        return [RequestPlan(ids[i], int(outputs[i]), float(unit_arrivals[i] / rate)) for i in range(count)]

    wl = Workload(unit_arrivals / args.real_rate, prompts.astype(np.int64), outputs.astype(np.int64), "real")

    def serve(cell: Cell, port: int, otlp: str | None = None) -> VllmServer:
        name = f"tune-{cell.max_num_seqs}-{cell.max_num_batched_tokens}"
        spec = VllmServerSpec(model_dir=model_dir, port=port, replica_name=name, max_model_len=REAL_MAX_LEN,
                              otlp_endpoint=otlp, otlp_protocol="grpc",
                              max_num_seqs=cell.max_num_seqs, max_num_batched_tokens=cell.max_num_batched_tokens,
                              cpu_cores=(core,) if core is not None else ())
        server = VllmServer(spec, data / "logs" / f"{spec.replica_name}.log")
        server.start()
        server.wait_ready()
        return server

    def saturated_rps(server: VllmServer) -> float:
        """Requests completed per second by a closed loop of 120 of the mix, 32 in flight."""
        burst = [RequestPlan(ids[i], int(outputs[i])) for i in range(120)]
        t0 = time.perf_counter()
        res = asyncio.run(run_load(server.spec.base_url, server.spec.served_name, burst, 32))
        return sum(r.ok for r in res) / (time.perf_counter() - t0)

    def attainment(results: list[ClientResult]) -> float:
        """The share of requests within both SLOs; a failed request is bad."""
        fine = sum(1 for r in results if r.ok and r.ttft_s is not None and r.e2e_s is not None
                   and r.ttft_s <= ttft_s
                   and (r.completion_tokens <= 1 or (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1) <= tpot_s))
        return fine / len(results) if results else 0.0

    # 1. Calibrate on the middle cell the way the plane does: vLLM's own llm_request spans of a load whose rate
    # climbs from 20% to 90% of the cell's saturated throughput (small and full batches), fitted with the
    # per-sequence term, plus the API server's path; KV capacity from its /metrics.
    cells = [Cell(q, t) for q in REAL_SEQS for t in REAL_TOKENS if t >= q]
    sink = SpanSink()
    middle = cells[len(cells) // 2]
    server = serve(middle, args.port, otlp=f"127.0.0.1:{sink.port}")
    try:
        saturated = saturated_rps(server)
        count = args.real_calibration_requests
        offsets = ramp_offsets(count, 0.2 * saturated, 0.9 * saturated, args.seed + 1)
        # The mix's tail: none of the calibration's requests is a trial's.
        ramp = [RequestPlan(ids[n - 1 - k], int(outputs[n - 1 - k]), t) for k, t in enumerate(offsets)]
        got = asyncio.run(run_load(server.spec.base_url, server.spec.served_name, ramp, count))
        rows = [dict(r) for r in sink.wait([r.trace_id for r in got if r.ok])]
        metrics = read_engine(parse(httpx.get(server.spec.base_url + "/metrics", timeout=5).text))
    finally:
        server.stop()
        sink.server.stop(None)
    fit, api_path = calibrate.fit_rows(rows, max_num_batched_tokens=middle.max_num_batched_tokens, fit_per_seq=True)
    cost = fit.step_cost
    kv = metrics.kv_capacity_tokens or 65_536
    block = metrics.kv_block_size_tokens or 16
    middle_model = CalibratedFactory(cost, kv_capacity_tokens=kv, block_size=block, max_model_len=REAL_MAX_LEN,
                                     api_path_s=api_path)(middle)
    per_request = calibrate.api_path_per_request_s(rows, middle_model) or 0.0
    c = fit.coefficients
    console.print(f"calibrated on {middle.label()} from {len(rows)} spans: alpha {c.alpha_s * 1e3:.2f} ms, beta "
                  f"{c.beta_s_per_token * 1e6:.1f} us/token, gamma {c.gamma_s_per_kv_token * 1e9:.1f} ns/KV token, "
                  f"delta {c.delta_s_per_seq * 1e6:.0f} us/seq, API path {api_path * 1e3:.2f} ms + "
                  f"{per_request * 1e3:.2f} ms per request in flight; KV {kv:,} tokens, "
                  f"block {block}")
    space = SearchSpace(REAL_SEQS, REAL_TOKENS)
    factory = CalibratedFactory(cost, kv_capacity_tokens=kv, block_size=block, max_model_len=REAL_MAX_LEN,
                                usd_per_hour=1.0, api_path_s=api_path, api_path_per_request_s=per_request)
    opts = SearchOptions(probe_requests=400)
    pick = search(space, factory, objectives, wl, target_rps=args.real_rate, options=opts)
    grid = search(space, factory, objectives, wl, target_rps=args.real_rate, options=opts, exhaustive=True)
    predicted = {c.cell: c.capacity_rps for c in grid.candidates}
    console.print(f"search's pick on the calibrated model: {pick.chosen.label() if pick.chosen else 'none'}")
    # 2. The measured grid: each cell's capacity at the SLO, bisected between 0.3x and 1x its saturated
    # throughput (a closed-loop burst), each trial a Poisson load of trial_s seconds.
    title = (f"real vLLM (CPU, tiny model, one core): capacity at the SLO (TTFT <= {args.real_ttft_ms:g} ms and "
             f"TPOT <= {args.real_tpot_ms:g} ms for {objective:.0%}), {args.real_steps}-step bisection of "
             f"{args.real_trial_s:g} s Poisson trials")
    table = Table(title=title)
    for col in ("configuration", "saturated req/s", "trials (req/s: within SLO)", "capacity req/s",
                "predicted req/s", "search's pick"):
        table.add_column(col, justify="left" if col in ("configuration", "trials (req/s: within SLO)") else "right")
    measured: dict[Cell, float] = {}
    for k, cell in enumerate(cells, 1):
        console.print(f"[{k}/{len(cells)}] {cell.label()}: starting vLLM ...")
        server = serve(cell, args.port)
        try:
            saturated = saturated_rps(server)

            def attain(rate: float, server: VllmServer = server) -> float:
                count = max(40, int(rate * args.real_trial_s))
                got = asyncio.run(run_load(server.spec.base_url, server.spec.served_name, plans_at(rate, count),
                                           args.concurrency))
                a = attainment(got)
                console.print(f"    {rate:6.2f} req/s x {count}: {a:.1%} within the SLO")
                return a

            cap, trials = bisect_capacity(attain, 0.3 * saturated, saturated, args.real_steps, objective)
        finally:
            server.stop()
        measured[cell] = cap or 0.0
        pred = predicted.get(cell)
        table.add_row(cell.label(), f"{saturated:.1f}", ", ".join(f"{r:.1f}: {a:.0%}" for r, a in trials),
                      f"< {0.3 * saturated:.1f}" if cap is None else f"{cap:.2f}",
                      "-" if pred is None else f"{pred:.2f}", "<--" if cell == pick.chosen else "")
    console.print(table)
    best_cell = max(measured, key=lambda c: measured[c])
    best = measured[best_cell]
    if pick.chosen in measured and best > 0:
        console.print(f"the pick ({pick.chosen.label()}) measured {measured[pick.chosen]:.2f} req/s at the SLO: "
                      f"{measured[pick.chosen] / best:.1%} of the best measured cell ({best_cell.label()}, "
                      f"{best:.2f} req/s). Same price per cell, so goodput per dollar compares the same way.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target-rps", type=float, default=100.0)
    ap.add_argument("--probe-requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also run the measured grid on real vLLM (CPU): slow")
    ap.add_argument("--real-rate", type=float, default=4.0, help="the load the search sizes the fleet for")
    ap.add_argument("--real-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--real-tpot-ms", type=float, default=200.0)
    ap.add_argument("--real-objective", type=float, default=0.9)
    ap.add_argument("--real-steps", type=int, default=4, help="bisection trials per cell")
    ap.add_argument("--real-trial-s", type=float, default=20.0, help="seconds of Poisson load per trial")
    ap.add_argument("--concurrency", type=int, default=256, help="client streams at most in flight")
    ap.add_argument("--real-calibration-requests", type=int, default=400,
                    help="requests in the calibration ramp on the middle cell")
    ap.add_argument("--port", type=int, default=8190)
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "controlplane-tune"))
    args = ap.parse_args()
    t0 = time.process_time()
    simulated(args)
    if args.real:
        _real(args)
    console.print(f"total CPU {time.process_time() - t0:.1f} s")


if __name__ == "__main__":
    main()
