"""Configuration search of a running deployment: space, canary trial load and verdict, the recommendation, and the
whole path from rows in a real store to a stored `reconfigure` recommendation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from controlplane.api.app import create_app
from controlplane.loadgen import ClientResult
from controlplane.slo.model import LatencyTarget, Slo, SloWindow
from controlplane.store.repo import Store
from controlplane.supervisor.spec import EngineConfig, TuningSection, parse_deployment
from controlplane.tuning import config_search as cs
from controlplane.tuning.capacity import Objective, Prediction
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost
from controlplane.tuning.recommendations import Recommendations
from controlplane.tuning.search import CanaryVerdict
from controlplane.tuning.search_space import Cell
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Poisson, Uniform, Workload, synthetic
from tests.unit.tuning.recorded import store_replica_run

BASE = 1_700_000_000.0
TTFT = Objective("ttft", (LatencyTarget("ttft", 0.2),), 0.9)
GOODPUT = Objective("good", (LatencyTarget("ttft", 0.2), LatencyTarget("tpot", 0.05)), 0.9)


def result(ttft: float | None, e2e: float | None, tokens: int = 11, ok: bool = True) -> ClientResult:
    return ClientResult("t", ok, 0.0, ttft, e2e, tokens)


def test_the_default_space_brackets_the_current_limits_and_the_spec_can_name_its_own() -> None:
    space = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512), TuningSection())
    assert space.max_num_seqs == (2, 4, 8, 16) and space.max_num_batched_tokens == (256, 512, 1024)
    own = cs.space_for(EngineConfig(max_num_seqs=8, max_num_batched_tokens=512),
                       TuningSection(max_num_seqs=(32, 64), max_num_batched_tokens=(2048,)))
    assert own.max_num_seqs == (8, 32, 64) and own.max_num_batched_tokens == (512, 2048)  # current kept to compare
    with pytest.raises(cs.SearchInputError, match="max_num_seqs and max_num_batched_tokens must be set"):
        cs.space_for(EngineConfig(max_num_seqs=8), TuningSection())
    with pytest.raises(ValueError, match="distinct whole numbers >= 1"):
        TuningSection(max_num_seqs=(4, 4))


def test_trial_plans_follow_the_recorded_lengths_at_the_asked_rate_and_fit_the_model() -> None:
    wl = Workload(np.arange(4, dtype=np.float64), np.array([10, 20, 3000, 40]), np.array([5, 6, 7, 900]))
    plans = cs.trial_plans(wl, 20.0, 2000, seed=1, max_model_len=1024)
    starts = np.array([p.delay_s for p in plans])
    assert starts[0] == 0 and np.all(np.diff(starts) >= 0)
    assert (len(plans) - 1) / starts[-1] == pytest.approx(20.0, rel=0.08)
    assert all(len(p.prompt) + p.max_tokens < 1024 for p in plans)
    assert {len(p.prompt) for p in plans} >= {10, 20, 40} and {p.max_tokens for p in plans} >= {5, 6, 7, 512}
    assert all(isinstance(p.prompt, list) and min(p.prompt) >= cs.TRIAL_VOCAB[0]
               and max(p.prompt) < cs.TRIAL_VOCAB[1] for p in plans[:20])
    with pytest.raises(cs.SearchInputError, match="no request"):
        cs.trial_plans(Workload(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)), 1.0, 5, 0,
                       max_model_len=None)


def test_a_strict_objective_needs_as_many_results_as_its_budget_allows_one_bad_request_in() -> None:
    strict = Objective("ttft", (LatencyTarget("ttft", 0.2),), 0.999)
    assert cs.judge([result(0.05, 0.3)] * 20, [strict], min_requests=20).passed is None  # 20 say nothing of 99.9 %
    assert cs.judge([result(0.05, 0.3)] * 999, [strict], min_requests=20).passed is None
    assert cs.judge([result(0.05, 0.3)] * 1000, [strict], min_requests=20).passed is True
    two_nines = Objective("ttft", (LatencyTarget("ttft", 0.2),), 0.99)
    assert cs.judge([result(0.05, 0.3)] * 100, [two_nines], min_requests=50).passed is True


def test_a_searched_configuration_keeps_the_running_precision_and_parallelism() -> None:
    engine = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048, quantization="fp8", kv_cache_dtype="fp8",
                          tensor_parallel_size=2)
    space = cs.space_for(engine, TuningSection())
    assert all(c.engine_changes() == {"max_num_seqs": c.max_num_seqs,
                                      "max_num_batched_tokens": c.max_num_batched_tokens} for c in space.cells())
    running = next(c for c in space.cells() if (c.max_num_seqs, c.max_num_batched_tokens) == (64, 2048))
    merged = engine.with_changes(running.engine_changes())
    assert merged == engine  # the running cell changes nothing: no recommendation to go back to bf16 on one GPU


def test_a_trial_is_judged_per_slo_failures_are_bad_and_too_few_results_are_unknown() -> None:
    # 8 fast, 1 slow first token, 1 slow decode (e2e 1.0 s over 10 tokens after the first), 0 failed.
    rows = [result(0.05, 0.3)] * 8 + [result(0.5, 0.8)] + [result(0.05, 1.05)]
    v = cs.judge(rows, [TTFT, GOODPUT], min_requests=10)
    ttft, good = v.predictions
    assert ttft.attainment == pytest.approx(0.9) and ttft.holds and ttft.threshold_s == 0.2
    assert good.attainment == pytest.approx(0.8) and not good.holds and v.passed is False
    failed = cs.judge(rows[:9] + [result(None, None, 0, ok=False)], [TTFT], min_requests=10)
    assert failed.predictions[0].attainment == pytest.approx(0.8) and "1 failed" in failed.note
    few = cs.judge(rows, [TTFT], min_requests=11)
    assert few.predictions[0].attainment is None and few.passed is None
    queue = cs.judge(rows, [Objective("q", (LatencyTarget("queue", 0.1),), 0.9)], min_requests=1)
    assert queue.passed is None  # the client cannot see queue time: unknown, never a pass
    assert CanaryVerdict((), "never ready", started=False).passed is False


def slo(name: str, targets: tuple[LatencyTarget, ...], objective: float = 0.95, deployment: str = "tiny") -> Slo:
    return Slo(name, deployment, "ttft" if len(targets) == 1 else "goodput", targets, objective,
               SloWindow("rolling", 28 * 86400))


def deployment(**tuning: Any) -> Any:
    return parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"},
                 "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 1200},
                 "replicas": {"min": 1, "max": 4, "initial": 1},
                 "hardware": {"accelerator": "cpu", "price_per_hour_usd": 0.05},
                 "tuning": {"max_num_seqs": [4, 8, 16, 32], **tuning}}})


def record(store: Store, rate: float, n: int = 1200) -> None:
    """The running replica (16 seqs / 512 tokens), simulated, as the collectors would have stored it."""
    rep = ReplicaModel(StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7)), max_num_seqs=16, max_num_batched_tokens=512,
                       block_size=16, num_kv_blocks=2000, max_model_len=1200)
    res = simulate(synthetic(Poisson(rate), Uniform(50, 400), Uniform(10, 100), n=n, seed=3), [rep])
    store_replica_run(store, res, "tiny-0", base_unix_s=BASE, kv_blocks=2000)


class FakeCanary:
    def __init__(self, passes: Sequence[bool]) -> None:
        self.passes = list(passes)
        self.tried: list[tuple[Cell, float]] = []

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
        self.tried.append((cell, rps))
        ok = self.passes[len(self.tried) - 1]
        return CanaryVerdict((Prediction("ttft", 0.95, 0.99 if ok else 0.5, 0.04 if ok else -0.45),), "fake")


def test_a_search_on_recorded_requests_stores_a_reconfigure_recommendation_with_its_evidence(
        store: Store) -> None:  # SQLite and PostgreSQL
    record(store, rate=20.0)
    recs = Recommendations(store.engine, clock=lambda: BASE + 1000)
    slos = [slo("ttft", (LatencyTarget("ttft", 0.5),)), slo("other", (LatencyTarget("ttft", 0.001),), deployment="x")]
    lines: list[str] = []
    # Three times the recorded rate: one replica of the running config no longer holds, so something changes.
    out = cs.run_search(store, recs, deployment(), ready=["tiny-0"], current_replicas=1, slos=slos,
                        params=cs.SearchParams(target_rps=60.0, window_s=1e6), now=BASE + 1000, progress=lines.append)
    rec = recs.get(out["recommendation_id"])
    assert rec["kind"] == "reconfigure" and rec["mode"] == "recommend" and rec["status"] == "open"
    assert rec["reason"] in ("cheaper_config_meets_slo", "same_cost_more_headroom", "scale_to_meet_slo")
    # Only the batch limits are searched: precision and parallelism stay as the replica runs them.
    assert rec["current"] == {"engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512}, "replicas": 1,
                              "engine_config": deployment().engine.as_dict()}  # all it was made for
    assert set(rec["proposed"]["engine"]) == {"max_num_seqs", "max_num_batched_tokens"}
    ev = rec["evidence"]
    assert ev["calibration"]["replica"] == "tiny-0" and ev["calibration"]["requests"] == 1200
    assert ev["calibration"]["alpha_s"] == pytest.approx(4e-3, rel=0.15)
    assert ev["workload"]["requests"] == 1200 and ev["target_rps"] == 60.0
    # The running configuration, judged by the same model: it needs more replicas than it has for 60 req/s.
    now = ev["current"]
    assert now["replicas"] == 1 and now["capacity_rps_per_replica"] < 60.0 and now["replicas_needed"] > 1
    assert now["usd_per_hour"] == pytest.approx(0.05) and now["usd_per_hour_needed"] >= ev["usd_per_hour"]
    proposed = rec["proposed"]
    assert proposed["engine"]["max_num_seqs"] in (4, 8, 16, 32) and proposed["replicas"] >= 1
    # What is recommended serves the target within the SLO in the model; the stored prediction says so.
    assert proposed["replicas"] * ev["capacity_rps_per_replica"] >= 60.0 * 0.98
    assert all(s["attainment"] >= s["objective"] for s in ev["slos"]) and [s["name"] for s in ev["slos"]] == ["ttft"]
    assert rec["confidence"] is not None and 0 < rec["confidence"] <= 1
    assert any("searching" in line for line in lines)
    assert {c["config"] for c in ev["candidates"]} >= {"seqs=4 tokens=512", "seqs=32 tokens=1024"}
    assert ev["cost_unit"] == "USD" and ev["calibration"]["observed_max_seqs_per_step"] > 0


def test_a_canary_that_fails_every_trial_leaves_nothing_recommended(sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    recs = Recommendations(sqlite_store.engine, clock=lambda: BASE + 1000)
    canary = FakeCanary([False, False])
    out = cs.run_search(sqlite_store, recs, deployment(canary_trials=2), ready=["tiny-0"], current_replicas=1,
                        slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))],
                        params=cs.SearchParams(target_rps=60.0, window_s=1e6), now=BASE + 1000,
                        canary_factory=lambda wl, objs: canary)
    assert len(canary.tried) == 2 and out["recommendation_id"] is None and out["validated"] is False
    assert recs.list(deployment="tiny") == []
    assert "nothing meets every SLO" in out["outcome"]
    assert [c["reason"] for c in out["evidence"]["candidates"]].count("canary_failed") == 2


def test_the_search_refuses_clearly_what_it_cannot_do(sqlite_store: Store) -> None:
    recs = Recommendations(sqlite_store.engine)
    ok_slo = [slo("ttft", (LatencyTarget("ttft", 0.5),))]
    params = cs.SearchParams(window_s=1e6)
    with pytest.raises(cs.SearchInputError, match="no latency SLO names deployment 'tiny'"):
        cs.run_search(sqlite_store, recs, deployment(), ready=["tiny-0"], current_replicas=1, slos=[],
                      params=params, now=BASE + 1000)
    with pytest.raises(cs.SearchInputError, match="tiny-0 recorded 0 requests .* at least 200"):
        cs.run_search(sqlite_store, recs, deployment(), ready=["tiny-0"], current_replicas=1, slos=ok_slo,
                      params=params, now=BASE + 1000)
    with pytest.raises(cs.SearchInputError, match="no ready replica"):
        cs.run_search(sqlite_store, recs, deployment(), ready=[], current_replicas=1, slos=ok_slo,
                      params=params, now=BASE + 1000)
    record(sqlite_store, rate=20.0)
    with pytest.raises(cs.SearchInputError, match="canary trials need a supervised deployment"):
        cs.run_search(sqlite_store, recs, deployment(canary_trials=1), ready=["tiny-0"], current_replicas=1,
                      slos=ok_slo, params=params, now=BASE + 1000)


class FakeFleet:
    """The supervisor as the API and the search jobs see it: one ready replica of `deployment()`."""

    def __init__(self, *, roll: bool = True) -> None:
        dep = deployment()
        member = SimpleNamespace(name="tiny-0", state="ready", candidate=False, config=dep.engine)
        self.runtimes = {"tiny": SimpleNamespace(dep=dep, members={"tiny-0": member}, desired=1, deployment_id=0,
                                                 backend=SimpleNamespace(kind="local"), rollout=None)}
        self.calls: list[tuple[str, Any]] = []
        self.roll = roll  # False: the rolling change fails and the supervisor puts the old engine back

    def describe(self) -> list[dict[str, Any]]:
        return []

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        self.calls.append(("scale", replicas))
        self.runtimes[deployment].desired = replicas
        return {"replicas": replicas}

    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]:
        self.calls.append(("reconfigure", dict(changes)))
        rt = self.runtimes[deployment]
        if self.roll:
            rt.dep = rt.dep.with_engine(rt.dep.engine.with_changes(dict(changes)))
        return {"changed": True}


def test_the_api_runs_a_search_in_the_background_and_its_recommendation_applies_resize_then_roll(
        sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    fleet = FakeFleet()
    recs = Recommendations(sqlite_store.engine)
    jobs = cs.SearchJobs(sqlite_store, recs, fleet, [slo("ttft", (LatencyTarget("ttft", 0.5),))],
                         clock=lambda: BASE + 1000)
    auth = {"Authorization": "Bearer s3cret"}
    app = create_app(sqlite_store, CollectorRegistry(), control=fleet, api_token="s3cret", searches=jobs)
    with TestClient(app) as api:
        assert api.post("/api/v1/deployments/tiny/search", json={}).status_code == 401
        bad = api.post("/api/v1/deployments/tiny/search", json={"target_rps": -1}, headers=auth)
        assert bad.status_code == 422 and "target_rps" in bad.text
        assert api.post("/api/v1/deployments/nope/search", json={}, headers=auth).status_code == 404
        r = api.post("/api/v1/deployments/tiny/search", json={"target_rps": 60, "window_s": 86400 * 7},
                     headers=auth)
        assert r.status_code == 202 and r.json()["status"] == "running", r.text
        sid = r.json()["id"]
        for _ in range(200):
            job = api.get(f"/api/v1/searches/{sid}").json()
            if job["status"] != "running":
                break
            time.sleep(0.05)
        assert job["status"] == "done", job
        assert any("fitting step costs on tiny-0" in p["line"] for p in job["progress"])
        rid = job["result"]["recommendation_id"]
        assert api.get("/api/v1/searches").json()["count"] == 1
        assert api.get("/api/v1/searches/99").status_code == 404
        rec = api.get(f"/api/v1/recommendations/{rid}").json()
        assert rec["kind"] == "reconfigure"
        applied = api.post(f"/api/v1/recommendations/{rid}/apply", headers=auth)
        assert applied.status_code == 200 and applied.json()["status"] == "applied", applied.text
    # Resize first (a rolling change refuses resizes while it runs), then roll onto the searched engine args.
    assert fleet.calls == [("scale", rec["proposed"]["replicas"]), ("reconfigure", rec["proposed"]["engine"])]


def test_a_search_that_cannot_run_reports_why_in_its_job(sqlite_store: Store) -> None:
    jobs = cs.SearchJobs(sqlite_store, Recommendations(sqlite_store.engine), FakeFleet(),
                         [slo("ttft", (LatencyTarget("ttft", 0.5),))], clock=lambda: BASE + 1000)
    app = create_app(sqlite_store, CollectorRegistry(), control=FakeFleet(), api_token="t", searches=jobs)
    with TestClient(app) as api:
        sid = api.post("/api/v1/deployments/tiny/search", headers={"Authorization": "Bearer t"}).json()["id"]
        for _ in range(100):
            job = api.get(f"/api/v1/searches/{sid}").json()
            if job["status"] != "running":
                break
            time.sleep(0.05)
    assert job["status"] == "failed" and "recorded 0 requests" in job["error"] and job["result"] is None


class Clock:
    def __init__(self) -> None:
        self.now = BASE + 1000

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s


def run_auto(store: Store, fleet: FakeFleet, counts: list[tuple[int, int]],
             min_confidence: float = cs.AUTO_MIN_CONFIDENCE) -> tuple[dict[str, Any], Any]:
    """One search in auto mode; `counts` answers the before and after windows in turn."""
    import asyncio

    record(store, rate=20.0)
    recs = Recommendations(store.engine)
    clock = Clock()
    windows: list[tuple[float, float]] = []

    def count(rt: Any, t0: float, t1: float) -> tuple[int, int]:
        windows.append((t0, t1))
        return counts[len(windows) - 1]

    jobs = cs.SearchJobs(store, recs, fleet, [slo("ttft", (LatencyTarget("ttft", 0.5),))], clock=clock, mode="auto",
                         auto=cs.AutoOptions(verify_s=120.0, lookback_s=300.0, min_requests=50,
                                             min_confidence=min_confidence), counts=count, sleep=clock.sleep)

    async def go() -> dict[str, Any]:
        job = jobs.start("tiny", cs.SearchParams(target_rps=60.0, window_s=1e6))
        await asyncio.gather(*jobs._tasks)
        return jobs.get(job["id"])

    job = asyncio.run(go())
    if job["result"]["held"]:
        return job, recs
    assert windows[0] == (BASE + 700, BASE + 1000)  # the 300 s before the change
    assert windows[1] == (BASE + 1000, BASE + 1120)  # 120 s once every replica runs it
    return job, recs


def test_auto_mode_applies_the_searched_config_and_keeps_it_when_the_slo_holds(sqlite_store: Store) -> None:
    fleet = FakeFleet()
    job, recs = run_auto(sqlite_store, fleet, [(95, 100), (99, 100)])
    assert job["status"] == "done", job
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["mode"] == "auto" and rec["status"] == "applied" and rec["decided_by"] == "tuner"
    assert rec["outcome"]["verdict"] == "kept" and rec["outcome"]["before"] == {"good": 95, "known": 100}
    # Judged 10 s after its 120 s window closed: the spans of the window's last requests are batched on their way.
    assert rec["outcome"]["judged_unix_s"] == BASE + 1130
    assert fleet.calls == [("scale", rec["proposed"]["replicas"]), ("reconfigure", rec["proposed"]["engine"])]
    assert fleet.runtimes["tiny"].dep.engine.max_num_seqs == rec["proposed"]["engine"]["max_num_seqs"]


def test_auto_mode_leaves_a_configuration_predicted_with_low_confidence_to_a_person(sqlite_store: Store) -> None:
    fleet = FakeFleet()  # calibrated on batches of 16: the pick of 32 sequences is extrapolated (confidence 0.5)
    job, recs = run_auto(sqlite_store, fleet, [(95, 100), (99, 100)], min_confidence=0.6)
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["confidence"] == 0.5 and rec["evidence"]["calibration"]["observed_max_seqs_per_step"] == 16
    assert rec["mode"] == "recommend" and rec["status"] == "open" and fleet.calls == []
    assert job["status"] == "done" and job["result"]["mode"] == "recommend" and "auto" not in job["result"]
    assert "under auto mode's 0.6" in job["result"]["held"]
    assert any("left for a person" in p["line"] for p in job["progress"])


def test_auto_mode_puts_the_previous_config_back_when_the_slo_got_worse(sqlite_store: Store) -> None:
    fleet = FakeFleet()
    job, recs = run_auto(sqlite_store, fleet, [(99, 100), (80, 100)])
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["status"] == "rolled_back" and rec["outcome"]["verdict"] == "roll_back"
    # The previous args come back; the scale-up (1 -> 2) is kept: the SLO getting worse is no time to shrink.
    assert rec["proposed"]["replicas"] == 2 and rec["outcome"]["count_kept"] == 2
    assert fleet.calls[2:] == [("reconfigure", rec["current"]["engine"])]
    assert fleet.runtimes["tiny"].dep.engine.max_num_seqs == 16 and fleet.runtimes["tiny"].desired == 2
    assert any("putting the previous engine args back" in p["line"] for p in job["progress"])


def test_auto_mode_rollback_leaves_a_count_changed_meanwhile_and_a_person_s_reconfigure_is_not_overwritten(
        sqlite_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FakeFleet()
    verdicts = iter([(99, 100), (80, 100)])

    def counts(rt: Any, t0: float, t1: float) -> tuple[int, int]:
        if t0 >= BASE + 1000:  # the window after the change: the fleet was grown to 4 meanwhile (a risk scale-up)
            fleet.runtimes["tiny"].desired = 4
        return next(verdicts)

    recs = Recommendations(sqlite_store.engine)
    record(sqlite_store, rate=20.0)
    clock = Clock()
    jobs = cs.SearchJobs(sqlite_store, recs, fleet, [slo("ttft", (LatencyTarget("ttft", 0.5),))], clock=clock,
                         mode="auto", counts=counts, sleep=clock.sleep)

    def run() -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            job = jobs.start("tiny", cs.SearchParams(target_rps=60.0, window_s=1e6))
            await asyncio.gather(*jobs._tasks)
            return jobs.get(job["id"])
        return asyncio.run(go())

    job = run()
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["status"] == "rolled_back" and rec["outcome"]["count_kept"] == 4
    assert fleet.runtimes["tiny"].desired == 4 and ("scale", 1) not in fleet.calls
    # A person reconfigures while the next search runs: its recommendation is superseded, not applied over it.
    real = cs.run_search

    def search_then_a_person_acts(*args: Any, **kw: Any) -> dict[str, Any]:
        out = real(*args, **kw)
        rt = fleet.runtimes["tiny"]
        rt.dep = rt.dep.with_engine(rt.dep.engine.with_changes({"max_num_seqs": 8}))
        return out

    monkeypatch.setattr(cs, "run_search", search_then_a_person_acts)
    fleet.calls.clear()
    job = run()
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["status"] == "superseded" and "max_num_seqs 16 (now 8)" in rec["outcome"]["why"]
    assert job["result"]["auto"]["verdict"] == "stale" and fleet.calls == []


def test_auto_mode_marks_failed_a_change_the_supervisor_had_to_roll_back(sqlite_store: Store) -> None:
    job, recs = run_auto_failed(sqlite_store)
    rec = recs.get(job["result"]["recommendation_id"])
    assert rec["status"] == "failed" and rec["outcome"]["verdict"] == "rollout_rolled_back"


def run_auto_failed(store: Store) -> tuple[dict[str, Any], Any]:
    import asyncio

    record(store, rate=20.0)
    recs = Recommendations(store.engine)
    jobs = cs.SearchJobs(store, recs, FakeFleet(roll=False), [slo("ttft", (LatencyTarget("ttft", 0.5),))],
                         clock=Clock(), mode="auto", counts=lambda rt, t0, t1: (99, 100))

    async def go() -> dict[str, Any]:
        job = jobs.start("tiny", cs.SearchParams(target_rps=60.0, window_s=1e6))
        await asyncio.gather(*jobs._tasks)
        return jobs.get(job["id"])

    return asyncio.run(go()), recs


def test_shrinking_rolls_first_and_resizes_after_the_roll_growing_resizes_first() -> None:
    import asyncio

    calls: list[tuple[str, Any]] = []

    class Control:
        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            calls.append(("scale", replicas))
            return {"replicas": replicas}

        async def reconfigure(self, deployment: str, engine: Mapping[str, Any], *, actor: str,
                              reason: str) -> dict[str, Any]:
            calls.append(("reconfigure", dict(engine)))
            return {"changed": True}

    async def rolled() -> None:
        calls.append(("rolled", None))

    engine = {"max_num_seqs": 128}
    out = asyncio.run(cs.resize_then_roll(Control(), "tiny", engine, 2, current_replicas=4, actor="tuner",
                                          reason="r", wait_rolled=rolled))
    assert calls == [("reconfigure", engine), ("rolled", None), ("scale", 2)] and out["scale"] == {"replicas": 2}
    calls.clear()
    asyncio.run(cs.resize_then_roll(Control(), "tiny", engine, 6, current_replicas=4, actor="tuner", reason="r"))
    assert calls == [("scale", 6), ("reconfigure", engine)]


def test_a_search_without_a_price_does_not_show_gpu_hours_as_dollars_and_honours_min_replicas(
        sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"},
                 "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 1200},
                 "replicas": {"min": 2, "max": 4, "initial": 2}, "tuning": {"max_num_seqs": [4, 8, 16, 32]}}})
    recs = Recommendations(sqlite_store.engine, clock=lambda: BASE + 1000)
    out = cs.run_search(sqlite_store, recs, dep, ready=["tiny-0"], current_replicas=2,
                        slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))],
                        params=cs.SearchParams(target_rps=10.0, window_s=1e6), now=BASE + 1000)
    ev = out["evidence"]
    assert ev["cost_unit"].startswith("GPU-hours") and ev["usd_per_hour"] is None and ev["cost_per_hour"] > 0
    assert all(c["usd_per_hour"] is None for c in ev["candidates"])
    assert ev["current"]["usd_per_hour_needed"] is None and ev["current"]["cost_per_hour_needed"] is not None
    assert ev["replicas"] is None or ev["replicas"] >= 2  # never fewer than spec.replicas.min


def record_two_replicas(store: Store, rate_each: float = 30.0) -> None:
    rep = ReplicaModel(StepCost.linear(Coefficients(4e-3, 3e-5, 2e-7)), max_num_seqs=16, max_num_batched_tokens=512,
                       block_size=16, num_kv_blocks=2000, max_model_len=1200)
    for i in range(2):
        res = simulate(synthetic(Poisson(rate_each), Uniform(50, 400), Uniform(10, 100), n=1500, seed=3 + i), [rep])
        rows = res.rows(base_unix_s=BASE)
        for j, r in enumerate(rows):
            r.update(trace_id=f"{i:08x}{j:024x}", span_id=f"{j:016x}", replica=f"tiny-{i}")
        store.write_spans(rows, [])
        rid = store.register_replica(f"tiny-{i}", url=None, backend="local")
        store.write_engine_sample({"replica_id": rid, "ts_unix_s": BASE + 10, "scrape_ok": True, "num_running": None,
                                   "kv_capacity_tokens": 2000 * 16, "kv_block_size_tokens": 16})


def test_the_workload_holds_every_replica_of_the_deployment_not_only_the_ready_one(sqlite_store: Store) -> None:
    """tiny-1 is restarting: its requests of the window are still load the deployment served. Left out,
    the measured rate halves and reads as room to scale down."""
    record_two_replicas(sqlite_store)
    recs = Recommendations(sqlite_store.engine, clock=lambda: BASE + 1000)
    dep = parse_deployment({
        "apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": "/m", "served_name": "tiny"},
                 "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 1200},
                 "replicas": {"min": 1, "max": 4, "initial": 2},
                 "hardware": {"accelerator": "cpu", "price_per_hour_usd": 0.05}, "tuning": {"max_num_seqs": [16]}}})
    out = cs.run_search(sqlite_store, recs, dep, ready=["tiny-0"], replicas=["tiny-0", "tiny-1"],
                        current_replicas=2, slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))],
                        params=cs.SearchParams(window_s=1e6), now=BASE + 1000)
    ev = out["evidence"]
    assert ev["workload"]["requests"] == 3000 and ev["target_rps"] > 50.0
    assert ev["calibration"]["replica"] == "tiny-0" and ev["calibration"]["requests"] == 1500
    assert "scale_down" not in out["outcome"]


def test_a_search_with_canary_trials_that_could_only_end_unknown_is_refused_before_any_starts(
        sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    recs = Recommendations(sqlite_store.engine, clock=lambda: BASE + 1000)
    started: list[int] = []

    def canary(wl: Workload, objs: Sequence[Objective]) -> FakeCanary:
        started.append(1)
        return FakeCanary([True])

    params = cs.SearchParams(target_rps=60.0, window_s=1e6)
    strict = [slo("ttft", (LatencyTarget("ttft", 0.5),), objective=0.999)]  # 1,000 results; 200 are sent
    with pytest.raises(cs.SearchInputError, match="needs at least 1000 requests per canary trial"):
        cs.run_search(sqlite_store, recs, deployment(canary_trials=1), ready=["tiny-0"], current_replicas=1,
                      slos=strict, params=params, now=BASE + 1000, canary_factory=canary)
    queue = [Slo("q", "tiny", "queue", (LatencyTarget("queue", 0.5),), 0.95, SloWindow("rolling", 28 * 86400))]
    with pytest.raises(cs.SearchInputError, match="queue time"):
        cs.run_search(sqlite_store, recs, deployment(canary_trials=1), ready=["tiny-0"], current_replicas=1,
                      slos=queue, params=params, now=BASE + 1000, canary_factory=canary)
    assert started == []


def test_a_deployment_without_chunked_prefill_is_refused(sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    dep = deployment()
    dep = dep.with_engine(dep.engine.with_changes({"extra_args": ["--no-enable-chunked-prefill"]}))
    with pytest.raises(cs.SearchInputError, match="chunked prefill off"):
        cs.run_search(sqlite_store, Recommendations(sqlite_store.engine), dep, ready=["tiny-0"], current_replicas=1,
                      slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))], params=cs.SearchParams(window_s=1e6),
                      now=BASE + 1000)


def test_the_reason_says_what_the_change_does_to_the_count() -> None:
    def reason(current_replicas: int, replicas_needed: int | None, proposed_replicas: int, usd: float,
               needed_usd: float, changes: Mapping[str, Any]) -> str:
        result = SimpleNamespace(chosen=object(), replicas=proposed_replicas, engine_changes=dict(changes),
                                 usd_per_hour=usd, evidence=dict)
        p = cs.proposal(deployment(), current_replicas, result,  # type: ignore[arg-type]
                        calibration={}, workload={},
                        current={"replicas_needed": replicas_needed, "cost_per_hour_needed": needed_usd})
        assert p is not None
        return p.reason

    new = {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    same = {"max_num_seqs": 16, "max_num_batched_tokens": 512}
    # 3 replicas running where 1 of the running args would do; 1 of the new args costs the same as that 1.
    assert reason(3, 1, 1, 0.05, 0.05, new) == "scale_down_slo_still_met"
    # 1 replica running where the running args need 2: growing to 2 with new limits meets the SLO.
    assert reason(1, 2, 2, 0.10, 0.10, new) == "scale_to_meet_slo"
    assert reason(2, 2, 1, 0.05, 0.10, new) == "cheaper_config_meets_slo"
    assert reason(2, 2, 2, 0.10, 0.10, new) == "same_cost_more_headroom"
    assert reason(3, 2, 2, 0.10, 0.10, same) == "scale_down_slo_still_met"
    assert reason(1, None, 3, 0.15, 0.15, new) == "current_config_cannot_meet_slo"


class CountedFleet:
    """A fleet whose live count the API reads, and whose rolling change can be refused."""

    def __init__(self, desired: int, *, refuse_roll: bool = False) -> None:
        self.desired, self.refuse, self.calls = desired, refuse_roll, []  # type: ignore[var-annotated]

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": "tiny", "desired_replicas": self.desired}]

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        self.calls.append(("scale", replicas))
        self.desired = replicas
        return {"replicas": replicas}

    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]:
        from controlplane.supervisor.supervisor import ActionError
        self.calls.append(("reconfigure", dict(changes)))
        if self.refuse:
            raise ActionError("tiny: a canary trial is running; one at a time", 409)
        return {"changed": True}


@pytest.mark.parametrize("live, refuse, status, calls, desired", [
    (6, False, 409, [], 6),  # made for 1 replica, the fleet has 6 now: stale, not cut back to 3
    (1, True, 409, [("scale", 3), ("reconfigure", {"max_num_seqs": 32}), ("scale", 1)], 1),  # refused: undone
], ids=["stale", "roll-refused"])
def test_applying_a_searched_configuration_is_never_left_half_done_or_sized_for_another_fleet(
        sqlite_store: Store, live: int, refuse: bool, status: int, calls: list[Any], desired: int) -> None:
    from controlplane.tuning.recommendations import Proposal
    recs = Recommendations(sqlite_store.engine)
    rid = recs.add(Proposal("tiny", "reconfigure", "scale_to_meet_slo", {"engine": {"max_num_seqs": 16}, "replicas": 1},
                            {"engine": {"max_num_seqs": 32}, "replicas": 3}, {}), "recommend")
    fleet = CountedFleet(live, refuse_roll=refuse)
    with TestClient(create_app(sqlite_store, CollectorRegistry(), control=fleet, api_token="t")) as api:
        r = api.post(f"/api/v1/recommendations/{rid}/apply", headers={"Authorization": "Bearer t"})
    assert r.status_code == status and fleet.calls == calls and fleet.desired == desired
    assert recs.get(rid)["status"] == ("open" if live != 1 else "failed")


def test_a_search_calibrates_only_on_replicas_running_the_spec_and_waits_out_a_rolling_change(
        sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    fleet = FakeFleet()
    old = fleet.runtimes["tiny"].dep.engine.with_changes({"max_num_seqs": 4})
    fleet.runtimes["tiny"].members["tiny-0"].config = old  # still on the args before a rolling change
    jobs = cs.SearchJobs(sqlite_store, Recommendations(sqlite_store.engine), fleet,
                         [slo("ttft", (LatencyTarget("ttft", 0.5),))], clock=lambda: BASE + 1000)

    async def go() -> dict[str, Any]:
        job = jobs.start("tiny", cs.SearchParams(window_s=1e6))
        while jobs.get(job["id"])["status"] == "running":
            await asyncio.sleep(0.01)
        return jobs.get(job["id"])

    job = asyncio.run(go())
    assert job["status"] == "failed" and "no ready replica running its configuration" in job["error"]


def test_when_the_best_candidates_fail_their_canaries_the_next_ones_are_tried_not_pruned_away(
        sqlite_store: Store) -> None:
    record(sqlite_store, rate=20.0)
    recs = Recommendations(sqlite_store.engine, clock=lambda: BASE + 1000)
    dep = deployment(canary_trials=4)
    canary = FakeCanary([False, False, True, True])
    out = cs.run_search(sqlite_store, recs, dep, ready=["tiny-0"], current_replicas=2,
                        slos=[slo("ttft", (LatencyTarget("ttft", 0.5),))],
                        params=cs.SearchParams(target_rps=30.0, window_s=1e6), now=BASE + 1000,
                        canary_factory=lambda wl, objs: canary)
    reasons = [c["reason"] for c in out["evidence"]["candidates"]]
    assert len(canary.tried) == 3 and reasons.count("canary_failed") == 2 and reasons.count("chosen") == 1
    assert out["validated"] is True and out["recommendation_id"] is not None
    # The running limits are always sized for the load, to be tried when better-ranked ones fail.
    running = next(c for c in out["evidence"]["candidates"] if c["config"] == "seqs=16 tokens=512")
    assert running["replicas"] is not None


def test_auto_mode_does_not_apply_a_search_made_for_a_count_that_changed_meanwhile(
        sqlite_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = FakeFleet()
    search = cs.run_search

    def search_then_the_tuner_scales(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = search(*args, **kwargs)
        fleet.runtimes["tiny"].desired = 6  # the tuner scaled up while the search ran
        return out

    monkeypatch.setattr(cs, "run_search", search_then_the_tuner_scales)
    record(sqlite_store, rate=20.0)
    recs = Recommendations(sqlite_store.engine)
    jobs = cs.SearchJobs(sqlite_store, recs, fleet, [slo("ttft", (LatencyTarget("ttft", 0.5),))], clock=Clock(),
                         mode="auto", counts=lambda rt, t0, t1: (99, 100))

    async def go() -> dict[str, Any]:
        job = jobs.start("tiny", cs.SearchParams(target_rps=60.0, window_s=1e6))
        await asyncio.gather(*jobs._tasks)
        return jobs.get(job["id"])

    job = asyncio.run(go())
    rec = recs.get(job["result"]["recommendation_id"])
    assert job["result"]["auto"]["verdict"] == "stale" and rec["status"] == "superseded"
    assert fleet.calls == [] and fleet.runtimes["tiny"].desired == 6
