"""Rules generated from SLOs: the full PromQL of each kind, the guards (zero traffic, minimum rate), snapping to
bucket edges, labels and annotations every alert needs, and invariants of generation."""

from __future__ import annotations

import copy
import re

import pytest

from controlplane import names
from controlplane.slo.model import BurnWindow, LatencyTarget
from controlplane.slo.operational import operational_alerts, operational_group
from controlplane.slo.options import RuleOptions
from controlplane.slo.rules import le_matcher, slo_rules, snap_to_edge
from tests.unit.slo.rule_factories import make_slo

PAGE_1H = (BurnWindow("page", 3600, 300, 14.4),)


def rules_of(slo_rules_result: object) -> list[dict[str, object]]:
    return [r.to_dict() for g in slo_rules_result.groups for r in g.rules]  # type: ignore[attr-defined]


def test_a_ttft_slo_records_requests_and_bad_ratio_per_window_and_pages_on_both() -> None:
    slo = make_slo(threshold_s=0.5, min_rate=0.5, windows=PAGE_1H)
    burn, budget = slo_rules([slo]).groups
    exprs = {r.to_dict().get("record") or r.to_dict()["alert"]: r.to_dict()["expr"] for r in burn.rules}
    assert exprs == {
        "controlplane_slo:requests:rate5m":
            'sum (rate(vllm:time_to_first_token_seconds_count{deployment="tiny"}[5m]))',
        "controlplane_slo:request_errors_per_request:ratio_rate5m":
            '(controlplane_slo:requests:rate5m{slo="t"} - on () group_left sum (rate('
            'vllm:time_to_first_token_seconds_bucket{deployment="tiny", le="0.5"}[5m]))) / '
            '(controlplane_slo:requests:rate5m{slo="t"} > 0)',
        "controlplane_slo:requests:rate1h":
            'sum (rate(vllm:time_to_first_token_seconds_count{deployment="tiny"}[1h]))',
        "controlplane_slo:request_errors_per_request:ratio_rate1h":
            '(controlplane_slo:requests:rate1h{slo="t"} - on () group_left sum (rate('
            'vllm:time_to_first_token_seconds_bucket{deployment="tiny", le="0.5"}[1h]))) / '
            '(controlplane_slo:requests:rate1h{slo="t"} > 0)',
        # both windows burn; or it was firing and the short window saw no request, unless scaled to 0 on purpose
        names.ALERT_SLO_BURN_PAGE:
            '(((controlplane_slo:request_errors_per_request:ratio_rate1h{slo="t"} > (14.4 * (1 - 0.999))) and '
            '(controlplane_slo:request_errors_per_request:ratio_rate5m{slo="t"} > (14.4 * (1 - 0.999)))) and '
            '(controlplane_slo:requests:rate1h{slo="t"} >= 0.5)) or '
            '(((((controlplane_slo:request_errors_per_request:ratio_rate1h{slo="t"} > (14.4 * (1 - 0.999))) and '
            '(controlplane_slo:requests:rate1h{slo="t"} >= 0.5)) and on () '
            '((controlplane_slo:requests:rate5m{slo="t"} == 0) or absent(controlplane_slo:requests:rate5m{slo="t"}))) '
            'and on () ALERTS{alertname="VllmSloErrorBudgetBurnPage", alertstate="firing", slo="t", deployment="tiny", '
            'sli="ttft", severity="page", long_window="1h", short_window="5m", burn_rate="14.4"}) unless on () '
            '(sum (controlplane_deployment_desired_replicas{deployment="tiny"}) == 0))',
        names.ALERT_SLO_NO_DATA:  # the series are gone (or unlabelled): nothing above could ever fire
            '(absent(vllm:time_to_first_token_seconds_count{deployment="tiny"}) unless on () '
            '(sum (controlplane_deployment_desired_replicas{deployment="tiny"}) == 0)) unless on () '
            '(max (controlplane_replica_up{deployment="tiny"}) == 0)',
    }
    assert all(r.to_dict()["labels"] == {"slo": "t", "deployment": "tiny"} for r in burn.rules[:-2])
    assert budget.name == "slo-t-budget" and budget.interval_s == 300
    assert budget.rules[-1].to_dict() == {
        "record": "controlplane_slo:error_budget_remaining:ratio",
        "expr": '1 - (controlplane_slo:request_errors_per_request:ratio_rate30d{slo="t"} / (1 - 0.999))',
        "labels": {"slo": "t", "deployment": "tiny"}}


def test_the_error_rate_counts_abort_and_error_finishes_of_request_success_as_bad() -> None:
    (burn, _) = slo_rules([make_slo(sli="error_rate", windows=PAGE_1H)]).groups
    ratio = burn.rules[1].to_dict()
    assert ratio["expr"] == (
        'sum (rate(vllm:request_success_total{deployment="tiny", finished_reason=~"abort|error"}[5m])) / '
        '(sum (rate(vllm:request_success_total{deployment="tiny"}[5m])) > 0)')


