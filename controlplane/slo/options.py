"""Options of the rendered alerts that are not per SLO: operational thresholds, runbooks, receivers.

External form (`alerts/alerting.yaml`)::

    apiVersion: controlplane/v1
    kind: AlertingOptions
    spec:
      runbook_base_url: https://example.org/runbooks.md
      cost_budget_per_million_tokens_usd: 2.0
      kv_cache_usage_ratio: 0.9
      kv_cache_for: 10m
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.slo.model import SpecError
from controlplane.slo.spec import Duration, DurationOrZero, pydantic_error


@dataclass(frozen=True)
class RuleOptions:
    runbook_base_url: str = "alerts/runbooks.md"  # each alert links <base>#<alert name, lowercase>
    kv_cache_usage_ratio: float = 0.9
    kv_cache_for_s: float = 600.0
    preemptions_per_s: float = 0.0  # sustained preemption above this rate alerts
    preemptions_for_s: float = 600.0
    replica_down_for_s: float = 300.0
    deployment_down_for_s: float = 120.0
    crashloop_restarts: int = 3  # restarts within crashloop_window_s count as crash-looping
    crashloop_window_s: float = 900.0
    scrape_failing_for_s: float = 300.0
    gpu_temp_c: float = 85.0
    gpu_temp_for_s: float = 300.0
    gpu_xid_window_s: float = 300.0
    cost_budget_per_million_tokens_usd: float | None = None  # None: no cost alert
    cost_for_s: float = 1800.0
    span_coverage_ratio: float = 0.99  # below this share of served requests with a stored span, spans are lost
    span_coverage_for_s: float = 600.0
    # Requests running or waiting on a replica that produced no token for ENGINE_STALL_WINDOW_S, for this long: hung.
    engine_stalled_for_s: float = 120.0
    slo_evaluation_stale_s: float = 600.0  # an SLO not evaluated for longer cannot page: the plane's own alerting
    page_webhook_url: str | None = None  # Alertmanager receivers; None: a receiver with no integration
    ticket_webhook_url: str | None = None
    # The scrape interval of the Prometheus that evaluates the rules: a burn window shorter than 4 of them holds
    # too few samples for rate() and is widened (an empty short window would leave its page tier dead).
    scrape_interval_s: float = 15.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptionsBody(_Spec):
    runbook_base_url: str = RuleOptions.runbook_base_url
    kv_cache_usage_ratio: Annotated[float, Field(gt=0, le=1)] = RuleOptions.kv_cache_usage_ratio
    kv_cache_for: DurationOrZero = RuleOptions.kv_cache_for_s
    preemptions_per_s: Annotated[float, Field(ge=0)] = RuleOptions.preemptions_per_s
    preemptions_for: DurationOrZero = RuleOptions.preemptions_for_s
    replica_down_for: DurationOrZero = RuleOptions.replica_down_for_s
    deployment_down_for: DurationOrZero = RuleOptions.deployment_down_for_s
    crashloop_restarts: Annotated[int, Field(ge=1)] = RuleOptions.crashloop_restarts
    crashloop_window: Duration = RuleOptions.crashloop_window_s
    scrape_failing_for: DurationOrZero = RuleOptions.scrape_failing_for_s
    gpu_temp_c: Annotated[float, Field(gt=0)] = RuleOptions.gpu_temp_c
    gpu_temp_for: DurationOrZero = RuleOptions.gpu_temp_for_s
    gpu_xid_window: Duration = RuleOptions.gpu_xid_window_s
    cost_budget_per_million_tokens_usd: Annotated[float | None, Field(gt=0)] = None
    cost_for: DurationOrZero = RuleOptions.cost_for_s
    span_coverage_ratio: Annotated[float, Field(gt=0, le=1)] = RuleOptions.span_coverage_ratio
    span_coverage_for: DurationOrZero = RuleOptions.span_coverage_for_s
    slo_evaluation_stale: Duration = RuleOptions.slo_evaluation_stale_s
    engine_stalled_for: DurationOrZero = RuleOptions.engine_stalled_for_s
    page_webhook_url: str | None = None
    ticket_webhook_url: str | None = None
    scrape_interval: Duration = RuleOptions.scrape_interval_s


class OptionsDocument(_Spec):
    apiVersion: Literal["controlplane/v1"]  # noqa: N815 - the wire name
    kind: Literal["AlertingOptions"]
    spec: OptionsBody = OptionsBody()


def load_options(path: Path) -> RuleOptions:
    """RuleOptions from an AlertingOptions file; SpecError naming the file and field on bad input."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:  # not UTF-8 text: named like the others
        raise SpecError(f"{path}: cannot read AlertingOptions: {exc}") from None
    try:
        body = OptionsDocument.model_validate(raw).spec
    except ValidationError as exc:
        raise pydantic_error(str(path), exc, OptionsDocument) from None
    return RuleOptions(
        runbook_base_url=body.runbook_base_url, kv_cache_usage_ratio=body.kv_cache_usage_ratio,
        kv_cache_for_s=body.kv_cache_for, preemptions_per_s=body.preemptions_per_s,
        preemptions_for_s=body.preemptions_for, replica_down_for_s=body.replica_down_for,
        deployment_down_for_s=body.deployment_down_for, crashloop_restarts=body.crashloop_restarts,
        crashloop_window_s=body.crashloop_window, scrape_failing_for_s=body.scrape_failing_for,
        gpu_temp_c=body.gpu_temp_c, gpu_temp_for_s=body.gpu_temp_for, gpu_xid_window_s=body.gpu_xid_window,
        cost_budget_per_million_tokens_usd=body.cost_budget_per_million_tokens_usd, cost_for_s=body.cost_for,
        span_coverage_ratio=body.span_coverage_ratio, span_coverage_for_s=body.span_coverage_for,
        slo_evaluation_stale_s=body.slo_evaluation_stale, engine_stalled_for_s=body.engine_stalled_for,
        page_webhook_url=body.page_webhook_url, ticket_webhook_url=body.ticket_webhook_url,
        scrape_interval_s=body.scrape_interval)


def runbook_url(options: RuleOptions, alert: str) -> str:
    return f"{options.runbook_base_url}#{alert.lower()}"
