"""Builders of OTLP payloads for tests (and nothing else)."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from controlplane import names


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        v = AnyValue(bool_value=value)
    elif isinstance(value, int):
        v = AnyValue(int_value=value)
    elif isinstance(value, float):
        v = AnyValue(double_value=value)
    else:
        v = AnyValue(string_value=str(value))
    return KeyValue(key=key, value=v)


def llm_span(*, ttft: float = 0.05, e2e: float = 0.5, completion: int = 10, prompt: int = 20,
             start_ns: int = 1_700_000_000_000_000_000, request_id: str | None = None,
             trace_id: bytes | None = None, span_id: bytes | None = None, **extra: Any) -> Span:
    attrs: dict[str, Any] = {
        names.ATTR_REQUEST_ID: request_id or f"cmpl-{os.urandom(4).hex()}",
        names.ATTR_TTFT: ttft, names.ATTR_E2E: e2e, names.ATTR_QUEUE: 0.01,
        names.ATTR_PREFILL: ttft - 0.01, names.ATTR_DECODE: e2e - ttft, names.ATTR_INFERENCE: e2e - 0.01,
        names.ATTR_PROMPT_TOKENS: prompt, names.ATTR_COMPLETION_TOKENS: completion,
        names.ATTR_MAX_TOKENS: completion,
    }
    attrs.update(extra)
    return Span(trace_id=trace_id if trace_id is not None else os.urandom(16),
                span_id=span_id if span_id is not None else os.urandom(8),
                name=names.SPAN_LLM_REQUEST, kind=Span.SPAN_KIND_SERVER,
                start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + int(e2e * 1e9),
                attributes=[kv(k, v) for k, v in attrs.items()])


def export(spans: list[Span], replica: str = "r0") -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": [kv(names.RES_REPLICA, replica)]},
        scope_spans=[ScopeSpans(spans=spans)],
    )])
