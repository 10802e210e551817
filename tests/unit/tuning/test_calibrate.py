import dataclasses
from typing import Any

import numpy as np
import pytest

from controlplane.store.repo import Store
from controlplane.tuning import calibrate as cal
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost, replica_from_fit
from controlplane.tuning.simulator import SimResult, simulate
from controlplane.tuning.workload import Poisson, Uniform, synthetic
from tests.unit.tuning.recorded import store_replica_run

# A CPU-like replica: 4 ms per step, 30 us per token computed, 0.2 us per KV token read.
TRUE = Coefficients(alpha_s=4e-3, beta_s_per_token=3e-5, gamma_s_per_kv_token=2e-7)
BUDGET = 2048
BASE = 1_700_000_000.0


def run(coefs: Coefficients = TRUE, *, rate: float = 10.0, n: int = 2000, seed: int = 0,
        blocks: int = 4000) -> SimResult:
    rep = ReplicaModel(StepCost.linear(coefs), max_num_seqs=64, max_num_batched_tokens=BUDGET, block_size=16,
                       num_kv_blocks=blocks, max_model_len=1200)
    return simulate(synthetic(Poisson(rate), Uniform(50, 800), Uniform(10, 200), n=n, seed=seed), [rep])


def samples_of(res: SimResult) -> list[dict[str, Any]]:
    s = res.series[0]
    return [{"ts_unix_s": BASE + t, "num_running": int(n)} for t, n in zip(s.t_s, s.num_running, strict=True)]


def rel_errors(got: Coefficients, want: Coefficients) -> list[float]:
    return [abs(g - w) / w for g, w in zip(got.as_list(), want.as_list(), strict=True) if w]


def test_known_coefficients_are_recovered_within_5_percent_from_simulated_request_rows() -> None:
    res = run()
    obs = cal.observations(res.rows(base_unix_s=BASE), samples_of(res), max_num_batched_tokens=BUDGET)
    fit = cal.fit(obs)
    assert max(rel_errors(fit.coefficients, TRUE)) < 0.05
    assert fit.coefficients.delta_s_per_seq == 0.0
    assert obs.coverage_ratio == pytest.approx(1.0) and not fit.notes
    assert fit.r2 is not None and fit.r2 > 0.99 and fit.rel_rmse is not None and fit.rel_rmse < 0.02
    assert fit.std_errors is not None and fit.std_errors.alpha_s < 0.05 * TRUE.alpha_s


def test_a_per_sequence_term_is_recovered_within_8_percent_when_it_is_fitted() -> None:
    truth = Coefficients(4e-3, 3e-5, 2e-7, delta_s_per_seq=3e-4)
    fit = cal.fit(cal.observations(run(truth).rows(), max_num_batched_tokens=BUDGET), fit_per_seq=True)
    assert max(rel_errors(fit.coefficients, truth)) < 0.08


def test_outlier_rows_barely_move_the_robust_fit_but_wreck_plain_least_squares() -> None:
    rows = run().rows()
    rng = np.random.default_rng(1)
    for r in rows:
        if rng.random() < 0.05:  # 5% of requests report five times their real phase times
            r["prefill_s"] *= 5
            r["decode_s"] *= 5
    obs = cal.observations(rows, max_num_batched_tokens=BUDGET)
    robust = cal.fit(obs)
    assert max(rel_errors(robust.coefficients, TRUE)) < 0.05 and robust.outliers > 0
    plain = cal.fit(obs, huber_k=1e9)
    assert max(rel_errors(plain.coefficients, TRUE)) > 0.5


