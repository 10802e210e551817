"""The simulated engine's live loop against a fake clock: the simulator's scheduler, pass by pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collectors.promtext import parse
from collectors.vllm_metrics import read_engine
from controlplane import names
from controlplane.engines.sim_engine import LiveEngine, LiveRequest, RequestInfo, Tokens
from controlplane.engines.sim_metrics import SimTelemetry
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, Roof, StepCost
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import LogNormal, OnOff, Uniform, Workload, synthetic
from tests.unit.engines.fakes import FakeClock, Recorder, run_until

LINEAR = StepCost.linear(Coefficients(4e-3, 2e-5, 1e-7))
TWO_ROOFS = StepCost((Roof(const_s=1e-3, per_token_s=5e-5, per_seq_s=1e-4, per_attn_pair_s=1e-8),
                      Roof(const_s=6e-3, per_kv_token_s=2e-6)))


def replica(cost: StepCost = LINEAR, *, seqs: int = 32, budget: int = 512, blocks: int = 2000,
            max_len: int = 1200) -> ReplicaModel:
    return ReplicaModel(cost, max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=16, num_kv_blocks=blocks,
                        max_model_len=max_len, name="sim")


def replay(engine: LiveEngine, clock: FakeClock, wl: Workload) -> tuple[list[LiveRequest], int]:
    """Submit the workload's requests at their arrival times; returns them and the peak number in flight."""
    reqs, peak = [], 0
    for i, (t, p, o) in enumerate(zip(wl.arrival_s.tolist(), wl.prompt_tokens.tolist(), wl.output_tokens.tolist(),
                                      strict=True)):
        run_until(engine, clock, t)
        reqs.append(engine.submit(RequestInfo(f"r{i}"), p, o))
        peak = max(peak, engine.in_flight)
    run_until(engine, clock, math.inf)
    return reqs, peak


CASES = {
    "roomy KV": dict(),
    "two roofs": dict(cost=TWO_ROOFS),
    "tight KV forces preemption": dict(blocks=45, max_len=600),
    "small budget chunks prefills": dict(budget=64, seqs=8),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "_"))
def test_the_live_engine_gives_the_latencies_of_replaying_its_arrivals_in_the_simulator(case: str) -> None:
    rep = replica(**CASES[case])  # type: ignore[arg-type]
    wl = synthetic(OnOff(40, 2, 3, 3), LogNormal(120, 0.8, 1, 400), Uniform(1, 150), n=400, seed=3)
    clock = FakeClock()
    rec = Recorder(clock)
    engine = LiveEngine(rep, clock=clock, observer=rec)
    _, peak = replay(engine, clock, wl)
    offline = simulate(wl, [rep], sample_interval_s=None)
    assert len(rec.timings) == len(wl)
    got = [rec.timings[f"r{i}"] for i in range(len(wl))]
    for attr, want in (("ttft_s", offline.ttft_s), ("e2e_s", offline.e2e_s), ("queue_s", offline.queue_s)):
        assert np.allclose([getattr(t, attr) for t in got], want, rtol=1e-9, atol=1e-9), attr
    assert [t.preemptions for t in got] == offline.preemptions.tolist()
    assert [t.completion_tokens for t in got] == wl.output_tokens.tolist()
    if "preemption" in case:
        assert sum(t.preemptions for t in got) > 0
    # Finished requests' slots are reused: the book is as large as the peak load, not the request count.
    assert len(engine.book.prompt) == peak < len(wl)


def test_tokens_are_released_only_after_the_step_that_produced_them_and_all_of_them_once() -> None:
    rep = replica(blocks=45, max_len=600)
    wl = synthetic(OnOff(40, 2, 3, 3), LogNormal(120, 0.8, 1, 400), Uniform(1, 150), n=200, seed=4)
    clock = FakeClock()
    rec = Recorder(clock)
    engine = LiveEngine(rep, clock=clock, speedup=4.0, observer=rec)
    reqs, _ = replay(engine, clock, Workload(wl.arrival_s / 4.0, wl.prompt_tokens, wl.output_tokens))
    for req in reqs:
        events = []
        while not req.events.empty():
            events.append(req.events.get_nowait())
        timing = rec.timings[req.info.request_id]
        tokens = [e for e in events if isinstance(e, Tokens)]
        assert sum(e.count for e in tokens) == timing.completion_tokens == req.max_tokens
        assert tokens[-1].at_s == timing.finished_s
        releases = rec.releases[req.info.request_id]
        assert releases[0][2] and not any(first for _, _, first in releases[1:])
        # Released at a wall-clock time whose simulated time (x speedup) is at or after the step's end.
        for (wall, _, _), ev in zip(releases, tokens, strict=True):
            assert wall * 4.0 >= ev.at_s - 1e-9
        assert releases[0][0] * 4.0 >= timing.first_token_s - 1e-9


