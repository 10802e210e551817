"""Live alerting: the pure state machine, and the alerter's store + Alertmanager edge with a fake AM."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from controlplane.slo.alert_state import Condition, alertmanager_payload, condition, step
from controlplane.slo.alerter import Alerter, list_alerts
from controlplane.slo.evaluate import Counts, build_status
from controlplane.slo.model import BurnWindow
from controlplane.store.db import make_engine, upgrade
from tests.unit.slo.rule_factories import make_slo

PAGE = BurnWindow("page", long_s=3600, short_s=300, burn_rate=14.4, for_s=0)
SLOW_PAGE = BurnWindow("page", long_s=3600, short_s=300, burn_rate=14.4, for_s=120)
TICKET = BurnWindow("ticket", long_s=86400, short_s=7200, burn_rate=3, for_s=0)


def status(bad_long: float, bad_short: float, total_long: float = 1000, total_short: float = 100,
           windows: tuple[BurnWindow, ...] = (PAGE, TICKET), min_rate: float = 0.0, now: float = 1e6,
           name: str = "t") -> object:
    slo = make_slo(name=name, objective=0.99, windows=windows, min_rate=min_rate)
    counts = {w: Counts(good=0, total=0) for w in (3600.0, 300.0, 86400.0, 7200.0)}
    counts[3600.0] = Counts(good=total_long - bad_long, total=total_long)
    counts[300.0] = Counts(good=total_short - bad_short, total=total_short)
    return build_status(slo, now, (now - 30 * 86400, now), counts[3600.0], counts)


def test_a_tier_needs_both_windows_above_the_threshold() -> None:
    # budget 1%: 14.4x = 14.4% bad. Long 20% bad, short 10% bad -> not active; both 20% -> active.
    assert not condition(status(200, 10), "page").active  # type: ignore[arg-type]
    assert condition(status(200, 20), "page").active  # type: ignore[arg-type]
    ev = condition(status(200, 20), "page").evidence["tiers"][0]  # type: ignore[arg-type]
    assert ev["burn_long"] == pytest.approx(20.0) and ev["burn_short"] == pytest.approx(20.0)


def test_no_traffic_and_a_low_request_rate_never_activate() -> None:
    assert not condition(status(0, 0, total_long=0, total_short=0), "page").active  # type: ignore[arg-type]
    # 1000 requests per hour = 0.28/s < 0.5/s minimum
    assert not condition(status(1000, 100, min_rate=0.5), "page").active  # type: ignore[arg-type]
    # ticket windows had no traffic: no data, not active
    assert not condition(status(1000, 100), "ticket").active  # type: ignore[arg-type]


def test_episode_goes_pending_firing_resolved_and_pending_that_clears_is_cancelled() -> None:
    on, off = Condition(True, 120.0, {}), Condition(False, 0.0, {})
    kw = {"slo": "t", "deployment": "d", "severity": "page"}
    ep, tr = step(None, on, now=0.0, **kw)  # type: ignore[arg-type]
    assert ep is not None and (ep.state, tr) == ("pending", "pending")
    ep2, tr = step(ep, on, now=60.0, **kw)  # type: ignore[arg-type]
    assert ep2 is not None and (ep2.state, tr) == ("pending", None)
    ep3, tr = step(ep2, on, now=120.0, **kw)  # type: ignore[arg-type]
    assert ep3 is not None and (ep3.state, tr, ep3.fired_unix_s, ep3.started_unix_s) == ("firing", "firing", 120.0, 0.0)
    ep4, tr = step(ep3, off, now=200.0, **kw)  # type: ignore[arg-type]
    assert ep4 is not None and (ep4.state, tr, ep4.resolved_unix_s) == ("resolved", "resolved", 200.0)
    assert step(ep, off, now=30.0, **kw) == (None, "cancelled")  # type: ignore[arg-type]
    again, tr = step(ep4, Condition(True, 0.0, {}), now=300.0, **kw)  # type: ignore[arg-type]
    assert again is not None and (again.state, tr, again.started_unix_s) == ("firing", "firing", 300.0)


def test_a_window_without_finished_requests_holds_a_firing_page_and_only_a_known_low_burn_resolves_it() -> None:
    # Seen in the demo: a backlog in which no request finished within the 20 s short window resolved the page
    # (burn_long 4.8x its threshold) while 1.7 % of the burst's requests met the SLO.
    kw = {"slo": "t", "deployment": "d", "severity": "page"}
    fired, tr = step(None, condition(status(200, 20), "page"), now=0.0, **kw)  # type: ignore[arg-type]
    assert fired is not None and (fired.state, tr) == ("firing", "firing")
    backlog = condition(status(200, 0, total_short=0), "page")  # type: ignore[arg-type]
    assert not backlog.active and not backlog.known
    held, tr = step(fired, backlog, now=30.0, **kw)  # type: ignore[arg-type]
    assert held is not None and (held.state, tr, held.last_eval_unix_s) == ("firing", None, 30.0)
    assert held.evidence["held"] == "unknown"
    # Nothing finished at all (an outage): held while the long window still burns, never read as a burn of zero.
    dark = condition(status(200, 0, total_short=0), "page")  # type: ignore[arg-type]
    assert step(held, dark, now=60.0, **kw)[0].state == "firing"  # type: ignore[arg-type,union-attr]
    # ... but not past the long window's evidence, as the rules: no traffic left in it at all (drained,
    # removed), or too little to judge, resolves it rather than paging for ever.
    for gone in (status(0, 0, total_long=0, total_short=0), status(200, 0, total_short=0, min_rate=0.5)):
        over, tr = step(held, condition(gone, "page"), now=60.0, **kw)  # type: ignore[arg-type]
        assert over is not None and (over.state, tr) == ("resolved", "resolved")
    # A known short-window burn under the threshold proves the tier inactive: resolved.
    done, tr = step(held, condition(status(200, 1), "page"), now=90.0, **kw)  # type: ignore[arg-type]
    assert done is not None and (done.state, tr) == ("resolved", "resolved")
    # Unknown never starts an episode, and a pending one waits through it (neither cancelled nor promoted).
    assert step(None, backlog, now=0.0, **kw) == (None, None)  # type: ignore[arg-type]
    pending = Condition(True, 120.0, {})
    ep, _ = step(None, pending, now=0.0, **kw)  # type: ignore[arg-type]
    waited, tr = step(ep, Condition(False, 0.0, {}, known=False), now=200.0, **kw)  # type: ignore[arg-type]
    assert waited is not None and (waited.state, tr) == ("pending", None)


@pytest.mark.parametrize(("zero", "firing_after"), [(set(), True), ({"tiny"}, False)],
                         ids=["replicas wanted: held", "scaled to 0: resolved"])
def test_a_page_held_while_nothing_finishes_resolves_once_the_deployment_is_scaled_to_zero(
        engine: Engine, zero: set[str], firing_after: bool) -> None:
    # A deployment scaled to 0 on purpose finishes nothing: held on the long window's evidence, its page would fire
    # for the rest of the long window (5h36m for the 6x tier at 30 days).
    client, _, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0,
                scaled_to_zero=lambda: zero)
    assert [t for _, t in a.evaluate([status(200, 20, now=1000.0)], now=1000.0)] == ["firing"]  # type: ignore[list-item]
    slo = status(200, 20).slo  # type: ignore[attr-defined]
    assert slo.deployment == "tiny"
    later = 1000.0 + slo.alerting.keep_firing_s() + 60
    for now in (1030.0, later):
        a.evaluate([status(200, 0, total_short=0, now=now)], now=now)  # type: ignore[list-item]
    assert (("t", "page") in a.open) is firing_after
    assert [r["state"] for r in list_alerts(engine) if r["severity"] == "page"] == (
        ["firing"] if firing_after else ["resolved"])


def test_payload_keeps_a_firing_alert_alive_for_four_resends_and_ends_a_resolved_one() -> None:
    on = Condition(True, 0.0, condition(status(200, 20), "page").evidence)  # type: ignore[arg-type]
    ep, _ = step(None, on, slo="t", deployment="d", severity="page", now=1000.0)
    assert ep is not None
    body = alertmanager_payload(ep, sli="ttft", wall_now=2000.0, resend_s=30, runbook_url="rb#x")
    assert body["labels"] == {"alertname": "VllmSloErrorBudgetBurnPage", "slo": "t", "deployment": "d",
                              "severity": "page", "sli": "ttft", "source": "controlplane"}
    assert body["startsAt"] == "1970-01-01T00:16:40Z" and body["endsAt"] == "1970-01-01T00:35:20Z"
    assert "burning 20.0x over 1h" in body["annotations"]["description"]
    done, _ = step(ep, Condition(False, 0.0, {}), slo="t", deployment="d", severity="page", now=1500.0)
    assert done is not None
    assert alertmanager_payload(done, sli="ttft", wall_now=2000.0, resend_s=30,
                                runbook_url="rb")["endsAt"] == "1970-01-01T00:25:00Z"


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(e)
    return e


def _recording_am() -> tuple[httpx.Client, list[list[dict[str, object]]], dict[str, bool]]:
    posts: list[list[dict[str, object]]] = []
    up = {"ok": True}

    def am(request: httpx.Request) -> httpx.Response:
        if not up["ok"]:
            return httpx.Response(503)
        posts.append(json.loads(request.content))
        return httpx.Response(200)

    return httpx.Client(transport=httpx.MockTransport(am)), posts, up


def test_alerter_stores_episodes_posts_firing_and_resolved_and_survives_restart(engine: Engine) -> None:
    client, posts, am_up = _recording_am()
    am_up["ok"] = False
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    changes = a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    assert [(e.severity, t) for e, t in changes] == [("page", "firing")]
    assert posts == []  # Alertmanager down: the episode is stored anyway, the post is retried
    stored = list_alerts(engine)
    assert [(r["severity"], r["state"], r["notified_unix_s"]) for r in stored] == [("page", "firing", None)]
    am_up["ok"] = True
    a.evaluate([status(200, 20, now=1030.0)], now=1030.0)  # type: ignore[list-item]
    assert len(posts) == 1 and posts[0][0]["labels"]["severity"] == "page"  # type: ignore[index]
    assert list_alerts(engine)[0]["notified_unix_s"] == 5000.0
    # A new plane on the same store resumes the firing episode: no second "firing" transition.
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    assert b.states() == {"t": {"page": 2}}
    assert b.evaluate([status(200, 20, now=1060.0)], now=1060.0) == []  # type: ignore[list-item]
    resolved = b.evaluate([status(200, 0, now=1090.0)], now=1090.0)  # type: ignore[list-item]
    assert [(e.state, t) for e, t in resolved] == [("resolved", "resolved")]
    assert posts[-1][0]["endsAt"] == "1970-01-01T00:18:10Z"  # type: ignore[index]
    assert b.states() == {}
    assert [(r["state"], r["fired_unix_s"], r["resolved_unix_s"]) for r in list_alerts(engine)] == [
        ("resolved", 1000.0, 1090.0)]


def test_a_ticket_waits_one_round_for_its_page_to_reach_alertmanager(engine: Engine) -> None:
    posts: list[list[dict[str, object]]] = []
    client = httpx.Client(transport=httpx.MockTransport(
        lambda r: posts.append(json.loads(r.content)) or httpx.Response(200)))  # type: ignore[func-returns-value]
    slo = make_slo(name="t", objective=0.99, windows=(PAGE, TICKET))
    bad = {w: Counts(good=0, total=1000) for w in (3600.0, 300.0, 86400.0, 7200.0)}  # every window burning
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    changes = a.evaluate([build_status(slo, 1000.0, (0.0, 1000.0), bad[3600.0], bad)], now=1000.0)
    assert sorted((e.severity, t) for e, t in changes) == [("page", "firing"), ("ticket", "firing")]
    assert [[x["labels"]["severity"] for x in p] for p in posts] == [["page"]]  # type: ignore[index]
    a.evaluate([build_status(slo, 1030.0, (0.0, 1030.0), bad[3600.0], bad)], now=1030.0)
    assert sorted(x["labels"]["severity"] for x in posts[-1]) == ["page", "ticket"]  # type: ignore[index]


def test_a_page_of_an_slo_no_longer_configured_is_resolved_and_one_not_evaluated_stops_being_resent(
        engine: Engine) -> None:
    posts: list[list[dict[str, object]]] = []
    client = httpx.Client(transport=httpx.MockTransport(
        lambda r: posts.append(json.loads(r.content)) or httpx.Response(200)))  # type: ignore[func-returns-value]
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    assert a.states() == {"t": {"page": 2}} and len(posts) == 1
    # Evaluation of "t" fails for a few rounds: re-sent while fresh, then left to expire in Alertmanager.
    for k, now in enumerate((1030.0, 1060.0, 1090.0, 1120.0)):
        a.evaluate([], now=now)
        assert len(posts) == (2 + k if now - 1000.0 <= 90.0 else 4), (now, len(posts))
    assert a.states() == {"t": {"page": 2}}  # still open: the SLO is configured, only its data is missing
    # A plane restarted without "t" in its configuration resolves the episode it inherited.
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0,
                configured=["other"])
    changes = b.evaluate([], now=1150.0)
    assert [(e.slo, e.state, t) for e, t in changes] == [("t", "resolved", "resolved")]
    assert b.states() == {} and posts[-1][0]["endsAt"] == "1970-01-01T00:19:10Z"  # type: ignore[index]
    assert [(r["state"], r["resolved_unix_s"]) for r in list_alerts(engine)] == [("resolved", 1150.0)]


def test_a_pending_alert_of_an_slo_no_longer_configured_is_cancelled_and_the_others_still_page(
        engine: Engine) -> None:
    client, posts, _ = _recording_am()
    slow = (SLOW_PAGE, TICKET)
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, windows=slow, now=1000.0, name="x")], now=1000.0)  # type: ignore[list-item]
    assert a.states() == {"x": {"page": 1}} and posts == []  # pending: nothing sent
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0,
                configured=["y"])
    changes = b.evaluate([status(200, 20, now=1030.0, name="y")], now=1030.0)  # type: ignore[list-item]
    assert sorted((e.slo, t) for e, t in changes) == [("x", "cancelled"), ("y", "firing")]
    assert [[(p["labels"]["slo"], p["labels"]["severity"]) for p in batch] for batch in posts] == [  # type: ignore[index]
        [("y", "page")]]
    assert [r["slo"] for r in list_alerts(engine)] == ["y"]  # the pending row is gone, as a cancelled one is


def test_an_slo_that_cannot_be_judged_does_not_hold_back_the_others_pages(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import controlplane.slo.alerter as alerter

    def judged(st: object, sev: str, **kw: bool) -> Condition:
        if st.slo.name == "broken":  # type: ignore[attr-defined]
            raise ValueError("a window that cannot be labelled")
        return condition(st, sev, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(alerter, "condition", judged)
    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    changes = a.evaluate([status(200, 20, now=1000.0, name="broken"),  # type: ignore[list-item]
                          status(200, 20, now=1000.0, name="fine")], now=1000.0)
    assert [(e.slo, t) for e, t in changes] == [("fine", "firing")]
    assert [p["labels"]["slo"] for p in posts[0]] == ["fine"]  # type: ignore[index]


def test_a_round_that_cannot_evaluate_the_slo_keeps_its_sli_label(engine: Engine) -> None:
    # Alertmanager tells alerts apart by their labels: a changed `sli` would be a second page and the first
    # one resolving.
    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    a.evaluate([], now=1030.0)
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    b.evaluate([], now=1060.0)  # a restarted plane, whose first round fails too
    slis = [batch[0]["labels"]["sli"] for batch in posts]  # type: ignore[index]
    assert slis == ["ttft"] * 3


def test_a_resolved_alert_is_not_sent_next_to_the_same_alert_firing_again(engine: Engine) -> None:
    client, posts, up = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    up["ok"] = False  # Alertmanager is down while the page resolves and fires again
    a.evaluate([status(200, 0, now=1030.0)], now=1030.0)  # type: ignore[list-item]
    a.evaluate([status(200, 20, now=1060.0)], now=1060.0)  # type: ignore[list-item]
    up["ok"] = True
    a.evaluate([status(200, 20, now=1090.0)], now=1090.0)  # type: ignore[list-item]
    last = posts[-1]
    # Same labels, so Alertmanager would let the later one in the batch win: only the firing one goes.
    assert [(p["labels"]["severity"], p["startsAt"]) for p in last] == [  # type: ignore[index]
        ("page", "1970-01-01T00:17:40Z")]
    # With nothing firing again, the resolved one still goes out, before any firing alert.
    a.evaluate([status(200, 0, now=1120.0)], now=1120.0)  # type: ignore[list-item]
    assert posts[-1][0]["endsAt"] == "1970-01-01T00:18:40Z"  # type: ignore[index]


def test_a_firing_alert_outlives_rounds_slower_than_the_interval(engine: Engine) -> None:
    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, resend_s=30,
                wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    assert posts[-1][0]["endsAt"] == "1970-01-01T01:25:20Z"  # type: ignore[index]  # 5000 + 4 x 30 s
    a.evaluate([status(200, 20, now=1200.0)], now=1200.0)  # type: ignore[list-item]  # the round took 200 s
    assert posts[-1][0]["endsAt"] == "1970-01-01T01:36:40Z"  # type: ignore[index]  # 5000 + 4 x 200 s


def test_closing_the_alert_of_an_slo_no_longer_configured_is_retried_when_the_store_fails(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0, name="x")], now=1000.0)  # type: ignore[list-item]
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0,
                configured=["y"])
    save = b._save
    calls = {"n": 0}

    def locked_once(ep: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("UPDATE slo_alerts", {}, Exception("database is locked"))
        return save(ep)  # type: ignore[arg-type]

    monkeypatch.setattr(b, "_save", locked_once)
    assert b.evaluate([], now=1030.0) == [] and b.states() == {"x": {"page": 2}}  # still open, in memory too
    assert [(e.slo, t) for e, t in b.evaluate([], now=1060.0)] == [("x", "resolved")]
    assert [r["state"] for r in list_alerts(engine)] == ["resolved"] and posts[-1][0]["endsAt"] is not None


def test_an_alert_about_a_simulated_deployment_says_so_for_the_whole_episode(engine: Engine) -> None:
    from sqlalchemy import insert, update

    from controlplane.store.models import Deployment

    with engine.begin() as conn:  # "tiny" (make_slo's deployment) runs the simulated engine, "real" vLLM
        conn.execute(insert(Deployment), [
            {"name": "tiny", "spec": {"spec": {"simulated": {"model": "Llama-3.1-8B"}}}, "created_unix_s": 0.0},
            {"name": "real", "spec": {"spec": {"model": {"path": "/m"}}}, "created_unix_s": 0.0}])
    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    sent = posts[-1][0]
    assert sent["labels"]["simulated"] == "true"  # type: ignore[index]
    assert sent["annotations"]["summary"].startswith("[simulated] SLO t of tiny")  # type: ignore[index]
    assert [r["simulated"] for r in list_alerts(engine)] == [True]
    # The spec changes under the open episode: its labels stay (a changed label would be a second alert) ...
    with engine.begin() as conn:
        conn.execute(update(Deployment).where(Deployment.name == "tiny").values(spec={"spec": {}}))
    a.evaluate([status(200, 20, now=1030.0)], now=1030.0)  # type: ignore[list-item]
    assert posts[-1][0]["labels"]["simulated"] == "true"  # type: ignore[index]
    # ... and a store that cannot say which deployments are simulated keeps the last known answer.
    b = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0,
                simulated=lambda: {"tiny"})
    b.evaluate([status(0, 0, now=1060.0)], now=1060.0)  # type: ignore[list-item]  # resolves
    b.simulated = lambda: (_ for _ in ()).throw(RuntimeError("store down"))  # type: ignore[assignment]
    b.evaluate([status(200, 20, now=1090.0)], now=1090.0)  # type: ignore[list-item]
    assert posts[-1][-1]["labels"]["simulated"] == "true"  # type: ignore[index]
    # A vLLM deployment's alert carries neither.
    real = make_slo(name="r", objective=0.99, windows=(PAGE,))
    c = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    counts = {w: Counts(good=800, total=1000) for w in (3600.0, 300.0)}
    from dataclasses import replace as dc_replace
    c.evaluate([build_status(dc_replace(real, deployment="real"), 1000.0, (0.0, 1000.0), counts[3600.0], counts)],
               now=1000.0)
    assert "simulated" not in posts[-1][-1]["labels"]  # type: ignore[index]
    assert not posts[-1][-1]["annotations"]["summary"].startswith("[simulated]")  # type: ignore[index]


def test_a_burn_hovering_at_the_threshold_is_one_page_kept_firing_until_clear_for_keep_firing_for() -> None:
    # 14.4x at a 1 % budget is 14.4 % bad: the short window goes 20 % / 10 % / 20 % ... every 30 s round.
    kw = {"slo": "t", "deployment": "d", "severity": "page"}
    hovering = [(200, 20 if k % 2 == 0 else 10) for k in range(20)] + [(200, 0)] * 12

    def run(keep: float | None) -> list[str]:
        slo = make_slo(name="t", objective=0.99, windows=(PAGE,), keep_firing_for_s=keep)
        ep, out = None, []
        for k, (bad_long, bad_short) in enumerate(hovering):
            st = build_status(slo, 30.0 * k, (0.0, 30.0 * k), Counts(good=800, total=1000), {
                3600.0: Counts(good=1000 - bad_long, total=1000), 300.0: Counts(good=100 - bad_short, total=100)})
            ep, tr = step(ep, condition(st, "page"), now=30.0 * k, **kw)  # type: ignore[arg-type]
            if tr is not None:
                out.append(f"{tr}@{30 * k}")
        return out

    assert len(run(0.0)) == 20  # without it: a page and a resolve at every crossing
    # The default (the short window, 5 minutes): one page, resolved 5 minutes after the burn last cleared.
    assert run(None) == ["firing@0", "resolved@870"]
    assert run(60.0) == ["firing@0", "resolved@630"]


def test_a_page_goes_out_while_the_store_cannot_record_it_and_is_stored_once_it_can(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    real = a._save

    def locked(ep: object) -> object:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(a, "_save", locked)
    changes = a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    assert [(e.severity, t) for e, t in changes] == [("page", "firing")]
    assert [p["labels"]["severity"] for p in posts[-1]] == ["page"]  # paged all the same
    assert list_alerts(engine) == [] and a.states() == {"t": {"page": 2}}
    monkeypatch.setattr(a, "_save", real)
    assert a.evaluate([status(200, 20, now=1030.0)], now=1030.0) == []  # type: ignore[list-item]  # no second page
    stored = list_alerts(engine)
    assert [(r["severity"], r["state"], r["fired_unix_s"]) for r in stored] == [("page", "firing", 1000.0)]


def test_a_resolve_the_store_could_not_record_is_recorded_once_it_can(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    client, posts, _ = _recording_am()
    a = Alerter(engine, alertmanager_url="http://am:9093", client=client, wall_clock=lambda: 5000.0)
    a.evaluate([status(200, 20, now=1000.0)], now=1000.0)  # type: ignore[list-item]
    real = a._save

    def locked(ep: object) -> object:
        raise OperationalError("UPDATE", {}, Exception("database is locked"))

    monkeypatch.setattr(a, "_save", locked)
    resolved = a.evaluate([status(200, 0, now=1030.0)], now=1030.0)  # type: ignore[list-item]
    assert [(e.state, t) for e, t in resolved] == [("resolved", "resolved")] and not a.idle()
    assert posts[-1][0]["endsAt"] == "1970-01-01T00:17:10Z"  # Alertmanager told all the same
    monkeypatch.setattr(a, "_save", real)
    a.evaluate([status(200, 0, now=1060.0)], now=1060.0)  # type: ignore[list-item]
    assert [(r["severity"], r["state"], r["resolved_unix_s"]) for r in list_alerts(engine)] == [
        ("page", "resolved", 1030.0)] and a.idle()