def test_the_solver_returns_the_non_negative_least_squares_optimum() -> None:
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 1, size=(50, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.normal(0, 0.01, 50)  # unconstrained LS wants a negative
    gram, moment = X.T @ X, X.T @ y
    theta = cal.nnls_normal(gram, moment)
    grad = gram @ theta - moment
    assert np.all(theta >= 0) and theta[1] == 0.0
    assert np.allclose(grad[theta > 0], 0.0, atol=1e-9) and np.all(grad[theta == 0] >= -1e-9)  # KKT


def test_a_prior_holds_the_fit_when_there_are_few_rows_and_yields_to_many() -> None:
    rows = run(n=6, rate=1.0).rows()
    prior = Coefficients(8e-3, 6e-5, 4e-7)  # twice the truth
    few = cal.observations(rows, max_num_batched_tokens=BUDGET)
    held = cal.fit(few, prior=prior, prior_weight=1000.0)
    assert max(rel_errors(held.coefficients, prior)) < 0.1
    many = cal.observations(run().rows(), max_num_batched_tokens=BUDGET)
    assert max(rel_errors(cal.fit(many, prior=prior, prior_weight=5.0).coefficients, TRUE)) < 0.06


def test_online_updates_follow_a_replica_that_slows_down() -> None:
    slower = Coefficients(6e-3, 4.5e-5, 3e-7)
    state = cal.update(None, cal.observations(run(seed=1).rows(), max_num_batched_tokens=BUDGET))
    assert max(rel_errors(state.fit.coefficients, TRUE)) < 0.05
    for seed in (2, 3, 4):
        window = run(slower, rate=7.0, seed=seed)  # fewer requests: about the same utilisation
        state = cal.update(state, cal.observations(window.rows(), max_num_batched_tokens=BUDGET), decay=0.2)
    assert max(rel_errors(state.fit.coefficients, slower)) < 0.05
    assert state.rows_effective < 3 * len(cal.observations(run(seed=1).rows()))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        cal.update(state, cal.observations(run(seed=1).rows()), decay=1.5)


def test_requests_missing_from_the_store_show_up_against_the_scraped_batch() -> None:
    res = run()
    rows = res.rows(base_unix_s=BASE)
    kept = [r for i, r in enumerate(rows) if i % 3]  # a third of the spans never arrived
    obs = cal.observations(kept, samples_of(res), max_num_batched_tokens=BUDGET)
    assert obs.coverage_ratio is not None and obs.coverage_ratio < 0.75
    assert any("requests are missing" in n for n in cal.fit(obs).notes)


def test_preemptions_seen_by_the_engine_counter_are_flagged() -> None:
    res = run(rate=20, blocks=150)
    assert res.preemptions.sum() > 0
    counter = [{"ts_unix_s": BASE, "preemptions_total": 10.0},
               {"ts_unix_s": BASE + 100, "preemptions_total": 10.0 + res.preemptions.sum()},
               {"ts_unix_s": BASE + 50, "preemptions_total": None}]
    fit = cal.fit(cal.observations(res.rows(base_unix_s=BASE), counter, max_num_batched_tokens=BUDGET))
    assert any(f"{res.preemptions.sum()} preemptions" in n for n in fit.notes)


def test_rows_with_an_unknown_time_are_skipped_never_read_as_zero() -> None:
    rows = run(n=200).rows()
    rows[5]["decode_s"] = None
    rows[6]["prompt_tokens"] = None
    obs = cal.observations(rows)
    assert obs.requests_skipped == 2 and obs.requests_used == 198
    with pytest.raises(ValueError, match="need at least 4 observations"):
        cal.fit(cal.observations(rows[:1]))


def test_the_fitted_replica_predicts_what_the_true_one_does() -> None:
    res = run(seed=7)
    fit = cal.fit(cal.observations(res.rows(), max_num_batched_tokens=BUDGET))
    twin = replica_from_fit(fit.step_cost, kv_capacity_tokens=4000 * 16, block_size=16, max_num_seqs=64,
                            max_num_batched_tokens=BUDGET, max_model_len=1200)
    again = simulate(res.workload, [twin])
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert np.nanpercentile(getattr(again, k), [50, 90]) == pytest.approx(
            np.nanpercentile(getattr(res, k), [50, 90]), rel=0.05), k


def test_one_replicas_rows_and_samples_are_loaded_from_the_store(store: Store) -> None:
    res = run(n=300)
    rows = res.rows(base_unix_s=BASE)
    for i, r in enumerate(rows):
        r.update(trace_id=f"{i:032x}", span_id=f"{i:016x}", replica="cpu-0" if i % 2 == 0 else "cpu-1")
    store.write_spans(rows, [])
    rid = store.register_replica("cpu-0", url=None, backend="local")
    for ts, ok, cap in ((BASE + 1, True, 40_000), (BASE + 2, False, None), (BASE + 3, True, 48_000)):
        store.write_engine_sample({"replica_id": rid, "ts_unix_s": ts, "scrape_ok": ok,
                                   "num_running": 3.0 if ok else None, "kv_capacity_tokens": cap,
                                   "kv_block_size_tokens": 16 if ok else None})
    reqs, samples = cal.load_rows(store, "cpu-0", since_unix_s=BASE, until_unix_s=BASE + 1e6)
    assert len(reqs) == 150 and {r["replica"] for r in reqs} == {"cpu-0"}
    assert [s["ts_unix_s"] for s in samples] == [BASE + 3, BASE + 1]  # the failed scrape is left out
    assert cal.kv_capacity(samples) == (48_000, 16)
    assert cal.kv_capacity([]) is None
    assert cal.observations(reqs, samples).requests_used == 150


def test_a_replica_observed_in_the_store_becomes_a_model_that_predicts_it(store: Store) -> None:
    res = run(n=1200, seed=9)
    rows = res.rows(base_unix_s=BASE)
    for i, r in enumerate(rows):
        r.update(trace_id=f"{i:032x}", span_id=f"{i:016x}", replica="cpu-0")
    store.write_spans(rows, [])
    with pytest.raises(ValueError, match="no engine sample of replica 'cpu-0' in the window knows its KV capacity"):
        cal.calibrated_replica(store, "cpu-0", max_num_seqs=64, max_num_batched_tokens=BUDGET)
    rid = store.register_replica("cpu-0", url=None, backend="local")
    store.write_engine_sample({"replica_id": rid, "ts_unix_s": BASE + 10, "scrape_ok": True, "num_running": None,
                               "kv_capacity_tokens": 4000 * 16, "kv_block_size_tokens": 16})
    model, fit = cal.calibrated_replica(store, "cpu-0", max_num_seqs=64, max_num_batched_tokens=BUDGET,
                                        max_model_len=1200)
    assert model.num_kv_blocks == 4000 and model.name == "cpu-0" and fit.rows > 2000 and model.prefix_caching
    off, _ = cal.calibrated_replica(store, "cpu-0", max_num_seqs=64, max_num_batched_tokens=BUDGET,
                                    max_model_len=1200, prefix_caching=False)
    assert not off.prefix_caching and off.step_cost == model.step_cost
    again = simulate(res.workload, [model])
    assert np.nanpercentile(again.tpot_s, 90) == pytest.approx(np.nanpercentile(res.tpot_s, 90), rel=0.05)


def _path_row(arrival: float, e2e: float, path: float) -> dict[str, Any]:
    return {"arrival_unix_s": BASE + arrival, "e2e_s": e2e, "ttft_s": path + 0.01, "queue_s": 0.0, "prefill_s": 0.01}


def test_the_api_path_is_measured_on_requests_that_found_the_replica_idle() -> None:
    # Ten lone requests with a 2 ms path, each followed by one arriving while it runs (its path holds the wait
    # for the step in progress: 5 ms). The median over all rows would be 3.5 ms.
    rows = []
    for k in range(10):
        rows += [_path_row(k, 0.5, 0.002), _path_row(k + 0.1, 0.5, 0.005)]
    assert cal.api_path_s(rows) == pytest.approx(0.002)
    assert cal.api_path_s(rows, min_idle=11) == pytest.approx(0.0035)  # too few idle arrivals: all rows


def test_the_api_path_is_unknown_without_rows_that_know_its_three_times() -> None:
    assert cal.api_path_s([]) is None
    assert cal.api_path_s([{**_path_row(0, 0.5, 0.002), "queue_s": None}]) is None


def test_a_calibrated_replica_carries_the_api_path_its_rows_show(store: Store) -> None:
    true = ReplicaModel(StepCost.linear(TRUE), max_num_seqs=64, max_num_batched_tokens=BUDGET, block_size=16,
                        num_kv_blocks=4000, max_model_len=1200, api_path_s=0.004)
    res = simulate(synthetic(Poisson(5.0), Uniform(50, 800), Uniform(10, 200), n=600, seed=4), [true])
    store_replica_run(store, res, "cpu-1", base_unix_s=BASE, kv_blocks=4000)
    model, _ = cal.calibrated_replica(store, "cpu-1", max_num_seqs=64, max_num_batched_tokens=BUDGET,
                                      max_model_len=1200)
    assert model.api_path_s == pytest.approx(0.004, rel=1e-6)
    again = simulate(res.workload, [model])
    assert np.median(again.ttft_s) == pytest.approx(np.median(res.ttft_s), rel=0.05)


@pytest.mark.parametrize("per_request", [0.0, 0.001])
def test_the_api_paths_growth_per_request_in_flight_is_recovered_from_the_rows(store: Store,
                                                                                 per_request: float) -> None:
    true = ReplicaModel(StepCost.linear(TRUE), max_num_seqs=64, max_num_batched_tokens=BUDGET, block_size=16,
                        num_kv_blocks=4000, max_model_len=1200, api_path_s=0.003, api_path_per_request_s=per_request)
    res = simulate(synthetic(Poisson(8.0), Uniform(50, 800), Uniform(10, 200), n=1500, seed=5), [true])
    store_replica_run(store, res, "cpu-1", base_unix_s=BASE, kv_blocks=4000, vllm_queue=True)
    model, _ = cal.calibrated_replica(store, "cpu-1", max_num_seqs=64, max_num_batched_tokens=BUDGET,
                                      max_model_len=1200)
    assert model.api_path_s == pytest.approx(0.003, rel=1e-6)
    assert model.api_path_per_request_s == pytest.approx(per_request, abs=1.5e-4)
    if per_request:
        again = simulate(res.workload, [model])
        assert np.percentile(again.ttft_s, 90) == pytest.approx(np.percentile(res.ttft_s, 90), rel=0.05)
        constant = simulate(res.workload, [dataclasses.replace(model, api_path_per_request_s=0.0)])
        assert np.percentile(constant.ttft_s, 90) < 0.95 * np.percentile(res.ttft_s, 90)  # what it adds matters


def test_the_growth_is_recovered_from_rows_shaped_like_vllms_spans_that_leave_the_step_wait_out_of_queue() -> None:
    # vLLM stamps a request's queue time only once the step running when it reached the engine is over, so that
    # wait shows in TTFT - queue - prefill, not in queue_s. On a roomy replica nothing else holds a request back.
    true = ReplicaModel(StepCost.linear(TRUE), max_num_seqs=64, max_num_batched_tokens=BUDGET, block_size=16,
                        num_kv_blocks=4000, max_model_len=1200, api_path_s=0.003, api_path_per_request_s=0.001)
    res = simulate(synthetic(Poisson(8.0), Uniform(50, 800), Uniform(10, 200), n=1500, seed=5), [true])
    rows = res.rows(base_unix_s=BASE)
    assert sum(r["queue_s"] > 1e-3 for r in rows) > 300  # many waited for a step: the case matters
    vllm_like = [{**r, "queue_s": 0.0} for r in rows]
    plain = dataclasses.replace(true, api_path_per_request_s=0.0)
    assert cal.api_path_per_request_s(vllm_like, plain) == pytest.approx(0.001, abs=1.5e-4)
    # Rows that lack a queue or prefill time still loaded the replica: they are replayed and counted in flight,
    # only not judged. Leaving them out of one but not the other would inflate the estimate.
    gappy = [{**r, "queue_s": None} if i % 3 == 0 else {**r, "prefill_s": None} if i % 3 == 1 else r
             for i, r in enumerate(vllm_like)]
    assert cal.api_path_per_request_s(gappy, plain) == pytest.approx(0.001, abs=1.5e-4)


def test_the_api_paths_growth_is_unknown_from_too_few_busy_arrivals() -> None:
    true = ReplicaModel(StepCost.linear(TRUE), max_num_seqs=64, max_num_batched_tokens=BUDGET, block_size=16,
                        num_kv_blocks=4000, max_model_len=1200)
    res = simulate(synthetic(Poisson(0.5), Uniform(50, 800), Uniform(10, 50), n=60, seed=1), [true])
    rows = res.rows(base_unix_s=BASE)
    assert cal.api_path_per_request_s(rows, true) is None
    assert cal.api_path_per_request_s([], true) is None
    with pytest.raises(ValueError, match="min_rows and min_idle must be >= 1"):
        cal.api_path_per_request_s(rows, true, min_rows=0)
