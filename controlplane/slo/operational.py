"""Operational alerts that are not about one SLO: KV cache saturation, preemptions, replicas down or
crash-looping, failing scrapes, spans missing from the store, GPU XID errors and temperature, cost per million
tokens (pure; no I/O).

They cover every deployment at once (`by (deployment, replica)`), so they carry `deployment` from the series and
no `slo` label. Annotation templates use only `{{ $labels.X }}`, which the promtool tests expand exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane import names
from controlplane.slo.durations import format_duration
from controlplane.slo.options import RuleOptions, runbook_url
from controlplane.slo.promql import Aggregate, Binary, Call, Expr, Number, Selector, increase, rate
from controlplane.slo.rulemodel import AlertRule, RuleGroup

DEP_REPLICA = (names.LABEL_DEPLOYMENT, names.LABEL_REPLICA)
ENGINE_STALL_WINDOW_S = 300.0  # no token generated over this long, with requests in the engine: stalled


@dataclass(frozen=True)
class OperationalAlert:
    """An alert plus the text of its runbook section."""

    rule: AlertRule
    runbook: str


def _alert(name: str, expr: Expr, severity: str, for_s: float, summary: str, description: str,
           options: RuleOptions) -> AlertRule:
    return AlertRule(name, expr, ((names.LABEL_SEVERITY, severity),),
                     (("summary", summary), ("description", description),
                      ("runbook_url", runbook_url(options, name))), for_s)


def operational_alerts(options: RuleOptions | None = None) -> list[OperationalAlert]:
    o = options or RuleOptions()
    rep = "{{ $labels.deployment }}/{{ $labels.replica }}"
    dep = "{{ $labels.deployment }}"
    kv = Aggregate("max", Selector(names.VLLM_KV_USAGE), by=DEP_REPLICA)
    preempt = Aggregate("sum", rate(Selector(names.VLLM_PREEMPTIONS_TOTAL), 300.0), by=DEP_REPLICA)
    up = Aggregate("max", Selector(names.PLANE_REPLICA_UP), by=DEP_REPLICA)
    crash = Binary("or", Binary("==", Aggregate("max", Selector(names.PLANE_REPLICA_CRASHLOOP), by=DEP_REPLICA),
                                Number(1)),
                   Binary(">=", Aggregate("sum", increase(Selector(names.PLANE_REPLICA_RESTARTS_TOTAL),
                                                          o.crashloop_window_s), by=DEP_REPLICA),
                          Number(o.crashloop_restarts)))
    window = format_duration(o.crashloop_window_s)
    # Work for the replica: what its engine reports running or waiting, or (for a replica behind the plane's router)
    # what the router sent it that has not finished: an engine hung on its first step after idle still reads 0.
    in_engine = Binary("or", Binary(">", Binary("+", Aggregate("sum", Selector(names.VLLM_NUM_RUNNING), by=DEP_REPLICA),
                                                Aggregate("sum", Selector(names.VLLM_NUM_WAITING), by=DEP_REPLICA)),
                                     Number(0)),
                       Binary(">", Aggregate("max", Selector(names.PLANE_ROUTER_IN_FLIGHT), by=DEP_REPLICA), Number(0)))
    generated = Aggregate("sum", rate(Selector(names.VLLM_GENERATION_TOKENS_TOTAL), ENGINE_STALL_WINDOW_S),
                          by=DEP_REPLICA)
    stall = format_duration(ENGINE_STALL_WINDOW_S)
    alerts = [
        OperationalAlert(_alert(
            names.ALERT_KV_SATURATED, Binary(">", kv, Number(o.kv_cache_usage_ratio)), "ticket", o.kv_cache_for_s,
            f"KV cache of {rep} above {o.kv_cache_usage_ratio:.0%} for {format_duration(o.kv_cache_for_s)}",
            f"vLLM replica {rep} has kept its KV cache above {o.kv_cache_usage_ratio:.0%} full; new requests queue "
            "and running ones get preempted, which shows up as TTFT and TPOT.", o),
            "Check `vllm:num_requests_waiting` and preemptions. Add a replica, lower `--max-num-seqs`, raise "
            "`--gpu-memory-utilization`, or use an fp8 KV cache (`--kv-cache-dtype fp8`); `controlplane tune` "
            "proposes one with evidence."),
        OperationalAlert(_alert(
            names.ALERT_PREEMPTIONS, Binary(">", preempt, Number(o.preemptions_per_s)), "ticket",
            o.preemptions_for_s,
            f"vLLM replica {rep} keeps preempting requests",
            f"{names.VLLM_PREEMPTIONS_TOTAL} of {rep} has risen faster than {o.preemptions_per_s:g}/s for "
            f"{format_duration(o.preemptions_for_s)}: the KV cache cannot hold the running batch, so requests are "
            "evicted and recomputed.", o),
            "Same remedies as KV cache saturation; preemption wastes prefill work, so act before the SLO burns."),
        OperationalAlert(_alert(
            names.ALERT_REPLICA_DOWN, Binary("==", up, Number(0)), "ticket", o.replica_down_for_s,
            f"Replica {rep} is not ready",
            f"The control plane reports replica {rep} not ready ({names.PLANE_REPLICA_UP} == 0) for "
            f"{format_duration(o.replica_down_for_s)}.", o),
            "Read the replica's engine log (`replicas/<replica>.log` in the plane's data directory, `data/` by "
            "default) and lifecycle events (`GET /api/v1/events`). The "
            "supervisor restarts it; if it does not come back, check GPU memory and the last configuration change."),
        OperationalAlert(_alert(
            names.ALERT_DEPLOYMENT_DOWN, _deployment_down(), "page", o.deployment_down_for_s,
            f"Deployment {dep} has no ready replica",
            f"Every replica of deployment {dep} has been not ready for {format_duration(o.deployment_down_for_s)}, "
            "and not all of them are new replicas still loading their model; it serves no traffic.", o),
            "Page-worthy: nothing serves. Check the supervisor log, the engines' logs and the GPUs (XID errors); "
            "roll back the last applied recommendation if it preceded the outage (`GET /api/v1/events`)."),
        OperationalAlert(_alert(
            names.ALERT_ENGINE_STALLED,
            Binary("and", in_engine, Binary("==", generated, Number(0))), "page",
            o.engine_stalled_for_s,
            f"vLLM replica {rep} has requests but generates no token",
            f"{rep} has requests running or waiting ({names.VLLM_NUM_RUNNING} + {names.VLLM_NUM_WAITING} > 0, or "
            f"{names.PLANE_ROUTER_IN_FLIGHT} > 0) and has generated no token in {stall} "
            f"({names.VLLM_GENERATION_TOKENS_TOTAL} flat), for "
            f"{format_duration(o.engine_stalled_for_s)}: its engine is hung while its health check may still pass. "
            "No request finishes, so latency SLOs see no data: their pages last only as long as their long "
            "window still burns.", o),
            "Page-worthy: requests sent to this replica never finish. Read the end of its engine log "
            "(`replicas/<replica>.log` in the plane's data directory) for a stuck collective, an exception in the "
            "engine core or a GPU fault (XID). Stop its vLLM process: the supervisor restarts a replica whose "
            "process exits (an external one: restart it where it runs). Then look at what it was running."),
        OperationalAlert(_alert(
            names.ALERT_CRASHLOOP, crash, "ticket", 0.0,
            f"Replica {rep} is crash-looping",
            f"The supervisor marks replica {rep} crash-looping, or it restarted {o.crashloop_restarts} or more times "
            f"in {window}.", o),
            "Read the last engine log lines before each restart: out-of-memory at startup (lower "
            "`--gpu-memory-utilization` or `--max-model-len`), a bad model path, or a GPU fault."),
        OperationalAlert(_alert(
            names.ALERT_SCRAPE_FAILING, Binary("==", Selector(names.PROM_UP), Number(0)), "ticket",
            o.scrape_failing_for_s,
            "Prometheus cannot scrape {{ $labels.job }} {{ $labels.instance }}",
            "Scrapes of {{ $labels.instance }} (job {{ $labels.job }}) have failed for "
            f"{format_duration(o.scrape_failing_for_s)}. Its SLIs are unknown, not good: burn-rate alerts cannot "
            "see this target.", o),
            "Check that the target is up and reachable from Prometheus; a replica that stopped answering /metrics "
            "is often overloaded or hung."),
        OperationalAlert(_alert(
            names.ALERT_SPANS_MISSING, Binary("<", Aggregate("min", Selector(names.PLANE_SPAN_COVERAGE),
                                                             by=DEP_REPLICA), Number(o.span_coverage_ratio)),
            "ticket", o.span_coverage_for_s,
            f"Spans of {rep} are missing from the store",
            f"Fewer than {o.span_coverage_ratio:.0%} of the requests the router served from {rep} have their "
            f"llm_request span stored ({names.PLANE_SPAN_COVERAGE}) for {format_duration(o.span_coverage_for_s)}: "
            "its SLOs are judged on a sample, and cost per tenant misses tokens.", o),
            "vLLM's exporter drops a batch after 10 s of failed retries. Look for `OTLP batch not stored` in the "
            "plane's log (a locked or unreachable store) and for export errors in the replica's engine log "
            "(`replicas/<replica>.log` in the plane's data directory); check that the replica's "
            "`--otlp-traces-endpoint` is the plane's OTLP port."),
        OperationalAlert(_alert(
            names.ALERT_GPU_XID, _new_xid(o.gpu_xid_window_s), "ticket", 0.0,
            "GPU {{ $labels.gpu }} ({{ $labels.UUID }}) reported an XID error",
            f"{names.DCGM_XID} of GPU {{{{ $labels.gpu }}}} took a new non-zero value (the XID code, the alert's "
            f"value) within the last {format_duration(o.gpu_xid_window_s)}: the driver reported a GPU error. The "
            "same XID code twice in a row does not show (the field holds the last code).", o),
            "Look the XID code up in NVIDIA's XID table. 48/63/64/74/79/94/95 usually mean the GPU must be drained "
            "and reset or replaced; move its replicas elsewhere first."),
        OperationalAlert(_alert(
            names.ALERT_GPU_TEMP, Binary(">", Selector(names.DCGM_TEMP), Number(o.gpu_temp_c)), "ticket",
            o.gpu_temp_for_s,
            f"GPU {{{{ $labels.gpu }}}} ({{{{ $labels.UUID }}}}) above {o.gpu_temp_c:g} C",
            f"{names.DCGM_TEMP} of GPU {{{{ $labels.gpu }}}} has stayed above {o.gpu_temp_c:g} C for "
            f"{format_duration(o.gpu_temp_for_s)}; it will throttle clocks and slow every replica on it.", o),
            "Check cooling and fan state; compare `DCGM_FI_DEV_SM_CLOCK` with its usual value to see throttling."),
        OperationalAlert(_alert(
            names.ALERT_SLO_EVALUATION_STALE,
            Binary(">", Aggregate("max", Selector(names.PLANE_SLO_EVALUATION_AGE),
                                  by=(names.LABEL_DEPLOYMENT, names.LABEL_SLO)), Number(o.slo_evaluation_stale_s)),
            "ticket", 0.0,
            "SLO {{ $labels.slo }} of {{ $labels.deployment }} has not been evaluated for "
            f"{format_duration(o.slo_evaluation_stale_s)}",
            "The control plane has not evaluated SLO {{ $labels.slo }} for more than "
            f"{format_duration(o.slo_evaluation_stale_s)} ({names.PLANE_SLO_EVALUATION_AGE}): its burn-rate alerts "
            "cannot fire, and pages it had raised expire in Alertmanager.", o),
            "Look for `evaluating SLO` and `SLO evaluation round failed` in the plane's log: a store that is "
            "unreachable or locked, or a query that fails for this SLO. `GET /api/v1/slos` lists the SLOs evaluated "
            "in the last round. If the plane itself is down, Prometheus's scrape of it fails too."),
    ]
    if o.cost_budget_per_million_tokens_usd is not None:
        budget = o.cost_budget_per_million_tokens_usd
        cost = Aggregate("max", Selector(names.PLANE_COST_PER_MTOK), by=(names.LABEL_DEPLOYMENT,))
        alerts.append(OperationalAlert(_alert(
            names.ALERT_COST, Binary(">", cost, Number(budget)), "ticket", o.cost_for_s,
            f"Deployment {dep} costs more than ${budget:g} per million tokens",
            f"{names.PLANE_COST_PER_MTOK} of {dep} has stayed above the budget of ${budget:g} for "
            f"{format_duration(o.cost_for_s)}: GPUs are paid for but under-used.", o),
            "Scale down idle replicas or raise batch limits; `controlplane tune` shows the cheapest configuration "
            "that still meets the SLOs."))
    return alerts


def operational_group(options: RuleOptions | None = None) -> RuleGroup:
    return RuleGroup("controlplane-operational", tuple(a.rule for a in operational_alerts(options)))


def _new_xid(window_s: float) -> Expr:
    """A GPU whose last XID code changed to a non-zero one within the window, or whose series appeared non-zero
    (an exporter started after the error). DCGM_FI_DEV_XID_ERRORS keeps the last code until the driver is reset
    or the exporter restarts (NVIDIA/dcgm-exporter#500): `max_over_time(...) > 0` fired for days after one XID."""
    xid = Selector(names.DCGM_XID)
    nonzero = Binary(">", xid, Number(0))
    changed = Binary("and", nonzero, Binary(">", Call("changes", (xid.over(window_s),)), Number(0)))
    appeared = Binary("unless", nonzero, xid.offset(window_s))
    return Binary("or", changed, appeared)


def _deployment_down() -> Expr:
    """No replica ready, unless every replica is a new one still loading its model: a cold start (the plane's
    start, or a scale-up from zero), whose large model loads for longer than the page's `for` and paged every
    time. A replica restarted after a crash, adopted after a plane restart, or unready is no such grace, and a
    start past its ready timeout is taken for a crash by the supervisor, so the grace is bounded."""
    by_dep = (names.LABEL_DEPLOYMENT,)
    down = Binary("==", Aggregate("max", Selector(names.PLANE_REPLICA_UP), by=by_dep), Number(0))
    cold = Binary("==", Aggregate("min", Selector(names.PLANE_REPLICA_STARTING), by=by_dep), Number(1))
    return Binary("unless", down, cold, on=by_dep)

