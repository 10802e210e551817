"""The five dashboards, as specs: vLLM fleet, SLOs and error budgets, GPU, cost, tuner decisions.

Every metric name comes from controlplane.names (vLLM's own names for the fleet; the plane's `/metrics`; DCGM), and
every threshold drawn on a panel comes from the same AlertingOptions the alert rules are rendered from, so a panel
turns red where the alert fires. `dashboards(options)` is pure; render.py writes the JSON.
"""

from __future__ import annotations

from controlplane import names
from controlplane.coverage import DEFAULT_GRACE_S, DEFAULT_MIN_SERVED, DEFAULT_WINDOW_S
from controlplane.grafana.model import DashboardSpec, Panel, Query, Row, Step, Variable
from controlplane.grafana.promql import (
    RANGE,
    by_vars,
    increase,
    max_by,
    per_step,
    quantile_of,
    rate,
    ratio,
    sum_all,
    sum_by,
    with_matchers,
)
from controlplane.slo.options import RuleOptions
from controlplane.slo.promql import Aggregate, Binary, Call, Matcher, Number, Selector

TUNER_DECISIONS_TOTAL = names.PLANE_TUNER_DECISIONS_TOTAL
TUNER_CAPACITY_RPS = names.PLANE_TUNER_CAPACITY_RPS
TUNER_OBSERVED_RPS = names.PLANE_TUNER_OBSERVED_RPS
LABEL_ACTION, LABEL_REASON = names.LABEL_ACTION, names.LABEL_REASON

DEP, REP, SLO = names.LABEL_DEPLOYMENT, names.LABEL_REPLICA, names.LABEL_SLO
FLEET = (DEP, REP)  # the fleet dashboard's variables, also the labels its queries filter on
# Bars count events per step (`per_step`: each event in one bar), with steps of at least 4 scrape intervals (5 s).
BAR_MIN_INTERVAL = "20s"
TOKENS_PER_S = "suffix: tok/s"  # Grafana's custom-unit syntax
QUANTILES = (0.5, 0.9, 0.99)
GOOD, WARN, BAD = "green", "orange", "red"
TAGS = ("controlplane", "vllm")


def _total(family: str) -> str:
    """Prometheus' name for a counter family's samples."""
    return f"{family}_total"


def _latency(title: str, histogram: str, description: str) -> Panel:
    queries = tuple(Query(quantile_of(histogram, q, FLEET, (DEP,)), f"{{{{{DEP}}}}} p{q * 100:g}") for q in QUANTILES)
    return Panel(title, "timeseries", queries, description, unit="s", width=8)


def _requests(*matchers: Matcher) -> Call:
    return rate(with_matchers(by_vars(names.VLLM_REQUEST_SUCCESS_TOTAL, *FLEET), *matchers))


