"""The demo's specs parse with the plane's own validators; the report's arithmetic and files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from controlplane.demo_loop import (
    LoopConfig,
    LoopResult,
    Sent,
    caught_up,
    deployment_doc,
    load_rates,
    slo_doc,
    write_specs,
)
from controlplane.loadgen import ClientResult
from controlplane.report import ReportInput, attainment, render, timeline, ttft_series
from controlplane.slo.spec import load_slos
from controlplane.store.repo import Store
from controlplane.supervisor.spec import parse_deployment


def test_the_demo_specs_are_valid_for_the_plane(tmp_path: Path) -> None:
    cfg = LoopConfig()
    dep = parse_deployment(deployment_doc(cfg, tmp_path, 8100))
    assert (dep.min_replicas, dep.max_replicas, dep.engine.max_num_seqs) == (1, 2, cfg.max_num_seqs)
    assert dep.price_per_replica_hour_usd == cfg.price_per_core_hour_usd
    # vLLM streams a chunk per 8 tokens: the two cores' Python processes carry an eighth of the chunks.
    assert dep.engine.extra_args == ("--stream-interval", "8")
    assert "--stream-interval" in dep.engine.vllm_args()
    assert parse_deployment(deployment_doc(LoopConfig(stream_interval=1), tmp_path, 8100)).engine.extra_args == ()
    [slo] = load_slos(write_specs(cfg, tmp_path, tmp_path, 8100)[1])
    assert slo.name == "tiny-ttft" and slo.objective == cfg.objective
    assert slo.targets[0].threshold_s == pytest.approx(cfg.ttft_threshold_s)
    [page] = slo.alerting.enabled_windows()
    assert (page.severity, page.long_s, page.short_s, page.burn_rate) == ("page", 120.0, 20.0, 2.0)
    assert slo_doc(cfg)["spec"]["alerting"]["ticket"] is False


def _req(arrival: float, ttft: float | None) -> dict[str, object]:
    return {"arrival_unix_s": arrival, "ttft_s": ttft}


def test_attainment_and_ttft_series() -> None:
    reqs = [_req(0.5, 0.1), _req(1.0, 0.9), _req(5.0, None), _req(12.0, 0.2), _req(25.0, 0.3)]
    assert attainment(reqs, 0.5, 0.0, 10.0) == (0.5, 2)  # the request without TTFT is unknown, not counted
    assert attainment(reqs, 0.5, 30.0, 40.0) == (None, 0)
    starts, q, counts = ttft_series(reqs, 0.0, 30.0, width_s=10.0)
    assert list(starts) == [0.0, 10.0, 20.0] and list(counts) == [2, 1, 1]
    assert q["p50"][0] == pytest.approx(0.5) and q["p99"][1] == pytest.approx(0.2)


def test_client_attainment_counts_only_answered_requests() -> None:
    ok = ClientResult("t", True, 1.0, 0.2, 1.0, 10)
    late = ClientResult("t", True, 1.0, 0.9, 1.0, 10)
    failed = ClientResult("t", False, 1.0, None, None, 0, "HTTP 503")
    r = LoopResult(0, 1, {"burst": (0, 1)}, [Sent("burst", ok), Sent("burst", late), Sent("burst", failed)],
                   None, None, None, None, [])
    assert r.client_attainment("burst", 0.5) == (0.5, 2)
    assert r.client_attainment("steady", 0.5) == (None, 0)


def test_render_writes_the_report_and_its_plots(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    reqs = [{"arrival_unix_s": t0 + i, "ttft_s": 0.05 if i < 60 else 2.0} for i in range(120)]
    samples = [{"replica": "tiny-0", "ts_unix_s": t0 + i, "scrape_ok": True, "kv_usage_ratio": 0.3,
                "num_waiting": 0.0} for i in range(0, 120, 2)]
    alerts = [{"severity": "page", "alertname": "SloBurnRatePage", "fired_unix_s": t0 + 90,
               "resolved_unix_s": None}]
    actions = [{"ts_unix_s": t0 + 80, "kind": "scale", "actor": "tuner", "reason": "recommendation_1"},
               {"ts_unix_s": t0 + 70, "kind": "autoscale_decision", "actor": "tuner", "reason": "hold_steady"}]
    recs = [{"id": 1, "kind": "scale", "status": "applied", "mode": "auto", "reason": "scale_up_slo_risk",
             "current": {"replicas": 1}, "proposed": {"replicas": 2}, "confidence": 0.9, "outcome": None,
             "evidence": {"observed": {"rate_rps": 20.0, "slo_good_ratio": 0.2, "finished": 100},
                          "capacity": {"source": "not calibrated yet"}, "cost": {}}}]
    inp = ReportInput("tiny", "tiny-ttft", 0.5, 0.9, t0, t0 + 120, {"steady": (t0, t0 + 60),
                                                                      "burst": (t0 + 60, t0 + 120)},
                      reqs, samples, None, alerts, actions, recs, {"steady": (1.0, 60), "burst": (0.0, 60)})
    events = timeline(inp)
    assert [e[2] for e in events] == ["tuner: scale (recommendation_1)", "page SloBurnRatePage fired"]
    path = render(inp, tmp_path)
    md = path.read_text()
    for png in ("ttft.png", "kv.png", "replicas.png", "timeline.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"]({png})" in md
    assert "| steady | +0 s | +60 s | 60 | 100.0% | 100.0% of 60 | unknown |" in md
    assert "| burst | +60 s | +120 s | 60 | 0.0% | 0.0% of 60 | unknown |" in md
    assert "no cost data" in md and "cost.png" not in md
    assert "outcome: not judged yet" in md
    assert "### Recommendation 1: scale, replicas 1 -> 2 (scale_up_slo_risk, auto, applied)" in md


def test_a_judged_recommendation_s_outcome_is_told_in_words(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    outcome = {"applying_since_unix_s": t0 + 80, "applied": {"replicas": 2}, "before": {"good": 30, "known": 120},
               "verdict": "kept", "after": {"good": 95.0, "known": 100}, "in_effect_unix_s": t0 + 100,
               "judged_unix_s": t0 + 160}
    recs = [{"id": 1, "kind": "scale", "status": "applied", "mode": "auto", "reason": "scale_up_slo_risk",
             "current": {"replicas": 1, "engine": {"max_num_seqs": 2}}, "proposed": {"replicas": 2},
             "confidence": 0.9, "outcome": outcome, "evidence": {}},
            {"id": 2, "kind": "reconfigure", "status": "rolled_back", "mode": "auto", "reason": "cheaper",
             "current": {"replicas": 2, "engine": {"max_num_seqs": 2, "max_num_batched_tokens": 2048}},
             "proposed": {"replicas": 1, "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 2048}},
             "confidence": 0.7, "outcome": None, "evidence": {}}]
    inp = ReportInput("tiny", "tiny-ttft", 0.5, 0.9, t0, t0 + 200, {"steady": (t0, t0 + 200)}, [], [], None, [],
                      [], recs, {})
    md = render(inp, tmp_path).read_text()
    assert ("outcome: kept; before: 25.0% within SLO of 120; after: 95.0% within SLO of 100; "
            "in effect +100 s (22:15:00 UTC); judged +160 s (22:16:00 UTC)") in md
    assert "{" not in md.split("outcome:")[1].splitlines()[0]  # no raw dict
    # Only what is proposed, nested settings by their own keys: never the context a scale-up keeps as it was.
    assert "### Recommendation 1: scale, replicas 1 -> 2 (scale_up_slo_risk, auto, applied)" in md
    assert "### Recommendation 2: reconfigure, engine.max_num_seqs 2 -> 16, replicas 2 -> 1 (cheaper" in md


def test_caught_up_needs_nearly_every_recent_request_back_and_within_the_slo() -> None:
    cfg = LoopConfig(ttft_threshold_s=0.5, objective=0.9)
    now = 1000.0

    def sent(n: int, ttft: float, start: float = now - 15.0) -> list[Sent]:
        return [Sent("catch-up", ClientResult("t", True, start + i * 10.0 / n, ttft, 1.0, 5)) for i in range(n)]

    assert caught_up(sent(100, 0.1), now, cfg, 10.0, [])
    assert not caught_up(sent(60, 0.1), now, cfg, 10.0, [])  # 40 of the 100 sent are still in flight
    assert not caught_up(sent(90, 0.1) + sent(15, 0.9), now, cfg, 10.0, [])  # 14% late > 10%
    assert not caught_up(sent(100, 0.1, start=now - 40.0), now, cfg, 10.0, [])  # nothing sent in the window


def test_load_rates_follow_the_probe_or_fall_back_to_the_configured_ones() -> None:
    cfg = LoopConfig(steady_rps=2.0, burst_rps=9.0, steady_factor=0.3, burst_factor=1.25)
    assert load_rates(cfg, 6.0) == (1.8, 7.5)
    assert load_rates(cfg, None) == (2.0, 9.0)
    assert load_rates(cfg, 0.0) == (2.0, 9.0)  # a probe that completed nothing measured nothing


def test_the_report_reads_every_engine_sample_of_a_run_longer_than_one_page(sqlite_store: Store) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from controlplane.api.app import create_app
    from controlplane.report import engine_samples

    a = sqlite_store.register_replica("a", url=None, backend="local")
    b = sqlite_store.register_replica("b", url=None, backend="local")
    for k in range(25):  # both replicas scraped at the same instants: pages end inside a timestamp
        for rid in (a, b):
            sqlite_store.write_engine_sample({"replica_id": rid, "ts_unix_s": 1000.0 + k, "scrape_ok": True,
                                              "num_waiting": float(k)})
    sqlite_store.write_engine_sample({"replica_id": a, "ts_unix_s": 2000.0, "scrape_ok": True})  # outside
    api = TestClient(create_app(sqlite_store, CollectorRegistry()))
    rows = engine_samples(api, 1000.0, 1025.0, page=7)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50
    assert [r["ts_unix_s"] for r in rows] == sorted(1000.0 + k for k in range(25) for _ in range(2))
    assert {r["replica"] for r in rows} == {"a", "b"}


def test_the_replicas_plot_steps_at_the_scrapes_own_times_not_at_bin_starts() -> None:
    from controlplane.report import serving_steps
    r0 = [{"ts_unix_s": 100.0 + 2 * k, "scrape_ok": True} for k in range(50)]  # 100 .. 198, serving throughout
    r1 = [{"ts_unix_s": 137.0 + 2 * k, "scrape_ok": True} for k in range(5)]  # first good scrape at +37 s
    r1 += [{"ts_unix_s": 170.0 + 2 * k, "scrape_ok": True} for k in range(5)]  # a gap of 25 s: down between
    times, level = serving_steps([r0, r1], 100.0, 200.0)
    at = dict(zip(times.tolist(), level.tolist(), strict=True))
    assert at[137.0] == 2.0 and at[145.0] == 1.0 and at[170.0] == 2.0 and at[178.0] == 1.0
    assert level[times < 137.0].max() == 1.0  # never 2 before the second replica's first good scrape


def test_a_failed_scrape_is_a_gap_in_the_kv_and_queue_lines_not_a_joined_reading() -> None:
    from controlplane.report import replica_series

    ok = {"scrape_ok": True, "kv_usage_ratio": 0.5, "num_waiting": 1.0}
    failed = {"scrape_ok": False, "kv_usage_ratio": None, "num_waiting": None}
    rows = [{**(failed if i in (2, 3, 4) else ok), "ts_unix_s": 100.0 + 5 * i} for i in range(7)][::-1]
    ts, kv, waiting = replica_series(rows)
    assert ts == [100.0 + 5 * i for i in range(7)]
    assert [math.isnan(v) for v in kv] == [False, False, True, True, True, False, False]
    assert [math.isnan(v) for v in waiting] == [False, False, True, True, True, False, False]


def test_a_replica_with_one_good_scrape_never_counts_below_zero() -> None:
    from controlplane.report import serving_steps

    _, values = serving_steps([[{"ts_unix_s": 10.0, "scrape_ok": True}]], 0.0, 60.0)
    assert min(values) == 0 and max(values) == 1


def test_unknown_cost_figures_and_observations_read_unknown_not_zero(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    cost = {"price_per_replica_hour_usd": 1.0, "points": [{"ts_unix_s": t0, "usd_per_1m_tokens": None}],
            "totals": {"replica_hours": None, "usd": None, "prompt_tokens": None, "completion_tokens": 10.0,
                       "usd_per_1m_tokens": 2.5}}
    recs = [{"id": 1, "kind": "scale", "status": "applied", "mode": "auto", "reason": "r",
             "current": {"replicas": 1}, "proposed": {"replicas": 2}, "confidence": 0.9, "outcome": None,
             "evidence": {"observed": {"rate_rps": None, "slo_good_ratio": None, "finished": 0.0,
                                       "ttft_p99_s": 0.0}}}]
    inp = ReportInput("tiny", "tiny-ttft", 0.5, 0.9, t0, t0 + 60, {"steady": (t0, t0 + 60)}, [], [], cost, [],
                      [], recs, {})
    md = render(inp, tmp_path).read_text()
    assert "unknown replica-hours, cost unknown (failed scrapes), unknown prompt + 10 completion tokens" in md
    # A measured 0 stays 0; a missing figure is unknown (it printed "None" and, for 0, the 0 itself by luck).
    assert "- observed: unknown req/s, good ratio unknown of 0 finished, TTFT p99 0.000 s" in md
    assert "on an engine not stated" in md


@pytest.mark.parametrize(("verdict", "says"), [
    ((False, ["no page fired", "only 3 requests answered after the backlog drained"]),
     "**Outcome: the story did not complete.** no page fired; only 3 requests answered after the backlog drained."),
    ((True, []), "**Outcome: the plane paged, the tuner added a replica, and attainment recovered.**")])
def test_the_report_says_first_whether_the_story_happened(tmp_path: Path, verdict: tuple[bool, list[str]],
                                                         says: str) -> None:
    t0 = 1_700_000_000.0
    inp = ReportInput("tiny", "tiny-ttft", 0.5, 0.9, t0, t0 + 60, {"steady": (t0, t0 + 60)}, [], [], None, [],
                      [], [], {}, verdict=verdict)
    md = render(inp, tmp_path).read_text()
    assert says in md and md.index(says) < md.index("## SLO attainment by phase")
