"""Prometheus rule groups as Python values, and their YAML-ready dict form. Shared by SLO and operational rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.slo.durations import format_duration
from controlplane.slo.promql import Expr

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: Expr
    labels: Labels = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record, "expr": self.expr.render()}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass(frozen=True)
class AlertRule:
    alert: str
    expr: Expr
    labels: Labels
    annotations: Labels
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alert": self.alert, "expr": self.expr.render()}
        if self.for_s:
            out["for"] = format_duration(self.for_s)
        if self.keep_firing_for_s:
            out["keep_firing_for"] = format_duration(self.keep_firing_for_s)
        out["labels"] = dict(self.labels)
        out["annotations"] = dict(self.annotations)
        return out

    def label(self, name: str) -> str:
        return dict(self.labels)[name]


Rule = RecordingRule | AlertRule


@dataclass(frozen=True)
class RuleGroup:
    name: str
    rules: tuple[Rule, ...]
    interval_s: float | None = None  # None: Prometheus' global evaluation_interval

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.interval_s is not None:
            out["interval"] = format_duration(self.interval_s)
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def alerts(self) -> tuple[AlertRule, ...]:
        return tuple(r for r in self.rules if isinstance(r, AlertRule))


@dataclass(frozen=True)
class RuleSet:
    groups: tuple[RuleGroup, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups]}