def vllm_fleet(options: RuleOptions) -> DashboardSpec:
    failed = Matcher(names.LABEL_FINISHED_REASON, "|".join(names.VLLM_FAILED_FINISH_REASONS), "=~")
    tokens = tuple(
        Query(sum_by(rate(by_vars(_total(family), *FLEET)), DEP), f"{{{{{DEP}}}}} {kind}")
        for family, kind in ((names.VLLM_PROMPT_TOKENS, "prompt"), (names.VLLM_GENERATION_TOKENS, "generated")))
    traffic = Row("Traffic", (
        Panel("Requests/s", "stat", (Query(sum_all(_requests())),), "Finished requests per second.",
              unit="reqps", width=5, height=5),
        Panel("Failed share", "stat", (Query(ratio(sum_all(_requests(failed)), sum_all(_requests()))),),
              "Share of finished requests that ended in abort or error (vLLM counts them under request_success).",
              unit="percentunit", width=5, height=5, thresholds=(Step(GOOD), Step(WARN, 0.001), Step(BAD, 0.01))),
        Panel("Running", "stat", (Query(sum_all(by_vars(names.VLLM_NUM_RUNNING, *FLEET))),),
              "Requests in the engines' batches now.", width=5, height=5),
        Panel("Waiting", "stat", (Query(sum_all(by_vars(names.VLLM_NUM_WAITING, *FLEET))),),
              "Requests queued in the engines now.", width=5, height=5,
              thresholds=(Step(GOOD), Step(WARN, 1), Step(BAD, 10))),
        Panel("Simulated replicas", "stat",
              # 0 only while replicas are scraped at all: with none, "no data", not "every replica is real".
              (Query(Binary("or", Aggregate("count", by_vars(names.SIM_ENGINE_INFO, *FLEET)),
                            Binary("*", Aggregate("count", by_vars(names.VLLM_NUM_RUNNING, *FLEET)), Number(0)))),),
              f"Replicas whose engine is simulated ({names.SIM_ENGINE_INFO}): their latencies, tokens and KV usage on "
              "this dashboard come from the performance model, not from hardware. 0: every replica is real.",
              width=4, height=5, mappings=(Step(GOOD, 0, "none"),), thresholds=(Step(GOOD), Step(WARN, 1))),
        Panel("Finished requests by reason", "timeseries",
              (Query(sum_by(_requests(), DEP, names.LABEL_FINISHED_REASON),
                     f"{{{{{DEP}}}}} {{{{{names.LABEL_FINISHED_REASON}}}}}"),),
              "stop / length are normal ends; abort and error are failures.", unit="reqps", stacked=True),
        Panel("Tokens/s", "timeseries", tokens, "Prompt tokens prefilled and tokens generated per second.",
              unit=TOKENS_PER_S),
    ))
    latency = Row("Latency (vLLM histograms)", (
        _latency("Time to first token", names.VLLM_TTFT_HIST, "TTFT quantiles from vLLM's histogram."),
        _latency("Time per output token", names.VLLM_TPOT_HIST,
                 "Per-request mean time per output token (TPOT) quantiles."),
        _latency("End-to-end latency", names.VLLM_E2E_HIST, "Request latency quantiles, arrival to last token."),
        Panel("Phases (mean)", "timeseries", tuple(
            Query(ratio(sum_by(rate(by_vars(f"{hist}_sum", *FLEET)), DEP),
                        sum_by(rate(by_vars(f"{hist}_count", *FLEET)), DEP)), f"{{{{{DEP}}}}} {phase}")
            for hist, phase in ((names.VLLM_QUEUE_HIST, "queue"), (names.VLLM_PREFILL_HIST, "prefill"),
                                (names.VLLM_DECODE_HIST, "decode"))),
              "Where the time goes: waiting for a batch slot, prefill, decode; the mean per request. (A quantile "
              "would mislead here: vLLM's phase buckets start at 0.3 s, so any phase shorter than that would read "
              "as up to 0.3 s.)", unit="s"),
        Panel("Inter-token latency", "timeseries", tuple(
            Query(quantile_of(names.VLLM_ITL_HIST, q, FLEET, (DEP,)), f"{{{{{DEP}}}}} p{q * 100:g}")
            for q in (0.5, 0.99)), "Gaps between streamed tokens.", unit="s"),
    ))
    kv = options.kv_cache_usage_ratio
    engine = Row("Engine load", (
        Panel("Running and waiting", "timeseries", (
            Query(sum_by(by_vars(names.VLLM_NUM_RUNNING, *FLEET), *FLEET), f"{{{{{REP}}}}} running"),
            Query(sum_by(by_vars(names.VLLM_NUM_WAITING, *FLEET), *FLEET), f"{{{{{REP}}}}} waiting"),
        ), "Per replica: requests in the batch and requests queued."),
        Panel("KV cache usage", "timeseries",
              (Query(max_by(by_vars(names.VLLM_KV_USAGE, *FLEET), *FLEET), f"{{{{{REP}}}}}"),),
              f"Fraction of KV cache blocks in use; the alert fires above {kv:.0%}.", unit="percentunit",
              min=0, max=1, thresholds=(Step(GOOD), Step(WARN, round(kv - 0.1, 4)), Step(BAD, kv))),
        Panel("Preemptions/s", "timeseries",
              (Query(sum_by(rate(by_vars(names.VLLM_PREEMPTIONS_TOTAL, *FLEET)), *FLEET), f"{{{{{REP}}}}}"),),
              "Requests evicted from the batch for lack of KV cache (they are recomputed later).", unit="short"),
        Panel("Prefix cache hit ratio", "timeseries", (Query(ratio(
            sum_by(rate(by_vars(_total(names.VLLM_PREFIX_CACHE_HITS), *FLEET)), DEP),
            sum_by(rate(by_vars(_total(names.VLLM_PREFIX_CACHE_QUERIES), *FLEET)), DEP)), f"{{{{{DEP}}}}}"),),
              "Prompt tokens served from the prefix cache / prompt tokens looked up.", unit="percentunit",
              min=0, max=1),
    ))
    source = Selector(names.VLLM_NUM_RUNNING)
    return DashboardSpec(
        "controlplane-vllm-fleet", "vLLM fleet",
        "Traffic, latency and engine load of every vLLM replica, from vLLM's own /metrics.", TAGS,
        (Variable(DEP, DEP, source, "Deployment"),
         Variable(REP, REP, by_vars(names.VLLM_NUM_RUNNING, DEP), "Replica")),
        (traffic, latency, engine))


