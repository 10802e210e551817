"""Map a vLLM /metrics scrape to one engine reading, across vLLM versions; adjust counters for resets.

Pure functions only: the scrape loop (collectors/scrape_loop.py) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from collectors.promtext import Sample
from controlplane import names

_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

# Counters we keep (canonical family name -> reading field name).
COUNTERS: Mapping[str, str] = {
    names.VLLM_PREEMPTIONS: "preemptions_total",
    names.VLLM_PROMPT_TOKENS: "prompt_tokens_total",
    names.VLLM_GENERATION_TOKENS: "generation_tokens_total",
    names.VLLM_REQUEST_SUCCESS: "request_success_total",
    names.VLLM_PREFIX_CACHE_QUERIES: "prefix_cache_queries_total",
    names.VLLM_PREFIX_CACHE_HITS: "prefix_cache_hits_total",
}


FAILED_REASONS = frozenset({"abort", "error"})
PROCESS_START = "process_start_time_seconds"


def canonical_name(name: str) -> str:
    """Canonical vLLM sample name: `ray_vllm` prefixes removed and old names mapped to new ones.

    The suffix (`_total`, `_bucket`, ...) is kept, so `vllm:gpu_cache_usage_perc` becomes
    `vllm:kv_cache_usage_perc` and `ray_vllm_time_per_output_token_seconds_bucket` becomes
    `vllm:inter_token_latency_seconds_bucket`.
    """
    for prefix in names.VLLM_FOREIGN_PREFIXES:
        if name.startswith(prefix):
            name = names.VLLM_PREFIX + name[len(prefix) :]
            break
    if name in names.VLLM_RENAMES:
        return names.VLLM_RENAMES[name]
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in names.VLLM_RENAMES:
            return names.VLLM_RENAMES[name[: -len(suffix)]] + suffix
    return name


@dataclass(frozen=True)
class EngineReading:
    """One replica's state from one scrape. None = not exposed by this engine (unknown), never 0."""

    kv_usage_ratio: float | None = None
    kv_capacity_tokens: int | None = None
    kv_block_size_tokens: int | None = None
    num_running: float | None = None
    num_waiting: float | None = None
    counters: Mapping[str, float | None] = field(default_factory=dict)
    # The same counters per series ("field{labels}" -> raw value): resets are detected per series,
    # since one engine of several restarting must not look like a drop of the sum.
    counter_series: Mapping[str, float] = field(default_factory=dict)
    # When the process serving /metrics started (prometheus_client's process collector): a change between two
    # scrapes is a restart even when the new counters have already passed the old values.
    process_start_s: float | None = None


def _sum(samples: list[Sample]) -> float | None:
    return sum(s.value for s in samples) if samples else None


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(float(labels[key]))
    except (KeyError, ValueError, OverflowError):  # missing, not a number, or inf
        return None


def read_engine(samples: Iterable[Sample]) -> EngineReading:
    """Fold the samples of one endpoint (possibly several engines / models) into one reading.

    Running / waiting / counters are summed across engines; KV usage is the mean over engines
    (each engine has its own cache of the same size); KV capacity is summed.
    """
    grouped: dict[str, list[Sample]] = {}
    for s in samples:
        grouped.setdefault(canonical_name(s.name), []).append(s)

    kv = grouped.get(names.VLLM_KV_USAGE, [])
    kv_usage = sum(s.value for s in kv) / len(kv) if kv else None

    capacity: int | None = None
    block: int | None = None
    for s in grouped.get(names.VLLM_CACHE_CONFIG_INFO, []):
        # Newer vLLM labels the size in tokens directly; older ones give blocks and block size.
        block = _int_label(s.labels, "block_size") or block
        tokens = _int_label(s.labels, "kv_cache_size_tokens")
        if tokens is None:
            blocks = _int_label(s.labels, "num_gpu_blocks")
            tokens = blocks * block if blocks is not None and block is not None else None
        if tokens is not None:
            capacity = (capacity or 0) + tokens

    # Counters are kept per series (resets are per engine); the per-field sums derive from them.
    # vllm:request_success counts every finished request by finished_reason, failures included:
    # abort / error series are counted as request_errors_total instead.
    series: dict[str, float] = {}
    for family, field_name in COUNTERS.items():
        for smp in grouped.get(family + "_total", []) or grouped.get(family, []):
            name = field_name
            if family == names.VLLM_REQUEST_SUCCESS and smp.labels.get("finished_reason") in FAILED_REASONS:
                name = "request_errors_total"
            series[name + "{" + ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items())) + "}"] = smp.value
    counters = counter_totals(series)
    starts = grouped.get(PROCESS_START, [])
    return EngineReading(
        counter_series=series,
        process_start_s=starts[0].value if len(starts) == 1 else None,  # several: not one process's
        kv_usage_ratio=kv_usage,
        kv_capacity_tokens=capacity,
        kv_block_size_tokens=block,
        num_running=_sum(grouped.get(names.VLLM_NUM_RUNNING, [])),
        num_waiting=_sum(grouped.get(names.VLLM_NUM_WAITING, [])),
        counters=counters,
    )


