"""The one module that owns names: vLLM / DCGM metric names, span attributes, plane metrics.

Every other module imports names from here, so a rename in vLLM (or in our own exported series)
is a one-line change. Unit suffixes follow the project rule: _s, _ms, _bytes, _tokens, _ratio, _usd.
"""

from __future__ import annotations

from typing import Final

# --- vLLM Prometheus metrics (canonical names, newest vLLM) -------------------------------------
VLLM_PREFIX: Final = "vllm:"
VLLM_NUM_RUNNING: Final = "vllm:num_requests_running"
VLLM_NUM_WAITING: Final = "vllm:num_requests_waiting"
VLLM_KV_USAGE: Final = "vllm:kv_cache_usage_perc"  # a 0-1 fraction despite the name
VLLM_CACHE_CONFIG_INFO: Final = "vllm:cache_config_info"
VLLM_PREEMPTIONS: Final = "vllm:num_preemptions"
VLLM_PROMPT_TOKENS: Final = "vllm:prompt_tokens"
VLLM_GENERATION_TOKENS: Final = "vllm:generation_tokens"
VLLM_REQUEST_SUCCESS: Final = "vllm:request_success"
VLLM_PREFIX_CACHE_QUERIES: Final = "vllm:prefix_cache_queries"
VLLM_PREFIX_CACHE_HITS: Final = "vllm:prefix_cache_hits"
VLLM_TTFT_HIST: Final = "vllm:time_to_first_token_seconds"
VLLM_ITL_HIST: Final = "vllm:inter_token_latency_seconds"
VLLM_E2E_HIST: Final = "vllm:e2e_request_latency_seconds"

# Old name -> current name. vLLM renamed these across releases (TELEMETRY.md); a collector that
# reads only the new names would see "missing" on older fleets, which we must not read as zero.
VLLM_RENAMES: Final[dict[str, str]] = {
    "vllm:gpu_cache_usage_perc": VLLM_KV_USAGE,
    "vllm:gpu_prefix_cache_queries": VLLM_PREFIX_CACHE_QUERIES,
    "vllm:gpu_prefix_cache_hits": VLLM_PREFIX_CACHE_HITS,
    "vllm:time_per_output_token_seconds": VLLM_ITL_HIST,
}
# Ray Serve LLM re-exports engine metrics with these prefixes.
VLLM_FOREIGN_PREFIXES: Final = ("ray_vllm:", "ray_vllm_")

# --- vLLM OpenTelemetry span --------------------------------------------------------------------
SPAN_LLM_REQUEST: Final = "llm_request"
ATTR_REQUEST_ID: Final = "gen_ai.request.id"
ATTR_RESPONSE_MODEL: Final = "gen_ai.response.model"
ATTR_TTFT: Final = "gen_ai.latency.time_to_first_token"
ATTR_E2E: Final = "gen_ai.latency.e2e"
ATTR_QUEUE: Final = "gen_ai.latency.time_in_queue"
ATTR_PREFILL: Final = "gen_ai.latency.time_in_model_prefill"
ATTR_DECODE: Final = "gen_ai.latency.time_in_model_decode"
ATTR_INFERENCE: Final = "gen_ai.latency.time_in_model_inference"
ATTR_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
ATTR_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
ATTR_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
# Resource attributes that say which replica emitted a span. The plane sets the first one on
# replicas it starts; for replicas it only watches, service.instance.id / service.name are used.
RES_REPLICA: Final = "controlplane.replica"
RES_SERVICE_INSTANCE: Final = "service.instance.id"
RES_SERVICE_NAME: Final = "service.name"

# --- DCGM exporter fields -----------------------------------------------------------------------
DCGM_GPU_UTIL: Final = "DCGM_FI_DEV_GPU_UTIL"  # percent
DCGM_MEM_COPY_UTIL: Final = "DCGM_FI_DEV_MEM_COPY_UTIL"  # percent
DCGM_FB_USED: Final = "DCGM_FI_DEV_FB_USED"  # MiB
DCGM_FB_FREE: Final = "DCGM_FI_DEV_FB_FREE"  # MiB
DCGM_POWER: Final = "DCGM_FI_DEV_POWER_USAGE"  # W
DCGM_ENERGY: Final = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # mJ
DCGM_TEMP: Final = "DCGM_FI_DEV_GPU_TEMP"  # C
DCGM_SM_CLOCK: Final = "DCGM_FI_DEV_SM_CLOCK"  # MHz
DCGM_XID: Final = "DCGM_FI_DEV_XID_ERRORS"
DCGM_GR_ACTIVE: Final = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"  # ratio
DCGM_TENSOR_ACTIVE: Final = "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"  # ratio
DCGM_DRAM_ACTIVE: Final = "DCGM_FI_PROF_DRAM_ACTIVE"  # ratio

# --- The plane's own /metrics -------------------------------------------------------------------
PLANE_SPANS_RECEIVED: Final = "controlplane_otlp_spans_received"
PLANE_SPANS_REJECTED: Final = "controlplane_otlp_payloads_rejected"
PLANE_REQUESTS_STORED: Final = "controlplane_requests_stored"
PLANE_SCRAPES: Final = "controlplane_scrapes"
PLANE_SCRAPE_DURATION: Final = "controlplane_scrape_duration_seconds"

# --- Table names ----------------------------------------------------------------------------------
T_DEPLOYMENTS: Final = "deployments"
T_REPLICAS: Final = "replicas"
T_REPLICA_CONFIGS: Final = "replica_configs"
T_REQUESTS: Final = "requests"
T_ENGINE_SAMPLES: Final = "engine_samples"
T_GPU_SAMPLES: Final = "gpu_samples"
T_LIFECYCLE: Final = "lifecycle_events"
