"""SLOs -> Prometheus recording rules and multiwindow, multi-burn-rate alerts (pure; no I/O).

Per SLO and per window w (every long and short window of its tiers), one group records
    requests/s over w               controlplane_slo:requests:rate<w>
    bad requests / requests over w  controlplane_slo:request_errors_per_request:ratio_rate<w>
(two rules per window: promtool and Prometheus evaluate every rule at every step, and the tests' run time is
steps x rules)
from vLLM's histograms (bad = _count - _bucket{le=threshold}) or, for error_rate, from
vllm:request_success_total (bad = finished_reason abort|error). Ratios divide by `(requests > 0)`, so zero traffic
gives no sample instead of NaN (Sloth #531). Each tier alerts when both windows burn faster than
`burn_rate * (1 - objective)` and the long-window request rate is at least the SLO's minimum (Pyrra #1925). A short
window in which no request finished is unknown: a firing alert holds through it while its long window still burns.

Goodput cannot be expressed on histograms (they cannot join one request's TTFT and TPOT). The rules use a lower
bound instead: a request missing any target is bad, so the joint bad fraction is at least the largest per-target
bad fraction. Alerts on it never fire falsely but can miss a burn that only the joint condition shows; the exact
figure comes from per-request rows (`controlplane slo eval`). A warning says so at render time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from controlplane import names
from controlplane.slo.durations import format_duration
from controlplane.slo.model import BurnWindow, LatencyTarget, Slo
from controlplane.slo.options import RuleOptions, runbook_url
from controlplane.slo.promql import Aggregate, Binary, Call, Expr, Matcher, Number, Selector, and_, rate, sum_of
from controlplane.slo.rulemodel import AlertRule, Labels, RecordingRule, Rule, RuleGroup, RuleSet

# Histogram and default bucket edges (seconds) per latency SLI, from vLLM's metrics (TELEMETRY.md).
_TTFT_EDGES = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_EDGES = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_EDGES = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0)
ALERTS = "ALERTS"  # Prometheus's own series of pending and firing alerts
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "ttft": (names.VLLM_TTFT_HIST, _TTFT_EDGES),
    "tpot": (names.VLLM_TPOT_HIST, _TOKEN_EDGES),
    "itl": (names.VLLM_ITL_HIST, _TOKEN_EDGES),
    "e2e": (names.VLLM_E2E_HIST, _REQUEST_EDGES),
    "queue": (names.VLLM_QUEUE_HIST, _REQUEST_EDGES),
}


def snap_to_edge(target: LatencyTarget) -> tuple[float, str | None]:
    """The bucket edge the rules use for a target, and a warning when it is not the SLO's own threshold.

    Snaps down (stricter: requests between the edge and the threshold count as bad, so alerts err toward firing);
    below the first edge there is nothing stricter, so it snaps up and says the rule is more lenient.
    """
    metric, edges = HISTOGRAMS[target.sli]
    if any(math.isclose(e, target.threshold_s, rel_tol=1e-9) for e in edges):
        return next(e for e in edges if math.isclose(e, target.threshold_s, rel_tol=1e-9)), None
    below = [e for e in edges if e < target.threshold_s]
    edge = below[-1] if below else edges[0]
    how = "the nearest edge below: stricter" if below else "the first edge: MORE LENIENT than the SLO"
    return edge, (f"{target.sli} threshold {target.threshold_s:g} s is not a bucket edge of {metric}; the rules use "
                  f"{edge:g} s ({how}). Edges: {', '.join(f'{e:g}' for e in edges)}")


def le_matcher(edge: float) -> Matcher:
    """`le` as vLLM (prometheus_client) writes it ("0.5", "1.0"); whole numbers also as Prometheus 3 does ("1")."""
    if float(edge).is_integer():
        return Matcher(names.LABEL_LE, f"{int(edge)}(\\.0)?", "=~")
    return Matcher(names.LABEL_LE, repr(float(edge)))


def _dep(slo: Slo) -> Matcher:
    return Matcher(names.LABEL_DEPLOYMENT, slo.deployment)


def _good(slo: Slo, target: LatencyTarget, w: float) -> Expr:
    """Requests/s over w whose value was within the target's bucket edge."""
    metric, _ = HISTOGRAMS[target.sli]
    edge, _ = snap_to_edge(target)
    return sum_of(rate(Selector(f"{metric}_bucket", (_dep(slo), le_matcher(edge))), w))


