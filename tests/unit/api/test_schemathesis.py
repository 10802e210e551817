"""Property-based run of every operation in the plane's OpenAPI spec: no input makes the API answer 5xx.

Schemathesis generates valid and invalid parameters and bodies from /openapi.json and sends them to
the in-process app over a seeded SQLite store, with the bearer token so mutating endpoints are reached.
Each operation is its own test. (schemathesis 4.32's `pytest.from_fixture` cannot run under pytest 9:
it reads `Function._nodeid`, which pytest 9 removed; so the cases come from `APIOperation.as_strategy`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error
from sqlalchemy import create_engine

from controlplane.api.app import create_app
from controlplane.store.db import make_engine, upgrade
from controlplane.store.repo import Store
from controlplane.tuning.recommendations import Proposal, Recommendations
from tests.unit.api.test_fleet_api import AUTH, FakeControl
from tests.unit.api.test_queries_api import BASE, WATCHED_PRICE, seed_store

# The operations, read from the spec of an app over an unused in-memory store (building it touches no database).
SPEC = create_app(Store(create_engine("sqlite://")), CollectorRegistry()).openapi()
OPERATIONS = [(path, method.upper(), bool(op.get("parameters") or op.get("requestBody")))
              for path, item in SPEC["paths"].items() for method, op in item.items()]
# Random names almost never hit the seeded ones: these operations also run with the path pinned to them.
SEEDED_PATHS: dict[str, dict[str, str | int]] = {
    "/api/v1/slos/{name}/history": {"name": "tiny-ttft"}, "/api/v1/recommendations/{rid}": {"rid": 1},
    "/api/v1/deployments/{name}/scale": {"name": "tiny"}, "/api/v1/deployments/{name}/reconfigure": {"name": "tiny"},
}
# Invalid inputs only exist for operations that take some.
CASES = [pytest.param(path, method, mode, None, id=f"{method} {path} {mode.value}")
         for path, method, has_inputs in OPERATIONS
         for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
         if has_inputs or mode.is_positive]
CASES += [pytest.param(path, method, schemathesis.GenerationMode.POSITIVE, SEEDED_PATHS[path],
                       id=f"{method} {path} seeded")
          for path, method, _ in OPERATIONS if path in SEEDED_PATHS]
MAX_EXAMPLES = 25  # per operation and generation mode: the whole file stays well under a minute


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> schemathesis.BaseSchema:
    path: Path = tmp_path_factory.mktemp("schemathesis") / "store.db"
    store = Store(make_engine(f"sqlite:///{path}"))
    upgrade(store.engine)
    seed = seed_store(store)
    Recommendations(store.engine).add(Proposal(
        "tiny", "scale", "scale_up_slo_risk", {"replicas": 1}, {"replicas": 2}, {"inputs": {}}, 0.8), mode="recommend")
    app = create_app(store, CollectorRegistry(), control=FakeControl(), api_token="s3cret",
                     configured_slos=seed.slos, watched_price_per_replica_hour_usd=WATCHED_PRICE,
                     clock=lambda: BASE + 3600)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_spec_lists_every_endpoint_of_the_contract() -> None:
    paths = {p for p, _, _ in OPERATIONS}
    assert {"/api/v1/requests", "/api/v1/replicas", "/api/v1/actions", "/api/v1/slos/{name}/history",
            "/api/v1/cost", "/api/v1/gpu", "/api/v1/recommendations/{rid}/apply"} <= paths


@pytest.mark.parametrize(("path", "method", "mode", "path_parameters"), CASES)
def test_no_input_makes_the_api_answer_5xx(api_schema: schemathesis.BaseSchema, path: str, method: str,
                                           mode: schemathesis.GenerationMode,
                                           path_parameters: dict[str, str | int] | None) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

    check()
