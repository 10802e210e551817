"""The demo report: Markdown with PNG plots, built from what the plane stored (read through its REST API).

Plots: TTFT percentiles over time against the SLO line, KV-cache usage and queue per replica, replicas serving,
cost per 1M tokens, and the alert / action timeline (also as a table). Everything is read back from the plane,
so the report shows what an operator would see, not what the load generator believes.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np


@dataclass(frozen=True)
class ReportInput:
    deployment: str
    slo_name: str
    ttft_threshold_s: float
    objective: float
    since: float
    until: float
    phases: Mapping[str, tuple[float, float]]
    requests: Sequence[Mapping[str, Any]]
    samples: Sequence[Mapping[str, Any]]
    cost: Mapping[str, Any] | None
    alerts: Sequence[Mapping[str, Any]]
    actions: Sequence[Mapping[str, Any]]
    recommendations: Sequence[Mapping[str, Any]]
    client: Mapping[str, tuple[float | None, int]]  # phase -> (share of requests within the SLO, count)
    failed: Mapping[str, int] | None = None  # phase -> requests that failed at the client (not in the shares)
    engine: str = "an engine not stated"  # what served the run (the demo says which): never assumed real
    verdict: tuple[bool, Sequence[str]] | None = None  # whether the story happened, and if not why (demo.verdict)


def fetch(api_url: str, *, deployment: str, slo_name: str, since: float, until: float,
          token: str | None = None) -> dict[str, Any]:
    """Everything the report needs, through the REST API (paging through the requests)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=api_url, timeout=30.0, headers=headers) as api:
        reqs: list[dict[str, Any]] = []
        before: int | None = None
        while True:
            params: dict[str, Any] = {"since": since, "until": until, "limit": 5000}
            if before is not None:
                params["before_id"] = before
            page = api.get("/api/v1/requests", params=params).raise_for_status().json()
            reqs += page["items"]
            before = page.get("next_before_id")
            if before is None:
                break
        out["requests"] = reqs
        out["samples"] = engine_samples(api, since, until)
        step = max(10, int((until - since) / 60))
        r = api.get("/api/v1/cost", params={"deployment": deployment, "since": since, "until": until, "step_s": step})
        out["cost"] = r.json()["items"][0] if r.status_code == 200 and r.json().get("items") else None
        out["alerts"] = api.get("/api/v1/alerts", params={"slo": slo_name}).raise_for_status().json()["items"]
        out["actions"] = api.get("/api/v1/actions", params={"since": since, "until": until + 120,
                                                            "limit": 2000}).raise_for_status().json()["items"]
        out["recommendations"] = api.get("/api/v1/recommendations",
                                         params={"deployment": deployment}).raise_for_status().json()["items"]
    return out


def engine_samples(api: httpx.Client, since: float, until: float, page: int = 10_000) -> list[dict[str, Any]]:
    """Every engine sample in [since, until), oldest first. The endpoint returns the newest `page` rows,
    so a long run is read page by page towards the past (a row sharing the oldest timestamp of a page is
    asked for again and kept once)."""
    rows: dict[Any, dict[str, Any]] = {}
    upper = until
    while True:
        items = api.get("/api/v1/engine-samples", params={"since": since, "until": upper, "limit": page}
                        ).raise_for_status().json()["items"]
        rows.update({r["id"]: r for r in items})
        oldest = min((float(r["ts_unix_s"]) for r in items), default=None)
        if len(items) < page or oldest is None or math.nextafter(oldest, math.inf) >= upper:
            break  # the last page, or a page of one timestamp only: nothing older is left out by stopping
        upper = math.nextafter(oldest, math.inf)
    return sorted(rows.values(), key=lambda r: (float(r["ts_unix_s"]), r["id"]))


def _bins(since: float, until: float, width: float) -> np.ndarray:
    return np.arange(since, until + width, width)


def _t(x: Any, t0: float) -> Any:
    return (np.asarray(x, dtype=float) - t0) / 60.0  # minutes since the start


