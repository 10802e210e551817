"""Recommendations in the store: proposed changes with their evidence, applied by a person or the plane.

Statuses: open -> applied | dismissed | superseded; applied -> rolled_back (the SLO got worse after
the change) | failed (the supervisor refused it). Every status change is kept with who decided it.
A recommendation becomes applied when its application starts (`claim`, outcome.applying_since_unix_s), so a
second person, the tuner's next proposal or its clean-up cannot act on it meanwhile; status changes are
compare-and-set, so of two racing decisions one is refused with a 409.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, insert, select, update

from controlplane.store.models import Recommendation

Kind = Literal["scale", "reconfigure"]
Mode = Literal["recommend", "auto"]
OPEN, APPLIED, DISMISSED, SUPERSEDED, ROLLED_BACK, FAILED = (
    "open", "applied", "dismissed", "superseded", "rolled_back", "failed")


def made_for_replicas(rec: Mapping[str, Any]) -> int | None:
    """The replica count a recommendation was made for (its `current`), or None when it has none (or not a
    number). Its proposal is sized for that count: applied to another, it is stale."""
    try:
        return int(rec["current"]["replicas"])
    except (KeyError, TypeError, ValueError):
        return None


# How long a recommendation may wait for a person before it is too old to apply.
MAX_AGE_S: dict[str, float] = {"scale": 3600.0, "reconfigure": 86_400.0}


def engine_changed_since(rec: Mapping[str, Any], live: Any) -> str | None:
    """Which engine settings the recommendation was made for (`current.engine_config`, the whole configuration,
    when stored; else `current.engine`) differ from the live ones, in words, or None. A count or a configuration
    is sized for the engine it was decided on: applied over a change made since, it would be wrong for it, and a
    configuration would undo that change."""
    current = rec.get("current")
    if not isinstance(current, Mapping) or not isinstance(live, Mapping):
        return None
    then = current.get("engine_config") or current.get("engine")
    if not isinstance(then, Mapping):
        return None
    changed = [f"{k} {v!r} (now {live.get(k)!r})" for k, v in then.items() if live.get(k) != v]
    return ", ".join(changed) or None


def too_old(rec: Mapping[str, Any], now: float) -> str | None:
    """Why a recommendation is too old to apply, or None: it stands on the load of its round (a scale) or of its
    search's window (a configuration), which says little of the load much later."""
    limit = MAX_AGE_S.get(str(rec.get("kind")))
    made = rec.get("created_unix_s")
    if limit is None or not isinstance(made, int | float) or now - made <= limit:
        return None
    return f"made {(now - made) / 3600:.1f} h ago, on the load of then (a {rec['kind']} recommendation is kept " \
           f"for {limit / 3600:g} h)"



class RecommendationError(ValueError):
    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Proposal:
    deployment: str
    kind: Kind
    reason: str
    current: Mapping[str, Any]
    proposed: Mapping[str, Any]
    evidence: Mapping[str, Any]
    confidence: float | None = None


