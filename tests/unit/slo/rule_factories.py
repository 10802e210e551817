"""Small SLO factories for the rule tests: one call, only the fields a test cares about."""

from __future__ import annotations

from controlplane.slo.model import Alerting, BurnWindow, LatencyTarget, SliKind, Slo, SloWindow, workbook_windows

DAY = 86400.0


def make_slo(name: str = "t", sli: SliKind = "ttft", threshold_s: float = 1.0, objective: float = 0.999,
             window_days: float = 30, min_rate: float = 0.0, windows: tuple[BurnWindow, ...] | None = None,
             page: bool = True, ticket: bool = True, targets: tuple[LatencyTarget, ...] | None = None,
             calendar: bool = False, keep_firing_for_s: float | None = 0.0) -> Slo:
    """`keep_firing_for_s` 0 by default: these tests time each transition without it (None: the SLO default)."""
    if targets is None:
        targets = () if sli in ("error_rate", "goodput") else (LatencyTarget(sli, threshold_s),)  # type: ignore[arg-type]
    period = window_days * DAY
    alerting = Alerting(page, ticket, min_rate, windows if windows is not None else workbook_windows(period),
                        keep_firing_for_s)
    return Slo(name=name, deployment="tiny", sli=sli, targets=targets, objective=objective,
               window=SloWindow("calendar_month" if calendar else "rolling", period), alerting=alerting)
