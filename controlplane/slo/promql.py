"""A small PromQL expression tree, rendered to text in one place.

Hand-written: no maintained Python library builds PromQL; a tree keeps quoting, precedence and label matching
correct by construction instead of by string concatenation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from controlplane.slo.durations import format_duration

MatchOp = Literal["=", "!=", "=~", "!~"]
BinOp = Literal["+", "-", "*", "/", ">", ">=", "<", "<=", "==", "!=", "and", "or", "unless"]


@dataclass(frozen=True)
class Matcher:
    label: str
    value: str
    op: MatchOp = "="

    def render(self) -> str:
        return f"{self.label}{self.op}{json.dumps(self.value)}"  # JSON string escaping is valid PromQL escaping


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...] = ()
    range_s: float | None = None
    offset_s: float | None = None

    def over(self, range_s: float) -> Selector:
        return Selector(self.metric, self.matchers, range_s, self.offset_s)

    def offset(self, offset_s: float) -> Selector:
        return Selector(self.metric, self.matchers, self.range_s, offset_s)

    def render(self) -> str:
        inner = ", ".join(m.render() for m in self.matchers)
        text = self.metric + (f"{{{inner}}}" if inner else "")
        text += f"[{format_duration(self.range_s)}]" if self.range_s is not None else ""
        return text + (f" offset {format_duration(self.offset_s)}" if self.offset_s is not None else "")


@dataclass(frozen=True)
class Number:
    value: float

    def render(self) -> str:
        return repr(int(self.value)) if float(self.value).is_integer() else repr(self.value)


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]

    def render(self) -> str:
        return f"{self.func}({', '.join(a.render() for a in self.args)})"


@dataclass(frozen=True)
class Aggregate:
    op: Literal["sum", "max", "min", "avg", "count"]
    expr: Expr
    by: tuple[str, ...] | None = None
    without: tuple[str, ...] | None = None

    def render(self) -> str:
        grouping = ""
        if self.by is not None:
            grouping = f" by ({', '.join(self.by)})"
        elif self.without is not None:
            grouping = f" without ({', '.join(self.without)})"
        return f"{self.op}{grouping} ({self.expr.render()})"


@dataclass(frozen=True)
class Binary:
    op: BinOp
    lhs: Expr
    rhs: Expr
    on: tuple[str, ...] | None = None  # vector matching; None: match on all labels
    group_left: bool = False  # keep the left side's labels (one-to-one matching `on` keeps only the `on` labels)

    def render(self) -> str:
        matching = f" on ({', '.join(self.on)})" if self.on is not None else ""
        matching += " group_left" if self.group_left else ""
        return f"{_operand(self.lhs)} {self.op}{matching} {_operand(self.rhs)}"


Expr = Selector | Number | Call | Aggregate | Binary


def _operand(e: Expr) -> str:
    """Parenthesise nested binary expressions: always correct, never relies on PromQL precedence rules."""
    return f"({e.render()})" if isinstance(e, Binary) else e.render()


def rate(sel: Selector, range_s: float) -> Call:
    return Call("rate", (sel.over(range_s),))


def increase(sel: Selector, range_s: float) -> Call:
    return Call("increase", (sel.over(range_s),))


def over_time(func: Literal["max", "min", "avg"], sel: Selector, range_s: float) -> Call:
    return Call(f"{func}_over_time", (sel.over(range_s),))


def sum_of(e: Expr, by: tuple[str, ...] | None = None) -> Aggregate:
    return Aggregate("sum", e, by=by)


def and_(*exprs: Expr) -> Expr:
    out = exprs[0]
    for e in exprs[1:]:
        out = Binary("and", out, e)
    return out
