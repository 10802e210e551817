"""What-if: a fleet configuration and a load in, predicted latencies, goodput, KV capacity and cost out.

`what_if(spec)` is pure (catalog -> roofline prior -> simulation -> summary); `app` is the typer
command that prints it (mounted as `controlplane tune`). Costs are per token actually served at the
offered load, from the fleet's price per hour: not a price at full utilisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from controlplane.stats import percentile
from controlplane.tuning import catalog
from controlplane.tuning.perf_model import Efficiency, EngineArgs, roofline
from controlplane.tuning.simulator import Slo, goodput, simulate
from controlplane.tuning.workload import (
    Arrivals,
    Diurnal,
    Fixed,
    FloatArray,
    LengthDist,
    LogNormal,
    OnOff,
    Poisson,
    Uniform,
    Workload,
    load_trace,
    synthetic,
)

ArrivalKind = Literal["poisson", "bursty", "diurnal"]


@dataclass(frozen=True)
class WhatIfSpec:
    model: str = "Llama-3.1-8B"
    accelerator: str = "H100-80GB"
    replicas: int = 1
    engine: EngineArgs = field(default_factory=EngineArgs)
    efficiency: Efficiency = field(default_factory=Efficiency)
    rate_rps: float = 10.0
    arrival: ArrivalKind = "poisson"
    burst_factor: float = 1.8  # bursty: rate in a burst / mean rate (bursts and lulls of 10 s on average)
    period_s: float = 600.0  # diurnal: the period of the sinusoid (amplitude 0.5)
    prompt: LengthDist = Fixed(512)
    output: LengthDist = Fixed(128)
    requests: int = 5000
    seed: int = 0
    slo: Slo = Slo(ttft_s=0.5, tpot_s=0.05)
    usd_per_gpu_hour: float | None = None  # None: the catalog's assumed price
    trace: Workload | None = None  # a recorded load to replay instead of the synthetic one (rate/lengths unused)
    trace_speedup: float = 1.0  # replay the trace this many times faster

    def workload(self) -> Workload:
        if self.trace is None:
            return synthetic(self.arrivals(), self.prompt, self.output, n=self.requests, seed=self.seed)
        if not len(self.trace):
            raise ValueError(f"the trace {self.trace.name!r} holds no request with known token counts "
                             f"({self.trace.skipped_rows} rows without)")
        if self.trace_speedup <= 0:
            raise ValueError(f"trace_speedup must be > 0, got {self.trace_speedup}")
        t = self.trace
        span = float(t.arrival_s[-1] - t.arrival_s[0]) / self.trace_speedup if len(t) else 0.0
        if span > MAX_SIMULATED_S:
            raise ValueError(f"--trace-speedup {self.trace_speedup:g} stretches the trace's arrivals over "
                             f"{span / 86_400:,.0f} days; at most {MAX_SIMULATED_S / 86_400:.0f}: raise it")
        return Workload(t.arrival_s / self.trace_speedup, t.prompt_tokens, t.output_tokens, t.name, t.skipped_rows)

    def arrivals(self) -> Arrivals:
        if self.arrival == "poisson":
            return Poisson(self.rate_rps)
        if self.arrival == "bursty":
            if not 1 <= self.burst_factor < 2:
                raise ValueError(f"burst_factor must be in [1, 2) (equal bursts and lulls), got {self.burst_factor}")
            return OnOff(self.rate_rps * self.burst_factor, self.rate_rps * (2 - self.burst_factor), 10.0, 10.0)
        return Diurnal(self.rate_rps, 0.5, self.period_s)


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(values: FloatArray) -> Percentiles:
        known = np.sort(values[np.isfinite(values)]).tolist()
        if not known:
            return Percentiles(None, None, None)
        return Percentiles(percentile(known, 50), percentile(known, 90), percentile(known, 99))


@dataclass(frozen=True)
class WhatIfResult:
    model: str
    accelerator: str
    replicas: int
    gpus_per_replica: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_capacity_tokens: int  # per replica
    kv_max_concurrency: float  # KV capacity / mean (prompt + output) tokens of the workload
    batch1_decode_step_s: float  # model figures, no queueing: a decode step of one 1k-context sequence
    prefill_1k_s: float  # and the prefill of 1024 tokens alone
    offered_rps: float | None  # None: every request arrived at one instant
    served_rps: float  # finished / makespan (the drain after the last arrival included)
    queued_at_end: int  # requests not yet scheduled when the last one arrived: grows without bound if overloaded
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    queue_s: Percentiles
    goodput_rps: float | None
    goodput_ratio: float | None
    slo: Slo
    output_tokens_per_s: float
    total_tokens_per_s: float
    mean_running: float | None
    peak_kv_usage_ratio: float | None
    preemptions: int
    rejected: int
    usd_per_hour: float
    usd_per_million_output_tokens: float | None
    usd_per_million_tokens: float | None
    notes: tuple[str, ...]


def what_if(spec: WhatIfSpec) -> WhatIfResult:
    """Simulate `spec.requests` requests of the load on the configuration; summarise. Raises ValueError
    (catalog.CatalogError included) naming the bad input."""
    if spec.replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {spec.replicas}")
    if spec.requests < 1 and spec.trace is None:
        raise ValueError(f"requests must be >= 1, got {spec.requests}")
    model, accel = catalog.model(spec.model), catalog.accelerator(spec.accelerator)
    prior = roofline(model, accel, spec.engine, spec.efficiency)
    replicas = [prior.replica(name=f"{model.name}@{accel.name}-{i}", usd_per_gpu_hour=spec.usd_per_gpu_hour)
                for i in range(spec.replicas)]
    wl = spec.workload()
    res = simulate(wl, replicas, sample_interval_s=1.0)
    notes = list(prior.notes)
    span = res.makespan_s
    done = res.completed
    out_tokens = float(wl.output_tokens[done].sum())
    all_tokens = out_tokens + float(wl.prompt_tokens[done].sum())
    usd_h = sum(r.usd_per_hour or 0.0 for r in replicas)
    offered = len(wl) / wl.duration_s if wl.duration_s > 0 else None  # all at one instant: no rate
    served = int(done.sum()) / span if span > 0 else 0.0
    # Overload shows as a backlog that grows with the run: requests still unscheduled when the last one arrives.
    last = wl.arrival_s[-1]
    backlog = int(np.sum(~res.rejected & (wl.arrival_s < last) & ~(res.scheduled_s < last)))
    if backlog > max(10, 0.05 * len(wl)):
        notes.append(f"overloaded: {backlog} requests still queued when the load ended (served {served:.2f} of "
                     f"{'?' if offered is None else f'{offered:.2f}'} req/s); the queue grows "
                     "without bound and percentiles depend on how long "
                     "the load lasts")
    if res.rejected.any():
        notes.append(f"{int(res.rejected.sum())} requests exceed max_model_len {prior.max_model_len} and were rejected")
    gp = goodput(res, spec.slo)
    running = np.concatenate([s.num_running for s in res.series])
    kv_use = np.concatenate([s.kv_usage_ratio for s in res.series])
    mean_len = float(np.mean(wl.prompt_tokens + wl.output_tokens))
    return WhatIfResult(
        model=model.name, accelerator=accel.name, replicas=spec.replicas,
        gpus_per_replica=spec.engine.tensor_parallel_size, max_num_seqs=prior.max_num_seqs,
        max_num_batched_tokens=prior.max_num_batched_tokens, max_model_len=prior.max_model_len,
        kv_capacity_tokens=replicas[0].kv_capacity_tokens,
        kv_max_concurrency=replicas[0].kv_capacity_tokens / mean_len,
        batch1_decode_step_s=prior.step_cost.decode_step_s(1, 1024), prefill_1k_s=prior.step_cost.prefill_s(1024),
        offered_rps=offered, served_rps=served, queued_at_end=backlog,
        ttft_s=Percentiles.of(res.ttft_s), tpot_s=Percentiles.of(res.tpot_s), e2e_s=Percentiles.of(res.e2e_s),
        queue_s=Percentiles.of(res.queue_s), goodput_rps=gp.rps, goodput_ratio=gp.ratio, slo=spec.slo,
        output_tokens_per_s=out_tokens / span if span > 0 else 0.0,
        total_tokens_per_s=all_tokens / span if span > 0 else 0.0,
        mean_running=float(running.mean()) if len(running) else None,
        peak_kv_usage_ratio=float(kv_use.max()) if len(kv_use) else None,
        preemptions=int(res.preemptions.sum()), rejected=int(res.rejected.sum()), usd_per_hour=usd_h,
        usd_per_million_output_tokens=usd_h / (out_tokens / span * 3600) * 1e6 if out_tokens and span else None,
        usd_per_million_tokens=usd_h / (all_tokens / span * 3600) * 1e6 if all_tokens and span else None,
        notes=tuple(notes))


# --- command line ---------------------------------------------------------------------------------
MAX_SIMULATED_S = 31 * 86_400.0  # a what-if longer than a month of simulated time is a typo, not a question
MAX_TOKENS = 10_000_000  # a prompt or output length past any model's context
MIN_EFFICIENCY = 0.01  # an MFU or bandwidth efficiency under 1 % is a typo, and stretches simulated time without end
MAX_REPLICAS, MAX_TP = 100_000, 64


def check_flag(flag: str, value: float | None, lo: float, hi: float, *, low_open: bool = False) -> None:
    """A finite number in [lo, hi] ((lo, hi] with `low_open`), or a ValueError naming the flag. By hand, not
    click.FloatRange: that lets NaN through (every comparison with NaN is false)."""
    if value is None:
        return
    if not math.isfinite(value) or value > hi or value < lo or (low_open and value == lo):
        raise ValueError(f"{flag} {value!r}: allowed: a number {'>' if low_open else '>='} {lo:g} and <= {hi:g}")


def parse_lengths(text: str, what: str) -> LengthDist:
    """'512' (fixed), '200-1000' (uniform, inclusive) or 'lognormal:MEDIAN:SIGMA[:MAX]'."""
    t = text.strip().lower()
    try:
        if t.startswith("lognormal:"):
            parts = t.split(":")[1:]
            if len(parts) not in (2, 3):
                raise ValueError
            median, sigma = float(parts[0]), float(parts[1])
            cap = int(parts[2]) if len(parts) == 3 else None
            if not (1 <= median <= MAX_TOKENS and 0 <= sigma <= 10 and (cap is None or 1 <= cap <= MAX_TOKENS)):
                raise ValueError  # NaN fails every comparison, so it lands here too
            return LogNormal(median, sigma, 1, cap)
        if "-" in t:
            lo, hi = t.split("-", 1)
            if not 1 <= int(lo) <= int(hi) <= MAX_TOKENS:  # 10-5 is no range
                raise ValueError
            return Uniform(int(lo), int(hi))
        if not 1 <= int(t) <= MAX_TOKENS:
            raise ValueError
        return Fixed(int(t))
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected N (fixed), LOW-HIGH (uniform, LOW <= HIGH) or "
                         f"lognormal:MEDIAN:SIGMA[:MAX], lengths from 1 to {MAX_TOKENS:,} tokens") from None


app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Performance model and simulator of vLLM replicas. `controlplane tune --what-if ...` is "
                       "the same as `controlplane tune what-if ...`.")
_console = Console()
_err = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Performance model and simulator of vLLM replicas (a group, so commands keep their names when mounted)."""


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}"


