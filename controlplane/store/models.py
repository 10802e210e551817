"""Typed SQLAlchemy 2 models of the store.

Times are UNIX epoch seconds as doubles (`*_unix_s`): portable across SQLite and PostgreSQL,
cheap to index and to range-scan, and free of timezone ambiguity. Durations carry `_s`.
Every reading column is nullable on purpose: NULL means *unknown* (a failed scrape, a missing
metric), which downstream code must never read as zero.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from controlplane import names

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for big tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, float: Double}


class Deployment(Base):
    __tablename__ = names.T_DEPLOYMENTS
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model: Mapped[str | None] = mapped_column(String(500))
    spec: Mapped[dict[str, Any] | None]
    created_unix_s: Mapped[float]
    # The supervisor's desired state, kept here so a restarted plane resumes it (a scale or a rolling
    # change made at run time survives a plane restart while the spec file is unchanged).
    desired_replicas: Mapped[int | None]
    engine_config: Mapped[dict[str, Any] | None]
    updated_unix_s: Mapped[float | None]


class Replica(Base):
    __tablename__ = names.T_REPLICAS
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int | None] = mapped_column(ForeignKey(f"{names.T_DEPLOYMENTS}.id"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    url: Mapped[str | None] = mapped_column(String(500))
    backend: Mapped[str] = mapped_column(String(20))  # local | ray | external
    state: Mapped[str] = mapped_column(String(20))
    config_version: Mapped[int] = mapped_column(default=0)
    created_unix_s: Mapped[float]
    # What the supervisor needs to find the replica again after a plane restart (backend-specific:
    # pid + process start time + port for local, actor name + namespace for Ray). NULL for replicas
    # the plane only watches.
    runtime: Mapped[dict[str, Any] | None]
    updated_unix_s: Mapped[float | None]


class ReplicaConfig(Base):
    """Engine configuration of a replica, one row per version (append-only history)."""

    __tablename__ = names.T_REPLICA_CONFIGS
    __table_args__ = (UniqueConstraint("replica_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    replica_id: Mapped[int] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"))
    version: Mapped[int]
    config: Mapped[dict[str, Any]]
    created_unix_s: Mapped[float]


MAX_REQUEST_S = 7 * 86400.0  # no request runs this long: a longer duration is a broken clock or attribute


def finish_of(arrival_unix_s: float, e2e_s: float | None, end_unix_nano: int = 0) -> float:
    """When a request finished: its span's end when that is set and not before the arrival, else
    arrival + e2e, else (neither known, or implausibly late) the arrival."""
    end = end_unix_nano / 1e9
    if end_unix_nano > 0 and arrival_unix_s <= end <= arrival_unix_s + MAX_REQUEST_S:
        return end
    if e2e_s is not None and math.isfinite(e2e_s) and 0 <= e2e_s <= MAX_REQUEST_S:
        return arrival_unix_s + e2e_s
    return arrival_unix_s


class Request(Base):
    """One finished request, from vLLM's `llm_request` span."""

    __tablename__ = names.T_REQUESTS
    __table_args__ = (
        UniqueConstraint("trace_id", "span_id", name="uq_requests_span"),
        Index("ix_requests_arrival", "arrival_unix_s"),
        Index("ix_requests_replica_arrival", "replica_id", "arrival_unix_s"),
        Index("ix_requests_replica_finish", "replica_id", "finish_unix_s"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(200))
    replica_id: Mapped[int | None] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"))
    model: Mapped[str | None] = mapped_column(String(500))
    arrival_unix_s: Mapped[float]
    # When the request finished (the span's end): the time it counts at in SLO windows, because a
    # request is only stored, and only known good or bad, once it has finished.
    finish_unix_s: Mapped[float]
    queue_s: Mapped[float | None]
    prefill_s: Mapped[float | None]
    decode_s: Mapped[float | None]
    inference_s: Mapped[float | None]
    ttft_s: Mapped[float | None]
    e2e_s: Mapped[float | None]
    tpot_s: Mapped[float | None]
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    max_tokens: Mapped[int | None]
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str] = mapped_column(String(16))


