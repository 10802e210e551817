"""GPU telemetry (dcgm-exporter or NVML) when the plane stores any."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, chart, fetch, window_caption


def render(ctx: Ctx) -> None:
    window_caption(ctx)
    got = fetch("GPU telemetry", lambda: ctx.client.gpu(since=ctx.since, until=ctx.now_unix_s))
    if got is None:
        return
    gpus = list(got.get("gpus") or [])
    if not got.get("available") or not gpus:
        st.info("No GPU telemetry: the plane has stored no GPU sample (no dcgm-exporter or NVML source, or "
                "the replicas run on CPU).")
        return
    cols = st.columns(3)
    cols[0].metric("GPUs", len(gpus))
    utils = [g["mean_util_ratio"] for g in gpus if isinstance(g.get("mean_util_ratio"), int | float)]
    cols[1].metric("mean utilisation", shape.ratio(sum(utils) / len(utils), 0) if utils else shape.UNKNOWN)
    temps = [g["max_temp_c"] for g in gpus if isinstance(g.get("max_temp_c"), int | float)]
    cols[2].metric("hottest", f"{max(temps):.0f} °C" if temps else shape.UNKNOWN)
    rows = shape.gpu_rows(gpus)
    # One column per GPU: a GPU has a dozen readings, a host rarely more than eight GPUs.
    wide = pd.DataFrame({r["GPU"]: {k: v for k, v in r.items() if k != "GPU"} for r in rows})
    st.dataframe(wide, width="stretch", height=35 * (len(wide) + 1) + 3)  # every reading, no inner scrolling
    util = pd.DataFrame([{"GPU": r["GPU"], "reading": label, "utilisation": g.get(key) if key == "mean_util_ratio"
                          else (g.get("latest") or {}).get(key)}
                         for r, g in zip(rows, gpus, strict=True)
                         for label, key in (("latest", "util_ratio"), ("mean over window", "mean_util_ratio"))])
    util = util.dropna(subset=["utilisation"])
    if not util.empty:
        chart(alt.Chart(util).mark_bar().encode(
            x=alt.X("utilisation:Q", title="utilisation", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("GPU:N", title=None), yOffset="reading:N", color=alt.Color("reading:N", title=None),
            tooltip=["GPU:N", "reading:N", alt.Tooltip("utilisation:Q", format=".0%")])
              .properties(height=int(80 + 50 * len(rows))), "GPU utilisation")