@app.command("what-if")
def what_if_command(
    model: Annotated[str, typer.Option(help=f"Model: {', '.join(catalog.MODELS)}.")] = "Llama-3.1-8B",
    accelerator: Annotated[str, typer.Option(help=f"GPU: {', '.join(catalog.ACCELERATORS)}.")] = "H100-80GB",
    replicas: Annotated[int, typer.Option(help="Replicas behind a least-outstanding-requests router.")] = 1,
    weights: Annotated[str, typer.Option(help="Weight precision: bf16, fp8, int8, int4.")] = "bf16",
    kv_cache: Annotated[str, typer.Option(help="KV-cache precision: bf16, fp8.")] = "bf16",
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size (GPUs per replica).")] = 1,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM --max-num-seqs (default: vLLM's).")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(help="vLLM --max-num-batched-tokens.")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vLLM --gpu-memory-utilization.")] = 0.92,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM --max-model-len.")] = None,
    rate: Annotated[float, typer.Option(help="Mean arrival rate, requests/s.")] = 10.0,
    arrival: Annotated[str, typer.Option(help="poisson, bursty (on/off) or diurnal (sinusoid).")] = "poisson",
    prompt: Annotated[str, typer.Option(help="Prompt tokens: N, LOW-HIGH or lognormal:MEDIAN:SIGMA[:MAX].")] = "512",
    output: Annotated[str, typer.Option(help="Output tokens, same forms as --prompt.")] = "128",
    requests: Annotated[int, typer.Option(help="Requests to simulate.")] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic load.")] = 0,
    ttft_slo_ms: Annotated[float, typer.Option(help="TTFT objective for goodput, ms.")] = 500.0,
    tpot_slo_ms: Annotated[float, typer.Option(help="TPOT objective for goodput, ms.")] = 50.0,
    usd_per_gpu_hour: Annotated[float | None, typer.Option(help="Price per GPU-hour (default: assumed).")] = None,
    mfu: Annotated[float, typer.Option(help="Achieved fraction of peak FLOP/s.")] = 0.5,
    bandwidth_efficiency: Annotated[float, typer.Option(help="Achieved fraction of memory bandwidth.")] = 0.8,
    trace_replica: Annotated[str | None, typer.Option(
        help="Replay the requests the store recorded for this replica ('fleet': all) instead of a synthetic "
             "load (the store of CONTROLPLANE_DATABASE_URL / CONTROLPLANE_DATA_DIR).")] = None,
    since_unix_s: Annotated[float | None, typer.Option(help="Trace window start (UNIX seconds).")] = None,
    until_unix_s: Annotated[float | None, typer.Option(help="Trace window end (UNIX seconds).")] = None,
    trace_speedup: Annotated[float, typer.Option(help="Replay the trace this many times faster.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Predict latency percentiles, goodput, KV capacity and cost of a configuration under a load."""
    trace = None
    if trace_replica is not None:
        try:  # the window first: a NaN or reversed one would read as "no request in the trace"
            for flag, bound in (("--since-unix-s", since_unix_s), ("--until-unix-s", until_unix_s)):
                check_flag(flag, bound, 0.0, 1e11)
            if since_unix_s is not None and until_unix_s is not None and since_unix_s >= until_unix_s:
                raise ValueError(f"--since-unix-s {since_unix_s:g} is not before --until-unix-s {until_unix_s:g}")
        except ValueError as exc:
            _err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        trace = _load_trace(None if trace_replica == "fleet" else trace_replica, since_unix_s, until_unix_s)
    try:
        if arrival not in ("poisson", "bursty", "diurnal"):
            raise ValueError(f"--arrival {arrival!r}: allowed: poisson, bursty, diurnal")
        for flag, value, lo, hi in (
                ("--rate", rate, 0.0, 1e6), ("--trace-speedup", trace_speedup, 0.0, 1e6),
                ("--ttft-slo-ms", ttft_slo_ms, 0.0, 1e7), ("--tpot-slo-ms", tpot_slo_ms, 0.0, 1e7),
                ("--mfu", mfu, MIN_EFFICIENCY, 1.0),
                ("--bandwidth-efficiency", bandwidth_efficiency, MIN_EFFICIENCY, 1.0),
                ("--gpu-memory-utilization", gpu_memory_utilization, 0.0, 1.0)):
            check_flag(flag, value, lo, hi, low_open=True)
        check_flag("--usd-per-gpu-hour", usd_per_gpu_hour, 0.0, 1e4)
        for flag, n, most in (("--max-num-seqs", max_num_seqs, 10_000_000),
                              ("--max-num-batched-tokens", max_num_batched_tokens, 10_000_000),
                              ("--requests", requests, 10_000_000), ("--replicas", replicas, MAX_REPLICAS),
                              ("--tp", tp, MAX_TP)):
            if n is not None and not 1 <= n <= most:
                raise ValueError(f"{flag} {n}: allowed: a whole number from 1 to {most:,}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed {seed}: allowed: a whole number from 0 to {2**32 - 1:,}")
        if trace is None and requests / rate > MAX_SIMULATED_S:
            raise ValueError(f"--requests {requests} at --rate {rate:g} simulate {requests / rate / 86_400:,.0f} "
                             f"days; at most {MAX_SIMULATED_S / 86_400:.0f}: raise --rate or lower --requests")
        spec = WhatIfSpec(
            model=model, accelerator=accelerator, replicas=replicas,
            engine=EngineArgs(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                              tensor_parallel_size=tp, weights=catalog.weight_precision(weights),
                              kv_cache=catalog.kv_precision(kv_cache)),
            efficiency=Efficiency(mfu=mfu, bandwidth=bandwidth_efficiency), rate_rps=rate,
            arrival=arrival,  # type: ignore[arg-type]  # checked just above
            prompt=parse_lengths(prompt, "prompt"), output=parse_lengths(output, "output"), requests=requests,
            seed=seed, slo=Slo(ttft_s=ttft_slo_ms / 1e3, tpot_s=tpot_slo_ms / 1e3), usd_per_gpu_hour=usd_per_gpu_hour,
            trace=trace, trace_speedup=trace_speedup)
        result = what_if(spec)
    except (ValueError, OverflowError) as exc:
        _err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        _console.print_json(json.dumps(dataclasses.asdict(result)))
        return
    _console.print(render(result))


def _load_trace(replica: str | None, since: float | None, until: float | None) -> Workload:
    """The store edge: open the configured store and read the trace."""
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from controlplane.settings import Settings, describe_errors
    from controlplane.store.db import make_engine
    from controlplane.store.repo import Store

    try:
        url = Settings().resolved_database_url()
    except ValidationError as exc:
        for line in describe_errors(exc):
            _err.print(f"error: {line}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        # Read only: opening it would create an empty store (and its directory) and then find no requests table.
        _err.print(f"error: --trace-replica: no store at {parsed.database} (CONTROLPLANE_DATA_DIR / "
                   "CONTROLPLANE_DATABASE_URL); the plane records requests there while it runs",
                   style="red", markup=False, highlight=False)
        raise typer.Exit(2)
    engine = make_engine(url)
    try:
        if replica is not None:
            from controlplane.api.queries import NotFound, check_replica_known

            try:
                check_replica_known(engine, replica)
            except NotFound as exc:  # a misspelt name, not a replica that served nothing
                _err.print(f"error: --trace-replica: {exc} ('fleet': every replica)", style="red", markup=False,
                           highlight=False)
                raise typer.Exit(2) from None
        return load_trace(Store(engine), replica=replica, since_unix_s=since, until_unix_s=until)
    except SQLAlchemyError as exc:
        _err.print(f"error: cannot read requests from the store: {str(exc).splitlines()[0]}", style="red",
                   markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def render(r: WhatIfResult) -> Table:
    t = Table(title=f"what-if: {r.replicas} x {r.model} on {r.gpus_per_replica} x {r.accelerator}", show_header=True)
    t.add_column("")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    for label, p in (("TTFT ms", r.ttft_s), ("TPOT ms", r.tpot_s), ("e2e ms", r.e2e_s), ("queue ms", r.queue_s)):
        t.add_row(label, _ms(p.p50), _ms(p.p90), _ms(p.p99))
    t.add_section()
    slo = f"TTFT <= {_ms(r.slo.ttft_s)} ms, TPOT <= {_ms(r.slo.tpot_s)} ms"
    gp = "-" if r.goodput_rps is None else f"{r.goodput_rps:,.2f} req/s"
    ratio = "-" if r.goodput_ratio is None else f"{r.goodput_ratio:.1%}"
    rows = [
        ("goodput", gp, ratio, slo),
        ("load", "all at once" if r.offered_rps is None else f"{r.offered_rps:,.2f} offered",
         f"{r.served_rps:,.2f} served",
         f"req/s; {r.queued_at_end} queued at the end"),
        ("throughput", f"{r.output_tokens_per_s:,.0f} out", f"{r.total_tokens_per_s:,.0f} all", "tokens/s"),
        ("KV capacity", f"{r.kv_capacity_tokens:,} tokens", f"{r.kv_max_concurrency:,.0f} seqs", "per replica"),
        ("batch limits", f"{r.max_num_seqs} seqs", f"{r.max_num_batched_tokens} tokens",
         f"max_model_len {r.max_model_len}"),
        ("busy", "-" if r.mean_running is None else f"{r.mean_running:.1f} running",
         "-" if r.peak_kv_usage_ratio is None else f"{r.peak_kv_usage_ratio:.0%} peak KV",
         f"{r.preemptions} preemptions"),
        ("model", f"{_ms(r.batch1_decode_step_s)} ms", f"{_ms(r.prefill_1k_s)} ms",
         "batch-1 step (1k context) / 1k prefill"),
        ("cost", f"${r.usd_per_hour:,.2f}/h",
         "-" if r.usd_per_million_output_tokens is None else f"${r.usd_per_million_output_tokens:,.3f}",
         "per 1M output tokens" + ("" if r.usd_per_million_tokens is None
                                   else f" (${r.usd_per_million_tokens:,.3f} per 1M all)")),
    ]
    for row in rows:
        t.add_row(*row)
    if r.notes:
        t.caption = "; ".join(r.notes)
    return t


@app.command("search")
def search_command(
    deployment: Annotated[str, typer.Argument(help="A deployment the running plane supervises.")],
    target_rps: Annotated[float | None, typer.Option(help="Rate to size the fleet for (default: recorded mean).")]
    = None,
    window_s: Annotated[float, typer.Option(help="How far back the recorded requests reach, s.")] = 1800.0,
    canary: Annotated[int | None, typer.Option(help="Real trials on a canary replica (default: the spec's "
                                                    "tuning.canary_trials).")] = None,
    mode: Annotated[str | None, typer.Option(help="recommend (a person applies) or auto (applied, judged, rolled "
                                                  "back if the SLO got worse); default: the plane's tuner mode.")]
    = None,
    api: Annotated[str | None, typer.Option(help="The plane's API (default: from CONTROLPLANE_BIND_HOST and "
                                                 "CONTROLPLANE_API_PORT).")] = None,
    token: Annotated[str | None, typer.Option(envvar="CONTROLPLANE_API_TOKEN", help="Bearer token of the API.")]
    = None,
    timeout_s: Annotated[float, typer.Option(help="Give up waiting after this long, s.")] = 1800.0,
) -> None:
    """Search a running deployment's batch limits and replica count on its own recorded requests (optionally
    with canary trials) through the plane's API, and print the recommendation it stored."""
    import time

    import httpx
    from pydantic import ValidationError

    from controlplane.settings import Settings, describe_errors, is_sendable_token

    try:
        check_flag("--target-rps", target_rps, 0.0, 1e6, low_open=True)
        check_flag("--window-s", window_s, 60.0, 7 * 86_400.0)
        check_flag("--timeout-s", timeout_s, 0.0, 7 * 86_400.0, low_open=True)
        url = api or (local := Settings()).local_url(local.api_port)
        if token is not None and not is_sendable_token(token):
            raise ValueError("--token / CONTROLPLANE_API_TOKEN: the token must be printable ASCII without spaces")
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too: a bad CONTROLPLANE_* setting
        for why in describe_errors(exc) if isinstance(exc, ValidationError) else [str(exc)]:
            _err.print(f"error: {why}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    body = {k: v for k, v in {"target_rps": target_rps, "window_s": window_s, "canary_trials": canary,
                              "mode": mode}.items() if v is not None}
    try:
        # No token, no header: an empty bearer value is no header httpx can send (and the API says what it needs).
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=url, timeout=30.0, headers=auth) as c:
            r = c.post(f"/api/v1/deployments/{deployment}/search", json=body)
            if r.status_code != 202:
                _err.print(f"[red]error:[/] {r.status_code}: {_detail(r)}")
                raise typer.Exit(2 if r.status_code in (401, 403, 404, 409, 422) else 1)
            job, shown, t0 = r.json(), 0, time.monotonic()
            with _console.status(f"search {job['id']} of {deployment}") as status:
                while job["status"] == "running" and time.monotonic() - t0 < timeout_s:
                    time.sleep(1.0)
                    got = c.get(f"/api/v1/searches/{job['id']}")
                    if got.status_code != 200:  # e.g. 404 from a plane restarted meanwhile (searches live in it)
                        _err.print(f"[red]error:[/] search {job['id']}: {got.status_code}: {_detail(got)}")
                        raise typer.Exit(1)
                    job = got.json()
                    for p in job["progress"][shown:]:
                        _console.print(f"  {p['line']}")
                        status.update(p["line"])
                    shown = len(job["progress"])
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        _err.print(f"[red]error:[/] cannot reach the plane's API at {url}: {exc}")
        raise typer.Exit(1) from None
    if job["status"] == "running":
        _err.print(f"[red]error:[/] search {job['id']} still running after {timeout_s:.0f} s; "
                   f"see GET {url}/api/v1/searches/{job['id']}")
        raise typer.Exit(1)
    if job["status"] == "failed":
        _err.print(f"[red]error:[/] {job['error']}")
        raise typer.Exit(1)
    res = job["result"]
    _console.print(f"[bold]{res['outcome']}[/]")
    ev = res["evidence"]
    table = Table(title=f"{deployment}: running vs searched (target {ev['target_rps']:.3g} req/s)")
    usd = ev.get("cost_unit", "USD") == "USD"
    for col in ("", "engine", "replicas", "capacity req/s per replica", "$/h" if usd else "GPU-h/h (no price)"):
        table.add_column(col)
    cur = ev["current"]
    now_engine, new_engine = cur.get("engine") or {}, ev.get("engine") or {}
    differ = [k for k in new_engine if new_engine.get(k) != now_engine.get(k)] or list(new_engine)[:2]

    def cost(v: float | None) -> str:
        return "-" if v is None else f"{v:,.2f}" if usd else _num(v)

    # What the running fleet costs now, and what the replicas it needs would cost (the searched row's basis).
    needed = cost(cur.get("cost_per_hour_needed", cur.get("usd_per_hour_needed")))
    running = f"{cost(cur.get('usd_per_hour'))} (needs {needed})" if usd else f"needs {needed}"
    table.add_row("running", _fields(now_engine, differ), f"{cur['replicas']} (needs {cur['replicas_needed']})",
                  _num(cur["capacity_rps_per_replica"]), running)
    table.add_row("searched", _fields(new_engine, differ), str(ev["replicas"]), _num(ev["capacity_rps_per_replica"]),
                  cost(ev.get("cost_per_hour", ev.get("usd_per_hour"))))
    _console.print(table)
    rid, auto = res["recommendation_id"], res.get("auto")
    if rid is not None and auto is not None:
        _console.print(f"recommendation {rid} was applied (auto mode): {auto.get('verdict')}"
                       + (f"; {auto['error']}" if auto.get("error") else ""))
    elif rid is not None:
        _console.print(f"recommendation {rid}: POST {url}/api/v1/recommendations/{rid}/apply to roll it out")


def _fields(engine: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k} {engine.get(k)}" for k in keys) or "-"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.3g}"


def _detail(r: Any) -> str:
    text = str(r.text)[:300]
    try:
        return str(r.json().get("detail", text))
    except ValueError:
        return text