class EngineSample(Base):
    """One scrape of a replica's /metrics. Counters are reset-adjusted (monotonic)."""

    __tablename__ = names.T_ENGINE_SAMPLES
    __table_args__ = (
        Index("ix_engine_samples_ts", "ts_unix_s"),
        Index("ix_engine_samples_replica_ts", "replica_id", "ts_unix_s"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    replica_id: Mapped[int] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"))
    ts_unix_s: Mapped[float]
    scrape_ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    scrape_duration_s: Mapped[float | None]
    kv_usage_ratio: Mapped[float | None]
    kv_capacity_tokens: Mapped[int | None] = mapped_column(BigInteger)
    kv_block_size_tokens: Mapped[int | None]
    num_running: Mapped[float | None]
    num_waiting: Mapped[float | None]
    preemptions_total: Mapped[float | None]
    prompt_tokens_total: Mapped[float | None]
    generation_tokens_total: Mapped[float | None]
    request_success_total: Mapped[float | None]
    request_errors_total: Mapped[float | None]  # finished_reason abort or error
    prefix_cache_queries_total: Mapped[float | None]
    prefix_cache_hits_total: Mapped[float | None]
    counter_reset: Mapped[bool] = mapped_column(Boolean, default=False)


class GpuSample(Base):
    """One GPU reading, units normalised to the DCGM ones (ratios 0-1, bytes, W, J)."""

    __tablename__ = names.T_GPU_SAMPLES
    __table_args__ = (
        Index("ix_gpu_samples_ts", "ts_unix_s"),
        Index("ix_gpu_samples_uuid_ts", "uuid", "ts_unix_s"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts_unix_s: Mapped[float]
    source: Mapped[str] = mapped_column(String(10))  # dcgm | nvml
    host: Mapped[str | None] = mapped_column(String(200))
    gpu_index: Mapped[int | None]
    uuid: Mapped[str | None] = mapped_column(String(100))
    # A MIG GPU instance ("<profile>/<GPU_I_ID>", e.g. "3g.40gb/2"): dcgm-exporter reports each instance of a
    # MIG-partitioned GPU as its own series under the GPU's UUID. None: the whole GPU.
    mig_instance: Mapped[str | None] = mapped_column(String(60))
    model_name: Mapped[str | None] = mapped_column(String(200))
    util_ratio: Mapped[float | None]
    mem_copy_util_ratio: Mapped[float | None]
    fb_used_bytes: Mapped[int | None] = mapped_column(BigInteger)
    fb_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    power_w: Mapped[float | None]
    energy_j: Mapped[float | None]
    temp_c: Mapped[float | None]
    sm_clock_mhz: Mapped[float | None]
    xid_errors: Mapped[float | None]
    gr_engine_active_ratio: Mapped[float | None]
    tensor_active_ratio: Mapped[float | None]
    dram_active_ratio: Mapped[float | None]


class LifecycleEvent(Base):
    """Something that happened to a replica: startup phases (from spans), scrapes lost, actions."""

    __tablename__ = names.T_LIFECYCLE
    __table_args__ = (Index("ix_lifecycle_ts", "ts_unix_s"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    replica_id: Mapped[int | None] = mapped_column(ForeignKey(f"{names.T_REPLICAS}.id"))
    ts_unix_s: Mapped[float]
    kind: Mapped[str] = mapped_column(String(100))
    actor: Mapped[str] = mapped_column(String(20))  # user | tuner | supervisor | engine | collector
    reason: Mapped[str | None] = mapped_column(String(100))
    message: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None]
    attributes: Mapped[dict[str, Any] | None]
    before_config: Mapped[dict[str, Any] | None]
    after_config: Mapped[dict[str, Any] | None]
    # Idempotency for retried OTLP batches: "trace_id/span_id" of the span the event came from.
    dedupe_key: Mapped[str | None] = mapped_column(String(64), unique=True)


class SloAlert(Base):
    """One episode of an SLO burn-rate alert: pending -> firing -> resolved, with the times of each step."""

    __tablename__ = names.T_SLO_ALERTS
    __table_args__ = (Index("ix_slo_alerts_key", "slo", "severity", "state"),
                      Index("ix_slo_alerts_ts", "started_unix_s"))
    id: Mapped[int] = mapped_column(primary_key=True)
    slo: Mapped[str] = mapped_column(String(200))
    deployment: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(10))  # page | ticket
    alertname: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(10))  # pending | firing | resolved
    started_unix_s: Mapped[float]  # condition first true (pending since)
    fired_unix_s: Mapped[float | None]
    resolved_unix_s: Mapped[float | None]
    last_eval_unix_s: Mapped[float]
    notified_unix_s: Mapped[float | None]  # last successful post to Alertmanager
    evidence: Mapped[dict[str, Any] | None]  # burn rates and request rates of the tiers that triggered


class Recommendation(Base):
    """A proposed change with its evidence; applied by a person (recommend) or the plane (auto), audited."""

    __tablename__ = names.T_RECOMMENDATIONS
    __table_args__ = (Index("ix_recommendations_created", "created_unix_s"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    created_unix_s: Mapped[float]
    deployment: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # scale | reconfigure
    mode: Mapped[str] = mapped_column(String(10))  # recommend | auto
    status: Mapped[str] = mapped_column(String(20))  # open | applied | dismissed | rolled_back | failed | superseded
    reason: Mapped[str] = mapped_column(String(100))
    current: Mapped[dict[str, Any]]
    proposed: Mapped[dict[str, Any]]
    evidence: Mapped[dict[str, Any]]  # inputs, predicted effect, confidence, comparison with the current config
    confidence: Mapped[float | None]
    decided_unix_s: Mapped[float | None]
    decided_by: Mapped[str | None] = mapped_column(String(20))  # user | tuner
    outcome: Mapped[dict[str, Any] | None]  # what happened after applying (SLO before/after, rollback)


# The SLO rollup tables live with the SLO code; importing them registers them in Base.metadata.
from controlplane.slo import models as _slo_models  # noqa: E402, F401


class RouterSpan(Base):
    """One request the router proxied, as its span: the trace it belongs to, the tenant, the outcome.

    vLLM's `llm_request` span of the same request carries the same trace id (the router makes sure a
    `traceparent` goes upstream), which is how a request's tokens are joined to its tenant. The unique
    (trace_id, span_id) index also serves lookups by trace id (its leading column).
    """

    __tablename__ = names.T_ROUTER_SPANS
    __table_args__ = (
        UniqueConstraint("trace_id", "span_id", name="uq_router_spans_span"),
        Index("ix_router_spans_started", "started_unix_s"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16))  # the client's span, when it sent one
    tenant: Mapped[str | None] = mapped_column(String(64))  # NULL: no tenant header, or an invalid one
    replica: Mapped[str | None] = mapped_column(String(200))  # the replica that answered; NULL: none did
    started_unix_s: Mapped[float]
    ended_unix_s: Mapped[float]
    status: Mapped[int | None]  # HTTP status sent to the client; NULL: the client left before any
    ok: Mapped[bool] = mapped_column(Boolean)  # a complete response with a status below 500
    method: Mapped[str | None] = mapped_column(String(16))  # NULL: rows stored before migration 0006
    path: Mapped[str | None] = mapped_column(String(300))  # without the query string
