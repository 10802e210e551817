"""What a dashboard says, as plain frozen values: rows of panels of PromQL queries, and template variables.

The dashboards (controlplane.grafana.dashboards) are written in these types; controlplane.grafana.sdk turns them
into grafana-foundation-sdk objects. Keeping the two apart lets the tests walk every query of every dashboard
(`DashboardSpec.exprs()`) and keeps SDK details (builders, enums, grid positions) in one module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from controlplane.grafana.promql import metric_names
from controlplane.slo.promql import Expr, Selector

PanelKind = Literal["timeseries", "stat", "state-timeline", "table", "bargauge"]


@dataclass(frozen=True)
class Query:
    expr: Expr
    legend: str = "__auto"  # Grafana's automatic legend: the labels that differ between series
    instant: bool = False  # one value per series (stat, table) instead of a range


@dataclass(frozen=True)
class Step:
    """A colour from a value up (thresholds) or for one exact value (value mappings, with display text)."""

    color: str
    value: float | None = None  # None: the base step of thresholds (from -Inf)
    text: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    kind: PanelKind
    queries: tuple[Query, ...]
    description: str
    unit: str = "short"
    width: int = 12  # of 24 grid columns
    height: int = 8
    min: float | None = None
    max: float | None = None
    thresholds: tuple[Step, ...] = ()
    mappings: tuple[Step, ...] = ()  # value -> text and colour (e.g. alert state 0/1/2)
    stacked: bool = False
    bars: bool = False
    min_interval: str | None = None  # Grafana's "Min interval": the shortest step (and $__interval) it queries at


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A query variable: the values of `label` on the series `source` selects (Grafana's `label_values`)."""

    name: str
    label: str
    source: Selector
    display: str

    def query(self) -> str:
        return f"label_values({self.source.render()}, {self.label})"


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    tags: tuple[str, ...]
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    refresh: str = "30s"
    time_from: str = "now-3h"

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def exprs(self) -> Iterator[Expr]:
        """Every PromQL expression: panel queries and the selectors behind the variables."""
        for panel in self.panels():
            yield from (q.expr for q in panel.queries)
        yield from (v.source for v in self.variables)

    def metric_names(self) -> set[str]:
        return metric_names(self.exprs())
