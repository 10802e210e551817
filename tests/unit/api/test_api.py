import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from collectors.otlp.decode import decode_request
from controlplane.api.app import create_app
from controlplane.store.repo import Store
from tests.spans import export, llm_span


@pytest.fixture
def api(sqlite_store: Store) -> TestClient:
    base = 1_700_000_000
    batch = decode_request(export([llm_span(start_ns=(base + i) * 10**9) for i in range(4)], replica="a"))
    sqlite_store.write_spans(batch.requests, [])
    rid = sqlite_store.register_replica("a", url="http://a", backend="external")
    sqlite_store.write_engine_sample({"replica_id": rid, "ts_unix_s": base + 2.0, "scrape_ok": True,
                                      "kv_usage_ratio": 0.5})
    return TestClient(create_app(sqlite_store, CollectorRegistry()))


def test_healthz_reports_the_database(api: TestClient) -> None:
    body = api.get("/healthz").json()
    assert body["status"] == "ok" and body["database"] == "sqlite"


def test_requests_honour_the_window_and_the_replica(api: TestClient) -> None:
    body = api.get("/api/v1/requests", params={"since": 1_700_000_001, "until": 1_700_000_003}).json()
    assert body["count"] == 2 and {r["replica"] for r in body["items"]} == {"a"}
    assert api.get("/api/v1/requests", params={"replica": "a", "since": 1_800_000_000}).json()["count"] == 0
    for path in ("/api/v1/requests", "/api/v1/engine-samples"):  # a misspelt name is not a quiet replica
        unknown = api.get(path, params={"replica": "zzz"})
        assert unknown.status_code == 404 and "unknown replica 'zzz'" in unknown.json()["detail"]


def test_engine_samples_are_served(api: TestClient) -> None:
    body = api.get("/api/v1/engine-samples", params={"replica": "a"}).json()
    assert body["count"] == 1 and body["items"][0]["kv_usage_ratio"] == 0.5


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 10**9}, "limit"), ({"since": "yesterday"}, "since"),
    ({"until": -5}, "until"),
])
def test_a_bad_query_parameter_gets_a_422_naming_it(api: TestClient, params: dict, field: str) -> None:  # type: ignore[type-arg]
    resp = api.get("/api/v1/requests", params=params)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["query", field]


def test_an_empty_window_is_a_400_that_says_why(api: TestClient) -> None:
    resp = api.get("/api/v1/requests", params={"since": 10, "until": 5})
    assert resp.status_code == 400 and "earlier than" in resp.json()["detail"]


def test_the_plane_exposes_its_own_metrics(sqlite_store: Store) -> None:
    from prometheus_client import Counter
    registry = CollectorRegistry()
    Counter("controlplane_probe", "x", registry=registry).inc()
    resp = TestClient(create_app(sqlite_store, registry)).get("/metrics")
    assert "controlplane_probe_total 1.0" in resp.text


@pytest.mark.parametrize("url", ["/api/v1/requests?replica=a%00b", "/api/v1/engine-samples?replica=%00",
                                 "/api/v1/alerts?slo=a%00b", "/api/v1/recommendations?deployment=%00"])
def test_a_control_character_in_a_text_filter_is_a_422_naming_it_on_every_store(store: Store, url: str) -> None:
    # PostgreSQL refuses a NUL byte in text: it reached the store as a 503 "store unavailable" before.
    r = TestClient(create_app(store, CollectorRegistry())).get(url)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][0] == "query" and "pattern" in r.json()["detail"][0]["msg"]
