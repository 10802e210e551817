"""Maintenance of the SLO rollups: exact per-target counts and latency sketches per bucket and replica.

Why rollups: a 30-day evaluation over 10 million requests cannot scan them in under a second. Every
request is added once to its bucket at each level (1 min, 1 h, 1 d, by finish time, UTC-aligned) so a
window is a sum of a few hundred rows. Counts of the configured targets are exact; latency quantiles
come from mergeable log histograms (relative error <= sketch.RELATIVE_ACCURACY).

Progress follows request ids, not finish times: spans arrive late and out of order, and every update
is additive, so a late row simply lands in an old bucket. Each batch and the watermark move in one
transaction, so a crash or a second runner never double counts (the state row is locked first).
Ids below the watermark that were missing when it passed ("gaps", e.g. a PostgreSQL transaction that
took its ids earlier but commits later, or ids burnt by ON CONFLICT) are re-checked on every run and
forgotten after `settle_s`; a row committing later than that would be missed (transactions here last
milliseconds). Readers treat gap ids and ids above the watermark as not rolled up and read them raw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from sqlalchemy import Connection, Engine, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from controlplane.slo import sketch as sk
from controlplane.slo.model import LatencyTarget
from controlplane.slo.models import SloRollupCount, SloRollupSketch, SloRollupState, SloTarget
from controlplane.slo.rows import ROW_COLUMNS, SKETCH_COLUMNS, Batch, bucket_starts, good_known, parse_key
from controlplane.store.models import Request

log = logging.getLogger(__name__)

LEVELS_S: Final = (60, 3600, 86400)  # each divides the next; all divide a UTC day
STREAM: Final = "requests"
SETTLE_S: Final = 600.0
MAX_GAPS: Final = 10_000
_REPLICA_BITS: Final = 24


# --- gap bookkeeping (pure) -------------------------------------------------------------------------
def gaps_between(prev_watermark: int, ids: sk.IntArray) -> list[tuple[int, int]]:
    """Id ranges (inclusive) missing between the watermark and the sorted ids just read."""
    if ids.size == 0:
        return []
    edges = np.concatenate(([prev_watermark], ids))
    at = np.flatnonzero(np.diff(edges) > 1)
    return [(int(edges[i]) + 1, int(edges[i + 1]) - 1) for i in at]


def in_ranges(ids: sk.IntArray, ranges: Sequence[Sequence[float]]) -> Any:
    """Mask of ids inside any inclusive [lo, hi] range (ranges do not overlap)."""
    if not ranges:
        return np.zeros(ids.shape, dtype=bool)
    r = sorted((int(g[0]), int(g[1])) for g in ranges)
    los = np.array([g[0] for g in r])
    his = np.array([g[1] for g in r])
    i = np.searchsorted(los, ids, side="right") - 1
    ok = i >= 0
    ok[ok] = ids[ok] <= his[i[ok]]
    return ok


def subtract_ids(ranges: Sequence[Sequence[float]], found: sk.IntArray) -> list[list[float]]:
    """Gap ranges minus the ids found in them; each piece keeps its range's first-seen time."""
    out: list[list[float]] = []
    found = np.sort(found)
    for g in ranges:
        lo, hi, seen = int(g[0]), int(g[1]), float(g[2])
        inside = found[(found >= lo) & (found <= hi)]
        for x in inside:
            if x > lo:
                out.append([lo, int(x) - 1, seen])
            lo = int(x) + 1
        if lo <= hi:
            out.append([lo, hi, seen])
    return out


