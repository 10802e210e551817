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
T_SLO_ALERTS: Final = "slo_alerts"
T_RECOMMENDATIONS: Final = "recommendations"

# --- SLO evaluation: rollup tables and the plane's exported SLO state -----------------------------
T_SLO_ROLLUP_STATE: Final = "slo_rollup_state"
T_SLO_TARGETS: Final = "slo_rollup_targets"
T_SLO_COUNTS: Final = "slo_rollup_counts"
T_SLO_SKETCHES: Final = "slo_rollup_sketches"
# Gauges on the plane's /metrics, one series per SLO (labels below). Dashboards and alert rules key
# on these names: rename only together with dashboards/ and alerts/.
SLO_OBJECTIVE: Final = "controlplane_slo_objective_ratio"
SLO_ATTAINMENT: Final = "controlplane_slo_attainment_ratio"  # good / (good + bad) over the SLO window
SLO_BUDGET_REMAINING: Final = "controlplane_slo_error_budget_remaining_ratio"  # 1 = untouched, < 0 = overspent
SLO_BURN_RATE: Final = "controlplane_slo_burn_rate"  # a multiple of the budget rate (dimensionless)
SLO_WINDOW_REQUESTS: Final = "controlplane_slo_window_requests"  # by outcome: good | bad | unknown
SLO_LATENCY_QUANTILE: Final = "controlplane_slo_latency_quantile_s"
SLO_ALERT_STATE: Final = "controlplane_slo_alert_state"  # 0 inactive, 1 pending, 2 firing
# Labels: LABEL_SLO, LABEL_DEPLOYMENT, LABEL_SLI, LABEL_SEVERITY (SLO rules section) and these.
LABEL_WINDOW: Final = "window"  # a burn window as Prometheus writes durations: "5m", "1h", "4m40s"
LABEL_OUTCOME: Final = "outcome"  # good | bad | unknown
LABEL_QUANTILE: Final = "quantile"
LABEL_BUDGETING: Final = "budgeting"  # occurrences | timeslices

# --- Supervisor (replica up / crash-loop / restarts are in the SLO rules section below) ---------------
PLANE_DESIRED_REPLICAS: Final = "controlplane_deployment_desired_replicas"

