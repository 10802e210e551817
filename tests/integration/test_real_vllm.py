"""Proof on the real engine: vLLM (CPU, tiny model) -> OTLP/gRPC + /metrics -> the plane -> the store."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from controlplane.loadgen import ClientResult, RequestPlan, mixed_plans, run_load
from controlplane.stats import percentile
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, RealVllm

pytestmark = pytest.mark.vllm

AGREE_SHARE = 0.75  # of a round's requests whose stored TTFT is the client's, less the client's own path
# The client's own path (HTTP, JSON, SSE on a core it shares with vLLM's API server): 4-5 ms per request in the
# runs of 2026-12-07. Bounded, so a store whose TTFTs all leave out a phase of tens of ms still fails.
CLIENT_PATH_MAX_S = 0.010
PHASES = ("queue_s", "prefill_s", "decode_s", "inference_s", "ttft_s", "e2e_s", "tpot_s")


def _stored(api: str, trace_ids: set[str], since: float, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """Poll the REST API until every trace id is stored (spans are batched by vLLM's exporter)."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        items = httpx.get(api + "/api/v1/requests", params={"since": since, "limit": 10_000}).json()["items"]
        found = {r["trace_id"]: r for r in items if r["trace_id"] in trace_ids}
        if len(found) == len(trace_ids):
            break
        time.sleep(0.5)
    return found


def _samples(api: str, since: float, replica: str) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"since": since, "replica": replica, "limit": 10_000}
    return list(reversed(httpx.get(api + "/api/v1/engine-samples", params=params).json()["items"]))


def _round(real_vllm: RealVllm, seed: int) -> str | None:
    """One round of 60 streamed requests. Storage is asserted strictly; returns why the TTFT
    percentiles disagree, or None when they agree."""
    since = time.time() - 1
    # Open-loop arrivals at 2 req/s, one stream at a time, so the host idles between requests. On this
    # 2-vCPU machine vLLM pins its compute to one core; its API server, this client and the plane share
    # the other, and under sustained load the API server's deliveries stall by 50-200 ms, which the
    # client sees and vLLM's own TTFT (taken in the engine) does not: that would test the host, not the
    # store. Prompts are token ids: vLLM stamps arrival after parsing and tokenising the prompt, so
    # its TTFT leaves that out by definition (a few ms, growing with the prompt); see the README.
    plans = mixed_plans(60, seed=seed, prompt_words=(16, 300), max_tokens=(2, 24), rate_per_s=2.0,
                        token_ids=(10, 2000))
    results: list[ClientResult] = asyncio.run(run_load(real_vllm.base_url, real_vllm.model, plans, 1))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]

    stored = _stored(real_vllm.plane.api, {r.trace_id for r in results}, since)
    assert len(stored) == len(results), f"{len(results) - len(stored)} requests missing from the store"
    for row in stored.values():
        missing = [p for p in PHASES if row[p] is None]
        assert not missing, f"request {row['request_id']} lacks {missing}"
        assert row["replica"] == real_vllm.replica
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] >= 2
    by_trace = {r.trace_id: r for r in results}
    assert all(stored[t]["completion_tokens"] == by_trace[t].completion_tokens for t in stored)

    client = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    server = sorted(row["ttft_s"] for row in stored.values())
    # What the client adds on its own path (HTTP, JSON, SSE on a shared core), same run: ~4 ms here.
    offset = percentile(sorted(r.ttft_s - stored[r.trace_id]["ttft_s"] for r in results), 50)
    c50, s50 = percentile(client, 50), percentile(server, 50)
    c95, s95 = percentile(client, 95), percentile(server, 95)
    # Request by request, less that constant offset: the stored TTFT is the client's within 10 % (or 5 ms). A
    # request the host stalled on the client's side misses this, so a share is required, not all (78 % and 88 %
    # in two rounds on 2026-12-07, when the p95s differed by 20-30 ms); a store that held wrong TTFTs (another
    # phase's, clipped tails) misses it for most. Another request's TTFT is caught by the token counts above.
    agree = sum(abs(r.ttft_s - stored[r.trace_id]["ttft_s"] - offset) <= max(0.10 * r.ttft_s, 0.005)
                for r in results if r.ttft_s is not None) / len(results)
    line = (f"TTFT p50 client {c50 * 1e3:.1f} ms store {s50 * 1e3:.1f} ms; p95 client {c95 * 1e3:.1f} ms "
            f"store {s95 * 1e3:.1f} ms; per-request offset p50 {offset * 1e3:.1f} ms; {agree:.0%} of requests "
            "agree")
    print(line)
    # The medians agree once the client's own path is taken off: comparing them raw held that path (~5 ms)
    # against a 5 ms floor, and failed on runs where it took 5.2 ms.
    p50_ok = 0.0 <= offset <= CLIENT_PATH_MAX_S and abs(c50 - s50 - offset) <= max(0.10 * c50, 0.005)
    return None if p50_ok and agree >= AGREE_SHARE else line


def test_every_streamed_request_is_stored_with_all_phases_and_ttft_matches_the_client(
    real_vllm: RealVllm,
) -> None:
    # Host stalls on this shared 2-vCPU machine come in bursts; one round in three clear enough of them is
    # enough to compare. A store holding wrong TTFTs disagrees in every round, and every round checks
    # that each request is stored with all its phases.
    disagreements = []
    for seed in (11, 12, 13):
        why = _round(real_vllm, seed)
        if why is None:
            return
        disagreements.append(why)
    raise AssertionError("client and store TTFT disagreed in every round:\n" + "\n".join(disagreements))