def ttft_series(requests: Sequence[Mapping[str, Any]], since: float, until: float,
                width_s: float = 10.0) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Bin starts, TTFT p50/p90/p99 per bin (NaN: no request), and the share within `threshold` is left to
    the caller. Requests are placed by arrival."""
    edges = _bins(since, until, width_s)
    arr = np.array([float(r["arrival_unix_s"]) for r in requests if r.get("ttft_s") is not None])
    ttft = np.array([float(r["ttft_s"]) for r in requests if r.get("ttft_s") is not None])
    idx = np.digitize(arr, edges) - 1
    q: dict[str, np.ndarray] = {k: np.full(len(edges) - 1, np.nan) for k in ("p50", "p90", "p99")}
    counts = np.zeros(len(edges) - 1)
    for i in range(len(edges) - 1):
        v = ttft[idx == i]
        counts[i] = len(v)
        if len(v):
            q["p50"][i], q["p90"][i], q["p99"][i] = np.quantile(v, [0.5, 0.9, 0.99])
    return edges[:-1], q, counts


SERVING_GAP_S: Final = 15.0  # successive good scrapes further apart than this: not serving in between


def serving_steps(replicas: Iterable[Sequence[Mapping[str, Any]]], since: float,
                  until: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, replicas serving from each time on): a replica serves from a successful scrape to the next one
    at most SERVING_GAP_S later. Drawn at the scrapes' own times, so a replica never appears serving before
    the action that started it (binned counts put it at the start of its bin)."""
    events: list[tuple[float, int]] = []
    for rows in replicas:
        ok = sorted(float(r["ts_unix_s"]) for r in rows if r.get("scrape_ok"))
        start = prev = None
        for ts in ok:
            if start is None or prev is None or ts - prev > SERVING_GAP_S:
                if start is not None and prev is not None:
                    events += [(start, 1), (prev, -1)]
                start = ts
            prev = ts
        if start is not None and prev is not None:
            events += [(start, 1), (prev, -1)]
    times, values, level = [since], [0], 0
    for ts, d in sorted(events, key=lambda e: (e[0], -e[1])):  # a start before an end at one time: never < 0
        level += d
        times.append(min(max(ts, since), until))
        values.append(level)
    times.append(until)
    values.append(level)
    return np.array(times), np.array(values, dtype=float)


