import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from collectors.scrape_loop import FORGET_AFTER_S, EngineScraper, Target
from controlplane.store.repo import Store

FIXTURE = (Path(__file__).resolve().parents[2] / "fixtures" / "vllm_0.32_metrics.txt").read_text()


class FakeEngine:
    """Serves /metrics from a script of responses: text, an HTTP status, or a connection error."""

    def __init__(self, script: list[str | int | Exception]) -> None:
        self.script = list(script)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        if isinstance(item, int):
            return httpx.Response(item, text="oops")
        return httpx.Response(200, text=item)


def _scrape(store: Store, script: list[str | int | Exception], n: int) -> list[dict]:  # type: ignore[type-arg]
    async def go() -> list[dict]:  # type: ignore[type-arg]
        async with httpx.AsyncClient(transport=httpx.MockTransport(FakeEngine(script))) as client:
            scraper = EngineScraper(store, client, timeout_s=1)
            target = Target.from_watch("r0=http://127.0.0.1:9")
            scraper.add(target)
            return [await scraper.scrape_once(target) for _ in range(n)]
    return asyncio.run(go())


def _with_counter(value: float) -> str:
    return FIXTURE.replace('vllm:prompt_tokens_total{engine="0",model_name="tiny"} 15.0',
                           f'vllm:prompt_tokens_total{{engine="0",model_name="tiny"}} {value}')


def test_a_good_scrape_stores_kv_usage_capacity_and_queue(sqlite_store: Store) -> None:
    _scrape(sqlite_store, [FIXTURE], 1)
    (row,) = sqlite_store.engine_samples()
    assert row["scrape_ok"] and row["kv_capacity_tokens"] == 1_048_576 and row["kv_usage_ratio"] == 0.0
    assert row["num_running"] == 0.0 and row["prompt_tokens_total"] == 15.0 and row["replica"] == "r0"


@pytest.mark.parametrize("failure", [503, httpx.ConnectError("refused"), "this is { not exposition"])
def test_a_failed_scrape_is_stored_as_unknown_never_zero(sqlite_store: Store, failure: object) -> None:
    _scrape(sqlite_store, [failure], 1)  # type: ignore[list-item]
    (row,) = sqlite_store.engine_samples()
    assert row["scrape_ok"] is False and row["error"]
    readings = ("kv_usage_ratio", "kv_capacity_tokens", "num_running", "num_waiting", "preemptions_total",
                "prompt_tokens_total", "generation_tokens_total")
    assert all(row[k] is None for k in readings)


def test_failing_and_recovering_are_recorded_once_each(sqlite_store: Store) -> None:
    _scrape(sqlite_store, [FIXTURE, 503, 503, 503, FIXTURE, FIXTURE], 6)
    kinds = [e["kind"] for e in reversed(sqlite_store.events())]
    assert kinds == ["scrape_failed", "scrape_recovered"]
    assert [s["scrape_ok"] for s in reversed(sqlite_store.engine_samples())] == [True, False, False, False,
                                                                               True, True]


def test_an_engine_restart_keeps_stored_counters_monotonic(sqlite_store: Store) -> None:
    _scrape(sqlite_store, [_with_counter(100), _with_counter(140), _with_counter(3)], 3)
    rows = list(reversed(sqlite_store.engine_samples()))
    assert [r["prompt_tokens_total"] for r in rows] == [100, 140, 143]
    assert [r["counter_reset"] for r in rows] == [False, False, True]


@pytest.mark.parametrize("spec", ["localhost:8000", "ftp://x", "name=", "http://"])
def test_a_bad_watch_target_is_refused_with_an_example(spec: str) -> None:
    with pytest.raises(ValueError, match="expected an http"):
        Target.from_watch(spec)


def test_a_bare_watch_url_names_the_replica_by_host_and_port() -> None:
    assert Target.from_watch("http://10.0.0.5:8000").name == "10.0.0.5:8000"
    assert Target.from_watch("http://10.0.0.5:8000/?a=b").name == "10.0.0.5:8000"  # "=" in the URL: no name


@pytest.mark.parametrize("spec", ["=http://x:1", " =http://x:1"])
def test_an_empty_watch_name_is_refused_not_replaced_by_the_host(spec: str) -> None:
    with pytest.raises(ValueError, match="the replica name before '=' is empty"):
        Target.from_watch(spec)
    assert Target.from_watch("gpu-a=http://10.0.0.5:8000/").metrics_url == "http://10.0.0.5:8000/metrics"


def test_a_store_error_loses_one_sample_and_scraping_goes_on(sqlite_store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import OperationalError

    real = sqlite_store.write_engine_sample
    calls = {"n": 0}

    def flaky(row):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        real(row)

    monkeypatch.setattr(sqlite_store, "write_engine_sample", flaky)
    _scrape(sqlite_store, [FIXTURE], 3)
    assert len(sqlite_store.engine_samples()) == 2


def test_one_engine_of_two_restarting_does_not_inflate_the_total(sqlite_store: Store) -> None:
    def two(a: float, b: float) -> str:
        return ("# TYPE vllm:prompt_tokens counter\n"
                f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {a}\n'
                f'vllm:prompt_tokens_total{{engine="1",model_name="m"}} {b}\n')
    _scrape(sqlite_store, [two(100, 100), two(100, 0), two(110, 5)], 3)
    totals = [r["prompt_tokens_total"] for r in reversed(sqlite_store.engine_samples())]
    assert totals == [200, 200, 215]


def test_scrapes_ask_for_an_uncompressed_exposition() -> None:
    # A gzip-accepting scrape makes the replica's API server compress /metrics on its serving path.
    from collectors.promtext import scrape

    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers.get("accept-encoding", ""))
        return httpx.Response(200, text="vllm:num_requests_running 1\n")

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            result = await scrape(client, "http://replica/metrics", 5.0)
            assert result.ok

    asyncio.run(go())
    assert seen == ["identity"]


