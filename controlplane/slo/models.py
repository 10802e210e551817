"""SQLAlchemy models of the SLO rollup tables (migration 0003).

Rollups are keyed by replica, not deployment: a replica's deployment is joined at query time, so
moving a replica between deployments never leaves stale sums behind. Buckets are aligned to UTC epoch
multiples of their level (60 s, 3600 s, 86400 s): a window is covered by a handful of coarse buckets
in the middle and fine ones at the edges (see `controlplane.slo.query`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane import names
from controlplane.store.models import Base


class SloRollupState(Base):
    """Progress of the rollup over `requests`, one row per stream (today only "requests").

    Every request with id <= watermark_id is rolled up, except ids inside `gaps`: ranges that were
    missing when the watermark passed them ([lo, hi, first_seen_unix_s]), because a concurrent
    transaction may still commit rows there (PostgreSQL hands out ids before commit). Gaps are
    re-checked each run and forgotten after a settle time. `version` changes with every commit, so a
    reader can tell that it read the rollups and the state from one consistent moment.
    """

    __tablename__ = names.T_SLO_ROLLUP_STATE
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    watermark_id: Mapped[int] = mapped_column(BigInteger)
    gaps: Mapped[list[Any]] = mapped_column(JSON, default=list)
    version: Mapped[int] = mapped_column(BigInteger)
    updated_unix_s: Mapped[float]


class SloTarget(Base):
    """A good-event definition kept exact in the rollups, e.g. "ttft<=0.5" or "ttft<=0.5&tpot<=0.05".

    A target added after rows were rolled up is backfilled in bounded chunks: rows with
    id <= backfill_upto_id (and not in `backfill_excluded`, the gaps open when it was added) are
    counted once backfill_done_id reaches backfill_upto_id; until then queries treat it as ad hoc.
    """

    __tablename__ = names.T_SLO_TARGETS
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(500), unique=True)
    backfill_upto_id: Mapped[int] = mapped_column(BigInteger)
    backfill_done_id: Mapped[int] = mapped_column(BigInteger)
    backfill_excluded: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_unix_s: Mapped[float]


class SloRollupCount(Base):
    """Exact good / known / unknown request counts of one target, per bucket and replica."""

    __tablename__ = names.T_SLO_COUNTS
    target_id: Mapped[int] = mapped_column(ForeignKey(f"{names.T_SLO_TARGETS}.id"), primary_key=True)
    level_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start_unix_s: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    replica_id: Mapped[int] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"), primary_key=True)
    good: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)
    unknown: Mapped[int] = mapped_column(BigInteger)


class SloRollupSketch(Base):
    """The log-bucket histogram (controlplane.slo.sketch) of one latency column, per bucket and replica."""

    __tablename__ = names.T_SLO_SKETCHES
    sli_column: Mapped[str] = mapped_column(String(20), primary_key=True)  # ttft_s | tpot_s | e2e_s | queue_s
    level_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start_unix_s: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    replica_id: Mapped[int] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"), primary_key=True)
    n_values: Mapped[int] = mapped_column(BigInteger)  # values in the sketch (non-NULL)
    n_nulls: Mapped[int] = mapped_column(BigInteger)  # requests whose value was NULL (unknown)
    sketch: Mapped[bytes] = mapped_column(LargeBinary)
