import numpy as np
import pytest

from controlplane.store.models import Request
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, Roof, StepCost
from controlplane.tuning.simulator import SimResult, Slo, goodput, simulate
from controlplane.tuning.simulator_parts import FreeQueue
from controlplane.tuning.workload import LogNormal, OnOff, Poisson, Uniform, Workload, synthetic

ALPHA, BETA, GAMMA = 4e-3, 2e-5, 1e-7
LINEAR = StepCost.linear(Coefficients(ALPHA, BETA, GAMMA))
TWO_ROOFS = StepCost((Roof(const_s=1e-3, per_token_s=5e-5, per_seq_s=1e-4, per_attn_pair_s=1e-8),
                      Roof(const_s=6e-3, per_kv_token_s=2e-6)))


def replica(cost: StepCost = LINEAR, *, seqs: int = 32, budget: int = 512, blocks: int = 2000, bs: int = 16,
            max_len: int = 1200, full: bool = True, name: str = "r", api: float = 0.0,
            caching: bool = True, api_per_request: float = 0.0) -> ReplicaModel:
    return ReplicaModel(cost, max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=bs, num_kv_blocks=blocks,
                        max_model_len=max_len, reserve_full_sequence=full, name=name, api_path_s=api,
                        prefix_caching=caching, api_path_per_request_s=api_per_request)


def workload(times: list[float], prompt: list[int], output: list[int]) -> Workload:
    return Workload(np.array(times, dtype=float), np.array(prompt), np.array(output))


def assert_same(fast: SimResult, ref: SimResult) -> None:
    for k in ("queue_s", "ttft_s", "e2e_s", "tpot_s"):
        a, b = getattr(fast, k), getattr(ref, k)
        assert np.array_equal(np.isnan(a), np.isnan(b)), k
        assert np.allclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True), k
    assert np.array_equal(fast.preemptions, ref.preemptions)
    assert np.array_equal(fast.replica, ref.replica)
    for sf, sr in zip(fast.series, ref.series, strict=True):
        assert (sf.steps, sf.tokens, sf.preemptions) == (sr.steps, sr.tokens, sr.preemptions)
        assert np.array_equal(sf.num_running, sr.num_running) and np.array_equal(sf.num_waiting, sr.num_waiting)
        assert np.allclose(sf.kv_usage_ratio, sr.kv_usage_ratio)


CASES = {
    "roomy KV, one replica": dict(),
    "two roofs (compute and memory)": dict(cost=TWO_ROOFS),
    "tight KV forces preemption": dict(blocks=45, max_len=600),
    "tight KV without full-sequence reservation": dict(blocks=45, max_len=600, full=False),
    "tight KV without prefix caching (preemption)": dict(blocks=45, max_len=600, caching=False),
    "tight KV, small budget (preemption mid-prefill)": dict(blocks=45, max_len=600, budget=64, seqs=8),
    "block size 1": dict(bs=1, blocks=900, max_len=600),
    "small budget chunks prefills": dict(budget=64, seqs=8),
    "max_num_seqs binds": dict(seqs=4, budget=256),
    "three replicas behind the router": dict(replicas=3, blocks=60, max_len=600),
    "three replicas with an API path": dict(replicas=3, blocks=60, max_len=600, api=0.003),
    "an API path that grows with the load": dict(api=0.003, api_per_request=0.002, blocks=45, max_len=600),
    "three replicas, API paths that grow": dict(replicas=3, blocks=60, max_len=600, api=0.003,
                                                api_per_request=0.001),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "_"))
@pytest.mark.parametrize("seed", [0, 1])
def test_the_event_driven_engine_gives_the_naive_step_loops_results(case: str, seed: int) -> None:
    kwargs = dict(CASES[case])
    count = int(kwargs.pop("replicas", 1))
    reps = [replica(**kwargs, name=f"r{i}") for i in range(count)]  # type: ignore[arg-type]
    wl = synthetic(OnOff(40, 2, 3, 3), LogNormal(120, 0.8, 1, 400), Uniform(1, 150), n=400, seed=seed)
    fast, ref = simulate(wl, reps, sample_interval_s=0.5), simulate(wl, reps, sample_interval_s=0.5, reference=True)
    assert_same(fast, ref)
    assert fast.completed.all()
    if "preemption" in case or "replicas" in case:
        assert fast.preemptions.sum() > 0  # the case exercises what it names
    if "chunks" in case:
        assert (fast.prefill_s > 1.5 * ALPHA).any()


