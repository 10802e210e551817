"""Simulator speed: simulated requests per CPU-second, event-driven engine vs the naive step loop.

    .venv/bin/python bench/sim_speed.py [--requests N] [--reference-requests M] [--load 0.7] [--seed S]

Workload: Llama-3.1-8B bf16 on one H100 (roofline prior, vLLM's default engine limits for that GPU),
Poisson arrivals at `--load` times the replica's capacity (measured first, by saturating it), prompts
uniform in 200-1000 tokens, outputs uniform in 100-300. The reference is the same simulation run by
the naive engine (every running request touched every step) on the first M requests of the same
workload, in the same run; both engines' per-request results on those M requests are compared.
CPU time is `time.process_time()` of the simulation alone (workload generation excluded).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from controlplane.tuning import catalog
from controlplane.tuning.perf_model import EngineArgs, roofline
from controlplane.tuning.simulator import SimResult, simulate
from controlplane.tuning.workload import Poisson, Uniform, Workload, synthetic

TARGET_PER_MIN = 1_000_000
PROMPT, OUTPUT = Uniform(200, 1000), Uniform(100, 300)
console = Console(width=120)


def _timed(wl: Workload, *, reference: bool, replica: object) -> tuple[SimResult, float]:
    start = time.process_time()
    res = simulate(wl, [replica], reference=reference)  # type: ignore[list-item]
    return res, time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--reference-requests", type=int, default=5_000)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the replica's measured capacity")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    prior = roofline(catalog.model("Llama-3.1-8B"), catalog.accelerator("H100-80GB"), EngineArgs())
    replica = prior.replica()
    saturating = synthetic(Poisson(500.0), PROMPT, OUTPUT, n=20_000, seed=args.seed)
    sat = simulate(saturating, [replica])
    capacity = float(sat.completed.sum()) / sat.makespan_s
    rate = args.load * capacity
    wl = synthetic(Poisson(rate), PROMPT, OUTPUT, n=args.requests, seed=args.seed + 1)

    fast, fast_s = _timed(wl, reference=False, replica=replica)
    head = wl.head(args.reference_requests)
    ref, ref_s = _timed(head, reference=True, replica=replica)
    fast_head, fast_head_s = _timed(head, reference=False, replica=replica)
    diff = max(float(np.nanmax(np.abs(getattr(fast_head, k) - getattr(ref, k)))) for k in ("ttft_s", "e2e_s"))

    series = fast.series[0]
    console.print(f"replica: Llama-3.1-8B bf16 on H100-80GB, max_num_seqs {prior.max_num_seqs}, "
                  f"max_num_batched_tokens {prior.max_num_batched_tokens}, KV {prior.memory.kv_capacity_tokens:,} "
                  f"tokens; capacity {capacity:.1f} req/s (saturated), offered {rate:.1f} req/s ({args.load:.0%})")
    console.print(f"fast run: {series.steps:,} engine steps, mean running {series.num_running.mean():.1f}, "
                  f"TTFT p50 {np.nanmedian(fast.ttft_s) * 1e3:.1f} ms, "
                  f"TPOT p50 {np.nanmedian(fast.tpot_s) * 1e3:.2f} ms, "
                  f"{int(fast.preemptions.sum())} preemptions")
    table = Table(title="simulated requests per CPU time")
    for col in ("engine", "requests", "CPU s", "req / CPU-s", "req / CPU-min", "vs reference"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    ref_rate = len(head) / ref_s
    for name, n, secs in (("naive step loop (reference)", len(head), ref_s),
                          ("event-driven, same requests", len(head), fast_head_s),
                          ("event-driven, full workload", len(wl), fast_s)):
        r = n / secs
        table.add_row(name, f"{n:,}", f"{secs:.3f}", f"{r:,.0f}", f"{r * 60:,.0f}", f"{r / ref_rate:.1f}x")
    console.print(table)
    console.print(f"max |TTFT/e2e difference| between the engines on the first {len(head):,} requests: {diff:.2e} s")
    per_min = len(wl) / fast_s * 60
    verdict = "[green]meets[/]" if per_min >= TARGET_PER_MIN else "[red]misses[/]"
    console.print(f"target >= {TARGET_PER_MIN:,} simulated requests per CPU-minute: {verdict} ({per_min:,.0f})")


if __name__ == "__main__":
    main()
