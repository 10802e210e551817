"""Frozen domain values of an SLO. External specs (controlplane/v1, OpenSLO v1) are converted into these once.

`controlplane.slo.spec` re-exports everything here; this module exists so the OpenSLO importer and the native
spec can share the domain types without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

SliKind = Literal["ttft", "tpot", "itl", "e2e", "queue", "error_rate", "goodput"]
LatencySli = Literal["ttft", "tpot", "itl", "e2e", "queue"]
LATENCY_SLIS: Final[tuple[str, ...]] = get_args(LatencySli)
SLI_KINDS: Final[tuple[str, ...]] = get_args(SliKind)
Severity = Literal["page", "ticket"]

DAY_S: Final = 86_400.0
THIRTY_DAYS_S: Final = 30 * DAY_S


class SpecError(ValueError):
    """A spec that cannot become an SLO. The message names the document, the field path and what is allowed."""


@dataclass(frozen=True)
class LatencyTarget:
    sli: LatencySli
    threshold_s: float  # a request is good for this target when its value <= threshold_s


@dataclass(frozen=True)
class SloWindow:
    kind: Literal["rolling", "calendar_month"]
    # rolling: the window (28d, 30d...); calendar_month: 30 days nominal, used only to scale burn-rate windows;
    # evaluation uses the real month boundaries (UTC)
    duration_s: float


@dataclass(frozen=True)
class BurnWindow:
    severity: Severity
    long_s: float
    short_s: float  # long / 12 per the SRE workbook
    burn_rate: float  # 14.4, 6, 3, 1 for a 30-day window
    for_s: float = 0.0  # Prometheus `for:`; 0 as in the workbook, whose short window already stops flapping

    def budget_spent_ratio(self, period_s: float) -> float:
        """Share of the period's budget this tier lets burn before it fires: burn * long / period."""
        return self.burn_rate * self.long_s / period_s


# (severity, long window, burn rate) of the SRE workbook for a 30-day period; short window = long / 12.
_WORKBOOK_30D: Final[tuple[tuple[Severity, float, float], ...]] = (
    ("page", 3600.0, 14.4),
    ("page", 6 * 3600.0, 6.0),
    ("ticket", DAY_S, 3.0),
    ("ticket", 3 * DAY_S, 1.0),
)


# A default tier's burn rate is capped so that its error ratio threshold is at most this: with a low objective
# the workbook's rates ask for more than every request failing (14.4x of a 10 % budget is 144 %).
MAX_DEFAULT_ERROR_RATIO: Final = 0.9


def workbook_windows(period_s: float = THIRTY_DAYS_S, objective: float | None = None) -> tuple[BurnWindow, ...]:
    """The four workbook tiers with their windows scaled to the period, so each still spends 2/5/10/10% of it.

    Windows are rounded to whole seconds (Prometheus durations); 28 days gives 56m/4m40s, 5h36m/28m, ...
    With `objective`, a rate whose error ratio threshold would reach MAX_DEFAULT_ERROR_RATIO is capped there
    (objectives under 93.75 %): uncapped, the 14.4x tier of a 90 % SLO could never fire, and a total outage
    would page only through the 6x tier, 3.6 hours in; capped at 9x, it pages in under an hour.
    """
    scale = period_s / THIRTY_DAYS_S
    cap = MAX_DEFAULT_ERROR_RATIO / (1.0 - objective) if objective is not None and objective < 1 else math.inf
    out = []
    for severity, long_30d, burn in _WORKBOOK_30D:
        long_s = float(max(12, round(long_30d * scale)))
        out.append(BurnWindow(severity=severity, long_s=long_s, short_s=float(round(long_s / 12)),
                              burn_rate=min(burn, round(cap, 6))))
    return tuple(out)


@dataclass(frozen=True)
class Alerting:
    page: bool = True
    ticket: bool = True
    min_request_rate_per_s: float = 0.0  # below it nothing fires (Pyrra #1925)
    windows: tuple[BurnWindow, ...] = field(default_factory=workbook_windows)
    # How long a firing alert keeps firing once its condition has cleared (Prometheus' keep_firing_for), so a
    # burn hovering at a threshold pages once, not at every crossing. None: the shortest enabled short window.
    keep_firing_for_s: float | None = None

    def enabled_windows(self) -> tuple[BurnWindow, ...]:
        """The tiers whose severity is switched on."""
        on = {"page": self.page, "ticket": self.ticket}
        return tuple(w for w in self.windows if on[w.severity])

    def keep_firing_s(self) -> float:
        if self.keep_firing_for_s is not None:
            return self.keep_firing_for_s
        return min((w.short_s for w in self.enabled_windows()), default=0.0)


@dataclass(frozen=True)
class Slo:
    name: str  # [a-z0-9_-], unique
    deployment: str
    sli: SliKind
    # exactly 1 for a latency SLI (its own kind); >= 1 for goodput (good only if every target holds); () for
    # error_rate
    targets: tuple[LatencyTarget, ...]
    objective: float  # 0 < objective < 1, e.g. 0.99
    window: SloWindow
    budgeting: Literal["occurrences", "timeslices"] = "occurrences"
    alerting: Alerting = field(default_factory=Alerting)
    description: str = ""
    runbook_url: str | None = None

    @property
    def error_budget_ratio(self) -> float:
        return 1 - self.objective
