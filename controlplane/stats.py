"""Exact percentiles over per-request rows (linear interpolation, as numpy's default)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PHASES = ("queue_s", "prefill_s", "decode_s", "ttft_s", "tpot_s", "e2e_s")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q in [0, 100] over an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of no values is undefined")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    count: int
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    mean: float | None


def summarize(values: Iterable[float | None]) -> Summary:
    """Unknown (None) values are left out, and counted out: `count` says how many were used."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return Summary(0, None, None, None, None, None)
    return Summary(len(known), percentile(known, 50), percentile(known, 90), percentile(known, 95),
                   percentile(known, 99), sum(known) / len(known))


def phase_summaries(rows: Iterable[Mapping[str, Any]]) -> dict[str, Summary]:
    rows = list(rows)
    return {phase: summarize(r.get(phase) for r in rows) for phase in PHASES}