def _hist_parts(slo: Slo, target: LatencyTarget, w: float) -> tuple[Expr, Expr]:
    """(all requests/s, bad requests/s) over w for one latency target."""
    metric, _ = HISTOGRAMS[target.sli]
    total = sum_of(rate(Selector(f"{metric}_count", (_dep(slo),)), w))
    return total, Binary("-", total, _good(slo, target, w))


def _error_rate_parts(slo: Slo, w: float) -> tuple[Expr, Expr]:
    failed = Matcher(names.LABEL_FINISHED_REASON, "|".join(names.VLLM_FAILED_FINISH_REASONS), "=~")
    total = sum_of(rate(Selector(names.VLLM_REQUEST_SUCCESS_TOTAL, (_dep(slo),)), w))
    bad = sum_of(rate(Selector(names.VLLM_REQUEST_SUCCESS_TOTAL, (_dep(slo), failed)), w))
    return total, bad


def _ratio(total: Expr, bad: Expr) -> Expr:
    """bad / total, with no sample (not NaN) when total is 0."""
    return Binary("/", bad, Binary(">", total, Number(0)))


def _own(record: str, slo: Slo) -> Selector:
    return Selector(record, (Matcher(names.LABEL_SLO, slo.name),))


def windows_of(tiers: Iterable[BurnWindow]) -> list[float]:
    return sorted({w for t in tiers for w in (t.short_s, t.long_s)})


RATE_MIN_SCRAPES = 4  # the shortest useful rate() range, in scrape intervals (Prometheus's own advice)


def prometheus_windows(slo: Slo, scrape_interval_s: float) -> tuple[Slo, list[str]]:
    """The SLO with each burn window at least RATE_MIN_SCRAPES scrape intervals long, and a warning per tier
    widened. A shorter range holds fewer than two samples now and then, or always: its rate is absent, the tier's
    short window never burns, and its alert can never fire (a 1-hour SLO's 14.4x tier has 12 s / 1 s windows)."""
    shortest = float(math.ceil(RATE_MIN_SCRAPES * scrape_interval_s))
    tiers, warnings = [], []
    for t in slo.alerting.windows:
        short_s = max(t.short_s, shortest)
        # The long window stays the workbook's 12 short ones at least: equal windows would be one window, whose
        # alert resolves the moment a gap empties it (the hold needs a long window that outlasts the short one).
        long_s = t.long_s if short_s == t.short_s else max(t.long_s, 12 * short_s)
        if (long_s, short_s) != (t.long_s, t.short_s):
            warnings.append(f"{slo.name}: {t.severity} tier {t.burn_rate:g}x: windows {format_duration(t.long_s)}/"
                            f"{format_duration(t.short_s)} hold fewer than {RATE_MIN_SCRAPES} scrapes at "
                            f"{format_duration(scrape_interval_s)}; the Prometheus rules use "
                            f"{format_duration(long_s)}/{format_duration(short_s)}")
        tiers.append(dataclasses.replace(t, long_s=long_s, short_s=short_s))
    if not warnings:
        return slo, []
    return dataclasses.replace(slo, alerting=dataclasses.replace(slo.alerting, windows=tuple(tiers))), warnings


def live_tiers(slo: Slo) -> tuple[list[BurnWindow], list[str]]:
    """Enabled tiers that can fire, and warnings for the ones that cannot (burn x budget >= 1)."""
    out, warnings = [], []
    for t in slo.alerting.enabled_windows():
        if t.burn_rate * slo.error_budget_ratio >= 1:
            warnings.append(f"{slo.name}: {t.severity} tier {t.burn_rate:g}x over {format_duration(t.long_s)} "
                            f"skipped: with objective {slo.objective:g} its error ratio threshold is >= 1")
        else:
            out.append(t)
    return out, warnings


