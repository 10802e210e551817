"""The read endpoints of the plane's faces: paged requests, replicas, actions, SLO history, cost, GPU.

Every test seeds one store (SQLite, and PostgreSQL where it runs) with the same small fleet and checks
the answers against figures worked out by hand from that seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from collectors.otlp.decode import decode_request
from controlplane.api.app import create_app
from controlplane.slo.model import Slo
from controlplane.store.repo import Store
from controlplane.supervisor.spec import parse_deployment
from tests.spans import export, llm_span
from tests.unit.slo.rule_factories import make_slo

BASE = 1_699_999_200.0  # a whole hour (UTC)
WATCHED_PRICE = 3.0
# tiny: 2 CPU cores per replica at $0.50 per core-hour = $1 per replica-hour.
TINY_DOC = {"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "tiny"},
            "spec": {"model": {"path": "/models/tiny", "served_name": "tiny"},
                     "hardware": {"accelerator": "cpu", "count_per_replica": 2, "price_per_hour_usd": 0.5}}}
TTFT_SLO = make_slo(name="tiny-ttft", sli="ttft", threshold_s=0.1, objective=0.9)


@dataclass(frozen=True)
class Seed:
    tiny_id: int
    replica_ids: dict[str, int]
    slos: tuple[Slo, ...] = (TTFT_SLO,)


def seed_store(store: Store) -> Seed:
    """A supervised deployment `tiny` (replicas tiny-0, tiny-1, up for the first 30 minutes after BASE,
    10 prompt and 5 completion tokens per 10 s each), a watched replica `w` (up 10 minutes), requests,
    audited actions, GPU readings."""
    dep = parse_deployment(TINY_DOC)
    tiny = store.save_deployment("tiny", model="tiny", spec=dep.spec, desired_replicas=2,
                                 engine_config={"max_num_seqs": 4})
    ids = {n: store.save_replica(n, deployment_id=tiny, url=f"http://127.0.0.1:81{i:02d}", backend="local",
                                 state="ready", runtime={"pid": 100 + i}, config={"max_num_seqs": 4})
           for i, n in enumerate(("tiny-0", "tiny-1"))}
    store.save_replica("tiny-0", deployment_id=tiny, url="http://127.0.0.1:8100", backend="local", state="ready",
                       runtime={"pid": 100}, config={"max_num_seqs": 8})  # a rolled change: config version 2
    ids["w"] = store.register_replica("w", url="http://10.0.0.5:8000", backend="external")
    for name, until in (("tiny-0", 1800), ("tiny-1", 1800), ("w", 600)):
        for i in range(until // 10 + 1):
            store.write_engine_sample({"replica_id": ids[name], "ts_unix_s": BASE + 10 * i, "scrape_ok": True,
                                       "prompt_tokens_total": 10.0 * i, "generation_tokens_total": 5.0 * i})
    # Requests of tiny-0: minute 0 has 3 good (ttft 0.05) and 1 bad (0.5); minute 2 one bad; two share an arrival.
    spans = [llm_span(start_ns=int((BASE + s) * 1e9), ttft=t, request_id=f"r{k}")
             for k, (s, t) in enumerate([(1, 0.05), (2, 0.05), (2, 0.05), (3, 0.5), (130, 0.5)])]
    batch = decode_request(export(spans, replica="tiny-0"))
    store.write_spans(batch.requests, [])
    store.record_action(None, "scale", actor="user", reason="user_request", message="tiny: 1 -> 2 replica(s)",
                        before={"replicas": 1}, after={"replicas": 2}, ts_unix_s=BASE + 10)
    store.record_action(ids["tiny-1"], "replica_ready", actor="supervisor", reason="probe_ok",
                        message="ready", ts_unix_s=BASE + 20)
    store.record_action(None, "autoscale_decision", actor="tuner", reason="hold",
                        attributes={"deployment": "tiny", "current": 2, "desired": 2}, ts_unix_s=BASE + 30)
    store.record_action(None, "deployment_started", actor="supervisor", reason="resumed",
                        message="other: 1 replica(s) on the local backend", ts_unix_s=BASE + 40)
    store.record_event(ids["w"], "scrape_failed", actor="collector", reason="scrape_error", message="refused")
    store.write_gpu_samples([
        {"ts_unix_s": BASE + t, "source": "nvml", "host": "h1", "gpu_index": i, "uuid": f"GPU-{i}",
         "model_name": "NVIDIA H100", "util_ratio": u, "temp_c": temp, "fb_used_bytes": 10 * 2**30,
         "fb_free_bytes": 70 * 2**30, "power_w": 300.0, "xid_errors": 0.0}
        for t, i, u, temp in [(0, 0, 0.2, 50.0), (10, 0, 0.6, 70.0), (20, 0, None, 60.0), (0, 1, 0.9, 40.0)]])
    return Seed(tiny, ids)


@pytest.fixture
def seeded(store: Store) -> tuple[Store, Seed]:
    return store, seed_store(store)


@pytest.fixture
def api(seeded: tuple[Store, Seed]) -> TestClient:
    store, seed = seeded
    return TestClient(create_app(store, CollectorRegistry(), configured_slos=seed.slos,
                                 watched_price_per_replica_hour_usd=WATCHED_PRICE, clock=lambda: BASE + 3600))


# --- requests ---------------------------------------------------------------------------------------------
def test_requests_page_back_newest_first_without_gaps_or_repeats(api: TestClient) -> None:
    seen: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        body = api.get("/api/v1/requests", params={"limit": 2, **({"before_id": before} if before else {})}).json()
        seen += [r["request_id"] for r in body["items"]]
        pages += 1
        before = body["next_before_id"]
        if before is None:
            break
        assert before == body["items"][-1]["id"]
    assert pages == 3
    # r1 and r2 arrived at the same second: ties go by id, newest stored first.
    assert seen == ["r4", "r3", "r2", "r1", "r0"]


def test_a_full_last_page_still_ends_with_a_null_cursor(api: TestClient) -> None:
    body = api.get("/api/v1/requests", params={"limit": 5}).json()
    assert body["count"] == 5 and body["next_before_id"] is None
    assert {"id", "request_id", "replica", "arrival_unix_s", "ttft_s", "prompt_tokens"} <= set(body["items"][0])


def test_paging_keeps_the_window_and_the_replica(api: TestClient) -> None:
    first = api.get("/api/v1/requests", params={"limit": 1, "since": BASE + 2, "until": BASE + 100,
                                                "replica": "tiny-0"}).json()
    assert [r["request_id"] for r in first["items"]] == ["r3"]
    rest = api.get("/api/v1/requests", params={"since": BASE + 2, "until": BASE + 100, "replica": "tiny-0",
                                               "before_id": first["next_before_id"]}).json()
    assert [r["request_id"] for r in rest["items"]] == ["r2", "r1"] and rest["next_before_id"] is None


def test_an_unknown_cursor_is_a_404_that_says_what_to_pass(api: TestClient) -> None:
    r = api.get("/api/v1/requests", params={"before_id": 999_999})
    assert r.status_code == 404 and "next_before_id" in r.json()["detail"]
    assert api.get("/api/v1/requests", params={"before_id": 0}).status_code == 422


# --- replicas and actions --------------------------------------------------------------------------------
def test_replicas_carry_their_deployment_state_and_latest_config(api: TestClient) -> None:
    items = {r["name"]: r for r in api.get("/api/v1/replicas").json()["items"]}
    assert set(items) == {"tiny-0", "tiny-1", "w"}
    assert items["tiny-0"]["deployment"] == "tiny" and items["tiny-0"]["state"] == "ready"
    assert items["tiny-0"]["config_version"] == 2 and items["tiny-0"]["config"] == {"max_num_seqs": 8}
    assert items["tiny-1"]["config"] == {"max_num_seqs": 4}
    assert items["w"]["deployment"] is None and items["w"]["config"] is None and items["w"]["backend"] == "external"
    assert not any(r["simulated"] for r in items.values()) and all("spec" not in r for r in items.values())


def test_a_replica_of_a_simulated_deployment_is_labelled_so(seeded: tuple[Store, Seed], api: TestClient) -> None:
    store, _ = seeded
    sim = store.save_deployment("sim", model="Llama-3.1-8B", spec={"spec": {"simulated": {"model": "Llama-3.1-8B"}}},
                                desired_replicas=1, engine_config={})
    sim0 = store.save_replica("sim-0", deployment_id=sim, url="http://127.0.0.1:8200", backend="local",
                              state="ready", runtime={"pid": 200}, config={})
    items = {r["name"]: r["simulated"] for r in api.get("/api/v1/replicas").json()["items"]}
    assert items == {"tiny-0": False, "tiny-1": False, "w": False, "sim-0": True}
    for i in range(3):
        store.write_engine_sample({"replica_id": sim0, "ts_unix_s": BASE + 10 * i, "scrape_ok": True,
                                   "prompt_tokens_total": 10.0 * i, "generation_tokens_total": 5.0 * i})
    cost = api.get("/api/v1/cost", params={"since": BASE, "until": BASE + 3600, "step_s": 600}).json()["items"]
    # A simulated fleet's cost is no real vLLM's: labelled, as its SLOs and replicas are.
    assert {i["deployment"]: i["simulated"] for i in cost} == {"tiny": False, "watched": False, "sim": True}


def test_the_audit_log_lists_people_tuner_and_supervisor_never_observations(api: TestClient) -> None:
    items = api.get("/api/v1/actions").json()["items"]
    assert [(a["kind"], a["actor"], a["deployment"]) for a in items] == [
        ("deployment_started", "supervisor", "other"), ("autoscale_decision", "tuner", "tiny"),
        ("replica_ready", "supervisor", "tiny"), ("scale", "user", "tiny")]
    scale = items[-1]
    assert scale["before_config"] == {"replicas": 1} and scale["after_config"] == {"replicas": 2}
    assert scale["reason"] == "user_request" and scale["replica"] is None
    assert items[2]["replica"] == "tiny-1"


@pytest.mark.parametrize(("params", "kinds"), [
    ({"deployment": "tiny"}, ["autoscale_decision", "replica_ready", "scale"]),
    ({"deployment": "other"}, ["deployment_started"]),
    ({"actor": "user"}, ["scale"]),
    ({"actor": "tuner", "deployment": "tiny"}, ["autoscale_decision"]),
    ({"since": BASE + 15, "until": BASE + 35}, ["autoscale_decision", "replica_ready"]),
    ({"limit": 1}, ["deployment_started"]),
])
def test_the_audit_log_filters(api: TestClient, params: dict[str, Any], kinds: list[str]) -> None:
    assert [a["kind"] for a in api.get("/api/v1/actions", params=params).json()["items"]] == kinds


@pytest.mark.parametrize("params", [{"actor": "collector"}, {"deployment": "Bad Name"}, {"limit": 0}])
def test_bad_audit_log_filters_get_422(api: TestClient, params: dict[str, Any]) -> None:
    r = api.get("/api/v1/actions", params=params)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == next(iter(params))


# --- SLO history -------------------------------------------------------------------------------------------
def test_slo_history_gives_attainment_and_quantiles_per_step(api: TestClient) -> None:
    body = api.get("/api/v1/slos/tiny-ttft/history",
                   params={"since": BASE, "until": BASE + 240, "step_s": 60}).json()
    assert body["slo"] == "tiny-ttft" and body["step_s"] == 60 and body["quantile_sli"] == "ttft"
    pts = body["points"]
    assert [p["ts_unix_s"] for p in pts] == [BASE, BASE + 60, BASE + 120, BASE + 180]
    assert [(p["requests"], p["good"]) for p in pts] == [(4, 3), (0, 0), (1, 0), (0, 0)]
    assert pts[0]["attainment"] == pytest.approx(0.75) and pts[2]["attainment"] == 0.0
    assert pts[1]["attainment"] is None and pts[1]["p50_s"] is None  # no requests: no data, not 0
    assert pts[0]["p50_s"] == pytest.approx(0.05, rel=0.02) and pts[0]["p99_s"] == pytest.approx(0.5, rel=0.02)


def test_slo_history_reads_the_same_from_the_rollups(seeded: tuple[Store, Seed], api: TestClient) -> None:
    from controlplane.slo.monitor import rollup_keys
    from controlplane.slo.rollup import run

    params = {"since": BASE, "until": BASE + 240, "step_s": 60}
    raw = api.get("/api/v1/slos/tiny-ttft/history", params=params).json()
    run(seeded[0].engine, rollup_keys([TTFT_SLO]), BASE + 3600)
    assert api.get("/api/v1/slos/tiny-ttft/history", params=params).json() == raw


def test_slo_history_of_an_unknown_slo_is_a_404_naming_the_known_ones(api: TestClient) -> None:
    r = api.get("/api/v1/slos/nope/history")
    assert r.status_code == 404 and "tiny-ttft" in r.json()["detail"]


@pytest.mark.parametrize(("params", "status"), [
    ({"step_s": 90}, 422), ({"step_s": 30}, 422), ({"since": 0, "until": BASE, "step_s": 60}, 422),
    ({"since": BASE + 10, "until": BASE}, 400), ({"since": BASE + 7200}, 400), ({"until": "inf"}, 422),
])
def test_slo_history_refuses_bad_windows_and_steps(api: TestClient, params: dict[str, Any], status: int) -> None:
    r = api.get("/api/v1/slos/tiny-ttft/history", params=params)
    assert r.status_code == status and r.json()["detail"]


def test_slo_history_defaults_to_the_last_day_in_five_minute_steps(api: TestClient) -> None:
    body = api.get("/api/v1/slos/tiny-ttft/history").json()
    assert body["step_s"] == 300 and len(body["points"]) == 288
    assert body["points"][0]["ts_unix_s"] == BASE + 3600 - 86_400


def test_without_configured_slos_history_uses_the_evaluated_ones(seeded: tuple[Store, Seed]) -> None:
    from controlplane.slo.query import evaluate

    store, _ = seeded
    status = evaluate(store.engine, TTFT_SLO, BASE + 3600)
    api = TestClient(create_app(store, CollectorRegistry(), slo_statuses=lambda: [status]))
    assert api.get("/api/v1/slos/tiny-ttft/history", params={"since": BASE, "until": BASE + 60,
                                                             "step_s": 60}).json()["points"][0]["requests"] == 4


# --- cost ----------------------------------------------------------------------------------------------------
def test_cost_per_deployment_from_replica_hours_price_and_token_counters(api: TestClient) -> None:
    body = api.get("/api/v1/cost", params={"since": BASE, "until": BASE + 3600, "step_s": 600}).json()
    items = {i["deployment"]: i for i in body["items"]}
    assert set(items) == {"tiny", "watched"}
    assert not items["tiny"]["simulated"] and not items["watched"]["simulated"]
    tiny = items["tiny"]
    assert tiny["price_per_replica_hour_usd"] == pytest.approx(1.0)
    # 2 replicas x 30 min at $1/h = $1; 2 x 1800 prompt and 2 x 900 completion tokens.
    t = tiny["totals"]
    assert t["replica_hours"] == pytest.approx(1.0) and t["usd"] == pytest.approx(1.0)
    assert t["prompt_tokens"] == pytest.approx(3600) and t["completion_tokens"] == pytest.approx(1800)
    assert t["usd_per_1m_tokens"] == pytest.approx(1.0 / 5400 * 1e6)
    pts = tiny["points"]
    assert [p["ts_unix_s"] for p in pts] == [BASE + 600 * k for k in range(6)]
    first = pts[0]  # 10 minutes of 2 replicas: $1/3 for 1200 prompt + 600 completion tokens
    assert first["replicas_up"] == pytest.approx(2.0) and first["usd_per_hour"] == pytest.approx(2.0)
    assert first["prompt_tokens"] == pytest.approx(1200) and first["completion_tokens"] == pytest.approx(600)
    assert first["usd_per_1m_prompt_tokens"] == pytest.approx(1 / 3 / 1200 * 1e6)
    assert first["usd_per_1m_completion_tokens"] == pytest.approx(1 / 3 / 600 * 1e6)
    assert first["usd_per_1m_tokens"] == pytest.approx(1 / 3 / 1800 * 1e6)
    last = pts[-1]  # nothing scraped: nobody up, tokens unknown, no price per token
    assert last["replicas_up"] == 0 and last["usd_per_hour"] == 0
    assert last["prompt_tokens"] is None and last["usd_per_1m_tokens"] is None
    # The watched replica: 10 minutes at the configured $3/h = $0.50.
    w = items["watched"]["totals"]
    assert items["watched"]["price_per_replica_hour_usd"] == WATCHED_PRICE and w["usd"] == pytest.approx(0.5)


def test_cost_of_watched_replicas_without_a_configured_price_is_null(seeded: tuple[Store, Seed]) -> None:
    api = TestClient(create_app(seeded[0], CollectorRegistry(), clock=lambda: BASE + 3600))
    (w,) = api.get("/api/v1/cost", params={"deployment": "watched", "since": BASE, "until": BASE + 600}).json()["items"]
    assert w["price_per_replica_hour_usd"] is None and w["totals"]["usd"] is None
    assert w["totals"]["replica_hours"] == pytest.approx(600 / 3600) and w["totals"]["prompt_tokens"] == 600
    assert all(p["usd_per_hour"] is None and p["usd_per_1m_tokens"] is None for p in w["points"])


def test_cost_of_an_unknown_deployment_is_a_404_naming_the_known_ones(api: TestClient) -> None:
    r = api.get("/api/v1/cost", params={"deployment": "nope"})
    assert r.status_code == 404 and "tiny" in r.json()["detail"] and "watched" in r.json()["detail"]


@pytest.mark.parametrize(("params", "status"), [
    ({"step_s": 5}, 422), ({"step_s": "x"}, 422), ({"since": 0, "step_s": 10}, 422),
    ({"since": BASE, "until": BASE}, 400), ({"since": "nan"}, 422),
])
def test_cost_refuses_bad_parameters(api: TestClient, params: dict[str, Any], status: int) -> None:
    r = api.get("/api/v1/cost", params=params)
    assert r.status_code == status and r.json()["detail"]


def test_cost_covers_measured_time_only_never_zero_for_the_future(api: TestClient) -> None:
    # The clock is at BASE + 3600: a window wholly ahead has nothing measured; one reaching past now stops at now.
    for path in ("/api/v1/cost", "/api/v1/cost/tenants"):
        ahead = api.get(path, params={"since": BASE + 7200, "until": BASE + 7800})
        assert ahead.status_code == 400 and "not in the past" in ahead.json()["detail"]
    body = api.get("/api/v1/cost", params={"since": BASE + 3000, "until": BASE + 7800, "step_s": 300}).json()
    assert body["until"] == BASE + 3600
    assert all(p["ts_unix_s"] < BASE + 3600 for item in body["items"] for p in item["points"])


def test_the_cost_collector_reads_the_store(seeded: tuple[Store, Seed]) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from controlplane import cost, names
    from controlplane.api.queries import cost_source

    registry = CollectorRegistry()
    registry.register(cost.CostCollector(cost_source(seeded[0].engine, watched_price=None), window_s=300,
                                         clock=lambda: BASE + 600))
    values = {(s.name, s.labels["deployment"]): s.value
              for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    # The last 5 minutes: 2 replicas at $1/h = $2/h; 2 x (300 prompt + 150 completion) tokens cost $1/6.
    assert values == {(names.PLANE_COST_PER_MTOK, "tiny"): pytest.approx(1 / 6 / 900 * 1e6),
                      (names.PLANE_COST_USD_PER_HOUR, "tiny"): pytest.approx(2.0)}  # watched: no price, no series


# --- GPU ------------------------------------------------------------------------------------------------------
def test_gpu_summary_gives_latest_mean_and_peak_per_gpu(api: TestClient) -> None:
    body = api.get("/api/v1/gpu", params={"since": BASE, "until": BASE + 60}).json()
    assert body["available"] is True
    gpus = {g["uuid"]: g for g in body["gpus"]}
    g0 = gpus["GPU-0"]
    assert g0["latest"]["ts_unix_s"] == BASE + 20 and g0["latest"]["util_ratio"] is None  # latest reading unknown
    assert g0["mean_util_ratio"] == pytest.approx(0.4) and g0["max_temp_c"] == 70.0  # mean of the known readings
    assert g0["host"] == "h1" and g0["gpu_index"] == 0 and g0["model_name"] == "NVIDIA H100"
    assert g0["latest"]["fb_used_bytes"] == 10 * 2**30
    assert gpus["GPU-1"]["mean_util_ratio"] == pytest.approx(0.9)


def test_gpu_summary_outside_the_readings_is_empty_but_available(api: TestClient) -> None:
    body = api.get("/api/v1/gpu", params={"since": BASE + 100, "until": BASE + 200}).json()
    assert body == {"available": True, "gpus": []}
    assert len(api.get("/api/v1/gpu").json()["gpus"]) == 2  # default: the day up to now (BASE + 1h)


def test_without_gpu_samples_the_summary_says_unavailable(sqlite_store: Store) -> None:
    api = TestClient(create_app(sqlite_store, CollectorRegistry()))
    assert api.get("/api/v1/gpu").json() == {"available": False, "gpus": []}


def test_each_mig_instance_is_its_own_gpu_in_the_summary(sqlite_store: Store) -> None:
    from collectors.gpu.dcgm import blank_row
    rows = []
    for mig, used in (("1g.10gb/9", 1), ("3g.40gb/2", 38)):
        r = blank_row(100.0, "dcgm")
        r.update(host="n1", gpu_index=0, uuid="GPU-abc", mig_instance=mig, fb_used_bytes=used * 2**30)
        rows.append(r)
    sqlite_store.write_gpu_samples(rows)
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), clock=lambda: 200.0))
    gpus = api.get("/api/v1/gpu", params={"since": 0, "until": 200}).json()["gpus"]
    assert {g["mig_instance"]: g["latest"]["fb_used_bytes"] for g in gpus} == {"1g.10gb/9": 2**30,
                                                                                "3g.40gb/2": 38 * 2**30}


def test_gpus_without_a_host_are_listed_first_on_either_database(store: Store) -> None:
    from collectors.gpu.dcgm import blank_row
    rows = []
    for host, uuid in (("h1", "GPU-b"), (None, "GPU-a")):
        r = blank_row(10.0, "nvml")
        r.update(host=host, gpu_index=0, uuid=uuid)
        rows.append(r)
    store.write_gpu_samples(rows)
    api = TestClient(create_app(store, CollectorRegistry(), clock=lambda: 200.0))
    gpus = api.get("/api/v1/gpu", params={"since": 0, "until": 200}).json()["gpus"]
    assert [g["uuid"] for g in gpus] == ["GPU-a", "GPU-b"]  # PostgreSQL sorted the empty host last


@pytest.mark.parametrize(("path", "params", "named"), [
    ("/api/v1/recommendations", {"state": "open"}, "'state'"),  # the filter is `status`
    ("/api/v1/recommendations", {"deploymnet": "tiny", "limit": 5}, "'deploymnet'"),
    ("/api/v1/cost", {"step": 60}, "'step'"),  # `step_s`
    ("/healthz", {"verbose": 1}, "allowed: none"),
])
def test_a_query_parameter_the_endpoint_does_not_take_is_named_not_ignored(api: TestClient, path: str,
                                                                           params: dict[str, Any], named: str) -> None:
    r = api.get(path, params=params)
    assert r.status_code == 422 and named in r.json()["detail"], r.text
    assert "allowed:" in r.json()["detail"]
    assert api.get(path).status_code == 200  # the same endpoint without it answers


@pytest.mark.parametrize(("path", "query"), [("/api/v1/actions", "actor=user&actor=tuner"),
                                             ("/api/v1/requests", "limit=1&limit=2")])
def test_a_repeated_query_parameter_is_refused_not_read_for_its_last_value(api: TestClient, path: str,
                                                                          query: str) -> None:
    r = api.get(f"{path}?{query}")
    assert r.status_code == 422 and "given more than once" in r.json()["detail"], r.text
    assert api.get(f"{path}?{query.split('&')[0]}").status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/cost", "/api/v1/slos/tiny-ttft/history", "/api/v1/gpu"])
def test_a_default_window_ending_near_1970_starts_there_not_before(api: TestClient, path: str) -> None:
    r = api.get(path, params={"until": 600})
    assert r.status_code == 200, r.text
    body = r.json()
    starts = [body["since"]] if "since" in body else []
    starts += [p["ts_unix_s"] for p in body.get("points") or []]
    starts += [p["ts_unix_s"] for i in body.get("items") or [] for p in i.get("points") or []]
    assert min(starts, default=0.0) >= 0.0


def test_healthz_uptime_runs_on_the_app_s_clock(seeded: tuple[Store, Seed]) -> None:
    store, _ = seeded
    api = TestClient(create_app(store, CollectorRegistry(), started_unix_s=1000.0, clock=lambda: 1042.5))
    assert api.get("/healthz").json()["uptime_s"] == 42.5


@pytest.mark.parametrize("path", ["/api/v1/recommendations", "/api/v1/actions"])
def test_a_filter_on_a_deployment_the_store_does_not_know_is_a_404_naming_the_known(api: TestClient,
                                                                                    path: str) -> None:
    r = api.get(path, params={"deployment": "tinny"})
    assert r.status_code == 404 and r.json()["detail"].startswith("unknown deployment 'tinny'; known: ")
    assert "tiny" in r.json()["detail"]
    assert api.get(path, params={"deployment": "tiny"}).status_code == 200
    assert api.get(path, params={"deployment": "TINY"}).status_code == 422  # names are [a-z0-9-], as on /actions


def test_the_audit_logs_deployment_prefix_is_matched_exactly_on_both_stores(store: Store) -> None:
    from controlplane.api.queries import actions

    store.record_event(None, "scale", actor="supervisor", reason="r", message="TINY: shouted")
    store.record_event(None, "scale", actor="supervisor", reason="r", message="tiny: said")
    store.record_event(None, "scale", actor="supervisor", reason="r", message="tiny-2: another")
    assert [a["message"] for a in actions(store.engine, deployment="tiny", actor=None, since=None, until=None,
                                          limit=10)] == ["tiny: said"]
