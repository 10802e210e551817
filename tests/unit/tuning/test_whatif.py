import json

import pytest
from typer.testing import CliRunner

from controlplane.tuning import catalog
from controlplane.tuning.catalog import KvPrecision
from controlplane.tuning.perf_model import Efficiency, EngineArgs, roofline
from controlplane.tuning.simulator import Slo
from controlplane.tuning.whatif import WhatIfSpec, app, parse_lengths, what_if
from controlplane.tuning.workload import Fixed, LogNormal, Uniform

runner = CliRunner()
WORKED = Efficiency(mfu=0.5, bandwidth=1.0, step_overhead_s=0.0, allreduce_latency_s=0.0)


def test_an_idle_h100_serves_llama_8b_at_the_worked_latencies() -> None:
    # One request at a time: TTFT is the 1k prefill (~34 ms worked, see test_perf_model for the 13% gap),
    # TPOT a batch-1 decode step (~4.8 ms worked: the weights read once per token).
    r = what_if(WhatIfSpec(rate_rps=0.2, requests=40, prompt=Fixed(1024), output=Fixed(64), efficiency=WORKED))
    assert r.ttft_s.p50 == pytest.approx(34e-3, rel=0.15)
    assert r.tpot_s.p50 == pytest.approx(4.8e-3, rel=0.10)
    assert r.queue_s.p50 == pytest.approx(0.0, abs=1e-3) and r.goodput_ratio == 1.0


def test_llama_8b_on_h100_at_10_rps_of_512_in_128_out() -> None:
    spec = WhatIfSpec(engine=EngineArgs(max_num_seqs=256), rate_rps=10.0, prompt=Fixed(512), output=Fixed(128),
                      requests=3000, slo=Slo(ttft_s=0.5, tpot_s=0.05))
    r = what_if(spec)
    prior = roofline(catalog.model("Llama-3.1-8B"), catalog.accelerator("H100-80GB"), spec.engine)
    for p in (r.ttft_s, r.tpot_s, r.e2e_s):
        assert p.p50 is not None and p.p90 is not None and p.p99 is not None and p.p50 <= p.p90 <= p.p99
    assert r.tpot_s.p50 > prior.step_cost.decode_step_s(1, 512)  # batching makes steps longer than batch-1
    assert r.tpot_s.p99 < 0.05 and r.ttft_s.p99 < 0.5 and r.goodput_ratio == 1.0
    assert r.served_rps == pytest.approx(r.offered_rps, rel=0.02)
    assert r.goodput_rps == pytest.approx(r.served_rps, rel=0.02)
    assert r.kv_capacity_tokens == prior.memory.kv_capacity_tokens and r.max_num_seqs == 256
    assert r.output_tokens_per_s == pytest.approx(128 * r.served_rps, rel=1e-6)
    usd_h = catalog.accelerator("H100-80GB").usd_per_hour
    assert r.usd_per_million_output_tokens == pytest.approx(usd_h / (r.output_tokens_per_s * 3600) * 1e6)
    assert r.usd_per_million_tokens == pytest.approx(usd_h / (r.total_tokens_per_s * 3600) * 1e6)


def test_an_overloaded_replica_says_so_and_a_second_one_restores_the_tail() -> None:
    base = dict(accelerator="L4", model="Qwen2.5-7B", rate_rps=20.0, prompt=Fixed(512), output=Fixed(128),
                requests=1500, engine=EngineArgs(weights=catalog.WeightPrecision.FP8))
    one = what_if(WhatIfSpec(replicas=1, **base))  # type: ignore[arg-type]
    three = what_if(WhatIfSpec(replicas=3, **base))  # type: ignore[arg-type]
    assert any("overloaded" in n for n in one.notes) and not any("overloaded" in n for n in three.notes)
    assert one.queued_at_end > 100 and three.queued_at_end < 10
    assert three.ttft_s.p99 < one.ttft_s.p99 / 10  # type: ignore[operator]
    assert three.usd_per_hour == pytest.approx(3 * one.usd_per_hour)