def recording_rules(slo: Slo, windows: Sequence[float]) -> list[RecordingRule]:
    """requests/s and error ratio of the SLO for every window (per target first, for goodput)."""
    own: Labels = ((names.LABEL_SLO, slo.name), (names.LABEL_DEPLOYMENT, slo.deployment))
    rules: list[RecordingRule] = []
    for w in windows:
        suffix = format_duration(w)
        if slo.sli == "goodput":
            for target in slo.targets:
                total, _ = _hist_parts(slo, target, w)
                tagged = (*own, (names.LABEL_TARGET, target.sli))
                recorded = Selector(names.REC_SLO_TARGET_REQUESTS_RATE + suffix,
                                    (Matcher(names.LABEL_SLO, slo.name), Matcher(names.LABEL_TARGET, target.sli)))
                target_bad = Binary("-", recorded, _good(slo, target, w), on=(), group_left=True)
                rules.append(RecordingRule(names.REC_SLO_TARGET_REQUESTS_RATE + suffix, total, tagged))
                rules.append(RecordingRule(names.REC_SLO_TARGET_ERROR_RATIO + suffix, _ratio(recorded, target_bad),
                                           tagged))
            worst = Aggregate("max", _own(names.REC_SLO_TARGET_ERROR_RATIO + suffix, slo),
                              without=(names.LABEL_TARGET,))
            busiest = Aggregate("max", _own(names.REC_SLO_TARGET_REQUESTS_RATE + suffix, slo),
                                without=(names.LABEL_TARGET,))
            rules.append(RecordingRule(names.REC_SLO_REQUESTS_RATE + suffix, busiest, own))
            rules.append(RecordingRule(names.REC_SLO_ERROR_RATIO + suffix, worst, own))
            continue
        ratio: Expr
        if slo.sli == "error_rate":
            total, bad = _error_rate_parts(slo, w)
            ratio = _ratio(total, bad)
        else:  # bad = recorded total - good: reads the _count range once per window, not twice
            total, _ = _hist_parts(slo, slo.targets[0], w)
            recorded = _own(names.REC_SLO_REQUESTS_RATE + suffix, slo)
            ratio = _ratio(recorded, Binary("-", recorded, _good(slo, slo.targets[0], w), on=(), group_left=True))
        rules.append(RecordingRule(names.REC_SLO_REQUESTS_RATE + suffix, total, own))
        rules.append(RecordingRule(names.REC_SLO_ERROR_RATIO + suffix, ratio, own))
    return rules


def burn_threshold(slo: Slo, tier: BurnWindow) -> Expr:
    """burn_rate * (1 - objective), written out so the rule reads like the workbook and computes the same float."""
    return Binary("*", Number(tier.burn_rate), Binary("-", Number(1), Number(slo.objective)))


