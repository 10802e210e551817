"""Cost: $/hour and $/1M prompt / completion tokens over time, per deployment."""

from __future__ import annotations

import altair as alt
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, fetch, lines, table, window_caption


def render(ctx: Ctx) -> None:
    window_caption(ctx)
    items = fetch("cost", lambda: ctx.client.cost(since=ctx.since, until=ctx.now_unix_s, step_s=ctx.step_s))
    if items is None:
        return
    if not items:
        st.info("No cost data: no deployment or watched replica has engine samples in the window.")
        return
    st.markdown("**Totals over the window**")
    table(shape.cost_rows(items), "no deployment")
    unpriced = [str(i.get("deployment")) for i in items if i.get("price_per_replica_hour_usd") is None]
    if unpriced:
        st.warning(f"Price unknown for {', '.join(unpriced)}: costs show as unknown (set hardware.price_per_hour_usd "
                   "in the deployment spec, or CONTROLPLANE_WATCHED_PRICE_PER_REPLICA_HOUR_USD for watched replicas).")
    df = shape.cost_frame(items)
    for column, title in shape.COST_SERIES.items():
        lines(ctx, df, column, "deployment", title, y=alt.Y(f"{column}:Q", title=title, axis=alt.Axis(format="$.2f")),
              tooltip_format="$.4f")
