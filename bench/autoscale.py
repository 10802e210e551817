"""Autoscaling side by side: this project's autoscaler, four peers' published policies and a clairvoyant oracle.

    .venv/bin/python bench/autoscale.py [--traces bursty,diurnal] [--mean-rps 60] [--duration-s 3600]
                                        [--startup-s 90] [--interval-s 15] [--seed 1] [--unknown 0.0]
                                        [--policies all]          # about 3 CPU-minutes
                                        [--sweep]                 # + this autoscaler's settings, a frontier

Setup (the same for every policy): Qwen2.5-7B with FP8 weights and FP8 KV cache on L4 GPUs (roofline prior,
max_num_seqs 64, max_num_batched_tokens 2048), prompts lognormal (median 500 tokens), outputs lognormal (median
300), two SLOs: TTFT <= 500 ms and TPOT <= 50 ms for 99% of requests. Per-replica goodput at the SLO is
bisected once by simulation at fleet sizes 1-16 (Poisson load, its own seed) and handed to every policy that
plans with it (ours, Dynamo's profile, the oracle); Ray Serve's target_ongoing_requests is set to the
requests in flight one replica sustains at that capacity (its default of 2 would be absurd for vLLM).
Traces (fixed seeds): bursty = on/off Poisson, bursts 2.5x the lull rate, bursts and lulls of 120 s and
240 s on average; diurnal = one sinusoidal "day" (amplitude 0.6) over the run, starting at the trough. Every
policy starts with the oracle's first count, ready, and pays `--startup-s` of GPU time before a new replica
serves. GPU-hours count starting and draining replicas, from 0 to the last arrival. The oracle plans with the
whole trace at the highest utilization of capacity (bisected to 0.01) whose run still keeps 99% within SLO: the
cheapest plan of its kind that does. `static-peak` (a reference, not a baseline) holds the oracle's largest
count all along: what provisioning for the peak without autoscaling costs.

Target (issue 6): ours >= 99% of requests within every SLO, <= 1.10x the oracle's GPU-hours, and versus
each baseline ahead on one of (attainment, GPU-hours) without being behind on the other.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from controlplane.slo.spec import LatencyTarget, Slo, SloWindow
from controlplane.tuning import catalog
from controlplane.tuning.autoscaler import AutoscalerConfig, Policy, SloAutoscaler
from controlplane.tuning.capacity import (
    Capacity,
    FleetCapacity,
    Objective,
    measure_fleet_capacity,
    objectives_from_slos,
)
from controlplane.tuning.fleet_sim import FleetRun, FleetSimConfig, run_fleet
from controlplane.tuning.forecast import ForecastConfig
from controlplane.tuning.peers import (
    DynamoPlanner,
    KedaQueue,
    LatencyProfile,
    LlmdSaturation,
    Oracle,
    RayServe,
    oracle_plan,
)
from controlplane.tuning.perf_model import EngineArgs, ReplicaModel, roofline
from controlplane.tuning.workload import Diurnal, LogNormal, OnOff, Poisson, Workload, synthetic

PROMPT, OUTPUT = LogNormal(500, 0.8, 16, 4000), LogNormal(300, 0.7, 8, 2000)
TTFT_S, TPOT_S, OBJECTIVE = 0.5, 0.05, 0.99
MAX_REPLICAS = 64
console = Console(width=150)


def slos() -> list[Slo]:
    window = SloWindow("rolling", 28 * 86_400.0)
    return [Slo("chat-ttft", "chat", "ttft", (LatencyTarget("ttft", TTFT_S),), OBJECTIVE, window),
            Slo("chat-tpot", "chat", "tpot", (LatencyTarget("tpot", TPOT_S),), OBJECTIVE, window)]


def replica_model() -> ReplicaModel:
    # max_num_seqs 64, not vLLM's 256: the same goodput at the SLO (measured: 3.01 vs 3.03 req/s per replica in a
    # fleet of 4), but the batch fills at the SLO point, so a queue forms exactly when the SLO is at risk: the
    # signal the queue- and saturation-based peers scale on. With 256 they would see no queue until TPOT is
    # long broken, which would be unfair to them.
    args = EngineArgs(max_num_seqs=64, weights=catalog.WeightPrecision.FP8, kv_cache=catalog.KvPrecision.FP8,
                      max_model_len=8192)
    return roofline(catalog.model("Qwen2.5-7B"), catalog.accelerator("L4"), args).replica(name="qwen7b-fp8@L4")


def trace(kind: str, mean_rps: float, duration_s: float, seed: int) -> Workload:
    if kind == "bursty":
        lull = mean_rps / 1.5  # bursts 2.5x the lull, on 1/3 of the time: mean = 1.5x the lull
        return synthetic(OnOff(2.5 * lull, lull, 120.0, 240.0), PROMPT, OUTPUT, duration_s=duration_s, seed=seed,
                         name="bursty")
    if kind == "diurnal":
        return synthetic(Diurnal(mean_rps, 0.6, duration_s, -math.pi / 2), PROMPT, OUTPUT, duration_s=duration_s,
                         seed=seed, name="diurnal")
    raise SystemExit(f"unknown trace {kind!r}; allowed: bursty, diurnal")


@dataclass(frozen=True)
class Row:
    policy: str
    good: float
    ttft_p99_s: float
    tpot_p99_s: float
    gpu_hours: float
    actions: int
    cpu_s: float


def _row(run: FleetRun, objectives: list[Objective], cpu_s: float) -> Row:
    res = run.result
    actions = sum(1 for t in run.ticks if t.desired != t.current)
    return Row(run.policy, run.good_ratio(objectives), float(np.nanpercentile(res.ttft_s, 99)),
               float(np.nanpercentile(res.tpot_s, 99)), run.gpu_hours, actions, cpu_s)


def calibrated_oracle(wl: Workload, replica: ReplicaModel, fc: FleetCapacity, objectives: list[Objective],
                      args: argparse.Namespace) -> tuple[float, tuple[int, ...], FleetRun, float]:
    """The oracle's plan at the highest utilization of capacity (to 0.01) whose run still meets the SLO: knowing
    the future exactly, it is the cheapest plan of its kind that keeps >= 99% of requests within every SLO."""
    def attempt(u: float) -> tuple[tuple[int, ...], FleetRun, float]:
        t0 = time.process_time()
        plan = oracle_plan(wl, fc, interval_s=args.interval_s, startup_s=args.startup_s, max_replicas=MAX_REPLICAS,
                           utilization=u)
        cfg = FleetSimConfig(interval_s=args.interval_s, startup_s=args.startup_s, initial_replicas=plan[0],
                             max_replicas=MAX_REPLICAS, seed=args.seed)
        return plan, run_fleet(wl, replica, Oracle(plan, args.interval_s), objectives, cfg), time.process_time() - t0

    lo, hi = 0.6, 1.0
    best = attempt(hi)
    if best[1].good_ratio(objectives) >= OBJECTIVE:
        return hi, *best
    best = attempt(lo)
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        trial = attempt(mid)
        if trial[1].good_ratio(objectives) >= OBJECTIVE:
            lo, best = mid, trial
        else:
            hi = mid
    return lo, *best


def policies(fc: FleetCapacity, one: Capacity, objectives: list[Objective],
             args: argparse.Namespace) -> list[Policy[Any]]:
    ours = AutoscalerConfig(fc, max_replicas=MAX_REPLICAS, startup_s=args.startup_s, interval_s=args.interval_s,
                            slo_objective=OBJECTIVE)
    return [
        SloAutoscaler(ours),
        RayServe(target_ongoing_requests=fc.in_flight_per_replica or 2.0, max_replicas=MAX_REPLICAS),
        KedaQueue(max_replicas=MAX_REPLICAS),
        LlmdSaturation(max_replicas=MAX_REPLICAS),
        DynamoPlanner(LatencyProfile.from_capacity(one, objectives), TTFT_S, TPOT_S, max_replicas=MAX_REPLICAS),
    ]


def verdicts(rows: list[Row]) -> dict[str, str]:
    by = {r.policy: r for r in rows}
    out = {"oracle": "reference", "static-peak": "reference"}
    if "controlplane" not in by:
        return {r.policy: "" for r in rows} | out
    ours, oracle = by["controlplane"], by["oracle"]
    ratio = ours.gpu_hours / oracle.gpu_hours
    ok = ours.good >= OBJECTIVE and ratio <= 1.10
    out["controlplane"] = ("[green]meets[/]" if ok else "[red]misses[/]") + f" (>= 99%: {ours.good >= OBJECTIVE}, " \
                                                                            f"<= 1.10x oracle: {ratio <= 1.10})"
    for r in rows:
        if r.policy in ("oracle", "static-peak", "controlplane"):
            continue
        not_behind = ours.good >= r.good and ours.gpu_hours <= r.gpu_hours
        ahead = ours.good > r.good or ours.gpu_hours < r.gpu_hours
        out[r.policy] = "[green]ours ahead[/]" if not_behind and ahead else "[red]ours not ahead[/]"
    return out


SWEEP = {  # this autoscaler's knobs that trade GPU-hours for attainment (defaults: 0.95, 0.9, one lead time, 0.95)
    "target_utilization": (0.95, 1.0),
    "scale_down_utilization": (0.7, 0.8, 0.9),  # min_utilization (0.7) is the floor
    "downscale_delay_s": (None, 300.0, 900.0),
    "surge_quantile": (0.8, 0.95),
}


def sweep(wl: Workload, replica: ReplicaModel, fc: FleetCapacity, objectives: list[Objective], cfg: FleetSimConfig,
          oracle_h: float, args: argparse.Namespace) -> Table:
    """Every combination of SWEEP's settings on one trace: the frontier this policy family reaches, so a missed
    target can be told apart from a badly tuned default."""
    import itertools

    rows: list[tuple[dict[str, Any], Row]] = []
    for values in itertools.product(*SWEEP.values()):
        s = dict(zip(SWEEP, values, strict=True))
        conf = AutoscalerConfig(fc, max_replicas=MAX_REPLICAS, startup_s=args.startup_s, interval_s=args.interval_s,
                                slo_objective=OBJECTIVE, target_utilization=s["target_utilization"],
                                scale_down_utilization=s["scale_down_utilization"],
                                downscale_delay_s=s["downscale_delay_s"],
                                forecast=ForecastConfig(surge_quantile=s["surge_quantile"]))
        t0 = time.process_time()
        rows.append((s, _row(run_fleet(wl, replica, SloAutoscaler(conf), objectives, cfg), objectives,
                             time.process_time() - t0)))
    rows.sort(key=lambda sr: sr[1].gpu_hours)
    table = Table(title=f"{wl.name}: this autoscaler over {len(rows)} settings (cheapest first)")
    for col in (*SWEEP, "within SLO", "GPU-hours", "vs oracle"):
        table.add_column(col, justify="right")
    best = None
    for s, r in rows:
        if best is None and r.good >= OBJECTIVE:
            best = (s, r)
        table.add_row(*("default" if v is None else f"{v:g}" for v in s.values()), f"{r.good:.2%}",
                      f"{r.gpu_hours:.2f}", f"{r.gpu_hours / oracle_h:.3f}x")
    table.caption = ("none keeps 99% within the SLO" if best is None else
                     f"cheapest setting that keeps 99%: {best[1].good:.2%} at {best[1].gpu_hours / oracle_h:.3f}x "
                     "the oracle's GPU-hours")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default="bursty,diurnal")
    ap.add_argument("--mean-rps", type=float, default=60.0)
    ap.add_argument("--duration-s", type=float, default=3600.0)
    ap.add_argument("--startup-s", type=float, default=90.0)
    ap.add_argument("--interval-s", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--unknown", type=float, default=0.0, help="probability that a reading is unknown")
    ap.add_argument("--policies", default="all", help="comma-separated names, or all")
    ap.add_argument("--sweep", action="store_true", help="also run this autoscaler over a grid of its settings")
    args = ap.parse_args()
    cpu0 = time.process_time()
    replica = replica_model()
    objectives, notes = objectives_from_slos(slos())
    calib = synthetic(Poisson(1.0), PROMPT, OUTPUT, n=20_000, seed=args.seed + 1000)
    ones: list[Capacity] = []
    fc = measure_fleet_capacity(replica, calib, objectives, sizes=(1, 2, 4, 8, 16), requests=1000,
                                progress=lambda n, c: ones.append(c) if n == 1 else None)
    console.print(f"replica {replica.name}: max_num_seqs {replica.max_num_seqs}, max_num_batched_tokens "
                  f"{replica.max_num_batched_tokens}, KV {replica.kv_capacity_tokens:,} tokens; per-replica goodput at "
                  f"the SLO by fleet size {dict(zip(fc.sizes, (round(r, 2) for r in fc.per_replica_rps), strict=True))}"
                  f" req/s; in flight at capacity {fc.in_flight_per_replica:.1f} ({time.process_time() - cpu0:.1f} "
                  "CPU s)")
    for kind in args.traces.split(","):
        wl = trace(kind.strip(), args.mean_rps, args.duration_s, args.seed)
        u, plan, oracle_run, oracle_cpu = calibrated_oracle(wl, replica, fc, list(objectives), args)
        cfg = FleetSimConfig(interval_s=args.interval_s, startup_s=args.startup_s, initial_replicas=plan[0],
                             max_replicas=MAX_REPLICAS, unknown_probability=args.unknown, seed=args.seed)
        rows = [_row(oracle_run, list(objectives), oracle_cpu)]
        # Reference, not a baseline: no autoscaling, the fleet the busiest minute needs (what foresight-free
        # provisioning for bursts costs).
        static = Oracle((max(plan),), args.interval_s, name="static-peak")
        t0 = time.process_time()
        rows.append(_row(run_fleet(wl, replica, static, objectives, replace(cfg, initial_replicas=max(plan))),
                         list(objectives), time.process_time() - t0))
        chosen = [p for p in policies(fc, ones[0], list(objectives), args)
                  if args.policies == "all" or p.name in args.policies.split(",")]
        for pol in chosen:
            t0 = time.process_time()
            rows.append(_row(run_fleet(wl, replica, pol, objectives, cfg), list(objectives), time.process_time() - t0))
        oracle_h = rows[0].gpu_hours
        v = verdicts(rows)
        unknown = f", {args.unknown:.0%} readings unknown" if args.unknown else ""
        table = Table(title=f"{kind}: {len(wl):,} requests over {wl.duration_s / 60:.0f} min, mean "
                            f"{len(wl) / wl.duration_s:.1f} req/s; start-up {args.startup_s:.0f} s, decisions every "
                            f"{args.interval_s:.0f} s{unknown}; oracle at {u:.3f} of capacity")
        for col in ("policy", "within SLO", "p99 TTFT ms", "p99 TPOT ms", "GPU-hours", "vs oracle", "scale actions",
                    "CPU s", "target"):
            table.add_column(col, justify="left" if col in ("policy", "target") else "right")
        for r in rows:
            table.add_row(r.policy, f"{r.good:.2%}", f"{r.ttft_p99_s * 1e3:,.0f}", f"{r.tpot_p99_s * 1e3:,.1f}",
                          f"{r.gpu_hours:.2f}", f"{r.gpu_hours / oracle_h:.3f}x", str(r.actions), f"{r.cpu_s:.1f}",
                          v[r.policy])
        console.print(table)
        if args.sweep:
            console.print(sweep(wl, replica, fc, list(objectives), cfg, oracle_h, args))
    if notes:
        console.print("; ".join(notes))
    console.print(f"total CPU {time.process_time() - cpu0:.1f} s")


if __name__ == "__main__":
    main()
