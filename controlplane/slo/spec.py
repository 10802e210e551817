"""The SLO spec (`apiVersion: controlplane/v1`, `kind: SLO`): parse, validate, convert once into domain values.

Example::

    apiVersion: controlplane/v1
    kind: SLO
    metadata: {name: tiny-ttft}
    spec:
      deployment: tiny
      sli: ttft                 # ttft | tpot | itl | e2e | queue | error_rate | goodput
      threshold: 500ms          # latency SLIs; goodput lists `targets: [{sli: ttft, threshold: 500ms}, ...]`
      objective: 0.99
      window: 28d               # rolling, or `calendar_month`
      alerting: {min_request_rate_per_s: 0.1}

OpenSLO v1 documents (`apiVersion: openslo/v1`) in the same stream are converted by `controlplane.slo.openslo`.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from controlplane.slo.durations import format_duration, parse_duration_s
from controlplane.slo.model import (
    LATENCY_SLIS,
    SLI_KINDS,
    THIRTY_DAYS_S,
    Alerting,
    BurnWindow,
    LatencySli,
    LatencyTarget,
    Severity,
    SliKind,
    Slo,
    SloWindow,
    SpecError,
    workbook_windows,
)

__all__ = [
    "LATENCY_SLIS", "SLI_KINDS", "Alerting", "BurnWindow", "LatencySli", "LatencyTarget", "SliKind", "Slo",
    "SloWindow", "SpecError", "load_slos", "parse_slo_document", "workbook_windows",
]

API_VERSION = "controlplane/v1"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME_ALLOWED = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"
CALENDAR_MONTH = "calendar_month"
MIN_WINDOW_S, MAX_WINDOW_S = 3600.0, 366 * 86400.0


def rolling_window_problem(text: str, period_s: float) -> str | None:
    """Why a rolling SLO window cannot be judged, or None. Under an hour the workbook tiers scaled to the window
    round to nothing; past a year, rule tests and budgets span more history than anything keeps."""
    if MIN_WINDOW_S <= period_s <= MAX_WINDOW_S:
        return None
    return f"{text} is outside the allowed range of a rolling window: 1h to 366d"

Duration = Annotated[float, BeforeValidator(parse_duration_s)]
DurationOrZero = Annotated[float, BeforeValidator(lambda v: parse_duration_s(v, allow_zero=True))]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class TargetSpec(_Spec):
    sli: LatencySli
    threshold: Duration


def _check_whole_ms(name: str, v: float | None) -> None:
    """Prometheus durations are whole milliseconds: anything finer is refused, naming the field."""
    if v is not None and abs(v * 1000 - round(v * 1000)) > 1e-6:
        raise ValueError(f"{name} ({v:g} s) must be a whole number of milliseconds")


class BurnWindowSpec(_Spec):
    severity: Severity
    long: Duration
    short: Duration | None = None  # default: long / 12
    burn_rate: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    for_: DurationOrZero = Field(0.0, alias="for")

    @model_validator(mode="after")
    def _short_below_long(self) -> BurnWindowSpec:
        for name, v in (("long", self.long), ("short", self.short), ("for", self.for_)):
            _check_whole_ms(name, v)
        if self.short is not None and self.short >= self.long:
            raise ValueError(f"short ({self.short:g} s) must be shorter than long ({self.long:g} s)")
        if self.short_s < 1:
            raise ValueError(f"the short window ({self.short_s:g} s) must be at least 1 s"
                             + ("" if self.short is not None else
                                f" (by default it is long / 12 in whole seconds; long is {self.long:g} s)"))
        return self

    @property
    def short_s(self) -> float:
        return self.short if self.short is not None else float(round(self.long / 12))


class AlertingSpec(_Spec):
    page: bool = True
    ticket: bool = True
    min_request_rate_per_s: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 0.0
    windows: Annotated[list[BurnWindowSpec] | None, Field(min_length=1)] = None  # default: workbook tiers, scaled
    # A firing alert keeps firing this long after its condition clears; default: the shortest short window.
    keep_firing_for: DurationOrZero | None = None


class SloBody(_Spec):
    deployment: Name
    sli: SliKind
    threshold: Duration | None = None
    targets: list[TargetSpec] | None = Field(None, min_length=1)
    objective: float
    window: str = "30d"
    budgeting: Literal["occurrences", "timeslices"] = "occurrences"
    alerting: AlertingSpec = AlertingSpec()
    description: str = ""
    runbook_url: str | None = None

    @field_validator("objective")
    @classmethod
    def _objective_is_a_fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            example = f"write {v / 100:g} for {v:g}%" if 1 < v < 100 else "e.g. 0.999 for 99.9%"
            raise ValueError(f"must be a fraction between 0 and 1 exclusive; {example}")
        return v

    @field_validator("window")
    @classmethod
    def _window_is_known(cls, v: str) -> str:
        if v != CALENDAR_MONTH:
            try:
                period = parse_duration_s(v)
            except ValueError as exc:
                raise ValueError(f"must be {CALENDAR_MONTH!r} or a rolling duration like 28d or 30d ({exc})") from None
            problem = rolling_window_problem(v, period)
            if problem:
                raise ValueError(f"{problem} (or {CALENDAR_MONTH!r})")
        return v

    @model_validator(mode="after")
    def _targets_fit_the_sli(self) -> SloBody:
        if self.sli in LATENCY_SLIS:
            if self.threshold is None:
                raise ValueError(f"sli {self.sli!r} needs `threshold` (e.g. 500ms)")
            if self.targets is not None:
                raise ValueError(f"`targets` is only for sli 'goodput'; sli {self.sli!r} takes `threshold`")
        elif self.sli == "goodput":
            if self.targets is None or self.threshold is not None:
                raise ValueError("sli 'goodput' needs `targets` (a list of {sli, threshold}) and no `threshold`")
            slis = [t.sli for t in self.targets]
            if len(set(slis)) != len(slis):
                raise ValueError(f"goodput targets must name each latency SLI at most once, got {slis}")
        elif self.threshold is not None or self.targets is not None:
            raise ValueError("sli 'error_rate' takes neither `threshold` nor `targets`")
        return self

    def period_s(self) -> float:
        return THIRTY_DAYS_S if self.window == CALENDAR_MONTH else parse_duration_s(self.window)

    @model_validator(mode="after")
    def _windows_fit(self) -> SloBody:
        budget = 1 - self.objective
        for i, w in enumerate(self.alerting.windows or ()):
            where = f"alerting.windows[{i}]"
            if w.long >= self.period_s():
                raise ValueError(f"{where}.long: {w.long:g} s must be shorter than the SLO window {self.window}")
            if w.burn_rate * budget >= 1:
                raise ValueError(f"{where}.burn_rate: {w.burn_rate:g} x budget {budget:g} >= 1, so the error ratio "
                                 f"could never exceed it; allowed: burn_rate < {1 / budget:g} for this objective")
        keep = self.alerting.keep_firing_for
        _check_whole_ms("alerting.keep_firing_for", keep)  # as a window: a Prometheus duration
        if keep is not None and keep >= self.period_s():
            raise ValueError(f"alerting.keep_firing_for: {format_duration(keep)} must be shorter than the SLO window "
                             f"{self.window}")
        return self


class Metadata(_Spec):
    name: Name


class SloDocument(_Spec):
    apiVersion: Literal["controlplane/v1"]  # noqa: N815 - the wire name
    kind: Literal["SLO"]
    metadata: Metadata
    spec: SloBody


def to_domain(doc: SloDocument) -> Slo:
    """The one mapping from the external spec to the domain value."""
    body = doc.spec
    period = body.period_s()
    window = SloWindow("calendar_month" if body.window == CALENDAR_MONTH else "rolling", period)
    if body.alerting.windows is None:
        windows = workbook_windows(period, body.objective)
    else:
        windows = tuple(BurnWindow(w.severity, w.long, w.short_s, w.burn_rate, w.for_) for w in body.alerting.windows)
    targets: tuple[LatencyTarget, ...]
    if body.targets is not None:
        targets = tuple(LatencyTarget(t.sli, t.threshold) for t in body.targets)
    elif body.threshold is not None:
        targets = (LatencyTarget(typing.cast(LatencySli, body.sli), body.threshold),)
    else:
        targets = ()
    alerting = Alerting(body.alerting.page, body.alerting.ticket, body.alerting.min_request_rate_per_s, windows,
                        body.alerting.keep_firing_for)
    return Slo(name=doc.metadata.name, deployment=body.deployment, sli=body.sli, targets=targets,
               objective=body.objective, window=window, budgeting=body.budgeting, alerting=alerting,
               description=body.description, runbook_url=body.runbook_url)


def pydantic_error(where: str, exc: ValidationError, model: type[BaseModel]) -> SpecError:
    """One readable message per problem: document, dotted field path, what is wrong and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        inner = _INNER_PATH.match(msg)  # a cross-field check names the field inside the model it validated
        if inner:
            path, msg = f"{path}.{inner.group(1)}" if path else inner.group(1), msg[inner.end():]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1])
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        quiet = err["type"] in ("missing", "extra_forbidden") or isinstance(err.get("input"), dict) or "got " in msg
        got = "" if quiet else f" (got {err.get('input')!r})"
        lines.append(f"{where}: {path or '(document)'}: {msg}{got}")
    return SpecError("\n".join(lines))