def test_a_target_trickling_its_answer_times_out_in_total_and_never_holds_up_the_others(sqlite_store: Store) -> None:
    body = b'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0",model_name="m"} 1\n'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dribble: bool) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for b in body:  # each byte well within the per-read timeout, the whole far past the scrape timeout
                if dribble:
                    await asyncio.sleep(0.05)
                writer.write(bytes([b]))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def go() -> None:
        fast = await asyncio.start_server(lambda r, w: serve(r, w, False), "127.0.0.1", 0)
        slow = await asyncio.start_server(lambda r, w: serve(r, w, True), "127.0.0.1", 0)
        async with fast, slow, httpx.AsyncClient() as client:
            scraper = EngineScraper(sqlite_store, client, timeout_s=0.3)
            for name, srv in (("fast", fast), ("slow", slow)):
                scraper.add(Target(name, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"))
            stop = asyncio.Event()
            task = asyncio.create_task(scraper.run(stop, interval_s=0.1))
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.wait_for(task, 5)

    asyncio.run(go())
    fast_rows, slow_rows = sqlite_store.engine_samples(replica="fast"), sqlite_store.engine_samples(replica="slow")
    assert len(fast_rows) >= 8 and all(r["scrape_ok"] for r in fast_rows)  # ~15 rounds of 0.1 s
    assert slow_rows and all(not r["scrape_ok"] and "no complete answer in 0.3 s" in r["error"] for r in slow_rows)
    assert all(r["scrape_duration_s"] < 0.6 for r in slow_rows)


def test_finished_requests_without_an_error_series_store_zero_errors_not_unknown(sqlite_store: Store) -> None:
    text = ("# TYPE vllm:request_success counter\n"
            'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0\n'
            'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0\n')
    _scrape(sqlite_store, [text], 1)
    (row,) = sqlite_store.engine_samples()
    assert row["request_success_total"] == 10.0 and row["request_errors_total"] == 0.0


def test_a_replica_restarted_under_its_name_keeps_its_stored_counters_monotonic(sqlite_store: Store) -> None:
    # The supervisor removes a crashed replica from the scraper and adds it back, same name, once it is ready.
    script = [_with_counter(100), _with_counter(140), _with_counter(3)]

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(FakeEngine(script))) as client:
            scraper = EngineScraper(sqlite_store, client, timeout_s=1)
            target = Target.from_watch("r0=http://127.0.0.1:9")
            scraper.add(target)
            await scraper.scrape_once(target)
            await scraper.scrape_once(target)
            scraper.remove("r0")
            scraper.add(target)
            await scraper.scrape_once(target)

    asyncio.run(go())
    assert [r["prompt_tokens_total"] for r in reversed(sqlite_store.engine_samples())] == [100, 140, 143]


def test_a_removed_replica_is_forgotten_after_an_hour_its_series_with_it(sqlite_store: Store) -> None:
    # Replica names are not reused, so every replica ever scraped would otherwise stay in memory and on
    # the plane's /metrics. Within the hour it comes back with its counters carried on (test above).
    now = [0.0]
    registry = CollectorRegistry()

    async def go() -> EngineScraper:
        async with httpx.AsyncClient(transport=httpx.MockTransport(FakeEngine([FIXTURE]))) as client:
            scraper = EngineScraper(sqlite_store, client, timeout_s=1, registry=registry, clock=lambda: now[0])
            for i in range(3):
                target = Target.from_watch(f"r{i}=http://127.0.0.1:9")
                scraper.add(target)
                await scraper.scrape_once(target)
            scraper.remove("r0")
            now[0] = FORGET_AFTER_S - 1
            scraper.remove("r1")
            assert set(scraper._state) == {"r0", "r1", "r2"}
            now[0] = FORGET_AFTER_S
            scraper.remove("no-such-replica")  # any later add or remove tidies up
            return scraper

    scraper = asyncio.run(go())
    assert set(scraper._state) == {"r1", "r2"}
    exposed = generate_latest(registry).decode()
    assert 'replica="r0"' not in exposed and 'replica="r1"' in exposed and 'replica="r2"' in exposed


def test_an_exposition_past_the_size_limit_is_a_failed_scrape_not_read_whole(sqlite_store: Store,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from collectors import promtext
    monkeypatch.setattr(promtext, "MAX_EXPOSITION_BYTES", 1000)
    (row,) = _scrape(sqlite_store, ["# comment\n" * 200], 1)
    assert row["scrape_ok"] is False and "larger than 1000 bytes" in row["error"]
