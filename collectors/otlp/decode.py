"""OTLP trace payloads -> request rows and lifecycle events (pure; no I/O).

`llm_request` spans (one per finished vLLM request) become request rows; any other span (vLLM's
startup spans such as "Load weights") becomes a replica lifecycle event.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from controlplane import names
from controlplane.store.models import MAX_REQUEST_S, finish_of

UNATTRIBUTED = "unattributed"


class PayloadError(ValueError):
    """The payload could not be decoded at all; the message says what was wrong."""


class RequestRow(TypedDict):
    """One `requests` row, keyed by column name; `replica` is the replica's name (resolved on write)."""

    request_id: str
    replica: str
    model: str | None
    arrival_unix_s: float
    finish_unix_s: float
    queue_s: float | None
    prefill_s: float | None
    decode_s: float | None
    inference_s: float | None
    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    max_tokens: int | None
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class EventRow:
    replica: str
    ts_unix_s: float
    kind: str
    duration_s: float | None
    attributes: dict[str, Any]
    dedupe_key: str


@dataclass
class DecodedBatch:
    requests: list[RequestRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    rejected_spans: int = 0
    errors: list[str] = field(default_factory=list)
    ignored_spans: int = 0  # valid spans that are neither requests nor lifecycle (another program's)

    @property
    def span_count(self) -> int:
        return len(self.requests) + len(self.events) + self.ignored_spans


# vLLM's startup spans ("Load weights", "Executor init", ...) are internal; a server or client span is a
# request of some other program.
_LIFECYCLE_KINDS = frozenset({Span.SpanKind.SPAN_KIND_UNSPECIFIED, Span.SpanKind.SPAN_KIND_INTERNAL})


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def replica_of(resource_attrs: Mapping[str, Any]) -> str:
    """Which replica sent the spans: the plane's own label first, then standard resource attributes."""
    for key in (names.RES_REPLICA, names.RES_SERVICE_INSTANCE):
        if resource_attrs.get(key):
            return str(resource_attrs[key]).replace("\x00", "")
    service = resource_attrs.get(names.RES_SERVICE_NAME)
    if service and not str(service).startswith("unknown_service"):
        return str(service).replace("\x00", "")
    return UNATTRIBUTED


def tpot(e2e_s: float | None, ttft_s: float | None, completion_tokens: int | None) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n - 1); unknown for n <= 1 or unless
    0 <= ttft <= e2e (inconsistent timings are unknown, not zero)."""
    if e2e_s is None or ttft_s is None or completion_tokens is None or completion_tokens <= 1:
        return None
    if not 0 <= ttft_s <= e2e_s:
        return None
    return (e2e_s - ttft_s) / (completion_tokens - 1)


MAX_ID_CHARS = 200  # the width of request_id / replica columns
MIN_START_NS = 946_684_800 * 10**9  # 2000-01-01: an earlier span start is a unit or clock error, not a request
_INT64_MAX = 2**63 - 1
# Token counts go to 32-bit INTEGER columns (PostgreSQL refuses the whole batch for one value past them).
_TOKENS_MAX = 2**31 - 1
MAX_MODEL_CHARS = 500  # the model column's width


# llm_request attribute -> (column, wanted type). Read in one pass over the span's attributes; this
# is the hot path of ingestion (a generic attributes() dict per span cost half the ingest time).
_REQUEST_ATTRS: dict[str, tuple[str, type]] = {
    names.ATTR_REQUEST_ID: ("request_id", str),
    names.ATTR_RESPONSE_MODEL: ("model", str),
    names.ATTR_QUEUE: ("queue_s", float),
    names.ATTR_PREFILL: ("prefill_s", float),
    names.ATTR_DECODE: ("decode_s", float),
    names.ATTR_INFERENCE: ("inference_s", float),
    names.ATTR_TTFT: ("ttft_s", float),
    names.ATTR_E2E: ("e2e_s", float),
    names.ATTR_PROMPT_TOKENS: ("prompt_tokens", int),
    names.ATTR_COMPLETION_TOKENS: ("completion_tokens", int),
    names.ATTR_MAX_TOKENS: ("max_tokens", int),
}
_NUMERIC = ("int_value", "double_value")
_DURATIONS = tuple(col for col, want in _REQUEST_ATTRS.values() if want is float)


def _typed(v: AnyValue, want: type) -> Any:
    """The value as `want`, or None when absent, of another kind, non-finite or out of range (the
    slow path: the fast read was zero / empty / suspicious)."""
    kind = v.WhichOneof("value")
    if want is str:
        return v.string_value.replace("\x00", "") if kind == "string_value" else None
    if kind not in _NUMERIC:
        return None
    x = getattr(v, kind)
    if not math.isfinite(x) or abs(x) > _INT64_MAX:
        return None
    if want is int and not 0 <= x <= _TOKENS_MAX:  # a count: a 32-bit column, never negative
        return None
    return want(x)


def _request_row(span: Span, replica: str, trace_id: str, span_id: str) -> RequestRow:
    row: dict[str, Any] = {
        "request_id": None, "replica": replica, "model": None,
        "arrival_unix_s": span.start_time_unix_nano / 1e9, "finish_unix_s": None,
        "queue_s": None, "prefill_s": None, "decode_s": None, "inference_s": None, "ttft_s": None,
        "e2e_s": None, "tpot_s": None, "prompt_tokens": None, "completion_tokens": None, "max_tokens": None,
        "trace_id": trace_id, "span_id": span_id,
    }
    get = _REQUEST_ATTRS.get
    for kv in span.attributes:
        spec = get(kv.key)
        if spec is None:
            continue
        col, want = spec
        v = kv.value
        # Read the field vLLM uses for this attribute first; only a zero / empty reading needs the
        # oneof check. This loop is the hot path of ingestion.
        x: Any = v.double_value if want is float else v.int_value if want is int else v.string_value
        # NaN is truthy and NUL bytes are legal in protobuf strings: both go the careful way.
        row[col] = x if x and ((want is int and 0 < x <= _TOKENS_MAX) or (want is float and math.isfinite(x)) or
                               (want is str and "\x00" not in x)) else _typed(v, want)
    for col in _DURATIONS:
        # vLLM derives these as differences of engine timestamps (0 while unset): a negative or absurd one is
        # a broken reading, unknown, never a latency that meets every SLO.
        x = row[col]
        if x is not None and not 0 <= x <= MAX_REQUEST_S:
            row[col] = None
    if row["model"] is not None and len(row["model"]) > MAX_MODEL_CHARS:
        row["model"] = row["model"][:MAX_MODEL_CHARS]  # the column's width: keep the span, cut the name
    if row["request_id"] is None:
        row["request_id"] = span_id
    if row["ttft_s"] is not None and row["e2e_s"] is not None and row["ttft_s"] > row["e2e_s"]:
        row["ttft_s"] = None  # a first token after the end: one of the two is wrong, the TTFT is unknown
    row["tpot_s"] = tpot(row["e2e_s"], row["ttft_s"], row["completion_tokens"])
    row["finish_unix_s"] = finish_of(row["arrival_unix_s"], row["e2e_s"], span.end_time_unix_nano)
    return row  # type: ignore[return-value]


def _problem(span: Span, replica: str) -> str | None:
    """Why a span cannot be stored, or None. Rejected spans are reported through partial_success."""
    if span.start_time_unix_nano == 0:
        return "start_time_unix_nano is missing (0); the arrival time would be unknown"
    if span.start_time_unix_nano < MIN_START_NS:
        return (f"start_time_unix_nano {span.start_time_unix_nano} is before 2000 (a timestamp in micro- or "
                "milliseconds, or a broken clock): it would land outside every SLO window; allowed: nanoseconds "
                "since the Unix epoch")
    if len(replica) > MAX_ID_CHARS:
        return f"resource names a replica longer than {MAX_ID_CHARS} characters"
    return None


def _json_safe(value: Any) -> Any:
    """Attributes go to a JSON column: non-finite floats become None, NUL bytes are dropped."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


