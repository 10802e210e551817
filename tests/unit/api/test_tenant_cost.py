"""Cost per tenant: the router's spans joined to vLLM's request spans by trace id, each replica's cost in a step
split between tenants by their share of its tokens. Figures are worked out by hand from a small seed, on SQLite
and on PostgreSQL (where it runs); the router spans go in through `SpanWriter`, as in the plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import update

from collectors.otlp.decode import decode_request
from controlplane import cost
from controlplane.api.app import create_app
from controlplane.store.models import Request
from controlplane.store.repo import Store
from controlplane.supervisor.router import RouterRecord, SpanWriter
from controlplane.supervisor.spec import parse_deployment
from tests.spans import export, llm_span
from tests.unit.api.test_queries_api import TINY_DOC  # 2 CPU cores at $0.50 per core-hour: $1 per replica-hour

BASE = 1_699_999_200.0  # a whole hour (UTC)
STEP = 600


@dataclass(frozen=True)
class Req:
    replica: str
    at_s: float  # arrival, seconds after BASE
    prompt: int
    completion: int
    tenant: str | None
    routed: bool = True  # False: no router span (a client that called the replica directly)


# Step 0 [BASE, BASE+600): tiny-0 serves A 400 tokens and B 200 tokens, tiny-1 serves B 100 tokens.
# Step 1 [BASE+600, BASE+1200): tiny-0 serves 100 tokens of no tenant (a router span without a tenant, and a
# request with no router span); tiny-1 is up but idle.
REQUESTS = [
    Req("tiny-0", 1, 200, 50, "A"), Req("tiny-0", 599.9, 100, 50, "A"), Req("tiny-0", 30, 100, 100, "B"),
    Req("tiny-1", 40, 50, 50, "B"),
    Req("tiny-0", 600, 60, 0, None), Req("tiny-0", 700, 40, 0, None, routed=False),
]


def seed(store: Store, requests: list[Req], *, up_s: dict[str, float]) -> dict[str, int]:
    """Deployment `tiny` ($1 per replica-hour) with its replicas scraped every 10 s for `up_s`, plus `requests`
    (vLLM spans) and their router spans, written by a `SpanWriter` as the plane does."""
    tiny = store.save_deployment("tiny", model="tiny", spec=parse_deployment(TINY_DOC).spec, desired_replicas=2,
                                 engine_config={})
    ids = {}
    for name, up in up_s.items():
        ids[name] = store.save_replica(name, deployment_id=tiny if name.startswith("tiny") else None, url=None,
                                       backend="local", state="ready", runtime=None, config=None)
        for i in range(int(up) // 10 + 1):
            store.write_engine_sample({"replica_id": ids[name], "ts_unix_s": BASE + 10 * i, "scrape_ok": True})
    writer = SpanWriter(store.engine)
    for k, r in enumerate(requests):
        trace_id = f"{k + 1:032x}"
        span = llm_span(start_ns=int((BASE + r.at_s) * 1e9), prompt=r.prompt, completion=r.completion,
                        trace_id=bytes.fromhex(trace_id), request_id=f"req-{k}")
        batch = decode_request(export([span], replica=r.replica))
        store.write_spans(batch.requests, [])
        if r.routed:
            writer.record(RouterRecord(trace_id, f"{k + 1:016x}", None, r.tenant, r.replica, BASE + r.at_s - 0.01,
                                       BASE + r.at_s + 0.5, 200, True))
    writer.close()
    return ids


@pytest.fixture
def api(store: Store) -> TestClient:
    seed(store, REQUESTS, up_s={"tiny-0": 1200, "tiny-1": 1200})
    return TestClient(create_app(store, CollectorRegistry(), clock=lambda: BASE + 3600))


def tenants(api: TestClient, **params: Any) -> dict[str, Any]:
    r = api.get("/api/v1/cost/tenants", params={"since": BASE, "until": BASE + 1200, "step_s": STEP, **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_each_replica_step_is_split_by_the_tenants_share_of_its_tokens(api: TestClient) -> None:
    body = tenants(api)
    items = {i["tenant"]: i for i in body["items"]}
    assert list(items) == ["A", "B", None]  # named tenants by name, then the requests without one
    sixth = 1 / 6  # one replica for one 10-minute step at $1/h
    a, b, none = items["A"], items["B"], items[None]
    # Step 0: tiny-0 costs $1/6 for 600 tokens, A had 400 of them, B 200; tiny-1's $1/6 is all B's.
    assert a["points"][0]["usd"] == pytest.approx(sixth * 400 / 600)
    assert b["points"][0]["usd"] == pytest.approx(sixth * 200 / 600 + sixth)
    assert (a["points"][0]["prompt_tokens"], a["points"][0]["completion_tokens"], a["points"][0]["requests"]) == (
        300, 100, 2)
    assert (b["points"][0]["prompt_tokens"], b["points"][0]["completion_tokens"]) == (150, 150)
    # Step 1: tiny-0's $1/6 goes to the requests without a tenant (routed without one, or not routed at all).
    assert none["points"][1]["usd"] == pytest.approx(sixth) and none["points"][1]["requests"] == 2
    assert none["points"][0]["usd"] == 0 and none["points"][0]["usd_per_1m_prompt_tokens"] is None
    assert a["points"][1] == {"ts_unix_s": BASE + STEP, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                              "usd": 0, "usd_per_1m_prompt_tokens": None, "usd_per_1m_completion_tokens": None,
                              "usd_per_1m_tokens": None}
    # The whole cost of a tenant is set against each token kind for the per-kind figures.
    ta = a["totals"]
    assert ta["usd"] == pytest.approx(1 / 9)
    assert ta["usd_per_1m_prompt_tokens"] == pytest.approx(1 / 9 / 300 * 1e6)
    assert ta["usd_per_1m_completion_tokens"] == pytest.approx(1 / 9 / 100 * 1e6)
    assert ta["usd_per_1m_tokens"] == pytest.approx(1 / 9 / 400 * 1e6)
    assert b["totals"]["usd"] == pytest.approx(2 / 9) and b["totals"]["requests"] == 2
    # tiny-1 was up in step 1 but served nothing: its cost is unallocated.
    assert [p["usd"] for p in body["unallocated"]["points"]] == pytest.approx([0, sixth])


def test_tenants_and_unallocated_add_up_to_the_deployment_cost(api: TestClient) -> None:
    body = tenants(api)
    (dep,) = api.get("/api/v1/cost", params={"since": BASE, "until": BASE + 1200, "step_s": STEP}).json()["items"]
    allocated = sum(i["totals"]["usd"] for i in body["items"]) + body["unallocated"]["usd"]
    assert allocated == pytest.approx(dep["totals"]["usd"]) and dep["totals"]["usd"] == pytest.approx(2 / 3)


def test_the_deployment_filter_and_unknown_deployments(api: TestClient) -> None:
    assert {i["tenant"] for i in tenants(api, deployment="tiny")["items"]} == {"A", "B", None}
    r = api.get("/api/v1/cost/tenants", params={"deployment": "nope"})
    assert r.status_code == 404 and "tiny" in r.json()["detail"]


@pytest.mark.parametrize(("params", "status"), [
    ({"step_s": 5}, 422), ({"since": BASE, "until": BASE}, 400), ({"since": 0, "step_s": 10}, 422),
    ({"deployment": "Bad Name"}, 422),
])
def test_bad_parameters_get_a_clear_4xx(api: TestClient, params: dict[str, Any], status: int) -> None:
    r = api.get("/api/v1/cost/tenants", params=params)
    assert r.status_code == status and r.json()["detail"]


def test_a_share_of_an_unpriced_replica_is_unknown_not_zero(store: Store) -> None:
    # A watched replica (no deployment) without a configured price serves tenant A alongside tiny-0.
    seed(store, [Req("tiny-0", 5, 100, 0, "A"), Req("w", 5, 100, 0, "A"), Req("w", 6, 100, 0, "B")],
         up_s={"tiny-0": 600, "w": 600})
    unpriced = TestClient(create_app(store, CollectorRegistry(), clock=lambda: BASE + 3600))
    items = {i["tenant"]: i for i in tenants(unpriced)["items"]}
    assert items["A"]["points"][0]["usd"] is None and items["A"]["totals"]["usd"] is None
    assert items["A"]["totals"]["usd_per_1m_tokens"] is None and items["A"]["totals"]["prompt_tokens"] == 200
    priced = TestClient(create_app(store, CollectorRegistry(), watched_price_per_replica_hour_usd=3.0,
                                   clock=lambda: BASE + 3600))
    items = {i["tenant"]: i for i in tenants(priced)["items"]}
    # tiny-0: $1/6 all A's; w: $3/h for 10 minutes = $0.50, half A's, half B's.
    assert items["A"]["totals"]["usd"] == pytest.approx(1 / 6 + 0.25)
    assert items["B"]["totals"]["usd"] == pytest.approx(0.25)


def test_allocation_rule_on_its_own() -> None:
    edges = np.array([0.0, 10.0, 20.0])
    replica_cost = {1: np.array([6.0, 3.0]), 2: np.array([np.nan, 0.0])}
    rows = [cost.TenantTokens(1, 0, "x", 1, 10, 10), cost.TenantTokens(1, 0, "y", 1, 40, 0),
            cost.TenantTokens(2, 0, "y", 1, 5, 0), cost.TenantTokens(None, 1, "x", 1, 5, 5)]
    c = cost.tenant_costs(edges, replica_cost, rows)
    x, y = c.tenants
    assert x.usd[0] == pytest.approx(6 * 20 / 60) and np.isnan(x.usd[1])  # a request from no known replica
    assert np.isnan(y.usd[0])  # 4.8 of tiny-1 plus a share of replica 2, whose cost is unknown
    assert c.unallocated_usd.tolist() == [0.0, 3.0]  # replica 1 idle in step 1; replica 2 up 0 s there


def test_requests_of_unknown_token_count_make_the_replica_steps_shares_unknown(store: Store) -> None:
    # Step 0 on tiny-0: A's request of 300 known tokens, and two of B's whose spans carried no usage
    # (NULL tokens). B's weight is unknown, so neither share is known; charging A the whole step would
    # bill A for B's tokens. Step 1 on tiny-0: A alone, known. tiny-1 serves nothing (unallocated).
    seed(store, [Req("tiny-0", 1, 200, 100, "A"), Req("tiny-0", 2, 10, 10, "B"), Req("tiny-0", 3, 10, 10, "B"),
                 Req("tiny-0", 601, 50, 50, "A")], up_s={"tiny-0": 1200, "tiny-1": 1200})
    with store.engine.begin() as conn:
        conn.execute(update(Request).where(Request.request_id.in_(["req-1", "req-2"]))
                     .values(prompt_tokens=None, completion_tokens=None))
    body = tenants(TestClient(create_app(store, CollectorRegistry(), clock=lambda: BASE + 3600)))
    items = {i["tenant"]: i for i in body["items"]}
    a, b = items["A"], items["B"]
    assert a["points"][0]["usd"] is None and b["points"][0]["usd"] is None
    assert b["points"][0]["prompt_tokens"] is None and b["points"][0]["usd_per_1m_tokens"] is None
    assert a["points"][0]["prompt_tokens"] == 200 and b["points"][0]["requests"] == 2
    assert a["points"][1]["usd"] == pytest.approx(1 / 6)  # step 1: all of tiny-0's $1/h for 10 minutes
    assert a["totals"]["usd"] is None and b["totals"]["prompt_tokens"] is None
    assert body["unallocated"]["points"][0]["usd"] == pytest.approx(1 / 6)  # tiny-1 idle, not B's unknown part


def test_a_share_of_a_replica_serving_while_never_seen_up_is_unknown_not_zero(store: Store) -> None:
    # w was last scraped at 500 s, yet served tenant A at 700 s: it ran unobserved then, so A's share of its cost
    # in that step is unknown; $0 would read as a free request.
    seed(store, [Req("w", 100, 100, 0, "A"), Req("w", 700, 100, 0, "A")], up_s={"tiny-0": 1200, "w": 500})
    api = TestClient(create_app(store, CollectorRegistry(), watched_price_per_replica_hour_usd=3.6,
                                clock=lambda: BASE + 3600))
    (a,) = tenants(api, deployment="watched")["items"]
    assert a["points"][0]["usd"] == pytest.approx(0.5) and a["points"][1]["usd"] is None
    assert a["totals"]["usd"] is None and a["totals"]["requests"] == 2


def test_a_request_just_after_the_last_scrape_keeps_its_tenants_totals_known(store: Store) -> None:
    # The live window ends 5 s past a step edge, before the next scrape: the last step has no up time yet, but
    # the replica was watched right there, so its request there costs nothing rather than making the day unknown.
    seed(store, [Req("tiny-0", 100, 100, 0, "A"), Req("tiny-0", 602, 100, 0, "A")], up_s={"tiny-0": 600})
    api = TestClient(create_app(store, CollectorRegistry(), clock=lambda: BASE + 605))
    r = api.get("/api/v1/cost/tenants", params={"since": BASE, "step_s": 300, "deployment": "tiny"})
    (a,) = r.json()["items"]
    assert [p["usd"] for p in a["points"]] == [pytest.approx(1 / 12), 0.0, 0.0]
    assert a["totals"]["usd"] == pytest.approx(1 / 12)
