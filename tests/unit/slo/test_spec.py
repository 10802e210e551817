"""The SLO spec: what loads, what it becomes, and errors that name the document, the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.slo.durations import format_duration, parse_duration_s
from controlplane.slo.spec import BurnWindow, LatencyTarget, SloWindow, SpecError, load_slos

REPO = Path(__file__).resolve().parents[3]


def doc(spec: str, name: str = "tiny-ttft") -> str:
    return f"apiVersion: controlplane/v1\nkind: SLO\nmetadata:\n  name: {name}\nspec:\n{spec}"


TTFT = "  deployment: tiny\n  sli: ttft\n  threshold: 500ms\n  objective: 0.99\n  window: 28d\n"


def error_of(text: str) -> str:
    with pytest.raises(SpecError) as exc:
        load_slos(text)
    return str(exc.value)


def test_a_latency_slo_becomes_one_target_of_its_own_kind() -> None:
    (slo,) = load_slos(doc(TTFT + "  alerting:\n    min_request_rate_per_s: 0.1\n"))
    assert slo.name == "tiny-ttft" and slo.deployment == "tiny" and slo.sli == "ttft"
    assert slo.targets == (LatencyTarget("ttft", 0.5),)
    assert slo.objective == 0.99 and slo.error_budget_ratio == pytest.approx(0.01)
    assert slo.window == SloWindow("rolling", 28 * 86400.0)
    assert slo.budgeting == "occurrences"
    assert slo.alerting.min_request_rate_per_s == 0.1 and slo.alerting.page and slo.alerting.ticket


def test_default_tiers_are_the_workbook_ones_for_a_30_day_window() -> None:
    (slo,) = load_slos(doc(TTFT.replace("28d", "30d")))
    assert slo.alerting.windows == (
        BurnWindow("page", 3600, 300, 14.4), BurnWindow("page", 21600, 1800, 6.0),
        BurnWindow("ticket", 86400, 7200, 3.0), BurnWindow("ticket", 259200, 21600, 1.0))


def test_default_tiers_scale_with_a_28_day_window_and_keep_their_budget_shares() -> None:
    (slo,) = load_slos(doc(TTFT))
    longs = [format_duration(w.long_s) for w in slo.alerting.windows]
    shorts = [format_duration(w.short_s) for w in slo.alerting.windows]
    assert longs == ["56m", "5h36m", "22h24m", "2d19h12m"] and shorts == ["4m40s", "28m", "1h52m", "5h36m"]
    shares = [w.budget_spent_ratio(slo.window.duration_s) for w in slo.alerting.windows]
    assert shares == pytest.approx([0.02, 0.05, 0.10, 0.10])


def test_a_calendar_month_is_thirty_days_nominal() -> None:
    (slo,) = load_slos(doc(TTFT.replace("28d", "calendar_month")))
    assert slo.window == SloWindow("calendar_month", 30 * 86400.0)
    assert slo.alerting.windows[0].long_s == 3600


def test_a_low_objective_caps_the_default_tiers_so_a_total_outage_pages_within_the_hour() -> None:
    from controlplane.slo.alert_state import condition
    from controlplane.slo.evaluate import Counts, build_status

    low = doc("  deployment: tiny\n  sli: ttft\n  threshold: 500ms\n  objective: 0.9\n", "low")
    (slo,) = load_slos(low)
    assert [w.burn_rate for w in slo.alerting.windows] == [9.0, 6.0, 3.0, 1.0]  # 14.4x of 10 % would be 144 %
    (usual,) = load_slos(doc(TTFT))
    assert [w.burn_rate for w in usual.alerting.windows] == [14.4, 6.0, 3.0, 1.0]
    (openslo,) = load_slos("""apiVersion: openslo/v1
kind: SLO
metadata: {name: low-ttft}
spec:
  service: tiny
  indicator:
    metadata: {name: ttft}
    spec:
      thresholdMetric: {metricSource: {type: prometheus, spec: {query: vllm:time_to_first_token_seconds}}}
  timeWindow: [{duration: 30d, isRolling: true}]
  budgetingMethod: Occurrences
  objectives: [{op: lte, value: 0.5, target: 0.9}]
