"""KV cache: usage ratio per replica over time, running / waiting requests, preemption rate."""

from __future__ import annotations

import altair as alt
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, fetch, lines, simulated_names, table, window_caption

MAX_SAMPLES = 10_000  # the API's largest page


def render(ctx: Ctx) -> None:
    window_caption(ctx)
    samples = fetch("engine samples", lambda: ctx.client.engine_samples(since=ctx.since, limit=MAX_SAMPLES))
    if samples is None:
        return
    if not samples:
        st.info("No engine sample in the window (the plane scrapes each replica's /metrics).")
        return
    if len(samples) >= MAX_SAMPLES:
        st.caption(f"Showing the newest {MAX_SAMPLES:,} samples only: choose a shorter window to see all of it.")
    simulated = simulated_names(ctx)
    st.markdown("**Latest per replica**")
    table(shape.kv_latest(samples, simulated), "no replica")
    df = shape.kv_frame(samples, simulated)
    lines(ctx, df, "kv_usage_ratio", "replica", "KV cache usage",
          y=alt.Y("kv_usage_ratio:Q", title="KV cache usage", axis=alt.Axis(format="%"),
                  scale=alt.Scale(domain=[0, 1])), tooltip_format=".1%")
    left, right = st.columns(2)
    with left:
        lines(ctx, df, "num_running", "replica", "running requests")
    with right:
        lines(ctx, df, "num_waiting", "replica", "waiting requests")
    lines(ctx, df, "preemptions_per_s", "replica", "preemptions per second")
