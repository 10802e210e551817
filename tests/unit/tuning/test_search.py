import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from controlplane.slo.spec import LatencyTarget
from controlplane.supervisor.spec import EngineConfig
from controlplane.tuning import catalog
from controlplane.tuning import search as s
from controlplane.tuning.capacity import Objective, Prediction, at_rate, judge
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost
from controlplane.tuning.search import CanaryVerdict, SearchOptions, search
from controlplane.tuning.search_space import CalibratedFactory, Cell, RooflineFactory, SearchSpace, estimate_rps
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Poisson, Uniform, synthetic

# A CPU-like replica: 4 ms per step, 30 us per token computed, 0.2 us per KV token read.
FACTORY = CalibratedFactory(StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7)), kv_capacity_tokens=40_000,
                            block_size=16, usd_per_hour=1.0)
SPACE = SearchSpace((4, 16, 64), (256, 1024, 4096))
OBJS = [Objective("ttft", (LatencyTarget("ttft", 1.0),), 0.95), Objective("tpot", (LatencyTarget("tpot", 0.02),), 0.95)]
LOAD = synthetic(Poisson(1.0), Uniform(50, 600), Uniform(10, 100), n=4000, seed=5)
FAST = SearchOptions(probe_requests=300, rel_tol=0.03)
TARGET = 80.0  # req/s: more than one replica carries


def test_the_search_reaches_the_grids_best_goodput_per_dollar_with_fewer_simulations() -> None:
    smart = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST)
    grid = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST, exhaustive=True)
    assert smart.chosen is not None and grid.chosen is not None
    best = max(c.goodput_per_usd or 0.0 for c in grid.candidates)
    assert smart.goodput_per_usd >= 0.95 * best  # type: ignore[operator]
    assert smart.simulations < grid.simulations / 2
    assert smart.usd_per_hour <= grid.usd_per_hour  # type: ignore[operator]
    assert {c.cell for c in smart.candidates} == set(SPACE.cells())  # every cell is accounted for, with a reason
    assert all(c.reason for c in smart.candidates)


def test_the_chosen_fleet_meets_every_slo_at_the_target_and_one_replica_fewer_does_not() -> None:
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST)
    assert res.chosen is not None and res.replicas is not None and res.replicas > 1
    assert all(p.holds for p in res.predictions) and {p.name for p in res.predictions} == {"ttft", "tpot"}
    model = FACTORY(res.chosen)
    wl = at_rate(LOAD, TARGET, FAST.probe_requests * (res.replicas - 1))
    fewer = judge(simulate(wl, [model] * (res.replicas - 1), sample_interval_s=None), OBJS)
    assert not all(p.holds for p in fewer)
    assert res.usd_per_hour == res.replicas * 1.0
    tokens_per_h = TARGET * float((LOAD.prompt_tokens + LOAD.output_tokens).mean()) * 3600
    assert res.usd_per_million_tokens == pytest.approx(res.usd_per_hour / tokens_per_h * 1e6)


def test_cells_vllm_would_refuse_or_that_do_not_fit_are_rejected_with_the_reason() -> None:
    space = SearchSpace((64, 512), (256,), (WeightPrecision.BF16,), (KvPrecision.BF16,))
    res = search(space, FACTORY, OBJS, LOAD, target_rps=5.0, options=FAST)
    [bad] = [c for c in res.candidates if c.cell.max_num_seqs == 512]
    assert bad.reason == s.INVALID and "max_num_batched_tokens 256 < max_num_seqs 512" in bad.detail
    roof = RooflineFactory(catalog.model("Llama-3.1-70B"), catalog.accelerator("L4"))
    with pytest.raises(ValueError, match="does not fit"):
        roof(Cell(16, 1024))
    with pytest.raises(ValueError, match="cannot predict"):
        FACTORY(Cell(16, 1024, WeightPrecision.FP8))


def test_a_cheaper_fleet_wins_over_a_faster_replica() -> None:
    # The same replica at two prices: the search picks the cheaper per request.
    def priced(cell: Cell) -> ReplicaModel:
        price = 3.0 if cell.kv_cache is KvPrecision.FP8 else 1.0
        return replace(FACTORY(Cell(cell.max_num_seqs, cell.max_num_batched_tokens)), usd_per_hour=price)

    space = SearchSpace((16,), (1024,), (WeightPrecision.BF16,), (KvPrecision.BF16, KvPrecision.FP8))
    res = search(space, priced, OBJS, LOAD, target_rps=20.0, options=FAST)
    assert res.chosen is not None and res.chosen.kv_cache is KvPrecision.BF16
    [loser] = [c for c in res.candidates if c.cell.kv_cache is KvPrecision.FP8]
    assert loser.reason in (s.CANNOT_BEAT_BEST, s.OUTRANKED, s.MODEL_BOUND)


