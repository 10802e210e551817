"""The simulated engine over HTTP: OpenAI answers at the simulated times, vLLM's /metrics, spans the plane decodes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collectors.otlp.decode import attributes, decode_request
from collectors.otlp.receiver import Ingestor, http_app
from collectors.promtext import parse
from collectors.vllm_metrics import read_engine
from controlplane import names
from controlplane.engines.sim_server import (
    SimConfigError,
    SimServer,
    SimServerConfig,
    config_from_args,
    replica_model,
    serve_in_thread,
)
from controlplane.store.repo import Store
from controlplane.supervisor.spec import EngineConfig
from controlplane.tuning import catalog
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import Coefficients, EngineArgs, ReplicaModel, StepCost, roofline
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Workload
from tests.conftest import free_port
from tests.unit.engines.fakes import FakeClock, Recorder


def slow_replica(alpha_s: float = 5e-3, *, blocks: int = 400) -> ReplicaModel:
    """A replica whose prefills are long (0.2 ms per token) so TTFTs differ by much more than HTTP overhead."""
    return ReplicaModel(StepCost.linear(Coefficients(alpha_s, 2e-4, 1e-7)), max_num_seqs=8, max_num_batched_tokens=512,
                        block_size=16, num_kv_blocks=blocks, max_model_len=min(2048, blocks * 16), name="sim")


def config(rep: ReplicaModel, **kw: Any) -> SimServerConfig:
    base: dict[str, Any] = dict(replica=rep, served_model_name="sim", model="Llama-3.1-8B", accelerator="H100-80GB",
                                num_gpu_blocks=rep.num_kv_blocks + 1, port=0, access_log=False)
    return SimServerConfig(**(base | kw))


@pytest.fixture
def recorded() -> Iterator[Any]:
    """Start servers whose finished requests are recorded (by request id); stop them all at the end."""
    started: list[SimServer] = []

    def start(cfg: SimServerConfig) -> tuple[SimServer, Recorder]:
        server = SimServer(cfg)
        rec = Recorder(FakeClock(), inner=server.telemetry)  # the clock is unused over HTTP
        server.engine.observer = rec
        started.append(server.start())
        return server, rec

    yield start
    for s in started:
        s.stop()


@dataclass
class Seen:
    headers_s: float
    first_s: float | None
    lines: list[dict[str, Any]]


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> Seen:
    """POST a streaming request; times (from sending) the response headers and the first data event."""
    t0 = time.perf_counter()
    first, lines = None, []
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        head = time.perf_counter() - t0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - t0
            if line != "data: [DONE]":
                lines.append(json.loads(line[6:]))
    return Seen(head, first, lines)


async def burst(url: str, bodies: list[dict[str, Any]], headers: list[dict[str, str]]) -> list[Seen]:
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(client.get(url + "/health") for _ in bodies))  # connections open before timing
        return list(await asyncio.gather(*(stream(client, url + "/v1/completions", b, h)
                                            for b, h in zip(bodies, headers, strict=True))))


def test_a_clients_streamed_ttft_is_the_engines_simulated_ttft_divided_by_the_speedup(recorded: Any) -> None:
    speedup = 1.0  # simulated TTFTs of 0.1-0.7 s, long next to the HTTP path they are compared through
    rep = slow_replica()
    server, rec = recorded(config(rep, speedup=speedup))
    # Eight 400-token prompts at once through a 512-token budget: prefills queue one behind the other, so the
    # simulated TTFTs climb from ~0.1 s to ~0.7 s.
    bodies = [{"model": "sim", "prompt": list(range(400)), "max_tokens": 4, "stream": True} for _ in range(8)]
    ids = [f"req-{i}" for i in range(8)]
    seen = asyncio.run(burst(server.base_url, bodies, [{"x-request-id": i} for i in ids]))
    timings = [rec.timings[i] for i in ids]

    # The engine is the simulator: replaying the arrivals it stamped gives its latencies exactly.
    order = np.argsort([t.arrival_s for t in timings], kind="stable")
    wl = Workload(np.array([timings[i].arrival_s for i in order]), np.full(8, 400), np.full(8, 4))
    offline = simulate(wl, [rep], sample_interval_s=None)
    assert np.allclose([timings[i].ttft_s for i in order], offline.ttft_s, rtol=1e-9)
    assert np.allclose([timings[i].e2e_s for i in order], offline.e2e_s, rtol=1e-9)
    assert max(t.ttft_s for t in timings) > 4 * min(t.ttft_s for t in timings)

    # The client never sees a token before its simulated time. It sees it late by its own HTTP path (the request's
    # way in and the answer's way out, each within the slowest time-to-headers of this run), plus how far the
    # engine's loop fell behind its clock (measured by the engine), plus 10% for this process being descheduled
    # while a token is on its way (the 2-core host is shared; the real-vLLM TTFT test allows 10% too).
    slack = 2 * max(s.headers_s for s in seen) + server.engine.max_release_lag_s
    for s, t in zip(seen, timings, strict=True):
        assert s.first_s is not None
        assert s.first_s >= t.ttft_s / speedup - 1e-6
        assert s.first_s - t.ttft_s / speedup <= slack + 0.1 * t.ttft_s / speedup, (s.first_s, t.ttft_s, slack)
        texts = [c["choices"][0]["text"] for c in s.lines if c["choices"]]
        assert len("".join(texts).split()) == 4 and s.lines[-1]["choices"][0]["finish_reason"] == "length"


def test_the_metrics_page_reads_through_the_plane_collector_while_requests_run_and_after(recorded: Any) -> None:
    rep = slow_replica(alpha_s=10e-3, blocks=100)
    server, _ = recorded(config(rep, speedup=1.0))
    prompts, outputs = [300, 200, 100, 50], [200, 200, 200, 200]
    readings = []

    async def scrape_while_streaming() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            jobs = [asyncio.create_task(stream(client, server.base_url + "/v1/completions",
                                               {"prompt": list(range(p)), "max_tokens": o, "stream": True}, {}))
                    for p, o in zip(prompts, outputs, strict=True)]
            while not all(j.done() for j in jobs):
                page = (await client.get(server.base_url + "/metrics")).text
                readings.append(read_engine(parse(page)))
                await asyncio.sleep(0.05)
            await asyncio.gather(*jobs)

    asyncio.run(scrape_while_streaming())
    busy = [r for r in readings if r.num_running]
    assert busy, "no scrape saw a running request"
    for r in readings:
        assert r.kv_usage_ratio is not None and r.num_running is not None and r.num_waiting is not None
        assert r.num_running + r.num_waiting <= 4 and (r.kv_usage_ratio > 0) == (r.num_running > 0)
        # At least the running requests' prompts are cached, at most the four whole sequences.
        assert r.kv_usage_ratio <= sum(-(-(p + o) // 16) for p, o in zip(prompts, outputs, strict=True)) / 100
    assert min(r.kv_usage_ratio or 0 for r in busy) >= -(-50 // 16) / 100

    final = read_engine(parse(httpx.get(server.base_url + "/metrics").text))
    assert (final.kv_capacity_tokens, final.kv_block_size_tokens) == (101 * 16, 16)  # as vLLM: null block included
    assert (final.num_running, final.num_waiting, final.kv_usage_ratio) == (0, 0, 0)
    assert final.counters["request_success_total"] == 4 and final.counters["request_errors_total"] == 0
    assert final.counters["prompt_tokens_total"] == sum(prompts)
    assert final.counters["generation_tokens_total"] == sum(outputs)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.batches: list[ExportTraceServiceRequest] = []

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext  # noqa: N802
               ) -> ExportTraceServiceResponse:
        self.batches.append(request)
        return ExportTraceServiceResponse()


def _traced(n: int) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    ids = [(secrets.token_hex(16), secrets.token_hex(8)) for _ in range(n)]
    return [{"traceparent": f"00-{t}-{s}-01", "x-request-id": f"req-{i}"} for i, (t, s) in enumerate(ids)], ids


def test_spans_reach_an_otlp_grpc_receiver_and_decode_to_rows_with_the_engines_timings(recorded: Any) -> None:
    collector = Collector()
    grpc_srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, grpc_srv)  # type: ignore[no-untyped-call]
    port = grpc_srv.add_insecure_port("127.0.0.1:0")
    grpc_srv.start()
    try:
        server, rec = recorded(config(slow_replica(), speedup=20.0, otlp_traces_endpoint=f"127.0.0.1:{port}",
                                      otlp_protocol="grpc", resource_attributes={names.RES_REPLICA: "sim-0"}))
        headers, ids = _traced(3)
        bodies = [{"prompt": "x" * 400, "max_tokens": 6, "stream": True, "temperature": 0.5} for _ in range(3)]
        asyncio.run(burst(server.base_url, bodies, headers))
        server.stop()  # flushes the batched spans
    finally:
        grpc_srv.stop(None)
    rows = [row for b in collector.batches for row in decode_request(b).requests]
    assert sorted(r["trace_id"] for r in rows) == sorted(t for t, _ in ids)
    parents = {s.trace_id.hex(): s.parent_span_id.hex() for b in collector.batches for rs in b.resource_spans
               for ss in rs.scope_spans for s in ss.spans}
    assert parents == dict(ids)  # the client's traceparent is the span's parent
    resource = attributes(collector.batches[0].resource_spans[0].resource.attributes)
    assert resource[names.RES_SIMULATED] == "true"
    for row in rows:
        t = rec.timings[row["request_id"]]
        assert row["replica"] == "sim-0" and row["model"] is None  # vLLM sets no response model either
        assert (row["prompt_tokens"], row["completion_tokens"], row["max_tokens"]) == (100, 6, 6)  # 400 chars / 4
        assert row["ttft_s"] == pytest.approx(t.ttft_s, rel=1e-12) and row["e2e_s"] == pytest.approx(t.e2e_s)
        assert row["queue_s"] == pytest.approx(t.queue_s) and row["decode_s"] == pytest.approx(t.decode_s)
        assert row["tpot_s"] == pytest.approx(t.decode_s / 5)
        assert row["arrival_unix_s"] == pytest.approx(server.engine.unix_at(t.arrival_s), abs=1e-6)


def test_spans_over_otlp_http_land_in_the_store_under_the_replica_the_environment_names(
        recorded: Any, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver, thread, port = serve_in_thread(http_app(Ingestor(sqlite_store), 10_000_000), "127.0.0.1", 0)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"{names.RES_REPLICA}=sim-http")
    try:
        server, rec = recorded(config(slow_replica(), speedup=20.0,
                                      otlp_traces_endpoint=f"http://127.0.0.1:{port}/v1/traces"))
        headers, _ = _traced(4)
        asyncio.run(burst(server.base_url, [{"prompt": [1, 2, 3], "max_tokens": 3, "stream": True}] * 4, headers))
        server.stop()
    finally:
        receiver.should_exit = True
        thread.join(10)
    rows = sqlite_store.requests(replica="sim-http")
    assert len(rows) == 4
    for row in rows:
        t = rec.timings[row["request_id"]]
        assert row["ttft_s"] == pytest.approx(t.ttft_s) and row["e2e_s"] == pytest.approx(t.e2e_s)
        assert row["tpot_s"] == pytest.approx(t.decode_s / 2) and row["prompt_tokens"] == 3


BAD = {
    "unknown model": ({"model": "gpt-4", "prompt": "hi", "max_tokens": 2}, 404, "NotFoundError", "model"),
    "empty prompt": ({"prompt": "", "max_tokens": 2}, 400, "BadRequestError", "prompt"),
    "batched prompts": ({"prompt": ["a", "b"], "max_tokens": 2}, 400, "BadRequestError", "prompt"),
    "zero max_tokens": ({"prompt": "hi", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
    "too long for the model": ({"prompt": list(range(2000)), "max_tokens": 100}, 400, "BadRequestError",
                               "max_tokens"),
    "stream options without stream": ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
                                      "BadRequestError", None),
    "n of 2": ({"prompt": "hi", "n": 2}, 400, "BadRequestError", "n"),
    "no prompt": ({"max_tokens": 3}, 400, "BadRequestError", "prompt"),
    "negative token id": ({"prompt": [5, -7], "max_tokens": 2}, 400, "BadRequestError", "prompt"),
    "token id past the vocabulary": ({"prompt": [128256], "max_tokens": 2}, 400, "BadRequestError", "prompt"),
    "booleans for token ids": ({"prompt": [True, False], "max_tokens": 2}, 400, "BadRequestError", "prompt"),
    "infinite temperature": (b'{"prompt": "hi", "temperature": 1e400}', 400, "BadRequestError", "temperature"),
    "empty stop string": ({"prompt": "hi", "stop": ["x", ""]}, 400, "BadRequestError", "stop"),
}


def test_bad_requests_get_vllm_style_error_bodies_naming_the_problem(recorded: Any) -> None:
    server, _ = recorded(config(slow_replica(), speedup=50.0))
    for case, (body, status, kind, param) in BAD.items():
        if isinstance(body, bytes):  # JSON that json.dumps would not write
            resp = httpx.post(server.base_url + "/v1/completions", content=body,
                              headers={"content-type": "application/json"})
        else:
            resp = httpx.post(server.base_url + "/v1/completions", json=body)
        err = resp.json()["error"]
        assert (resp.status_code, err["code"], err["type"]) == (status, status, kind), case
        assert err["param"] == param, case
        assert err["message"], case
    resp = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "BadRequestError"
    assert "maximum context length is 2048 tokens" in httpx.post(
        server.base_url + "/v1/completions", json=BAD["too long for the model"][0]).json()["error"]["message"]
    assert httpx.post(server.base_url + "/v1/chat/completions", json={"messages": []}).status_code == 400
    long_chat = {"messages": [{"role": "user", "content": "x" * 4000}], "max_completion_tokens": 2000}
    assert httpx.post(server.base_url + "/v1/chat/completions", json=long_chat).json()["error"]["param"] == \
        "max_completion_tokens"
    assert server.engine.in_flight == 0  # nothing reached the engine


def test_chat_and_non_streaming_answers_have_openai_shapes_and_say_they_are_simulated(recorded: Any) -> None:
    server, rec = recorded(config(slow_replica(), speedup=50.0))
    url = server.base_url
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                         "text": "hello there"}]}]
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 5},
                      headers={"x-request-id": "c1"}).json()
    assert chat["object"] == "chat.completion" and chat["system_fingerprint"] == "simulated-Llama-3.1-8B@H100-80GB"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["finish_reason"] == "length"
    rendered = "<|system|>\nbe brief\n<|user|>\nhello there\n<|assistant|>\n"
    assert chat["usage"]["prompt_tokens"] == -(-len(rendered) // 4) == rec.timings["c1"].prompt_tokens
    assert chat["usage"]["completion_tokens"] == 5
    done = httpx.post(url + "/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 3}).json()
    assert done["object"] == "text_completion" and done["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": None}

    headers = [{"x-request-id": "s1"}]
    seen = asyncio.run(_chat_stream(url, {"messages": messages, "max_tokens": 7, "stream": True,
                                          "stream_options": {"include_usage": True}}, headers[0]))
    assert seen[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in seen)
    assert seen[-2]["choices"][0]["finish_reason"] == "length"
    assert seen[-1]["choices"] == [] and seen[-1]["usage"]["completion_tokens"] == 7
    models = httpx.get(url + "/v1/models").json()["data"][0]
    assert (models["id"], models["root"], models["max_model_len"], models["simulated"]) == (
        "sim", "Llama-3.1-8B", 2048, True)


async def _chat_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=60) as client:
        seen = await stream(client, url + "/v1/chat/completions", body, headers)
    return seen.lines


def test_a_client_that_goes_away_is_counted_as_aborted(recorded: Any) -> None:
    server, rec = recorded(config(slow_replica(), speedup=5.0))

    async def leave_after_first_token() -> None:
        async with httpx.AsyncClient(timeout=60) as client, client.stream(
                "POST", server.base_url + "/v1/completions",
                json={"prompt": [1] * 10, "max_tokens": 200, "stream": True}, headers={"x-request-id": "gone"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return

    asyncio.run(leave_after_first_token())
    deadline = time.monotonic() + 30  # the engine still runs it to its end (200 steps of ~5 ms, 5x faster)
    while "gone" not in rec.timings and time.monotonic() < deadline:
        time.sleep(0.05)
    reading = read_engine(parse(httpx.get(server.base_url + "/metrics").text))
    assert reading.counters["request_errors_total"] == 1 and reading.counters["request_success_total"] == 0


def test_vllm_argv_the_supervisor_builds_configures_the_simulated_replica() -> None:
    engine = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_dtype="fp8", quantization="fp8",
                          dtype="bfloat16", gpu_memory_utilization=0.85, tensor_parallel_size=2,
                          extra_args=("--enable-prefix-caching",))
    argv = ["--model", "/models/Llama-3.1-8B", "--served-model-name", "chat", "--host", "127.0.0.1", "--port", "8100",
            "--disable-uvicorn-access-log", "--otlp-traces-endpoint", "127.0.0.1:4317", *engine.vllm_args()]
    cfg = config_from_args(argv)
    prior = roofline(catalog.model("Llama-3.1-8B"), catalog.accelerator("H100-80GB"),
                     EngineArgs(max_num_seqs=64, max_num_batched_tokens=4096, gpu_memory_utilization=0.85,
                                tensor_parallel_size=2, weights=WeightPrecision.FP8, kv_cache=KvPrecision.FP8))
    r = cfg.replica
    assert (cfg.model, cfg.served_model_name, cfg.port, cfg.access_log) == ("Llama-3.1-8B", "chat", 8100, False)
    assert (r.max_num_seqs, r.max_num_batched_tokens, r.gpus, r.block_size) == (64, 4096, 2, 16)
    assert cfg.num_gpu_blocks == prior.memory.kv_capacity_tokens // 16 and r.num_kv_blocks == cfg.num_gpu_blocks - 1
    assert r.step_cost == prior.step_cost and cfg.otlp_traces_endpoint == "127.0.0.1:4317"
    bf16 = config_from_args(["--model", "Llama-3.1-8B", "-tp", "2", "--max-num-seqs", "64",
                             "--max-num-batched-tokens", "4096", "--gpu-memory-utilization", "0.85"])
    assert cfg.num_gpu_blocks > 2 * bf16.num_gpu_blocks  # fp8 KV halves each token; fp8 weights free memory too

    small = config_from_args(["--model", "Qwen/Qwen2.5-7B-Instruct", "--accelerator", "L4", "--num-gpu-blocks-override",
                              "100", "--step-coefficients", "0.004,2e-5,1e-7"])
    assert (small.num_gpu_blocks, small.replica.num_kv_blocks, small.replica.max_model_len) == (100, 99, 99 * 16)
    assert small.cache_info()["kv_cache_size_tokens"] == "1600"
    # vLLM's arithmetic: whole blocks per max-length request (1000 tokens take 63 blocks of 16).
    odd = config_from_args(["--model", "Llama-3.1-8B", "--num-gpu-blocks-override", "100", "--max-model-len", "1000"])
    assert (odd.cache_info()["kv_cache_max_concurrency"], odd.cache_info()["kv_cache_size_tokens"]) == (
        str(100 / 63), "1587")
    assert small.replica.step_cost == StepCost.linear(Coefficients(0.004, 2e-5, 1e-7))
    # Prefix caching is on unless turned off, as in vLLM V1, and the engine reports which.
    assert r.prefix_caching and small.replica.prefix_caching and small.cache_info()["enable_prefix_caching"] == "True"
    off = config_from_args(["--model", "Llama-3.1-8B", "--no-enable-prefix-caching"])
    assert not off.replica.prefix_caching and off.cache_info()["enable_prefix_caching"] == "False"


REFUSED = {
    "unknown accelerator": (["--accelerator", "TPU-v9"], "unknown accelerator 'TPU-v9'"),
    "unknown model": (["--model", "/models/gpt-5"], "unknown model '/models/gpt-5'"),
    "max_model_len over the KV cache": (["--num-gpu-blocks-override", "10", "--max-model-len", "200"],
                                        "max_model_len 200 exceeds the KV cache's 144 usable tokens"),
    "zero speedup": (["--speedup", "0"], "--speedup must be a finite number > 0, got 0.0"),
    "infinite speedup": (["--speedup", "inf"], "--speedup must be a finite number > 0, got inf"),
    "memory over 1": (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization is a fraction"),
    "zero max_model_len": (["--max-model-len", "0"], "--max-model-len must be >= 1, got 0"),
    "zero blocks": (["--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override must be >= 1, got 0"),
    "bad coefficients": (["--step-coefficients", "1,2"], "--step-coefficients '1,2'"),
    "budget below max_num_seqs": (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"],
                                  "max_num_batched_tokens (32) must be >= max_num_seqs (64)"),
}


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.replace(" ", "_"))
def test_flags_the_simulation_cannot_honour_are_refused_naming_the_flag(case: str) -> None:
    extra, message = REFUSED[case]
    argv = ["--model", "Llama-3.1-8B", *extra] if "--model" not in extra else extra
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(argv)


def test_flags_outside_the_simulation_fail_like_argparse_with_the_allowed_values(
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--model", "Llama-3.1-8B", "--pipeline-parallel-size", "2"],
                 ["--model", "Llama-3.1-8B", "--kv-cache-dtype", "int4"],
                 ["--model", "Llama-3.1-8B", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exc:
            config_from_args(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 2" in err and "fp8_e4m3" in err and "--no-such-flag" in err
    assert isinstance(SimConfigError("x"), ValueError)
    with pytest.raises(SimConfigError, match="no usable KV block"):
        replica_model(model="Llama-3.1-8B", accelerator="H100-80GB", num_gpu_blocks_override=1)


def test_the_module_runs_as_a_process_with_vllm_flags_and_streams_a_chat() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "controlplane.engines.sim_server", "--model", "meta-llama/Llama-3.1-8B-Instruct",
            "--served-model-name", "llama", "--port", str(port), "--speedup", "20", "--max-num-seqs", "64",
            "--disable-uvicorn-access-log", "--enable-prefix-caching"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not healthy within 60 s"
            time.sleep(0.2)
        lines = asyncio.run(_chat_stream(url, {"model": "llama", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3, "stream": True,
                                              "stream_options": {"include_usage": True}}, {}))
        assert lines[0]["choices"][0]["delta"]["role"] == "assistant"
        assert lines[-1]["usage"]["completion_tokens"] == 3
        assert all(c["system_fingerprint"] == "simulated-Llama-3.1-8B@H100-80GB" for c in lines)
        page = httpx.get(url + "/metrics").text
        assert f'{names.SIM_ENGINE_INFO}{{accelerator="H100-80GB",model="Llama-3.1-8B"}} 1.0' in page
        assert read_engine(parse(page)).counters["generation_tokens_total"] == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_health_turns_503_when_the_step_loop_has_died(monkeypatch: pytest.MonkeyPatch) -> None:
    server = SimServer(config(slow_replica(), speedup=50.0))

    def broken() -> float | None:
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(server.engine, "step", broken)
    server.start()
    try:
        resp = httpx.get(server.base_url + "/health")
        assert resp.status_code == 503 and "scheduler bug" in resp.json()["error"]["message"]
    finally:
        server.stop()


def test_a_stop_string_in_the_text_ends_the_request_there_as_vllm_does(recorded: Any) -> None:
    # The simulated text is " the replica token queue ...": "token" completes in the third token, and the text
    # is cut before it, with reason "stop" on the answer and on the engine's counters.
    server, rec = recorded(config(slow_replica(), speedup=50.0))
    url = server.base_url
    done = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stop": ["tok", "cache"]},
                      headers={"x-request-id": "stopped"}).json()
    choice = done["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (" the replica ", "stop", "tok")
    assert done["usage"]["completion_tokens"] == 3 == rec.timings["stopped"].completion_tokens
    never = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "stop": "\n\n"}).json()
    assert never["choices"][0]["finish_reason"] == "length" and never["usage"]["completion_tokens"] == 40
    later = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "stop": "serve the"}).json()
    assert later["usage"]["completion_tokens"] == 17 and later["choices"][0]["text"].endswith(" window ")
    # As vLLM checks after each token, the string that completes first wins, not the one that starts first.
    both = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 9,
                                                     "stop": ["the replica token", "replica"]}).json()["choices"][0]
    assert (both["text"], both["stop_reason"]) == (" the ", "replica")

    seen = asyncio.run(_chat_stream(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                                          "stop": "queue", "stream": True,
                                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                                    {"x-request-id": "streamed"}))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in seen if c["choices"])
    assert text == " the replica token " and seen[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" in c for c in seen)  # continuous usage: on every chunk, counting up
    assert seen[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert seen[0]["usage"]["completion_tokens"] == 0  # the role chunk carries no token
    assert [c["usage"]["completion_tokens"] for c in seen if c["choices"]][-1] == 4 == seen[-1]["usage"][
        "completion_tokens"]
    page = httpx.get(url + "/metrics").text
    assert 'finished_reason="stop",model_name="sim"} 4.0' in page
    assert read_engine(parse(page)).counters["request_success_total"] == 5


def test_spans_carry_the_sampling_parameters_as_vllm_resolves_them(recorded: Any) -> None:
    server, rec = recorded(config(slow_replica(), speedup=50.0))
    httpx.post(server.base_url + "/v1/completions", json={"prompt": "x" * 40, "max_tokens": 3},
               headers={"x-request-id": "given"})
    httpx.post(server.base_url + "/v1/chat/completions", headers={"x-request-id": "defaulted"},
               json={"messages": [{"role": "user", "content": [{"type": "text", "text": None}, {"text": "hi"}]}],
                     "max_tokens": None})
    given, defaulted = rec.finished_reqs["given"], rec.finished_reqs["defaulted"]
    assert (given.info.max_tokens_param, given.info.temperature, given.info.top_p) == (3, 1.0, 1.0)
    rendered = "<|user|>\nhi\n<|assistant|>\n"  # a null text part adds nothing (not the text "None")
    assert defaulted.prompt_tokens == -(-len(rendered) // 4)
    assert defaulted.info.max_tokens_param == 2048 - defaulted.prompt_tokens == \
        rec.timings["defaulted"].completion_tokens


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_non_streaming_client_that_goes_away_is_counted_as_aborted(recorded: Any) -> None:
    server, rec = recorded(config(slow_replica(), speedup=5.0))
    errors = _Kept()  # uvicorn's own logger (it does not propagate): a handler's traceback lands there
    logging.getLogger("uvicorn.error").addHandler(errors)
    with pytest.raises(httpx.ReadTimeout):  # 200 steps of ~5 ms, 5x faster: ~0.2 s; the client leaves at 0.05 s
        httpx.post(server.base_url + "/v1/completions", json={"prompt": [1] * 10, "max_tokens": 200},
                   headers={"x-request-id": "gone"}, timeout=0.05)
    deadline = time.monotonic() + 30  # the engine still runs it to its end
    while "gone" not in rec.timings and time.monotonic() < deadline:
        time.sleep(0.05)
    reading = read_engine(parse(httpx.get(server.base_url + "/metrics").text))
    assert reading.counters["request_errors_total"] == 1 and reading.counters["request_success_total"] == 0
    logging.getLogger("uvicorn.error").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]  # no handler traceback


def test_a_cancelled_non_streaming_handler_aborts_its_request_and_leaves_no_task() -> None:
    from controlplane.engines.sim_api import _finish_unless_gone
    from controlplane.engines.sim_engine import LiveRequest, RequestInfo

    class Connected:
        async def receive(self) -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never leaves
            return {}

    async def go() -> tuple[LiveRequest, list[asyncio.Task[Any]]]:
        req = LiveRequest(RequestInfo("x"), 0, 0.0, 10, 100)
        handler = asyncio.ensure_future(_finish_unless_gone(req, Connected()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        handler.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.sleep(0)
        return req, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    req, left = asyncio.run(go())
    assert req.aborted and left == []