@dataclass(frozen=True)
class CounterState:
    """Per-replica memory for reset handling: the last raw value and the offset carried over resets, and the
    serving process's start time last seen."""

    last_raw: Mapping[str, float] = field(default_factory=dict)
    offset: Mapping[str, float] = field(default_factory=dict)
    process_start_s: float | None = None


def sum_series(adjusted: Mapping[str, float | None], fields: Iterable[str]) -> dict[str, float | None]:
    """Per-field totals of adjusted series; a field with no series is unknown (None), not 0."""
    out: dict[str, float | None] = dict.fromkeys(fields)
    for key, value in adjusted.items():
        name = key.split("{", 1)[0]
        if value is not None:
            out[name] = (out.get(name) or 0.0) + value
    return out


def counter_totals(series: Mapping[str, float | None]) -> dict[str, float | None]:
    """The per-field totals of a reading's counter series (raw or reset-adjusted). When the engine exposes
    finished requests at all, a finished reason with no series yet (vLLM creates them on first use) is a
    true zero, not unknown: the error-rate SLI needs both counts."""
    counters = sum_series(series, [*COUNTERS.values(), "request_errors_total"])
    if any(k.startswith(("request_success_total{", "request_errors_total{")) for k in series):
        for key in ("request_success_total", "request_errors_total"):
            counters[key] = counters[key] or 0.0
    return counters


def _family(series_key: str) -> str:
    """The vLLM family a counter series comes from: errors are request_success's abort / error reasons, so an
    engine that has made no error series yet (vLLM makes them on first use) still exposes that family."""
    field_name = series_key.split("{", 1)[0]
    return "request_success_total" if field_name == "request_errors_total" else field_name


def adjust_counters(
    raw: Mapping[str, float | None], state: CounterState, process_start_s: float | None = None,
) -> tuple[dict[str, float | None], CounterState, bool]:
    """Make counters monotonic across engine restarts (Prometheus `rate()` semantics).

    A value below the previous one means the engine restarted and the counter began again at 0:
    the previous value is added to the offset. Unknown (None) values stay unknown and do not
    disturb the state. A series seen before and absent from this scrape while others of its field are
    there (an engine restarted that has not made it again yet, or labels that come and go) is carried
    at its last adjusted value:
    dropping it would make the stored sum fall, and its return would then add its old value back
    in one interval. A changed `process_start_s` (the serving process restarted) resets every series, even
    one whose new value already passed its old one between two scrapes (which a drop alone would miss).
    Returns (adjusted values, new state, whether any counter reset).
    """
    last = dict(state.last_raw)
    offset = dict(state.offset)
    out: dict[str, float | None] = {}
    reset = False
    if process_start_s is None:
        process_start_s = state.process_start_s
    elif state.process_start_s is not None and abs(process_start_s - state.process_start_s) > 1.0:
        for key, was in last.items():  # every counter began again at 0 in the new process
            offset[key] = offset.get(key, 0.0) + was
        last = dict.fromkeys(last, 0.0)
        reset = bool(last)
    for key, value in raw.items():
        if value is None:
            out[key] = None
            continue
        prev = last.get(key)
        if prev is not None and value < prev:
            offset[key] = offset.get(key, 0.0) + prev
            reset = True
        last[key] = value
        out[key] = value + offset.get(key, 0.0)
    present = {_family(key) for key in raw}
    for key, prev in last.items():
        # Only within a family this scrape exposes at all: a scrape without any of its series says nothing of it
        # (unknown), and carrying the old total would read as no tokens served at full cost.
        if key not in raw and _family(key) in present:
            out[key] = prev + offset.get(key, 0.0)
    return out, CounterState(last, offset, process_start_s), reset