def test_goodput_takes_the_worst_target_as_a_lower_bound_and_says_so() -> None:
    slo = make_slo(sli="goodput", objective=0.95, windows=PAGE_1H,
                   targets=(LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05)))
    result = slo_rules([slo])
    records = {(r["record"], r["labels"].get("target")): r["expr"]  # type: ignore[union-attr]
               for r in rules_of(result) if "record" in r}
    assert records[("controlplane_slo_target:request_errors_per_request:ratio_rate5m", "tpot")] == (
        '(controlplane_slo_target:requests:rate5m{slo="t", target="tpot"} - on () group_left sum (rate('
        'vllm:request_time_per_output_token_seconds_bucket{deployment="tiny", le="0.05"}[5m]))) / '
        '(controlplane_slo_target:requests:rate5m{slo="t", target="tpot"} > 0)')
    assert records[("controlplane_slo:request_errors_per_request:ratio_rate5m", None)] == (
        'max without (target) (controlplane_slo_target:request_errors_per_request:ratio_rate5m{slo="t"})')
    assert any("goodput cannot be computed from histograms" in w and "lower bound" in w for w in result.warnings)
    # the hold: the short window is unknown once any target recorded nothing (a decode backlog still records TTFTs)
    (page,) = [r["expr"] for r in rules_of(result) if r.get("alert") == names.ALERT_SLO_BURN_PAGE]
    fewest = 'min without (target) (controlplane_slo_target:requests:rate5m{slo="t"})'
    assert f"(({fewest} == 0) or absent({fewest}))" in str(page)


def test_zero_traffic_gives_no_ratio_rather_than_nan() -> None:
    for slo in (make_slo(), make_slo(sli="error_rate")):
        for rule in rules_of(slo_rules([slo])):
            if str(rule.get("record", "")).startswith(names.REC_SLO_ERROR_RATIO):
                assert str(rule["expr"]).endswith(" > 0)"), rule


def test_without_a_minimum_rate_the_alert_has_no_rate_clause() -> None:
    (burn, _) = slo_rules([make_slo(min_rate=0.0, windows=PAGE_1H)]).groups
    assert ">=" not in burn.alerts()[0].expr.render()


@pytest.mark.parametrize(("sli", "threshold", "edge", "warned"), [
    ("ttft", 0.5, 0.5, None),
    ("ttft", 0.3, 0.25, "ttft threshold 0.3 s is not a bucket edge of vllm:time_to_first_token_seconds; the rules use "
                        "0.25 s (the nearest edge below: stricter)"),
    ("tpot", 0.005, 0.01, "the first edge: MORE LENIENT than the SLO"),
    ("e2e", 3.0, 2.5, "vllm:e2e_request_latency_seconds"),
    ("queue", 1.0, 1.0, None),
    ("itl", 0.05, 0.05, None),
], ids=["on-edge", "between-edges", "below-first-edge", "e2e", "queue", "itl"])
def test_thresholds_snap_to_bucket_edges_with_a_warning_when_they_move(sli: str, threshold: float, edge: float,
                                                                       warned: str | None) -> None:
    got_edge, warning = snap_to_edge(LatencyTarget(sli, threshold))  # type: ignore[arg-type]
    assert got_edge == edge
    assert (warning is None) if warned is None else (warned in (warning or ""))
    warnings = slo_rules([make_slo(sli=sli, threshold_s=threshold)]).warnings  # type: ignore[arg-type]
    assert any(warned in w for w in warnings) if warned else not [w for w in warnings if "bucket edge" in w]


def test_itl_rules_say_they_count_inter_token_intervals_not_requests() -> None:
    result = slo_rules([make_slo(sli="itl", threshold_s=0.05)])
    assert any("itl rules count inter-token intervals" in w for w in result.warnings)
    description = dict(result.groups[0].alerts()[0].annotations)["description"]
    assert "of inter-token intervals missed itl <= 0.05 s" in description


def test_whole_number_edges_match_both_the_python_and_the_prometheus_3_spelling() -> None:
    pattern = le_matcher(1.0).value
    assert [bool(re.fullmatch(pattern, v)) for v in ("1.0", "1", "10", "1.5", "11.0")] == [True, True, False, False,
                                                                                         False]
    assert le_matcher(0.05).render() == 'le="0.05"'


def test_page_and_ticket_alerts_have_distinct_names_and_severities() -> None:
    *alerts, no_data = slo_rules([make_slo()]).groups[0].alerts()
    assert [(a.alert, a.label("severity"), a.label("burn_rate"), a.label("long_window")) for a in alerts] == [
        (names.ALERT_SLO_BURN_PAGE, "page", "14.4", "1h"), (names.ALERT_SLO_BURN_PAGE, "page", "6", "6h"),
        (names.ALERT_SLO_BURN_TICKET, "ticket", "3", "1d"), (names.ALERT_SLO_BURN_TICKET, "ticket", "1", "3d")]
    assert (no_data.alert, no_data.label("severity")) == (names.ALERT_SLO_NO_DATA, "ticket")


