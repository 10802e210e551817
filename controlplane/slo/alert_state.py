"""Live multiwindow burn-rate alerting, pure: SLO statuses in, alert episodes and transitions out.

A tier is active when the burn rate over its long AND its short window exceeds its threshold and the
long window saw at least the SLO's minimum request rate. A severity (page / ticket) is active when
any of its tiers is. An episode goes pending -> firing (after the tier's `for`, immediately when 0)
-> resolved; a pending episode whose condition clears is dropped. A window without traffic is "no
data": it never activates a tier (never NaN, never a page on three requests an hour). A short window
without data does not clear a tier whose long window still burns with enough traffic: the severity is
then unknown, which holds an open episode as it is (a backlog in which no request finished within the
short window, or an outage in which none finishes, must not resolve the page it raised). The hold lasts
as long as the long window's evidence, as in the generated rules: a long window without data, or under
the minimum request rate, clears the tier, so a deployment drained or removed mid-episode resolves. A
deployment the plane keeps at 0 replicas on purpose gets no hold at all.

The same alert names and labels as the generated Prometheus rules are used, so one Alertmanager
configuration (routing, inhibition of a ticket by the page of the same SLO) serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from controlplane import names
from controlplane.slo.evaluate import NoData, SloStatus
from controlplane.slo.model import Severity

CLEAR_SINCE = "clear_since_unix_s"  # evidence of a firing episode whose condition has cleared, kept firing
State = Literal["pending", "firing", "resolved"]
Transition = Literal["pending", "firing", "resolved", "cancelled"]
ALERTNAMES: dict[str, str] = {"page": names.ALERT_SLO_BURN_PAGE, "ticket": names.ALERT_SLO_BURN_TICKET}


@dataclass(frozen=True)
class Condition:
    active: bool
    for_s: float
    evidence: dict[str, Any]
    known: bool = True  # False: not active, but not shown inactive either (a window without data): hold
    keep_s: float = 0.0  # a firing episode resolves only once the condition has been clear this long


@dataclass(frozen=True)
class Episode:
    slo: str
    deployment: str
    severity: Severity
    state: State
    started_unix_s: float
    fired_unix_s: float | None
    resolved_unix_s: float | None
    last_eval_unix_s: float
    evidence: dict[str, Any]
    id: int | None = None  # the store's row id once written

    @property
    def alertname(self) -> str:
        return ALERTNAMES[self.severity]


def condition(status: SloStatus, severity: Severity, *, hold: bool = True) -> Condition:
    """Whether `severity` should be active for this SLO now, with the numbers that say why. `hold` False (the
    deployment is scaled to 0 on purpose, so nothing can finish): a short window without data no longer holds."""
    slo = status.slo
    enabled = slo.alerting.page if severity == "page" else slo.alerting.ticket
    tiers: list[dict[str, Any]] = []
    active_for: list[float] = []
    unknown = False
    for tier in status.burn:
        if tier.window.severity != severity:
            continue
        long_r, short_r = tier.long.rate, tier.short.rate
        rate_ok = tier.long.request_rate_per_s >= slo.alerting.min_request_rate_per_s
        known = not isinstance(long_r, NoData) and not isinstance(short_r, NoData)
        on = (enabled and known and rate_ok and float(long_r) > tier.window.burn_rate  # type: ignore[arg-type]
              and float(short_r) > tier.window.burn_rate)  # type: ignore[arg-type]
        # As the generated rules' second branch: the long window still burns, with enough traffic, and no request
        # finished in the short one. A long window without data, or under the minimum rate, clears the tier:
        # a page must not outlive its evidence (a drained or removed deployment would re-page for ever).
        holding = (hold and enabled and not on and rate_ok and not isinstance(long_r, NoData)
                   and float(long_r) > tier.window.burn_rate and isinstance(short_r, NoData))
        if on:
            active_for.append(tier.window.for_s)
        elif holding:
            unknown = True
        tiers.append({
            "long": tier.long.label, "short": tier.short.label, "threshold": tier.window.burn_rate,
            "burn_long": None if isinstance(long_r, NoData) else long_r,
            "burn_short": None if isinstance(short_r, NoData) else short_r,
            "request_rate_per_s": tier.long.request_rate_per_s, "active": on,
        })
    active = bool(active_for)
    return Condition(active, min(active_for, default=0.0), {"sli": slo.sli, "tiers": tiers},
                     known=active or not unknown, keep_s=slo.alerting.keep_firing_s())


def step(prev: Episode | None, cond: Condition, *, slo: str, deployment: str, severity: Severity,
         now: float) -> tuple[Episode | None, Transition | None]:
    """The next episode (None: nothing active) and the transition that happened, if any."""
    live = prev if prev is not None and prev.state != "resolved" else None
    if live is not None and not cond.active and not cond.known:  # unknown holds what is open, as it is
        return replace(live, last_eval_unix_s=now, evidence={**cond.evidence, "held": "unknown"}), None
    if live is None:
        if not cond.active:
            return None, None
        ep = Episode(slo, deployment, severity, "pending", now, None, None, now, cond.evidence)
        if cond.for_s <= 0:
            return replace(ep, state="firing", fired_unix_s=now), "firing"
        return ep, "pending"
    if live.state == "pending":
        if not cond.active:
            return None, "cancelled"
        if now - live.started_unix_s >= cond.for_s:
            return replace(live, state="firing", fired_unix_s=now, last_eval_unix_s=now, evidence=cond.evidence), \
                "firing"
        return replace(live, last_eval_unix_s=now, evidence=cond.evidence), None
    # firing
    if cond.active:
        return replace(live, last_eval_unix_s=now, evidence=cond.evidence), None
    # Clear: it keeps firing until it has been clear for keep_s (as Prometheus' keep_firing_for counts it, from
    # the first evaluation that found it clear), so a burn hovering at the threshold is one page, not many.
    clear_since = float(live.evidence.get(CLEAR_SINCE, now))
    if now - clear_since < cond.keep_s:
        return replace(live, last_eval_unix_s=now, evidence={**cond.evidence, CLEAR_SINCE: clear_since}), None
    return replace(live, state="resolved", resolved_unix_s=now, last_eval_unix_s=now, evidence=cond.evidence), \
        "resolved"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def alertmanager_payload(ep: Episode, *, sli: str, wall_now: float, resend_s: float, runbook_url: str,
                         generator_url: str | None = None) -> dict[str, Any]:
    """One alert for Alertmanager's v2 API. A firing alert ends `4 * resend_s` from now unless re-sent
    (so a plane that dies lets its pages resolve instead of paging forever); a resolved one ends when
    it resolved."""
    assert ep.fired_unix_s is not None, "only firing or resolved episodes are sent"
    ends = ep.resolved_unix_s if ep.state == "resolved" else wall_now + 4 * resend_s
    active = [t for t in ep.evidence.get("tiers", []) if t.get("active")] or ep.evidence.get("tiers", [])
    worst = max(active, key=lambda t: t.get("burn_long") or 0.0, default=None)
    detail = (f"burning {worst['burn_long']:.1f}x over {worst['long']} and {worst['burn_short']:.1f}x over "
              f"{worst['short']} (threshold {worst['threshold']}x)"
              if worst and worst.get("burn_long") is not None and worst.get("burn_short") is not None else "")
    labels = {"alertname": ep.alertname, names.LABEL_SLO: ep.slo, names.LABEL_DEPLOYMENT: ep.deployment,
              names.LABEL_SEVERITY: ep.severity, names.LABEL_SLI: sli, "source": "controlplane"}
    sim = bool(ep.evidence.get("simulated"))
    if sim:  # the deployment runs the simulated engine: a receiver can route it away from people
        labels[names.LABEL_SIMULATED] = "true"
    body: dict[str, Any] = {
        "labels": labels,
        "annotations": {"summary": f"{'[simulated] ' if sim else ''}SLO {ep.slo} of {ep.deployment} is burning its "
                                   f"error budget ({ep.severity})",
                        "description": detail, "runbook_url": runbook_url},
        "startsAt": _rfc3339(ep.fired_unix_s),
        "endsAt": _rfc3339(ends if ends is not None else wall_now),
    }
    if generator_url:
        body["generatorURL"] = generator_url
    return body
