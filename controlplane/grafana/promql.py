"""PromQL for dashboards: the SLO rules' expression tree (controlplane.slo.promql) plus Grafana's variables.

Dashboard queries differ from rule expressions in two ways only: label values come from template variables
(`deployment=~"$deployment"`) and ranges are Grafana's (`[$__rate_interval]`), so the tree is reused and one
selector kind is added. Building from the tree also gives `metric_names()`: the tests check every name a dashboard
reads against what vLLM, the plane and dcgm-exporter really expose, without parsing PromQL text back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.slo.promql import Aggregate, Binary, Call, Expr, Matcher, Number, Selector

RATE_INTERVAL = "$__rate_interval"  # at least 4 scrape intervals (the datasource's timeInterval): safe for rate()
RANGE = "$__range"  # the dashboard's whole time range
INTERVAL = "$__interval"  # one step of the panel's query
# Grafana's own variables a query may use; the tests substitute these (and the dashboard's variables) before
# handing an expression to the real PromQL parser.
GRAFANA_BUILTINS = ("__rate_interval", "__range", "__interval")


@dataclass(frozen=True)
class VarRange(Selector):
    """A range selector whose range is a Grafana variable, e.g. `x{...}[$__rate_interval]`."""

    window: str = RATE_INTERVAL

    def render(self) -> str:
        return f"{super().render()}[{self.window}]"


@dataclass(frozen=True)
class VarOffset(Selector):
    """An instant selector one Grafana variable back, e.g. `x{...} offset $__interval`."""

    window: str = INTERVAL

    def render(self) -> str:
        return f"{super().render()} offset {self.window}"


def by_vars(metric: str, *labels: str) -> Selector:
    """`metric{label=~"$label", ...}`: each label filtered by the multi-value variable of the same name."""
    return Selector(metric, tuple(Matcher(label, f"${label}", "=~") for label in labels))


def with_matchers(sel: Selector, *matchers: Matcher) -> Selector:
    return Selector(sel.metric, sel.matchers + matchers)


def rate(sel: Selector, window: str = RATE_INTERVAL) -> Call:
    return Call("rate", (VarRange(sel.metric, sel.matchers, window=window),))


def increase(sel: Selector, window: str = RATE_INTERVAL) -> Call:
    return Call("increase", (VarRange(sel.metric, sel.matchers, window=window),))


def per_step(sel: Selector) -> Binary:
    """A counter's increase over exactly one step, for bars: what it gained since the step before (a series new in
    the step counts whole; a reset counts nothing). increase() over a range as long as the step would miss the
    interval between its first sample and the previous step's last, and over $__rate_interval (several steps)
    each event lands in 2-4 bars."""
    back = VarOffset(sel.metric, sel.matchers)
    return Binary("or", Call("clamp_min", (Binary("-", sel, back), Number(0))), sel)


def sum_all(expr: Expr) -> Aggregate:
    return Aggregate("sum", expr)


def sum_by(expr: Expr, *labels: str) -> Aggregate:
    return Aggregate("sum", expr, by=labels)


def max_by(expr: Expr, *labels: str) -> Aggregate:
    return Aggregate("max", expr, by=labels)


def ratio(num: Expr, den: Expr) -> Binary:
    """num / den, with a zero denominator giving no sample (unknown), not NaN or +Inf."""
    return Binary("/", num, Binary(">", den, Number(0)))


def quantile_of(histogram: str, q: float, sel_labels: tuple[str, ...], by: tuple[str, ...]) -> Call:
    """histogram_quantile over a vLLM histogram's `_bucket` series, filtered by the variables in sel_labels."""
    buckets = rate(by_vars(f"{histogram}_bucket", *sel_labels))
    return Call("histogram_quantile", (Number(q), Aggregate("sum", buckets, by=("le", *by))))


def metric_names(exprs: Iterable[Expr]) -> set[str]:
    """Every metric name the expressions select (walks the tree; no text parsing)."""
    out: set[str] = set()
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if isinstance(e, Selector):
            out.add(e.metric)
        elif isinstance(e, Call):
            stack.extend(e.args)
        elif isinstance(e, Aggregate):
            stack.append(e.expr)
        elif isinstance(e, Binary):
            stack.extend((e.lhs, e.rhs))
    return out
