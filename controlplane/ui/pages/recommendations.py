"""Recommendations with their evidence, and Apply / Dismiss (bearer token from CONTROLPLANE_API_TOKEN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from controlplane.ui import shape
from controlplane.ui.client import PlaneClient, PlaneError, PlaneUnreachable
from controlplane.ui.pages.common import Ctx, fetch, table

STATUSES = ("open", "all", "applied", "dismissed", "superseded", "rolled_back", "failed")
FLASH = "recommendation_flash"


def _decide(client: PlaneClient, rid: int, verb: str) -> None:
    """Button callback: runs before the rerun, so the list drawn next already shows the new status."""
    try:
        rec = client.apply(rid) if verb == "apply" else client.dismiss(rid)
    except (PlaneError, PlaneUnreachable) as exc:
        st.session_state[FLASH] = ("error", f"{verb} recommendation {rid} failed: {exc}")
        return
    st.session_state[FLASH] = ("success", f"recommendation {rid} is now {rec.get('status')}")


def _start_search(client: PlaneClient) -> None:
    """Button callback: reads the form's current values (callback args would be those of the previous run)."""
    deployment = str(st.session_state["search_deployment"])
    canary_trials = int(st.session_state["search_canary"])
    target_rps = float(st.session_state["search_rate"])
    try:
        job = client.start_search(deployment, canary_trials=canary_trials, target_rps=target_rps or None)
    except (PlaneError, PlaneUnreachable) as exc:
        st.session_state[FLASH] = ("error", f"search of {deployment} failed to start: {exc}")
        return
    st.session_state[FLASH] = ("success", f"search {job.get('id')} of {deployment} started; its outcome appears "
                                          "below and, if it changes something, as a recommendation")


def _search(ctx: Ctx) -> None:
    """Start a configuration search of a supervised deployment; list recent searches with their last step."""
    with st.expander("Search batch limits and replica count on recorded requests"):
        deps = fetch("deployments", ctx.client.deployments) or []
        names = [d["name"] for d in deps if d.get("backend") != "external"]
        if not names:
            st.caption("No supervised deployment to search.")
        else:
            why = None if ctx.can_act else "set CONTROLPLANE_API_TOKEN for the app to start a search"
            a, b, c = st.columns(3)
            a.selectbox("Deployment", names, key="search_deployment")
            b.number_input("Canary trials", 0, 5, 0, key="search_canary",
                                    help="configurations tried for real on a canary replica first")
            c.number_input("Target req/s (0: the recorded mean)", 0.0, 1e6, 0.0, key="search_rate")
            st.button("Start search", key="search_start", disabled=not ctx.can_act, help=why,
                      on_click=_start_search, args=(ctx.client,))
        jobs = fetch("searches", ctx.client.searches)
        if jobs:
            table([{"search": str(j.get("id")), "deployment": shape.text(j.get("deployment")),
                    "status": shape.text(j.get("status")), "started": shape.when(j.get("started_unix_s")),
                    "last step": shape.text((j.get("progress") or [{}])[-1].get("line")),
                    "outcome": shape.text(j.get("error") or (j.get("result") or {}).get("outcome")),
                    "recommendation": shape.text((j.get("result") or {}).get("recommendation_id"))}
                   for j in jobs], "no search yet", key="searches")


def _evidence(rec: Mapping[str, Any]) -> None:
    parts = shape.evidence_parts(rec.get("evidence"))
    left, right = st.columns(2)
    with left:
        st.markdown("**Change**")
        table(shape.change_rows(rec.get("current"), rec.get("proposed")), "no change recorded")
        st.markdown("**Inputs**")
        table(shape.kv_table(parts["inputs"]), "no inputs recorded")
    with right:
        st.markdown("**Predicted effect**")
        table(shape.kv_table({"confidence": shape.ratio(rec.get("confidence"), 0)
                              if rec.get("confidence") is not None else None, **parts["predicted"]}),
              "no prediction recorded")
        if parts["slos"]:
            st.markdown("**Predicted SLOs**")
            table([{k: shape.text(v) for k, v in s.items()} for s in parts["slos"] if isinstance(s, Mapping)],
                  "no SLO prediction")
    if parts["comparison"]:
        st.markdown("**Comparison with other configurations**")
        st.dataframe(pd.DataFrame([{k: shape.text(v) if not isinstance(v, Mapping) else str(v) for k, v in c.items()}
                                   for c in parts["comparison"] if isinstance(c, Mapping)]), hide_index=True,
                     width="stretch")
    with st.expander("Evidence as stored (JSON)"):
        st.json(dict(rec.get("evidence") or {}), expanded=False)


def _card(ctx: Ctx, rec: Mapping[str, Any]) -> None:
    rid = int(rec["id"])
    with st.container(border=True):
        st.markdown(f"#### #{rid} · {rec.get('deployment')} · {rec.get('kind')} · {rec.get('status')}")
        st.caption(f"reason {shape.text(rec.get('reason'))} · mode {shape.text(rec.get('mode'))} · "
                   f"created {shape.when(rec.get('created_unix_s'))} · confidence "
                   f"{shape.ratio(rec.get('confidence'), 0)}"
                   + (f" · decided by {rec.get('decided_by')} at {shape.when(rec.get('decided_unix_s'))}"
                      if rec.get("decided_by") else ""))
        _evidence(rec)
        if rec.get("outcome"):
            st.markdown("**Outcome**")
            st.json(dict(rec["outcome"]), expanded=False)
        if rec.get("status") == "open":
            why = None if ctx.can_act else "set CONTROLPLANE_API_TOKEN for the app to apply or dismiss"
            a, d, _ = st.columns([1, 1, 4])
            a.button("Apply", key=f"apply_{rid}", type="primary", disabled=not ctx.can_act, help=why,
                     on_click=_decide, args=(ctx.client, rid, "apply"))
            d.button("Dismiss", key=f"dismiss_{rid}", disabled=not ctx.can_act, help=why,
                     on_click=_decide, args=(ctx.client, rid, "dismiss"))


def render(ctx: Ctx) -> None:
    flash = st.session_state.pop(FLASH, None)
    if flash is not None:
        (st.success if flash[0] == "success" else st.error)(flash[1])
    if not ctx.can_act:
        st.caption("Read only: CONTROLPLANE_API_TOKEN is not set for the app.")
    _search(ctx)
    status = st.selectbox("Status", STATUSES, key="recommendation_status")
    recs = fetch("recommendations", lambda: ctx.client.recommendations(
        status=None if status == "all" else status, limit=50))
    if recs is None:
        return
    if not recs:
        st.info(f"No {'' if status == 'all' else status + ' '}recommendation.")
        return
    for rec in recs:
        _card(ctx, rec)
