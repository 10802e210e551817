"""promtool unit tests for the operational alerts: for each, one unhealthy and one healthy subject; the alert must
fire for the unhealthy one exactly when its condition has held for `for`, and never for the healthy one."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from controlplane import names
from controlplane.slo.operational import operational_alerts
from controlplane.slo.options import RuleOptions
from controlplane.slo.promql import Matcher, Selector
from controlplane.slo.rulemodel import AlertRule
from controlplane.slo.ruletests import _fmt, series_values

_TEMPLATE = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


@dataclass(frozen=True)
class Case:
    alert: str
    series: tuple[tuple[str, dict[str, str], tuple[float, ...]], ...]  # metric, labels, one value per tick
    firing: tuple[dict[str, str], ...]  # labels (besides severity) of the alerts expected to fire
    active_from_s: float  # first evaluation where the expression holds for the unhealthy subject
    resolves_at_s: float | None = None  # first evaluation where it fires no more, when the case shows that


def _rep(dep: str, rep: str) -> dict[str, str]:
    return {names.LABEL_DEPLOYMENT: dep, names.LABEL_REPLICA: rep}


def _gpu(i: int) -> dict[str, str]:
    return {"gpu": str(i), "UUID": f"GPU-{i:04d}", "Hostname": "node-a", "modelName": "NVIDIA H100 80GB HBM3"}


def _cases(o: RuleOptions, i: float, n: int) -> list[Case]:
    def flat(v: float) -> tuple[float, ...]:
        return (float(v),) * (n + 1)

    def ramp(step: float) -> tuple[float, ...]:
        return tuple(float(step * k) for k in range(n + 1))

    engine = {"model_name": "tiny", "engine": "0"}
    kv_bad = min(1.0, o.kv_cache_usage_ratio + (1 - o.kv_cache_usage_ratio) / 2)
    slow_restarts = tuple(float(k // max(1, int(o.crashloop_window_s // i))) for k in range(n + 1))
    xid_at = 5
    xid = tuple(79.0 if k >= xid_at else 0.0 for k in range(n + 1))  # the field keeps the last code, as DCGM does
    cases = [
        Case(names.ALERT_KV_SATURATED, (
            (names.VLLM_KV_USAGE, {**_rep("tiny", "tiny-0"), **engine}, flat(kv_bad)),
            (names.VLLM_KV_USAGE, {**_rep("tiny", "tiny-1"), **engine}, flat(o.kv_cache_usage_ratio / 2))),
            (_rep("tiny", "tiny-0"),), 0.0),
        Case(names.ALERT_PREEMPTIONS, (
            (names.VLLM_PREEMPTIONS_TOTAL, {**_rep("tiny", "tiny-0"), **engine},
             ramp(max(1.0, math.ceil(2 * o.preemptions_per_s * i)))),
            (names.VLLM_PREEMPTIONS_TOTAL, {**_rep("tiny", "tiny-1"), **engine}, flat(0))),
            (_rep("tiny", "tiny-0"),), i),  # rate() needs a second sample
        Case(names.ALERT_REPLICA_DOWN, (
            (names.PLANE_REPLICA_UP, _rep("tiny", "tiny-0"), flat(0)),
            (names.PLANE_REPLICA_UP, _rep("tiny", "tiny-1"), flat(1))),
            (_rep("tiny", "tiny-0"),), 0.0),
        Case(names.ALERT_DEPLOYMENT_DOWN, (
            (names.PLANE_REPLICA_UP, _rep("batch", "batch-0"), flat(0)),
            (names.PLANE_REPLICA_UP, _rep("batch", "batch-1"), flat(0)),
            (names.PLANE_REPLICA_UP, _rep("tiny", "tiny-0"), flat(0)),
            (names.PLANE_REPLICA_UP, _rep("tiny", "tiny-1"), flat(1)),
            # a cold start: its one replica still loads its model, so nothing pages yet
            (names.PLANE_REPLICA_UP, _rep("cold", "cold-0"), flat(0)),
            (names.PLANE_REPLICA_STARTING, _rep("cold", "cold-0"), flat(1)),
            # a new replica loading beside an unready one is no cold start: it pages
            (names.PLANE_REPLICA_UP, _rep("sick", "sick-0"), flat(0)),
            (names.PLANE_REPLICA_STARTING, _rep("sick", "sick-0"), flat(0)),
            (names.PLANE_REPLICA_UP, _rep("sick", "sick-1"), flat(0)),
            (names.PLANE_REPLICA_STARTING, _rep("sick", "sick-1"), flat(1))),
            ({names.LABEL_DEPLOYMENT: "batch"}, {names.LABEL_DEPLOYMENT: "sick"}), 0.0),
        Case(names.ALERT_ENGINE_STALLED, (
            (names.VLLM_NUM_RUNNING, {**_rep("tiny", "tiny-0"), **engine}, flat(2)),  # hung: tokens flat
            (names.VLLM_NUM_WAITING, {**_rep("tiny", "tiny-0"), **engine}, flat(3)),
            (names.VLLM_GENERATION_TOKENS_TOTAL, {**_rep("tiny", "tiny-0"), **engine}, flat(500)),
            (names.VLLM_NUM_RUNNING, {**_rep("tiny", "tiny-1"), **engine}, flat(2)),  # busy and generating
            (names.VLLM_NUM_WAITING, {**_rep("tiny", "tiny-1"), **engine}, flat(0)),
            (names.VLLM_GENERATION_TOKENS_TOTAL, {**_rep("tiny", "tiny-1"), **engine}, ramp(100)),
            (names.VLLM_NUM_RUNNING, {**_rep("tiny", "tiny-2"), **engine}, flat(0)),  # idle: nothing to generate
            (names.VLLM_NUM_WAITING, {**_rep("tiny", "tiny-2"), **engine}, flat(0)),
            (names.VLLM_GENERATION_TOKENS_TOTAL, {**_rep("tiny", "tiny-2"), **engine}, flat(500)),
            (names.PLANE_ROUTER_IN_FLIGHT, _rep("tiny", "tiny-2"), flat(0)),
            # hung on its first step after idle: the engine's gauges still read 0, the router has requests out
            (names.VLLM_NUM_RUNNING, {**_rep("tiny", "tiny-3"), **engine}, flat(0)),
            (names.VLLM_NUM_WAITING, {**_rep("tiny", "tiny-3"), **engine}, flat(0)),
            (names.VLLM_GENERATION_TOKENS_TOTAL, {**_rep("tiny", "tiny-3"), **engine}, flat(500)),
            (names.PLANE_ROUTER_IN_FLIGHT, _rep("tiny", "tiny-3"), flat(4))),
            (_rep("tiny", "tiny-0"), _rep("tiny", "tiny-3")), i),  # rate() needs a second sample
        Case(names.ALERT_CRASHLOOP, (
            (names.PLANE_REPLICA_CRASHLOOP, _rep("tiny", "tiny-0"), flat(0)),
            (names.PLANE_REPLICA_RESTARTS_TOTAL, _rep("tiny", "tiny-0"), ramp(1)),  # one restart per tick
            (names.PLANE_REPLICA_CRASHLOOP, _rep("tiny", "tiny-1"), flat(0)),
            (names.PLANE_REPLICA_RESTARTS_TOTAL, _rep("tiny", "tiny-1"), slow_restarts)),  # one per window
            (_rep("tiny", "tiny-0"),), o.crashloop_restarts * i),
        Case(names.ALERT_CRASHLOOP, (  # the supervisor's own verdict, without restarts in the window yet
            (names.PLANE_REPLICA_CRASHLOOP, _rep("tiny", "tiny-2"), flat(1)),
            (names.PLANE_REPLICA_CRASHLOOP, _rep("tiny", "tiny-3"), flat(0))),
            (_rep("tiny", "tiny-2"),), 0.0),
        Case(names.ALERT_SCRAPE_FAILING, (
            (names.PROM_UP, {"job": "vllm", "instance": "127.0.0.1:8100", **_rep("tiny", "tiny-0")}, flat(0)),
            (names.PROM_UP, {"job": "vllm", "instance": "127.0.0.1:8101", **_rep("tiny", "tiny-1")}, flat(1))),
            ({"job": "vllm", "instance": "127.0.0.1:8100", **_rep("tiny", "tiny-0")},), 0.0),
        Case(names.ALERT_SPANS_MISSING, (
            (names.PLANE_SPAN_COVERAGE, _rep("tiny", "tiny-0"), flat(o.span_coverage_ratio / 2)),
            (names.PLANE_SPAN_COVERAGE, _rep("tiny", "tiny-1"), flat(1))),
            (_rep("tiny", "tiny-0"),), 0.0),
        Case(names.ALERT_GPU_XID, (
            (names.DCGM_XID, _gpu(0), xid), (names.DCGM_XID, _gpu(1), flat(0))),
            (_gpu(0),), xid_at * i, xid_at * i + o.gpu_xid_window_s),
        Case(names.ALERT_GPU_TEMP, (
            (names.DCGM_TEMP, _gpu(0), flat(o.gpu_temp_c + 5)), (names.DCGM_TEMP, _gpu(1), flat(o.gpu_temp_c - 20))),
            (_gpu(0),), 0.0),
        Case(names.ALERT_SLO_EVALUATION_STALE, (
            (names.PLANE_SLO_EVALUATION_AGE, {names.LABEL_SLO: "tiny-ttft", names.LABEL_DEPLOYMENT: "tiny"},
             tuple(o.slo_evaluation_stale_s - 2 * i + k * i for k in range(n + 1))),  # evaluation stopped
            (names.PLANE_SLO_EVALUATION_AGE, {names.LABEL_SLO: "tiny-tpot", names.LABEL_DEPLOYMENT: "tiny"},
             tuple(float(k % 2) * 30.0 for k in range(n + 1)))),  # evaluated every round
            ({names.LABEL_SLO: "tiny-ttft", names.LABEL_DEPLOYMENT: "tiny"},), 3 * i),
    ]
    if o.cost_budget_per_million_tokens_usd is not None:
        budget = o.cost_budget_per_million_tokens_usd
        cases.append(Case(names.ALERT_COST, (
            (names.PLANE_COST_PER_MTOK, {names.LABEL_DEPLOYMENT: "tiny"}, flat(budget * 1.5)),
            (names.PLANE_COST_PER_MTOK, {names.LABEL_DEPLOYMENT: "batch"}, flat(budget * 0.5))),
            ({names.LABEL_DEPLOYMENT: "tiny"},), 0.0))
    return cases


def _expand(rule: AlertRule, labels: dict[str, str]) -> dict[str, str]:
    return {k: _TEMPLATE.sub(lambda m: labels.get(m.group(1), ""), v) for k, v in rule.annotations}


def operational_test_file(rule_file: str, options: RuleOptions | None = None) -> dict[str, Any]:
    o = options or RuleOptions()
    rules = {a.rule.alert: a.rule for a in operational_alerts(o)}
    seconds = [int(round(x)) for x in (60, o.kv_cache_for_s, o.preemptions_for_s, o.replica_down_for_s,
                                       o.deployment_down_for_s, o.scrape_failing_for_s, o.gpu_temp_for_s,
                                       o.gpu_xid_window_s, o.cost_for_s, o.crashloop_window_s,
                                       o.span_coverage_for_s, o.slo_evaluation_stale_s,
                                       o.engine_stalled_for_s) if x]
    i = float(math.gcd(*seconds))
    longest = max(r.for_s for r in rules.values()) + o.gpu_xid_window_s + o.crashloop_window_s
    n = int(longest // i) + 12
    tests = []
    for case in _cases(o, i, n):
        rule = rules[case.alert]
        fires = case.active_from_s + math.ceil(rule.for_s / i) * i
        expected = [{"exp_labels": {**lbl, names.LABEL_SEVERITY: rule.label(names.LABEL_SEVERITY)},
                     "exp_annotations": _expand(rule, lbl)} for lbl in case.firing]
        checks = [(fires - i, []), (fires, expected)] if fires >= i else [(fires, expected)]
        if case.resolves_at_s is not None:
            checks += [(case.resolves_at_s - i, expected), (case.resolves_at_s, [])]
        tests.append({
            "name": f"{case.alert}: fires for the unhealthy subject only, {_fmt(rule.for_s)} after its condition "
                    "starts to hold" + (", and resolves when it stops" if case.resolves_at_s else ""),
            "interval": _fmt(i),
            "input_series": [{"series": Selector(m, tuple(Matcher(k, v) for k, v in lbl.items())).render(),
                              "values": series_values(vals)} for m, lbl, vals in case.series],
            "alert_rule_test": [{"eval_time": _fmt(t), "alertname": case.alert, "exp_alerts": exp}
                                for t, exp in checks],
        })
    return {"rule_files": [rule_file], "evaluation_interval": _fmt(i), "tests": tests}