def test_kv_usage_capacity_running_and_waiting_are_stored(real_vllm: RealVllm) -> None:
    since = time.time()
    asyncio.run(run_load(real_vllm.base_url, real_vllm.model, mixed_plans(6, seed=2), 3))
    time.sleep(5.5)  # at least one scrape after the load (5 s interval)
    ok = [s for s in _samples(real_vllm.plane.api, since, real_vllm.replica) if s["scrape_ok"]]
    assert ok, "no successful scrape stored"
    last = ok[-1]
    assert last["kv_capacity_tokens"] == KV_BLOCKS * BLOCK_SIZE
    assert last["kv_block_size_tokens"] == BLOCK_SIZE
    for key in ("kv_usage_ratio", "num_running", "num_waiting", "preemptions_total", "prompt_tokens_total",
                "generation_tokens_total", "request_success_total"):
        assert last[key] is not None, key
    assert last["prompt_tokens_total"] > 0


def test_a_shrunk_kv_cache_shows_saturation_in_the_stored_samples(real_vllm: RealVllm) -> None:
    """Many short prompts with long outputs: all are admitted, then decoding outgrows the cache."""
    since = time.time()
    words = " ".join(["queue"] * 100)
    plans = [RequestPlan(words, 320) for _ in range(120)]
    # The plane scrapes every 5 s. Under this load usage swings between ~0.7 and 1.0: vLLM V1 fills the
    # cache, then preempts a request (freeing its blocks) the moment a running one needs a block it
    # cannot get. A preemption is therefore itself proof that the cache was full. (Scrapes that land
    # in the busiest moments often see low usage or time out: peak usage alone proved flaky.) Load
    # again (at most three times) until the stored samples show either.
    ok: list[dict[str, Any]] = []
    for _ in range(3):
        t0 = time.monotonic()
        results = asyncio.run(run_load(real_vllm.base_url, real_vllm.model, plans, 40))
        print(f"saturating load took {time.monotonic() - t0:.1f} s")
        # No stream may be lost. Under this load vLLM's API server falls seconds behind; with vLLM's default 5 s
        # keep-alive it closed a connection just as the client reused it: 1-2 streams of 120 lost (a ReadError
        # before any response) in 5 of 24 loads. The replicas the plane starts keep idle connections for 60 s
        # (vllm_server.KEEPALIVE_S): none lost in 14 loads, then 1 in a full run. The client now sends a request
        # that got no response at all again, once, as the OpenAI SDK does (loadgen.RESENT_ERRORS).
        print(f"sent again after a connection lost before any response: {sum(r.resent for r in results)}")
        failed = [r.error for r in results if not r.ok]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
        time.sleep(5.5)
        ok = [s for s in _samples(real_vllm.plane.api, since, real_vllm.replica) if s["scrape_ok"]]
        if len(ok) >= 2 and (max(s["kv_usage_ratio"] for s in ok) >= 0.9
                             or ok[-1]["preemptions_total"] > ok[0]["preemptions_total"]):
            break
    assert len(ok) >= 3
    peak_usage = max(s["kv_usage_ratio"] for s in ok)
    peak_waiting = max(s["num_waiting"] for s in ok)
    preempted = ok[-1]["preemptions_total"] - ok[0]["preemptions_total"]
    print(f"peak KV usage {peak_usage:.2f}, peak waiting {peak_waiting}, preemptions {preempted}")
    assert peak_usage >= 0.9 or preempted > 0, f"no sign of a full cache: peak usage {peak_usage:.2f}, no preemption"
    assert peak_waiting > 0 or preempted > 0, "saturated cache but nothing waited or was preempted"


def test_the_scraper_records_when_the_replica_was_not_yet_up(real_vllm: RealVllm) -> None:
    """The plane watched the port before vLLM listened: those scrapes are unknown, not zero."""
    deadline = time.monotonic() + 15  # at least one scrape (5 s interval) after vLLM came up
    while not any(s["scrape_ok"] for s in _samples(real_vllm.plane.api, 0, real_vllm.replica)):
        assert time.monotonic() < deadline, "no successful scrape of the ready replica"
        time.sleep(0.5)
    samples = _samples(real_vllm.plane.api, 0, real_vllm.replica)
    failed = [s for s in samples if not s["scrape_ok"]]
    assert failed and all(s["kv_usage_ratio"] is None and s["num_running"] is None for s in failed)
    events = httpx.get(real_vllm.plane.api + "/api/v1/events").json()["items"]
    kinds = {e["kind"] for e in events}
    assert {"scrape_failed", "scrape_recovered"} <= kinds


def test_vllm_startup_spans_are_stored_as_lifecycle_events_of_the_replica(real_vllm: RealVllm) -> None:
    events = httpx.get(real_vllm.plane.api + "/api/v1/events", params={"limit": 10_000}).json()["items"]
    startup = {e["kind"]: e for e in events if e["kind"].startswith("span:")}
    assert "span:Load weights" in startup and "span:Allocate KV cache" in startup, sorted(startup)
    assert all(e["replica"] == real_vllm.replica and e["actor"] == "engine" for e in startup.values())
    assert startup["span:Allocate KV cache"]["duration_s"] > 0
