"""What every page shares: the context of one run (API client, clock, time window) and guarded fetches that
turn the client's errors into a message on the page instead of a traceback."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import altair as alt
import pandas as pd
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.client import NotAvailable, PlaneClient, PlaneError, PlaneUnreachable

T = TypeVar("T")


@dataclass(frozen=True)
class Ctx:
    client: PlaneClient
    now_unix_s: float
    window_s: float

    @property
    def since(self) -> float:
        return self.now_unix_s - self.window_s

    @property
    def step_s(self) -> int:
        """About 60 points per window, in whole minutes (the API's history step is a multiple of 60 s)."""
        return 60 * max(1, math.ceil(self.window_s / 3600))

    @property
    def can_act(self) -> bool:
        return self.client.token is not None


def fetch(what: str, call: Callable[[], T]) -> T | None:
    """The call's result, or None after saying on the page why there is none."""
    try:
        return call()
    except NotAvailable as exc:
        st.info(f"{what}: not available from this plane ({exc.url} answered 404: it needs a newer plane).")
    except PlaneUnreachable as exc:
        st.error(str(exc))
    except PlaneError as exc:
        st.error(f"{what}: {exc}")
    return None


def simulated_names(ctx: Ctx) -> set[str]:
    """Replicas to label as simulated; a failed lookup labels none (the page's own fetches report errors)."""
    try:
        deployments = ctx.client.deployments()
    except (PlaneError, PlaneUnreachable):
        deployments = []
    try:
        replicas = ctx.client.replicas()
    except (PlaneError, PlaneUnreachable):
        replicas = []
    return shape.simulated_replicas(deployments, replicas)


def table(rows: Sequence[Mapping[str, Any]], empty: str, *, key: str | None = None) -> None:
    if not rows:
        st.info(empty)
        return
    st.dataframe(pd.DataFrame(list(rows)), hide_index=True, width="stretch", key=key)


def window_caption(ctx: Ctx) -> None:
    st.caption(f"Window: {shape.when(ctx.since)} to {shape.when(ctx.now_unix_s)} · plane {ctx.client.base_url}")


def time_x(ctx: Ctx) -> alt.X:
    """A UTC time axis (whatever the browser's zone), with dates once the window spans more than a day."""
    fmt = "%H:%M" if ctx.window_s <= 86_400 else "%m-%d %H:%M"
    return alt.X("time:T", title="time (UTC)", scale=alt.Scale(type="utc"),
                 axis=alt.Axis(format=fmt, labelAngle=0, tickCount=8))


def utc_tooltip(field: str) -> alt.Tooltip:
    return alt.Tooltip(f"{field}:T", format="%Y-%m-%d %H:%M:%S", formatType="utc")


def series_color(field: str, title: str) -> alt.Color:
    return alt.Color(f"{field}:N", title=title, scale=alt.Scale(scheme="tableau10"))


def chart(c: alt.Chart | alt.LayerChart, title: str) -> None:
    """A chart under a bold heading (Vega titles get clipped by Streamlit's layout); the title is also the
    spec's description, which is how tests find the chart."""
    st.markdown(f"**{title}**")
    st.altair_chart(c.properties(description=title), width="stretch")


def lines(ctx: Ctx, df: pd.DataFrame, column: str, series: str, title: str, *, y: alt.Y | None = None,
          tooltip_format: str = ".4g") -> None:
    """One line per series over time, broken where a reading is unknown (never drawn through it as if known)."""
    data = shape.gapped(df, series, column)
    if data.empty:
        st.markdown(f"**{title}**")
        st.info(f"{title}: {shape.NO_DATA} in the window")
        return
    chart(alt.Chart(data).mark_line(point=len(data) < 200).encode(
        x=time_x(ctx), y=y or alt.Y(f"{column}:Q", title=title), color=series_color(series, series),
        detail="segment:N",
        tooltip=[f"{series}:N", utc_tooltip("time"),
                 alt.Tooltip(f"{column}:Q", format=tooltip_format)]).properties(height=220), title)
