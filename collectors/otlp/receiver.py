"""OTLP trace receivers: OTLP/HTTP (protobuf and JSON) at /v1/traces, and OTLP/gRPC.

Both call `Ingestor.ingest`, which returns only after the batch is committed, so an
acknowledged batch survives a kill -9 of the plane. Bad payloads get a 4xx naming the problem;
a database failure gets 503 / UNAVAILABLE so the exporter retries (rows are idempotent).
"""

from __future__ import annotations

import logging
import zlib
from concurrent import futures
from dataclasses import dataclass

import anyio
import anyio.to_thread
import grpc
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from collectors.otlp.decode import PayloadError, decode_request, event_dict, parse_json, parse_protobuf
from controlplane import names
from controlplane.settings import host_port
from controlplane.store.repo import Store

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


@dataclass(frozen=True)
class IngestResult:
    requests_stored: int
    events_stored: int
    rejected_spans: int
    error_message: str


class StoreUnavailable(RuntimeError):
    """The store could not take the batch now: the exporter should retry."""


class BatchRefused(ValueError):
    """The store refused the batch's data: retrying the same batch would fail again."""


class Ingestor:
    """Decode + commit, shared by both transports. Counters go to the plane's registry."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        registry = registry if registry is not None else CollectorRegistry()
        self.spans_received = Counter(
            names.PLANE_SPANS_RECEIVED, "Spans received over OTLP", ["transport"], registry=registry
        )
        self.payloads_rejected = Counter(
            names.PLANE_SPANS_REJECTED, "OTLP payloads rejected", ["transport", "reason"], registry=registry
        )
        self.requests_stored = Counter(
            names.PLANE_REQUESTS_STORED, "Request rows committed", registry=registry
        )

    def ingest(self, msg: ExportTraceServiceRequest, transport: str) -> IngestResult:
        batch = decode_request(msg)
        self.spans_received.labels(transport).inc(batch.span_count + batch.rejected_spans)
        try:
            n_req, n_ev = self.store.write_spans(batch.requests, [event_dict(e) for e in batch.events])
        except (DataError, IntegrityError) as exc:
            log.warning("OTLP batch refused by the store: %s", exc)
            raise BatchRefused(f"the store refused the batch's data: {type(exc).__name__}: "
                               f"{str(exc.orig)[:300]}") from exc
        except SQLAlchemyError as exc:
            log.error("OTLP batch not stored: %s", exc)
            raise StoreUnavailable(f"store unavailable: {type(exc).__name__}") from exc
        self.requests_stored.inc(n_req)
        return IngestResult(n_req, n_ev, batch.rejected_spans, "; ".join(batch.errors))

    def reject(self, transport: str, reason: str) -> None:
        self.payloads_rejected.labels(transport, reason).inc()


def _response(result: IngestResult) -> ExportTraceServiceResponse:
    resp = ExportTraceServiceResponse()
    if result.rejected_spans:
        resp.partial_success.CopyFrom(
            ExportTracePartialSuccess(rejected_spans=result.rejected_spans, error_message=result.error_message)
        )
    return resp


# --- OTLP/HTTP -----------------------------------------------------------------------------------
# The gRPC code a failed OTLP/HTTP request's Status carries (the spec leaves it optional; clients log it).
_STATUS_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 405: grpc.StatusCode.UNIMPLEMENTED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
                503: grpc.StatusCode.UNAVAILABLE}


def _error(status: int, message: str, allowed: str | None = None, *, ctype: str = JSON,
           headers: dict[str, str] | None = None) -> Response:
    """An OTLP/HTTP failure: the body is a google.rpc.Status (the OTLP spec's requirement, so that exporters
    and collectors log its message), encoded as the request was (protobuf or JSON; JSON when the request's
    type is not one of them). What is allowed goes in the message."""
    code = _STATUS_CODE.get(status, grpc.StatusCode.UNKNOWN).value[0]
    st = Status(code=code, message=f"{message}; allowed: {allowed}" if allowed else message)
    if ctype == PROTOBUF:
        return Response(st.SerializeToString(), status_code=status, media_type=PROTOBUF, headers=headers)
    return Response(json_format.MessageToJson(st, indent=None), status_code=status, media_type=JSON,
                    headers=headers)


MAX_GZIP_MEMBERS = 16


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise LookupError(encoding)
    # Bounded: a small gzip bomb must not exhaust memory. Member by member (a concatenation of gzip members is
    # one valid gzip body); a body cut short, or followed by anything but padding, is refused, not half read.
    out = bytearray()
    rest = body
    try:
        for _ in range(MAX_GZIP_MEMBERS):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise OverflowError
            if not d.eof:
                raise PayloadError("Content-Encoding gzip but the gzip stream is truncated: it ends before its "
                                   "end marker")
            rest = d.unused_data  # a copy of what follows: hence the cap on members (exporters send one)
            if rest.count(0) == len(rest):  # nothing, or padding
                return bytes(out)
        raise PayloadError(f"Content-Encoding gzip with more than {MAX_GZIP_MEMBERS} members; an OTLP exporter sends "
                           "one")
    except zlib.error as exc:
        raise PayloadError(f"Content-Encoding gzip but the body is not valid gzip: {exc}") from exc


class _Undecodable(Exception):
    """The body could not be decoded; its cause says why (OverflowError: too large once inflated, LookupError: an
    unknown Content-Encoding, PayloadError: malformed). Apart from what storing the batch may raise."""


def _decode(body: bytes, encoding: str, ctype: str, limit: int) -> ExportTraceServiceRequest:
    try:
        raw = _decompress(body, encoding, limit)
        return parse_protobuf(raw) if ctype == PROTOBUF else parse_json(raw)
    except (OverflowError, LookupError, PayloadError) as exc:
        raise _Undecodable from exc


# Decompressing and parsing (pure-Python for OTLP/JSON: ~0.2 s per 1,000 spans) run on worker threads, never
# on the event loop the plane's API, scraper and SLO loops share; at most this many batches at once, so
# that parallel large batches do not multiply the memory each one takes.
DECODE_CONCURRENCY = 2


def http_app(ingestor: Ingestor, max_body_bytes: int) -> Starlette:
    limiter: list[anyio.CapacityLimiter] = []  # made on first use, inside the serving event loop

    def decode_and_ingest(body: bytes, encoding: str, ctype: str) -> IngestResult:
        return ingestor.ingest(_decode(body, encoding, ctype, max_body_bytes), "http")

    async def traces(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (PROTOBUF, JSON):
            ingestor.reject("http", "content_type")
            return _error(415, f"unsupported Content-Type {ctype or '(none)'!r} on /v1/traces",
                          allowed=f"{PROTOBUF}, {JSON}")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            ingestor.reject("http", "too_large")
            return _error(413, f"payload of {declared} bytes exceeds the limit of {max_body_bytes} bytes",
                          ctype=ctype)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                ingestor.reject("http", "too_large")
                return _error(413, f"payload exceeds the limit of {max_body_bytes} bytes", ctype=ctype)
            chunks.append(chunk)
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if not limiter:
            limiter.append(anyio.CapacityLimiter(DECODE_CONCURRENCY))
        try:
            result = await anyio.to_thread.run_sync(decode_and_ingest, b"".join(chunks), encoding, ctype,
                                                    limiter=limiter[0])
        except _Undecodable as exc:
            why = exc.__cause__
            if isinstance(why, OverflowError):
                ingestor.reject("http", "too_large")
                return _error(413, f"decompressed payload exceeds the limit of {max_body_bytes} bytes", ctype=ctype)
            if isinstance(why, LookupError):
                ingestor.reject("http", "content_encoding")
                return _error(415, f"unsupported Content-Encoding {encoding!r}", allowed="gzip, identity",
                              ctype=ctype)
            ingestor.reject("http", "malformed")
            return _error(400, str(why), ctype=ctype)
        except StoreUnavailable as exc:
            return _error(503, str(exc), ctype=ctype, headers={"Retry-After": "1"})
        except BatchRefused as exc:
            ingestor.reject("http", "refused_by_store")
            return _error(400, str(exc), ctype=ctype)
        resp = _response(result)
        if ctype == JSON:
            return Response(json_format.MessageToJson(resp), media_type=JSON)
        return Response(resp.SerializeToString(), media_type=PROTOBUF)

    async def wrong_method(request: Request) -> Response:
        return _error(405, f"{request.method} not allowed on /v1/traces", allowed="POST")

    return Starlette(routes=[
        Route("/v1/traces", traces, methods=["POST"]),
        Route("/v1/traces", wrong_method, methods=["GET", "PUT", "DELETE", "PATCH"]),
    ])


# --- OTLP/gRPC -----------------------------------------------------------------------------------
_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def _grpc_handler(ingestor: Ingestor) -> grpc.GenericRpcHandler:
    """TraceService/Export taking the raw request bytes: with gRPC's own deserializer a malformed message never
    reaches the service and the exporter sees INTERNAL "Exception deserializing request!"; parsed here, it gets
    INVALID_ARGUMENT naming what was wrong."""

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        try:
            msg = parse_protobuf(body)
        except PayloadError as exc:
            ingestor.reject("grpc", "malformed")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        try:
            return _response(ingestor.ingest(msg, "grpc"))
        except StoreUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        except BatchRefused as exc:
            ingestor.reject("grpc", "refused_by_store")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise

    return grpc.method_handlers_generic_handler(_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=ExportTraceServiceResponse.SerializeToString)})


def grpc_server(
    ingestor: Ingestor, host: str, port: int, max_body_bytes: int, workers: int = 4
) -> tuple[grpc.Server, int]:
    """Start an OTLP/gRPC server; returns it and the bound port (port 0 picks a free one)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", max_body_bytes)],
    )
    server.add_generic_rpc_handlers((_grpc_handler(ingestor),))
    address = host_port(host, port)  # an IPv6 literal needs its brackets here
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind OTLP/gRPC on {address}")
    server.start()
    return server, bound

