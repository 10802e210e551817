"""The quality guard on real vLLM (CPU), on the search's own canary path (`SupervisorCanary.trial`):
`--kv-cache-dtype fp8` against the `auto` (bf16) reference, refused before any load is sent to it; and weights
quantized as they load (`--quantization fp8_per_channel`) within a loose budget, so the trial goes on to its load."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from controlplane.engines.vllm_server import VllmServer, VllmServerSpec, VllmStartError
from controlplane.slo.model import LatencyTarget
from controlplane.supervisor.spec import parse_deployment
from controlplane.tuning import config_search as cs
from controlplane.tuning.capacity import Objective
from controlplane.tuning.quality import compare_blocking
from controlplane.tuning.search import CanaryVerdict
from controlplane.tuning.workload import Poisson, Uniform, synthetic
from tests.conftest import free_port
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, RealVllm

pytestmark = pytest.mark.vllm


class ServerControl:
    """The supervisor's canary calls, answered with a real vLLM server started with the cell's changes (the
    supervisor's own canary launch is proven by the closed-loop and Ray tests)."""

    def __init__(self, base: VllmServerSpec, log: Path) -> None:
        self.base, self.log = base, log
        self.server: VllmServer | None = None
        self.changes: dict[str, Any] = {}

    async def start_canary(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                           reason: str) -> tuple[str, str | None]:
        self.changes = dict(changes)
        extra = tuple(arg for key in ("kv_cache_dtype", "quantization") if changes.get(key) is not None
                      for arg in (f"--{key.replace('_', '-')}", str(changes[key])))
        spec = dataclasses.replace(self.base, extra_args=extra)
        self.server = VllmServer(spec, self.log)
        self.server.start()
        try:
            await asyncio.to_thread(self.server.wait_ready, 600)
        except VllmStartError:
            return "fp8-candidate", None
        return "fp8-candidate", spec.base_url

    async def stop_canary(self, deployment: str, *, actor: str, reason: str) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)


