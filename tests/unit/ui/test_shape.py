"""Pure shaping of API answers: unknown stays unknown, rates come from counter deltas, bars from phases."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from controlplane.ui import shape


@pytest.mark.parametrize(("fn", "value", "expected"), [
    (shape.ratio, None, "unknown"), (shape.ratio, float("nan"), "unknown"), (shape.ratio, 0.0, "0.00%"),
    (shape.ratio, 0.98765, "98.77%"), (shape.seconds, None, "unknown"), (shape.seconds, 0.0, "0.0 ms"),
    (shape.seconds, 0.0123, "12.3 ms"), (shape.seconds, 2.5, "2.500 s"), (shape.usd, None, "unknown"),
    (shape.usd, 0.5, "$0.5000"), (shape.text, None, "unknown"), (shape.text, 0, "0"),
    (shape.text, 11800.0, "11,800"), (shape.text, 0.5, "0.5"),
    (shape.text, float("inf"), "unknown"), (shape.text, 123456, "123,456"), (shape.when, None, "unknown"),
    (shape.when, 0, "1970-01-01 00:00:00 UTC"), (shape.ratio, True, "unknown"),
])
def test_values_are_formatted_and_missing_ones_say_unknown_while_zero_stays_zero(fn: Callable[[Any], str], value: Any,
                                                                                 expected: str) -> None:
    assert fn(value) == expected


@pytest.mark.parametrize(("obj", "expected"), [
    ({"runtime": {"simulated": True}}, True), ({"config": {"simulated": "True"}}, True),
    ({"engine": {"kind": "simulated"}}, True), ({"engine": "sim"}, True), ({"simulated": False}, False),
    ({"simulated": "false"}, False), ({"name": "simulated-looking-name"}, False), ({"runtime": None}, False),
    ([{"x": [{"simulated": True}]}], True),
])
def test_a_simulated_engine_is_recognised_only_by_an_explicit_flag(obj: object, expected: bool) -> None:
    assert shape.is_simulated(obj) is expected


def test_a_simulated_deployment_labels_all_its_replicas_and_a_flagged_replica_labels_itself() -> None:
    deployments: list[dict[str, Any]] = [
        {"name": "a", "engine": {"kind": "simulated"}, "replicas": [{"name": "a-0"}, {"name": "a-1"}]},
        {"name": "b", "engine": {}, "replicas": [{"name": "b-0"}, {"name": "b-1", "simulated": True}]}]
    replicas: list[dict[str, Any]] = [{"name": "w", "config": {"simulated": "true"}}, {"name": "v", "config": None}]
    assert shape.simulated_replicas(deployments, replicas) == {"a-0", "a-1", "b-1", "w"}
    assert shape.label("a-0", {"a-0"}) == "a-0 (simulated)" and shape.label(None, set()) == "unknown"


def _sample(ts: float, preemptions: float | None, ok: bool = True, replica: str = "r") -> dict[str, object]:
    return {"replica": replica, "ts_unix_s": ts, "scrape_ok": ok, "kv_usage_ratio": 0.5 if ok else None,
            "num_running": 1.0, "num_waiting": 0.0, "preemptions_total": preemptions}


def test_preemption_rate_is_the_counter_delta_over_time_and_unknown_across_gaps() -> None:
    samples = [_sample(0, 0.0), _sample(10, 5.0), _sample(20, None), _sample(30, 9.0), _sample(40, 10.0, ok=False),
               _sample(50, 12.0), _sample(60, 14.0), _sample(5, 100.0, replica="other")]
    df = shape.kv_frame(list(reversed(samples)), set())  # the API answers newest first
    r = df[df["replica"] == "r"].sort_values("time")
    rates = r["preemptions_per_s"].tolist()
    assert math.isnan(rates[0]) and rates[1] == pytest.approx(0.5)
    assert math.isnan(rates[2]) and math.isnan(rates[3])  # no reading, and nothing to difference against
    assert math.isnan(rates[4]) and math.isnan(rates[5])  # failed scrape: every reading unknown, then no previous
    assert rates[6] == pytest.approx(0.2)
    failed = r.iloc[4]
    assert math.isnan(failed["kv_usage_ratio"]) and math.isnan(failed["num_running"])  # not 0
    assert df[df["replica"] == "other"]["preemptions_per_s"].isna().all()


def test_a_counter_that_goes_down_gives_no_rate_rather_than_a_negative_one() -> None:
    df = shape.kv_frame([_sample(0, 10.0), _sample(10, 2.0)], set())
    assert df["preemptions_per_s"].isna().all()


def test_latest_kv_table_counts_preemptions_over_known_readings_only() -> None:
    rows = shape.kv_latest([_sample(0, 1.0), _sample(10, None, ok=False), _sample(20, 4.0, ok=False)], {"r"})
    assert rows[0]["replica"] == "r (simulated)"
    assert rows[0]["scrape"].startswith("failed") and rows[0]["KV usage"] == "unknown"
    assert rows[0]["preemptions in window"] == "unknown"  # one known reading is not a count


def test_waterfall_lays_the_phases_end_to_end_and_stops_at_the_first_unknown_one() -> None:
    bars, missing = shape.waterfall({"queue_s": 0.1, "prefill_s": 0.2, "decode_s": 0.7})
    assert missing == [] and bars[["start_s", "end_s"]].to_numpy().ravel().tolist() == pytest.approx(
        [0.0, 0.1, 0.1, 0.3, 0.3, 1.0])
    bars, missing = shape.waterfall({"queue_s": 0.0, "prefill_s": None, "decode_s": 0.7})
    assert list(bars["phase"]) == ["queue"] and missing == ["prefill", "decode"]
    assert shape.missing_phases({"queue_s": 0.0, "prefill_s": 0.1}) == ["decode"]


def test_phase_summary_counts_unknowns_separately_from_the_quantiles() -> None:
    reqs = [{"queue_s": float(i), "prefill_s": None} for i in range(101)]
    rows = {r["phase"]: r for r in shape.phase_summary(reqs)}
    assert rows["queue"]["known"] == "101" and rows["queue"]["p50"] == "50.000 s" and rows["queue"]["p99"] == "99.000 s"
    assert rows["prefill"] == {"phase": "prefill", "known": "0", "unknown": "101", "p50": "unknown", "p90": "unknown",
                               "p99": "unknown"}
    assert set(shape.phase_frame(reqs)["phase"]) == {"queue"}


def test_alert_state_is_the_worst_open_episode() -> None:
    alerts = [{"slo": "a", "state": "pending", "severity": "page"},
              {"slo": "a", "state": "firing", "severity": "ticket"},
              {"slo": "a", "state": "resolved", "severity": "page"},
              {"slo": "b", "state": "resolved", "severity": "page"}]
    assert shape.alert_state(alerts, "a") == "firing (ticket)"
    assert shape.alert_state(alerts, "b") == "inactive"


def test_alert_timeline_splits_pending_and_firing_and_runs_open_episodes_to_now() -> None:
    df = shape.alert_timeline([{"slo": "s", "severity": "page", "started_unix_s": 100.0, "fired_unix_s": 160.0,
                                "resolved_unix_s": None},
                               {"slo": "s", "severity": "ticket", "started_unix_s": 50.0, "fired_unix_s": None,
                                "resolved_unix_s": 80.0}], now=400.0)
    spans = {(r.alert, r.phase): (r.start.timestamp(), r.end.timestamp()) for r in df.itertuples()}
    assert spans == {("s · page", "pending"): (100.0, 160.0), ("s · page", "firing"): (160.0, 400.0),
                     ("s · ticket", "pending"): (50.0, 80.0)}


def test_cost_frame_keeps_null_costs_as_gaps() -> None:
    items = [{"deployment": "d", "points": [
        {"ts_unix_s": 0, "usd_per_hour": 2.0, "usd_per_1m_prompt_tokens": None, "usd_per_1m_completion_tokens": 3.0,
         "replicas_up": 2}]}]
    df = shape.cost_frame(items)
    assert df["usd_per_hour"].tolist() == [2.0] and math.isnan(df["usd_per_1m_prompt_tokens"].iloc[0])
    totals = shape.cost_rows([{"deployment": "d", "price_per_replica_hour_usd": None, "totals": {"usd": None}}])
    assert totals[0]["cost"] == "unknown" and totals[0]["price per replica-hour"] == "unknown"


def test_change_rows_compare_current_and_proposed_one_level_deep() -> None:
    rows = shape.change_rows({"engine": {"max_num_seqs": 4}}, {"engine": {"max_num_seqs": 8, "quantization": "fp8"}})
    assert rows == [{"setting": "engine.max_num_seqs", "current": "4", "proposed": "8"},
                    {"setting": "engine.quantization", "current": "unknown", "proposed": "fp8"}]
    # An engine argument set to None is vLLM's default (for quantization, the checkpoint's weights), not unknown.
    back = shape.change_rows({"engine": {"quantization": "fp8_per_channel", "max_num_seqs": None}},
                             {"engine": {"quantization": None, "max_num_seqs": 8}, "replicas": None})
    assert back == [{"setting": "engine.max_num_seqs", "current": "vLLM default", "proposed": "8"},
                    {"setting": "engine.quantization", "current": "fp8_per_channel",
                     "proposed": "none (the checkpoint's weights)"},
                    {"setting": "replicas", "current": "unknown", "proposed": "unknown"}]


def test_evidence_is_split_into_inputs_predictions_and_comparison() -> None:
    parts = shape.evidence_parts({"inputs": {"rate": 1}, "predicted_attainment": 0.99, "slos": [{"name": "s"}],
                                  "candidates": [{"config": "x"}], "notes": ["n"]})
    assert parts["inputs"] == {"rate": 1} and parts["predicted"] == {"predicted_attainment": 0.99}
    assert parts["slos"] == [{"name": "s"}] and parts["comparison"] == [{"config": "x"}]
    assert parts["other"] == {"notes": ["n"]}


def test_action_rows_show_only_the_settings_that_changed() -> None:
    rows = shape.action_rows([{"ts_unix_s": 0, "actor": "user", "kind": "reconfigure", "replica": "r",
                               "before_config": {"a": 1, "b": 2}, "after_config": {"a": 1, "b": 3, "c": None}}], {"r"})
    assert rows[0]["config change"] == "b: 2 -> 3" and rows[0]["replica"] == "r (simulated)"
    w8 = shape.action_rows([{"ts_unix_s": 0, "actor": "tuner", "kind": "reconfigure",
                             "before_config": {"quantization": None}, "after_config": {"quantization": "fp8"}}], set())
    assert w8[0]["config change"] == "quantization: none (the checkpoint's weights) -> fp8"


def test_history_frame_leaves_steps_without_requests_as_gaps() -> None:
    df = shape.history_frame([{"ts_unix_s": 0, "requests": 0, "attainment": None},
                              {"ts_unix_s": 60, "requests": 10, "attainment": 0.9}])
    assert math.isnan(df["attainment"].iloc[0]) and df["attainment"].iloc[1] == 0.9


def test_gapped_numbers_the_segments_between_unknown_readings_per_series() -> None:
    df = pd.DataFrame({"time": range(6), "s": ["a", "a", "a", "a", "b", "b"],
                       "v": [1.0, float("nan"), 2.0, 3.0, float("nan"), 4.0]})
    out = shape.gapped(df, "s", "v")
    assert out[["s", "v", "segment"]].to_numpy().tolist() == [["a", 1.0, 0], ["a", 2.0, 1], ["a", 3.0, 1],
                                                              ["b", 4.0, 1]]


def test_a_simulated_deployment_s_slo_and_cost_are_labelled_so_and_a_real_one_s_are_not() -> None:
    slos = [{"name": n, "deployment": d, "simulated": sim, "objective": 0.99, "attainment": 0.9, "targets": [],
             "requests": {}} for n, d, sim in (("s", "simdep", True), ("r", "real", False), ("u", "x", None))]
    assert [r["deployment"] for r in shape.slo_rows(slos, [])] == ["simdep (simulated)", "real", "x"]
    cost = [{"deployment": "simdep", "simulated": True, "price_per_replica_hour_usd": 2.0, "totals": {},
             "points": [{"ts_unix_s": 0.0, "usd_per_hour": 2.0}]},
            {"deployment": "real", "simulated": False, "totals": {}, "points": [{"ts_unix_s": 0.0}]}]
    assert [r["deployment"] for r in shape.cost_rows(cost)] == ["simdep (simulated)", "real"]
    assert shape.cost_frame(cost)["deployment"].tolist() == ["simdep (simulated)", "real"]
