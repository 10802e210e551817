"""The closed loop's backlog check (`caught_up`, with what is still in flight; its window rules are tested in
test_demo_report.py), and the load's own record of what is in flight, against a local streaming server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from controlplane.demo_loop import LoopConfig, OpenLoopLoad, Sent, caught_up, raise_burst
from controlplane.loadgen import ClientResult

CFG = LoopConfig(ttft_threshold_s=0.5, objective=0.9)
NOW = 1_000.0


def served(sent_at: list[float], ttft_s: float = 0.05) -> list[Sent]:
    return [Sent("catch-up", ClientResult(f"t{i}", True, t, ttft_s, ttft_s + 0.2, 16)) for i, t in
            enumerate(sent_at)]


def window(rate_rps: float = 10.0, start: float = NOW - 15.0, end: float = NOW - 5.0) -> list[float]:
    n = int((end - start) * rate_rps)
    return [start + (end - start) * i / n for i in range(n)]


def test_a_window_served_in_time_with_nothing_older_in_flight_is_caught_up() -> None:
    assert caught_up(served(window()), NOW, CFG, 10.0, in_flight_sent=[NOW - 1.0, NOW - 0.5])


def test_new_requests_served_in_time_are_not_enough_while_old_ones_are_still_queued() -> None:
    # The CI run's case: the new replica answers every new request in time while the old one still drains
    # 40 requests sent before the window.
    backlog = [NOW - 40.0 + i * 0.5 for i in range(40)]
    assert not caught_up(served(window()), NOW, CFG, 10.0, in_flight_sent=backlog)


def test_a_few_stragglers_do_not_hold_the_story() -> None:
    # 5% of the window's 100 requests: a request stuck on a slow connection is not a backlog.
    assert caught_up(served(window()), NOW, CFG, 10.0, in_flight_sent=[NOW - 60.0] * 5)
    assert not caught_up(served(window()), NOW, CFG, 10.0, in_flight_sent=[NOW - 60.0] * 6)


def test_a_burst_one_replica_carries_within_the_slo_is_raised_until_it_breaks() -> None:
    since = NOW - CFG.raise_after_s
    carried = served(window(10.0, since, NOW - 5.0))
    assert raise_burst(carried, NOW, CFG, 10.0, since) == 10.5
    assert raise_burst(carried, NOW - 1.0, CFG, 10.0, since) == 10.0  # not carried for raise_after_s yet
    assert raise_burst(served(window(10.0, since, NOW - 5.0), ttft_s=0.8), NOW, CFG, 10.0, since) == 10.0
    assert raise_burst(carried[: len(carried) * 8 // 10], NOW, CFG, 10.0, since) == 10.0  # answers missing
    assert raise_burst([], NOW, CFG, 10.0, since) == 10.0


def test_the_load_knows_when_each_request_in_flight_was_sent() -> None:
    pytest.importorskip("uvicorn")
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    release = threading.Event()
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            while not release.is_set():
                await asyncio.sleep(0.02)
            yield 'data: {"choices": [{"text": "a"}]}\n\n'
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10.0
    while not server.started:
        assert time.time() < deadline, "the local streaming server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    load = OpenLoopLoad(f"http://127.0.0.1:{port}", "m", LoopConfig(seed=3))
    try:
        before = time.time()
        load.start()
        load.set("burst", 50.0)
        deadline = time.time() + 10.0
        while load.in_flight < 5 and time.time() < deadline:
            time.sleep(0.02)
        load.set("idle", 0.0)
        time.sleep(0.5)  # the arrival already drawn (at most a fraction of a second away at 50/s) goes out
        sent = load.in_flight_sent()
        assert len(sent) >= 5 and len(sent) == load.in_flight and not load.results
        assert all(before <= t <= time.time() for t in sent)
        release.set()
        deadline = time.time() + 10.0
        while load.in_flight and time.time() < deadline:
            time.sleep(0.02)
        assert load.in_flight_sent() == [] and len(load.results) == len(sent)
        assert all(s.result.ok for s in load.results)
    finally:
        release.set()
        load.stop(10.0)
        server.should_exit = True
        thread.join(10.0)


def test_waiting_for_replicas_stops_at_once_on_one_the_supervisor_gave_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane import demo_loop
    seen: list[str] = []
    answers = iter([{"tiny-0": "starting"}, {"tiny-0": "crashed"}, {"tiny-0": "crashloop"}])
    monkeypatch.setattr(demo_loop, "_replica_states", lambda api, deployment: next(answers))
    monkeypatch.setattr(demo_loop.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="tiny-0 is crashloop"):
        demo_loop.wait_ready("http://127.0.0.1:9", "tiny", 1, 420.0, seen.append)
    assert seen[-1].endswith("(tiny-0 crashed)")  # the progress line says what each replica is doing


def test_a_story_that_ran_out_of_time_is_not_reported_as_complete() -> None:
    from io import StringIO

    from rich.console import Console

    from controlplane.demo import _summarise
    from controlplane.demo_loop import LoopResult

    cfg = LoopConfig()
    good = [Sent("recovered", ClientResult(f"t{i}", True, 100.0 + i, 0.1, 0.5, 8)) for i in range(50)]

    def result(notes: list[str]) -> LoopResult:
        return LoopResult(0.0, 100.0, {"steady": (0.0, 30.0), "burst": (30.0, 60.0), "recovered": (95.0, 100.0)},
                          good, 40.0, 45.0, 60.0, None, notes)

    out = StringIO()
    assert _summarise(Console(file=out, width=200), cfg, result([])) == 0 and "✓" in out.getvalue()
    out = StringIO()
    late = result([f"the story did not complete within {cfg.max_s:.0f} s"])
    assert _summarise(Console(file=out, width=200), cfg, late) == 1
    assert "✓" not in out.getvalue() and "did not complete" in out.getvalue()


def test_an_api_answer_that_is_not_a_json_object_is_unknown_not_a_crash() -> None:
    import httpx

    from controlplane.demo_loop import _alert_fired

    for body in (b"<html>proxy error</html>", b"[1, 2]"):
        api = httpx.Client(base_url="http://plane", transport=httpx.MockTransport(
            lambda request, body=body: httpx.Response(200, content=body)))
        assert _alert_fired(api, "tiny-ttft") is None


def test_recovery_is_judged_on_enough_answered_requests_and_failures_in_its_own_phase() -> None:
    from controlplane.demo import verdict
    from controlplane.demo_loop import LoopResult

    cfg = LoopConfig(ttft_threshold_s=0.5, objective=0.9)
    before = [Sent("burst", ClientResult(f"b{i}", True, float(i), 0.1, 0.5, 8)) for i in range(3000)]

    def result(recovered: list[Sent], span_s: float = 60.0) -> LoopResult:
        return LoopResult(0.0, 4000.0, {"burst": (0.0, 3000.0), "recovered": (3000.0, 3000.0 + span_s)},
                          before + recovered, 100.0, 200.0, 300.0, None, [], burst_rps=9.0)

    def answered(n: int) -> list[Sent]:
        return [Sent("recovered", ClientResult(f"r{i}", True, 3000.0 + i * 0.1, 0.1, 0.5, 8)) for i in range(n)]

    failed = [Sent("recovered", ClientResult(f"f{i}", False, 3000.0, None, None, 0, "HTTP 503")) for i in range(25)]
    # 10 answered and 25 failed after the backlog drained: under 1 % of all 3,035 sent, yet it proves nothing.
    ok, why = verdict(cfg, result(answered(10) + failed))
    assert not ok and any("only 10 requests answered" in w for w in why)
    assert any("25 of 35 requests failed after the backlog drained" in w for w in why)
    ok, why = verdict(cfg, result(answered(1), span_s=190.0))  # one request in a 190 s phase at 9 req/s
    assert not ok and any("only 1 requests answered" in w for w in why)
    assert verdict(cfg, result(answered(400))) == (True, [])  # 400 of the ~540 the burst rate sends in 60 s
