"""The quality guard on real vLLM (CPU): `--kv-cache-dtype fp8` against the `auto` (bf16) reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.engines.vllm_server import VllmServer, VllmServerSpec, VllmStartError
from controlplane.tuning.quality import QualityBudget, compare_blocking, judge
from tests.conftest import free_port
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, RealVllm

pytestmark = pytest.mark.vllm


def test_fp8_kv_cache_is_measured_against_auto_and_judged_by_the_budget(real_vllm: RealVllm, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    # The reference is the session's server (KV dtype auto); the candidate differs only in --kv-cache-dtype.
    cores = sorted(os.sched_getaffinity(0))
    spec = VllmServerSpec(model_dir=tiny_model_dir, port=free_port(), replica_name="fp8-candidate",
                          served_name=real_vllm.model, num_gpu_blocks_override=KV_BLOCKS,
                          max_model_len=(KV_BLOCKS - 1) * BLOCK_SIZE, extra_args=("--kv-cache-dtype", "fp8"),
                          cpu_cores=(cores[-1],) if len(cores) > 1 else ())
    candidate = VllmServer(spec, tmp_path / "fp8.log")
    candidate.start()
    try:
        try:
            candidate.wait_ready(timeout_s=600)
        except VllmStartError:
            # vLLM's CPU backend implements an fp8 KV cache only with AVX-512 or AMX; on a host without them the
            # candidate cannot run at all, and there is nothing to compare. Any other start failure fails.
            unsupported = [line for line in (tmp_path / "fp8.log").read_text(errors="replace").splitlines()
                           if "FP8 KV cache on CPU requires" in line]
            if unsupported:
                pytest.skip(f"this host's CPU cannot run the fp8 candidate: {unsupported[0].split('Error: ')[-1]}")
            raise
        same = compare_blocking(real_vllm.base_url, real_vllm.base_url, real_vllm.model)
        fp8 = compare_blocking(real_vllm.base_url, spec.base_url, real_vllm.model)
    finally:
        candidate.stop()
    print(f"\nauto vs auto: agreement {same.mean_agreement:.3f}, drift {same.max_logprob_drift}"
          f"\nfp8 vs auto:  agreement {fp8.mean_agreement:.3f}, drift {fp8.max_logprob_drift}")
    # Greedy decoding of one request at a time is deterministic: the reference agrees with itself.
    assert same.mean_agreement == 1.0 and same.max_logprob_drift is not None and same.max_logprob_drift < 1e-3
    # fp8 KV changes the numbers: the guard sees it ...
    assert fp8.max_logprob_drift is None or fp8.max_logprob_drift > same.max_logprob_drift
    # ... and the verdict follows the declared budget.
    assert not judge(fp8, QualityBudget(min_greedy_agreement=1.0, max_logprob_drift=1e-3)).ok
    loose = judge(fp8, QualityBudget(min_greedy_agreement=0.0, max_logprob_drift=50.0))
    assert loose.ok == (fp8.max_logprob_drift is not None)