def _groups(batch: Batch, level_s: int) -> tuple[sk.IntArray, sk.IntArray, sk.IntArray]:
    """(bucket starts, replica ids, inverse index) of the distinct (bucket, replica) pairs."""
    if batch.replica.size and int(batch.replica.max()) >= 2**_REPLICA_BITS:
        raise OverflowError(f"replica id {int(batch.replica.max())} exceeds the rollup's 2^{_REPLICA_BITS}")
    code = (bucket_starts(batch.at, level_s) // level_s) * 2**_REPLICA_BITS + batch.replica
    uniq, inv = np.unique(code, return_inverse=True)
    return (uniq >> _REPLICA_BITS) * level_s, uniq & (2**_REPLICA_BITS - 1), inv.ravel()


def _upsert(conn: Connection, table: Any, keys: list[str], rows: list[dict[str, Any]], add: bool) -> None:
    """INSERT ... ON CONFLICT DO UPDATE: added to the stored values (counts) or replacing them (sketches).

    Compiled once and handed to the driver's executemany: SQLAlchemy's per-row parameter processing
    costs more than the database work at a million rollup rows.
    """
    if not rows:
        return
    cols = list(rows[0])
    ck = (conn.dialect.name, conn.dialect.paramstyle, table.name, add)
    sql = _UPSERT_SQL.get(ck)
    if sql is None:
        ins: Any = sqlite.insert(table) if conn.dialect.name == "sqlite" else postgresql.insert(table)
        set_ = {c: (table.c[c] + ins.excluded[c]) if add else ins.excluded[c] for c in cols if c not in keys}
        stmt = ins.on_conflict_do_update(index_elements=keys, set_=set_)
        sql = _UPSERT_SQL[ck] = str(stmt.compile(dialect=conn.dialect, column_keys=cols))
    if conn.dialect.paramstyle == "qmark":
        conn.exec_driver_sql(sql, [tuple(r[c] for c in cols) for r in rows])
    else:
        conn.exec_driver_sql(sql, rows)


_UPSERT_SQL: dict[tuple[str, str, str, bool], str] = {}


_COUNT_KEYS: Final = ["target_id", "level_s", "bucket_start_unix_s", "replica_id"]
_SKETCH_KEYS: Final = ["sli_column", "level_s", "bucket_start_unix_s", "replica_id"]


def add_counts(conn: Connection, batch: Batch, targets: Sequence[tuple[int, tuple[LatencyTarget, ...]]]) -> None:
    """Add the batch's good / known / unknown counts of each target to every level's buckets."""
    if not len(batch) or not targets:
        return
    rows: list[dict[str, Any]] = []
    for level in LEVELS_S:
        starts, replicas, inv = _groups(batch, level)
        for target_id, target in targets:
            good, known = good_known(batch.cols, target)
            g = np.bincount(inv, weights=good, minlength=starts.size)
            k = np.bincount(inv, weights=known, minlength=starts.size)
            n = np.bincount(inv, minlength=starts.size)
            rows += [{"target_id": target_id, "level_s": level, "bucket_start_unix_s": int(b), "replica_id": int(r),
                      "good": int(gi), "total": int(ki), "unknown": int(ni - ki)}
                     for b, r, gi, ki, ni in zip(starts, replicas, g, k, n, strict=True)]
    _upsert(conn, SloRollupCount.__table__, _COUNT_KEYS, rows, add=True)


def add_sketches(conn: Connection, batch: Batch) -> None:
    """Merge the batch's values into the stored sketch of each column, level, bucket and replica."""
    if not len(batch):
        return
    rows: list[dict[str, Any]] = []
    for level in LEVELS_S:
        starts, replicas, inv = _groups(batch, level)
        stored = _stored_sketches(conn, level, starts, replicas)
        for column in SKETCH_COLUMNS:
            v = batch.cols[column]
            known = ~np.isnan(v)
            nulls = np.bincount(inv, weights=~known, minlength=starts.size).astype(np.int64).tolist()
            code = inv[known] * 65536 + (sk.keys_of(v[known]) + 32768)
            u, c = np.unique(code, return_counts=True)
            cut = np.searchsorted(u >> 16, np.arange(starts.size + 1)).tolist()
            all_keys, all_counts = (u & 0xFFFF) - 32768, c.astype(np.int64)
            # A new bucket's blob is a slice of one encoding of the whole batch (no per-bucket numpy).
            kb, cb = all_keys.astype("<i2").tobytes(), all_counts.astype("<u4").tobytes()
            csum = np.concatenate(([0], np.cumsum(all_counts))).tolist()
            for i, (b, r) in enumerate(zip(starts.tolist(), replicas.tolist(), strict=True)):
                a, z = cut[i], cut[i + 1]
                old = stored.get((column, b, r))
                if old is None:
                    blob, n_values, n_nulls = sk.header(z - a) + kb[2 * a:2 * z] + cb[4 * a:4 * z], csum[z] - csum[a], 0
                else:
                    ok, oc = sk.decode(old[2])
                    keys, inv_k = np.unique(np.concatenate((ok, all_keys[a:z])), return_inverse=True)
                    counts = np.bincount(inv_k.ravel(), weights=np.concatenate((oc, all_counts[a:z]))).astype(np.int64)
                    blob, n_values, n_nulls = sk.encode(keys, counts), int(counts.sum()), old[1]
                rows.append({"sli_column": column, "level_s": level, "bucket_start_unix_s": b, "replica_id": r,
                             "n_values": n_values, "n_nulls": n_nulls + nulls[i], "sketch": blob})
    _upsert(conn, SloRollupSketch.__table__, _SKETCH_KEYS, rows, add=False)


def _stored_sketches(
    conn: Connection, level: int, starts: sk.IntArray, replicas: sk.IntArray
) -> dict[tuple[str, int, int], tuple[int, int, bytes]]:
    """The stored sketches of the batch's (bucket, replica) pairs, read as a few primary-key ranges:
    runs of nearby buckets, one query each. (A long IN list made PostgreSQL scan every bucket of the
    level while the table's statistics still described an empty table.)"""
    wanted = set(zip(starts.tolist(), replicas.tolist(), strict=True))
    out: dict[tuple[str, int, int], tuple[int, int, bytes]] = {}
    s = SloRollupSketch
    distinct = np.unique(starts)
    breaks = np.flatnonzero(np.diff(distinct) > 16 * level) + 1
    for run_ in np.split(distinct, breaks):
        # sli_column leads the primary key: naming all of them keeps this an index range, not a scan.
        q = select(s.sli_column, s.bucket_start_unix_s, s.replica_id, s.n_values, s.n_nulls, s.sketch).where(
            s.sli_column.in_(SKETCH_COLUMNS), s.level_s == level,
            s.bucket_start_unix_s >= int(run_[0]), s.bucket_start_unix_s <= int(run_[-1]))
        for col, b, r, nv, nn, blob in conn.execute(q):
            if (b, r) in wanted:
                out[(col, b, r)] = (nv, nn, bytes(blob))
    return out


# --- the state row ------------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    watermark_id: int
    gaps: tuple[tuple[int, int, float], ...]
    version: int


def lock_state(conn: Connection, now: float) -> State:
    """Create the state row if missing, then lock it (an UPDATE: a row lock on PostgreSQL, the write
    lock on SQLite) and read it. Every rollup transaction starts here, so runners serialise."""
    ins: Any = sqlite.insert(SloRollupState) if conn.dialect.name == "sqlite" else postgresql.insert(SloRollupState)
    conn.execute(ins.on_conflict_do_nothing(), {"name": STREAM, "watermark_id": 0, "gaps": [], "version": 0,
                                                 "updated_unix_s": now})
    conn.execute(update(SloRollupState).where(SloRollupState.name == STREAM).values(updated_unix_s=now))
    return read_state(conn)


def read_state(conn: Connection) -> State:
    row = conn.execute(select(SloRollupState.watermark_id, SloRollupState.gaps, SloRollupState.version)
                       .where(SloRollupState.name == STREAM)).first()
    if row is None:
        return State(0, (), 0)
    return State(int(row[0]), tuple((int(g[0]), int(g[1]), float(g[2])) for g in row[1]), int(row[2]))


def _save_state(conn: Connection, watermark: int, gaps: Sequence[Sequence[float]], version: int) -> None:
    conn.execute(update(SloRollupState).where(SloRollupState.name == STREAM).values(
        watermark_id=watermark, gaps=[[int(g[0]), int(g[1]), float(g[2])] for g in gaps], version=version + 1))


# --- running --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RollupReport:
    rows: int  # rows read and rolled up in this run (incl. gap rows and backfill)
    watermark_id: int
    open_gaps: int
    backfilling: tuple[str, ...]  # targets not yet exact (queries use their fallback)


def read_rows(conn: Connection, *where: Any, limit: int | None = None) -> tuple[sk.IntArray, Batch]:
    """(every id read, NULL-replica rows included; the batch of rows that belong to a replica), by id."""
    q = select(*ROW_COLUMNS).where(*where).order_by(Request.id)
    if limit is not None:
        q = q.limit(limit)
    rows = conn.execute(q).all()
    return np.array([r[0] for r in rows], dtype=np.int64), Batch.from_rows(rows)


def in_ranges_sql(ranges: Sequence[Sequence[float]]) -> Any:
    """SQL: id inside any of the inclusive ranges."""
    return or_(*(Request.id.between(int(g[0]), int(g[1])) for g in ranges))


def _targets(conn: Connection) -> list[tuple[int, str, int, int, list[Any]]]:
    t = SloTarget
    return [(int(i), str(k), int(u), int(d), list(e)) for i, k, u, d, e in conn.execute(
        select(t.id, t.key, t.backfill_upto_id, t.backfill_done_id, t.backfill_excluded))]


def register_targets(engine: Engine, keys: Iterable[str], now: float, *, retire_others: bool = True) -> None:
    """Make `keys` the maintained targets. A new one starts backfilling from the current watermark;
    with retire_others, targets no longer asked for are dropped (their counts would go stale)."""
    keys = set(keys)
    for key in keys:
        parse_key(key)
    with engine.begin() as conn:
        state = lock_state(conn, now)
        have = {k: i for i, k, *_ in _targets(conn)}
        for key in sorted(keys - set(have)):
            conn.execute(insert(SloTarget), {
                "key": key, "backfill_upto_id": state.watermark_id, "backfill_done_id": 0,
                "backfill_excluded": [[lo, hi] for lo, hi, _ in state.gaps], "created_unix_s": now})
        if retire_others:
            gone = [i for k, i in have.items() if k not in keys]
            if gone:
                conn.execute(delete(SloRollupCount).where(SloRollupCount.target_id.in_(gone)))
                conn.execute(delete(SloTarget).where(SloTarget.id.in_(gone)))
                _save_state(conn, state.watermark_id, state.gaps, state.version)  # readers must re-read


def run(
    engine: Engine, keys: Iterable[str], now: float, *, batch_rows: int = 50_000, max_rows: int | None = None,
    settle_s: float = SETTLE_S,
) -> RollupReport:
    """Bring the rollups up to date: register targets, re-check gaps, roll up new rows, backfill.

    Idempotent and safe to call from a loop or from several processes at once. `max_rows` bounds one
    call's work (a loop catches up over several ticks); each batch is its own transaction.
    """
    register_targets(engine, keys, now)
    done = 0
    while max_rows is None or done < max_rows:
        limit = batch_rows if max_rows is None else min(batch_rows, max_rows - done)
        n, more = _step(engine, now, limit, settle_s)
        done += n
        if not more:
            break
    while max_rows is None or done < max_rows:
        limit = batch_rows if max_rows is None else min(batch_rows, max_rows - done)
        n, more = _backfill_step(engine, now, limit)
        done += n
        if not more:
            break
    with engine.connect() as conn:
        state = read_state(conn)
        pending = tuple(sorted(k for _, k, upto, d, _ in _targets(conn) if d < upto))
    return RollupReport(done, state.watermark_id, len(state.gaps), pending)


def _step(engine: Engine, now: float, limit: int, settle_s: float) -> tuple[int, bool]:
    """One transaction: rows found in open gaps, then up to `limit` rows above the watermark."""
    with engine.begin() as conn:
        state = lock_state(conn, now)
        targets = [(i, parse_key(k)) for i, k, *_ in _targets(conn)]
        gaps: list[list[float]] = [list(g) for g in state.gaps]
        n = 0
        for i in range(0, len(state.gaps), 200):
            hit, found = read_rows(conn, in_ranges_sql(state.gaps[i:i + 200]))
            add_counts(conn, found, targets)
            add_sketches(conn, found)
            n += int(hit.size)
            gaps = subtract_ids(gaps, hit)
        ids, batch = read_rows(conn, Request.id > state.watermark_id, limit=limit)
        add_counts(conn, batch, targets)
        add_sketches(conn, batch)
        n += int(ids.size)
        gaps += [[lo, hi, now] for lo, hi in gaps_between(state.watermark_id, ids)]
        kept = [g for g in gaps if now - g[2] < settle_s]
        if len(kept) > MAX_GAPS:
            log.warning("slo rollup: %d open id gaps, forgetting the oldest %d", len(kept), len(kept) - MAX_GAPS)
            kept = sorted(kept, key=lambda g: g[2])[-MAX_GAPS:]
        watermark = int(ids[-1]) if ids.size else state.watermark_id
        if n or kept != [list(g) for g in state.gaps]:
            _save_state(conn, watermark, sorted(kept), state.version)
    return n, ids.size >= limit


def _backfill_step(engine: Engine, now: float, limit: int) -> tuple[int, bool]:
    """One transaction of backfill for the first target still behind; (rows, more to do)."""
    with engine.begin() as conn:
        lock_state(conn, now)
        behind = [t for t in _targets(conn) if t[3] < t[2]]
        if not behind:
            return 0, False
        target_id, key, upto, done_id, excluded = behind[0]
        ids, batch = read_rows(conn, Request.id > done_id, Request.id <= upto, limit=limit)
        add_counts(conn, batch.select(~in_ranges(batch.ids, excluded)), [(target_id, parse_key(key))])
        reached = int(ids[-1]) if ids.size >= limit else upto
        conn.execute(update(SloTarget).where(SloTarget.id == target_id).values(backfill_done_id=reached))
        state = read_state(conn)
        _save_state(conn, state.watermark_id, state.gaps, state.version)
    return int(ids.size), True


def rebuild(engine: Engine, now: float) -> None:
    """Forget every rollup and start over from the first request (the next `run` recomputes all)."""
    with engine.begin() as conn:
        state = lock_state(conn, now)
        conn.execute(delete(SloRollupCount))
        conn.execute(delete(SloRollupSketch))
        conn.execute(update(SloTarget).values(backfill_upto_id=0, backfill_done_id=0, backfill_excluded=[]))
        conn.execute(update(SloRollupState).where(SloRollupState.name == STREAM).values(
            watermark_id=0, gaps=[], version=state.version + 1))