def canary_trial(real_vllm: RealVllm, tiny_model_dir: Path, log: Path, tuning: dict[str, Any],
                 quality: dict[str, float]) -> tuple[CanaryVerdict, ServerControl, list[str]]:
    """The search's canary trial of the lower-precision cell (8 sequences, 512 tokens) the `tuning` allows, on a
    real vLLM server started with that cell's changes, judged against the shared server as the reference."""
    cores = sorted(os.sched_getaffinity(0))
    base = VllmServerSpec(model_dir=tiny_model_dir, port=free_port(), replica_name="fp8-candidate",
                          served_name=real_vllm.model, num_gpu_blocks_override=KV_BLOCKS,
                          max_model_len=(KV_BLOCKS - 1) * BLOCK_SIZE, cpu_cores=(cores[-1],) if len(cores) > 1 else ())
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": str(tiny_model_dir), "served_name": real_vllm.model},
                 "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 512}, "quality": quality,
                 "tuning": {**tuning, "canary_trials": 1, "canary_requests": 20}}})
    cell = next(c for c in cs.space_for(dep.engine, dep.tuning).cells()
                if c.lower_precision and (c.max_num_seqs, c.max_num_batched_tokens) == (8, 512))
    control = ServerControl(base, log)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lines: list[str] = []
    try:
        canary = cs.SupervisorCanary(control, loop, dep, synthetic(Poisson(2.0), Uniform(8, 32), Uniform(4, 16),
                                                                   n=50, seed=1),
                                     [Objective("ttft", (LatencyTarget("ttft", 5.0),), 0.9)], requests=20,
                                     progress=lines.append, reference=lambda: real_vllm.base_url)
        verdict = canary.trial(cell, cell.engine_changes(), 2.0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    print("\n" + "\n".join(lines))
    return verdict, control, lines


def test_the_searchs_canary_measures_fp8_kv_against_auto_and_refuses_it_past_the_budget(
        real_vllm: RealVllm, tiny_model_dir: Path, tmp_path: Path) -> None:
    verdict, control, lines = canary_trial(real_vllm, tiny_model_dir, tmp_path / "fp8.log", {"kv_cache_dtype": ["fp8"]},
                                           {"min_greedy_agreement": 0.9, "max_logprob_drift": 0.5})
    if not verdict.started:
        # vLLM's CPU backend implements an fp8 KV cache only with AVX-512 or AMX; on a host without them the
        # candidate cannot run at all, and there is nothing to compare. Any other start failure fails.
        unsupported = [line for line in (tmp_path / "fp8.log").read_text(errors="replace").splitlines()
                       if "FP8 KV cache on CPU requires" in line]
        if unsupported:
            pytest.skip(f"this host's CPU cannot run the fp8 candidate: {unsupported[0].split('Error: ')[-1]}")
        pytest.fail(f"the fp8 candidate did not start: {verdict.note}")
    assert control.changes == {"max_num_seqs": 8, "max_num_batched_tokens": 512, "kv_cache_dtype": "fp8"}
    assert control.server is not None and control.server.proc is not None and control.server.proc.poll() is not None
    # Greedy decoding of one request at a time is deterministic: the reference agrees with itself ...
    same = compare_blocking(real_vllm.base_url, real_vllm.base_url, real_vllm.model)
    assert same.mean_agreement == 1.0 and same.max_logprob_drift is not None and same.max_logprob_drift < 1e-3
    # ... and fp8 KV changes the numbers: the guard measured it on the canary, and judged it by the budget.
    q = verdict.quality
    assert q is not None and q["prompts"] == 8 and q["budget"] == {"min_greedy_agreement": 0.9,
                                                                   "max_logprob_drift": 0.5}
    assert q["max_logprob_drift"] is None or q["max_logprob_drift"] > same.max_logprob_drift
    within = q["mean_greedy_agreement"] >= 0.9 and q["max_logprob_drift"] is not None \
        and q["max_logprob_drift"] <= 0.5
    assert q["ok"] is within
    # The tiny model's random weights leave nearly flat next-token distributions, where fp8's rounding flips many
    # greedy tokens (34 % kept when first measured): refused by the 0.9 budget, with the guard's reasons and
    # figures, and no load was sent to it.
    assert not within and q["mean_greedy_agreement"] < 0.9
    assert verdict.passed is False and verdict.refused is not None and verdict.refused.startswith("quality guard")
    assert f"over 8 prompts against {real_vllm.base_url}" in verdict.refused
    assert not any("requests at" in line for line in lines)


def test_weights_quantized_as_they_load_pass_a_loose_guard_and_the_canary_measures_them_under_load(
        real_vllm: RealVllm, tiny_model_dir: Path, tmp_path: Path) -> None:
    # vLLM 0.32's CPU backend runs its online per-channel FP8 weights (its plain "fp8" has no CPU kernel).
    verdict, control, lines = canary_trial(real_vllm, tiny_model_dir, tmp_path / "w8.log",
                                           {"quantization": ["fp8_per_channel"]},
                                           {"min_greedy_agreement": 0.0, "max_logprob_drift": 100.0})
    assert verdict.started, verdict.note
    assert control.changes == {"max_num_seqs": 8, "max_num_batched_tokens": 512, "quantization": "fp8_per_channel"}
    assert "'quantization': 'fp8_per_channel'" in (tmp_path / "w8.log").read_text(errors="replace")
    assert control.server is not None and control.server.proc is not None and control.server.proc.poll() is not None
    # The guard compared the quantized weights with the reference: their numbers differ (the reference agrees
    # with itself to 1e-3 nats), and the loose budget lets them through ...
    q = verdict.quality
    assert q is not None and q["ok"] is True and q["prompts"] == 8
    assert q["mean_greedy_agreement"] < 1.0 or (q["max_logprob_drift"] or 0.0) > 1e-3
    # ... so the trial sent its load and judged the client's timings against the SLO.
    assert any("20 requests at 2 req/s" in line for line in lines), lines
    assert verdict.refused is None and len(verdict.predictions) == 1
    pred = verdict.predictions[0]
    assert pred.objective == 0.9 and pred.attainment is not None and 0.0 <= pred.attainment <= 1.0
    assert verdict.passed is (pred.attainment >= 0.9)