def test_a_tight_slo_leaves_no_goodput_and_fp8_kv_doubles_capacity() -> None:
    spec = WhatIfSpec(rate_rps=5.0, requests=300, slo=Slo(ttft_s=1e-3))
    assert what_if(spec).goodput_rps == 0.0
    fp8 = WhatIfSpec(rate_rps=5.0, requests=300, engine=EngineArgs(kv_cache=KvPrecision.FP8))
    assert what_if(fp8).kv_capacity_tokens == pytest.approx(2 * what_if(spec).kv_capacity_tokens, abs=32)


def test_a_price_override_sets_the_cost() -> None:
    spec = WhatIfSpec(rate_rps=5.0, requests=300, usd_per_gpu_hour=10.0, engine=EngineArgs(tensor_parallel_size=2))
    assert what_if(spec).usd_per_hour == 20.0


def test_length_options_parse_to_distributions_and_bad_ones_name_the_forms() -> None:
    assert parse_lengths("512", "prompt") == Fixed(512)
    assert parse_lengths("200-1000", "prompt") == Uniform(200, 1000)
    assert parse_lengths("lognormal:300:0.5:2000", "output") == LogNormal(300.0, 0.5, 1, 2000)
    with pytest.raises(ValueError, match="--output 'abc': expected N"):
        parse_lengths("abc", "output")


def test_the_command_prints_percentiles_goodput_kv_capacity_and_cost() -> None:
    result = runner.invoke(app, ["what-if", "--max-num-seqs", "256", "--rate", "10", "--prompt", "512",
                                 "--output", "128", "--requests", "500"])
    assert result.exit_code == 0, result.output
    for text in ("TTFT ms", "TPOT ms", "goodput", "KV capacity", "per 1M output tokens", "p99"):
        assert text in result.output


