"""Mutating fleet endpoints: bearer token, validation before the supervisor, supervisor errors as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from controlplane.api.app import create_app
from controlplane.store.repo import Store
from controlplane.supervisor.supervisor import ActionError

AUTH = {"Authorization": "Bearer s3cret"}


class FakeControl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str, str]] = []

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": "tiny", "desired_replicas": 1, "replicas": []}]

    async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
        if replicas > 3:
            raise ActionError("replicas must lie in [1, 3]", 422)
        self.calls.append((deployment, replicas, actor, reason))
        return {"deployment": deployment, "replicas": replicas}

    async def reconfigure(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                          reason: str) -> dict[str, Any]:
        self.calls.append((deployment, dict(changes), actor, reason))
        return {"deployment": deployment, "changed": True}


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
def api(sqlite_store: Store, control: FakeControl) -> TestClient:
    return TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token="s3cret"))


def test_scale_with_the_token_reaches_the_supervisor_as_a_user_action(api: TestClient, control: FakeControl) -> None:
    r = api.post("/api/v1/deployments/tiny/scale", json={"replicas": 2}, headers=AUTH)
    assert r.status_code == 202 and r.json()["replicas"] == 2
    assert control.calls == [("tiny", 2, "user", "user_request")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}])
def test_mutations_without_the_right_bearer_token_get_401(api: TestClient, control: FakeControl,
                                                          headers: dict[str, str]) -> None:
    r = api.post("/api/v1/deployments/tiny/scale", json={"replicas": 2}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert control.calls == []


@pytest.mark.parametrize("body", [b"{not json", b'{"replicas": "two"}', b"\xff"])
def test_a_bad_body_without_the_token_is_unauthorised_not_explained(api: TestClient, control: FakeControl,
                                                                    body: bytes) -> None:
    """The token is checked first: a caller without it learns nothing of what the endpoint expects."""
    h = {"content-type": "application/json"}
    r = api.post("/api/v1/deployments/tiny/scale", content=body, headers=h)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with_token = api.post("/api/v1/deployments/tiny/scale", content=body, headers={**h, **AUTH})
    assert with_token.status_code == (400 if body == b"\xff" else 422)  # then the body's fault is named
    assert control.calls == []


def test_without_a_configured_token_mutations_are_off(sqlite_store: Store, control: FakeControl) -> None:
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token=None))
    r = api.post("/api/v1/deployments/tiny/scale", json={"replicas": 2}, headers=AUTH)
    assert r.status_code == 403 and "CONTROLPLANE_API_TOKEN" in r.json()["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({"replicas": -1}, "replicas"), ({"replicas": "two"}, "replicas"), ({}, "replicas"),
    ({"replicas": 1, "extra": 1}, "extra"), ({"replicas": 1, "reason": "Not A Code"}, "reason"),
])
def test_bad_bodies_get_422_naming_the_field(api: TestClient, control: FakeControl, body: dict[str, Any],
                                             field: str) -> None:
    r = api.post("/api/v1/deployments/tiny/scale", json=body, headers=AUTH)
    assert r.status_code == 422 and field in str(r.json()["detail"])
    assert control.calls == []


def test_supervisor_refusals_come_back_as_json_with_their_status(api: TestClient) -> None:
    r = api.post("/api/v1/deployments/tiny/scale", json={"replicas": 9}, headers=AUTH)
    assert r.status_code == 422 and r.json() == {"detail": "replicas must lie in [1, 3]"}


def test_reconfigure_passes_the_engine_changes(api: TestClient, control: FakeControl) -> None:
    r = api.post("/api/v1/deployments/tiny/reconfigure", json={"engine": {"max_num_seqs": 4}, "reason": "tune"},
                 headers=AUTH)
    assert r.status_code == 202
    assert control.calls == [("tiny", {"max_num_seqs": 4}, "user", "tune")]


def test_deployments_are_listed_and_a_plane_without_fleet_refuses_actions(sqlite_store: Store,
                                                                          api: TestClient) -> None:
    assert api.get("/api/v1/deployments").json()["items"][0]["name"] == "tiny"
    bare = TestClient(create_app(sqlite_store, CollectorRegistry(), api_token="s3cret"))
    assert bare.get("/api/v1/deployments").json() == {"count": 0, "items": []}
    r = bare.post("/api/v1/deployments/tiny/scale", json={"replicas": 1}, headers=AUTH)
    assert r.status_code == 409 and "--config" in r.json()["detail"]


def _propose(store: Store, replicas: int = 2) -> int:
    from controlplane.tuning.recommendations import Proposal, Recommendations

    return Recommendations(store.engine).add(Proposal(
        "tiny", "scale", "scale_up_slo_risk", {"replicas": 1}, {"replicas": replicas},
        {"predicted_attainment": 0.995, "inputs": {"rate_per_s": 3.0}}, 0.8), mode="recommend")


def test_a_recommendation_is_applied_through_the_supervisor_once(sqlite_store: Store, api: TestClient,
                                                                 control: FakeControl) -> None:
    rid = _propose(sqlite_store)
    listed = api.get("/api/v1/recommendations", params={"status": "open"}).json()
    assert listed["count"] == 1 and listed["items"][0]["evidence"]["predicted_attainment"] == 0.995
    assert api.post(f"/api/v1/recommendations/{rid}/apply").status_code == 401
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "applied" and r.json()["decided_by"] == "user"
    assert control.calls == [("tiny", 2, "user", f"recommendation_{rid}")]
    again = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert again.status_code == 409 and "applied" in again.json()["detail"]
    assert len(control.calls) == 1


def test_a_refused_recommendation_is_marked_failed_and_others_can_be_dismissed(sqlite_store: Store, api: TestClient,
                                                                              control: FakeControl) -> None:
    bad = _propose(sqlite_store, replicas=9)  # the fake supervisor refuses more than 3
    r = api.post(f"/api/v1/recommendations/{bad}/apply", headers=AUTH)
    assert r.status_code == 422
    assert api.get(f"/api/v1/recommendations/{bad}").json()["status"] == "failed"
    newer = _propose(sqlite_store)
    for verb in ("dismiss", "apply"):  # a body they would drop (a reason, an option) is refused, not ignored
        r = api.post(f"/api/v1/recommendations/{newer}/{verb}", headers=AUTH, json={"reason": "whatever"})
        assert r.status_code == 422 and "takes no body" in r.json()["detail"], r.text
    assert api.get(f"/api/v1/recommendations/{newer}").json()["status"] == "open"
    assert api.post(f"/api/v1/recommendations/{newer}/dismiss", headers=AUTH).json()["status"] == "dismissed"
    assert api.get("/api/v1/recommendations/999").status_code == 404
    assert api.get("/api/v1/recommendations", params={"status": "bogus"}).status_code == 422


def test_a_newer_proposal_supersedes_the_open_one(sqlite_store: Store, api: TestClient) -> None:
    first, second = _propose(sqlite_store), _propose(sqlite_store, replicas=3)
    assert api.get(f"/api/v1/recommendations/{first}").json()["status"] == "superseded"
    assert api.get(f"/api/v1/recommendations/{second}").json()["status"] == "open"


def test_a_recommendation_being_applied_cannot_be_dismissed_or_superseded_meanwhile(sqlite_store: Store) -> None:
    from controlplane.tuning.recommendations import DISMISSED, RecommendationError, Recommendations

    recs = Recommendations(sqlite_store.engine)
    seen: list[str] = []

    class Racing(FakeControl):
        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            # While the supervisor works on it, a second person dismisses it and the tuner proposes anew.
            with pytest.raises(RecommendationError, match="is applied"):
                recs.decide(rid, DISMISSED, by="someone else")
            seen.append(recs.get(rid)["status"])
            _propose(sqlite_store, replicas=3)
            return await super().scale(deployment, replicas, actor=actor, reason=reason)

    control = Racing()
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token="s3cret"))
    rid = _propose(sqlite_store)
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "applied"
    assert r.json()["outcome"]["applied"] == {"deployment": "tiny", "replicas": 2}
    assert seen == ["applied"] and control.calls == [("tiny", 2, "user", f"recommendation_{rid}")]


def test_deciding_on_a_stale_read_is_refused_and_keeps_the_winner(sqlite_store: Store) -> None:
    from controlplane.tuning.recommendations import APPLIED, DISMISSED, RecommendationError, Recommendations

    rid = _propose(sqlite_store)
    stale = Recommendations(sqlite_store.engine).get(rid)

    class SlowReader(Recommendations):
        reads = 0

        def get(self, rid: int) -> dict[str, Any]:
            self.reads += 1
            return stale if self.reads == 1 else super().get(rid)  # read before the other decision landed

    Recommendations(sqlite_store.engine).decide(rid, DISMISSED, by="first")
    with pytest.raises(RecommendationError, match="dismissed .changed meanwhile.") as exc:
        SlowReader(sqlite_store.engine).decide(rid, APPLIED, by="second")
    assert exc.value.status == 409
    row = Recommendations(sqlite_store.engine).get(rid)
    assert row["status"] == "dismissed" and row["decided_by"] == "first"


@pytest.mark.parametrize(("path", "raw", "field"), [
    ("/api/v1/deployments/tiny/scale", b'{"replicas": NaN}', "replicas"),
    ("/api/v1/deployments/tiny/scale", b'{"replicas": 1e400}', "replicas"),
    ("/api/v1/deployments/tiny/scale", b'{"replicas": true}', "replicas"),
    ("/api/v1/deployments/tiny/search", b'{"target_rps": NaN}', "target_rps"),
    ("/api/v1/deployments/tiny/search", b'{"window_s": Infinity}', "window_s"),
    ("/api/v1/deployments/tiny/scale", b"\xff\xfe", "body"),
])
def test_unrenderable_bad_input_still_gets_a_422_naming_the_field(api: TestClient, control: FakeControl,
                                                                  path: str, raw: bytes, field: str) -> None:
    r = api.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in str(r.json()["detail"])
    assert control.calls == []


def test_a_window_past_the_year_5138_is_refused_rather_than_stepped_for_ever(api: TestClient) -> None:
    r = api.get("/api/v1/slos/x/history", params={"since": 5e18, "until": 5.000000000000008192e18})
    assert r.status_code == 422 and "since" in r.text


def test_a_recommendation_that_fails_in_an_unexpected_way_is_marked_failed_not_left_applied(
        sqlite_store: Store) -> None:
    from sqlalchemy.exc import OperationalError

    class Locked(FakeControl):
        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            raise OperationalError("UPDATE deployments", {}, Exception("database is locked"))

    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=Locked(), api_token="s3cret"))
    rid = _propose(sqlite_store)
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 503 and r.json()["detail"] == "store unavailable: OperationalError"
    got = api.get(f"/api/v1/recommendations/{rid}").json()
    assert got["status"] == "failed" and "database is locked" in got["outcome"]["error"]
    # A proposal without the engine it should roll to: a clear 422, not a 500, and failed too.
    from controlplane.tuning.recommendations import Proposal, Recommendations

    bad = Recommendations(sqlite_store.engine).add(Proposal(
        "tiny", "reconfigure", "searched", {"replicas": 1}, {"replicas": 1}, {}, 0.5), mode="recommend")
    r = api.post(f"/api/v1/recommendations/{bad}/apply", headers=AUTH)
    assert r.status_code == 422 and "its proposal is malformed (KeyError: 'engine')" in r.json()["detail"]
    assert api.get(f"/api/v1/recommendations/{bad}").json()["status"] == "failed"


def test_a_recommendation_made_for_another_count_is_refused_as_stale(sqlite_store: Store, api: TestClient,
                                                                      control: FakeControl) -> None:
    from controlplane.tuning.recommendations import Proposal, Recommendations

    rid = Recommendations(sqlite_store.engine).add(Proposal(
        "tiny", "scale", "scale_up_slo_risk", {"replicas": 6}, {"replicas": 7}, {}, 0.8), mode="recommend")
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)  # the fake fleet runs 1 replica
    assert r.status_code == 409 and "was made for 6 replica(s) of tiny, which now has 1" in r.json()["detail"]
    assert control.calls == [] and api.get(f"/api/v1/recommendations/{rid}").json()["status"] == "open"


def test_a_searched_configuration_for_another_count_is_stale_and_a_malformed_current_is_no_500(
        sqlite_store: Store, api: TestClient, control: FakeControl) -> None:
    from controlplane.tuning.recommendations import Proposal, Recommendations

    recs = Recommendations(sqlite_store.engine)
    # Searched when the deployment had 4 replicas; it has 1 now (the fake): its count was sized for that
    # search's load, so it is refused as stale rather than applied to a fleet it was not made for.
    stale = recs.add(Proposal("tiny", "reconfigure", "searched", {"replicas": 4, "engine": {"max_num_seqs": 4}},
                              {"replicas": 2, "engine": {"max_num_seqs": 8}}, {}, 0.5), mode="recommend")
    r = api.post(f"/api/v1/recommendations/{stale}/apply", headers=AUTH)
    assert r.status_code == 409 and "stale" in r.json()["detail"] and control.calls == []
    # Made for the count it has: grows 1 -> 2, then rolls.
    rid = recs.add(Proposal("tiny", "reconfigure", "searched", {"replicas": 1, "engine": {"max_num_seqs": 4}},
                            {"replicas": 2, "engine": {"max_num_seqs": 8}}, {}, 0.5), mode="recommend")
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 200, r.text
    assert control.calls == [("tiny", 2, "user", f"recommendation_{rid}"),
                             ("tiny", {"max_num_seqs": 8}, "user", f"recommendation_{rid}")]
    odd = recs.add(Proposal("tiny", "scale", "scale_up_slo_risk", {"replicas": "many"}, {"replicas": 2}, {}, 0.5),
                   mode="recommend")
    r = api.post(f"/api/v1/recommendations/{odd}/apply", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "applied"


def test_a_recommendation_refused_for_now_stays_open_and_applies_later(sqlite_store: Store) -> None:
    class Rolling(FakeControl):
        rolling = True

        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            if self.rolling:
                raise ActionError("tiny: a rolling change is in progress; retry when it ends", 409, retryable=True)
            return await super().scale(deployment, replicas, actor=actor, reason=reason)

    control = Rolling()
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token="s3cret"))
    rid = _propose(sqlite_store)
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 409 and r.json()["detail"].endswith(f"recommendation {rid} stays open")
    got = api.get(f"/api/v1/recommendations/{rid}").json()
    assert got["status"] == "open" and got["decided_by"] is None
    assert "rolling change" in got["outcome"]["last_refused"]["error"]
    control.rolling = False  # the roll ended: the person's retry goes through
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "applied"
    assert control.calls == [("tiny", 2, "user", f"recommendation_{rid}")]


def test_a_reconfiguration_made_for_engine_settings_changed_since_is_stale(sqlite_store: Store) -> None:
    from controlplane.tuning.recommendations import Proposal, Recommendations

    class Live(FakeControl):
        def describe(self) -> list[dict[str, Any]]:
            return [{"name": "tiny", "desired_replicas": 1, "engine": {"max_num_seqs": 16}, "replicas": []}]

    control = Live()
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token="s3cret"))
    rid = Recommendations(sqlite_store.engine).add(Proposal(
        "tiny", "reconfigure", "searched", {"replicas": 1, "engine": {"max_num_seqs": 4}},
        {"replicas": 1, "engine": {"max_num_seqs": 8}}, {}, 0.5), mode="recommend")
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)  # someone set 16 since: 8 would undo it
    assert r.status_code == 409 and "max_num_seqs 4 (now 16)" in r.json()["detail"] and control.calls == []
    assert api.get(f"/api/v1/recommendations/{rid}").json()["status"] == "open"


def test_a_recommendation_made_for_any_other_engine_setting_or_too_long_ago_is_stale(sqlite_store: Store) -> None:
    from controlplane.tuning.recommendations import Proposal, Recommendations

    class Live(FakeControl):
        def describe(self) -> list[dict[str, Any]]:
            return [{"name": "tiny", "desired_replicas": 1, "replicas": [],
                     "engine": {"max_num_seqs": 16, "kv_cache_dtype": "auto"}}]

    now = [1_000_000.0]
    control = Live()
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=control, api_token="s3cret",
                                clock=lambda: now[0]))
    recs = Recommendations(sqlite_store.engine, clock=lambda: now[0])
    # Searched with an fp8 KV cache, switched to auto since: the proposed limits were sized for the other one.
    searched = recs.add(Proposal(
        "tiny", "reconfigure", "searched",
        {"replicas": 1, "engine": {"max_num_seqs": 16},
         "engine_config": {"max_num_seqs": 16, "kv_cache_dtype": "fp8"}},
        {"replicas": 1, "engine": {"max_num_seqs": 32}}, {}, 0.8), mode="recommend")
    # A count decided on a replica with other limits: its capacity per replica is not today's.
    scale = recs.add(Proposal("tiny", "scale", "scale_up_forecast_load",
                              {"replicas": 1, "engine": {"max_num_seqs": 4, "kv_cache_dtype": "auto"}},
                              {"replicas": 2}, {}, 0.7), mode="recommend")
    for rid, what in ((searched, "kv_cache_dtype 'fp8' (now 'auto')"), (scale, "max_num_seqs 4 (now 16)")):
        r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
        assert r.status_code == 409 and what in r.json()["detail"], r.text
    # Made for what runs, but two hours ago: a scale stands on the load of its round.
    old = recs.add(Proposal("tiny", "scale", "scale_up_forecast_load",
                            {"replicas": 1, "engine": {"max_num_seqs": 16, "kv_cache_dtype": "auto"}},
                            {"replicas": 2}, {}, 0.7), mode="recommend")
    now[0] += 2 * 3600
    r = api.post(f"/api/v1/recommendations/{old}/apply", headers=AUTH)
    assert r.status_code == 409 and "made 2.0 h ago" in r.json()["detail"] and control.calls == []
    fresh = recs.add(Proposal("tiny", "scale", "scale_up_forecast_load",
                              {"replicas": 1, "engine": {"max_num_seqs": 16, "kv_cache_dtype": "auto"}},
                              {"replicas": 2}, {}, 0.7), mode="recommend")
    assert api.post(f"/api/v1/recommendations/{fresh}/apply", headers=AUTH).status_code == 200
    assert control.calls == [("tiny", 2, "user", f"recommendation_{fresh}")]


@pytest.mark.parametrize("rid", [2**31, 3_000_000_000])
def test_a_recommendation_id_past_the_column_is_a_422_not_a_store_error(api: TestClient, rid: int) -> None:
    assert api.get(f"/api/v1/recommendations/{rid}").status_code == 422
    assert api.post(f"/api/v1/recommendations/{rid}/dismiss", headers=AUTH).status_code == 422


def test_a_refused_recommendation_with_a_newer_one_made_meanwhile_is_superseded_not_reopened(
        sqlite_store: Store) -> None:
    from controlplane.tuning.recommendations import Recommendations

    recs = Recommendations(sqlite_store.engine)

    class Busy(FakeControl):
        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            _propose(sqlite_store, replicas=3)  # the tuner's newer one, made while this one was claimed
            raise ActionError("tiny: a rolling change is in progress; retry when it ends", 409, retryable=True)

    api = TestClient(create_app(sqlite_store, CollectorRegistry(), control=Busy(), api_token="s3cret"))
    rid = _propose(sqlite_store)
    r = api.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)
    assert r.status_code == 409 and r.json()["detail"].endswith("is superseded by a newer one")
    assert [(x["id"] > rid, x["status"]) for x in recs.list(deployment="tiny")] == [(True, "open"),
                                                                                   (False, "superseded")]


def test_a_cancelled_apply_is_recorded_as_failed_not_left_claimed(sqlite_store: Store) -> None:
    import anyio
    import httpx

    class Hangs(FakeControl):
        async def scale(self, deployment: str, replicas: int, *, actor: str, reason: str) -> dict[str, Any]:
            await anyio.sleep(3600)
            raise AssertionError("unreachable")

    app = create_app(sqlite_store, CollectorRegistry(), control=Hangs(), api_token="s3cret")
    rid = _propose(sqlite_store)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            with anyio.move_on_after(0.5):
                await client.post(f"/api/v1/recommendations/{rid}/apply", headers=AUTH)

    anyio.run(go)
    got = TestClient(app).get(f"/api/v1/recommendations/{rid}").json()
    assert got["status"] == "failed" and "Cancel" in got["outcome"]["error"]