def burn_alert(slo: Slo, tier: BurnWindow, options: RuleOptions) -> AlertRule:
    long_w, short_w = format_duration(tier.long_s), format_duration(tier.short_s)
    threshold = burn_threshold(slo, tier)
    long_burns: list[Expr] = [Binary(">", _own(names.REC_SLO_ERROR_RATIO + long_w, slo), threshold)]
    if slo.alerting.min_request_rate_per_s > 0:
        long_burns.append(Binary(">=", _own(names.REC_SLO_REQUESTS_RATE + long_w, slo),
                                 Number(slo.alerting.min_request_rate_per_s)))
    name = names.ALERT_SLO_BURN_PAGE if tier.severity == "page" else names.ALERT_SLO_BURN_TICKET
    fresh = and_(long_burns[0], Binary(">", _own(names.REC_SLO_ERROR_RATIO + short_w, slo), threshold),
                 *long_burns[1:])
    labels: Labels = ((names.LABEL_SLO, slo.name), (names.LABEL_DEPLOYMENT, slo.deployment),
                      (names.LABEL_SLI, slo.sli), (names.LABEL_SEVERITY, tier.severity),
                      (names.LABEL_LONG_WINDOW, long_w), (names.LABEL_SHORT_WINDOW, short_w),
                      (names.LABEL_BURN_RATE, f"{tier.burn_rate:g}"))
    # No request recorded in the short window (its request rate is 0, or absent when every replica is gone): its
    # ratio is unknown, not good, so an alert that was firing keeps firing while the long window still burns. Without
    # this a hung engine or a backlog in which nothing finishes resolves the page it raised. The state comes from
    # this tier's own ALERTS sample (every label of the rule: two tiers may share a long window) at the previous
    # evaluation, an instant selector within Prometheus's lookback (--query.lookback-delta, 5 m by default); a tier
    # that is not firing is never started by it. Goodput: unknown as soon as one target recorded nothing (a decode
    # backlog still records TTFTs, but no TPOT, so its joint ratio is not known).
    short_rate: Expr = _own(names.REC_SLO_REQUESTS_RATE + short_w, slo)
    if slo.sli == "goodput":
        short_rate = Aggregate("min", _own(names.REC_SLO_TARGET_REQUESTS_RATE + short_w, slo),
                               without=(names.LABEL_TARGET,))
    unknown = Binary("or", Binary("==", short_rate, Number(0)), Call("absent", (short_rate,)))
    was_firing = Selector(ALERTS, (Matcher("alertname", name), Matcher("alertstate", "firing"),
                                   *(Matcher(k, v) for k, v in labels)))
    # Not once the plane reports the deployment scaled to 0 on purpose: nothing can finish then, and a page held on
    # the long window's evidence would fire for hours after (5h36m for the 6x page at 30 days).
    scaled_to_zero = Binary("==", Aggregate("sum", Selector(names.PLANE_DESIRED_REPLICAS, (_dep(slo),))), Number(0))
    held = Binary("unless", Binary("and", Binary("and", and_(*long_burns), unknown, on=()), was_firing, on=()),
                  scaled_to_zero, on=())
    budget, period = slo.error_budget_ratio, slo.window.duration_s
    period_text = "calendar month" if slo.window.kind == "calendar_month" else format_duration(period)
    min_rate = (f" Only while the deployment serves at least {slo.alerting.min_request_rate_per_s:g} requests/s "
                f"over {long_w}." if slo.alerting.min_request_rate_per_s > 0 else "")
    annotations: Labels = (
        ("summary", f"SLO {slo.name} is burning its error budget {tier.burn_rate:g}x too fast "
                    f"({long_w} and {short_w} windows)"),
        ("description", f"Deployment {slo.deployment}: more than {_pct(tier.burn_rate * budget)} of {events(slo)} "
                        f"{bad_requests_text(slo)} over both the last {long_w} and {short_w} (objective "
                        f"{_pct(slo.objective)} over {period_text}, budget {_pct(budget)}). At {tier.burn_rate:g}x "
                        f"the whole budget lasts {format_duration(round(period / tier.burn_rate))}; this tier fires "
                        f"once {_pct(tier.budget_spent_ratio(period))} of it is spent.{min_rate} While the {short_w} "
                        f"window records no request, a firing alert holds as long as the {long_w} window burns, "
                        f"unless the plane reports {slo.deployment} scaled to 0."),
        ("runbook_url", slo.runbook_url or runbook_url(options, name)),
    )
    return AlertRule(name, Binary("or", fresh, held), labels, annotations, tier.for_s,
                     slo.alerting.keep_firing_s())


NO_DATA_FOR_S = 600.0


def sli_series(slo: Slo) -> Selector:
    """The series an SLO's rules read for its deployment (a histogram's _count, or the finished requests)."""
    if slo.sli == "error_rate":
        return Selector(names.VLLM_REQUEST_SUCCESS_TOTAL, (_dep(slo),))
    return Selector(f"{HISTOGRAMS[slo.targets[0].sli][0]}_count", (_dep(slo),))


def no_data_alert(slo: Slo, options: RuleOptions) -> AlertRule:
    """The SLO's series are absent: its burn-rate alerts can never fire, whatever the requests see. Without this
    a Prometheus that scrapes the replicas without a `deployment` label, or not at all, pages nobody, ever.
    Quiet while the plane reports the deployment scaled to 0 on purpose, or no replica of it ready."""
    sel = sli_series(slo)
    desired = Aggregate("sum", Selector(names.PLANE_DESIRED_REPLICAS, (_dep(slo),)))
    ready = Aggregate("max", Selector(names.PLANE_REPLICA_UP, (_dep(slo),)))
    # Quiet while the plane reports the deployment scaled to 0, or none of its replicas ready yet (a model that
    # loads for longer than the alert's `for` serves no /metrics): the deployment-down alerts cover those.
    expr = Binary("unless", Binary("unless", Call("absent", (sel,)), Binary("==", desired, Number(0)), on=()),
                  Binary("==", ready, Number(0)), on=())
    dep = slo.deployment
    return AlertRule(
        names.ALERT_SLO_NO_DATA, expr,
        ((names.LABEL_SLO, slo.name), (names.LABEL_DEPLOYMENT, dep), (names.LABEL_SLI, slo.sli),
         (names.LABEL_SEVERITY, "ticket")),
        (("summary", f"SLO {slo.name} has no data in Prometheus: its burn-rate alerts cannot fire"),
         ("description", f"No {sel.metric} series with deployment=\"{dep}\" for {format_duration(NO_DATA_FOR_S)}, "
                         f"though the plane reports {dep} neither scaled to 0 nor without a ready replica. Check that "
                         "Prometheus scrapes its replicas with a `deployment` target label (deploy/prometheus.yml) "
                         "and that they are up."),
         ("runbook_url", slo.runbook_url or runbook_url(options, names.ALERT_SLO_NO_DATA))),
        NO_DATA_FOR_S)


