"""JSON views of SLO statuses for the REST API ("no data" stays an explicit null with a reason)."""

from __future__ import annotations

from typing import Any

from controlplane.slo.evaluate import Figure, NoData, SloStatus


def _fig(f: Figure) -> float | None:
    return None if isinstance(f, NoData) else float(f)


def status_json(s: SloStatus) -> dict[str, Any]:
    slo = s.slo
    return {
        "name": slo.name, "deployment": slo.deployment, "sli": slo.sli, "objective": slo.objective,
        "targets": [{"sli": t.sli, "threshold_s": t.threshold_s} for t in slo.targets],
        "window": {"kind": slo.window.kind, "start_unix_s": s.window_start_unix_s, "end_unix_s": s.window_end_unix_s},
        "budgeting": s.budgeting, "evaluated_unix_s": s.now_unix_s,
        "requests": {"good": s.counts.good, "bad": s.counts.bad, "unknown": s.counts.unknown,
                     "method": s.counts.method},
        "attainment": _fig(s.attainment), "error_budget_remaining": _fig(s.budget_remaining),
        "no_data": isinstance(s.attainment, NoData),
        "burn_rates": [{
            "severity": b.window.severity, "threshold": b.window.burn_rate,
            "long": {"window": b.long.label, "burn_rate": _fig(b.long.rate), "requests": b.long.counts.total},
            "short": {"window": b.short.label, "burn_rate": _fig(b.short.rate), "requests": b.short.counts.total},
        } for b in s.burn],
        "quantiles": [{"sli": q.sli, "count": q.count, "relative_error": q.relative_error,
                       "values_s": {f"p{round(p * 100):d}": _fig(v) for p, v in q.values}} for q in s.quantiles],
    }
