"""Pure shaping of API answers into what the pages draw: text that says "unknown" for a missing reading,
tables, and data frames for the charts. No Streamlit and no I/O here, so all of it is unit-testable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from controlplane.supervisor.spec import EngineConfig

UNKNOWN = "unknown"
NO_DATA = "no data"
PHASES = ("queue", "prefill", "decode")
SIMULATED = "simulated"


# --- text ---------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    """A finite number, else None (the API sends null for unknown; NaN must never become a figure)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def text(v: Any) -> str:
    """Any value as text; None is "unknown"."""
    if v is None:
        return UNKNOWN
    if isinstance(v, float):
        if not math.isfinite(v):
            return UNKNOWN
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e4:
        return f"{v:,}"
    return str(v)


def ratio(v: Any, digits: int = 2) -> str:
    x = _num(v)
    return UNKNOWN if x is None else f"{x * 100:.{digits}f}%"


def seconds(v: Any) -> str:
    x = _num(v)
    if x is None:
        return UNKNOWN
    return f"{x * 1000:.1f} ms" if abs(x) < 1 else f"{x:.3f} s"


def usd(v: Any, digits: int = 4) -> str:
    x = _num(v)
    return UNKNOWN if x is None else f"${x:,.{digits}f}"


def when(ts: Any) -> str:
    x = _num(ts)
    return UNKNOWN if x is None else datetime.fromtimestamp(x, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def times(ts: Iterable[Any]) -> pd.Series:
    """UNIX seconds -> timezone-aware datetimes for chart axes."""
    return pd.to_datetime(pd.Series([_num(t) for t in ts], dtype="float64"), unit="s", utc=True)


def gapped(df: pd.DataFrame, series: str, column: str) -> pd.DataFrame:
    """The known points of `column`, with a `segment` number per series that changes after every unknown one,
    so a chart draws one line per segment: a gap stays visible instead of a line through it."""
    out = df[["time", series, column]].copy()
    out["segment"] = out.groupby(series, sort=False)[column].transform(lambda s: s.isna().cumsum())
    return out.dropna(subset=[column]).reset_index(drop=True)


# --- simulated replicas -------------------------------------------------------------------------
def _says_simulated(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", SIMULATED))


def is_simulated(obj: Any, _depth: int = 0) -> bool:
    """True when a deployment / replica / engine description says anywhere (a `simulated` flag, or an engine
    `kind`/`engine` of "simulated") that it is a simulated engine. Only dicts and lists are searched."""
    if _depth > 4:
        return False
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = str(k).lower()
            if key == SIMULATED and _says_simulated(v):
                return True
            if key in ("kind", "engine", "engine_kind") and isinstance(v, str) and v.lower() in (SIMULATED, "sim"):
                return True
            if isinstance(v, Mapping | list) and is_simulated(v, _depth + 1):
                return True
    elif isinstance(obj, list):
        return any(is_simulated(x, _depth + 1) for x in obj)
    return False


def simulated_replicas(deployments: Sequence[Mapping[str, Any]], replicas: Sequence[Mapping[str, Any]]) -> set[str]:
    """Names of replicas that are simulated: flagged themselves, or members of a simulated deployment."""
    out: set[str] = set()
    for d in deployments:
        whole = is_simulated({k: v for k, v in d.items() if k != "replicas"})
        for r in d.get("replicas") or []:
            if whole or is_simulated(r):
                out.add(str(r.get("name")))
    for r in replicas:
        if is_simulated(r):
            out.add(str(r.get("name")))
    return out


def label(replica: Any, simulated: set[str]) -> str:
    name = UNKNOWN if replica is None else str(replica)
    return f"{name} ({SIMULATED})" if name in simulated else name


def deployment_label(item: Mapping[str, Any]) -> str:
    """An API item's deployment, marked when the item says it is simulated (its SLO, its cost)."""
    name = text(item.get("deployment"))
    return f"{name} ({SIMULATED})" if item.get(SIMULATED) is True else name


# --- fleet ----------------------------------------------------------------------------------------
def engine_rows(engine: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Engine arguments; an argument left unset is vLLM's default, which the plane does not know."""
    if not engine:
        return []
    return [{"argument": k, "value": "vLLM default" if v is None else
             (" ".join(map(str, v)) or "none") if isinstance(v, list) else str(v)}
            for k, v in engine.items()]


def replica_rows(deployments: Sequence[Mapping[str, Any]], replicas: Sequence[Mapping[str, Any]],
                 simulated: set[str]) -> list[dict[str, str]]:
    """One row per replica: the supervisor's view where there is one, the store's otherwise."""
    seen: dict[str, dict[str, str]] = {}
    for d in deployments:
        for r in d.get("replicas") or []:
            name = str(r.get("name"))
            seen[name] = {"replica": name, "deployment": str(d.get("name")), "state": text(r.get("state")),
                          "url": text(r.get("url")), "restarts": text(r.get("restarts")),
                          "since": when(r.get("since_unix_s")), "backend": text(d.get("backend")),
                          "config version": UNKNOWN}
    for r in replicas:
        name = str(r.get("name"))
        row = seen.setdefault(name, {"replica": name, "deployment": text(r.get("deployment")),
                                     "state": text(r.get("state")), "url": text(r.get("url")),
                                     "restarts": UNKNOWN, "since": when(r.get("created_unix_s")),
                                     "backend": UNKNOWN, "config version": UNKNOWN})
        if r.get("backend") is not None:
            row["backend"] = text(r.get("backend"))
        if r.get("config_version") is not None:
            row["config version"] = text(r.get("config_version"))
    for name, row in seen.items():
        row["engine"] = SIMULATED if name in simulated else "vLLM"
    return sorted(seen.values(), key=lambda r: (r["deployment"], r["replica"]))


# --- SLOs -----------------------------------------------------------------------------------------
def alert_state(alerts: Sequence[Mapping[str, Any]], slo: str) -> str:
    """The worst open episode of an SLO ("firing (page)"), else "inactive"."""
    open_ = [a for a in alerts if a.get("slo") == slo and a.get("state") in ("pending", "firing")]
    if not open_:
        return "inactive"
    rank: dict[tuple[Any, Any], int] = {("firing", "page"): 0, ("firing", "ticket"): 1,
                                         ("pending", "page"): 2, ("pending", "ticket"): 3}
    worst = min(open_, key=lambda a: rank.get((a.get("state"), a.get("severity")), 9))
    return f"{worst.get('state')} ({worst.get('severity')})"


def slo_rows(slos: Sequence[Mapping[str, Any]], alerts: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for s in slos:
        targets = ", ".join(f"{t.get('sli')} <= {seconds(t.get('threshold_s'))}" for t in s.get("targets") or [])
        req = s.get("requests") or {}
        rows.append({
            "SLO": str(s.get("name")), "deployment": deployment_label(s), "target": targets or UNKNOWN,
            "objective": ratio(s.get("objective"), 3),
            "attainment": NO_DATA if s.get("no_data") else ratio(s.get("attainment"), 3),
            "error budget left": NO_DATA if s.get("no_data") else ratio(s.get("error_budget_remaining"), 1),
            "requests (good/bad/unknown)": f"{text(req.get('good'))}/{text(req.get('bad'))}/{text(req.get('unknown'))}",
            "alert": alert_state(alerts, str(s.get("name"))),
        })
    return rows


def burn_rows(slo: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for b in slo.get("burn_rates") or []:
        for span in ("long", "short"):
            w = b.get(span) or {}
            rate = _num(w.get("burn_rate"))
            rows.append({"severity": text(b.get("severity")), "window": f"{span} {text(w.get('window'))}",
                         "burn rate": UNKNOWN if rate is None else f"{rate:.2f}x",
                         "threshold": f"{text(b.get('threshold'))}x", "requests": text(w.get("requests")),
                         "over threshold": UNKNOWN if rate is None or _num(b.get("threshold")) is None
                         else ("yes" if rate >= float(b["threshold"]) else "no")})
    return rows


def history_frame(points: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Attainment and quantiles over time; a step without requests stays a gap (NaN), not 0."""
    df = pd.DataFrame({"time": times(p.get("ts_unix_s") for p in points)})
    for col in ("attainment", "p50_s", "p90_s", "p99_s", "requests"):
        df[col] = pd.Series([_num(p.get(col)) for p in points], dtype="float64")
    return df


# --- latency phases -------------------------------------------------------------------------------
def phase_frame(requests: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long form (phase, seconds) of the known phase durations; unknown ones are left out, not zeroed."""
    rows = [{"phase": p, "seconds": x} for r in requests for p in PHASES
            if (x := _num(r.get(f"{p}_s"))) is not None]
    return pd.DataFrame(rows, columns=["phase", "seconds"])


def phase_summary(requests: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for p in (*PHASES, "ttft", "tpot", "e2e"):
        vals = [x for r in requests if (x := _num(r.get(f"{p}_s"))) is not None]
        q = (pd.Series(vals).quantile([0.5, 0.9, 0.99]).tolist() if vals else [None, None, None])
        out.append({"phase": p, "known": str(len(vals)), "unknown": str(len(requests) - len(vals)),
                    "p50": seconds(q[0]), "p90": seconds(q[1]), "p99": seconds(q[2])})
    return out


def missing_phases(request: Mapping[str, Any]) -> list[str]:
    return [p for p in PHASES if _num(request.get(f"{p}_s")) is None]


def waterfall(request: Mapping[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    """Bars queue -> prefill -> decode on the request's own time axis (seconds since arrival), and the phases
    that are unknown. A phase after an unknown one has no known start, so it is not drawn either."""
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    start: float | None = 0.0
    for p in PHASES:
        d = _num(request.get(f"{p}_s"))
        if d is None or start is None:
            missing.append(p)
            start = None
            continue
        rows.append({"phase": p, "start_s": start, "end_s": start + d, "duration": seconds(d)})
        start += d
    return pd.DataFrame(rows, columns=["phase", "start_s", "end_s", "duration"]), missing


def request_choice(r: Mapping[str, Any], simulated: set[str]) -> str:
    return f"{r.get('request_id')} · {label(r.get('replica'), simulated)} · e2e {seconds(r.get('e2e_s'))}"


# --- KV cache -------------------------------------------------------------------------------------
def kv_frame(samples: Sequence[Mapping[str, Any]], simulated: set[str]) -> pd.DataFrame:
    """Per replica and time: KV usage, running, waiting, and the preemption rate from counter deltas.

    Counters are stored reset-adjusted; a rate needs two known readings in a row of one replica with time
    between them, else it is unknown (NaN). A failed scrape (scrape_ok false) has every reading unknown.
    """
    cols = ["time", "replica", "kv_usage_ratio", "num_running", "num_waiting", "preemptions_per_s"]
    rows = []
    by_replica: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_replica.setdefault(str(s.get("replica")), []).append(s)
    for name, ss in by_replica.items():
        prev: tuple[float, float] | None = None
        for s in sorted(ss, key=lambda x: _num(x.get("ts_unix_s")) or 0.0):
            ok = s.get("scrape_ok") is not False
            ts, count = _num(s.get("ts_unix_s")), _num(s.get("preemptions_total")) if ok else None
            rate = None
            if prev is not None and ts is not None and count is not None and ts > prev[0] and count >= prev[1]:
                rate = (count - prev[1]) / (ts - prev[0])
            prev = (ts, count) if ts is not None and count is not None else None
            rows.append({"time": ts, "replica": label(name, simulated),
                         **{k: _num(s.get(k)) if ok else None for k in ("kv_usage_ratio", "num_running",
                                                                         "num_waiting")},
                         "preemptions_per_s": rate})
    df = pd.DataFrame(rows, columns=cols)
    df["time"] = times(df["time"])
    for c in cols[2:]:
        df[c] = df[c].astype("float64")
    return df


def kv_latest(samples: Sequence[Mapping[str, Any]], simulated: set[str]) -> list[dict[str, str]]:
    """Each replica's newest sample, and preemptions counted over the samples shown (unknown if < 2 known)."""
    rows = []
    by_replica: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_replica.setdefault(str(s.get("replica")), []).append(s)
    for name, ss in sorted(by_replica.items()):
        ss = sorted(ss, key=lambda x: _num(x.get("ts_unix_s")) or 0.0)
        last = ss[-1]
        ok = last.get("scrape_ok") is not False
        counts = [c for s in ss if s.get("scrape_ok") is not False and (c := _num(s.get("preemptions_total")))
                  is not None]
        rows.append({"replica": label(name, simulated), "last scrape": when(last.get("ts_unix_s")),
                     "scrape": "ok" if ok else f"failed: {text(last.get('error'))}",
                     "KV usage": ratio(last.get("kv_usage_ratio")) if ok else UNKNOWN,
                     "KV capacity (tokens)": text(last.get("kv_capacity_tokens")) if ok else UNKNOWN,
                     "running": text(_num(last.get("num_running"))) if ok else UNKNOWN,
                     "waiting": text(_num(last.get("num_waiting"))) if ok else UNKNOWN,
                     "preemptions in window": text(counts[-1] - counts[0]) if len(counts) >= 2 else UNKNOWN})
    return rows


# --- cost -----------------------------------------------------------------------------------------
COST_SERIES = {"usd_per_hour": "$/hour", "usd_per_1m_prompt_tokens": "$/1M prompt tokens",
               "usd_per_1m_completion_tokens": "$/1M completion tokens"}


def cost_frame(items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = [{"time": p.get("ts_unix_s"), "deployment": deployment_label(it),
             **{k: _num(p.get(k)) for k in COST_SERIES}, "replicas up": _num(p.get("replicas_up"))}
            for it in items for p in it.get("points") or []]
    df = pd.DataFrame(rows, columns=["time", "deployment", *COST_SERIES, "replicas up"])
    df["time"] = times(df["time"])
    for c in (*COST_SERIES, "replicas up"):
        df[c] = df[c].astype("float64")
    return df


def cost_rows(items: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for it in items:
        t = it.get("totals") or {}
        rows.append({"deployment": deployment_label(it),
                     "price per replica-hour": usd(it.get("price_per_replica_hour_usd")),
                     "replica-hours": text(_num(t.get("replica_hours"))),
                     "replica-hours unknown": text(_num(t.get("unknown_replica_hours"))), "cost": usd(t.get("usd")),
                     "prompt tokens": text(t.get("prompt_tokens")),
                     "completion tokens": text(t.get("completion_tokens")),
                     "$/1M tokens": usd(t.get("usd_per_1m_tokens"))})
    return rows


# --- GPU ------------------------------------------------------------------------------------------
def gpu_rows(gpus: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for g in gpus:
        last = g.get("latest") or {}
        used, free = _num(last.get("fb_used_bytes")), _num(last.get("fb_free_bytes"))
        mem = UNKNOWN if used is None else f"{used / 2**30:.1f} GiB" + (
            "" if free is None else f" of {(used + free) / 2**30:.1f} GiB")
        mig = f" MIG {g['mig_instance']}" if g.get("mig_instance") else ""
        rows.append({"GPU": f"{text(g.get('host'))} #{text(g.get('gpu_index'))}{mig}",
                     "model": text(g.get("model_name")),
                     "uuid": text(g.get("uuid")), "source": text(g.get("source")),
                     "last reading": when(last.get("ts_unix_s")), "utilisation": ratio(last.get("util_ratio"), 0),
                     "mean utilisation": ratio(g.get("mean_util_ratio"), 0), "memory used": mem,
                     "power": UNKNOWN if _num(last.get("power_w")) is None else f"{last['power_w']:.0f} W",
                     "temperature": UNKNOWN if _num(last.get("temp_c")) is None else f"{last['temp_c']:.0f} °C",
                     "max temperature": UNKNOWN if _num(g.get("max_temp_c")) is None else f"{g['max_temp_c']:.0f} °C",
                     "last XID": text(_num(last.get("xid_errors")))})
    return rows


# --- recommendations ------------------------------------------------------------------------------
def change_rows(current: Mapping[str, Any] | None, proposed: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Current vs proposed, flattened one level ({"engine": {...}} becomes engine.max_num_seqs rows)."""
    def flat(d: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in (d or {}).items():
            if isinstance(v, Mapping):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    cur, new = flat(current), flat(proposed)
    return [{"setting": k, "current": setting_text(k, cur), "proposed": setting_text(k, new)}
            for k in sorted(set(cur) | set(new))]


def setting_text(key: str, values: Mapping[str, Any]) -> str:
    """A configuration value: an engine argument set to None is vLLM's default (for `quantization`, the
    checkpoint's own weights), not unknown; a setting not recorded at all is unknown."""
    if key not in values:
        return UNKNOWN
    v = values[key]
    name = key.removeprefix("engine.")
    if v is None and name in ENGINE_ARGS:
        return "none (the checkpoint's weights)" if name == "quantization" else "vLLM default"
    return text(v)


# EngineConfig's fields whose None means vLLM's default.
ENGINE_ARGS = frozenset(f.name for f in fields(EngineConfig) if f.default is None)


def evidence_parts(evidence: Mapping[str, Any] | None) -> dict[str, Any]:
    """Split evidence into inputs, predicted effect (scalars + per-SLO predictions) and the comparison table."""
    ev = dict(evidence or {})
    inputs = ev.pop("inputs", None)
    slos = ev.pop("slos", None)
    candidates = ev.pop("candidates", None)
    comparison = ev.pop("comparison", None)
    scalars = {k: v for k, v in ev.items() if not isinstance(v, Mapping | list)}
    nested = {k: v for k, v in ev.items() if k not in scalars}
    return {"inputs": inputs if isinstance(inputs, Mapping) else ({} if inputs is None else {"inputs": inputs}),
            "predicted": scalars, "slos": slos if isinstance(slos, list) else [],
            "comparison": (candidates if isinstance(candidates, list) else []) or
                          (comparison if isinstance(comparison, list) else []),
            "other": nested | ({"comparison": comparison} if isinstance(comparison, Mapping) else {})}


def kv_table(d: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"name": str(k), "value": text(v)} for k, v in d.items()]


# --- history --------------------------------------------------------------------------------------
def action_rows(actions: Sequence[Mapping[str, Any]], simulated: set[str]) -> list[dict[str, str]]:
    rows = []
    for a in actions:
        before, after = a.get("before_config") or {}, a.get("after_config") or {}
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        rows.append({"time": when(a.get("ts_unix_s")), "actor": text(a.get("actor")), "kind": text(a.get("kind")),
                     "deployment": text(a.get("deployment")),
                     "replica": label(a.get("replica"), simulated) if a.get("replica") else "-",
                     "reason": text(a.get("reason")), "message": a.get("message") or "",
                     "config change": ", ".join(f"{k}: {setting_text(k, before)} -> {setting_text(k, after)}"
                                                for k in changed)})
    return rows


def alert_timeline(alerts: Sequence[Mapping[str, Any]], now: float) -> pd.DataFrame:
    """One bar per episode from pending to resolved (or now, while open); the firing part is its own bar."""
    rows = []
    for a in alerts:
        start, fired, end = (_num(a.get(k)) for k in ("started_unix_s", "fired_unix_s", "resolved_unix_s"))
        if start is None:
            continue
        stop = end if end is not None else now
        key = f"{a.get('slo')} · {a.get('severity')}"
        first_stop = fired if fired is not None else stop
        rows.append({"alert": key, "phase": "pending", "start": start, "end": max(first_stop, start)})
        if fired is not None:
            rows.append({"alert": key, "phase": "firing", "start": fired, "end": max(stop, fired)})
    df = pd.DataFrame(rows, columns=["alert", "phase", "start", "end"])
    df["start"], df["end"] = times(df["start"]), times(df["end"])
    return df


def alert_rows(alerts: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"SLO": str(a.get("slo")), "severity": text(a.get("severity")), "state": text(a.get("state")),
             "pending since": when(a.get("started_unix_s")),
             "fired": when(a.get("fired_unix_s")) if a.get("fired_unix_s") is not None else "-",
             "resolved": when(a.get("resolved_unix_s")) if a.get("resolved_unix_s") is not None else "-"}
            for a in alerts]
