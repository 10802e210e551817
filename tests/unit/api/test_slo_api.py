"""SLO and alert endpoints: no data is an explicit null with a flag, never NaN; alert episodes are listed."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from controlplane.api.app import create_app
from controlplane.slo.alert_state import Condition, step
from controlplane.slo.alerter import Alerter
from controlplane.slo.evaluate import Counts, build_status
from controlplane.store.repo import Store
from tests.unit.slo.rule_factories import make_slo


def test_slo_statuses_and_alert_episodes_are_served(sqlite_store: Store) -> None:
    busy, idle = make_slo(name="busy", objective=0.99), make_slo(name="idle", objective=0.99)
    now = 1_700_000_000.0
    windows = {w: Counts(good=90, total=100) for b in busy.alerting.windows for w in (b.long_s, b.short_s)}
    empty = {w: Counts(good=0, total=0) for w in windows}
    statuses = [build_status(busy, now, (now - 86400 * 30, now), Counts(good=990, total=1000), windows),
                build_status(idle, now, (now - 86400 * 30, now), Counts(good=0, total=0), empty)]
    alerter = Alerter(sqlite_store.engine, alertmanager_url=None)
    ep, _ = step(None, Condition(True, 0.0, {}), slo="busy", deployment="tiny", severity="page", now=now)
    assert ep is not None
    alerter._save(ep)
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), slo_statuses=lambda: statuses))
    items = {i["name"]: i for i in api.get("/api/v1/slos").json()["items"]}
    assert items["busy"]["attainment"] == 0.99 and abs(items["busy"]["error_budget_remaining"]) < 1e-9
    assert abs(items["busy"]["burn_rates"][0]["long"]["burn_rate"] - 10.0) < 1e-9
    assert items["idle"]["no_data"] is True and items["idle"]["attainment"] is None
    assert items["idle"]["burn_rates"][0]["long"]["burn_rate"] is None
    alerts = api.get("/api/v1/alerts", params={"slo": "busy"}).json()
    assert alerts["count"] == 1 and alerts["items"][0]["state"] == "firing"
    assert api.get("/api/v1/alerts", params={"slo": "idle"}).json()["count"] == 0
    typo = api.get("/api/v1/alerts", params={"slo": "bussy"})
    assert typo.status_code == 404 and typo.json()["detail"] == "unknown SLO 'bussy'; known: busy, idle"


def test_the_slo_of_a_simulated_deployment_is_labelled_so(sqlite_store: Store) -> None:
    sim = make_slo(name="sim-ttft", objective=0.99)  # of deployment "tiny"
    real = replace(make_slo(name="real-ttft", objective=0.99), deployment="real")
    sqlite_store.save_deployment("tiny", model="m", spec={"spec": {"simulated": {"model": "Llama-3.1-8B"}}},
                                 desired_replicas=1, engine_config={})
    sqlite_store.save_deployment("real", model="m", spec={"spec": {}}, desired_replicas=1, engine_config={})
    now = 1_700_000_000.0
    empty = {w: Counts(good=0, total=0) for b in sim.alerting.windows for w in (b.long_s, b.short_s)}
    statuses = [build_status(s, now, (now - 86400 * 30, now), Counts(good=0, total=0), empty) for s in (sim, real)]
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), slo_statuses=lambda: statuses))
    assert {i["name"]: i["simulated"] for i in api.get("/api/v1/slos").json()["items"]} == {
        "sim-ttft": True, "real-ttft": False}


def test_the_slos_are_served_from_memory_while_the_store_is_down(sqlite_store: Store) -> None:
    from sqlalchemy import create_engine

    slo = make_slo(name="s", objective=0.99)
    now = 1_700_000_000.0
    empty = {w: Counts(good=0, total=0) for b in slo.alerting.windows for w in (b.long_s, b.short_s)}
    statuses = [build_status(slo, now, (now - 86400 * 30, now), Counts(good=0, total=0), empty)]
    api = TestClient(create_app(sqlite_store, CollectorRegistry(), slo_statuses=lambda: statuses))
    sqlite_store.engine = create_engine("sqlite:////nonexistent-dir/x.db")
    r = api.get("/api/v1/slos")
    assert r.status_code == 200 and r.json()["items"][0]["simulated"] is None