def test_a_lone_request_takes_its_prefill_step_then_one_step_per_further_token() -> None:
    res = simulate(workload([2.0], [100], [4]), [replica()])
    prefill = ALPHA + BETA * 100 + GAMMA * 100
    decode = [ALPHA + BETA + GAMMA * (100 + k) for k in (1, 2, 3)]  # reads its context + the new token
    assert res.queue_s[0] == 0.0 and res.ttft_s[0] == pytest.approx(prefill)
    assert res.e2e_s[0] == pytest.approx(prefill + sum(decode))
    assert res.tpot_s[0] == pytest.approx(sum(decode) / 3)


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_reading_what_came_before() -> None:
    res = simulate(workload([0.0], [1100], [1]), [replica(budget=512, max_len=1200)])
    chunks = [(512, 512), (512, 1024), (76, 1100)]  # (tokens computed, KV tokens read)
    assert res.ttft_s[0] == pytest.approx(sum(ALPHA + BETA * n + GAMMA * kv for n, kv in chunks))
    assert res.e2e_s[0] == res.ttft_s[0] and np.isnan(res.tpot_s[0])


def test_a_request_arriving_mid_step_waits_for_the_step_to_end() -> None:
    res = simulate(workload([0.0, 0.001], [100, 50], [3, 2]), [replica()])
    first_step = ALPHA + BETA * 100 + GAMMA * 100
    assert res.queue_s[1] == pytest.approx(first_step - 0.001)
    # Then one step holds the first request's decode and the second's prefill.
    joint = ALPHA + BETA * 51 + GAMMA * (101 + 50)
    assert res.ttft_s[1] == pytest.approx(first_step + joint - 0.001)


def test_the_api_path_delays_entry_to_the_engine_and_is_not_queue_time() -> None:
    api = 0.002
    prefill = ALPHA + BETA * 100 + GAMMA * 100
    res = simulate(workload([1.0, 1.001], [100, 50], [3, 2]), [replica(api=api)])
    assert res.ttft_s[0] == pytest.approx(api + prefill) and res.queue_s[0] == pytest.approx(0.0, abs=1e-12)
    # Both enter the engine `api` after they arrive, so the second one enters 1 ms into the first one's prefill
    # step and waits for its end in the queue, as in the mid-step test above.
    assert res.queue_s[1] == pytest.approx(prefill - 0.001)
    row = res.rows()[0]
    assert row["ttft_s"] - row["queue_s"] - row["prefill_s"] == pytest.approx(api)  # as vLLM's spans show it


def test_replica_model_refuses_a_negative_or_infinite_api_path() -> None:
    for bad in (-0.001, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="api_path_s must be a finite number >= 0"):
            replica(api=bad)
        with pytest.raises(ValueError, match="api_path_per_request_s must be a finite number >= 0"):
            replica(api_per_request=bad)


def test_the_api_path_grows_by_its_per_request_share_for_each_request_already_on_the_replica() -> None:
    api, per = 0.002, 0.001
    prefill = ALPHA + BETA * 100 + GAMMA * 100
    # Three at once: the first finds the replica empty, the second one request on it, the third two.
    res = simulate(workload([1.0, 1.0, 1.0, 5.0], [100, 100, 100, 100], [50, 50, 50, 2]),
                   [replica(api=api, api_per_request=per)])
    assert res.api_path_s is not None
    assert res.api_path_s.tolist() == pytest.approx([api, api + per, api + 2 * per, api])  # the last: all done
    assert res.ttft_s[3] == pytest.approx(api + prefill)
    const = simulate(res.workload, [replica(api=api)])
    assert (res.ttft_s[1:3] > const.ttft_s[1:3]).all()


def test_a_request_never_enters_the_engine_before_one_that_arrived_earlier() -> None:
    # Four at t=0 with one output token each: the first runs alone, the other three share the next step and finish
    # together. X arrives before that step ends (3 on the replica: path 3 ms); Y after it (only X: 1 ms), so Y's
    # own path would have it enter before X. The API server takes them in order: Y waits for X.
    per = 0.001
    t_x, t_y = 0.009, 0.0100
    res = simulate(workload([0, 0, 0, 0, t_x, t_y], [20] * 6, [1] * 6), [replica(api_per_request=per)])
    assert res.api_path_s is not None
    three = res.finished_s[1:4]
    assert three.min() == three.max() and t_x < three[0] < t_y  # the case is what it says
    assert res.api_path_s[4] == pytest.approx(3 * per)
    assert t_y + per < t_x + 3 * per
    assert t_y + res.api_path_s[5] == pytest.approx(t_x + 3 * per)


