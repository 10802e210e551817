"""What a simulated engine tells the plane: vLLM 0.32's /metrics series and one `llm_request` span per request.

Names, label sets and histogram buckets are vLLM's, so the collectors, alert rules and dashboards read a
simulated replica as they read a real one. Everything is labelled as simulated: the gauge
`controlplane_simulated_engine_info{model,accelerator} 1` on /metrics and `simulated="true"` on the OTLP
resource. Latency values are simulated seconds; span timestamps are wall-clock times (at --speedup S
a span lasts 1/S of its `gen_ai.latency.e2e`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane import names
from controlplane.engines.sim_engine import LiveEngine, LiveRequest, Timing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# vLLM's default buckets (vllm/v1/metrics/loggers.py, 0.32), as TELEMETRY.md lists them.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
PROTOCOLS = ("grpc", "http/protobuf")
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


class _Occupancy(Collector):
    """Gauges read from the engine at scrape time (it runs in the same event loop: no torn reads)."""

    def __init__(self, engine: LiveEngine, labels: dict[str, str]) -> None:
        self.engine = engine
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        occ = self.engine.occupancy()
        keys, values = list(self.labels), list(self.labels.values())
        for name, doc, value in (
            (names.VLLM_NUM_RUNNING, "Number of requests in model execution batches.", occ.running),
            (names.VLLM_NUM_WAITING, "Number of requests waiting to be processed.", occ.waiting),
            (names.VLLM_KV_USAGE, "KV-cache usage. 1 means 100 percent usage.", occ.kv_usage_ratio),
        ):
            g = GaugeMetricFamily(name, doc + " (simulated)", labels=keys)
            g.add_metric(values, float(value))
            yield g
        c = CounterMetricFamily(names.VLLM_PREEMPTIONS, "Cumulative number of preemption from the engine. (simulated)",
                                labels=keys)
        c.add_metric(values, float(occ.preemptions))
        yield c


class RequestSpans:
    """`llm_request` spans through the OpenTelemetry SDK's OTLP exporter, as vLLM sends them (gRPC by default,
    http/protobuf per OTEL_EXPORTER_OTLP_TRACES_PROTOCOL), batched, with the resource from
    OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME plus `resource_attributes` plus simulated=true."""

    def __init__(self, endpoint: str, *, protocol: str | None = None,
                 resource_attributes: Mapping[str, str] | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        protocol = protocol or os.environ.get(PROTOCOL_ENV, "grpc")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            exporter: SpanExporter = Grpc(endpoint=endpoint, insecure=True)
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

            url = endpoint if "://" in endpoint else f"http://{endpoint}"
            exporter = Http(endpoint=url)
        else:
            raise ValueError(f"{PROTOCOL_ENV}={protocol!r} is not supported; allowed: {', '.join(PROTOCOLS)}")
        attrs = {**(resource_attributes or {}), names.RES_SIMULATED: "true"}
        self.provider: TracerProvider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("controlplane.engines.sim_server")
        self.propagator = TraceContextTextMapPropagator()
        self.protocol = protocol

    def emit(self, req: LiveRequest, timing: Timing, start_unix_s: float, end_unix_s: float) -> None:
        from opentelemetry.trace import SpanKind

        info = req.info
        attrs: dict[str, str | int | float] = {
            names.ATTR_TTFT: timing.ttft_s, names.ATTR_E2E: timing.e2e_s, names.ATTR_QUEUE: timing.queue_s,
            names.ATTR_PROMPT_TOKENS: timing.prompt_tokens, names.ATTR_COMPLETION_TOKENS: timing.completion_tokens,
            names.ATTR_PREFILL: timing.prefill_s, names.ATTR_DECODE: timing.decode_s,
            names.ATTR_INFERENCE: timing.inference_s, names.ATTR_REQUEST_ID: info.request_id,
        }
        # vLLM sets these only when truthy.
        for key, value in ((names.ATTR_TOP_P, info.top_p), (names.ATTR_MAX_TOKENS, info.max_tokens_param),
                           (names.ATTR_TEMPERATURE, info.temperature), (names.ATTR_N, info.n)):
            if value:
                attrs[key] = value
        ctx = self.propagator.extract(dict(info.trace_headers)) if info.trace_headers else None
        span = self.tracer.start_span(names.SPAN_LLM_REQUEST, context=ctx, kind=SpanKind.SERVER,
                                      start_time=int(start_unix_s * 1e9), attributes=attrs)
        span.end(end_time=int(end_unix_s * 1e9))

    def shutdown(self) -> None:
        """Flush what is batched, then stop the exporter."""
        self.provider.force_flush()
        self.provider.shutdown()


class SimTelemetry:
    """The engine's observer: vLLM's counters and histograms, the occupancy gauges, the spans."""

    def __init__(self, *, served_name: str, model: str, accelerator: str, cache_info: Mapping[str, str],
                 spans: RequestSpans | None = None) -> None:
        self.registry = CollectorRegistry()
        self.spans = spans
        self._labels = {names.LABEL_MODEL_NAME: served_name, names.LABEL_ENGINE: "0"}
        self._engine: LiveEngine | None = None
        keys, reg = list(self._labels), self.registry
        lv = list(self._labels.values())

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc + " (simulated)", keys, buckets=buckets, registry=reg)

        self.prompt_tokens = Counter(names.VLLM_PROMPT_TOKENS, "Number of prefill tokens processed. (simulated)",
                                     keys, registry=reg).labels(*lv)
        self.generation_tokens = Counter(names.VLLM_GENERATION_TOKENS,
                                         "Number of generation tokens processed. (simulated)",
                                         keys, registry=reg).labels(*lv)
        self.success = Counter(names.VLLM_REQUEST_SUCCESS, "Count of successfully processed requests. (simulated)",
                               [*keys, names.LABEL_FINISHED_REASON], registry=reg)
        for reason in names.VLLM_FINISHED_REASONS:
            self.success.labels(*lv, reason)  # vLLM exposes every reason from the start, at 0
        self.ttft = hist(names.VLLM_TTFT_HIST, "Histogram of time to first token in seconds.", TTFT_BUCKETS).labels(*lv)
        self.itl = hist(names.VLLM_ITL_HIST, "Histogram of inter-token latency in seconds.", ITL_BUCKETS).labels(*lv)
        self.tpot = hist(names.VLLM_TPOT_HIST, "Histogram of time_per_output_token_seconds per request.",
                         ITL_BUCKETS).labels(*lv)
        self.e2e = hist(names.VLLM_E2E_HIST, "Histogram of e2e request latency in seconds.", PHASE_BUCKETS).labels(*lv)
        self.queue = hist(names.VLLM_QUEUE_HIST, "Histogram of time spent in WAITING phase for request.",
                          PHASE_BUCKETS).labels(*lv)
        self.prefill = hist(names.VLLM_PREFILL_HIST, "Histogram of time spent in PREFILL phase for request.",
                            PHASE_BUCKETS).labels(*lv)
        self.decode = hist(names.VLLM_DECODE_HIST, "Histogram of time spent in DECODE phase for request.",
                           PHASE_BUCKETS).labels(*lv)
        self.inference = hist(names.VLLM_INFERENCE_HIST, "Histogram of time spent in RUNNING phase for request.",
                              PHASE_BUCKETS).labels(*lv)
        info_labels = {**cache_info, names.LABEL_ENGINE: "0"}  # vLLM's cache_config_info has no model_name
        Gauge(names.VLLM_CACHE_CONFIG_INFO, "Information of the LLMEngine CacheConfig (simulated)",
              list(info_labels), registry=reg).labels(**info_labels).set(1)
        Gauge(names.SIM_ENGINE_INFO, "1: this engine is simulated; its latencies come from a performance model",
              [names.LABEL_MODEL, names.LABEL_ACCELERATOR], registry=reg).labels(model, accelerator).set(1)

    def watch(self, engine: LiveEngine) -> None:
        """Read occupancy from `engine` at scrape time and date spans by its clock."""
        self._engine = engine
        self.registry.register(_Occupancy(engine, self._labels))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- Observer -----------------------------------------------------------------------------------
    def tokens(self, req: LiveRequest, count: int, first: bool, itl_s: float | None, itl_count: int) -> None:
        if first:
            self.prompt_tokens.inc(req.prompt_tokens)
            # As vLLM, when the first token is out (the engine has set last_token_s to its time), not at the
            # end: a scrape during a long decode already counts the request's TTFT.
            self.ttft.observe(req.last_token_s - req.arrival_s)
        self.generation_tokens.inc(count)
        if itl_s is not None:
            for _ in range(itl_count):
                self.itl.observe(itl_s)

    def finished(self, req: LiveRequest, timing: Timing) -> None:
        lv = list(self._labels.values())
        self.success.labels(*lv, "abort" if req.aborted else req.finish_reason).inc()
        self.e2e.observe(timing.e2e_s)
        self.queue.observe(timing.queue_s)
        self.prefill.observe(timing.prefill_s)
        self.decode.observe(timing.decode_s)
        self.inference.observe(timing.inference_s)
        # vLLM observes 0 for a one-token output here; the span and the store leave it unknown.
        self.tpot.observe(timing.tpot_s or 0.0)
        if self.spans is not None and self._engine is not None:
            self.spans.emit(req, timing, self._engine.unix_at(timing.arrival_s),
                            self._engine.unix_at(timing.finished_s))

    def shutdown(self) -> None:
        if self.spans is not None:
            self.spans.shutdown()
