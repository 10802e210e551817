"""A running deployment's search over weight quantizations: which vLLM flags it may switch, the prior that
predicts another precision from the observed one (the roofline's ratios, or nothing on a CPU), and the canary
and quality guard it needs before anything is recommended."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from controlplane.store.repo import Store
from controlplane.supervisor.spec import EngineConfig, SpecError, TuningSection
from controlplane.tuning import catalog
from controlplane.tuning import config_search as cs
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, EngineArgs, StepCost
from controlplane.tuning.search_space import CalibratedFactory, Cell, WeightPrior, roofline_weight_prior
from tests.unit.tuning.test_precision_search import QualityCanary, kv_tight, record_kv_tight, search

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
    assert up.engine_changes()["quantization"] is None and ENGINE.with_changes(up.engine_changes()).quantization is None
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
    scaled = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16,
                               weight_priors=((WeightPrecision.FP8, prior),))
    step = (64, 4096, 8)
    assert scaled(fp8).step_cost.step_time(*step) == pytest.approx(0.5 * COST.step_time(*step))
    assert scaled(fp8).num_kv_blocks == 150
    # A fixed block count stays; the KV prior of another KV dtype composes with the weights'.
    fixed = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16, kv_capacity_scales=False,
                              weight_priors=((WeightPrecision.FP8, prior),))
    assert fixed(fp8).num_kv_blocks == 100
    both = Cell(8, 512, WeightPrecision.FP8, KvPrecision.FP8, 1, True, (WeightPrecision.BF16, KvPrecision.BF16))
    assert scaled(both).num_kv_blocks == 300
    # A precision the roofline says cannot run is rejected with its reason.
    no = CalibratedFactory(COST, kv_capacity_tokens=1600, block_size=16,
                           weight_priors=((WeightPrecision.FP8, WeightPrior(cannot_run="does not fit")),))
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
    # 70B in bf16 does not fit one H100: switching an fp8 deployment back cannot run.
    with pytest.raises(catalog.CatalogError, match="does not fit"):
        roofline_weight_prior(catalog.model("Llama-3.1-70B"), h100,
                              EngineArgs(max_model_len=8192, weights=WeightPrecision.FP8), WeightPrecision.BF16)


def gpu_dep(**tuning: Any) -> Any:
    """kv_tight's deployment, declared as Llama-3.1-8B on H100s so that the roofline supplies a weight prior
    (the recorded step costs stay the tiny ones: the prior scales whatever was observed)."""
    dep = kv_tight(**tuning)
    return dataclasses.replace(dep, served_name="Llama-3.1-8B", accelerator="H100-80GB")


def test_fp8_weights_are_recommended_only_after_their_canary_and_guard_with_the_prior_in_evidence(
        sqlite_store: Store) -> None:
    record_kv_tight(sqlite_store)
    plain = search(sqlite_store, gpu_dep(quantization=["fp8_per_channel"]))
    reasons = {c["config"]: c["reason"] for c in plain["evidence"]["candidates"]}
    assert reasons["seqs=16 tokens=512 w=fp8_per_channel"] == "needs_canary", reasons
    assert reasons["seqs=16 tokens=512"] == "chosen" and plain["rec"] is None
    prior = plain["evidence"]["calibration"]["weight_priors"]["fp8"]
    assert prior["step_scale"] < 1 and prior["kv_scale"] > 1
    assert "roofline of Llama-3.1-8B on H100-80GB" in prior["basis"]
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