class Recommendations:
    def __init__(self, engine: Engine, clock: Any = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def add(self, p: Proposal, mode: Mode) -> int:
        """Store a proposal; an older open one of the same kind for the deployment is superseded."""
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(update(Recommendation).where(
                Recommendation.deployment == p.deployment, Recommendation.kind == p.kind,
                Recommendation.status == OPEN).values(status=SUPERSEDED, decided_unix_s=now, decided_by="tuner"))
            rid = conn.execute(insert(Recommendation).values(
                created_unix_s=now, deployment=p.deployment, kind=p.kind, mode=mode, status=OPEN, reason=p.reason,
                current=dict(p.current), proposed=dict(p.proposed), evidence=dict(p.evidence),
                confidence=p.confidence).returning(Recommendation.id)).scalar_one()
        return int(rid)

    def get(self, rid: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(Recommendation.__table__).where(Recommendation.id == rid)).first()
        if row is None:
            raise RecommendationError(f"no recommendation {rid}", 404)
        return dict(row._mapping)

    def list(self, *, deployment: str | None = None, status: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(Recommendation.__table__).order_by(Recommendation.id.desc()).limit(limit)
        if deployment is not None:
            stmt = stmt.where(Recommendation.deployment == deployment)
        if status is not None:
            stmt = stmt.where(Recommendation.status == status)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def decide(self, rid: int, status: str, *, by: str, outcome: Mapping[str, Any] | None = None,
               expect: tuple[str, ...] = (OPEN,)) -> dict[str, Any]:
        """Move a recommendation to `status` if it is in one of `expect` (409 otherwise).

        Compare-and-set: the row is updated only while it still holds the status that was read, so of two
        deciders racing (a person and the tuner, or two people) one wins and the other gets the 409."""
        current = self.get(rid)
        if current["status"] not in expect:
            raise self._refusal(rid, current["status"], status, expect)
        values: dict[str, Any] = {"status": status, "decided_unix_s": self.clock(), "decided_by": by}
        if outcome is not None:
            values["outcome"] = {**(current["outcome"] or {}), **dict(outcome)}
        with self.engine.begin() as conn:
            changed = self._set_if_unchanged(conn, current, values)
        if not changed:
            raise self._refusal(rid, self.get(rid)["status"], status, expect, raced=True)
        return self.get(rid)

    @staticmethod
    def _set_if_unchanged(conn: Connection, current: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
        """Update the row to `values` only while it still holds the status and decision time of `current`
        (compare-and-set); whether it did."""
        decided = Recommendation.decided_unix_s
        return bool(conn.execute(update(Recommendation).where(
            Recommendation.id == current["id"], Recommendation.status == current["status"],
            decided.is_(None) if current["decided_unix_s"] is None else decided == current["decided_unix_s"])
            .values(**values)).rowcount == 1)

    def claim(self, rid: int, *, by: str) -> dict[str, Any]:
        """Mark an open recommendation applied before acting on it, so nobody else applies, dismisses or
        supersedes it meanwhile; the caller then records the result (applied) or the refusal (failed)."""
        return self.decide(rid, APPLIED, by=by, outcome={"applying_since_unix_s": self.clock()})

    def release(self, rid: int, *, note: str) -> dict[str, Any]:
        """Undo a claim whose action was refused for now (a rolling change running, the plane shutting down):
        the recommendation is open again, to be applied later, with the refusal noted in its outcome. One made
        meanwhile for the same deployment and kind (which could not supersede a claimed one) wins: this one is
        superseded instead of open beside it. Compare-and-set on the claim, like `decide`."""
        current = self.get(rid)
        if current["status"] != APPLIED:
            raise self._refusal(rid, current["status"], OPEN, (APPLIED,))
        now = self.clock()
        outcome = {k: v for k, v in (current["outcome"] or {}).items() if k != "applying_since_unix_s"}
        outcome["last_refused"] = {"at_unix_s": now, "error": note}
        with self.engine.begin() as conn:
            newer = conn.execute(select(Recommendation.id).where(  # still standing: open, or applied since
                Recommendation.deployment == current["deployment"], Recommendation.kind == current["kind"],
                Recommendation.id > rid, Recommendation.status.in_((OPEN, APPLIED))).limit(1)).first()
            values: dict[str, Any] = ({"status": SUPERSEDED, "decided_unix_s": now, "decided_by": "tuner"}
                                      if newer is not None else
                                      {"status": OPEN, "decided_unix_s": None, "decided_by": None})
            changed = self._set_if_unchanged(conn, current, {"outcome": outcome, **values})
        if not changed:
            raise self._refusal(rid, self.get(rid)["status"], OPEN, (APPLIED,), raced=True)
        return self.get(rid)

    @staticmethod
    def _refusal(rid: int, is_: str, to: str, expect: tuple[str, ...], raced: bool = False) -> RecommendationError:
        return RecommendationError(f"recommendation {rid} is {is_}{' (changed meanwhile)' if raced else ''}; "
                                   f"only {' or '.join(expect)} ones can become {to}")
