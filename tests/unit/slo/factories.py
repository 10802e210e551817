"""Builders for SLO evaluation tests: SLOs, a small fleet, random request rows and brute-force oracles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, insert

from controlplane.slo.model import Alerting, LatencyTarget, Slo, SloWindow
from controlplane.store.models import Deployment, Replica, Request

NOW = 1_717_245_296.5  # 2024-06-01T12:34:56.5Z: not aligned to any rollup level
COLUMNS = ("ttft_s", "tpot_s", "e2e_s", "queue_s")
SLI_COLUMN = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "tpot_s", "e2e": "e2e_s", "queue": "queue_s"}


def make_slo(sli: str = "ttft", targets: tuple[tuple[str, float], ...] = (("ttft", 0.2),), *,
             objective: float = 0.9, window_s: float = 2 * 86400.0, kind: str = "rolling",
             name: str = "s", deployment: str = "d", budgeting: str = "occurrences") -> Slo:
    return Slo(name=name, deployment=deployment, sli=sli,  # type: ignore[arg-type]
               targets=tuple(LatencyTarget(s, t) for s, t in targets),  # type: ignore[arg-type]
               objective=objective, window=SloWindow(kind, window_s),  # type: ignore[arg-type]
               budgeting=budgeting, alerting=Alerting())  # type: ignore[arg-type]


def seed_fleet(engine: Engine, fleet: dict[str, list[int]] | None = None) -> None:
    """Deployments and their replica ids; replica 99 belongs to no deployment."""
    fleet = fleet or {"d": [1, 2], "other": [3]}
    with engine.begin() as c:
        for i, (name, replicas) in enumerate(fleet.items(), start=1):
            c.execute(insert(Deployment), {"id": i, "name": name, "created_unix_s": 0.0})
            for r in replicas:
                c.execute(insert(Replica), {"id": r, "deployment_id": i, "name": f"r{r}", "backend": "local",
                                            "state": "ready", "config_version": 0, "created_unix_s": 0.0})
        c.execute(insert(Replica), {"id": 99, "deployment_id": None, "name": "r99", "backend": "external",
                                    "state": "watched", "config_version": 0, "created_unix_s": 0.0})


@dataclass
class Rows:
    """Request rows as arrays (NaN = NULL), in the order they will be inserted. `finish` is when each
    request finished: the time SLO windows count it at (its arrival is finish - e2e)."""

    ids: np.ndarray
    replica: np.ndarray
    finish: np.ndarray
    cols: dict[str, np.ndarray]

    def take(self, idx: Any) -> Rows:
        return Rows(self.ids[idx], self.replica[idx], self.finish[idx], {c: v[idx] for c, v in self.cols.items()})

    def __len__(self) -> int:
        return len(self.ids)


def random_rows(n: int, *, seed: int = 0, span_s: float = 3 * 86400.0, end: float = NOW, first_id: int = 1,
                replicas: tuple[int, ...] = (1, 2, 3), null_ratio: float = 0.05) -> Rows:
    """Skewed latencies (lognormal bodies, Pareto tails), some NULLs, finishes over [end - span, end)."""
    rng = np.random.default_rng(seed)
    finish = end - rng.uniform(0, span_s, n)
    cols = {
        "ttft_s": rng.lognormal(-2.0, 1.0, n) * np.where(rng.random(n) < 0.02, rng.pareto(1.5, n) + 1, 1.0),
        "tpot_s": rng.lognormal(-4.0, 0.5, n),
        "e2e_s": rng.lognormal(0.0, 0.8, n),
        "queue_s": np.where(rng.random(n) < 0.3, 0.0, rng.exponential(0.05, n)),
    }
    for c in cols.values():
        c[rng.random(n) < null_ratio] = np.nan
    # Output lengths: a tenth are one-token answers, whose TPOT is NULL by definition (decode.tpot); some unknown.
    tokens = rng.integers(2, 200, n).astype(np.float64)
    tokens[rng.random(n) < 0.1] = 1.0
    tokens[rng.random(n) < null_ratio] = np.nan
    cols["tpot_s"][tokens == 1.0] = np.nan
    # And some ended with no token at all (aborted, timed out): neither TTFT nor TPOT.
    none = rng.random(n) < 0.03
    tokens[none] = 0.0
    cols["ttft_s"][none] = cols["tpot_s"][none] = np.nan
    cols["completion_tokens"] = tokens
    return Rows(np.arange(first_id, first_id + n), rng.choice(np.array(replicas), n), finish, cols)


def insert_rows(engine: Engine, rows: Rows) -> None:
    def val(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    data = [{"id": int(rows.ids[i]), "request_id": f"q{rows.ids[i]}",
             "replica_id": None if rows.replica[i] < 0 else int(rows.replica[i]),
             "arrival_unix_s": float(rows.finish[i] - np.nan_to_num(rows.cols["e2e_s"][i])),
             "finish_unix_s": float(rows.finish[i]), **{c: val(rows.cols[c][i]) for c in COLUMNS},
             "completion_tokens": (None if "completion_tokens" not in rows.cols
                                   or np.isnan(t := rows.cols["completion_tokens"][i]) else int(t)),
             "trace_id": f"{int(rows.ids[i]):032x}", "span_id": "0" * 16} for i in range(len(rows))]
    with engine.begin() as c:
        for i in range(0, len(data), 5000):
            c.execute(insert(Request), data[i:i + 5000])


def brute_counts(rows: Rows, targets: tuple[tuple[str, float], ...], start: float, end: float,
                 replicas: tuple[int, ...] = (1, 2), censored_ttft: bool = True) -> tuple[int, int, int]:
    """(good, known, unknown) by the three-valued rule, computed row by row in plain Python. A TPOT / ITL
    target is met by a one-token answer; a TTFT target is missed by a request with no token whose e2e passed the
    threshold (unless `censored_ttft` is False: as a sketch, which cannot tell either, both are unknown)."""
    good = known = unknown = 0
    tokens = rows.cols.get("completion_tokens")
    for i in range(len(rows)):
        if not (start <= rows.finish[i] < end) or int(rows.replica[i]) not in replicas:
            continue
        one_token = censored_ttft and tokens is not None and tokens[i] == 1.0
        values = [0.0 if s in ("tpot", "itl") and one_token else rows.cols[SLI_COLUMN[s]][i] for s, _ in targets]
        e2e = rows.cols["e2e_s"][i]
        # No first token by the end of a request longer than the TTFT threshold: a miss.
        no_token = tokens is not None and tokens[i] == 0.0
        values = [e2e if censored_ttft and s == "ttft" and no_token and np.isnan(v) and not np.isnan(e2e) and e2e > t
                  else v for v, (s, t) in zip(values, targets, strict=True)]
        if any(not np.isnan(v) and v > t for v, (_, t) in zip(values, targets, strict=True)):
            known += 1
        elif all(not np.isnan(v) for v in values):
            known += 1
            good += 1
        else:
            unknown += 1
    return good, known, unknown