def slos(options: RuleOptions) -> DashboardSpec:
    sel = (DEP, SLO)
    coverage = options.span_coverage_ratio
    grace, window, min_served = DEFAULT_GRACE_S, DEFAULT_WINDOW_S, DEFAULT_MIN_SERVED
    budget_steps = (Step(BAD), Step(WARN, 0), Step(GOOD, 0.25))
    state = (Step(GOOD, 0, "inactive"), Step(WARN, 1, "pending"), Step(BAD, 2, "firing"))
    now = Row("Now", (
        Panel("Error budget left", "stat", (Query(by_vars(names.SLO_BUDGET_REMAINING, *sel), f"{{{{{SLO}}}}}"),),
              "Over each SLO's window: 100% untouched, 0 spent, below 0 overspent. No value: no traffic yet.",
              unit="percentunit", height=5, thresholds=budget_steps),
        Panel("Attainment", "stat", (Query(by_vars(names.SLO_ATTAINMENT, *sel), f"{{{{{SLO}}}}}"),),
              "Good / known events over the SLO window.", unit="percentunit", height=5),
        Panel("Burn-rate alerts", "state-timeline",
              (Query(by_vars(names.SLO_ALERT_STATE, *sel), f"{{{{{SLO}}}}} {{{{{names.LABEL_SEVERITY}}}}}"),),
              "The plane's own burn-rate alert state per SLO and severity.", width=24, height=6, mappings=state),
    ))
    history = Row("Over time", (
        Panel("Attainment vs objective", "timeseries", (
            Query(by_vars(names.SLO_ATTAINMENT, *sel), f"{{{{{SLO}}}}} attainment"),
            Query(by_vars(names.SLO_OBJECTIVE, *sel), f"{{{{{SLO}}}}} objective"),
        ), "Below its objective line an SLO is out of budget.", unit="percentunit"),
        Panel("Error budget remaining", "timeseries",
              (Query(by_vars(names.SLO_BUDGET_REMAINING, *sel), f"{{{{{SLO}}}}}"),),
              "Error budget left over the SLO window.", unit="percentunit", thresholds=budget_steps),
        Panel("Burn rate by window", "timeseries",
              (Query(by_vars(names.SLO_BURN_RATE, *sel), f"{{{{{SLO}}}}} {{{{{names.LABEL_WINDOW}}}}}"),),
              "Multiples of the rate that spends the budget exactly over the window (1 = on budget).",
              thresholds=(Step(GOOD), Step(BAD, 1))),
        Panel("Events in the window by outcome", "timeseries",
              (Query(by_vars(names.SLO_WINDOW_REQUESTS, *sel), f"{{{{{SLO}}}}} {{{{{names.LABEL_OUTCOME}}}}}"),),
              "Good, bad and unknown (SLI value missing) events counted in the SLO window.", stacked=True),
        Panel("Latency quantiles over the window", "timeseries", (Query(
            by_vars(names.SLO_LATENCY_QUANTILE, *sel),
            f"{{{{{SLO}}}}} {{{{{names.LABEL_SLI}}}}} q{{{{{names.LABEL_QUANTILE}}}}}"),),
              "From per-request rows (exact, not bucketed).", unit="s"),
        Panel("Served requests with a stored span", "timeseries",
              (Query(by_vars(names.PLANE_SPAN_COVERAGE, DEP), f"{{{{{REP}}}}}"),),
              f"Per replica, the share of the router's served inference requests ({grace:g} s to "
              f"{(grace + window) / 60:g} min ago) whose llm_request span reached the store. The SLOs are judged "
              f"on stored spans: below {coverage:.2%} for {options.span_coverage_for_s / 60:g} min the span-loss "
              f"ticket fires. No value: fewer than {min_served} requests in the window, or no router.",
              unit="percentunit", max=1, thresholds=(Step(BAD), Step(GOOD, coverage))),
    ))
    return DashboardSpec(
        "controlplane-slos", "SLOs and error budgets",
        "The plane's SLO evaluation (its /metrics): attainment, error budget, burn rates and alert state.",
        (*TAGS, "slo"),
        (Variable(DEP, DEP, Selector(names.SLO_OBJECTIVE), "Deployment"),
         Variable(SLO, SLO, by_vars(names.SLO_OBJECTIVE, DEP), "SLO")),
        (now, history))


