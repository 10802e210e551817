"""Import OpenSLO v1 `SLO` documents (with inline or referenced `SLI`s) as domain SLOs.

OpenSLO describes an indicator by arbitrary queries; the plane knows a fixed set of vLLM SLIs. The importer
recognises which one a query is about from the vLLM metric it names:

- `thresholdMetric` on a vLLM latency histogram + objectives `op: lte|lt, value: SECONDS` -> that latency SLI;
- `ratioMetric` whose `good` query selects `<histogram>_bucket{le="X"}` -> that latency SLI with threshold X;
- `ratioMetric` on `vllm:request_success_total` -> error_rate (failures = finished_reason abort|error).

Each objective becomes one SLO (named `<name>-<objective displayName or index>` when there are several).
What cannot be carried over faithfully (Timeslices budgeting, alertPolicies, several time windows) is an error,
not a silent approximation.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane import names
from controlplane.slo.model import (
    DAY_S,
    THIRTY_DAYS_S,
    Alerting,
    LatencySli,
    LatencyTarget,
    SliKind,
    Slo,
    SloWindow,
    SpecError,
    workbook_windows,
)
from controlplane.slo.spec import NAME_ALLOWED, NAME_PATTERN, pydantic_error, rolling_window_problem

API_VERSION = "openslo/v1"

# Histogram -> SLI, including the names older vLLM releases used.
HISTOGRAM_SLI: dict[str, LatencySli] = {
    names.VLLM_TTFT_HIST: "ttft",
    names.VLLM_TPOT_HIST: "tpot",
    names.VLLM_ITL_HIST: "itl",
    "vllm:time_per_output_token_seconds": "itl",
    names.VLLM_E2E_HIST: "e2e",
    names.VLLM_QUEUE_HIST: "queue",
}
_UNITS_S = {"m": 60.0, "h": 3600.0, "d": DAY_S, "w": 7 * DAY_S}


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class Metadata(_Open):
    name: str = Field(pattern=NAME_PATTERN)
    displayName: str | None = None  # noqa: N815 - OpenSLO wire names
    labels: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None


class MetricSource(_Open):
    type: str | None = None
    metricSourceRef: str | None = None  # noqa: N815
    spec: dict[str, Any] = Field(default_factory=dict)

    def text(self) -> str:
        """Every string in the source's spec, joined: where the metric names live whatever the source type."""
        return " ".join(str(v) for v in _strings(self.spec))


class MetricSpec(_Open):
    metricSource: MetricSource  # noqa: N815


class RatioMetric(_Open):
    counter: bool = True
    good: MetricSpec | None = None
    bad: MetricSpec | None = None
    total: MetricSpec | None = None


class SliSpec(_Open):
    description: str = ""
    thresholdMetric: MetricSpec | None = None  # noqa: N815
    ratioMetric: RatioMetric | None = None  # noqa: N815

    @model_validator(mode="after")
    def _one_metric(self) -> SliSpec:
        if (self.thresholdMetric is None) == (self.ratioMetric is None):
            raise ValueError("exactly one of thresholdMetric or ratioMetric is needed")
        return self


class InlineSli(_Open):
    metadata: Metadata
    spec: SliSpec


class SliDocument(_Open):
    apiVersion: Literal["openslo/v1"]  # noqa: N815
    kind: Literal["SLI"]
    metadata: Metadata
    spec: SliSpec


class TimeWindow(_Open):
    duration: str = Field(pattern=r"^[1-9]\d*[mhdwMQY]$")
    isRolling: bool = False  # noqa: N815
    calendar: dict[str, Any] | None = None


class Objective(_Open):
    displayName: str | None = None  # noqa: N815
    op: Literal["lte", "lt", "gte", "gt"] | None = None
    value: float | None = None
    target: float | None = Field(None, gt=0, lt=1)
    targetPercent: float | None = Field(None, gt=0, lt=100)  # noqa: N815

    def objective(self) -> float:
        if self.target is not None:
            return self.target
        if self.targetPercent is not None:
            got = round(self.targetPercent / 100, 12)  # 99.9 / 100 is 0.9990000000000001 in binary
            if not 0 < got < 1:  # e.g. 99.99999999999999 %: an objective of 1 leaves no error budget
                raise ValueError(f"targetPercent {self.targetPercent!r} is {got:g} as an objective; allowed: a "
                                 "percentage that leaves an error budget (at most 12 decimal places of a ratio)")
            return got
        raise ValueError("an objective needs target (0-1) or targetPercent (0-100)")


