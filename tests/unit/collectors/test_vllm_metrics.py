from pathlib import Path

import pytest

from collectors.promtext import parse
from collectors.vllm_metrics import (
    CounterState,
    adjust_counters,
    canonical_name,
    counter_totals,
    read_engine,
    sum_series,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

# Exposition of an older vLLM (pre-0.12 names, no kv_cache_size_tokens label) behind Ray Serve LLM.
OLD_RAY = """\
# TYPE ray_vllm:gpu_cache_usage_perc gauge
ray_vllm:gpu_cache_usage_perc{model_name="m",engine="0"} 0.75
# TYPE ray_vllm:num_requests_running gauge
ray_vllm:num_requests_running{model_name="m",engine="0"} 3
# TYPE ray_vllm:num_requests_waiting gauge
ray_vllm:num_requests_waiting{model_name="m",engine="0"} 2
# TYPE ray_vllm:cache_config_info gauge
ray_vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",cache_dtype="auto"} 1
# TYPE ray_vllm:gpu_prefix_cache_hits counter
ray_vllm:gpu_prefix_cache_hits_total{model_name="m",engine="0"} 40
# TYPE ray_vllm:num_preemptions counter
ray_vllm:num_preemptions_total{model_name="m",engine="0"} 5
"""


@pytest.mark.parametrize(("raw", "canonical"), [
    ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ("vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"),
    ("ray_vllm_time_per_output_token_seconds_sum", "vllm:inter_token_latency_seconds_sum"),
    ("ray_vllm:gpu_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    ("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ("vllm:num_requests_running", "vllm:num_requests_running"),
])
def test_old_and_ray_names_map_to_the_current_vllm_names(raw: str, canonical: str) -> None:
    assert canonical_name(raw) == canonical


def test_a_recorded_vllm_032_scrape_gives_kv_capacity_from_cache_config_info() -> None:
    reading = read_engine(parse((FIXTURES / "vllm_0.32_metrics.txt").read_text()))
    assert reading.kv_capacity_tokens == 1_048_576
    assert reading.kv_block_size_tokens == 128
    assert reading.kv_usage_ratio == 0.0
    assert reading.num_running == 0.0 and reading.num_waiting == 0.0
    assert reading.counters["prompt_tokens_total"] == 15.0
    assert reading.counters["generation_tokens_total"] == 48.0
    assert reading.counters["request_success_total"] == 3.0
    assert reading.counters["request_errors_total"] == 0.0


def test_an_old_ray_scrape_is_read_through_the_renames_and_blocks_times_block_size() -> None:
    reading = read_engine(parse(OLD_RAY))
    assert reading.kv_usage_ratio == 0.75
    assert reading.kv_capacity_tokens == 16_000
    assert reading.num_running == 3 and reading.num_waiting == 2
    assert reading.counters["prefix_cache_hits_total"] == 40
    assert reading.counters["preemptions_total"] == 5


def test_metrics_an_engine_does_not_expose_are_unknown_not_zero() -> None:
    reading = read_engine(parse(OLD_RAY))
    assert reading.counters["prompt_tokens_total"] is None
    assert reading.counters["request_success_total"] is None
    assert read_engine([]).kv_usage_ratio is None
    assert read_engine([]).kv_capacity_tokens is None


def test_failed_requests_are_not_counted_as_successes() -> None:
    text = """\
# TYPE vllm:request_success counter
vllm:request_success_total{finished_reason="stop"} 7
vllm:request_success_total{finished_reason="length"} 3
vllm:request_success_total{finished_reason="abort"} 2
vllm:request_success_total{finished_reason="error"} 1
"""
    reading = read_engine(parse(text))
    assert reading.counters["request_success_total"] == 10
    assert reading.counters["request_errors_total"] == 3


def test_a_counter_that_drops_is_a_restart_and_totals_stay_monotonic() -> None:
    state = CounterState()
    out1, state, reset1 = adjust_counters({"c": 100.0}, state)
    out2, state, reset2 = adjust_counters({"c": 130.0}, state)
    out3, state, reset3 = adjust_counters({"c": 5.0}, state)  # engine restarted
    out4, state, reset4 = adjust_counters({"c": 20.0}, state)
    assert [out1["c"], out2["c"], out3["c"], out4["c"]] == [100.0, 130.0, 135.0, 150.0]
    assert (reset1, reset2, reset3, reset4) == (False, False, True, False)


def test_a_series_missing_from_a_scrape_is_carried_so_the_sum_neither_falls_nor_jumps() -> None:
    # Two finished-reason series; the engine restarts and makes only one of them again at first.
    state = CounterState()
    out, state, _ = adjust_counters({"ok{r=stop}": 100.0, "ok{r=length}": 50.0}, state)
    assert sum_series(out, ["ok"])["ok"] == 150.0
    out, state, reset = adjust_counters({"ok{r=stop}": 1.0}, state)  # restarted: 1 request since
    assert reset and sum_series(out, ["ok"])["ok"] == 151.0
    out, state, reset = adjust_counters({"ok{r=stop}": 1.0, "ok{r=length}": 2.0}, state)  # 2 more, by length
    assert reset and sum_series(out, ["ok"])["ok"] == 153.0
    # A scrape with no series of the field at all says nothing of it: unknown, not the old total held flat.
    out, state, _ = adjust_counters({"other{}": 1.0}, state)
    assert sum_series(out, ["ok"])["ok"] is None
    # After a restart an engine that makes its error series on first use has none yet: the stored errors carry on
    # (5), not 0 until the first error and then 6 (a window starting on the 0 would count 6 errors for 1).
    state = CounterState()
    seen = []
    for raw, start in [({"request_success_total{r=stop}": 100.0, "request_errors_total{r=abort}": 5.0}, 1.0),
                       ({"request_success_total{r=stop}": 3.0}, 2.0), ({"request_success_total{r=stop}": 10.0}, 2.0),
                       ({"request_success_total{r=stop}": 12.0, "request_errors_total{r=abort}": 1.0}, 2.0)]:
        out, state, _ = adjust_counters(raw, state, start)
        seen.append(counter_totals(out)["request_errors_total"])
    assert seen == [5.0, 5.0, 5.0, 6.0]


def test_a_restart_the_counters_outran_between_two_scrapes_is_caught_by_the_process_start_time() -> None:
    # 1000 requests, then a restart and 1500 more before the next scrape: the counter reads 1500 > 1000, no drop.
    state = CounterState()
    out, state, _ = adjust_counters({"c": 1000.0}, state, process_start_s=100.0)
    out, state, reset = adjust_counters({"c": 1500.0}, state, process_start_s=5000.0)
    assert reset and out["c"] == 2500.0
    out, state, reset = adjust_counters({"c": 1600.0}, state, process_start_s=5000.2)  # same process
    assert not reset and out["c"] == 2600.0
    out, state, reset = adjust_counters({"c": 1700.0}, state)  # start time not exposed this time: no guess
    assert not reset and out["c"] == 2700.0


def test_the_process_start_time_is_read_from_the_exposition() -> None:
    reading = read_engine(parse((FIXTURES / "vllm_0.32_metrics.txt").read_text()))
    assert reading.process_start_s == pytest.approx(1.79535591493e9)
    assert read_engine(parse("vllm:num_requests_running 1\n")).process_start_s is None


def test_an_unknown_counter_reading_neither_resets_nor_becomes_zero() -> None:
    state = CounterState()
    _, state, _ = adjust_counters({"c": 50.0}, state)
    out, state, reset = adjust_counters({"c": None}, state)
    assert out["c"] is None and not reset
    out, _, reset = adjust_counters({"c": 60.0}, state)
    assert out["c"] == 60.0 and not reset


def test_a_cache_config_label_that_is_no_whole_number_is_unknown_not_an_error() -> None:
    text = ('# TYPE vllm:cache_config_info gauge\n'
            'vllm:cache_config_info{block_size="inf",num_gpu_blocks="nan-ish",cache_dtype="auto"} 1\n')
    reading = read_engine(parse(text))
    assert reading.kv_capacity_tokens is None
