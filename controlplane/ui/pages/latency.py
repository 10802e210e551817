"""Latency phases: queue / prefill / decode distributions and one request's waterfall on a time axis."""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, chart, fetch, simulated_names, table, window_caption

MAX_REQUESTS = 2000
PHASE_COLOR = {"queue": "#9e9e9e", "prefill": "#1f77b4", "decode": "#2ca02c"}
PHASE_SCALE = alt.Scale(domain=list(PHASE_COLOR), range=list(PHASE_COLOR.values()))


def _histograms(requests: list[dict[str, Any]]) -> None:
    df = shape.phase_frame(requests)
    cols = st.columns(len(shape.PHASES))
    for col, phase in zip(cols, shape.PHASES, strict=True):
        part = df[df["phase"] == phase]
        with col:
            if part.empty:
                st.markdown(f"**{phase} time**")
                st.info(f"{phase}: {shape.NO_DATA} (no request reported this phase)")
                continue
            chart(alt.Chart(part).mark_bar(color=PHASE_COLOR[phase]).encode(
                x=alt.X("seconds:Q", bin=alt.Bin(maxbins=30), title=f"{phase} (s)"),
                y=alt.Y("count():Q", title="requests")).properties(height=220), f"{phase} time")


def _waterfall(requests: list[dict[str, Any]], simulated: set[str]) -> None:
    st.subheader("Request waterfall")
    shown = requests[:300]
    complete = [i for i, r in enumerate(shown) if not shape.missing_phases(r)]
    choice = st.selectbox("Request (newest first)", range(len(shown)), index=complete[0] if complete else 0,
                          format_func=lambda i: shape.request_choice(shown[i], simulated), key="waterfall_request")
    r = shown[choice or 0]
    cols = st.columns(5)
    cols[0].metric("TTFT", shape.seconds(r.get("ttft_s")))
    cols[1].metric("TPOT", shape.seconds(r.get("tpot_s")))
    cols[2].metric("end to end", shape.seconds(r.get("e2e_s")))
    cols[3].metric("prompt tokens", shape.text(r.get("prompt_tokens")))
    cols[4].metric("completion tokens", shape.text(r.get("completion_tokens")))
    st.caption(f"arrived {shape.when(r.get('arrival_unix_s'))} on {shape.label(r.get('replica'), simulated)} · "
               f"trace {shape.text(r.get('trace_id'))}")
    bars, missing = shape.waterfall(r)
    if missing:
        st.warning(f"unknown phase durations: {', '.join(missing)} (the span did not report them)")
    if bars.empty:
        return
    base = alt.Chart(bars).encode(y=alt.Y("phase:N", sort=list(shape.PHASES), title=None))
    bars_chart = base.mark_bar(height=28).encode(
        x=alt.X("start_s:Q", title="seconds since arrival"), x2="end_s:Q",
        color=alt.Color("phase:N", scale=PHASE_SCALE, legend=None),
        tooltip=["phase:N", "duration:N", alt.Tooltip("start_s:Q", format=".4f"), alt.Tooltip("end_s:Q", format=".4f")])
    labels = base.mark_text(align="left", dx=4).encode(x="end_s:Q", text="duration:N")
    chart((bars_chart + labels).properties(height=150), "queue -> prefill -> decode")


def render(ctx: Ctx) -> None:
    window_caption(ctx)
    simulated = simulated_names(ctx)
    names = sorted(r["name"] for r in (fetch("replicas", ctx.client.replicas) or []) if r.get("name"))
    replica = st.selectbox("Replica", ["all replicas", *names], key="latency_replica",
                           format_func=lambda n: shape.label(n, simulated) if n in names else n)
    got = fetch("requests", lambda: ctx.client.requests(since=ctx.since, replica=replica if replica in names else None,
                                                        limit=MAX_REQUESTS))
    if got is None:
        return
    requests = list(got.get("items") or [])
    if not requests:
        st.info("No finished request in the window (point the engines' OTLP traces at the plane).")
        return
    more = " (newest only; older ones are in the API)" if got.get("next_before_id") or len(requests) >= MAX_REQUESTS \
        else ""
    st.caption(f"{len(requests)} requests{more}")
    table(shape.phase_summary(requests), "no request")
    _histograms(requests)
    _waterfall(requests, simulated)