""")
    assert openslo.alerting.windows[0].burn_rate == 9.0
    # Every request fails for the last 55 minutes of a quiet day: the page fires (the 1 h window at 92 % bad).
    now = 1e6
    counts = {3600.0: Counts(good=50, total=600), 300.0: Counts(good=0, total=50),
              21600.0: Counts(good=2050, total=2600), 1800.0: Counts(good=0, total=300),
              86400.0: Counts(good=8050, total=8600), 7200.0: Counts(good=100, total=650)}
    for w in (259200.0, 21600.0):
        counts.setdefault(w, counts[86400.0])
    status = build_status(slo, now, (now - 30 * 86400, now), counts[86400.0], counts)
    assert condition(status, "page").active


def test_goodput_holds_every_target_and_error_rate_none() -> None:
    goodput = doc("  deployment: tiny\n  sli: goodput\n  objective: 0.95\n  targets:\n"
                  "    - {sli: ttft, threshold: 0.5}\n    - {sli: tpot, threshold: 50ms}\n", "g")
    errors = doc("  deployment: tiny\n  sli: error_rate\n  objective: 0.999\n", "e")
    g, e = load_slos(goodput + "\n---\n" + errors)
    assert g.targets == (LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05))
    assert e.targets == () and e.window.duration_s == 30 * 86400.0


def test_explicit_tiers_take_for_and_default_the_short_window_to_a_twelfth() -> None:
    (slo,) = load_slos(doc(TTFT + "  alerting:\n    ticket: false\n    windows:\n"
                                 "      - {severity: page, long: 2h, burn_rate: 10, for: 2m}\n"))
    assert slo.alerting.windows == (BurnWindow("page", 7200, 600, 10.0, 120.0),)
    assert not slo.alerting.ticket and slo.alerting.enabled_windows() == slo.alerting.windows


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("28d", 28 * 86400), ("1w", 7 * 86400), (0.25, 0.25)])
def test_durations_read_as_people_write_them(text: str | float, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


def test_prometheus_durations_print_largest_units_first() -> None:
    assert [format_duration(s) for s in (3360, 280, 241920, 0.5, 86400)] == ["56m", "4m40s", "2d19h12m", "500ms", "1d"]


@pytest.mark.parametrize(("spec", "expected"), [
    (TTFT + "  foo: 1\n",
     "<text> (tiny-ttft): spec.foo: unknown field; allowed: deployment, sli, threshold, targets, objective"),
    (TTFT.replace("0.99", "99.9"), "spec.objective: must be a fraction between 0 and 1 exclusive; write 0.999 for "
                                   "99.9% (got 99.9)"),
    (TTFT.replace("500ms", "fast"), "spec.threshold: expected a number of seconds or a duration like 500ms"),
    (TTFT.replace("sli: ttft", "sli: ttfb"), "spec.sli: Input should be 'ttft', 'tpot', 'itl', 'e2e', 'queue', "
                                             "'error_rate' or 'goodput' (got 'ttfb')"),
    (TTFT.replace("  threshold: 500ms\n", ""), "spec: sli 'ttft' needs `threshold`"),
    (TTFT.replace("28d", "28 days"), "spec.window: must be 'calendar_month' or a rolling duration"),
    (TTFT.replace("deployment: tiny", "deployment: Tiny!"), "spec.deployment: String should match pattern"),
    ("  deployment: tiny\n  sli: goodput\n  objective: 0.9\n  threshold: 1s\n", "sli 'goodput' needs `targets`"),
    ("  deployment: tiny\n  sli: error_rate\n  objective: 0.9\n  threshold: 1s\n",
     "sli 'error_rate' takes neither `threshold` nor `targets`"),
    (TTFT.replace("0.99", "0.9") + "  alerting:\n    windows:\n      - {severity: page, long: 1h, burn_rate: 14.4}\n",
     "spec.alerting.windows[0].burn_rate: 14.4 x budget 0.1 >= 1, so the error ratio could never exceed it; allowed: "
     "burn_rate < 10 for this objective"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: page, long: 30d, burn_rate: 2}\n",
     "spec.alerting.windows[0].long: 2.592e+06 s must be shorter than the SLO window 28d"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: page, long: 1h, short: 2h, burn_rate: 2}\n",
     "spec.alerting.windows[0]: short (7200 s) must be shorter than long (3600 s)"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: sms, long: 1h, burn_rate: 2}\n",
     "spec.alerting.windows[0].severity: Input should be 'page' or 'ticket'"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: page, long: 5s, burn_rate: 10}\n",
     "spec.alerting.windows[0]: the short window (0 s) must be at least 1 s (by default it is long / 12 in whole "
     "seconds; long is 5 s)"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: page, long: 1h, short: 0.0001, burn_rate: 10}\n",
     "spec.alerting.windows[0]: short (0.0001 s) must be a whole number of milliseconds"),
    (TTFT + "  alerting:\n    windows:\n      - {severity: page, long: 1h, burn_rate: 10, for: 90.5ms}\n",
     "spec.alerting.windows[0]: for (0.0905 s) must be a whole number of milliseconds"),
    (TTFT.replace("28d", "5s"), "spec.window: 5s is outside the allowed range of a rolling window: 1h to 366d"),
    (TTFT.replace("28d", "99999999999d"), "spec.window: 99999999999d is outside the allowed range"),
], ids=['unknown-field',
    'objective-as-percent',
    'bad-duration',
    'unknown-sli',
    'latency-without-threshold',
    'bad-window',
    'bad-deployment-name',
    'goodput-without-targets',
    'error-rate-with-threshold',
    'impossible-burn-rate',
    'tier-longer-than-window',
    'short-not-shorter',
    'unknown-severity',
    'default-short-window-under-a-second',
    'short-window-not-whole-milliseconds',
    'for-not-whole-milliseconds',
    'window-too-short',
    'window-too-long'])
def test_bad_specs_are_rejected_naming_the_field_and_what_is_allowed(spec: str, expected: str) -> None:
    assert expected in error_of(doc(spec))


def test_errors_name_the_document_in_a_multi_document_file(tmp_path: Path) -> None:
    path = tmp_path / "slos.yaml"
    path.write_text(doc(TTFT) + "---\n" + doc(TTFT.replace("0.99", "2"), "second"))
    assert error_of(str(path)).startswith(f"{path} document 2 (second): spec.objective:")


def test_a_name_used_twice_is_rejected_naming_both_documents() -> None:
    message = error_of(doc(TTFT) + "---\n" + doc(TTFT))
    assert "<text> document 2 (tiny-ttft): metadata.name: 'tiny-ttft' is already used by <text> document 1" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("a: [1", "<text>: line 1 column 6: not valid YAML"),
    ("- 1\n- 2\n", "<text>: a document must be a mapping with apiVersion, kind, metadata, spec; got list"),
    ("apiVersion: v2\nkind: SLO\n", "<text>: apiVersion: must be 'controlplane/v1' or 'openslo/v1' (got 'v2')"),
    (doc(TTFT).replace("kind: SLO", "kind: Slo"), "<text> (tiny-ttft): kind: Input should be 'SLO'"),
    (doc(TTFT, "Bad Name"), "metadata.name: String should match pattern"),
], ids=['not-yaml',
    'not-a-mapping',
    'unknown-api-version',
    'unknown-kind',
    'bad-name'])
def test_malformed_documents_say_what_a_document_must_be(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_a_directory_loads_every_yaml_file_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(doc(TTFT, "b"))
    (tmp_path / "a.yml").write_text(doc(TTFT, "a"))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [s.name for s in load_slos(tmp_path)] == ["a", "b"]


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"{missing}: cannot read: No such file or directory"  # type: ignore[arg-type]


def test_the_committed_example_slos_load() -> None:
    slos = load_slos(REPO / "alerts" / "slos")
    assert {s.name: s.sli for s in slos} == {"tiny-ttft": "ttft", "tiny-tpot": "tpot", "tiny-goodput": "goodput",
                                             "tiny-errors": "error_rate"}
    assert all(s.deployment == "tiny" for s in slos)


# --- OpenSLO v1 --------------------------------------------------------------------------------------


def openslo(indicator: str, objectives: str, window: str = "28d", rolling: str = "true", extra: str = "") -> str:
    return f"""apiVersion: openslo/v1
