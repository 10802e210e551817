"""Fleet overview: deployments, their replicas and state, engine arguments, and the router's backends."""

from __future__ import annotations

from typing import Any

import streamlit as st

from controlplane.ui import shape
from controlplane.ui.pages.common import Ctx, fetch, table


def _deployment(d: dict[str, Any], simulated: set[str]) -> None:
    name = str(d.get("name"))
    members = [r for r in d.get("replicas") or [] if isinstance(r, dict)]
    sim = any(str(r.get("name")) in simulated for r in members) or shape.is_simulated(
        {k: v for k, v in d.items() if k != "replicas"})
    st.subheader(f"Deployment {name}")
    if sim:
        st.badge("simulated", color="orange", help="timing comes from the plane's simulator, not a real engine")
    if d.get("rolling"):
        st.badge("rolling change in progress", color="blue")
    cols = st.columns(5)
    ready = sum(1 for r in members if r.get("state") == "ready")
    cols[0].metric("desired replicas", shape.text(d.get("desired_replicas")))
    cols[1].metric("ready", f"{ready}/{len(members)}" if "replicas" in d else shape.UNKNOWN)
    cols[2].metric("min / max", f"{shape.text(d.get('min_replicas'))} / {shape.text(d.get('max_replicas'))}")
    cols[3].metric("backend", shape.text(d.get("backend")))
    cols[4].metric("price / replica-hour", shape.usd(d.get("price_per_replica_hour_usd"), 2))
    left, right = st.columns([2, 3])
    with left:
        st.markdown("**Engine arguments**")
        table(shape.engine_rows(d.get("engine")), "no engine configuration reported")
    with right:
        st.markdown("**Router backends**")
        table([{"replica": shape.label(r.get("name"), simulated), "url": shape.text(r.get("url")),
                "state": shape.text(r.get("state")), "in flight": shape.text(r.get("outstanding")),
                "restarts": shape.text(r.get("restarts"))} for r in members],
              "no replica is running for this deployment" if "replicas" in d
              else "not known: this plane does not supervise the deployment now (started without --config)")


def render(ctx: Ctx) -> None:
    deployments = fetch("deployments", ctx.client.deployments) or []
    replicas = fetch("replicas", ctx.client.replicas) or []
    simulated = shape.simulated_replicas(deployments, replicas)
    rows = shape.replica_rows(deployments, replicas, simulated)
    cols = st.columns(4)
    cols[0].metric("deployments", len(deployments))
    cols[1].metric("replicas", len(rows))
    cols[2].metric("ready", sum(1 for r in rows if r["state"] == "ready"))
    cols[3].metric("simulated", sum(1 for r in rows if r["engine"] == shape.SIMULATED))
    if not deployments:
        st.info("This plane supervises no deployment (it only watches replicas, or nothing yet).")
    for d in deployments:
        _deployment(d, simulated)
    st.subheader("All replicas")
    table(rows, "no replica known to the plane yet")