class SloSpec(_Open):
    description: str = ""
    service: str = Field(pattern=NAME_PATTERN)
    indicator: InlineSli | None = None
    indicatorRef: str | None = None  # noqa: N815
    timeWindow: list[TimeWindow] = Field(min_length=1, max_length=1)  # noqa: N815
    budgetingMethod: Literal["Occurrences"] = "Occurrences"  # noqa: N815 - Timeslices need slice parameters
    objectives: list[Objective] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_indicator(self) -> SloSpec:
        if (self.indicator is None) == (self.indicatorRef is None):
            raise ValueError("exactly one of indicator or indicatorRef is needed")
        return self


class SloDocument(_Open):
    apiVersion: Literal["openslo/v1"]  # noqa: N815
    kind: Literal["SLO"]
    metadata: Metadata
    spec: SloSpec


def convert(docs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Slo]]:
    """OpenSLO documents (SLO, SLI, Service) -> (where, Slo) for every SLO objective."""
    slis: dict[str, SliSpec] = {}
    slo_docs: list[tuple[str, dict[str, Any]]] = []
    for where, doc in docs:
        kind = doc.get("kind")
        if kind == "SLI":
            try:
                sli = SliDocument.model_validate(doc)
            except ValidationError as exc:
                raise pydantic_error(where, exc, SliDocument) from None
            slis[sli.metadata.name] = sli.spec
        elif kind == "SLO":
            slo_docs.append((where, doc))
        elif kind != "Service":  # a Service only names the service; spec.service carries what we need
            raise SpecError(f"{where}: kind: OpenSLO kinds imported are SLO, SLI and Service (got {kind!r})")
    out: list[tuple[str, Slo]] = []
    for where, doc in slo_docs:
        try:
            parsed = SloDocument.model_validate(doc)
        except ValidationError as exc:
            raise pydantic_error(where, exc, SloDocument) from None
        named = f"{where} ({parsed.metadata.name})"
        out.extend((named, slo) for slo in _to_domain(named, parsed, slis))
    return out


def _to_domain(where: str, doc: SloDocument, slis: dict[str, SliSpec]) -> list[Slo]:
    spec = doc.spec
    if spec.indicator is not None:
        sli_spec = spec.indicator.spec
    elif spec.indicatorRef in slis:
        sli_spec = slis[spec.indicatorRef]
    else:
        known = ", ".join(sorted(slis)) or "none in this input"
        raise SpecError(f"{where}: spec.indicatorRef: no SLI document named {spec.indicatorRef!r} (known: {known})")
    window = _window(where, spec.timeWindow[0])
    kind, ratio_threshold = _recognise(where, sli_spec)
    out = []
    for i, obj in enumerate(spec.objectives):
        at = f"{where}: spec.objectives[{i}]"
        try:
            objective = obj.objective()
        except ValueError as exc:
            raise SpecError(f"{at}: {exc}") from None
        targets: tuple[LatencyTarget, ...] = ()
        if kind != "error_rate":
            threshold = ratio_threshold
            if sli_spec.thresholdMetric is not None:
                if obj.op not in ("lte", "lt") or obj.value is None or obj.value <= 0:
                    raise SpecError(f"{at}: a latency thresholdMetric needs op: lte (or lt) and value: SECONDS > 0 "
                                    f"(got op={obj.op!r}, value={obj.value!r})")
                threshold = obj.value
            assert threshold is not None  # _recognise returns one for ratio latency SLIs
            targets = (LatencyTarget(cast(LatencySli, kind), threshold),)
        suffix = obj.displayName or str(i)
        name = doc.metadata.name if len(spec.objectives) == 1 else f"{doc.metadata.name}-{_slug(suffix)}"
        if not re.match(NAME_PATTERN, name):
            raise SpecError(f"{at}: the SLO name {name!r} made from metadata.name and displayName is not allowed; "
                            f"names are {NAME_ALLOWED}")
        out.append(Slo(name=name, deployment=spec.service, sli=kind, targets=targets, objective=objective,
                       window=window, alerting=Alerting(windows=workbook_windows(window.duration_s, objective)),
                       description=spec.description or sli_spec.description))
    return out


