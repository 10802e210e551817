"""DashboardSpec -> grafana-foundation-sdk (0.0.21) objects -> dashboard JSON; and the SDK's own decoder back.

The only module that imports the SDK. It uses the classic dashboard model (`schemaVersion` 42), not dashboardv2:
file provisioning of v2 resources needs Grafana 12 with feature toggles, while classic JSON provisions on every
Grafana in use. The SDK warns at import time to prefer v2; that warning is silenced here for that reason.

0.0.21 ships no JSON schema. `roundtrip()` decodes the JSON with the SDK's generated model (`Dashboard.from_json`,
with the panel and query plugins registered) and encodes it again: the tests require the result to equal the
input, so a key the model does not know, or a panel/query type it cannot decode, shows up as a difference.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, table, timeseries
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import prometheus as prom
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import prometheus as pm

from controlplane.grafana.model import DashboardSpec, Panel, Query, Step, Variable

DATASOURCE_VAR = "datasource"
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VAR}}}")
GENERATED = "(Generated from controlplane/grafana by `controlplane dashboards render`; edits here are overwritten.)"


# The SDK's panel builders share their common methods (title, unit, targets, ...) but no base class declaring them.
_PanelBuilder = timeseries.Panel | stat.Panel | statetimeline.Panel | bargauge.Panel | table.Panel


def _target(q: Query, ref: str, table_format: bool) -> prom.Dataquery:
    t = prom.Dataquery().expr(q.expr.render()).ref_id(ref).legend_format(q.legend)
    if table_format:
        t = t.format(pm.PromQueryFormat.TABLE)
    return t.instant() if q.instant else t.range()


def _legend() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))


def _last_value() -> cb.ReduceDataOptions:
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def _kind(p: Panel) -> _PanelBuilder:
    if p.kind == "timeseries":
        ts = timeseries.Panel().legend(_legend()).fill_opacity(10 if not p.stacked else 40).line_width(1)
        if p.stacked:
            ts = ts.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        if p.bars:
            ts = ts.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
        if p.thresholds:  # Grafana draws a time series' thresholds only when asked to
            ts = ts.thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        return ts
    if p.kind == "stat":
        return (stat.Panel().reduce_options(_last_value()).graph_mode(common.BigValueGraphMode.AREA)
                .color_mode(common.BigValueColorMode.VALUE))
    if p.kind == "state-timeline":
        return statetimeline.Panel().legend(_legend().calcs([])).show_value(common.VisibilityMode.AUTO)
    if p.kind == "bargauge":
        return (bargauge.Panel().reduce_options(_last_value())
                .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL))
    return table.Panel()


def _thresholds(steps: tuple[Step, ...]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=s.value, color=s.color) for s in steps])


def _mappings(steps: tuple[Step, ...]) -> list[dm.ValueMapping]:
    options = {f"{s.value:g}": dm.ValueMappingResult(text=s.text, color=s.color, index=i)
               for i, s in enumerate(steps) if s.value is not None}
    return [dm.ValueMap(options=options)]


def _panel(p: Panel, panel_id: int) -> _PanelBuilder:
    refs = [chr(ord("A") + i) for i in range(len(p.queries))]
    b = (_kind(p).id(panel_id).title(p.title).description(p.description).datasource(DATASOURCE)
         .targets([_target(q, r, p.kind == "table") for q, r in zip(p.queries, refs, strict=True)])
         .unit(p.unit).span(p.width).height(p.height))
    if p.min is not None:
        b = b.min(p.min)
    if p.max is not None:
        b = b.max(p.max)
    if p.thresholds:
        b = b.thresholds(_thresholds(p.thresholds))
    if p.mappings:
        b = b.mappings(_mappings(p.mappings))
    if p.min_interval is not None:
        b = b.interval(p.min_interval)
    return b


def _variable(v: Variable) -> db.QueryVariable:
    every = dm.VariableOption(selected=True, text="All", value="$__all")
    return (db.QueryVariable(v.name).label(v.display).datasource(DATASOURCE).query(v.query()).definition(v.query())
            .multi(True).include_all(True).all_value(".*").current(every)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))


def build(spec: DashboardSpec) -> dm.Dashboard:
    """The SDK's dashboard model for a spec: rows in order, panels laid out left to right, ids from 1."""
    d = (db.Dashboard(spec.title).uid(spec.uid).description(f"{spec.description} {GENERATED}").tags(list(spec.tags))
         .refresh(spec.refresh).time(spec.time_from, "now").timezone("browser").editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .with_variable(db.DatasourceVariable(DATASOURCE_VAR).label("Data source").type("prometheus")))
    for v in spec.variables:
        d = d.with_variable(_variable(v))
    next_id = 1
    for row in spec.rows:
        d = d.with_row(db.Row(row.title).id(next_id))
        next_id += 1
        for p in row.panels:
            d = d.with_panel(_panel(p, next_id))
            next_id += 1
    return d.build()


def to_json(model: object) -> str:
    """Stable text for committing: sorted keys, two-space indent, trailing newline."""
    return str(JSONEncoder(sort_keys=True, indent=2).encode(model)) + "\n"


def render(spec: DashboardSpec) -> str:
    return to_json(build(spec))


def roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    """Decode dashboard JSON with the SDK's model and encode it again (see the module docstring)."""
    register_default_plugins()
    decoded: dict[str, Any] = json.loads(to_json(dm.Dashboard.from_json(data)))
    return decoded