kind: SLO
metadata:
  name: ttft
  displayName: First token
spec:
  service: tiny
  description: from OpenSLO
{indicator}
  timeWindow:
    - duration: {window}
      isRolling: {rolling}
  budgetingMethod: Occurrences
  objectives:
{objectives}{extra}"""


THRESHOLD = """  indicator:
    metadata: {name: ttft}
    spec:
      thresholdMetric:
        metricSource:
          type: Prometheus
          spec: {query: 'sum(rate(vllm:time_to_first_token_seconds_bucket[5m])) by (le)'}"""


def test_openslo_threshold_objectives_become_one_slo_each() -> None:
    objectives = ("    - {displayName: Interactive, op: lte, value: 0.5, target: 0.99}\n"
                  "    - {displayName: Batch, op: lte, value: 2.5, targetPercent: 99.9}\n")
    fast, slow = load_slos(openslo(THRESHOLD, objectives))
    assert (fast.name, fast.sli, fast.targets, fast.objective) == ("ttft-interactive", "ttft",
                                                                    (LatencyTarget("ttft", 0.5),), 0.99)
    assert (slow.name, slow.targets, slow.objective) == ("ttft-batch", (LatencyTarget("ttft", 2.5),), 0.999)
    assert fast.deployment == "tiny" and fast.window == SloWindow("rolling", 28 * 86400.0)
    assert fast.alerting.windows[0].long_s == 3360  # workbook tiers scaled to 28 days, as for native specs


BUCKET = """  indicator:
    metadata: {name: tpot}
    spec:
      ratioMetric:
        counter: true
        good:
          metricSource:
            spec: {query: 'vllm:request_time_per_output_token_seconds_bucket{le="0.05"}'}
        total: {metricSource: {type: Prometheus, spec: {query: 'vllm:request_time_per_output_token_seconds_count'}}}"""


def test_openslo_ratio_on_a_histogram_bucket_reads_the_threshold_from_le() -> None:
    (slo,) = load_slos(openslo(BUCKET, "    - {target: 0.99}\n"))
    assert slo.name == "ttft" and slo.sli == "tpot" and slo.targets == (LatencyTarget("tpot", 0.05),)


def test_openslo_ratio_on_request_success_is_the_error_rate_and_sli_refs_resolve() -> None:
    sli = """apiVersion: openslo/v1
