"""SLOs: attainment, error budget left, burn rates per alert window, alert state, attainment over time."""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, chart, fetch, lines, table, time_x


def _history(ctx: Ctx, slo: dict[str, Any]) -> None:
    name = str(slo.get("name"))
    hist = fetch(f"history of {name}", lambda: ctx.client.slo_history(name, since=ctx.since, until=ctx.now_unix_s,
                                                                       step_s=ctx.step_s))
    if hist is None:
        return
    df = shape.history_frame(hist.get("points") or [])
    df["slo"] = name
    if df["attainment"].notna().sum() == 0:
        st.info(f"{name}: no requests in the window, so no attainment history ({shape.NO_DATA}).")
        return
    att = shape.gapped(df, "slo", "attainment")
    line = alt.Chart(att).mark_line(point=True).encode(
        x=time_x(ctx), y=alt.Y("attainment:Q", title="attainment", scale=alt.Scale(zero=False),
                               axis=alt.Axis(format="%")),
        detail="segment:N", tooltip=[alt.Tooltip("time:T", format="%H:%M", formatType="utc"),
                                     alt.Tooltip("attainment:Q", format=".3%")])
    objective = slo.get("objective")
    layered: alt.Chart | alt.LayerChart = line
    if isinstance(objective, int | float):
        layered = line + alt.Chart(att).mark_rule(color="red", strokeDash=[4, 4]).encode(y=alt.datum(objective))
    chart(layered.properties(height=220), f"{name}: attainment per step (dashed: objective)")
    quant = df.melt(id_vars=["time"], value_vars=["p50_s", "p90_s", "p99_s"], var_name="quantile",
                    value_name="seconds")
    quant["quantile"] = quant["quantile"].str.removesuffix("_s")
    lines(ctx, quant, "seconds", "quantile", f"{name}: latency quantiles", y=alt.Y("seconds:Q", title="seconds"))


def render(ctx: Ctx) -> None:
    slos = fetch("SLOs", ctx.client.slos)
    alerts = fetch("alerts", lambda: ctx.client.alerts(limit=200)) or []
    if slos is None:
        return
    if not slos:
        st.info("No SLO is evaluated by this plane (give the deployments SLOs in the spec).")
        return
    table(shape.slo_rows(slos, alerts), "no SLO")
    for slo in slos:
        name = str(slo.get("name"))
        st.subheader(f"SLO {name}")
        if slo.get(shape.SIMULATED) is True:
            st.badge("simulated", color="orange", help="its deployment's timing comes from the plane's simulator, "
                                                       "not a real engine")
        cols = st.columns(4)
        no_data = bool(slo.get("no_data"))
        cols[0].metric("attainment", shape.NO_DATA if no_data else shape.ratio(slo.get("attainment"), 3),
                       help=f"objective {shape.ratio(slo.get('objective'), 3)}")
        cols[1].metric("error budget left",
                       shape.NO_DATA if no_data else shape.ratio(slo.get("error_budget_remaining"), 1))
        cols[2].metric("alert", shape.alert_state(alerts, name))
        cols[3].metric("evaluated", shape.when(slo.get("evaluated_unix_s"))[11:19] or shape.UNKNOWN,
                       help=shape.when(slo.get("evaluated_unix_s")))
        left, right = st.columns(2)
        with left:
            st.markdown("**Burn rates**")
            table(shape.burn_rows(slo), "no alert windows configured")
        with right:
            st.markdown("**Quantiles over the SLO window**")
            table([{"sli": shape.text(q.get("sli")), **{k: shape.seconds(v) for k, v in
                                                         (q.get("values_s") or {}).items()},
                    "count": shape.text(q.get("count"))} for q in slo.get("quantiles") or []],
                  "no quantiles")
        _history(ctx, slo)