def test_one_replica_with_a_constant_path_keeps_no_finish_times(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only routing asks how many requests are in flight; with one replica and a constant path nothing does, so
    # the engine must not keep a float per finished request until the run ends.
    import controlplane.tuning.simulator as sim

    made: list[sim.FastEngine] = []

    class Recording(sim.FastEngine):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, **k)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(sim, "FastEngine", Recording)
    wl = synthetic(Poisson(50), Uniform(20, 60), Uniform(1, 8), n=500, seed=2)
    kept = simulate(wl, [replica(api=0.002)])
    assert len(made) == 1 and len(made[0].fins) == 0
    routed = simulate(wl, [replica(api=0.002), replica(api=0.002, name="s")])  # routing keeps what it needs
    assert sum(len(e.fins) for e in made[1:]) > 0
    assert kept.completed.all() and routed.completed.all()


@pytest.mark.parametrize("reference", [False, True], ids=["event-driven", "naive"])
def test_each_path_counts_exactly_the_earlier_requests_not_finished_at_its_arrival(reference: bool) -> None:
    # The engine runs ahead to each request's entry, past later arrivals; requests it finished in that gap, in one
    # step or several, still count for those arrivals.
    api, per = 0.002, 0.003
    wl = synthetic(OnOff(80, 2, 1, 1), LogNormal(60, 0.5, 1, 200), Uniform(1, 8), n=400, seed=4)
    res = simulate(wl, [replica(api=api, api_per_request=per)], reference=reference)
    assert res.api_path_s is not None
    t, fin = wl.arrival_s, res.finished_s
    entry = -np.inf
    for i in range(len(wl)):
        n = int((fin[:i] > t[i]).sum())
        entry = max(entry, t[i] + api + per * n)
        assert res.api_path_s[i] == pytest.approx(entry - t[i], abs=1e-12), i


def test_a_preempted_request_recomputes_only_what_the_prefix_cache_lost() -> None:
    wl = synthetic(Poisson(30), Uniform(100, 300), Uniform(100, 200), n=300, seed=3)
    cached = simulate(wl, [replica(blocks=60, max_len=600)])
    uncached = simulate(wl, [replica(blocks=60, max_len=600, caching=False)])
    assert cached.preemptions.sum() > 0 and uncached.preemptions.sum() > 0
    # Tokens computed beyond each request's prompt + outputs - 1 are recomputation after preemptions.
    floor = int((wl.prompt_tokens + wl.output_tokens - 1).sum())
    redo_cached = cached.series[0].tokens - floor
    redo_uncached = uncached.series[0].tokens - floor
    assert 0 <= redo_cached < 0.5 * redo_uncached
    assert redo_uncached / uncached.preemptions.sum() > 100  # without the cache each preemption redoes a prompt


def test_the_free_queue_evicts_partial_blocks_first_and_a_preempted_requests_tail_before_its_head() -> None:
    fq = FreeQueue(10)
    fq.take(10)
    fq.give(4, 3, owner=7)  # a preempted request: 3 full blocks to the tail, its partial block to the head
    assert fq.hits(7, cap=99) == 3
    fq.take(1)  # the partial block goes first
    assert fq.hits(7, cap=99) == 3
    assert fq.hits(7, cap=99, popped=2) == 1  # two more pops would evict its last two blocks
    assert fq.hits(7, cap=2) == 2
    fq.give(2, 2)  # a finished request's full blocks queue behind it
    fq.take(1)
    assert fq.hits(7, cap=99) == 2
    fq.claim(7, 2)
    assert fq.hits(7, cap=99) == 0 and not fq.owned
    fq.take(2)  # the finished request's blocks; nothing is left
    assert not fq.segs


