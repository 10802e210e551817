"""SLO evaluation from the store: rollups for the bulk of a window, raw rows for the rest, exact to now.

A window [start, end) splits into its minute-aligned middle and two partial minutes at the edges. The
middle is covered by a few rollup buckets (days in the centre, hours and minutes towards the edges, see
`decompose`); the edges, and the rows of the middle that the rollup has not reached yet (ids above its
watermark or in its open gaps), are read raw through the (replica_id, finish) and primary-key
indexes. The two parts never overlap, so the counts are exact for every configured target.

Reads are not in one database snapshot (SQLite has no cheap read snapshot through SQLAlchemy's
driver); instead the rollup state's version is read before and after, and the evaluation is retried
if a rollup committed in between. Nothing here reads the wall clock: `now` is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from sqlalchemy import Connection, Engine, func, or_, select, union_all

from controlplane.slo import sketch as sk
from controlplane.slo.counters import error_counts, error_series
from controlplane.slo.evaluate import (
    AttainmentPoint,
    Counts,
    Figure,
    NoData,
    Quantiles,
    SloStatus,
    build_status,
    burn_windows_of,
    point,
    timeslice_counts,
    window_range,
)
from controlplane.slo.model import LatencySli, LatencyTarget, Slo
from controlplane.slo.models import SloRollupCount, SloRollupSketch, SloTarget
from controlplane.slo.rollup import LEVELS_S, State, in_ranges_sql, read_state
from controlplane.slo.rows import ROW_COLUMNS, SLI_COLUMNS, Batch, bucket_starts, good_known, target_key
from controlplane.store.models import Deployment, Replica, Request

QUANTILES: Final = (0.5, 0.9, 0.95, 0.99)
TIMESLICE_S: Final = 60  # timeslices budgeting: one-minute slices, each good when it meets the objective
MAX_BINS: Final = 100_000


class RollupBusy(RuntimeError):
    """The rollup committed during every attempt to read a consistent evaluation."""


@dataclass(frozen=True)
class Piece:
    """A part of a window: whole rollup buckets of one level in [lo, hi), or raw rows (level None)."""

    level_s: int | None
    lo: float
    hi: float


def decompose(start: float, end: float, levels: Sequence[int] = LEVELS_S) -> list[Piece]:
    """Cover [start, end) with raw edges and the fewest aligned buckets (levels ascending, each
    dividing the next): minutes up to the first hour, hours up to the first day, days, and back."""
    fine = levels[0]
    a0, a1 = math.ceil(start / fine) * fine, math.floor(end / fine) * fine
    if a0 >= a1:
        return [Piece(None, start, end)] if start < end else []
    out = [Piece(None, start, a0)] if start < a0 else []

    def cover(lo: int, hi: int, i: int) -> list[Piece]:
        if i + 1 < len(levels):
            nxt = levels[i + 1]
            m0, m1 = -(-lo // nxt) * nxt, hi // nxt * nxt
            if m0 < m1:
                return ([Piece(levels[i], lo, m0)] if lo < m0 else []) + cover(m0, m1, i + 1) + \
                    ([Piece(levels[i], m1, hi)] if m1 < hi else [])
        return [Piece(levels[i], lo, hi)]

    out += cover(int(a0), int(a1), 0)
    return out + ([Piece(None, a1, end)] if a1 < end else [])


def _levels_for(bin_s: int | None) -> tuple[int, ...]:
    """Levels whose buckets never straddle a bin: those dividing the bin width."""
    if bin_s is None:
        return LEVELS_S
    if bin_s % LEVELS_S[0]:
        raise ValueError(f"resolution must be a whole number of minutes, got {bin_s} s")
    return tuple(lv for lv in LEVELS_S if bin_s % lv == 0)


class Reader:
    """Reads of one deployment's requests, sharing the rollup state and the raw rows between windows."""

    def __init__(self, conn: Connection, deployment: str) -> None:
        self.conn = conn
        self.state: State = read_state(conn)
        self.replicas: list[int] = [int(r) for r in conn.execute(
            select(Replica.id).join(Deployment, Deployment.id == Replica.deployment_id)
            .where(Deployment.name == deployment)).scalars()]
        self.ready: dict[str, int] = {str(k): int(i) for i, k, u, d in conn.execute(
            select(SloTarget.id, SloTarget.key, SloTarget.backfill_upto_id, SloTarget.backfill_done_id)) if d >= u}
        self._raw: dict[tuple[float, float], Batch] = {}
        self._unrolled: Batch | None = None

    def unchanged(self) -> bool:
        """True when no rollup committed since this reader read the state."""
        return read_state(self.conn).version == self.state.version

    # --- raw rows ---------------------------------------------------------------------------------
    def _rows(self, *where: Any) -> Batch:
        if not self.replicas:
            return Batch.from_rows([])
        rows = self.conn.execute(select(*ROW_COLUMNS).where(Request.replica_id.in_(self.replicas), *where)).all()
        return Batch.from_rows(rows)

    def raw(self, lo: float, hi: float) -> Batch:
        """Every row of the deployment finishing in [lo, hi), rolled up or not."""
        if (lo, hi) not in self._raw:
            self._raw[(lo, hi)] = self._rows(Request.finish_unix_s >= lo, Request.finish_unix_s < hi)
        return self._raw[(lo, hi)]

    def unrolled(self) -> Batch:
        """The deployment's rows the rollup has not counted: above the watermark or in an open gap.

        Selected by id alone (primary key ranges) and filtered by replica here: with a replica filter
        in SQL a planner may prefer the (replica_id, finish) index and scan the deployment's history.
        Its size is the rollup's lag; on a store whose rollup never ran it is every request.
        """
        if self._unrolled is None:
            cond = Request.id > self.state.watermark_id
            if self.state.gaps:
                cond = or_(cond, in_ranges_sql(self.state.gaps))
            b = Batch.from_rows(self.conn.execute(select(*ROW_COLUMNS).where(cond)).all())
            self._unrolled = b.select(np.isin(b.replica, self.replicas))
        return self._unrolled

    def rows(self, pieces: Sequence[Piece]) -> Batch:
        """The rows a set of pieces needs read raw: raw pieces whole, rollup pieces' unrolled rows."""
        parts = [self.raw(p.lo, p.hi) for p in pieces if p.level_s is None]
        rolled = [p for p in pieces if p.level_s is not None]
        if rolled:
            u = self.unrolled()
            lo, hi = min(p.lo for p in rolled), max(p.hi for p in rolled)
            parts.append(u.select((u.at >= lo) & (u.at < hi)))
        return _concat(parts)

    # --- counts -----------------------------------------------------------------------------------
    def counts(
        self, targets: tuple[LatencyTarget, ...], start: float, end: float, bin_s: int | None = None
    ) -> dict[float, Counts]:
        """Counts per bin (one bin keyed `start` when bin_s is None). Exact for a rolled-up target;
        a single latency target not rolled up comes from the sketches with exact bounds; any other
        target is counted from raw rows."""
        pieces = decompose(start, end, _levels_for(bin_s))
        key = target_key(targets)
        out: dict[float, Counts] = {}
        sketched = False
        if key in self.ready:
            self._add_rollup_counts(out, self.ready[key], pieces, start, bin_s)
        elif len(targets) == 1:
            sketched = self._add_sketch_counts(out, targets[0], pieces, start, bin_s)
        else:
            pieces = [Piece(None, start, end)]
        batch = self.rows(pieces)
        if len(batch):
            # Rows beside a sketch are judged as the sketch judges its own (it cannot tell a one-token answer or a
            # request that produced nothing: both unknown there), so here too, until the target is rolled up.
            good, known = good_known(batch.cols, targets, as_sketch=sketched)
            bins = _bin_of(batch.at, start, bin_s)
            for b in np.unique(bins):
                m = bins == b
                _add(out, float(b), Counts(int(good[m].sum()), int(known[m].sum()), int((~known[m]).sum())))
        return out

    def _per_piece(self, key: Any, cols: Sequence[Any], model: Any, pieces: Sequence[Piece]) -> Any:
        """UNION ALL of one primary-key range scan per rollup piece (`key` fixes the leading PK column).

        One OR-ed WHERE would be simpler, but planners (SQLite's at least) then scan every bucket of
        the target instead of a few index ranges.
        """
        if not self.replicas:
            return None
        parts = [select(model.level_s, model.bucket_start_unix_s, *cols).where(
            key, model.level_s == p.level_s, model.bucket_start_unix_s >= int(p.lo),
            model.bucket_start_unix_s < int(p.hi), model.replica_id.in_(self.replicas))
            for p in pieces if p.level_s is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else union_all(*parts)

    def _add_rollup_counts(
        self, out: dict[float, Counts], target_id: int, pieces: Sequence[Piece], start: float, bin_s: int | None
    ) -> None:
        c = SloRollupCount
        rows = self._per_piece(c.target_id == target_id, (c.good, c.total, c.unknown), c, pieces)
        if rows is None:
            return
        u = rows.subquery()
        q = (select(u.c.bucket_start_unix_s, func.sum(u.c.good), func.sum(u.c.total), func.sum(u.c.unknown))
             .group_by(u.c.level_s, u.c.bucket_start_unix_s))
        for b, good, total, unknown in self.conn.execute(q):
            _add(out, _bin_start(int(b), start, bin_s), Counts(int(good), int(total), int(unknown)))

    def _sketch_rows(self, column: str, pieces: Sequence[Piece]) -> list[Any]:
        """(level, bucket start, NULLs, blob) of the column's sketches in the pieces, every replica."""
        s = SloRollupSketch
        rows = self._per_piece(s.sli_column == column, (s.n_nulls, s.sketch), s, pieces)
        return [] if rows is None else list(self.conn.execute(rows))

    def _add_sketch_counts(
        self, out: dict[float, Counts], target: LatencyTarget, pieces: Sequence[Piece], start: float,
        bin_s: int | None,
    ) -> bool:
        """Adds what the stored sketches say; False when there were none (every row is read raw then)."""
        by_bin: dict[float, tuple[list[bytes], int]] = {}
        for _, b, nulls, blob in self._sketch_rows(SLI_COLUMNS[target.sli], pieces):
            blobs, n = by_bin.setdefault(_bin_start(int(b), start, bin_s), ([], 0))
            blobs.append(bytes(blob))
            by_bin[_bin_start(int(b), start, bin_s)] = (blobs, n + int(nulls))
        for b, (blobs, nulls) in by_bin.items():
            merged = sk.LogSketch.merged(blobs)
            lo, hi = merged.count_le(target.threshold_s)
            _add(out, b, Counts((lo + hi) / 2, merged.count, nulls, "sketch", (lo, hi)))
        return bool(by_bin)

    def sketch(self, column: str, start: float, end: float) -> tuple[sk.LogSketch, int]:
        """The merged sketch of a latency column over [start, end) and its count of NULLs."""
        pieces = decompose(start, end)
        rows = self._sketch_rows(column, pieces)
        merged = sk.LogSketch.merged(bytes(r[3]) for r in rows)
        batch = self.rows(pieces)
        merged.add(batch.cols[column])
        return merged, sum(int(r[2]) for r in rows) + int(np.isnan(batch.cols[column]).sum())


def _concat(parts: Sequence[Batch]) -> Batch:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Batch.from_rows([])
    return Batch(np.concatenate([p.ids for p in parts]), np.concatenate([p.replica for p in parts]),
                 np.concatenate([p.at for p in parts]),
                 {c: np.concatenate([p.cols[c] for p in parts]) for c in parts[0].cols})


def _bin_start(bucket: int, start: float, bin_s: int | None) -> float:
    return start if bin_s is None else float(bucket - bucket % bin_s)


def _bin_of(at: sk.FloatArray, start: float, bin_s: int | None) -> Any:
    return np.full(at.shape, start) if bin_s is None else bucket_starts(at, bin_s).astype(np.float64)


def _add(out: dict[float, Counts], b: float, c: Counts) -> None:
    out[b] = out[b] + c if b in out else c


# --- evaluation -------------------------------------------------------------------------------------
def _consistently(engine: Engine, deployment: str, attempts: int, fn: Any) -> Any:
    for _ in range(attempts):
        with engine.connect() as conn:
            reader = Reader(conn, deployment)
            result = fn(reader)
            if reader.unchanged():
                return result
    raise RollupBusy(f"the SLO rollup committed during each of {attempts} evaluation attempts; try again")


def _window_counts(reader: Reader, slo: Slo, start: float, end: float) -> Counts:
    if slo.sli == "error_rate":
        if slo.budgeting == "timeslices":
            series = error_series(reader.conn, reader.replicas, start, end, TIMESLICE_S)
            return timeslice_counts(series.values(), slo.objective)
        return error_counts(reader.conn, reader.replicas, start, end)
    if slo.budgeting == "timeslices":
        return timeslice_counts(reader.counts(slo.targets, start, end, TIMESLICE_S).values(), slo.objective)
    return reader.counts(slo.targets, start, end).get(start, Counts(0, 0))


def _quantiles(reader: Reader, slo: Slo, start: float, end: float, qs: Sequence[float]) -> tuple[Quantiles, ...]:
    out = []
    for sli in dict.fromkeys(t.sli for t in slo.targets):
        merged, _ = reader.sketch(SLI_COLUMNS[sli], start, end)
        values: list[tuple[float, Figure]] = []
        for q in qs:
            v = merged.quantile(q)
            values.append((q, v if v is not None else NoData()))
        out.append(Quantiles(sli, merged.count, tuple(values), sk.RELATIVE_ACCURACY))
    return tuple(out)


def evaluate(
    engine: Engine, slo: Slo, now: float, *, quantiles: Sequence[float] = QUANTILES, attempts: int = 5
) -> SloStatus:
    """The SLO's state at `now`: window counts, attainment, budget, burn rate per alert window, quantiles."""
    window = window_range(slo.window, now)

    def once(reader: Reader) -> SloStatus:
        counts = _window_counts(reader, slo, *window)
        burn = {s: _window_counts(reader, slo, now - s, now) for s in burn_windows_of(slo)}
        return build_status(slo, now, window, counts, burn, _quantiles(reader, slo, *window, quantiles))

    status: SloStatus = _consistently(engine, slo.deployment, attempts, once)
    return status


def evaluate_all(engine: Engine, slos: Sequence[Slo], now: float) -> list[SloStatus]:
    return [evaluate(engine, s, now) for s in slos]


def attainment_series(
    engine: Engine, slo: Slo, start: float, end: float, resolution_s: int, *, attempts: int = 5
) -> list[AttainmentPoint]:
    """Attainment per UTC-aligned bucket of `resolution_s` (whole minutes) over [start, end), for
    dashboards; the first and last bucket are clipped to the range. Occurrences in every bucket."""
    if not start < end:
        raise ValueError(f"start ({start}) must be earlier than end ({end})")
    if resolution_s <= 0 or (end - start) / resolution_s > MAX_BINS:
        raise ValueError(f"resolution {resolution_s} s: must be positive and give at most {MAX_BINS} points")
    _levels_for(resolution_s)

    def once(reader: Reader) -> dict[float, Counts]:
        if slo.sli == "error_rate":
            return {float(b): c for b, c in error_series(reader.conn, reader.replicas, start, end,
                                                          resolution_s).items()}
        return reader.counts(slo.targets, start, end, resolution_s)

    by_bin: dict[float, Counts] = _consistently(engine, slo.deployment, attempts, once)
    out = []
    first = math.floor(start / resolution_s)
    for k in range(first, math.ceil(end / resolution_s)):  # by index: a float edge plus a step may not move
        b = float(k * resolution_s)
        out.append(point(max(b, start), min(b + resolution_s, end), by_bin.get(b, Counts(0, 0))))
    return out


def threshold_counts(
    engine: Engine, deployment: str, sli: LatencySli, threshold_s: float, start: float, end: float,
    *, attempts: int = 5,
) -> Counts:
    """Good / total for any threshold: exact when it is a rolled-up target, else from the sketches
    (method "sketch", `good_bounds` exact bounds, the edges and the newest rows counted exactly)."""
    target = (LatencyTarget(sli, threshold_s),)
    counts: dict[float, Counts] = _consistently(engine, deployment, attempts,
                                                lambda r: r.counts(target, start, end))
    return counts.get(start, Counts(0, 0))