def test_a_load_beyond_the_replica_limit_recommends_nothing_and_says_why() -> None:
    opts = SearchOptions(probe_requests=300, rel_tol=0.03, max_replicas=2)
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=200.0, options=opts)
    assert res.chosen is None and res.replicas is None
    assert any(c.reason == s.TOO_MANY_REPLICAS for c in res.candidates)


@dataclass
class FakeCanary:
    verdicts: list[bool | None]
    tried: list[tuple[Cell, float]] = field(default_factory=list)

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
        self.tried.append((cell, rps))
        v = self.verdicts[len(self.tried) - 1]
        att = None if v is None else (0.99 if v else 0.5)
        return CanaryVerdict((Prediction("ttft", 0.95, att, None if att is None else att - 0.95),))


def test_a_canary_that_fails_the_best_cell_moves_the_recommendation_to_the_next() -> None:
    canary = FakeCanary([False, True])
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST, canary=canary)
    assert len(canary.tried) == 2 and res.validated is True
    assert res.chosen == canary.tried[1][0] and res.chosen != canary.tried[0][0]
    failed = [c for c in res.candidates if c.reason == s.CANARY_FAILED]
    assert [c.cell for c in failed] == [canary.tried[0][0]]
    assert canary.tried[1][1] == pytest.approx(TARGET / res.replicas)  # type: ignore[operator]


def test_an_unknown_canary_result_is_not_a_pass_and_the_trial_budget_is_bounded() -> None:
    canary = FakeCanary([None, None, True])
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST, canary=canary)
    assert len(canary.tried) == 2  # canary_trials defaults to 2
    assert res.chosen is None and res.validated is False and "nothing recommended" in res.notes[0]
    assert [c.reason for c in res.candidates].count(s.CANARY_UNKNOWN) == 2


def test_the_evidence_is_json_and_names_the_engine_change() -> None:
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=FAST)
    ev = json.loads(json.dumps(res.evidence()))
    assert ev["replicas"] == res.replicas and ev["engine"]["max_num_seqs"] == res.chosen.max_num_seqs  # type: ignore[union-attr]
    assert {x["name"] for x in ev["slos"]} == {"ttft", "tpot"} and len(ev["candidates"]) == len(SPACE)


@pytest.mark.parametrize("weights", list(WeightPrecision))
@pytest.mark.parametrize("kv", list(KvPrecision))
def test_every_cell_maps_to_an_engine_config_the_supervisor_accepts(weights: WeightPrecision, kv: KvPrecision) -> None:
    changes = Cell(64, 2048, weights, kv, 2).engine_changes()
    cfg = EngineConfig().with_changes(changes)
    assert cfg.max_num_seqs == 64 and cfg.max_num_batched_tokens == 2048 and cfg.tensor_parallel_size == 2
    assert (cfg.quantization is None) == (weights is WeightPrecision.BF16)
    assert (cfg.kv_cache_dtype == "fp8") == (kv is KvPrecision.FP8)


def test_the_first_order_estimate_orders_cells_like_the_simulation() -> None:
    small, big = FACTORY(Cell(4, 1024)), FACTORY(Cell(64, 1024))
    assert estimate_rps(big, LOAD, OBJS) > estimate_rps(small, LOAD, OBJS) > 0
    assert estimate_rps(small, LOAD, [Objective("t", (LatencyTarget("ttft", 1e-4),), 0.9)]) == 0.0


def test_bad_search_input_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="max_num_seqs allows no value"):
        SearchSpace((), (256,))
    with pytest.raises(ValueError, match="lists a value twice"):
        SearchSpace((4, 4), (256,))
    with pytest.raises(ValueError, match="must be >= 1"):
        SearchSpace((0,), (256,))
    with pytest.raises(ValueError, match="min_replicas"):
        SearchOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="at least one latency SLO"):
        search(SPACE, FACTORY, [], LOAD)


def test_the_per_token_goal_picks_the_best_goodput_per_dollar_among_the_sized_cells() -> None:
    opts = SearchOptions(probe_requests=300, rel_tol=0.03, goal="usd_per_million_tokens")
    res = search(SPACE, FACTORY, OBJS, LOAD, target_rps=TARGET, options=opts)
    sized = [c for c in res.candidates if c.replicas is not None]
    assert res.chosen is not None and sized
    assert res.goodput_per_usd == max(c.goodput_per_usd or 0.0 for c in sized)


def test_every_cell_keeps_the_calibrated_api_path_and_its_growth_and_the_prefix_cache_setting() -> None:
    factory = replace(FACTORY, api_path_s=0.003, api_path_per_request_s=0.0007, prefix_caching=False)
    for cell in (Cell(4, 256), Cell(64, 4096)):
        model = factory(cell)
        assert (model.api_path_s, model.api_path_per_request_s, model.prefix_caching) == (0.003, 0.0007, False)