def _hist(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of one histogram on a metrics page."""
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            vals = {s.name: s.value for s in fam.samples}
            return vals[name + "_count"], vals[name + "_sum"]
    raise AssertionError(f"{name} not on the page")


def test_the_metrics_page_follows_a_saturated_replica_through_the_plane_collector() -> None:
    rep = replica(blocks=45, max_len=600)
    wl = synthetic(OnOff(40, 2, 3, 3), LogNormal(120, 0.8, 1, 400), Uniform(1, 150), n=300, seed=5)
    telemetry = SimTelemetry(served_name="sim", model="Llama-3.1-8B", accelerator="H100-80GB",
                             cache_info={"block_size": "16", "num_gpu_blocks": "46"})
    clock = FakeClock()
    engine = LiveEngine(rep, clock=clock, observer=telemetry)
    telemetry.watch(engine)
    seen = []
    for i, (t, p, o) in enumerate(zip(wl.arrival_s.tolist(), wl.prompt_tokens.tolist(), wl.output_tokens.tolist(),
                                      strict=True)):
        run_until(engine, clock, t)
        reading = read_engine(parse(telemetry.render().decode()))
        occ = engine.occupancy()
        assert (reading.num_running, reading.num_waiting) == (occ.running, occ.waiting)
        assert reading.kv_usage_ratio == pytest.approx(occ.kv_usage_ratio)
        assert reading.counters["preemptions_total"] == occ.preemptions
        seen.append(reading)
        engine.submit(RequestInfo(f"r{i}"), p, o)
    run_until(engine, clock, math.inf)
    assert any(r.num_waiting and r.kv_usage_ratio and r.kv_usage_ratio > 0.9 for r in seen), "never saturated"

    text = telemetry.render().decode()
    final = read_engine(parse(text))
    offline = simulate(wl, [rep], sample_interval_s=None)
    assert final.kv_capacity_tokens == 46 * 16 and final.kv_block_size_tokens == 16
    assert (final.num_running, final.num_waiting, final.kv_usage_ratio) == (0, 0, 0)
    assert final.counters["preemptions_total"] == offline.preemptions.sum() > 0
    assert final.counters["request_success_total"] == len(wl) and final.counters["request_errors_total"] == 0
    assert final.counters["generation_tokens_total"] == wl.output_tokens.sum()
    assert final.counters["prompt_tokens_total"] == wl.prompt_tokens.sum()
    count, total = _hist(text, names.VLLM_TTFT_HIST)
    assert count == len(wl) and total == pytest.approx(float(np.sum(offline.ttft_s)), rel=1e-9)
    count, total = _hist(text, names.VLLM_ITL_HIST)  # every token after the first, summing to the decode time
    assert count == (wl.output_tokens - 1).sum() and total == pytest.approx(float(np.sum(offline.decode_s)), rel=1e-9)
    assert _hist(text, names.VLLM_E2E_HIST)[1] == pytest.approx(float(np.sum(offline.e2e_s)), rel=1e-9)
    assert f'{names.SIM_ENGINE_INFO}{{accelerator="H100-80GB",model="Llama-3.1-8B"}} 1.0' in text


def test_a_request_longer_than_max_model_len_is_refused_before_it_reaches_the_scheduler() -> None:
    engine = LiveEngine(replica(max_len=600), clock=FakeClock())
    with pytest.raises(ValueError, match="max_model_len 600"):
        engine.submit(RequestInfo("long"), 500, 101)
    with pytest.raises(ValueError, match="speedup"):
        LiveEngine(replica(), speedup=0.0)


def test_ttft_is_observed_when_the_first_token_is_out_not_when_the_request_ends() -> None:
    # One 500-token request: halfway through its decode a scrape already counts its TTFT, as vLLM's does.
    telemetry = SimTelemetry(served_name="sim", model="Llama-3.1-8B", accelerator="H100-80GB",
                             cache_info={"block_size": "16", "num_gpu_blocks": "2001"})
    clock = FakeClock()
    rec = Recorder(clock, inner=telemetry)
    engine = LiveEngine(replica(), clock=clock, observer=rec)
    telemetry.watch(engine)
    engine.submit(RequestInfo("long"), 100, 500)
    run_until(engine, clock, 0.5)
    first_at = rec.releases["long"][0][0]
    assert "long" not in rec.timings and first_at < 0.5  # mid-decode
    count, total = _hist(telemetry.render().decode(), names.VLLM_TTFT_HIST)
    assert count == 1 and total > 0
    run_until(engine, clock, math.inf)
    count, total_after = _hist(telemetry.render().decode(), names.VLLM_TTFT_HIST)
    assert count == 1 and total_after == pytest.approx(rec.timings["long"].ttft_s) == pytest.approx(total)


def test_a_long_running_engine_keeps_no_state_per_finished_request() -> None:
    clock = FakeClock()
    engine = LiveEngine(replica(), clock=clock)
    for i in range(2_000):
        engine.submit(RequestInfo(f"r{i}"), 10, 2)
        run_until(engine, clock, clock.t + 1.0)
    assert engine.in_flight == 0 and len(engine.engine.fins) == 0 and len(engine.book.prompt) == 1