kind: SLI
metadata: {name: failures}
spec:
  ratioMetric:
    counter: true
    bad: {metricSource: {type: Prometheus, spec: {query: 'vllm:request_success_total{finished_reason=~"abort|error"}'}}}
    total: {metricSource: {type: Prometheus, spec: {query: 'vllm:request_success_total'}}}
---
apiVersion: openslo/v1
kind: Service
metadata: {name: tiny}
spec: {description: the demo}
---
"""
    (slo,) = load_slos(sli + openslo("  indicatorRef: failures", "    - {target: 0.999}\n", "1M", "false"))
    assert slo.sli == "error_rate" and slo.targets == () and slo.objective == 0.999
    assert slo.window == SloWindow("calendar_month", 30 * 86400.0)
    utc = openslo("  indicatorRef: failures", "    - {target: 0.999}\n", "1M", "false").replace(
        "isRolling: false", "isRolling: false\n      calendar: {startTime: 2024-01-01 00:00:00, timeZone: UTC}")
    assert load_slos(sli + utc)[0].window == SloWindow("calendar_month", 30 * 86400.0)  # UTC from the 1st: as ours
    utc = openslo("  indicatorRef: failures", "    - {target: 0.999}\n", "1M", "false").replace(
        "isRolling: false", "isRolling: false\n      calendar: {startTime: 2024-01-01 00:00:00, timeZone: UTC}")
    assert load_slos(sli + utc)[0].window == SloWindow("calendar_month", 30 * 86400.0)  # UTC from the 1st: as ours


@pytest.mark.parametrize(("text", "expected"), [
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n").replace("Occurrences", "Timeslices"),
     "spec.budgetingMethod: Input should be 'Occurrences'"),
    (openslo(THRESHOLD, "    - {op: gte, value: 0.5, target: 0.99}\n"),
     "spec.objectives[0]: a latency thresholdMetric needs op: lte (or lt) and value: SECONDS > 0"),
    (openslo(THRESHOLD.replace("time_to_first_token", "made_up"), "    - {op: lte, value: 0.5, target: 0.99}\n"),
     "indicator thresholdMetric: no vLLM latency histogram in the query; recognised: vllm:time_to_first_token_seconds"),
    (openslo("  indicatorRef: nowhere", "    - {target: 0.99}\n"),
     "spec.indicatorRef: no SLI document named 'nowhere' (known: none in this input)"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", "1Q", "false"),
     "spec.timeWindow[0]: supported are a rolling window in m/h/d/w"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", extra="  alertPolicies: [page]\n"),
     "spec.alertPolicies: unknown field; allowed: description, service, indicator, indicatorRef, timeWindow"),
    (openslo(THRESHOLD, "    - {op: lte, value: .nan, target: 0.99}\n"),
     "spec.objectives[0].value: Input should be a finite number"),
    (openslo(THRESHOLD, "    - {op: lte, value: .inf, target: 0.99}\n"),
     "spec.objectives[0].value: Input should be a finite number"),
    (openslo(BUCKET.replace("0.05", "1e"), "    - {target: 0.99}\n"),
     'indicator ratioMetric: le="1e" is not a latency in seconds; allowed: a finite number > 0'),
    (openslo(BUCKET.replace("0.05", "-1"), "    - {target: 0.99}\n"),
     'indicator ratioMetric: le="-1" is not a latency in seconds'),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", "0d"),
     "spec.timeWindow[0].duration: String should match pattern"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", "5m"),
     "spec.timeWindow[0].duration: 5m is outside the allowed range of a rolling window: 1h to 366d"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", "1M", "false").replace(
        "isRolling: false", "isRolling: false\n      calendar: {startTime: '2024-01-15 00:00:00', timeZone: UTC}"),
     "spec.timeWindow[0].calendar: the calendar month is budgeted in UTC from the 1st at 00:00; "
     "got startTime='2024-01-15 00:00:00'"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, target: 0.99}\n", "1M", "false").replace(
        "isRolling: false", "isRolling: false\n      calendar: {startTime: 2024-01-01 00:00:00, "
                            "timeZone: America/Los_Angeles}"),
     "timeZone='America/Los_Angeles'; allowed: no calendar, or timeZone UTC with a startTime on the 1st"),
    (openslo(THRESHOLD, "    - {op: lte, value: 0.5, targetPercent: 99.99999999999999}\n"),
     "spec.objectives[0]: targetPercent 99.99999999999999 is 1 as an objective; allowed: a percentage that leaves"),
], ids=['timeslices',
    'gte-latency',
    'unknown-metric',
    'missing-sli-ref',
    'quarter-window',
    'alert-policies',
    'nan-threshold',
    'infinite-threshold',
    'le-not-a-number',
    'le-negative',
    'zero-window',
    'calendar-mid-month',
    'rolling-minutes',
    'calendar-time-zone',
    'objective-rounds-to-1'])
def test_openslo_features_that_cannot_be_carried_over_are_errors_not_approximations(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_keep_firing_for_defaults_to_the_shortest_short_window_and_is_checked() -> None:
    (default,) = load_slos(doc(TTFT))
    assert default.alerting.keep_firing_for_s is None and default.alerting.keep_firing_s() == 280.0  # 28d: 4m40s
    (off,) = load_slos(doc(TTFT + "  alerting:\n    keep_firing_for: 0s\n"))
    assert off.alerting.keep_firing_s() == 0.0
    (own,) = load_slos(doc(TTFT + "  alerting:\n    keep_firing_for: 15m\n"))
    assert own.alerting.keep_firing_s() == 900.0
    assert "spec.alerting.keep_firing_for: 28d must be shorter than the SLO window 28d" in error_of(
        doc(TTFT + "  alerting:\n    keep_firing_for: 28d\n"))


def test_keep_firing_for_is_a_whole_number_of_milliseconds_and_part_of_the_tier_signature() -> None:
    from controlplane.slo.ruletests import tier_signature

    assert "keep_firing_for (0.0001 s) must be a whole number of milliseconds" in error_of(
        doc(TTFT + "  alerting:\n    keep_firing_for: 0.0001\n"))
    (a,) = load_slos(doc(TTFT, "a"))
    (b,) = load_slos(doc(TTFT + "  alerting:\n    keep_firing_for: 1h\n", "b"))
    assert tier_signature(a) != tier_signature(b)  # b's resolve times get their own tier files