def gpu(options: RuleOptions) -> DashboardSpec:
    sel = ("instance", "gpu")
    legend = "{{instance}} GPU {{gpu}}"

    def g(field: str) -> Selector:
        return by_vars(field, *sel)

    used, free = g(names.DCGM_FB_USED), g(names.DCGM_FB_FREE)
    utilisation = Row("Utilisation", (
        Panel("GPU utilisation", "timeseries", (Query(g(names.DCGM_GPU_UTIL), legend),),
              "Time a kernel was running (coarse: a busy GPU can still be far from its peak).", unit="percent",
              min=0, max=100),
        Panel("Engine activity", "timeseries", tuple(
            Query(g(field), f"{legend} {what}") for field, what in (
                (names.DCGM_GR_ACTIVE, "graphics engine"), (names.DCGM_TENSOR_ACTIVE, "tensor pipes"),
                (names.DCGM_DRAM_ACTIVE, "DRAM"))),
              "DCGM profiling fields (0-1); absent where profiling metrics are disabled.", unit="percentunit",
              min=0, max=1),
        Panel("Framebuffer memory used", "timeseries",
              (Query(Binary("/", used, Binary("+", used, free)), legend),),
              "Used / (used + free); vLLM reserves most of it up front for the KV cache.", unit="percentunit",
              min=0, max=1),
        Panel("Memory copy utilisation", "timeseries", (Query(g(names.DCGM_MEM_COPY_UTIL), legend),),
              "Time the memory controller was busy.", unit="percent", min=0, max=100),
    ))
    temp = options.gpu_temp_c
    health = Row("Power and health", (
        Panel("Power", "timeseries", (Query(g(names.DCGM_POWER), legend),), "Board power draw.", unit="watt",
              width=8),
        Panel("Temperature", "timeseries", (Query(g(names.DCGM_TEMP), legend),),
              f"GPU temperature; the alert fires above {temp:g} C.", unit="celsius", width=8,
              thresholds=(Step(GOOD), Step(WARN, temp - 10), Step(BAD, temp))),
        Panel("SM clock", "timeseries", (Query(g(names.DCGM_SM_CLOCK), legend),), "Streaming multiprocessor clock.",
              unit="suffix: MHz", width=8),
        Panel("Last XID error", "stat", (Query(g(names.DCGM_XID), legend),),
              "The last XID error code the driver reported (0: none); any XID raises a ticket (GpuXidError).", height=5,
              thresholds=(Step(GOOD), Step(BAD, 1)), mappings=(Step(GOOD, 0, "none"),)),
        Panel("Energy over the range", "stat", (Query(Binary(
            "/", increase(g(names.DCGM_ENERGY), RANGE), Number(3.6e9)), legend, instant=True),),
              "Energy drawn over the dashboard's time range (DCGM counts millijoules).", unit="kwatth", height=5),
    ))
    return DashboardSpec(
        "controlplane-gpu", "GPU (DCGM)", "NVIDIA GPUs through dcgm-exporter: utilisation, memory, power, health.",
        (*TAGS, "gpu"),
        (Variable("instance", "instance", Selector(names.DCGM_GPU_UTIL), "Exporter"),
         Variable("gpu", "gpu", by_vars(names.DCGM_GPU_UTIL, "instance"), "GPU")),
        (utilisation, health))


def cost(options: RuleOptions) -> DashboardSpec:
    per_hour = sum_by(by_vars(names.PLANE_COST_USD_PER_HOUR, DEP), DEP)
    budget = options.cost_budget_per_million_tokens_usd
    budget_steps = (Step(GOOD), Step(BAD, budget)) if budget is not None else ()
    described = f"; the alert fires above ${budget:g}" if budget is not None else ""
    now = Row("Now", (
        Panel("$/hour", "stat", (Query(per_hour, f"{{{{{DEP}}}}}"),),
              "Replica-hours x configured price, now.", unit="currencyUSD", width=8, height=5),
        Panel("$/day at this rate", "stat", (Query(Binary("*", per_hour, Number(24)), f"{{{{{DEP}}}}}"),),
              "The current hourly cost over a day.", unit="currencyUSD", width=8, height=5),
        Panel("$ per million tokens", "stat", (Query(by_vars(names.PLANE_COST_PER_MTOK, DEP)),),
              f"Cost per million tokens now{described}.", unit="currencyUSD", width=8, height=5,
              thresholds=budget_steps),
    ))
    history = Row("Over time", (
        Panel("$/hour by deployment", "timeseries", (Query(per_hour, f"{{{{{DEP}}}}}"),), "Hourly cost.",
              unit="currencyUSD", stacked=True),
        Panel("$ per million tokens", "timeseries", (Query(by_vars(names.PLANE_COST_PER_MTOK, DEP)),),
              f"Cost per million tokens{described}.", unit="currencyUSD", thresholds=budget_steps),
        Panel("Tokens/s", "timeseries", tuple(
            Query(sum_by(rate(by_vars(_total(family), DEP)), DEP), f"{{{{{DEP}}}}} {kind}")
            for family, kind in ((names.VLLM_PROMPT_TOKENS, "prompt"), (names.VLLM_GENERATION_TOKENS, "generated"))),
              "What the money buys: tokens per second from vLLM.", unit=TOKENS_PER_S),
        Panel("Ready replicas", "timeseries",
              (Query(sum_by(by_vars(names.PLANE_REPLICA_UP, DEP), DEP), f"{{{{{DEP}}}}}"),),
              "Replicas being paid for that serve.", stacked=True),
    ))
    return DashboardSpec(
        "controlplane-cost", "Cost", "Cost per hour and per token from the plane's /metrics.", (*TAGS, "cost"),
        (Variable(DEP, DEP, Selector(names.PLANE_COST_USD_PER_HOUR), "Deployment"),), (now, history))


