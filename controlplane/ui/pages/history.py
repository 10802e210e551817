"""Action history (the audit log: who changed what, why, config before/after) and the alert timeline."""

from __future__ import annotations

import altair as alt
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, chart, fetch, simulated_names, table, utc_tooltip, window_caption

ALERT_COLORS = alt.Scale(domain=["pending", "firing"], range=["#f0ad4e", "#d9534f"])


def render(ctx: Ctx) -> None:
    window_caption(ctx)
    st.subheader("Actions")
    actions = fetch("actions", lambda: ctx.client.actions(since=ctx.since, until=ctx.now_unix_s, limit=500))
    if actions is not None:
        table(shape.action_rows(actions, simulated_names(ctx)),
              "No action in the window (scale, reconfigure, restart and recommendation decisions appear here).")
    st.subheader("Alerts")
    alerts = fetch("alerts", lambda: ctx.client.alerts(limit=200))
    if alerts is None:
        return
    shown = [a for a in alerts if (a.get("resolved_unix_s") or ctx.now_unix_s) >= ctx.since]
    if not shown:
        st.info("No SLO alert episode in the window.")
        return
    tl = shape.alert_timeline(shown, ctx.now_unix_s)
    if not tl.empty:
        fmt = "%H:%M" if ctx.window_s <= 86_400 else "%m-%d %H:%M"
        chart(alt.Chart(tl).mark_bar(height=18).encode(
            x=alt.X("start:T", title="time (UTC)", scale=alt.Scale(type="utc"), axis=alt.Axis(format=fmt, tickCount=8)),
            x2="end:T", y=alt.Y("alert:N", title=None),
            color=alt.Color("phase:N", scale=ALERT_COLORS),
            tooltip=["alert:N", "phase:N", utc_tooltip("start"), utc_tooltip("end")])
            .properties(height=int(60 + 36 * tl["alert"].nunique())), "alert timeline")  # the height holds the axis too
    table(shape.alert_rows(shown), "no alert")
