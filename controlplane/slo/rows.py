"""Request rows as the SLO code sees them: the SLI columns, a batch of rows as arrays, good-event rules.

Shared by the rollup (which adds rows to buckets) and the queries (which count the rows not rolled up):
both must bucket and judge a row identically, or a window's two parts would not add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from controlplane.slo import sketch as sk
from controlplane.slo.model import LatencyTarget
from controlplane.store.models import Request

# The per-request column behind each latency SLI. itl is the per-request mean inter-token latency,
# i.e. tpot_s (vLLM's per-token ITL histogram only exists in Prometheus).
SLI_COLUMNS: Final[dict[str, str]] = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "tpot_s", "e2e": "e2e_s",
                                      "queue": "queue_s"}
SKETCH_COLUMNS: Final = ("ttft_s", "tpot_s", "e2e_s", "queue_s")
# The output length: one token has no inter-token latency to judge, none means no first token (see good_known).
TOKENS: Final = "completion_tokens"
ROW_COLUMNS: Final = (Request.id, Request.replica_id, Request.finish_unix_s,
                      *(Request.__table__.c[c] for c in SKETCH_COLUMNS), Request.completion_tokens)
# SLIs that do not exist for an answer of one token: its TPOT is NULL (decode.tpot), by definition, not missing.
_PER_TOKEN: Final = frozenset({"tpot", "itl"})


def target_key(targets: Iterable[LatencyTarget]) -> str:
    """Canonical text of a good-event definition: sorted "sli<=threshold" joined by "&"."""
    parts = sorted({f"{t.sli}<={t.threshold_s!r}" for t in targets})
    if not parts:
        raise ValueError("a rollup target needs at least one latency target")
    return "&".join(parts)


def parse_key(key: str) -> tuple[LatencyTarget, ...]:
    out = []
    for part in key.split("&"):
        sli, _, thr = part.partition("<=")
        if sli not in SLI_COLUMNS:
            raise ValueError(f"rollup target {key!r}: unknown SLI {sli!r}")
        out.append(LatencyTarget(sli, float(thr)))  # type: ignore[arg-type]
    return tuple(out)


def bucket_starts(at: sk.FloatArray, level_s: int) -> sk.IntArray:
    """floor(at / level) * level, corrected so `start <= at < start + level` holds exactly in float
    comparisons (the SQL range filters compare the same way)."""
    b = np.floor(at / level_s) * level_s
    b = np.where(at < b, b - level_s, b)
    b = np.where(at >= b + level_s, b + level_s, b)
    return b.astype(np.int64)


def good_known(cols: dict[str, sk.FloatArray], targets: Sequence[LatencyTarget],
               as_sketch: bool = False) -> tuple[Any, Any]:
    """(good, known) masks. Three-valued: a known miss of any target makes the request bad even when
    another target's value is NULL; it is good only when every target is known and met; otherwise
    unknown (neither good nor bad). Two NULLs are read from the output length (`cols[TOKENS]`):
    - a TPOT / ITL target is met by an answer of exactly one token: it has no inter-token latency (as vLLM's
      benchmark counts it). Were it unknown, such requests would count only when another target missed;
    - a TTFT target is missed by a request that ended with no token at all (aborted, timed out) after more
      than its threshold: its TTFT is longer than its e2e. Were it unknown, an overload whose requests time out
      before their first token would leave only the served ones to judge, and read as good. A NULL TTFT of a
      request that produced tokens (an engine that does not export it, a broken reading) stays unknown.
    `as_sketch` judges as a stored sketch of one column does, which cannot tell either case: both unknown."""
    n = len(next(iter(cols.values())))
    good = np.ones(n, dtype=bool)
    bad = np.zeros(n, dtype=bool)
    tokens = None if as_sketch else cols.get(TOKENS)
    for t in targets:
        v = cols[SLI_COLUMNS[t.sli]]
        with np.errstate(invalid="ignore"):
            met = v <= t.threshold_s  # NaN compares False
            missed = ~np.isnan(v) & ~met
            if tokens is not None and t.sli in _PER_TOKEN:
                met |= np.isnan(v) & (tokens == 1)  # NaN tokens (unknown length) compare False: unknown
            if tokens is not None and t.sli == "ttft" and "e2e_s" in cols:
                missed |= np.isnan(v) & (tokens == 0) & (cols["e2e_s"] > t.threshold_s)  # no token by then
        good &= met
        bad |= missed
    return good, good | bad


@dataclass(frozen=True)
class Batch:
    """Request rows as arrays; NULL values are NaN here (in memory only), NULL replicas dropped.

    `at` is when the request finished: SLO windows and rollup buckets count a request then, since
    that is when it is stored and known good or bad (as a Prometheus histogram counts it). By
    arrival, a window ending now would miss the requests still running, the slow ones first.
    """

    ids: sk.IntArray
    replica: sk.IntArray
    at: sk.FloatArray
    cols: dict[str, sk.FloatArray]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> Batch:
        """Rows of (id, replica_id, finish_unix_s, *SKETCH_COLUMNS, completion_tokens)."""
        # Plain tuples: numpy probing SQLAlchemy Row objects for array protocols costs more than the rows.
        a = np.array([tuple(r) for r in rows], dtype=np.float64).reshape(len(rows), 4 + len(SKETCH_COLUMNS))
        a = a[~np.isnan(a[:, 1])]  # a request of no replica belongs to no deployment
        return cls(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2],
                   {**{c: a[:, 3 + i] for i, c in enumerate(SKETCH_COLUMNS)}, TOKENS: a[:, -1]})

    def select(self, mask: Any) -> Batch:
        return Batch(self.ids[mask], self.replica[mask], self.at[mask],
                     {c: v[mask] for c, v in self.cols.items()})

    def __len__(self) -> int:
        return int(self.ids.size)
