"""One tick of SLO monitoring: advance the rollups, evaluate every SLO, publish the statuses.

The plane calls `tick(now)` from a loop (a thread or `asyncio.to_thread`); the exporter and the API
read `statuses`. Kept apart from the arithmetic and the queries so both stay free of scheduling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sqlalchemy import Engine

from controlplane.slo.evaluate import SloStatus
from controlplane.slo.export import LatestStatuses
from controlplane.slo.model import Slo
from controlplane.slo.query import evaluate
from controlplane.slo.rollup import RollupReport, run
from controlplane.slo.rows import target_key

log = logging.getLogger(__name__)


def rollup_keys(slos: Sequence[Slo]) -> set[str]:
    """The targets to keep exact in the rollups: every latency and goodput SLO's good-event definition."""
    return {target_key(s.targets) for s in slos if s.targets}


class SloMonitor:
    def __init__(self, engine: Engine, slos: Sequence[Slo], *, max_rows_per_tick: int = 500_000,
                 started_unix_s: float | None = None) -> None:
        self.engine = engine
        self.slos = tuple(slos)
        self.max_rows_per_tick = max_rows_per_tick  # bounds one tick; a big backlog is caught up over ticks
        self.statuses = LatestStatuses()
        self.started_unix_s = time.time() if started_unix_s is None else started_unix_s
        self.evaluated_unix_s: dict[str, float] = {}  # SLO name -> `now` of its last successful evaluation

    def evaluation_ages(self, now: float) -> dict[tuple[str, str], float]:
        """(SLO, deployment) -> seconds since its last successful evaluation, or since the monitor started when
        it has none: an SLO that is not evaluated cannot page, and this is what says so."""
        return {(s.name, s.deployment): max(0.0, now - self.evaluated_unix_s.get(s.name, self.started_unix_s))
                for s in self.slos}

    def tick(self, now: float) -> tuple[RollupReport | None, list[SloStatus]]:
        """Roll up, then evaluate each SLO; an SLO whose evaluation fails is logged and left out. A failed rollup
        (e.g. a locked SQLite file) does not stop the evaluation: the queries read the rows not yet rolled up raw,
        and skipping every SLO would let open pages lapse in Alertmanager."""
        try:
            report = run(self.engine, rollup_keys(self.slos), now, max_rows=self.max_rows_per_tick)
        except Exception:  # noqa: BLE001 - retried next tick; the evaluation below does not depend on it
            log.exception("rolling up request rows failed; evaluating from the rows as they are")
            report = None
        out = []
        for slo in self.slos:
            try:
                out.append(evaluate(self.engine, slo, now))
                self.evaluated_unix_s[slo.name] = now
            except Exception:  # noqa: BLE001 - one broken SLO must not hide the others
                log.exception("evaluating SLO %s failed", slo.name)
        self.statuses.update(out)
        return report, out