def tuner(options: RuleOptions) -> DashboardSpec:
    up = by_vars(names.PLANE_REPLICA_UP, DEP, REP)
    readiness = (Step(BAD, 0, "not ready"), Step(GOOD, 1, "ready"))
    replicas = Row("Replicas", (
        Panel("Desired vs ready", "timeseries", (
            Query(by_vars(names.PLANE_DESIRED_REPLICAS, DEP), f"{{{{{DEP}}}}} desired"),
            Query(sum_by(up, DEP), f"{{{{{DEP}}}}} ready"),
        ), "What the supervisor converges to, and what serves."),
        Panel("Replica readiness", "state-timeline", (Query(up, f"{{{{{REP}}}}}"),), "Per replica.",
              mappings=readiness),
        Panel("Restarts", "timeseries", (Query(
            sum_by(per_step(by_vars(names.PLANE_REPLICA_RESTARTS_TOTAL, DEP, REP)), DEP, REP),
            f"{{{{{REP}}}}}"),),
              "Restarts after a crash or failed probes, per bar.", bars=True, min_interval=BAR_MIN_INTERVAL),
        Panel("Crash-looping", "state-timeline",
              (Query(by_vars(names.PLANE_REPLICA_CRASHLOOP, DEP, REP), f"{{{{{REP}}}}}"),),
              "1 when the supervisor gave up restarting a replica.",
              mappings=(Step(GOOD, 0, "ok"), Step(BAD, 1, "crash-looping"))),
    ))
    decisions = by_vars(TUNER_DECISIONS_TOTAL, DEP)
    capacity, observed = by_vars(TUNER_CAPACITY_RPS, DEP), by_vars(TUNER_OBSERVED_RPS, DEP)
    tuning = Row("Decisions", (
        Panel("Capacity vs load", "timeseries", (
            Query(capacity, f"{{{{{DEP}}}}} capacity"), Query(observed, f"{{{{{DEP}}}}} observed"),
        ), "Requests/s the fleet can serve within its SLOs (the tuner's model) and requests/s it serves.",
              unit="reqps"),
        Panel("Load / capacity", "timeseries", (Query(ratio(observed, capacity), f"{{{{{DEP}}}}}"),),
              "Above 100% the tuner proposes more replicas.", unit="percentunit",
              thresholds=(Step(GOOD), Step(WARN, 0.8), Step(BAD, 1))),
        Panel("Decisions by action", "timeseries", (Query(
            sum_by(per_step(decisions), DEP, LABEL_ACTION), f"{{{{{DEP}}}}} {{{{{LABEL_ACTION}}}}}"),),
              "Tuner decisions per bar, by action.", bars=True, stacked=True, min_interval=BAR_MIN_INTERVAL),
        Panel("Decisions in the range", "table", (Query(
            sum_by(increase(decisions, RANGE), DEP, LABEL_ACTION, LABEL_REASON), instant=True),),
              "Every (action, reason) the tuner decided over the dashboard's time range."),
    ))
    return DashboardSpec(
        "controlplane-tuner", "Tuner decisions", "Replica counts, readiness and the tuner's decisions and evidence.",
        (*TAGS, "tuner"),
        (Variable(DEP, DEP, Selector(names.PLANE_DESIRED_REPLICAS), "Deployment"),
         Variable(REP, REP, by_vars(names.PLANE_REPLICA_UP, DEP), "Replica")),
        (replicas, tuning))


def dashboards(options: RuleOptions) -> list[DashboardSpec]:
    """Every dashboard, in the order Grafana lists them."""
    return [vllm_fleet(options), slos(options), gpu(options), cost(options), tuner(options)]