def test_the_command_can_print_json() -> None:
    result = runner.invoke(app, ["what-if", "--requests", "200", "--rate", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "Llama-3.1-8B" and data["ttft_s"]["p50"] > 0 and data["kv_capacity_tokens"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--accelerator", "B300"], "unknown accelerator 'B300'; known:"),
    (["--model", "Llama-3.1-70B"], "raise tensor_parallel_size"),
    (["--weights", "fp4"], "allowed: bf16, fp8, int8, int4"),
    (["--arrival", "weekly"], "allowed: poisson, bursty, diurnal"),
    (["--prompt", "5-x"], "--prompt '5-x'"),
    (["--replicas", "0"], "--replicas 0: allowed: a whole number from 1"),
    (["--mfu", "1.5"], "--mfu 1.5: allowed: a number > 0.01 and <= 1"),
    (["--mfu", "1e-12"], "--mfu 1e-12: allowed: a number > 0.01 and <= 1"),  # would simulate for days
    (["--replicas", "200000"], "--replicas 200000: allowed: a whole number from 1 to 100,000"),
    (["--max-model-len", "400000"], "max_model_len 400000 exceeds Llama-3.1-8B's context of 131072 tokens"),
    (["--gpu-memory-utilization", "0.21662"], "leaves no room for a KV cache block"),
    (["--rate", "inf"], "--rate inf: allowed"),
    (["--rate", "nan"], "--rate nan: allowed"),
    (["--rate", "1e-6"], "simulate 579 days; at most 31"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0: allowed"),
    (["--usd-per-gpu-hour", "nan"], "--usd-per-gpu-hour nan: allowed"),
    (["--usd-per-gpu-hour", "-1"], "--usd-per-gpu-hour -1.0: allowed"),
    (["--ttft-slo-ms", "-1"], "--ttft-slo-ms -1.0: allowed"),
    (["--prompt", "99999999999999999999"], "lengths from 1 to 10,000,000 tokens"),
    (["--prompt", "10-5"], "--prompt '10-5': expected N (fixed), LOW-HIGH (uniform, LOW <= HIGH)"),
    (["--output", "0"], "--output '0'"),
    (["--seed", "-1"], "--seed -1: allowed: a whole number from 0"),
    (["--prompt", "lognormal:nan:1"], "--prompt 'lognormal:nan:1'"),
])
def test_bad_input_is_an_error_naming_what_was_wrong_not_a_traceback(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["what-if", "--requests", "50", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_trace_recorded_in_the_store_is_replayed_faster_on_request(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from controlplane.store.db import make_engine, upgrade
    from controlplane.store.repo import Store

    engine = make_engine(f"sqlite:///{tmp_path / 'controlplane.db'}")
    upgrade(engine)
    rows = [{"replica": "gpu-0", "request_id": f"r{i}", "arrival_unix_s": 1_700_000_000.0 + i, "prompt_tokens": 300,
             "completion_tokens": 50, "trace_id": f"{i:032x}", "span_id": f"{i:016x}"} for i in range(101)]
    rows.append({**rows[0], "request_id": "x", "prompt_tokens": None, "span_id": "f" * 16})
    Store(engine).write_spans(rows, [])
    engine.dispose()
    monkeypatch.setenv("CONTROLPLANE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CONTROLPLANE_DATABASE_URL", raising=False)
    result = runner.invoke(app, ["what-if", "--trace-replica", "gpu-0", "--trace-speedup", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["offered_rps"] == pytest.approx(101 / 50)  # 101 arrivals over 100 s, replayed in 50 s
    assert data["output_tokens_per_s"] == pytest.approx(50 * data["served_rps"])
    unknown = runner.invoke(app, ["what-if", "--trace-replica", "nobody"])
    assert unknown.exit_code == 2 and "unknown replica 'nobody'" in unknown.output
    empty = runner.invoke(app, ["what-if", "--trace-replica", "gpu-0", "--until-unix-s", "1600000000"])
    assert empty.exit_code == 2 and "holds no request with known token counts" in empty.output


def test_a_wide_length_tail_is_clipped_and_an_instant_trace_has_no_offered_rate() -> None:
    # lognormal with sigma 10 draws lengths past int64: clipped before the cast, never read as < 1 token
    wide = runner.invoke(app, ["what-if", "--requests", "3000", "--prompt", "lognormal:10000000:10", "--output", "8",
                               "--json"])
    assert wide.exit_code == 0, wide.output
    assert "every request needs" not in wide.output
    data = json.loads(wide.output)
    assert data["offered_rps"] > 0 and data["rejected"] > 0  # the clipped giants exceed max_model_len: rejected


def test_a_trace_at_one_instant_has_no_offered_rate_and_nothing_left_queued_on_an_idle_fleet() -> None:
    import numpy as np

    from controlplane.tuning.workload import Workload

    def trace(arrivals: list[float]) -> Workload:
        n = len(arrivals)
        return Workload(np.asarray(arrivals), np.full(n, 100, dtype=np.int64), np.full(n, 10, dtype=np.int64), "t")

    instant = what_if(WhatIfSpec(trace=trace([0.0])))
    assert instant.offered_rps is None
    idle = what_if(WhatIfSpec(trace=trace([0.0, 60.0, 120.0])))
    assert idle.queued_at_end == 0  # the last request itself is not a backlog
    with pytest.raises(ValueError, match="stretches the trace's arrivals over 694 days; at most 31"):
        WhatIfSpec(trace=trace([0.0, 60.0]), trace_speedup=1e-6).workload()


@pytest.mark.parametrize(("window", "message"), [
    (["--since-unix-s", "nan"], "--since-unix-s nan: allowed"),
    (["--until-unix-s", "inf"], "--until-unix-s inf: allowed"),
    (["--since-unix-s", "2000", "--until-unix-s", "1000"], "--since-unix-s 2000 is not before --until-unix-s 1000"),
])
def test_a_bad_trace_window_is_named_not_read_as_an_empty_trace(window: list[str], message: str) -> None:
    result = runner.invoke(app, ["what-if", "--trace-replica", "fleet", *window])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
