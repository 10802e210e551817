import asyncio
import gzip
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from sqlalchemy.exc import OperationalError
from starlette.testclient import TestClient

from collectors.otlp.decode import PayloadError, decode_request, parse_json, parse_protobuf, tpot
from collectors.otlp.receiver import Ingestor, grpc_server, http_app
from controlplane import names
from controlplane.store.models import LifecycleEvent, Request
from controlplane.store.repo import Store
from tests.conftest import free_port
from tests.spans import export, kv, llm_span

PB = {"content-type": "application/x-protobuf"}


def test_an_llm_request_span_becomes_a_request_row_with_every_phase() -> None:
    span = llm_span(ttft=0.2, e2e=1.1, completion=10, prompt=33, start_ns=1_700_000_000_500_000_000)
    batch = decode_request(export([span], replica="tiny-0"))
    (row,) = batch.requests
    assert row["replica"] == "tiny-0"
    assert row["arrival_unix_s"] == pytest.approx(1_700_000_000.5)
    assert row["ttft_s"] == 0.2 and row["e2e_s"] == 1.1
    assert row["queue_s"] == 0.01 and row["prefill_s"] == pytest.approx(0.19)
    assert row["decode_s"] == pytest.approx(0.9) and row["inference_s"] == pytest.approx(1.09)
    assert row["tpot_s"] == pytest.approx(0.1)  # (1.1 - 0.2) / (10 - 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (33, 10)
    assert row["trace_id"] == span.trace_id.hex() and row["span_id"] == span.span_id.hex()
    assert row["finish_unix_s"] == pytest.approx(1_700_000_001.6)  # the span's end


def test_the_finish_time_falls_back_to_arrival_plus_e2e_then_to_arrival() -> None:
    start = 1_700_000_000_000_000_000
    no_end = llm_span(e2e=2.5, start_ns=start)
    no_end.end_time_unix_nano = 0
    ends_before_start = llm_span(e2e=2.5, start_ns=start)
    ends_before_start.end_time_unix_nano = start - 1
    neither = llm_span(start_ns=start)
    neither.end_time_unix_nano = 0
    del neither.attributes[:]
    absurd = llm_span(start_ns=start, **{names.ATTR_E2E: 1e15})  # a broken clock: 30 million years would
    absurd.end_time_unix_nano = start + 10**18  # overflow the rollup's bucket codes; 31 years is no request either
    rows = decode_request(export([no_end, ends_before_start, neither, absurd])).requests
    assert [r["finish_unix_s"] for r in rows] == pytest.approx([1_700_000_002.5, 1_700_000_002.5, 1_700_000_000.0,
                                                                1_700_000_000.0])


def test_tpot_is_unknown_for_a_single_token_or_missing_timings() -> None:
    assert tpot(1.0, 0.2, 1) is None
    assert tpot(None, 0.2, 5) is None
    assert tpot(1.0, 0.2, 5) == pytest.approx(0.2)


def test_startup_spans_become_lifecycle_events_not_requests() -> None:
    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="Load weights",
                start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 2 * 10**9,
                attributes=[kv("code.function", "load_weights")])
    batch = decode_request(export([span]))
    assert batch.requests == []
    (event,) = batch.events
    assert event.kind == "span:Load weights" and event.duration_s == pytest.approx(2.0)
    assert event.attributes == {"code.function": "load_weights"}


def test_server_and_client_spans_of_other_programs_are_not_lifecycle_events() -> None:
    # One exporter shared with an app: its HTTP spans (one per request) must not grow the events table.
    spans = [Span(trace_id=b"\x01" * 16, span_id=bytes([2, 0, 0, 0, 0, 0, 0, k]), name=name, kind=kind,
                  start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 10**9)
             for k, (name, kind) in enumerate([("GET /items", Span.SpanKind.SPAN_KIND_SERVER),
                                               ("POST upstream", Span.SpanKind.SPAN_KIND_CLIENT),
                                               ("Load weights", Span.SpanKind.SPAN_KIND_INTERNAL),
                                               ("Executor init", Span.SpanKind.SPAN_KIND_UNSPECIFIED)])]
    batch = decode_request(export([*spans, llm_span()]))
    assert [e.kind for e in batch.events] == ["span:Load weights", "span:Executor init"]
    assert len(batch.requests) == 1 and batch.ignored_spans == 2 and batch.rejected_spans == 0


def test_spans_with_bad_ids_are_rejected_and_the_rest_kept() -> None:
    batch = decode_request(export([llm_span(trace_id=b"\x01" * 3), llm_span()]))
    assert batch.rejected_spans == 1 and len(batch.requests) == 1
    assert "16 bytes" in batch.errors[0]