def replica_series(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """One replica's sample times, KV usage and requests waiting, oldest first. A failed scrape (or a reading
    it lacks) stays in as NaN, which breaks the plotted line: left out, the line would join the readings either
    side and draw the unknown stretch as known."""
    def known(row: Mapping[str, Any], key: str) -> float:
        v = row.get(key)
        return float(v) if row.get("scrape_ok") and v is not None else np.nan

    rows = sorted((r for r in rows if r.get("ts_unix_s") is not None), key=lambda r: float(r["ts_unix_s"]))
    return ([float(r["ts_unix_s"]) for r in rows], [known(r, "kv_usage_ratio") for r in rows],
            [known(r, "num_waiting") for r in rows])


def attainment(requests: Sequence[Mapping[str, Any]], threshold_s: float, t0: float,
               t1: float) -> tuple[float | None, int]:
    """Share of requests arriving in [t0, t1) whose stored TTFT met the threshold (None: none known)."""
    v = [float(r["ttft_s"]) for r in requests
         if r.get("ttft_s") is not None and t0 <= float(r["arrival_unix_s"]) < t1]
    return (sum(x <= threshold_s for x in v) / len(v) if v else None), len(v)


def _marks(ax: Any, inp: ReportInput, t0: float) -> None:
    colours = {"steady": "#e8f4e8", "burst": "#fbe3e3", "catch-up": "#fdf2d9", "recovered": "#e3ecfb"}
    for name, (start, end) in inp.phases.items():
        ax.axvspan(_t(start, t0), _t(end, t0), color=colours.get(name, "#eeeeee"), zorder=0)
    for alert in inp.alerts:  # only the run's own (an older page would stretch the axis back to it)
        if alert.get("fired_unix_s") and inp.since <= float(alert["fired_unix_s"]) <= inp.until:
            ax.axvline(_t(alert["fired_unix_s"], t0), color="red", ls="--", lw=1)
    for x in inp.actions:  # the scale actions themselves (a recommendation's decided time moves when judged)
        if x.get("kind") == "scale":
            ax.axvline(_t(x["ts_unix_s"], t0), color="purple", ls=":", lw=1.2)


def render(inp: ReportInput, out_dir: Path) -> Path:
    """Write report.md and its PNGs into out_dir; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = inp.since
    pngs: dict[str, str] = {}

    # 1. TTFT percentiles against the SLO line
    starts, q, counts = ttft_series(inp.requests, inp.since, inp.until)
    fig, ax = plt.subplots(figsize=(10, 4))
    _marks(ax, inp, t0)
    for k, c in (("p50", "#2b8cbe"), ("p90", "#f39c12"), ("p99", "#c0392b")):  # at each 10 s bin's middle
        ax.plot(_t(starts + 5.0, t0), q[k], label=f"TTFT {k}", color=c, lw=1.5)
    ax.axhline(inp.ttft_threshold_s, color="black", lw=1, label=f"SLO threshold {inp.ttft_threshold_s:g} s")
    ax.set_yscale("log")
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("TTFT (s, from vLLM's spans)")
    ax.set_title(f"{inp.deployment}: TTFT per 10 s (phases shaded; red dashed: page fired; purple: scale applied)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, out_dir, "ttft", pngs)

    # 2. KV usage and queue per replica; 3. replicas serving
    by_rep: dict[str, list[Mapping[str, Any]]] = {}
    for s in inp.samples:
        by_rep.setdefault(str(s.get("replica")), []).append(s)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    _marks(ax1, inp, t0)
    _marks(ax2, inp, t0)
    for rep, rows in sorted(by_rep.items()):
        ts, kv, waiting = replica_series(rows)
        ax1.plot(_t(ts, t0), kv, label=rep, lw=1)
        ax2.plot(_t(ts, t0), waiting, label=f"{rep} waiting", lw=1)
    ax1.set_ylabel("KV cache usage")
    ax1.set_ylim(0, 1.05)
    if by_rep:
        ax1.legend(loc="upper left", fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no scrape in this run", transform=ax1.transAxes, ha="center", va="center")
    ax2.set_ylabel("requests waiting")
    ax2.set_xlabel("minutes since start")
    ax1.set_title("KV cache and queue per replica (vLLM /metrics, as scraped)")
    _save(fig, out_dir, "kv", pngs)

    times, serving = serving_steps(by_rep.values(), inp.since, inp.until)
    fig, ax = plt.subplots(figsize=(10, 2.6))
    _marks(ax, inp, t0)
    ax.step(_t(times, t0), serving, where="post", color="#2c3e50")
    ax.set_ylabel("replicas scraped OK")
    ax.set_xlabel("minutes since start")
    ax.set_ylim(0, max(2, serving.max() if len(serving) else 1) + 0.5)
    ax.set_title(f"replicas serving (from a replica's first successful scrape to its last, gaps over "
                 f"{SERVING_GAP_S:g} s left out)")
    _save(fig, out_dir, "replicas", pngs)

    # 4. cost per 1M tokens
    cost_note = "no cost data (price or token counters unknown)"
    if inp.cost and inp.cost.get("points"):
        pts = inp.cost["points"]
        fig, ax = plt.subplots(figsize=(10, 2.8))
        _marks(ax, inp, t0)
        ts = [float(p["ts_unix_s"]) for p in pts]
        ax.plot(_t(ts, t0), [np.nan if p.get("usd_per_1m_tokens") is None else p["usd_per_1m_tokens"] for p in pts],
                color="#16a085", marker=".")
        ax.set_ylabel("$ per 1M tokens")
        ax.set_xlabel("minutes since start")
        ax.set_title(f"cost per 1M tokens (replica-hours x ${inp.cost.get('price_per_replica_hour_usd')}/h "
                     "over prompt + completion tokens)")
        _save(fig, out_dir, "cost", pngs)
        tot = inp.cost.get("totals") or {}
        usd = tot.get("usd")
        cost_note = (f"{_num(tot.get('replica_hours'), '.3f')} replica-hours, "
                     f"{'cost unknown (failed scrapes)' if usd is None else f'${usd:.4f}'}, "
                     f"{_num(tot.get('prompt_tokens'), ',.0f')} prompt + "
                     f"{_num(tot.get('completion_tokens'), ',.0f')} completion tokens: "
                     f"${tot['usd_per_1m_tokens']:.3f} per 1M tokens (over the steps whose tokens are known)"
                     if tot.get("usd_per_1m_tokens") is not None else "cost per token unknown")

    # 5. the timeline
    events = timeline(inp)
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.28 * max(3, len(events))))
    _marks(ax, inp, t0)
    for i, (when, who, what) in enumerate(events):
        ax.plot(_t(when, t0), i, "o", color={"alert": "red", "tuner": "purple", "user": "blue"}.get(who, "gray"))
        ax.text(_t(when, t0), i, f"  {what}", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(0, _t(inp.until, t0) * 1.35)
    ax.set_xlabel("minutes since start")
    ax.set_title("alerts and actions")
    _save(fig, out_dir, "timeline", pngs)

    md = _markdown(inp, pngs, events, cost_note)
    path = out_dir / "report.md"
    path.write_text(md)
    return path


def _save(fig: Any, out_dir: Path, name: str, pngs: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    pngs[name] = f"{name}.png"


def timeline(inp: ReportInput) -> list[tuple[float, str, str]]:
    """(time, who, what) of pages and of the plane's actions, oldest first."""
    ev: list[tuple[float, str, str]] = []
    for a in inp.alerts:
        if a.get("fired_unix_s"):
            ev.append((float(a["fired_unix_s"]), "alert", f"{a['severity']} {a['alertname']} fired"))
        if a.get("resolved_unix_s"):
            ev.append((float(a["resolved_unix_s"]), "alert", f"{a['alertname']} resolved"))
    for x in inp.actions:
        kind, actor, reason = x.get("kind"), x.get("actor"), x.get("reason")
        if kind in ("probe", "scrape") or (kind == "autoscale_decision" and str(reason).startswith("hold")):
            continue
        what = f"{actor}: {kind} ({reason})"
        if x.get("replica"):
            what += f" {x['replica']}"
        ev.append((float(x["ts_unix_s"]), str(actor), what))
    return sorted(e for e in ev if inp.since - 600 <= e[0] <= inp.until + 600)


def _when(ts: float, t0: float) -> str:
    return f"+{(ts - t0):.0f} s ({dt.datetime.fromtimestamp(ts, dt.UTC).strftime('%H:%M:%S')} UTC)"


STORY_TOLD: Final = "the plane paged, the tuner added a replica, and attainment recovered"


def _outcome_lines(v: tuple[bool, Sequence[str]] | None) -> list[str]:
    """The run's verdict first: a report of a story that did not happen must not read like one that did."""
    if v is None:
        return []
    ok, why = v
    if ok:
        return [f"**Outcome: {STORY_TOLD}.**", ""]
    return ["**Outcome: the story did not complete.** " + "; ".join(why) + ".", ""]


def _pct(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.1%}"


def _num(v: Any, fmt: str) -> str:
    """A figure of the API (None: unknown, not 0; a count may come as a float)."""
    if v is None:
        return "unknown"
    return format(int(v) if fmt == "d" else float(v), fmt)


def _change(current: Mapping[str, Any], proposed: Mapping[str, Any], prefix: str = "") -> str:
    """What a recommendation changes, key by key: only what it proposes (its `current` also carries context,
    such as the engine a scale-up keeps), nested settings by their own keys."""
    parts = []
    for k in sorted(proposed):
        was, new = current.get(k), proposed[k]
        if isinstance(new, Mapping):
            inner = _change(was if isinstance(was, Mapping) else {}, new, f"{prefix}{k}.")
            parts += [inner] if inner else []
        elif was != new:
            parts.append(f"{prefix}{k} {was} -> {new}")
    return ", ".join(parts)


def _outcome(o: Mapping[str, Any] | None, t0: float) -> str:
    """A recommendation's stored outcome in words: its verdict, the SLO before and after, when it was judged."""
    if not o:
        return "not judged yet"
    parts = [str(o["verdict"]).replace("_", " ")] if o.get("verdict") else []
    for key in ("before", "after"):
        counts = o.get(key)
        if isinstance(counts, Mapping) and counts.get("known"):
            parts.append(f"{key}: {_pct(counts['good'] / counts['known'])} within SLO of {counts['known']}")
    if o.get("slo_worse_after"):
        parts.append("the SLO was worse after (a scale-up is kept)")
    for key in ("why", "error", "rollback_error"):
        if o.get(key):
            parts.append(f"{key.replace('_', ' ')}: {o[key]}")
    for key, label in (("in_effect_unix_s", "in effect"), ("judged_unix_s", "judged")):
        if isinstance(o.get(key), int | float):
            parts.append(f"{label} {_when(o[key], t0)}")
    return "; ".join(parts) or ("being applied" if o.get("applying_since_unix_s") else "not judged yet")


def _markdown(inp: ReportInput, pngs: Mapping[str, str], events: Sequence[tuple[float, str, str]],
              cost_note: str) -> str:
    t0 = inp.since
    lines = [f"# Closed-loop demo: {inp.deployment} on {inp.engine}", "",
             f"Run from {dt.datetime.fromtimestamp(inp.since, dt.UTC):%Y-%m-%d %H:%M:%S} UTC for "
             f"{(inp.until - inp.since) / 60:.1f} minutes. SLO `{inp.slo_name}`: TTFT <= {inp.ttft_threshold_s:g} s "
             f"for {inp.objective:.0%} of requests.", "",
             *_outcome_lines(inp.verdict),
             "## SLO attainment by phase", "",
             "| phase | from | to | requests (store) | within SLO (store, vLLM's TTFT) | within SLO (client) "
             "| failed |",
             "|---|---|---|---|---|---|---|"]
    for name, (a, b) in inp.phases.items():
        share, n = attainment(inp.requests, inp.ttft_threshold_s, a, b)
        c_share, c_n = inp.client.get(name, (None, 0))
        failed = (inp.failed or {}).get(name)
        lines.append(f"| {name} | +{a - t0:.0f} s | +{b - t0:.0f} s | {n} | {_pct(share)} | "
                     f"{_pct(c_share)} of {c_n} | {'unknown' if failed is None else failed} |")
    lines += ["", "The client's TTFT adds the HTTP path and the router to vLLM's own; both are shown.", "",
              f"![TTFT]({pngs['ttft']})", "", "## What the plane did", ""]
    for ts, _who, what in events:
        lines.append(f"- {_when(ts, t0)} — {what}")
    applied = [r for r in inp.recommendations if r.get("status") in ("applied", "rolled_back")]
    for r in applied:
        ev = r.get("evidence") or {}
        obs = ev.get("observed") or {}
        change = _change(r.get("current") or {}, r.get("proposed") or {})
        lines += ["", f"### Recommendation {r['id']}: {r['kind']}, {change or 'no change'} "
                      f"({r['reason']}, {r['mode']}, {r['status']})", "",
                  f"- observed: {_num(obs.get('rate_rps'), '.2f')} req/s, "
                  f"good ratio {_pct(obs.get('slo_good_ratio'))} of {_num(obs.get('finished'), 'd')} finished, "
                  f"TTFT p99 {_num(obs.get('ttft_p99_s'), '.3f')} s",
                  f"- capacity model: {(ev.get('capacity') or {}).get('source')}",
                  f"- cost: ${(ev.get('cost') or {}).get('usd_per_hour_current')}/h -> "
                  f"${(ev.get('cost') or {}).get('usd_per_hour_proposed')}/h",
                  f"- confidence {r.get('confidence')}; outcome: {_outcome(r.get('outcome'), t0)}"]
    lines += ["", f"![timeline]({pngs['timeline']})", "", "## KV cache and queue", "", f"![KV]({pngs['kv']})", "",
              "## Replicas", "", f"![replicas]({pngs['replicas']})", "", "## Cost", "", cost_note, ""]
    if "cost" in pngs:
        lines += [f"![cost]({pngs['cost']})", ""]
    return "\n".join(lines) + "\n"
