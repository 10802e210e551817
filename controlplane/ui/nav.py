"""The app's frame: page list (each reachable by URL path, or `?page=` for the default page), the time
window in the sidebar, and the plane health check that turns an unreachable plane into one message."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import streamlit as st

from controlplane.ui.client import (
    DEFAULT_API_URL,
    ENV_API_TOKEN,
    ENV_API_URL,
    PlaneClient,
    PlaneError,
    PlaneUnreachable,
)
from controlplane.ui.pages import cost, fleet, gpu, history, kv, latency, recommendations, slos
from controlplane.ui.pages.common import Ctx

APP_TITLE = "vLLM SLO control plane"


@dataclass(frozen=True)
class PageSpec:
    url_path: str
    title: str
    icon: str
    render: Callable[[Ctx], None]


PAGES: tuple[PageSpec, ...] = (
    PageSpec("fleet", "Fleet overview", ":material/dns:", fleet.render),
    PageSpec("slos", "SLOs", ":material/target:", slos.render),
    PageSpec("latency", "Latency phases", ":material/timer:", latency.render),
    PageSpec("kv-cache", "KV cache", ":material/memory:", kv.render),
    PageSpec("gpu", "GPU telemetry", ":material/developer_board:", gpu.render),
    PageSpec("cost", "Cost", ":material/payments:", cost.render),
    PageSpec("recommendations", "Recommendations", ":material/tips_and_updates:", recommendations.render),
    PageSpec("history", "Action history", ":material/history:", history.render),
)
WINDOWS_S = {"15 minutes": 900.0, "1 hour": 3600.0, "6 hours": 6 * 3600.0, "24 hours": 86400.0,
             "7 days": 7 * 86400.0}


def client_settings(env: Mapping[str, str], api_url: str | None = None) -> tuple[str, str | None]:
    """(base URL, token) from the command line and the environment."""
    return (api_url or env.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/"), env.get(ENV_API_TOKEN) or None


@st.cache_resource(show_spinner=False)
def _client(base_url: str, token: str | None) -> PlaneClient:
    """One client per (URL, token) for the process; button callbacks run in the next script run and use it."""
    return PlaneClient(base_url, token)


def _page(spec: PageSpec, ctx: Callable[[], Ctx]) -> Callable[[], None]:
    def run() -> None:
        st.title(spec.title)
        c = ctx()
        try:
            c.client.health()
        except PlaneUnreachable as exc:
            st.error(str(exc))
            return
        except PlaneError as exc:
            st.warning(f"The plane's health check failed: {exc}")
        spec.render(c)

    run.__name__ = f"page_{spec.url_path.replace('-', '_')}"
    return run


def main(api_url: str | None = None, clock: Callable[[], float] = time.time) -> None:
    """Draw the app; `api_url` (from the script's --api-url) wins over CONTROLPLANE_API_URL."""
    st.set_page_config(page_title=APP_TITLE, layout="wide")
    url, token = client_settings(os.environ, api_url)
    client = _client(url, token)
    wanted = st.query_params.get("page", PAGES[0].url_path)
    if wanted not in {p.url_path for p in PAGES}:
        wanted = PAGES[0].url_path
    label = st.sidebar.selectbox("Time window", list(WINDOWS_S), index=1, key="window")
    st.sidebar.caption(f"Plane: {client.base_url}")
    if client.token_refused:
        st.sidebar.warning(f"{ENV_API_TOKEN} holds characters an HTTP header cannot carry (printable ASCII "
                           "without spaces only): read only")
    else:
        st.sidebar.caption("Token set: Apply / Dismiss enabled" if client.token
                           else f"No token: read only (set {ENV_API_TOKEN})")
    now = clock()

    def ctx() -> Ctx:
        return Ctx(client, now, WINDOWS_S.get(label or "", 3600.0))

    pages = [st.Page(_page(p, ctx), title=p.title, icon=p.icon, url_path=p.url_path, default=p.url_path == wanted)
             for p in PAGES]
    st.navigation(pages).run()