# --- SLO rules and alerts (controlplane/slo; rendered into alerts/) -------------------------------
# vLLM series the rules read, as Prometheus stores them (counters carry `_total`).
VLLM_TPOT_HIST: Final = "vllm:request_time_per_output_token_seconds"  # per-request mean inter-token latency
VLLM_QUEUE_HIST: Final = "vllm:request_queue_time_seconds"
VLLM_REQUEST_SUCCESS_TOTAL: Final = "vllm:request_success_total"  # every finished request, by finished_reason
VLLM_PREEMPTIONS_TOTAL: Final = "vllm:num_preemptions_total"
VLLM_GENERATION_TOKENS_TOTAL: Final = "vllm:generation_tokens_total"
VLLM_FAILED_FINISH_REASONS: Final = ("abort", "error")  # vLLM counts failures under request_success too
PROM_UP: Final = "up"  # Prometheus' own scrape health series
# Labels. `deployment` and `replica` are attached to engine series by the Prometheus scrape config (target labels);
# the plane's own metrics carry them natively.
LABEL_DEPLOYMENT: Final = "deployment"
LABEL_REPLICA: Final = "replica"
LABEL_SLO: Final = "slo"
LABEL_SLI: Final = "sli"
LABEL_SEVERITY: Final = "severity"
LABEL_SIMULATED: Final = "simulated"  # "true" on the plane's alerts about a deployment run by the simulated engine
LABEL_TARGET: Final = "target"  # which latency target of a goodput SLO a per-target series is about
LABEL_LONG_WINDOW: Final = "long_window"
LABEL_SHORT_WINDOW: Final = "short_window"
LABEL_BURN_RATE: Final = "burn_rate"
LABEL_LE: Final = "le"
LABEL_FINISHED_REASON: Final = "finished_reason"
# Plane metrics the lead exports for the operational alerts (gauges unless noted).
PLANE_REPLICA_UP: Final = "controlplane_replica_up"  # {deployment, replica}: 1 ready, 0 not
# {deployment, replica}: 1 while a new replica loads its model, within its ready timeout (not a restart after a crash)
PLANE_REPLICA_STARTING: Final = "controlplane_replica_starting"
PLANE_ROUTER_IN_FLIGHT: Final = "controlplane_router_in_flight"  # {deployment, replica}: sent, not finished
PLANE_REPLICA_CRASHLOOP: Final = "controlplane_replica_crashloop"  # {deployment, replica}: 1 when crash-looping
PLANE_REPLICA_RESTARTS: Final = "controlplane_replica_restarts"  # Counter {deployment, replica}; exposed with _total
PLANE_REPLICA_RESTARTS_TOTAL: Final = "controlplane_replica_restarts_total"
PLANE_COST_PER_MTOK: Final = "controlplane_cost_per_million_tokens_usd"  # {deployment}
PLANE_COST_USD_PER_HOUR: Final = "controlplane_cost_usd_per_hour"  # {deployment}
PLANE_SPAN_COVERAGE: Final = "controlplane_span_coverage_ratio"  # {deployment, replica}: served, span stored
# {slo, deployment}: seconds since the SLO was last evaluated (since the plane started, before the first time)
PLANE_SLO_EVALUATION_AGE: Final = "controlplane_slo_evaluation_age_seconds"
PLANE_TUNER_DECISIONS: Final = "controlplane_tuner_decisions"  # counter {deployment, action, reason}; exposed _total
PLANE_TUNER_DECISIONS_TOTAL: Final = "controlplane_tuner_decisions_total"
PLANE_TUNER_CAPACITY_RPS: Final = "controlplane_tuner_capacity_rps"  # {deployment}
PLANE_TUNER_OBSERVED_RPS: Final = "controlplane_tuner_observed_rps"  # {deployment}
LABEL_ACTION: Final = "action"
LABEL_REASON: Final = "reason"
# Recording rules; the window ("5m", "1h", ...) is appended to the name.
REC_SLO_REQUESTS_RATE: Final = "controlplane_slo:requests:rate"  # {slo, deployment} requests/s
REC_SLO_ERRORS_RATE: Final = "controlplane_slo:request_errors:rate"  # {slo, deployment} bad requests/s
REC_SLO_ERROR_RATIO: Final = "controlplane_slo:request_errors_per_request:ratio_rate"  # {slo, deployment}
REC_SLO_TARGET_REQUESTS_RATE: Final = "controlplane_slo_target:requests:rate"  # goodput, {slo, deployment, target}
REC_SLO_TARGET_ERROR_RATIO: Final = "controlplane_slo_target:request_errors_per_request:ratio_rate"
REC_SLO_BUDGET_REMAINING: Final = "controlplane_slo:error_budget_remaining:ratio"  # 1 - spent/budget, SLO window
# Alert names. Page and ticket burn alerts have distinct names so Alertmanager can inhibit one with the other.
ALERT_SLO_BURN_PAGE: Final = "VllmSloErrorBudgetBurnPage"
ALERT_SLO_BURN_TICKET: Final = "VllmSloErrorBudgetBurnTicket"
ALERT_KV_SATURATED: Final = "VllmKvCacheSaturated"
ALERT_PREEMPTIONS: Final = "VllmPreemptionsRising"
ALERT_REPLICA_DOWN: Final = "ControlplaneReplicaDown"
ALERT_DEPLOYMENT_DOWN: Final = "ControlplaneDeploymentDown"
ALERT_CRASHLOOP: Final = "ControlplaneReplicaCrashLooping"
ALERT_SCRAPE_FAILING: Final = "PrometheusScrapeFailing"
ALERT_GPU_XID: Final = "GpuXidError"
ALERT_GPU_TEMP: Final = "GpuTemperatureHigh"
ALERT_COST: Final = "VllmCostPerMillionTokensOverBudget"
ALERT_SPANS_MISSING: Final = "ControlplaneSpansMissing"
ALERT_SLO_EVALUATION_STALE: Final = "ControlplaneSloEvaluationStale"
ALERT_ENGINE_STALLED: Final = "VllmEngineStalled"
ALERT_SLO_NO_DATA: Final = "VllmSloNoData"

# --- Simulated engine (controlplane/engines/sim_*): vLLM-compatible series, labelled as simulated -----
SIM_ENGINE_INFO: Final = "controlplane_simulated_engine_info"  # {model, accelerator} 1 on a simulated engine
RES_SIMULATED: Final = "simulated"  # OTLP resource attribute, "true" on a simulated engine's spans
SIM_FINGERPRINT_PREFIX: Final = "simulated-"  # system_fingerprint of a simulated engine's responses
VLLM_PREFILL_HIST: Final = "vllm:request_prefill_time_seconds"
VLLM_DECODE_HIST: Final = "vllm:request_decode_time_seconds"
VLLM_INFERENCE_HIST: Final = "vllm:request_inference_time_seconds"
LABEL_MODEL_NAME: Final = "model_name"  # vLLM's label: the served model name
LABEL_ENGINE: Final = "engine"  # vLLM's label: the engine index within a server ("0")
LABEL_MODEL: Final = "model"
LABEL_ACCELERATOR: Final = "accelerator"
VLLM_FINISHED_REASONS: Final = ("stop", "length", "abort", "error", "repetition")  # vLLM 0.32's series
ATTR_TEMPERATURE: Final = "gen_ai.request.temperature"
ATTR_TOP_P: Final = "gen_ai.request.top_p"
ATTR_N: Final = "gen_ai.request.n"

# --- Tenants and the router's spans (cost per tenant) -------------------------------------------------
TENANT_HEADER: Final = "x-tenant"  # default request header naming the tenant; the router's `tenant_header`
ATTR_TENANT: Final = "controlplane.tenant"  # span attribute: the tenant of a request (NULL/absent = none)
T_ROUTER_SPANS: Final = "router_spans"  # one row per request the router proxied: its span
PLANE_ROUTER_TENANT_REJECTED: Final = "controlplane_router_tenant_rejected"  # counter; exposed with _total
PLANE_ROUTER_SPANS_DROPPED: Final = "controlplane_router_spans_dropped"  # counter {reason}; exposed with _total
