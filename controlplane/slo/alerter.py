"""The edge of live alerting: keep episodes in the store, send them to Alertmanager's v2 API.

Decisions come from `alert_state` (pure); this class only remembers the open episode per
(SLO, severity), writes every transition, and posts firing alerts on every evaluation (Alertmanager
forgets an alert that is not re-sent) and resolved ones once. A failed post is retried on the next
evaluation; the episode in the store never depends on Alertmanager being up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any

import httpx
from sqlalchemy import Engine, insert, select, update

from controlplane.slo.alert_state import Episode, alertmanager_payload, condition, step
from controlplane.slo.evaluate import SloStatus
from controlplane.slo.export import AlertState
from controlplane.slo.model import Severity
from controlplane.store.models import SloAlert
from controlplane.store.repo import scaled_to_zero_deployments, simulated_deployments

log = logging.getLogger(__name__)
SEVERITIES: tuple[Severity, ...] = ("page", "ticket")
STALE_ROUNDS = 3  # rounds without an evaluation after which a firing episode is no longer re-sent


def _row(ep: Episode) -> dict[str, Any]:
    return {"slo": ep.slo, "deployment": ep.deployment, "severity": ep.severity, "alertname": ep.alertname,
            "state": ep.state, "started_unix_s": ep.started_unix_s, "fired_unix_s": ep.fired_unix_s,
            "resolved_unix_s": ep.resolved_unix_s, "last_eval_unix_s": ep.last_eval_unix_s,
            "evidence": ep.evidence}


class Alerter:
    def __init__(self, engine: Engine, *, alertmanager_url: str | None, client: httpx.Client | None = None,
                 resend_s: float = 30.0, runbook_base: str = "alerts/runbooks.md",
                 api_url: str | None = None, wall_clock: Callable[[], float] = time.time,
                 configured: Iterable[str] | None = None,
                 simulated: Callable[[], Collection[str]] | None = None,
                 scaled_to_zero: Callable[[], Collection[str]] | None = None) -> None:
        """`configured`: the names of the SLOs this plane evaluates (None: every SLO it is given). An episode
        a previous plane left open for an SLO no longer configured is resolved in the first round.
        `simulated`: the deployments that run the simulated engine (default: read from the store each round);
        their episodes say so in the store and in the alerts sent (a `simulated` label and summary).
        `scaled_to_zero`: the deployments kept at 0 replicas on purpose (default: read from the store each round),
        whose firing alerts do not hold while nothing finishes."""
        self.engine = engine
        self.configured = None if configured is None else frozenset(configured)
        self.alertmanager_url = alertmanager_url.rstrip("/") if alertmanager_url else None
        self.client = client or httpx.Client(timeout=5)
        self.resend_s = resend_s
        self.runbook_base = runbook_base
        self.api_url = api_url
        self.wall_clock = wall_clock
        self.simulated = simulated or (lambda: simulated_deployments(engine))
        self._sim: Collection[str] = frozenset()  # the last set read: kept when a read fails
        self.scaled_to_zero = scaled_to_zero or (lambda: scaled_to_zero_deployments(engine))
        self._zero: Collection[str] = frozenset()  # as _sim
        self.open: dict[tuple[str, str], Episode] = {}
        self._unsent_resolved: list[Episode] = []
        self._unsaved: list[Episode] = []  # resolved episodes the store failed to record: retried each round
        self._pages_posted: set[str] = set()  # SLOs whose firing page Alertmanager has accepted
        self._last_round: float | None = None  # `now` of the previous evaluation
        self._load()

    def _load(self) -> None:
        """Resume episodes a previous plane left pending or firing (no second page after a restart)."""
        with self.engine.connect() as conn:
            for r in conn.execute(select(SloAlert.__table__).where(SloAlert.state != "resolved")):
                ep = Episode(r.slo, r.deployment, r.severity, r.state, r.started_unix_s,
                             r.fired_unix_s, r.resolved_unix_s, r.last_eval_unix_s, r.evidence or {}, r.id)
                self.open[(r.slo, r.severity)] = ep
                if r.severity == "page" and r.state == "firing" and r.notified_unix_s is not None:
                    self._pages_posted.add(r.slo)

    def idle(self) -> bool:
        """Nothing open and nothing left to tell Alertmanager or to record."""
        return not self.open and not self._unsent_resolved and not self._unsaved

    def states(self) -> dict[str, dict[str, AlertState]]:
        """For the /metrics export (slo -> severity -> state); absent means inactive."""
        out: dict[str, dict[str, AlertState]] = {}
        for (slo, sev), e in list(self.open.items()):
            out.setdefault(slo, {})[sev] = AlertState.FIRING if e.state == "firing" else AlertState.PENDING
        return out

    def evaluate(self, statuses: Sequence[SloStatus], now: float) -> list[tuple[Episode, str]]:
        """Advance every (SLO, severity); store transitions; notify. Returns the transitions. An SLO whose
        judging fails is logged and left as it was; the others are judged and notified all the same."""
        changes: list[tuple[Episode, str]] = []
        for ep in list(self._unsaved):
            try:
                self._save(ep)
            except Exception:  # noqa: BLE001 - still down: kept for the next round
                log.warning("the store still cannot record the resolved %s alert of SLO %s", ep.severity, ep.slo)
                break
            self._unsaved.remove(ep)
        if statuses:
            try:
                self._sim = self.simulated()
            except Exception:  # noqa: BLE001 - a label is not worth a missed page; the last known set stays
                log.exception("reading which deployments are simulated failed; the last known set is used")
            try:
                self._zero = self.scaled_to_zero()
            except Exception:  # noqa: BLE001 - as above
                log.exception("reading which deployments are scaled to 0 failed; the last known set is used")
        for key, ep in list(self.open.items()):
            if self.configured is not None and ep.slo not in self.configured:
                try:
                    changes.append(self._retire(ep, now))
                except Exception:  # noqa: BLE001 - kept open (in memory and in the store) and retried next round
                    log.exception("closing the %s alert of SLO %s, no longer configured, failed", ep.severity, ep.slo)
                    continue
                self.open.pop(key)
        for status in statuses:
            try:
                changes += self._judge(status, now)
            except Exception:  # noqa: BLE001 - one SLO that cannot be judged must not hold back the others' pages
                log.exception("judging the alerts of SLO %s failed; it is left as it was", status.slo.name)
        self._notify({s.slo.name: s for s in statuses}, now)
        self._last_round = now
        return changes

    def _retire(self, ep: Episode, now: float) -> tuple[Episode, str]:
        """Close the episode of an SLO no longer configured: a pending one was never sent and is dropped, a
        firing one is resolved (and Alertmanager told)."""
        if ep.state == "pending":
            self._delete(ep)
            log.warning("SLO %s %s alert cancelled: the SLO is no longer configured", ep.slo, ep.severity)
            return ep, "cancelled"
        done = self._save(replace(ep, state="resolved", resolved_unix_s=now, last_eval_unix_s=now,
                                  evidence={**ep.evidence, "why": "the SLO is no longer configured"}))
        self._unsent_resolved.append(done)
        log.warning("SLO %s %s alert resolved: the SLO is no longer configured", ep.slo, ep.severity)
        return done, "resolved"

    def _judge(self, status: SloStatus, now: float) -> list[tuple[Episode, str]]:
        slo = status.slo
        changes: list[tuple[Episode, str]] = []
        for sev in SEVERITIES:
            key = (slo.name, sev)
            prev = self.open.get(key)
            cond = condition(status, sev, hold=slo.deployment not in self._zero)
            nxt, transition = step(prev, cond, slo=slo.name, deployment=slo.deployment,
                                   severity=sev, now=now)
            if nxt is not None and prev is not None and prev.id is not None:
                nxt = replace(nxt, id=prev.id)
            # Decided when the episode opens and kept: a label that changed mid-episode would be a new alert.
            if nxt is not None and (prev.evidence.get("simulated") if prev is not None
                                    else slo.deployment in self._sim):
                nxt = replace(nxt, evidence={**nxt.evidence, "simulated": True})
            if transition == "cancelled" and prev is not None:
                self._delete(prev)
            elif nxt is not None:
                try:
                    nxt = self._save(nxt)
                except Exception:  # noqa: BLE001 - a page must not wait for the store: kept in memory, saved later
                    log.exception("storing the %s alert of SLO %s failed; it is sent all the same and stored once the "
                                  "store answers", sev, slo.name)
                    if nxt.state == "resolved":  # leaves `open`: retried from here (an open one is saved each round)
                        self._unsaved.append(nxt)
            if nxt is None or nxt.state == "resolved":
                self.open.pop(key, None)
            else:
                self.open[key] = nxt
            if transition is not None and nxt is not None:
                changes.append((nxt, transition))
                log.warning("SLO %s %s alert %s", slo.name, sev, transition)
            if nxt is not None and nxt.state == "resolved":
                self._unsent_resolved.append(nxt)
        return changes

    def _save(self, ep: Episode) -> Episode:
        with self.engine.begin() as conn:
            if ep.id is None:
                rid = conn.execute(insert(SloAlert).values(**_row(ep)).returning(SloAlert.id)).scalar_one()
                return replace(ep, id=int(rid))
            conn.execute(update(SloAlert).where(SloAlert.id == ep.id).values(**_row(ep)))
        return ep

    def _delete(self, ep: Episode) -> None:
        if ep.id is None:
            return
        with self.engine.begin() as conn:
            conn.execute(SloAlert.__table__.delete().where(SloAlert.id == ep.id))  # type: ignore[attr-defined]

    def _notify(self, statuses: dict[str, SloStatus], now: float) -> None:
        if self.alertmanager_url is None:
            self._unsent_resolved.clear()
            return
        # The time between rounds is the interval plus the round's own work: alerts must outlive it.
        period = max(self.resend_s, now - self._last_round) if self._last_round is not None else self.resend_s
        # An episode whose SLO could not be evaluated for a few rounds is not re-sent: its endsAt passes and
        # Alertmanager resolves it, as it would if this plane had died, rather than paging on stale data.
        firing = [e for e in self.open.values()
                  if e.state == "firing" and now - e.last_eval_unix_s <= STALE_ROUNDS * period]
        paging = {e.slo for e in firing if e.severity == "page"}
        self._pages_posted &= paging
        # A ticket goes out only once its SLO's page has been accepted in an earlier round. Alertmanager's
        # inhibitor learns of new alerts asynchronously and flushes an alert older than group_wait at once, so a
        # page and its ticket posted together can both be delivered (seen here) instead of the page alone.
        held = paging - self._pages_posted
        sending = [e for e in firing if not (e.severity == "ticket" and e.slo in held)]
        # A resolved episode whose (SLO, severity) fires again is the same alert to Alertmanager (same labels):
        # sent next to the new one it could overwrite it, so it is dropped; the rest go first.
        again = {(e.slo, e.severity) for e in sending}
        to_send = [e for e in self._unsent_resolved if (e.slo, e.severity) not in again] + sending
        if not to_send:
            return
        wall = self.wall_clock()
        body = [alertmanager_payload(
            e, sli=self._sli(e, statuses), wall_now=wall, resend_s=period,
            runbook_url=f"{self.runbook_base}#{e.alertname.lower()}",
            generator_url=f"{self.api_url}/api/v1/alerts?slo={e.slo}" if self.api_url else None) for e in to_send]
        try:
            r = self.client.post(self.alertmanager_url + "/api/v2/alerts", json=body)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not post %d alert(s) to Alertmanager at %s: %s (retrying next evaluation)",
                        len(body), self.alertmanager_url, exc)
            return
        self._unsent_resolved.clear()
        self._pages_posted |= paging
        ids = [e.id for e in to_send if e.id is not None]
        try:
            with self.engine.begin() as conn:
                conn.execute(update(SloAlert).where(SloAlert.id.in_(ids)).values(notified_unix_s=wall))
        except Exception:  # noqa: BLE001 - sent is sent; only the record of when is lost
            log.exception("recording that %d alert(s) reached Alertmanager failed", len(ids))

    @staticmethod
    def _sli(ep: Episode, statuses: dict[str, SloStatus]) -> str:
        """The SLI label the episode was raised with: a label that changed would be a new alert to Alertmanager
        (a second page, and the first one resolving), so a round that could not evaluate the SLO keeps it."""
        if ep.slo in statuses:
            return statuses[ep.slo].slo.sli
        return str(ep.evidence.get("sli", "unknown"))  # "unknown" only for episodes stored before it was kept


def list_alerts(engine: Engine, *, limit: int = 200, slo: str | None = None) -> list[dict[str, Any]]:
    stmt = select(SloAlert.__table__).order_by(SloAlert.started_unix_s.desc()).limit(limit)
    if slo is not None:
        stmt = stmt.where(SloAlert.slo == slo)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for r in rows:  # the deployment runs the simulated engine (decided when the episode opened)
        r["simulated"] = bool((r["evidence"] or {}).get("simulated"))
    return rows
