"""The closed-loop story on a simulated GPU fleet (`controlplane demo --engine sim`): Llama-3.1-8B on H100-80GB
replicas run by the simulated engine, supervised by the real plane, in about two minutes.

The same phases as on real vLLM (`controlplane.demo_loop`): a steady load one replica serves within the TTFT SLO,
a burst it cannot serve (its queue grows, the SLO pages, the tuner adds a replica), and the recovery on two. The
rates were chosen with the simulator (`controlplane tune what-if`, the same performance model the engine runs):
with prompts of about 2,500-4,100 tokens and 16-48 output tokens, one H100 replica serves about 9-10 req/s, so

    rate (req/s)     share of TTFT <= 0.5 s    one replica (30 s)   two replicas
    5  (steady)                                 ~0.99                1.00
    12 (burst)                                  ~0.08                1.00

Long prompts, not many requests, load the simulated GPU: the load generator is Python on a small machine and
stays at or under ~12 req/s. Measured on a 2-core machine (tuner in auto mode, 5 s tuner and SLO intervals): the
tuner's scale-up was applied ~13 s into the burst, the second replica was ready ~4 s later, the page fired at
13-18 s, and 92-95% of the requests sent in the 30 s recovery met the SLO; about 75 s in all, plane start included.
The fleet may grow to two replicas: with three allowed, the first replica's backlog led the tuner to add a third.
"""

from __future__ import annotations

from typing import Any

from controlplane.demo_loop import LoopConfig

SIM_MODEL = "Llama-3.1-8B"
SIM_ACCELERATOR = "H100-80GB"
SIM_MAX_REPLICAS = 2


def sim_loop_config() -> LoopConfig:
    """The story's phases and load for the simulated fleet (fields the sim doc does not use keep their defaults:
    the price is the catalog's H100 price, and the KV cache is the H100's, not a block override)."""
    return LoopConfig(
        deployment="llama-8b-sim", ttft_threshold_s=0.5, objective=0.9,
        steady_rps=5.0, burst_rps=12.0, probe_s=0.0,  # simulated: the rates are known, no probe
        # ~70-90 s when the plane reacts; the cap leaves room for a slower host (a story that runs out of time
        # is reported as not complete).
        steady_s=20.0, burst_min_s=20.0, recovery_s=30.0, max_s=150.0,
        # ~1.65 tokens per word of the load's vocabulary: prompts of ~2,500-4,100 tokens.
        prompt_words=(1500, 2500), max_tokens=(16, 48),
        max_num_seqs=64, max_num_batched_tokens=8192,
    )


def sim_deployment_doc(cfg: LoopConfig, base_port: int) -> dict[str, Any]:
    """The Deployment spec of the simulated fleet: one replica to start, the tuner may add a second."""
    return {
        "apiVersion": "controlplane/v1", "kind": "Deployment",
        "metadata": {"name": cfg.deployment, "labels": {"engine": "simulated"}},
        "spec": {
            # No model path: the simulated engine loads nothing.
            "model": {"served_name": cfg.deployment},
            "simulated": {"model": SIM_MODEL, "speedup": 1.0},
            "engine": {"max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
                       "max_model_len": 8192},
            "replicas": {"min": 1, "max": SIM_MAX_REPLICAS, "initial": 1},
            # Price per GPU-hour: left to the catalog's assumed H100 price (written into the stored spec).
            "hardware": {"accelerator": SIM_ACCELERATOR, "count_per_replica": 1},
            "backend": {"kind": "local", "base_port": base_port},
            "lifecycle": {"ready_timeout_s": 60, "probe_interval_s": 1, "restart_backoff_initial_s": 1,
                          "drain_timeout_s": 30},
        },
    }