def test_max_num_seqs_caps_the_running_batch_and_the_rest_queue_in_order() -> None:
    wl = workload([0.0] * 10, [20] * 10, [50] * 10)
    res = simulate(wl, [replica(seqs=4, budget=256)], sample_interval_s=0.05)
    assert res.series[0].num_running.max() == 4
    assert np.count_nonzero(res.queue_s == 0.0) == 4
    assert np.all(np.diff(res.scheduled_s) >= 0)  # FCFS


def test_preempted_requests_are_recomputed_and_still_finish_later_than_with_room() -> None:
    wl = synthetic(Poisson(30), Uniform(100, 300), Uniform(100, 200), n=300, seed=3)
    tight = simulate(wl, [replica(blocks=60, max_len=600)])
    roomy = simulate(wl, [replica(blocks=5000, max_len=600)])
    assert tight.completed.all() and tight.preemptions.sum() > 0 and roomy.preemptions.sum() == 0
    assert np.mean(tight.e2e_s) > np.mean(roomy.e2e_s)
    assert tight.series[0].kv_usage_ratio.max() <= 1.0


def test_least_outstanding_routing_spreads_a_burst_and_breaks_ties_by_index() -> None:
    wl = workload([0.0] * 9, [50] * 9, [20] * 9)
    res = simulate(wl, [replica(name="a"), replica(name="b"), replica(name="c")])
    assert res.replica.tolist() == [0, 1, 2] * 3
    later = simulate(workload([0.0, 0.0, 100.0], [50, 50, 50], [20, 20, 20]), [replica(name="a"), replica(name="b")])
    assert later.replica.tolist() == [0, 1, 0]  # both idle again at t=100: the lower index wins


def test_a_request_longer_than_max_model_len_is_rejected_and_counts_as_not_served() -> None:
    res = simulate(workload([0.0, 1.0], [1000, 10], [300, 10]), [replica(max_len=1200)])
    assert res.rejected.tolist() == [True, False] and res.completed.tolist() == [False, True]
    assert np.isnan(res.ttft_s[0])
    assert goodput(res, Slo(ttft_s=10.0)).good == 1


def test_mean_running_from_the_samples_obeys_littles_law() -> None:
    wl = synthetic(Poisson(20), Uniform(50, 300), Uniform(20, 120), n=6000, seed=5)
    res = simulate(wl, [replica(seqs=64, budget=1024)], sample_interval_s=0.25)
    in_engine = res.finished_s - res.scheduled_s
    assert res.series[0].num_running.mean() == pytest.approx(20 * in_engine.mean(), rel=0.05)


def test_goodput_counts_requests_that_meet_every_objective() -> None:
    wl = synthetic(Poisson(40), Uniform(50, 400), Uniform(2, 100), n=2000, seed=6)
    res = simulate(wl, [replica(seqs=64, budget=1024)])
    ttft, tpot = np.median(res.ttft_s), np.nanmedian(res.tpot_s)
    g = goodput(res, Slo(ttft_s=ttft, tpot_s=tpot))
    expected = np.sum((res.ttft_s <= ttft) & (np.isnan(res.tpot_s) | (res.tpot_s <= tpot)))
    assert g.good == expected and 0 < g.ratio < 0.75  # type: ignore[operator]
    assert g.rps == pytest.approx(expected / res.makespan_s)
    assert goodput(res, Slo()).good == 2000


def test_rows_have_the_requests_tables_columns_and_its_tpot() -> None:
    res = simulate(workload([0.0, 0.5], [100, 40], [5, 1]), [replica(name="cpu-0")])
    rows = res.rows(base_unix_s=1_700_000_000.0, model="tiny")
    columns = {c.name for c in Request.__table__.columns}
    assert set(rows[0]) - {"replica"} <= columns and rows[0]["replica"] == "cpu-0"
    assert rows[0]["arrival_unix_s"] == 1_700_000_000.0
    assert rows[0]["tpot_s"] == pytest.approx((rows[0]["e2e_s"] - rows[0]["ttft_s"]) / 4)
    assert rows[1]["tpot_s"] is None  # one output token: no inter-token time, unknown rather than 0


def test_simulate_refuses_no_replicas_and_a_bad_sample_interval() -> None:
    wl = workload([0.0], [1], [1])
    with pytest.raises(ValueError, match="at least one replica"):
        simulate(wl, [])
    with pytest.raises(ValueError, match="sample_interval_s must be > 0"):
        simulate(wl, [replica()], sample_interval_s=0)
