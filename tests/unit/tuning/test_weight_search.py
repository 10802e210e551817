"""A running deployment's search over weight quantizations: which vLLM flags it may switch, the prior that
predicts another precision from the observed one (the roofline's ratios, or nothing on a CPU), and the canary
and quality guard it needs before anything is recommended."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from controlplane.engines.vllm_server import SimulatedEngine
from controlplane.slo.model import LatencyTarget
from controlplane.store.repo import Store
from controlplane.supervisor.spec import EngineConfig, SpecError, TuningSection
from controlplane.tuning import catalog
from controlplane.tuning import config_search as cs
from controlplane.tuning.capacity import Objective, Prediction
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, EngineArgs, StepCost
from controlplane.tuning.search import CanaryVerdict
from controlplane.tuning.search_space import (
    CalibratedFactory,
    Cell,
    RooflineWeightPriors,
    WeightPrior,
    roofline_weight_prior,
)
from controlplane.tuning.workload import Poisson, Uniform, synthetic
from tests.unit.tuning.test_precision_search import (  # noqa: F401 (loop: a fixture)
    KV_BLOCKS,
    Control,
    QualityCanary,
    canary_for,
    kv_tight,
    loop,
    record_kv_tight,
    search,
)

ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512)
COST = StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7))


def test_the_spec_may_allow_online_quantizations_and_the_cell_applies_the_exact_flag() -> None:
    space = cs.space_for(ENGINE, TuningSection(quantization=("fp8_per_channel",)))
    assert space.weights == (WeightPrecision.BF16, WeightPrecision.FP8) and space.kv_cache == (KvPrecision.BF16,)
    cells = {(c.max_num_seqs, c.max_num_batched_tokens, c.weights): c for c in space.cells()}
    running, fp8 = cells[(8, 512, WeightPrecision.BF16)], cells[(8, 512, WeightPrecision.FP8)]
    assert running.engine_changes() == {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    assert not running.precision_changed and running.label() == "seqs=8 tokens=512"
    # vLLM 0.32's CPU backend has no kernel for plain "fp8"; the cell starts exactly what the spec allowed.
    assert fp8.engine_changes() == {"max_num_seqs": 8, "max_num_batched_tokens": 512,
                                    "quantization": "fp8_per_channel"}
    assert fp8.precision_changed and fp8.lower_precision and fp8.label() == "seqs=8 tokens=512 w=fp8_per_channel"
    # Running quantized, allowed back to the checkpoint's own weights: a change (canary first), not a lower one.
    back = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, quantization="fp8_per_channel"),
                        TuningSection(quantization=("none",)))
    up = next(c for c in back.cells() if c.weights is WeightPrecision.BF16)
    assert up.precision_changed and not up.lower_precision
    running_fp8 = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, quantization="fp8_per_channel")
    assert up.engine_changes()["quantization"] is None
    assert running_fp8.with_changes(up.engine_changes()).quantization is None
    # Weights and KV together: every combination, each change needing its canary.
    both = cs.space_for(ENGINE, TuningSection(quantization=("fp8_per_channel",), kv_cache_dtype=("fp8",),
                                              max_num_seqs=(8,), max_num_batched_tokens=(512,)))
    assert sorted(c.label() for c in both.cells()) == [
        "seqs=8 tokens=512", "seqs=8 tokens=512 kv=fp8", "seqs=8 tokens=512 w=fp8_per_channel",
        "seqs=8 tokens=512 w=fp8_per_channel kv=fp8"]


def test_two_quantizations_of_one_width_or_a_prequantized_checkpoint_are_refused_with_the_reason() -> None:
    with pytest.raises(cs.SearchInputError, match="fp8_per_channel and fp8 quantize to one width"):
        cs.space_for(ENGINE, TuningSection(quantization=("fp8", "fp8_per_channel")))
    running = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, quantization="fp8_per_channel")
    with pytest.raises(cs.SearchInputError, match=r"fp8 and fp8_per_channel \(the running one\)"):
        cs.space_for(running, TuningSection(quantization=("fp8",)))
    awq = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, quantization="awq")
    with pytest.raises(cs.SearchInputError, match="checkpoint quantized with awq; the search cannot change them"):
        cs.space_for(awq, TuningSection(quantization=("none",)))
    assert len(cs.space_for(awq, TuningSection()).weights) == 1  # nothing allowed: the running one stays
    # The spec refuses them when it is loaded, naming the field; a checkpoint method is not a choice at all.
    with pytest.raises(SpecError, match="tuning.quantization: fp8_per_tensor and fp8 quantize to one width"):
        kv_tight(quantization=["fp8", "fp8_per_tensor"])
    with pytest.raises(SpecError, match="tuning.quantization"):
        kv_tight(quantization=["awq"])
    with pytest.raises(ValueError, match="distinct"):
        TuningSection(quantization=("none", "none"))


def test_on_a_cpu_the_prior_claims_nothing_and_a_roofline_prior_scales_the_calibrated_replica() -> None:
    fp8 = Cell(8, 512, WeightPrecision.FP8, KvPrecision.BF16, 1, True, (WeightPrecision.BF16, KvPrecision.BF16),
               quant_arg="fp8_per_channel")
    plain = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16)
    assert plain(fp8).step_cost == COST and plain(fp8).num_kv_blocks == 100
    prior = WeightPrior(0.5, 1.5, "test")
    asked: list[tuple[WeightPrecision, int, int]] = []

    def priors(w: WeightPrecision, seqs: int, tokens: int) -> WeightPrior:
        asked.append((w, seqs, tokens))
        return prior

    scaled = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16, weight_priors=priors)
    step = (64, 4096, 8)
    assert scaled(fp8).step_cost.step_time(*step) == pytest.approx(0.5 * COST.step_time(*step))
    assert scaled(fp8).num_kv_blocks == 150
    assert set(asked) == {(WeightPrecision.FP8, 8, 512)}  # the cell's own limits, never asked for the running weights
    scaled(Cell(8, 512, WeightPrecision.BF16, KvPrecision.BF16, 1, True, (WeightPrecision.BF16, KvPrecision.BF16)))
    assert set(asked) == {(WeightPrecision.FP8, 8, 512)}
    # A fixed block count stays; the KV prior of another KV dtype composes with the weights'.
    fixed = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16, kv_capacity_scales=False,
                              weight_priors=priors)
    assert fixed(fp8).num_kv_blocks == 100
    both = Cell(8, 512, WeightPrecision.FP8, KvPrecision.FP8, 1, True, (WeightPrecision.BF16, KvPrecision.BF16))
    assert scaled(both).num_kv_blocks == 300
    # A precision the roofline says cannot run is rejected with its reason.
    no = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16,
                           weight_priors=lambda w, seqs, tokens: WeightPrior(cannot_run="does not fit"))
    with pytest.raises(ValueError, match="does not fit"):
        no(fp8)


def test_the_roofline_prior_of_fp8_weights_on_an_h100_is_faster_with_more_kv() -> None:
    args = EngineArgs(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192)
    llama, h100 = catalog.model("Llama-3.1-8B"), catalog.accelerator("H100-80GB")
    p = roofline_weight_prior(llama, h100, args, WeightPrecision.FP8)
    # Half the weight bytes read per step and twice the FLOP/s, but the KV reads of a full batch stay: the least
    # gain of the three steps is well short of 2x; 8 GB more for the KV cache out of ~53 GB.
    assert 0.5 < p.step_scale < 0.95 and 1.05 < p.kv_scale < 1.3
    assert "Llama-3.1-8B on H100-80GB: bf16 -> fp8" in p.basis
    back = roofline_weight_prior(llama, h100, EngineArgs(max_num_seqs=64, max_num_batched_tokens=2048,
                                                         max_model_len=8192, weights=WeightPrecision.FP8),
                                 WeightPrecision.BF16)
    assert back.step_scale > 1.0 and back.kv_scale < 1.0
    # 70B in bf16 does not fit one H100: switching an int4 deployment back cannot run, and the prior says why.
    seventy = catalog.model("Llama-3.1-70B")
    up = roofline_weight_prior(seventy, h100, EngineArgs(max_model_len=8192, weights=WeightPrecision.INT4),
                               WeightPrecision.BF16)
    assert up.cannot_run is not None and "does not fit" in up.cannot_run
    # Where the roofline cannot model the running configuration itself (70B in bf16 does not fit one H100), it
    # claims nothing, and blames nothing on the candidate.
    none = roofline_weight_prior(seventy, h100, EngineArgs(max_model_len=8192), WeightPrecision.FP8)
    assert (none.step_scale, none.kv_scale, none.cannot_run) == (1.0, 1.0, None)
    assert none.basis.startswith("none: the roofline of Llama-3.1-70B on H100-80GB cannot model")
    # The gain shrinks as the batch grows (the KV reads stay) and as the context grows: each cell gets its own.
    priors = RooflineWeightPriors(llama, h100, EngineArgs(max_num_seqs=64, max_num_batched_tokens=2048,
                                                          max_model_len=8192))
    small, large = priors(WeightPrecision.FP8, 16, 2048), priors(WeightPrecision.FP8, 256, 2048)
    assert small.step_scale < p.step_scale < large.step_scale < 1.0
    assert "at 16 sequences" in small.basis and "at 256 sequences" in large.basis
    longer = RooflineWeightPriors(llama, h100, priors.running, context=8192)(WeightPrecision.FP8, 16, 2048)
    assert small.step_scale < longer.step_scale


def gpu_dep(**tuning: Any) -> Any:
    """kv_tight's deployment, declared as a simulated Llama-3.1-8B on H100s so that the roofline supplies a
    weight prior (the recorded step costs stay the tiny ones: the prior scales whatever was observed)."""
    dep = kv_tight(**tuning)
    return dataclasses.replace(dep, accelerator="H100-80GB", simulated=SimulatedEngine("Llama-3.1-8B", "H100-80GB"))


def test_fp8_weights_are_recommended_only_after_their_canary_and_guard_with_the_prior_in_evidence(
        sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)
    plain = search(sqlite_store, gpu_dep(quantization=["fp8_per_channel"]))
    reasons = {c["config"]: c["reason"] for c in plain["evidence"]["candidates"]}
    assert reasons["seqs=16 tokens=512 w=fp8_per_channel"] == "needs_canary", reasons
    assert reasons["seqs=16 tokens=512"] == "chosen" and plain["rec"] is None
    prior = plain["evidence"]["calibration"]["weight_priors"]["fp8"]
    assert prior["step_scale"] < 1 and prior["kv_scale"] > 1
    assert "roofline of Llama-3.1-8B on H100-80GB: bf16 -> fp8 at 16 sequences" in prior["basis"]
    assert prior["cannot_run"] is None
    canary = QualityCanary([True])
    tried = search(sqlite_store, gpu_dep(quantization=["fp8_per_channel"], canary_trials=1), canary)
    assert [c.label() for c in canary.tried] == ["seqs=16 tokens=512 w=fp8_per_channel"]
    rec = tried["rec"]
    assert rec is not None and rec["proposed"]["engine"]["quantization"] == "fp8_per_channel"
    assert rec["current"]["engine"]["quantization"] is None and rec["evidence"]["validated"] is True
    assert rec["evidence"]["canary"]["quality"] == {"ok": True, "mean_greedy_agreement": 0.97}
    assert rec["proposed"]["replicas"] < rec["evidence"]["current"]["replicas_needed"]


def test_on_a_cpu_deployment_fp8_weights_predicted_no_better_are_not_tried_before_the_running_weights(
        sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)
    out = search(sqlite_store, kv_tight(quantization=["fp8_per_channel"]))
    prior = out["evidence"]["calibration"]["weight_priors"]["fp8"]
    assert (prior["step_scale"], prior["kv_scale"]) == (1.0, 1.0) and prior["basis"].startswith("none")
    canary = QualityCanary([True, True])
    search(sqlite_store, kv_tight(quantization=["fp8_per_channel"], canary_trials=1), canary, current=2)
    # Same predicted cost: the running weights are tried first and pass; the fp8 cell is never started.
    assert [c.weights for c in canary.tried] == [WeightPrecision.BF16]
    # Likewise running fp8 with the checkpoint's own weights allowed: the running fp8 goes first, not bf16.
    back = QualityCanary([True, True])
    search(sqlite_store, _running_fp8(), back, current=2)
    assert [c.weights for c in back.tried] == [WeightPrecision.FP8]


def _running_fp8() -> Any:
    dep = kv_tight(quantization=["none"], canary_trials=1)
    return dataclasses.replace(dep, engine=dep.engine.with_changes({"quantization": "fp8_per_channel"}))


LLAMA_8B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                   "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32,
                   "num_key_value_heads": 8, "tie_word_embeddings": False, "vocab_size": 128256}


def test_the_model_shape_comes_from_the_checkpoints_config_never_from_the_served_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    dep = dataclasses.replace(kv_tight(), model_path=str(tmp_path), served_name="Llama-3.1-70B")
    shape = cs.model_shape(dep, cs.read_hf_config(dep.model_path))
    ref = catalog.model("Llama-3.1-8B")
    assert shape is not None and shape.layer_params == ref.layer_params and shape.body_params == ref.body_params
    assert shape.head_params == ref.head_params and shape.kv_heads == 8 and shape.head_dim == 128
    # No readable config.json (a Ray node's path, say): no shape, whatever the served name says.
    assert cs.read_hf_config(str(tmp_path / "elsewhere")) is None
    monkeypatch.chdir(tmp_path)  # an external deployment names no directory: not read as the working directory
    assert cs.read_hf_config("") is None
    assert cs.model_shape(dataclasses.replace(dep, served_name="Llama-3.1-8B"), None) is None
    bad = {**LLAMA_8B_CONFIG, "num_hidden_layers": "32"}
    assert cs.model_shape(dep, bad) is None
    with pytest.raises(catalog.CatalogError, match="num_hidden_layers"):
        catalog.shape_from_hf_config(bad, "x")


def test_a_checkpoint_saved_quantized_cannot_be_switched_by_a_flag(tmp_path: Path, sqlite_store: Store) -> None:
    assert cs.checkpoint_quantization(LLAMA_8B_CONFIG) is None and cs.checkpoint_quantization(None) is None
    fp8_ckpt = {**LLAMA_8B_CONFIG, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    assert cs.checkpoint_quantization(fp8_ckpt) == "fp8"
    assert cs.checkpoint_quantization({**LLAMA_8B_CONFIG, "compression_config": {}}) == "compressed-tensors"
    # vLLM reads it from config.json with no --quantization: "none" would leave the weights in fp8.
    with pytest.raises(cs.SearchInputError, match=r"the checkpoint itself is quantized \(fp8"):
        cs.space_for(ENGINE, TuningSection(quantization=("none",)), checkpoint="fp8")
    assert len(cs.space_for(ENGINE, TuningSection(kv_cache_dtype=("fp8",)), checkpoint="fp8").kv_cache) == 2
    # The search reads it from the deployment's model directory itself, before anything is fitted or started.
    record_kv_tight(sqlite_store)
    (tmp_path / "config.json").write_text(json.dumps(fp8_ckpt))
    dep = dataclasses.replace(kv_tight(quantization=["fp8_per_channel"]), model_path=str(tmp_path))
    with pytest.raises(cs.SearchInputError, match=r"the checkpoint itself is quantized \(fp8, in its config"):
        search(sqlite_store, dep)
    # An older ModelOpt checkpoint says so in a file of its own.
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    assert cs.checkpoint_quantization(cs.read_hf_config(str(tmp_path))) == "modelopt"


def test_a_real_deployment_on_a_catalog_card_gets_its_prior_from_its_config_json(tmp_path: Path,
                                                                                 sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    dep = dataclasses.replace(kv_tight(quantization=["fp8_per_channel"]), model_path=str(tmp_path),
                              accelerator="H100-80GB")
    prior = search(sqlite_store, dep)["evidence"]["calibration"]["weight_priors"]["fp8"]
    assert prior["basis"].startswith(f"roofline of {tmp_path.name} on H100-80GB: bf16 -> fp8 at 16 sequences")
    assert prior["step_scale"] < 1 and prior["kv_scale"] > 1
    # Under pipeline parallelism the roofline would put every weight on each GPU: no prior.
    piped = dataclasses.replace(dep, engine=dep.engine.with_changes({"pipeline_parallel_size": 2}))
    assert search(sqlite_store, piped)["evidence"]["calibration"]["weight_priors"]["fp8"]["basis"].startswith("none")
    # A mixture of experts is not a dense shape: no prior either.
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_8B_CONFIG, "num_local_experts": 8}))
    assert cs.model_shape(dep, cs.read_hf_config(str(tmp_path))) is None
    # A null value is a missing one (its default), not an error.
    nulls = {**LLAMA_8B_CONFIG, "head_dim": None, "num_key_value_heads": 8}
    assert catalog.shape_from_hf_config(nulls, "x").head_dim == 128


class Refuses:
    """The quality guard refuses any fp8 KV cache; every other precision passes its trial."""

    def __init__(self) -> None:
        self.tried: list[Cell] = []

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
        self.tried.append(cell)
        if cell.kv_cache is KvPrecision.FP8:
            return CanaryVerdict((), "refused", quality={"ok": False}, refused="quality guard: agreement 0.3")
        return CanaryVerdict((Prediction("ttft", 0.95, 0.99, 0.04),), "fake",
                             quality={"ok": True} if cell.lower_precision else None)


def test_one_precision_refused_before_any_load_never_hides_another_that_would_pass(sqlite_store: Store) -> None:
    # Allowing fp8 weights and an fp8 KV cache: the combination is the best prediction, and its fp8 KV is refused;
    # fp8 weights alone were evaluated and sized in their own group, so they are tried next and recommended.
    record_kv_tight(sqlite_store)
    canary = Refuses()
    out = search(sqlite_store, gpu_dep(quantization=["fp8_per_channel"], kv_cache_dtype=["fp8"], canary_trials=1),
                 canary, current=4)
    labels = [c.label() for c in canary.tried]
    assert labels[0] == "seqs=16 tokens=512 w=fp8_per_channel kv=fp8", labels
    assert labels[1] == "seqs=16 tokens=512 w=fp8_per_channel", labels
    rec = out["rec"]
    assert rec is not None and rec["proposed"]["engine"]["quantization"] == "fp8_per_channel"
    assert "kv_cache_dtype" not in rec["proposed"]["engine"]
    alone = search(sqlite_store, gpu_dep(quantization=["fp8_per_channel"], canary_trials=1), Refuses(), current=4)
    assert alone["rec"] is not None and alone["rec"]["proposed"]["replicas"] == rec["proposed"]["replicas"]


def test_at_an_equal_cost_the_running_precision_goes_first_even_with_less_headroom() -> None:
    from controlplane.tuning.search import SearchOptions
    from controlplane.tuning.search import search as plain_search

    space = cs.space_for(EngineConfig(max_num_seqs=16, max_num_batched_tokens=512),
                         TuningSection(max_num_seqs=(16,), max_num_batched_tokens=(512,),
                                       quantization=("fp8_per_channel",)))
    # fp8 predicted 10 % faster: more capacity per replica, but the same whole number of replicas at this load.
    factory = CalibratedFactory(COST, kv_capacity_tokens=KV_BLOCKS * 16, block_size=16, max_model_len=1200,
                                weight_priors=lambda w, seqs, tokens: WeightPrior(0.9, 1.0, "test"))
    wl = synthetic(Poisson(20.0), Uniform(50, 400), Uniform(10, 100), n=600, seed=3)
    objectives = [Objective("ttft", (LatencyTarget("ttft", 0.5),), 0.95)]
    canary = QualityCanary([True, True])
    res = plain_search(space, factory, objectives, wl, target_rps=5.0,
                       options=SearchOptions(canary_trials=1, max_replicas=8), canary=canary, exhaustive=True)
    sized = {c.cell.weights: c for c in res.candidates if c.replicas is not None}
    assert sized[WeightPrecision.FP8].replicas == sized[WeightPrecision.BF16].replicas == 1
    assert (sized[WeightPrecision.FP8].capacity_rps or 0) > (sized[WeightPrecision.BF16].capacity_rps or 0)
    assert [c.weights for c in canary.tried] == [WeightPrecision.BF16] and res.chosen == canary.tried[0]


def test_a_weights_only_candidate_meets_the_quality_guard_before_any_load(
        loop: asyncio.AbstractEventLoop) -> None:  # noqa: F811 (the imported fixture)
    w8 = Cell(16, 512, WeightPrecision.FP8, KvPrecision.BF16, 1, True, (WeightPrecision.BF16, KvPrecision.BF16),
              quant_arg="fp8_per_channel")
    calls: list[tuple[str, str]] = []
    control = Control()
    refused = canary_for(loop, control, ref="http://tiny-0:1", ok=False, calls=calls).trial(w8, w8.engine_changes(),
                                                                                           5.0)
    assert calls == [("http://tiny-0:1", "http://canary:1")]
    assert refused.passed is False and refused.refused is not None and refused.refused.startswith("quality guard")
    assert control.events == ["start {'max_num_seqs': 16, 'max_num_batched_tokens': 512, "
                              "'quantization': 'fp8_per_channel'}", "stop"]


def test_other_batch_limits_move_the_memory_sized_kv_cache_and_a_cell_it_cannot_hold_is_refused() -> None:
    # Llama-3.1-8B on an L4, measured at 256 / 2048: the roofline leaves 32,672 KV tokens there, 30,256 at
    # 512 / 4096 (vLLM profiles activations at the token budget and the sampler at max_num_seqs) and 33,872 at
    # 128 / 1024. A model length of 31,456 fits the first, not the second.
    running = EngineArgs(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=31_456)
    priors = RooflineWeightPriors(catalog.model("Llama-3.1-8B"), catalog.accelerator("L4"), running)
    measured = 32_672
    factory = CalibratedFactory(COST, kv_capacity_tokens=measured, block_size=16, max_model_len=31_456,
                                weight_priors=priors, limits_kv=priors.limits_kv_scale)
    base = (WeightPrecision.BF16, KvPrecision.BF16)
    same = factory(Cell(256, 2048, *base, 1, False, base))
    assert same.num_kv_blocks * 16 == pytest.approx(measured, abs=16)
    smaller = factory(Cell(128, 1024, *base, 1, False, base))
    assert smaller.num_kv_blocks * 16 == pytest.approx(33_872, abs=32)
    with pytest.raises(ValueError, match="cannot run.*31456"):
        factory(Cell(512, 4096, *base, 1, False, base))
    # A capacity scaled below one max_model_len request is refused whatever scaled it.
    halved = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16, max_model_len=1200,
                               limits_kv=lambda seqs, tokens: 0.5)
    with pytest.raises(ValueError, match="800 tokens cannot hold one max_model_len"):
        halved(Cell(8, 512, *base, 1, False, base))
    # Without the roofline (a CPU: the cache is sized by VLLM_CPU_KVCACHE_SPACE) every cell keeps the measured one.
    plain = CalibratedFactory(COST, kv_capacity_tokens=measured, block_size=16, max_model_len=31_456)
    assert plain(Cell(512, 4096, *base, 1, False, base)).num_kv_blocks * 16 == pytest.approx(measured, abs=16)