def decode_request(msg: ExportTraceServiceRequest) -> DecodedBatch:
    out = DecodedBatch()
    for rs in msg.resource_spans:
        replica = replica_of(attributes(rs.resource.attributes))
        for ss in rs.scope_spans:
            for span in ss.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    out.rejected_spans += 1
                    if len(out.errors) < 5:
                        out.errors.append(
                            f"span {span.name!r}: trace_id must be 16 bytes and span_id 8 bytes (32 and 16 "
                            f"hex digits in OTLP/JSON), got {len(span.trace_id)} and {len(span.span_id)}"
                        )
                    continue
                trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
                problem = _problem(span, replica)
                if problem:
                    out.rejected_spans += 1
                    if len(out.errors) < 5:
                        out.errors.append(f"span {span.name!r} {span_id}: {problem}")
                    continue
                if span.name == names.SPAN_LLM_REQUEST:
                    row = _request_row(span, replica, trace_id, span_id)
                    if len(row["request_id"]) > MAX_ID_CHARS:
                        out.rejected_spans += 1
                        if len(out.errors) < 5:
                            out.errors.append(f"span {span_id}: {names.ATTR_REQUEST_ID} longer than "
                                              f"{MAX_ID_CHARS} characters")
                        continue
                    out.requests.append(row)
                    continue
                if span.kind not in _LIFECYCLE_KINDS:
                    # A server or client span of some other program sharing the exporter (one per request of
                    # its own): not an engine's lifecycle, and the events table would grow by one row per request.
                    out.ignored_spans += 1
                    continue
                start_s = span.start_time_unix_nano / 1e9
                end_s = span.end_time_unix_nano / 1e9 if span.end_time_unix_nano else None
                out.events.append(
                    EventRow(
                        replica=replica,
                        ts_unix_s=start_s,
                        kind=f"span:{span.name}".replace("\x00", "")[:100],
                        duration_s=(end_s - start_s) if end_s is not None and end_s >= start_s else None,
                        attributes=_json_safe(attributes(span.attributes)),
                        dedupe_key=f"{trace_id}/{span_id}",
                    )
                )
    return out


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise PayloadError(f"body is not a valid OTLP ExportTraceServiceRequest protobuf: {exc}") from exc
    return msg


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON encodes trace and span ids as hex, protobuf's JSON mapping expects base64. An id that is
    not hex becomes empty: its span is then rejected on its own (through partial_success, for its id's
    length), not the whole batch with it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    node[key] = ""
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise PayloadError("body is nested too deeply to be an OTLP/JSON payload") from exc
    if not isinstance(doc, dict):
        raise PayloadError("OTLP/JSON body must be an object with a 'resourceSpans' array")
    msg = ExportTraceServiceRequest()
    try:
        _hex_ids_to_base64(doc)
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
    except RecursionError as exc:
        raise PayloadError("body is nested too deeply to be an OTLP/JSON payload") from exc
    except json_format.ParseError as exc:
        raise PayloadError(f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
    return msg


def event_dict(row: EventRow) -> dict[str, Any]:
    return {k: getattr(row, k) for k in row.__dataclass_fields__}


__all__ = [
    "DecodedBatch",
    "EventRow",
    "PayloadError",
    "RequestRow",
    "decode_request",
    "parse_json",
    "parse_protobuf",
    "event_dict",
]