def test_otlp_json_with_hex_ids_decodes_like_protobuf() -> None:
    msg = export([llm_span()])
    doc = json_format.MessageToDict(msg)
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    pb_span = msg.resource_spans[0].scope_spans[0].spans[0]
    span["traceId"], span["spanId"] = pb_span.trace_id.hex(), pb_span.span_id.hex()
    assert parse_json(json.dumps(doc).encode()) == msg


@pytest.mark.parametrize(("body", "fragment"), [
    (b"\xff\xff\xff", "protobuf"),
])
def test_garbage_protobuf_is_a_payload_error(body: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError, match=fragment):
        parse_protobuf(body)


@pytest.fixture
def client(store: Store) -> TestClient:
    return TestClient(http_app(Ingestor(store), max_body_bytes=64 * 1024))


def test_an_acknowledged_protobuf_batch_is_in_the_store(client: TestClient, store: Store) -> None:
    resp = client.post("/v1/traces", content=export([llm_span(), llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 200
    ExportTraceServiceResponse.FromString(resp.content)
    assert store.count(Request) == 2


def test_an_otlp_json_batch_is_stored_and_answered_in_json(client: TestClient, store: Store) -> None:
    msg = export([llm_span()])
    doc = json_format.MessageToDict(msg)
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    pb_span = msg.resource_spans[0].scope_spans[0].spans[0]
    span["traceId"], span["spanId"] = pb_span.trace_id.hex(), pb_span.span_id.hex()
    resp = client.post("/v1/traces", json=doc)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    (row,) = store.requests()
    assert row["trace_id"] == pb_span.trace_id.hex()


def test_a_retried_batch_is_stored_once(client: TestClient, store: Store) -> None:
    body = export([llm_span(), llm_span()]).SerializeToString()
    for _ in range(3):
        assert client.post("/v1/traces", content=body, headers=PB).status_code == 200
    assert store.count(Request) == 2


def test_gzip_bodies_are_accepted(client: TestClient, store: Store) -> None:
    body = gzip.compress(export([llm_span()]).SerializeToString())
    resp = client.post("/v1/traces", content=body, headers={**PB, "content-encoding": "gzip"})
    assert resp.status_code == 200 and store.count(Request) == 1


@pytest.mark.parametrize(("headers", "body", "status", "says"), [
    ({"content-type": "text/plain"}, b"hello", 415, "Content-Type"),
    ({}, b"hello", 415, "(none)"),
    (PB, b"\x0a\xff\xff\xff\xff", 400, "protobuf"),
    ({"content-type": "application/json"}, b"{not json", 400, "JSON"),
    ({"content-type": "application/json"}, b"[1, 2]", 400, "resourceSpans"),
    ({**PB, "content-encoding": "gzip"}, gzip.compress(export([llm_span()]).SerializeToString())[:-12], 400,
     "truncated"),
    ({**PB, "content-encoding": "gzip"}, gzip.compress(export([llm_span()]).SerializeToString()) + b"GARBAGE", 400,
     "not valid gzip"),
    ({**PB, "content-encoding": "br"}, b"x", 415, "Content-Encoding"),
    ({**PB, "content-encoding": "gzip"}, b"not gzip at all", 400, "gzip"),
    (PB, b"\x00" * (64 * 1024 + 1), 413, "exceeds"),
    ({**PB, "content-encoding": "gzip"}, gzip.compress(b"\x00" * (1024 * 1024)), 413, "decompressed"),
])
def test_bad_payloads_get_a_4xx_that_says_what_was_wrong_and_the_receiver_keeps_serving(
    client: TestClient, store: Store, headers: dict[str, str], body: bytes, status: int, says: str
) -> None:
    resp = client.post("/v1/traces", content=body, headers=headers)
    assert resp.status_code == status
    assert says in _status_message(resp, headers)
    assert store.count(Request) == 0
    ok = client.post("/v1/traces", content=export([llm_span()]).SerializeToString(), headers=PB)
    assert ok.status_code == 200 and store.count(Request) == 1


def _status_message(resp: Any, request_headers: dict[str, str]) -> str:
    """The message of an OTLP/HTTP error body: a google.rpc.Status, encoded as the request was (JSON when the
    request's type is not protobuf)."""
    if request_headers.get("content-type") == PB["content-type"]:
        assert resp.headers["content-type"] == PB["content-type"]
        return Status.FromString(resp.content).message
    assert resp.headers["content-type"].startswith("application/json")
    return json_format.Parse(resp.content, Status()).message


def test_get_on_the_traces_endpoint_says_post_is_allowed(client: TestClient) -> None:
    resp = client.get("/v1/traces")
    assert resp.status_code == 405 and _status_message(resp, {}).endswith("allowed: POST")


def test_an_error_body_is_a_status_exporters_can_read(client: TestClient) -> None:
    resp = client.post("/v1/traces", content=b"\x0a\xff\xff\xff\xff", headers=PB)
    st = Status.FromString(resp.content)
    assert resp.status_code == 400 and st.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid OTLP ExportTraceServiceRequest" in st.message
    resp = client.post("/v1/traces", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.json()["code"] == 3 and "not valid JSON" in resp.json()["message"]


def test_a_malformed_grpc_message_is_invalid_argument_naming_the_problem(sqlite_store: Store) -> None:
    server, port = grpc_server(Ingestor(sqlite_store), "127.0.0.1", free_port(), 4 * 1024 * 1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid OTLP ExportTraceServiceRequest" in (err.value.details() or "")
            ok = raw(export([llm_span()]).SerializeToString(), timeout=10)  # then a good one is stored
            ExportTraceServiceResponse.FromString(ok)
    finally:
        server.stop(None)
    assert sqlite_store.count(Request) == 1


def test_partial_success_reports_rejected_spans(client: TestClient, store: Store) -> None:
    body = export([llm_span(span_id=b"\x01"), llm_span()]).SerializeToString()
    resp = client.post("/v1/traces", content=body, headers=PB)
    parsed = ExportTraceServiceResponse.FromString(resp.content)
    assert parsed.partial_success.rejected_spans == 1 and store.count(Request) == 1


class _BrokenStore(Store):
    def write_spans(self, requests, events):  # type: ignore[no-untyped-def, override]
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))


def test_a_store_failure_is_a_503_so_the_exporter_retries(sqlite_store: Store) -> None:
    client = TestClient(http_app(Ingestor(_BrokenStore(sqlite_store.engine)), max_body_bytes=65536))
    resp = client.post("/v1/traces", content=export([llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"


def test_otlp_grpc_export_is_stored_and_startup_spans_become_events(sqlite_store: Store) -> None:
    server, port = grpc_server(Ingestor(sqlite_store), "127.0.0.1", free_port(), 4 * 1024 * 1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            startup = Span(trace_id=b"\x03" * 16, span_id=b"\x04" * 8, name="Executor init",
                           start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 10**9)
            stub.Export(export([llm_span(), startup]), timeout=10)
        assert sqlite_store.count(Request) == 1
        assert sqlite_store.count(LifecycleEvent) == 1
        assert sqlite_store.events()[0]["kind"] == "span:Executor init"
    finally:
        server.stop(grace=None)


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_the_grpc_receiver_binds_an_ipv6_address(sqlite_store: Store) -> None:
    server, port = grpc_server(Ingestor(sqlite_store), "::1", 0, 4 * 1024 * 1024)  # ':::0' would not bind
    try:
        with grpc.insecure_channel(f"[::1]:{port}") as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(export([llm_span()]), timeout=10)
        assert sqlite_store.count(Request) == 1
    finally:
        server.stop(grace=None)


def test_a_grpc_message_over_the_limit_is_refused_with_resource_exhausted(sqlite_store: Store) -> None:
    server, port = grpc_server(Ingestor(sqlite_store), "127.0.0.1", free_port(), 1024)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Export(export([llm_span() for _ in range(50)]), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sqlite_store.count(Request) == 0
    finally:
        server.stop(grace=None)


def test_a_real_zero_is_kept_and_numbers_of_the_other_kind_are_converted() -> None:
    span = llm_span()
    del span.attributes[:]
    span.attributes.extend([kv("gen_ai.latency.time_in_queue", 0.0), kv("gen_ai.latency.e2e", 2),
                            kv("gen_ai.usage.prompt_tokens", 12.0), kv("gen_ai.usage.completion_tokens", 0),
                            kv("gen_ai.latency.time_to_first_token", "fast")])
    (row,) = decode_request(export([span])).requests
    assert row["queue_s"] == 0.0 and row["e2e_s"] == 2.0 and isinstance(row["e2e_s"], float)
    assert row["prompt_tokens"] == 12 and isinstance(row["prompt_tokens"], int)
    assert row["completion_tokens"] == 0
    assert row["ttft_s"] is None  # a string where a number belongs is unknown, not zero
    assert row["prefill_s"] is None and row["request_id"] == span.span_id.hex()


def test_non_finite_and_absurd_numbers_are_unknown_not_a_500(client: TestClient, store: Store) -> None:
    span = llm_span(e2e=0.5, ttft=0.1)
    del span.attributes[:]
    span.attributes.extend([kv("gen_ai.latency.e2e", float("nan")), kv("gen_ai.latency.time_to_first_token", 0.1),
                            kv("gen_ai.usage.prompt_tokens", 1e30), kv("gen_ai.usage.completion_tokens", float("inf")),
                            kv("gen_ai.latency.time_in_queue", float("-inf"))])
    resp = client.post("/v1/traces", content=export([span]).SerializeToString(), headers=PB)
    assert resp.status_code == 200
    (row,) = store.requests()
    assert row["e2e_s"] is None and row["prompt_tokens"] is None and row["completion_tokens"] is None
    assert row["queue_s"] is None and row["ttft_s"] == 0.1


def test_spans_the_store_cannot_hold_are_rejected_by_name_and_the_rest_kept(client: TestClient, store: Store) -> None:
    no_start = llm_span(start_ns=0)
    long_id = llm_span(request_id="x" * 500)
    nul = llm_span(request_id="cmpl-\x00abc")
    resp = client.post("/v1/traces", content=export([no_start, long_id, nul, llm_span()]).SerializeToString(),
                       headers=PB)
    parsed = ExportTraceServiceResponse.FromString(resp.content)
    assert resp.status_code == 200 and parsed.partial_success.rejected_spans == 2
    assert "start_time_unix_nano" in parsed.partial_success.error_message
    assert "cmpl-abc" in {r["request_id"] for r in store.requests()}
    assert store.count(Request) == 2


def test_a_nul_byte_in_a_span_name_keeps_the_batch(client: TestClient, store: Store) -> None:
    # PostgreSQL refuses a NUL in text: one such name used to cost the whole batch (a 400 exporters drop).
    odd = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="Load\x00weights",
               start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 10**9)
    resp = client.post("/v1/traces", content=export([odd, llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 200, resp.text
    assert store.count(Request) == 1
    assert "span:Loadweights" in {e["kind"] for e in store.events()}


def test_counts_past_a_32_bit_column_and_long_model_names_keep_the_batch(client: TestClient, store: Store) -> None:
    # PostgreSQL refuses a whole INSERT for one token count past 2**31 - 1 or a model name past 500 characters:
    # such a value is unknown (or cut), and the spans beside it are stored.
    odd = [llm_span(completion=2**31), llm_span(**{names.ATTR_MAX_TOKENS: 2**31}), llm_span(prompt=-5),
           llm_span(**{names.ATTR_RESPONSE_MODEL: "m" * 501})]
    resp = client.post("/v1/traces", content=export([*odd, llm_span(), llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 200, resp.text
    rows = store.requests()
    assert len(rows) == 6
    # llm_span sets max_tokens to the completion count: two spans carry 2**31 there
    assert sum(r["completion_tokens"] is None for r in rows) == 1 and sum(r["max_tokens"] is None for r in rows) == 2
    assert sum(r["prompt_tokens"] is None for r in rows) == 1
    assert [len(r["model"]) for r in rows if r["model"]] == [500]


def test_an_e2e_shorter_than_ttft_gives_an_unknown_tpot_not_zero() -> None:
    assert tpot(0.1, 0.5, 10) is None
    assert tpot(0.5, -3.0, 11) is None  # a negative TTFT is no timing to derive from


def test_negative_or_absurd_durations_are_unknown_not_latencies_that_meet_every_slo() -> None:
    # vLLM derives its phases from engine timestamps that are 0 while unset: a broken one can come out < 0.
    (row,) = decode_request(export([llm_span(ttft=-3.0, e2e=0.5, completion=11,
                                             **{names.ATTR_QUEUE: -7.5, names.ATTR_PREFILL: 1e9})])).requests
    assert (row["ttft_s"], row["queue_s"], row["prefill_s"], row["tpot_s"]) == (None, None, None, None)
    assert row["e2e_s"] == 0.5
    backwards = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="Load weights",
                     start_time_unix_nano=10**18, end_time_unix_nano=10**18 - 10 * 10**9)
    (event,) = decode_request(export([backwards])).events
    assert event.duration_s is None


def _json_doc(spans: list[Span]) -> dict:  # type: ignore[type-arg]
    msg = export(spans)
    doc = json_format.MessageToDict(msg)
    for js, pb in zip(doc["resourceSpans"][0]["scopeSpans"][0]["spans"], msg.resource_spans[0].scope_spans[0].spans,
                      strict=True):
        js["traceId"], js["spanId"] = pb.trace_id.hex(), pb.span_id.hex()
    return doc


def test_one_json_span_with_an_id_that_is_not_hex_is_rejected_alone(client: TestClient, store: Store) -> None:
    doc = _json_doc([llm_span(), llm_span()])
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["spanId"] = "b7ad6b716920333"  # odd length
    resp = client.post("/v1/traces", json=doc)
    assert resp.status_code == 200
    partial = resp.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "hex digits" in partial["errorMessage"]
    assert store.count(Request) == 1


def test_a_gzip_body_of_several_members_is_read_whole(client: TestClient, store: Store) -> None:
    a, b = (gzip.compress(export([llm_span(), llm_span()]).SerializeToString()) for _ in range(2))
    # Two members concatenated are one gzip body (RFC 1952); each here is a whole request message, and
    # protobuf messages concatenate into one with both batches' resource spans.
    resp = client.post("/v1/traces", content=a + b, headers={**PB, "content-encoding": "gzip"})
    assert resp.status_code == 200 and store.count(Request) == 4


def test_deeply_nested_json_is_a_400_not_a_500(client: TestClient) -> None:
    body = b"{\"resourceSpans\": " + b"[" * 5_000 + b"]" * 5_000 + b"}"
    resp = client.post("/v1/traces", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "nested" in resp.json()["message"]


def test_data_the_store_refuses_is_a_400_not_a_retry_loop(sqlite_store: Store) -> None:
    from sqlalchemy.exc import DataError

    class Refusing(Store):
        def write_spans(self, requests, events):  # type: ignore[no-untyped-def, override]
            raise DataError("INSERT", {}, Exception("value too long for type character varying(200)"))

    client = TestClient(http_app(Ingestor(Refusing(sqlite_store.engine)), max_body_bytes=65536))
    resp = client.post("/v1/traces", content=export([llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 400 and "too long" in Status.FromString(resp.content).message


def test_bodies_are_decoded_off_the_event_loop(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # The plane's API, scraper and SLO loops share the receiver's event loop: parsing a large OTLP/JSON batch
    # (pure Python) or inflating a gzip body on it would stall them all.
    from collectors.otlp import receiver
    seen: list[bool] = []

    def parse(body: bytes):  # type: ignore[no-untyped-def]
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:  # no loop runs on this thread: a worker thread
            seen.append(False)
        return parse_json(body)

    monkeypatch.setattr(receiver, "parse_json", parse)
    client = TestClient(http_app(Ingestor(store), max_body_bytes=64 * 1024))
    assert client.post("/v1/traces", json=_json_doc([llm_span()])).status_code == 200
    assert seen == [False] and store.count(Request) == 1


def test_a_gzip_body_of_too_many_members_is_a_400_naming_the_limit(store: Store) -> None:
    client = TestClient(http_app(Ingestor(store), max_body_bytes=4 * 1024 * 1024))
    body = gzip.compress(b"") * 1000
    resp = client.post("/v1/traces", content=body, headers={**PB, "content-encoding": "gzip"})
    assert resp.status_code == 400 and "more than 16 members" in Status.FromString(resp.content).message


def test_an_unexpected_error_while_storing_is_a_500_not_blamed_on_the_payload(sqlite_store: Store) -> None:
    class Broken(Store):
        def write_spans(self, requests, events):  # type: ignore[no-untyped-def, override]
            raise KeyError("a bug")

    client = TestClient(http_app(Ingestor(Broken(sqlite_store.engine)), max_body_bytes=65536),
                        raise_server_exceptions=False)
    resp = client.post("/v1/traces", content=export([llm_span()]).SerializeToString(), headers=PB)
    assert resp.status_code == 500


def test_a_span_start_before_2000_is_rejected_and_a_ttft_after_the_end_is_unknown() -> None:
    batch = decode_request(export([llm_span(start_ns=5_000_000, request_id="ms"),  # 5 ms after the epoch
                                   llm_span(ttft=3.0, e2e=1.0, request_id="late"),
                                   llm_span(request_id="ok")]))
    assert batch.rejected_spans == 1 and "before 2000" in batch.errors[0]
    rows = {r["request_id"]: r for r in batch.requests}
    assert set(rows) == {"late", "ok"}
    assert rows["late"]["ttft_s"] is None and rows["late"]["e2e_s"] == 1.0 and rows["late"]["tpot_s"] is None
    assert rows["ok"]["ttft_s"] == 0.05