def events(slo: Slo) -> str:
    """What the rules count: vLLM's ITL histogram observes every inter-token interval, the others every request."""
    return "inter-token intervals" if slo.sli == "itl" else "requests"


def bad_requests_text(slo: Slo) -> str:
    if slo.sli == "error_rate":
        return f"failed (finished_reason {' or '.join(names.VLLM_FAILED_FINISH_REASONS)})"
    targets = [f"{t.sli} <= {snap_to_edge(t)[0]:g} s" for t in slo.targets]
    if slo.sli == "goodput":
        return f"missed one of {', '.join(targets)} (lower bound from per-target histograms)"
    return f"missed {targets[0]}"


def slo_rules(slos: Sequence[Slo], options: RuleOptions | None = None) -> RuleSet:
    """One rule group per SLO (recording rules, then its burn alerts) and the warnings to show the user."""
    options = options or RuleOptions()
    groups: list[RuleGroup] = []
    warnings: list[str] = []
    for spec in slos:
        slo, widened = prometheus_windows(spec, options.scrape_interval_s)
        warnings.extend(widened)
        warnings.extend(f"{slo.name}: {w}" for t in slo.targets if (w := snap_to_edge(t)[1]))
        if slo.sli == "goodput":
            warnings.append(f"{slo.name}: goodput cannot be computed from histograms; burn-rate alerts use the "
                            "largest per-target bad fraction, a lower bound of the joint one")
        if slo.sli == "itl":
            warnings.append(f"{slo.name}: itl rules count inter-token intervals ({names.VLLM_ITL_HIST} observes each "
                            "one), not requests; the minimum rate applies to intervals/s")
        if slo.budgeting == "timeslices":
            warnings.append(f"{slo.name}: budgeting is timeslices; Prometheus burn-rate rules count requests "
                            "(occurrences)")
        tiers, skipped = live_tiers(slo)
        warnings.extend(skipped)
        if not tiers:
            warnings.append(f"{slo.name}: no burn-rate alert (page and ticket both off or impossible)")
        rules: list[Rule] = [*recording_rules(slo, windows_of(tiers)), *(burn_alert(slo, t, options) for t in tiers)]
        if tiers:
            rules.append(no_data_alert(slo, options))
        if rules:
            groups.append(RuleGroup(f"slo-{slo.name}", tuple(rules)))
        budget = budget_group(slo)
        if budget is None:
            warnings.append(f"{slo.name}: calendar-month budget is not recorded in Prometheus (no month-aligned "
                            "range); `controlplane slo eval` computes it from the store")
        else:
            groups.append(budget)
    return RuleSet(tuple(groups), tuple(warnings))


def budget_group(slo: Slo) -> RuleGroup | None:
    """Error budget left over the rolling SLO window, counted from events over the whole window (not averaged
    short-window ratios, Sloth #241). Evaluated every 5m: a 28-day range is costly and changes slowly."""
    if slo.window.kind != "rolling":
        return None
    rules = recording_rules(slo, [slo.window.duration_s])
    ratio = _own(names.REC_SLO_ERROR_RATIO + format_duration(slo.window.duration_s), slo)
    remaining = Binary("-", Number(1), Binary("/", ratio, Binary("-", Number(1), Number(slo.objective))))
    own: Labels = ((names.LABEL_SLO, slo.name), (names.LABEL_DEPLOYMENT, slo.deployment))
    return RuleGroup(f"slo-{slo.name}-budget", (*rules, RecordingRule(names.REC_SLO_BUDGET_REMAINING, remaining, own)),
                     interval_s=300.0)


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"