def test_switching_tickets_off_leaves_only_page_tiers_and_their_windows() -> None:
    burn = slo_rules([make_slo(ticket=False)]).groups[0]
    assert {a.label("severity") for a in burn.alerts() if a.alert != names.ALERT_SLO_NO_DATA} == {"page"}
    assert not any("rate1d" in str(r.to_dict().get("record")) for r in burn.rules)


def test_a_tier_that_can_never_fire_is_skipped_with_a_warning() -> None:
    result = slo_rules([make_slo(objective=0.9)])  # 14.4 x 10% >= 1
    burn = [a for a in result.groups[0].alerts() if a.alert != names.ALERT_SLO_NO_DATA]
    assert [a.label("burn_rate") for a in burn] == ["6", "3", "1"]
    assert any("page tier 14.4x over 1h skipped" in w for w in result.warnings)


def test_a_calendar_month_slo_records_no_budget_in_prometheus_and_says_so() -> None:
    result = slo_rules([make_slo(calendar=True)])
    assert [g.name for g in result.groups] == ["slo-t"]
    assert any("calendar-month budget is not recorded" in w for w in result.warnings)


def test_every_alert_carries_runbook_summary_description_and_severity() -> None:
    options = RuleOptions(cost_budget_per_million_tokens_usd=2.0, runbook_base_url="https://runbooks.example/x.md")
    burn = [a for g in slo_rules([make_slo(), make_slo("e", sli="error_rate")], options).groups for a in g.alerts()]
    ops = operational_group(options).alerts()
    assert len(burn) == 8 + 2 and len(ops) == 12  # 4 tiers and a no-data ticket per SLO
    for alert in [*burn, *ops]:
        annotations = dict(alert.annotations)
        assert set(annotations) == {"summary", "description", "runbook_url"}, alert.alert
        assert annotations["runbook_url"] == f"https://runbooks.example/x.md#{alert.alert.lower()}"
        assert alert.label("severity") in ("page", "ticket")
    for alert in burn:
        assert {"slo", "deployment", "sli"} <= dict(alert.labels).keys()


def test_an_slo_runbook_url_wins_over_the_default() -> None:
    slo = make_slo()
    slo = type(slo)(**{**slo.__dict__, "runbook_url": "https://wiki/ttft"})
    assert {dict(a.annotations)["runbook_url"] for a in slo_rules([slo]).groups[0].alerts()} == {"https://wiki/ttft"}


def test_operational_alerts_read_the_series_names_module_owns() -> None:
    exprs = {a.rule.alert: a.rule.expr.render() for a in operational_alerts(RuleOptions(
        cost_budget_per_million_tokens_usd=2.0))}
    assert exprs[names.ALERT_KV_SATURATED] == "max by (deployment, replica) (vllm:kv_cache_usage_perc) > 0.9"
    assert exprs[names.ALERT_PREEMPTIONS] == "sum by (deployment, replica) (rate(vllm:num_preemptions_total[5m])) > 0"
    assert exprs[names.ALERT_REPLICA_DOWN] == "max by (deployment, replica) (controlplane_replica_up) == 0"
    assert exprs[names.ALERT_CRASHLOOP] == (
        "(max by (deployment, replica) (controlplane_replica_crashloop) == 1) or "
        "(sum by (deployment, replica) (increase(controlplane_replica_restarts_total[15m])) >= 3)")
    assert exprs[names.ALERT_SCRAPE_FAILING] == "up == 0"
    assert exprs[names.ALERT_SPANS_MISSING] == "min by (deployment, replica) (controlplane_span_coverage_ratio) < 0.99"
    # DCGM keeps the last XID code: a new non-zero code, or a series that appears non-zero, not any non-zero value
    assert exprs[names.ALERT_GPU_XID] == (
        "((DCGM_FI_DEV_XID_ERRORS > 0) and (changes(DCGM_FI_DEV_XID_ERRORS[5m]) > 0)) "
        "or ((DCGM_FI_DEV_XID_ERRORS > 0) unless DCGM_FI_DEV_XID_ERRORS offset 5m)")
    assert exprs[names.ALERT_GPU_TEMP] == "DCGM_FI_DEV_GPU_TEMP > 85"
    assert exprs[names.ALERT_COST] == "max by (deployment) (controlplane_cost_per_million_tokens_usd) > 2"
    assert names.ALERT_COST not in {a.rule.alert for a in operational_alerts(RuleOptions())}


def test_generation_is_deterministic_and_leaves_its_input_alone() -> None:
    slos = [make_slo(), make_slo("g", sli="goodput", objective=0.95,
                                 targets=(LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05)))]
    before = copy.deepcopy(slos)
    first, second = slo_rules(slos), slo_rules(slos)
    assert first == second and slos == before