_INNER_PATH = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")


def _allowed_fields(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names accepted at `loc` inside `model`, to tell the user what an unknown key could have been."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = current.model_fields[part].annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """list[X] / X | None -> X, so the walk can reach the nested model."""
    while typing.get_origin(tp) in (list, Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
        if typing.get_origin(tp) in (Union, types.UnionType):
            break
    return tp


def parse_slo_document(where: str, raw: dict[str, Any]) -> Slo:
    """One native document -> Slo, or SpecError naming `where`."""
    try:
        return to_domain(SloDocument.model_validate(raw))
    except ValidationError as exc:
        raise pydantic_error(where, exc, SloDocument) from None


def _read_documents(text_or_path: str | Path) -> list[tuple[str, Any]]:
    """(name for messages, parsed YAML document) for a text, a file, or every *.yaml / *.yml in a directory."""
    if isinstance(text_or_path, str) and ("\n" in text_or_path or not Path(text_or_path).exists()):
        sources = [("<text>", text_or_path)]
    else:
        path = Path(text_or_path)
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        try:
            sources = [(str(f), f.read_text()) for f in files]
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    out: list[tuple[str, Any]] = []
    for source, text in sources:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise SpecError(f"{source}:{at}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        numbered = [(i, d) for i, d in enumerate(docs, start=1) if d is not None]
        for i, doc in numbered:
            out.append((f"{source} document {i}" if len(docs) > 1 else source, doc))
    return out


def load_slos(text_or_path: str | Path) -> list[Slo]:
    """Every SLO in a YAML text, file or directory (one or several documents; native or OpenSLO v1).

    OpenSLO `SLI` and `Service` documents in the same input are used to resolve `indicatorRef`s.
    """
    from controlplane.slo import openslo  # imported here: openslo builds on this module's helpers

    docs = _read_documents(text_or_path)
    slos: list[tuple[str, Slo]] = []
    foreign: list[tuple[str, dict[str, Any]]] = []
    for where, doc in docs:
        if not isinstance(doc, dict):
            raise SpecError(f"{where}: a document must be a mapping with apiVersion, kind, metadata, spec; "
                            f"got {type(doc).__name__}")
        api = doc.get("apiVersion")
        if api == API_VERSION:
            named = f"{where} ({_name_of(doc)})" if _name_of(doc) else where
            slos.append((named, parse_slo_document(named, doc)))
        elif api == openslo.API_VERSION:
            foreign.append((where, doc))
        else:
            raise SpecError(f"{where}: apiVersion: must be {API_VERSION!r} or {openslo.API_VERSION!r} (got {api!r})")
    slos.extend(openslo.convert(foreign))
    seen: dict[str, str] = {}
    for where, slo in slos:
        if slo.name in seen:
            raise SpecError(f"{where}: metadata.name: {slo.name!r} is already used by {seen[slo.name]}; "
                            "SLO names must be unique")
        seen[slo.name] = where
    return [slo for _, slo in slos]


def _name_of(doc: dict[str, Any]) -> str | None:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and re.match(NAME_PATTERN, name) else None