def _recognise(where: str, sli: SliSpec) -> tuple[SliKind, float | None]:
    """Which vLLM SLI the queries are about, and for a bucket ratio the `le` threshold in seconds."""
    if sli.thresholdMetric is not None:
        text = sli.thresholdMetric.metricSource.text()
        hist = _histogram_in(text)
        if hist is None:
            raise SpecError(f"{where}: indicator thresholdMetric: no vLLM latency histogram in the query; "
                            f"recognised: {', '.join(HISTOGRAM_SLI)}")
        return HISTOGRAM_SLI[hist], None
    ratio = sli.ratioMetric
    assert ratio is not None
    parts = {k: m.metricSource.text() for k, m in (("good", ratio.good), ("bad", ratio.bad), ("total", ratio.total))
             if m is not None}
    if "total" not in parts or ("good" in parts) == ("bad" in parts):
        raise SpecError(f"{where}: indicator ratioMetric: needs total and exactly one of good or bad")
    if names.VLLM_REQUEST_SUCCESS in " ".join(parts.values()):
        return "error_rate", None
    hist = _histogram_in(parts.get("good", ""))
    le = re.search(r'le\s*=\s*"([0-9.eE+-]+)"', parts.get("good", ""))
    if hist is None or le is None:
        raise SpecError(f"{where}: indicator ratioMetric: recognised are a good query on <histogram>_bucket"
                        f'{{le="SECONDS"}} of {", ".join(HISTOGRAM_SLI)}, or queries on '
                        f"{names.VLLM_REQUEST_SUCCESS_TOTAL} (error rate)")
    try:
        threshold = float(le.group(1))
    except ValueError:
        threshold = math.nan
    if not (0 < threshold < math.inf):
        raise SpecError(f'{where}: indicator ratioMetric: le="{le.group(1)}" is not a latency in seconds; allowed: a '
                        "finite number > 0")
    return HISTOGRAM_SLI[hist], threshold


def _histogram_in(text: str) -> str | None:
    found = [h for h in HISTOGRAM_SLI if re.search(re.escape(h) + r"(_bucket|_count|_sum)?\b", text)]
    return max(found, key=len) if found else None


def _window(where: str, tw: TimeWindow) -> SloWindow:
    count, unit = int(tw.duration[:-1]), tw.duration[-1]
    if tw.isRolling and unit in _UNITS_S:
        problem = rolling_window_problem(tw.duration, count * _UNITS_S[unit])
        if problem:
            raise SpecError(f"{where}: spec.timeWindow[0].duration: {problem} (or the calendar month, 1M with "
                            "isRolling: false)")
        return SloWindow("rolling", count * _UNITS_S[unit])
    if not tw.isRolling and tw.duration == "1M":
        _check_utc_month(where, tw.calendar)
        return SloWindow("calendar_month", THIRTY_DAYS_S)
    raise SpecError(f"{where}: spec.timeWindow[0]: supported are a rolling window in m/h/d/w (e.g. 28d, isRolling: "
                    f"true) or the calendar month (1M, isRolling: false); got {tw.duration} isRolling={tw.isRolling}")


def _check_utc_month(where: str, calendar: dict[str, Any] | None) -> None:
    """The calendar month the plane budgets over is UTC's, from the 1st at 00:00: a calendar that starts it
    elsewhere (another time zone, day or hour) is refused rather than budgeted over the wrong month."""
    if calendar is None:
        return
    zone = calendar.get("timeZone", "UTC")
    start = calendar.get("startTime")
    if isinstance(start, dt.datetime):  # YAML reads an unquoted timestamp as one
        start = start.isoformat(sep=" ")
    elif isinstance(start, dt.date):
        start = start.isoformat()
    first = start is None or re.fullmatch(r"\d{4}-\d{2}-01([ T]00:00(:00(\.0+)?)?)?(Z|[+-]00:?00)?", str(start).strip())
    if zone not in ("UTC", "Etc/UTC", "Etc/GMT", "GMT", "Z") or not first:
        raise SpecError(f"{where}: spec.timeWindow[0].calendar: the calendar month is budgeted in UTC from the 1st at "
                        f"00:00; got startTime={start!r}, timeZone={zone!r}; allowed: no calendar, or timeZone UTC "
                        "with a startTime on the 1st at 00:00:00")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "objective"


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []
