"""A running deployment's search over KV-cache precisions: the prior that predicts another precision from the
observed one, the canary it needs before anything is recommended, and the quality guard on that canary."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from controlplane.loadgen import ClientResult, RequestPlan
from controlplane.slo.model import LatencyTarget
from controlplane.store.repo import Store
from controlplane.supervisor.spec import EngineConfig, SpecError, TuningSection, parse_deployment
from controlplane.tuning import config_search as cs
from controlplane.tuning import quality
from controlplane.tuning.capacity import Objective, Prediction
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost
from controlplane.tuning.recommendations import Recommendations
from controlplane.tuning.search import CanaryVerdict
from controlplane.tuning.search_space import CalibratedFactory, Cell
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Poisson, Uniform, synthetic
from tests.unit.tuning.recorded import store_replica_run
from tests.unit.tuning.test_config_search import BASE, slo

KV_BLOCKS = 100  # x 16 tokens: about five of the recorded requests fit at once, under max_num_seqs 16


def test_the_spec_may_allow_other_kv_dtypes_and_only_those_cells_change_the_precision() -> None:
    space = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512),
                         TuningSection(kv_cache_dtype=("fp8",)))
    assert space.kv_cache == (KvPrecision.BF16, KvPrecision.FP8) and space.weights == (WeightPrecision.BF16,)
    cells = {(c.max_num_seqs, c.max_num_batched_tokens, c.kv_cache): c for c in space.cells()}
    running = cells[(8, 512, KvPrecision.BF16)]
    fp8 = cells[(8, 512, KvPrecision.FP8)]
    assert running.engine_changes() == {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    assert not running.precision_changed and not running.lower_precision and running.label() == "seqs=8 tokens=512"
    assert fp8.engine_changes() == {"max_num_seqs": 8, "max_num_batched_tokens": 512, "kv_cache_dtype": "fp8"}
    assert fp8.precision_changed and fp8.lower_precision and fp8.label() == "seqs=8 tokens=512 kv=fp8"
    # Running fp8 and allowed back to auto: another precision (a canary trial first), but not a lower one.
    back = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, kv_cache_dtype="fp8_e4m3"),
                        TuningSection(kv_cache_dtype=("auto", "fp8")))
    up = next(c for c in back.cells() if c.kv_cache is KvPrecision.BF16)
    assert up.precision_changed and not up.lower_precision and up.engine_changes()["kv_cache_dtype"] == "auto"
    same = [c for c in back.cells() if c.kv_cache is KvPrecision.FP8]
    assert all("kv_cache_dtype" not in c.engine_changes() for c in same)  # fp8_e4m3 is not rewritten to fp8
    with pytest.raises(ValueError, match="distinct"):
        TuningSection(kv_cache_dtype=("fp8", "fp8"))


def test_the_cell_applies_the_dtype_the_spec_allows_and_two_fp8_formats_are_refused() -> None:
    engine = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512)
    e5m2 = cs.space_for(engine, TuningSection(kv_cache_dtype=("fp8_e5m2",)))
    assert {c.engine_changes().get("kv_cache_dtype") for c in e5m2.cells()} == {None, "fp8_e5m2"}
    assert {c.label() for c in e5m2.cells() if c.precision_changed} >= {"seqs=8 tokens=512 kv=fp8_e5m2"}
    # vLLM's "fp8" is e4m3: one cell; "bfloat16" next to a running "auto" is the running precision.
    one = cs.space_for(engine, TuningSection(kv_cache_dtype=("fp8", "fp8_e4m3", "bfloat16")))
    assert len(one.cells()) == 2 * len(one.max_num_seqs) * len(one.max_num_batched_tokens)
    with pytest.raises(cs.SearchInputError, match="fp8_e5m2 and fp8 store different formats of one width"):
        cs.space_for(engine, TuningSection(kv_cache_dtype=("fp8", "fp8_e5m2")))
    running_e5m2 = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, kv_cache_dtype="fp8_e5m2")
    with pytest.raises(cs.SearchInputError, match=r"fp8_e4m3 and fp8_e5m2 \(the running one\)"):
        cs.space_for(running_e5m2, TuningSection(kv_cache_dtype=("fp8_e4m3",)))
    # The spec refuses them when it is loaded, naming the field, before anything starts.
    with pytest.raises(SpecError, match="tuning.kv_cache_dtype: fp8_e5m2 and fp8 store different formats"):
        kv_tight(kv_cache_dtype=["fp8", "fp8_e5m2"])


def test_the_prior_doubles_a_memory_sized_kv_cache_and_keeps_a_fixed_block_count() -> None:
    cost = StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7))
    factory = CalibratedFactory(cost, kv_capacity_tokens=1600, block_size=16)
    space = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512),
                         TuningSection(kv_cache_dtype=("fp8",)))
    auto, fp8 = sorted((c for c in space.cells() if (c.max_num_seqs, c.max_num_batched_tokens) == (8, 512)),
                       key=lambda c: c.kv_cache.bytes_per_element, reverse=True)
    assert factory(auto).num_kv_blocks == 100 and factory(fp8).num_kv_blocks == 200
    assert factory(fp8).step_cost == cost  # the prior claims no speed change: the canary measures it
    fixed = CalibratedFactory(cost, kv_capacity_tokens=1600, block_size=16, kv_capacity_scales=False)
    assert fixed(fp8).num_kv_blocks == 100
    # A cell that does not carry the running precision would skip the canary the prior needs: refused.
    with pytest.raises(ValueError, match="only be predicted by a prior"):
        factory(Cell(8, 512, WeightPrecision.BF16, KvPrecision.FP8, 1, True))
    # Likewise for the weights (their prior: test_weight_search.py).
    int8 = Cell(8, 512, WeightPrecision.INT8, KvPrecision.BF16, 1, True)
    with pytest.raises(ValueError, match="cannot predict"):
        factory(int8)


def kv_tight(**tuning: Any) -> Any:
    return parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"},
                 "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 1200,
                            "kv_cache_space_gib": 1},
                 "replicas": {"min": 1, "max": 8, "initial": 1},
                 "hardware": {"accelerator": "cpu", "price_per_hour_usd": 0.05},
                 "tuning": {"max_num_seqs": [16], "max_num_batched_tokens": [512], **tuning}}})


def record_kv_tight(store: Store, rate: float = 20.0, n: int = 1200) -> None:
    rep = ReplicaModel(StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7)), max_num_seqs=16, max_num_batched_tokens=512,
                       block_size=16, num_kv_blocks=KV_BLOCKS, max_model_len=1200)
    res = simulate(synthetic(Poisson(rate), Uniform(50, 400), Uniform(10, 100), n=n, seed=3), [rep])
    store_replica_run(store, res, "tiny-0", base_unix_s=BASE, kv_blocks=KV_BLOCKS)


class QualityCanary:
    """Passes or fails each trial as told, with a quality report for a lower precision (as SupervisorCanary)."""

    def __init__(self, passes: Sequence[bool]) -> None:
        self.passes = list(passes)
        self.tried: list[Cell] = []

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
        self.tried.append(cell)
        ok = self.passes[len(self.tried) - 1]
        q = {"ok": True, "mean_greedy_agreement": 0.97} if cell.lower_precision else None
        return CanaryVerdict((Prediction("ttft", 0.95, 0.99 if ok else 0.5, 0.04 if ok else -0.45),), "fake",
                             quality=q)


def search(store: Store, dep: Any, canary: Any = None, current: int = 4) -> dict[str, Any]:
    recs = Recommendations(store.engine, clock=lambda: BASE + 1000)
    out = cs.run_search(store, recs, dep, ready=["tiny-0"], current_replicas=current,
                        slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))],
                        params=cs.SearchParams(target_rps=60.0, window_s=1e6), now=BASE + 1000,
                        canary_factory=(lambda wl, objs: canary) if canary else None)
    out["rec"] = recs.get(out["recommendation_id"]) if out["recommendation_id"] else None
    return out


def test_a_kv_bound_replica_gets_fp8_recommended_only_after_its_canary_passed(sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)
    # Without a canary: fp8 would need fewer replicas (twice the KV), but a prior is not evidence.
    plain = search(sqlite_store, kv_tight(kv_cache_dtype=["fp8"]))
    reasons = {c["config"]: c["reason"] for c in plain["evidence"]["candidates"]}
    assert reasons["seqs=16 tokens=512 kv=fp8"] == "needs_canary", reasons
    # The running precision was evaluated too (bounded apart), and its 4 replicas are what runs: nothing to do.
    assert reasons["seqs=16 tokens=512"] == "chosen" and plain["rec"] is None
    # Searched again with a canary that passes: fp8 is tried first, recommended, with its trial's evidence.
    canary = QualityCanary([True])
    tried = search(sqlite_store, kv_tight(kv_cache_dtype=["fp8"], canary_trials=1), canary)
    assert [c.label() for c in canary.tried] == ["seqs=16 tokens=512 kv=fp8"]
    rec = tried["rec"]
    assert rec is not None and rec["proposed"]["engine"]["kv_cache_dtype"] == "fp8"
    assert rec["current"]["engine"]["kv_cache_dtype"] == "auto"
    assert rec["evidence"]["validated"] is True
    assert rec["evidence"]["canary"]["quality"] == {"ok": True, "mean_greedy_agreement": 0.97}
    # It serves the target with fewer replicas than the running precision needs in the same model.
    assert rec["proposed"]["replicas"] < rec["evidence"]["current"]["replicas_needed"]


def test_a_quality_refusal_is_its_own_reason_and_the_search_falls_back_to_the_running_precision(
        sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)

    class Refusing(QualityCanary):
        def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
            self.tried.append(cell)
            if cell.lower_precision:
                return CanaryVerdict((), "refused", quality={"ok": False}, refused="quality guard: agreement 0.3")
            return CanaryVerdict((Prediction("ttft", 0.95, 0.99, 0.04),), "fake")

    canary = Refusing([])
    # One load trial allowed: the refusal sent no load, so the one trial is still there for the running precision.
    out = search(sqlite_store, kv_tight(kv_cache_dtype=["fp8"], canary_trials=1), canary, current=2)
    assert [c.kv_cache for c in canary.tried] == [KvPrecision.FP8, KvPrecision.BF16]
    cands = {c["config"]: c for c in out["evidence"]["candidates"]}
    assert cands["seqs=16 tokens=512 kv=fp8"]["reason"] == "quality_refused"
    assert cands["seqs=16 tokens=512 kv=fp8"]["detail"] == "quality guard: agreement 0.3"
    # The running precision passed its trial: two more replicas of it, not fp8.
    rec = out["rec"]
    assert rec is not None and "kv_cache_dtype" not in rec["proposed"]["engine"] and rec["proposed"]["replicas"] > 2
    assert rec["evidence"]["canary"]["quality"] is None
    assert CanaryVerdict((Prediction("t", 0.9, 1.0, 0.1),), refused="x").passed is False


def test_a_precision_refused_on_one_cell_is_not_tried_again_on_another() -> None:
    from controlplane.tuning.search import SearchOptions
    from controlplane.tuning.search import search as plain_search

    space = cs.space_for(EngineConfig(max_num_seqs=16, max_num_batched_tokens=512),
                         TuningSection(max_num_seqs=(12, 16), max_num_batched_tokens=(512,), kv_cache_dtype=("fp8",)))
    factory = CalibratedFactory(StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7)), kv_capacity_tokens=KV_BLOCKS * 16,
                                block_size=16, max_model_len=1200)
    wl = synthetic(Poisson(20.0), Uniform(50, 400), Uniform(10, 100), n=600, seed=3)
    tried: list[Cell] = []

    class Refuses:
        def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
            tried.append(cell)
            if cell.lower_precision:
                return CanaryVerdict((), "refused", refused="quality guard: agreement 0.3")
            return CanaryVerdict((Prediction("ttft", 0.95, 0.99, 0.04),), "fake")

    # Exhaustive, so both fp8 cells are sized; one load trial.
    res = plain_search(space, factory, [Objective("ttft", (LatencyTarget("ttft", 0.5),), 0.95)], wl, target_rps=60.0,
                       options=SearchOptions(canary_trials=1, max_replicas=8), canary=Refuses(), exhaustive=True)
    assert [c.lower_precision for c in tried] == [True, False] and res.chosen == tried[1]
    fp8 = [c for c in res.candidates if c.cell.lower_precision]
    assert len(fp8) == 2 and {c.reason for c in fp8} == {"quality_refused"}
    assert {c.detail for c in fp8} == {"quality guard: agreement 0.3",
                                       f"not tried: this precision failed before any load on {tried[0].label()}"}


def test_an_fp8_canary_that_never_starts_leaves_the_trial_to_the_running_precision(sqlite_store: Store) -> None:
    # vLLM's CPU backend without AVX-512 or AMX cannot start an fp8 KV cache: that is the precision's failure.
    record_kv_tight(sqlite_store)
    tried: list[Cell] = []

    class NoFp8:
        def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
            tried.append(cell)
            if cell.lower_precision:
                return CanaryVerdict((), "tiny-9 never became ready", started=False)
            return CanaryVerdict((Prediction("ttft", 0.95, 0.99, 0.04),), "fake")

    out = search(sqlite_store, kv_tight(kv_cache_dtype=["fp8"], canary_trials=1), NoFp8(), current=2)
    assert [c.lower_precision for c in tried] == [True, False]
    cands = {c["config"]: c for c in out["evidence"]["candidates"]}
    assert cands["seqs=16 tokens=512 kv=fp8"]["reason"] == "canary_failed"
    assert out["rec"] is not None and "kv_cache_dtype" not in out["rec"]["proposed"]["engine"]
    assert out["validated"] is True


# --- SupervisorCanary's guard, with a fake supervisor and fake load -------------------------------------------

class Control:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def start_canary(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                           reason: str) -> tuple[str, str | None]:
        self.events.append(f"start {dict(changes)}")
        return "tiny-9", "http://canary:1"

    async def stop_canary(self, deployment: str, *, actor: str, reason: str) -> None:
        self.events.append("stop")


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)
    lp.close()


def verdict(ok: bool) -> quality.QualityVerdict:
    report = quality.summarize([quality.PromptComparison("p", 10, 3 if not ok else 10, 0.3 if not ok else 1.0,
                                                         0.02)])
    return quality.judge(report, quality.QualityBudget(0.9, 0.5))


def canary_for(loop: asyncio.AbstractEventLoop, control: Control, *, ref: str | None, ok: bool | None,
               calls: list[tuple[str, str]]) -> cs.SupervisorCanary:
    record = synthetic(Poisson(5.0), Uniform(10, 20), Uniform(5, 10), n=50, seed=1)

    def check(reference: str, candidate: str, dep: Any) -> quality.QualityVerdict:
        calls.append((reference, candidate))
        if ok is None:
            raise quality.QualityProbeError("http://tiny-0:1: HTTP 500")
        return verdict(ok)

    return cs.SupervisorCanary(control, loop, kv_tight(), record, [Objective("ttft", (LatencyTarget("ttft", 0.5),),
                                                                             0.9)],
                               requests=50, reference=lambda: ref, check=check)


FP8 = Cell(16, 512, WeightPrecision.BF16, KvPrecision.FP8, 1, True, (WeightPrecision.BF16, KvPrecision.BF16))


def test_a_lower_precision_refused_by_the_guard_gets_no_load_and_the_canary_is_stopped(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []

    async def load(url: str, model: str, plans: list[RequestPlan], **kw: Any) -> list[ClientResult]:
        sent.append(len(plans))
        return [ClientResult("t", True, 0.0, 0.05, 0.3, 11) for _ in plans]

    monkeypatch.setattr(cs, "run_load", load)
    control = Control()
    calls: list[tuple[str, str]] = []
    refused = canary_for(loop, control, ref="http://tiny-0:1", ok=False, calls=calls).trial(FP8, FP8.engine_changes(),
                                                                                           5.0)
    assert refused.passed is False and refused.refused is not None and "greedy agreement 0.300" in refused.refused
    assert "logprob drift 0.020 nats over 1 prompts against http://tiny-0:1" in refused.refused
    assert refused.quality is not None and refused.quality["mean_greedy_agreement"] == pytest.approx(0.3)
    assert calls == [("http://tiny-0:1", "http://canary:1")] and sent == []
    assert control.events == ["start {'max_num_seqs': 16, 'max_num_batched_tokens': 512, 'kv_cache_dtype': 'fp8'}",
                              "stop"]
    # Within the budget: the load trial follows, and its verdict carries the guard's report.
    passed = canary_for(loop, Control(), ref="http://tiny-0:1", ok=True, calls=calls).trial(FP8, {}, 5.0)
    assert passed.passed is True and sent == [50] and passed.quality is not None and passed.quality["ok"] is True
    # Nothing to compare with, or a reference that cannot answer: unknown, never a pass; no load either.
    for ref, ok in ((None, True), ("http://tiny-0:1", None)):
        v = canary_for(loop, Control(), ref=ref, ok=ok, calls=calls).trial(FP8, {}, 5.0)
        assert v.passed is None and v.refused is None
    assert sent == [50]
    # The running precision with other limits: no guard at all.
    calls.clear()
    limits = Cell(8, 512, WeightPrecision.BF16, KvPrecision.BF16, 1, True, (WeightPrecision.BF16, KvPrecision.BF16))
    assert canary_for(loop, Control(), ref=None, ok=False, calls=calls).trial(limits, {}, 5.0).passed is True
    assert calls == []


def test_the_guards_reference_is_a_ready_replica_on_the_running_args_never_a_canary_or_a_new_one() -> None:
    from types import SimpleNamespace

    dep = kv_tight()

    def member(url: str, state: str = "ready", candidate: bool = False, config: Any = None) -> Any:
        return SimpleNamespace(state=state, candidate=candidate, config=config or dep.engine,
                               handle=SimpleNamespace(url=url))

    other = dep.engine.with_changes({"max_num_seqs": 4})
    members = {"a": member("http://a", state="starting"), "b": member("http://b", candidate=True),
               "c": member("http://c", config=other), "d": member("http://d")}
    assert cs.reference_url(SimpleNamespace(dep=dep, members=members)) == "http://d"
    del members["d"]
    assert cs.reference_url(SimpleNamespace(dep=dep, members=members)) is None
