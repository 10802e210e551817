"""Fit a replica's step-cost coefficients from what the store observed of it.

Model: an engine step costs alpha + beta*tokens + gamma*kv_tokens_read (+ delta*seqs). Per-request
rows (queue, prefill, decode times and token counts) are all the store holds per step, so the batch
each request shared its steps with is reconstructed from the rows themselves: while request j
decodes it contributes one token per step (1/tpot_j tokens per second) with context growing
linearly; while it prefills, its prompt spread over its prefill time. A request's decode time is
then the sum over its (output - 1) steps of the step cost, and its prefill time the cost of the
step(s) it was admitted in, each a linear function of the coefficients: a non-negative least
squares problem, solved robustly (Huber-weighted IRLS) with an optional pull towards a prior.

The reconstruction needs every request of the replica in the window; engine samples (num_running)
check that: `coverage_ratio` compares the reconstructed batch with the scraped one.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from controlplane.store.repo import Store
from controlplane.tuning.perf_model import Coefficients, ReplicaModel, StepCost, replica_from_fit
from controlplane.tuning.simulator import simulate
from controlplane.tuning.workload import Workload

Matrix = NDArray[np.float64]
NAMES = ("alpha_s", "beta_s_per_token", "gamma_s_per_kv_token", "delta_s_per_seq")
_EPS_S = 1e-6  # a step is far longer than this: ties at a step boundary resolve to "after"


@dataclass(frozen=True, eq=False)
class Observations:
    """Regression rows: y = X @ [alpha, beta, gamma, delta], one row per prefill and per decode phase,
    each divided by its number of steps (so y is seconds per step)."""

    X: Matrix
    y: NDArray[np.float64]
    kind: NDArray[np.str_]  # "prefill" | "decode"
    requests_used: int
    requests_skipped: int  # rows with an unknown (NULL) time or token count
    coverage_ratio: float | None  # reconstructed / scraped num_running; None: no samples to compare
    preemptions: float | None = None  # preemptions the samples' counter saw in the window; None: unknown

    def __len__(self) -> int:
        return len(self.y)


class _Piecewise:
    """Sums over items active on [start, end) of c0 + c1*t, with exact integrals: a sweep over the
    sorted start/end events (numpy), instead of comparing every pair of requests."""

    def __init__(self, start: NDArray[np.float64], end: NDArray[np.float64], c0: Matrix, c1: Matrix) -> None:
        t = np.concatenate([start, end])
        order = np.argsort(t, kind="stable")
        self.t = t[order]
        d0 = np.concatenate([c0, -c0])[order]
        d1 = np.concatenate([c1, -c1])[order]
        self.v0 = np.cumsum(d0, axis=0)  # value on [t[k], t[k+1])
        self.v1 = np.cumsum(d1, axis=0)
        dt = np.diff(self.t)[:, None]
        sq = np.diff(self.t ** 2)[:, None] * 0.5
        seg = self.v0[:-1] * dt + self.v1[:-1] * sq
        self.cum = np.vstack([np.zeros((1, c0.shape[1])), np.cumsum(seg, axis=0)])

    def value(self, x: NDArray[np.float64]) -> Matrix:
        k = np.searchsorted(self.t, x, side="right") - 1
        inside = k >= 0
        k = np.clip(k, 0, None)
        return np.where(inside[:, None], self.v0[k] + self.v1[k] * x[:, None], 0.0)

    def integral_to(self, x: NDArray[np.float64]) -> Matrix:
        k = np.searchsorted(self.t, x, side="right") - 1
        inside = k >= 0
        k = np.clip(k, 0, None)
        tk = self.t[k][:, None]
        xx = x[:, None]
        part = self.cum[k] + self.v0[k] * (xx - tk) + self.v1[k] * (xx ** 2 - tk ** 2) * 0.5
        return np.where(inside[:, None], part, 0.0)

    def integral(self, a: NDArray[np.float64], b: NDArray[np.float64]) -> Matrix:
        return self.integral_to(b) - self.integral_to(a)


def _num(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def observations(requests: Iterable[Mapping[str, Any]], samples: Iterable[Mapping[str, Any]] = (), *,
                 max_num_batched_tokens: int | None = None) -> Observations:
    """Regression rows from one replica's request rows (the `requests` table's columns) and, optionally,
    its engine samples (`ts_unix_s`, `num_running`). A row with any needed value unknown is skipped."""
    samples = list(samples)
    kept: list[tuple[float, float, float, float, int, int]] = []
    skipped = 0
    for r in requests:
        arr, q, p, d = (_num(r, k) for k in ("arrival_unix_s", "queue_s", "prefill_s", "decode_s"))
        pt, ct = r.get("prompt_tokens"), r.get("completion_tokens")
        if arr is None or q is None or p is None or d is None or not pt or not ct or p <= 0:
            skipped += 1
            continue
        kept.append((arr + q, arr + q + p, arr + q + p + d, p, int(pt), int(ct)))
    if not kept:
        return Observations(np.empty((0, 4)), np.empty(0), np.empty(0, dtype=np.str_), 0, skipped, None)
    a = np.array(kept, dtype=np.float64)
    t0 = a[:, 0].min()
    sched, first, fin = a[:, 0] - t0, a[:, 1] - t0, a[:, 2] - t0  # relative: keeps t**2 exact enough
    prompt, out = a[:, 4], a[:, 5]
    steps_out = out - 1
    decoding = (steps_out > 0) & (fin > first)
    inv_tpot = np.where(decoding, steps_out / np.where(decoding, fin - first, 1.0), 0.0)
    chunks = np.ones_like(prompt) if not max_num_batched_tokens else np.ceil(prompt / max_num_batched_tokens)
    pre_dur = first - sched
    ones = np.ones_like(prompt)
    # Decoders: tokens/s, and KV read/s = (context + 1)/tpot with context = prompt + (t - first)/tpot.
    dec = _Piecewise(
        np.where(decoding, first, 0.0), np.where(decoding, fin, 0.0),
        np.column_stack([inv_tpot, inv_tpot * (prompt + 1 - first * inv_tpot), np.where(decoding, ones, 0.0),
                         np.where(decoding, prompt + 1 - first * inv_tpot, 0.0)]),
        np.column_stack([np.zeros_like(prompt), inv_tpot ** 2, np.zeros_like(prompt),
                         np.where(decoding, inv_tpot, 0.0)]))
    # Prefills: the prompt spread evenly over the prefill time (rates), and per-step chunk sizes (instants).
    zeros4 = np.zeros((len(prompt), 4))
    pre = _Piecewise(sched, first, np.column_stack([prompt / pre_dur, 1.0 / pre_dur, prompt / chunks, ones]), zeros4)

    # Decode rows: integrals over the request's own decode window, per step.
    i_dec = dec.integral(first, fin)  # [tokens, kv, -, -]
    i_pre = pre.integral(first, fin)  # [prompt tokens, prefill steps-share, -, -]
    n = np.where(decoding, steps_out, 1.0)
    xd = np.column_stack([ones, (i_dec[:, 0] + i_pre[:, 0]) / n, (i_dec[:, 1] + i_pre[:, 0]) / n,
                          (i_dec[:, 0] + i_pre[:, 1]) / n])
    yd = (fin - first) / n
    # Prefill rows: the batch as it stood when the request was admitted (decoders then, prompts in flight).
    at = sched + _EPS_S
    v_dec, v_pre = dec.value(at), pre.value(at)
    xp = np.column_stack([ones, v_dec[:, 2] + v_pre[:, 2], v_dec[:, 3] + v_pre[:, 2], v_dec[:, 2] + v_pre[:, 3]])
    yp = pre_dur / chunks

    coverage = _coverage(samples, t0, dec, pre)
    X = np.vstack([xp, xd[decoding]])
    y = np.concatenate([yp, yd[decoding]])
    kind = np.array(["prefill"] * len(yp) + ["decode"] * int(decoding.sum()))
    return Observations(X, y, kind, len(kept), skipped, coverage, _preemptions(samples))


def _preemptions(samples: Sequence[Mapping[str, Any]]) -> float | None:
    """Growth of the (reset-adjusted) preemption counter over the samples that know it."""
    known = sorted((float(s["ts_unix_s"]), float(s["preemptions_total"])) for s in samples
                   if s.get("preemptions_total") is not None and s.get("ts_unix_s") is not None)
    return known[-1][1] - known[0][1] if len(known) >= 2 else None


def _coverage(samples: Iterable[Mapping[str, Any]], t0: float, dec: _Piecewise, pre: _Piecewise) -> float | None:
    pts = [(float(s["ts_unix_s"]) - t0, float(s["num_running"])) for s in samples
           if s.get("num_running") is not None and s.get("ts_unix_s") is not None]
    if not pts:
        return None
    ts = np.array([p[0] for p in pts])
    seen = float(sum(p[1] for p in pts))
    rebuilt = float((dec.value(ts)[:, 2] + pre.value(ts)[:, 3]).sum())
    return rebuilt / seen if seen > 0 else None


def api_path_s(requests: Iterable[Mapping[str, Any]], *, min_idle: int = 10) -> float | None:
    """The API server's share of TTFT (`ReplicaModel.api_path_s`): the median of TTFT - queue - prefill.

    vLLM stamps arrival in the API server and queue/prefill in the engine core, so the difference is the path
    between them; for a request that arrives mid-step it also holds the wait for that step to end, which the
    simulator already counts. So it is taken over the requests that arrived with nothing else in flight on the
    replica (at least `min_idle` of them), and over all requests only when there are too few of those.
    None: no row knows all three times."""
    rows = []
    for r in requests:
        arr, ttft, q, p, e2e = (_num(r, k) for k in ("arrival_unix_s", "ttft_s", "queue_s", "prefill_s", "e2e_s"))
        if arr is not None and ttft is not None and q is not None and p is not None:
            rows.append((arr, arr + (e2e if e2e is not None else ttft), max(0.0, ttft - q - p)))
    if not rows:
        return None
    rows.sort()
    idle = []
    busy_until = -math.inf
    for arr, end, path in rows:
        if arr >= busy_until:
            idle.append(path)
        busy_until = max(busy_until, end)
    chosen = idle if len(idle) >= min_idle else [path for _, _, path in rows]
    return float(np.median(chosen))


def api_path_per_request_s(requests: Iterable[Mapping[str, Any]], model: ReplicaModel, *,
                           min_rows: int = 30, min_idle: int = 5) -> float | None:
    """How much longer the API path gets per request already on the replica (`ReplicaModel.api_path_per_request_s`),
    from the rows `model` was fitted on.

    vLLM's API server runs one event loop: it takes new requests in and also streams every running request's
    tokens, so a request that arrives while others are in flight waits longer before its engine sees it. The rows
    are replayed through `model`; for each request that vLLM scheduled right after it reached the engine (its
    queue time under 1 ms), the measured arrival-to-scheduled time (TTFT - prefill) minus the replayed one is what
    the model's path misses. Both hold the wait for the step running when the request reached the engine (vLLM
    stamps its queue time only after that step), so what is left is the API server's share. The estimate is the
    slope through the origin of that gap, less its median with nothing in flight, against the requests in flight at
    the arrival (the earlier rows not finished then), fitted on the median gap at each count so that a few requests
    the host stalled do not set it; the replay is redone with the estimate, up to 5 times, until the slope left is
    under 10 us (medians move in steps, so it can end oscillating within a few tens of us). Every row that knows
    its arrival, end and token counts is replayed and counted; its other times only select it. Rows without token
    counts are neither, so many of them make the estimate too high (the load they added is unseen).
    None: fewer than `min_rows` such requests with others in flight,
    or fewer than `min_idle` with none. Rows whose queue time holds the step wait (the simulator's own rows) bias
    it low: their queue filter keeps only the requests that happened to reach the engine between two steps."""
    if min_rows < 1 or min_idle < 1:
        raise ValueError(f"min_rows and min_idle must be >= 1, got {min_rows} and {min_idle}")
    # (arrival, end, measured arrival -> scheduled or NaN, queue or NaN, prompt, completion)
    kept: list[tuple[float, float, float, float, int, int]] = []
    for r in requests:
        arr, ttft, q, pre, e2e = (_num(r, k) for k in ("arrival_unix_s", "ttft_s", "queue_s", "prefill_s", "e2e_s"))
        end = e2e if e2e is not None else ttft
        p, c = r.get("prompt_tokens"), r.get("completion_tokens")
        if arr is None or end is None or p is None or c is None or p < 1 or c < 1:
            continue  # cannot be replayed, so not counted in flight either: the replay and the count must agree
        kept.append((arr, arr + end, ttft - pre if ttft is not None and pre is not None else math.nan,
                     q if q is not None else math.nan, int(p), int(c)))
    if len(kept) < min_rows:
        return None
    kept.sort(key=lambda k: k[0])  # stable: ties keep the rows' order, as the replay does
    in_flight = np.zeros(len(kept), dtype=np.int64)
    ends: list[float] = []
    for i, (arr, end, *_rest) in enumerate(kept):
        while ends and ends[0] <= arr:
            heapq.heappop(ends)
        in_flight[i] = len(ends)  # the earlier rows not finished at this arrival
        heapq.heappush(ends, end)
    measured = np.array([k[2] for k in kept])
    at_once = (np.array([k[3] for k in kept]) < 1e-3) & np.isfinite(measured)  # NaN compares False
    busy, idle = at_once & (in_flight >= 1), at_once & (in_flight == 0)
    if busy.sum() < min_rows or idle.sum() < min_idle:
        return None
    arrivals = np.array([k[0] for k in kept])
    workload = Workload(arrivals - arrivals[0], np.array([k[4] for k in kept]), np.array([k[5] for k in kept]))
    per_request = 0.0
    for _ in range(5):
        res = simulate(workload, [dataclasses.replace(model, api_path_per_request_s=per_request)],
                       sample_interval_s=None)
        gap = measured - (res.scheduled_s - workload.arrival_s)
        ok = np.isfinite(gap)
        if (busy & ok).sum() < min_rows or (idle & ok).sum() < min_idle:
            return None
        base = float(np.median(gap[idle & ok]))
        num = den = 0.0
        for n in np.unique(in_flight[busy & ok]):
            at_n = busy & ok & (in_flight == n)
            num += at_n.sum() * n * (float(np.median(gap[at_n])) - base)
            den += at_n.sum() * n * n
        slope = num / den
        per_request = max(0.0, per_request + slope)
        if abs(slope) < 1e-5:
            break
    return per_request


# --- solving --------------------------------------------------------------------------------------
def nnls_normal(gram: Matrix, moment: NDArray[np.float64]) -> NDArray[np.float64]:
    """argmin ||X theta - y||^2 subject to theta >= 0, from X'X and X'y. With <= 4 unknowns, trying every
    support set is exact and simpler than an active-set solver (and numpy has no NNLS)."""
    k = len(moment)
    best, best_obj = np.zeros(k), 0.0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            sol = np.linalg.lstsq(gram[np.ix_(idx, idx)], moment[idx], rcond=None)[0]
            if np.any(sol < 0):
                continue
            obj = -float(sol @ moment[idx])  # theta'G theta - 2 theta'm at the support's optimum
            if obj < best_obj - 1e-18:
                best_obj = obj
                best = np.zeros(k)
                best[idx] = sol
    return best


@dataclass(frozen=True)
class Fit:
    """Fitted coefficients and how much to trust them (residuals relative to the observed step times)."""

    coefficients: Coefficients
    rows: int
    outliers: int  # rows with |relative residual| > 3 robust sigmas (MAD-based)
    rel_rmse: float | None  # of relative residuals, outliers excluded
    rel_median_abs: float | None
    r2: float | None
    std_errors: Coefficients | None
    coverage_ratio: float | None
    notes: tuple[str, ...] = field(default=())
    # The most sequences per step (a phase's mean) the rows saw: predictions for larger batches extrapolate.
    observed_max_seqs: float | None = None

    @property
    def step_cost(self) -> StepCost:
        return StepCost.linear(self.coefficients)


def _huber(res: NDArray[np.float64], k: float) -> tuple[NDArray[np.float64], float]:
    scale = 1.4826 * float(np.median(np.abs(res - np.median(res))))
    if scale <= 0:
        scale = float(np.sqrt(np.mean(res ** 2))) or 1.0
    u = np.abs(res) / (k * scale)
    return np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-12)), scale


def fit(obs: Observations, *, prior: Coefficients | None = None, prior_weight: float = 0.0,
        fit_per_seq: bool = False, huber_k: float = 1.345, iterations: int = 30) -> Fit:
    """Non-negative, Huber-robust least squares on relative residuals (rows divided by their fitted time).

    `prior_weight` counts as that many pseudo-rows saying each coefficient equals `prior`'s (in units of a
    typical row's contribution), so few observations stay near the prior and many override it."""
    cols = 4 if fit_per_seq else 3
    notes: list[str] = []
    if len(obs) < cols + 1:
        raise ValueError(f"need at least {cols + 1} observations to fit {cols} coefficients, got {len(obs)}")
    X, y = obs.X[:, :cols], obs.y
    scale = np.maximum(y, 1e-9)  # relative residuals; refined to the fitted values below
    w = np.ones(len(y))
    theta = np.zeros(cols)
    typical = np.maximum(np.mean(np.abs(X), axis=0), 1e-12)
    for _ in range(iterations):
        Xs, ys = X / scale[:, None], y / scale
        gram = (Xs * w[:, None]).T @ Xs
        moment = (Xs * w[:, None]).T @ ys
        if prior is not None and prior_weight > 0:
            p = np.array(prior.as_list()[:cols])
            rel = typical / np.maximum(np.mean(y), 1e-12)
            gram = gram + prior_weight * np.diag(rel ** 2)
            moment = moment + prior_weight * rel ** 2 * p
        new = nnls_normal(gram, moment)
        fitted = X @ new
        scale = np.maximum(fitted, 1e-3 * np.mean(y) + 1e-12)
        w, _ = _huber((y - fitted) / scale, huber_k)
        if np.allclose(new, theta, rtol=1e-9, atol=1e-15):
            theta = new
            break
        theta = new
    rel = (y - X @ theta) / scale
    _, sigma = _huber(rel, huber_k)
    inlier = np.abs(rel) <= 3.0 * sigma
    rmse = float(np.sqrt(np.mean(rel[inlier] ** 2))) if inlier.any() else None
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - X @ theta) ** 2)) / ss_tot if ss_tot > 0 else None
    std = _std_errors(X / scale[:, None], rel, w, theta)
    if obs.coverage_ratio is not None and not 0.9 <= obs.coverage_ratio <= 1.1:
        notes.append(f"the rows rebuild {obs.coverage_ratio:.0%} of the scraped batch: requests are missing "
                     "from the store (or extra ones are in it), so the fit is biased")
    if obs.preemptions:
        notes.append(f"{obs.preemptions:.0f} preemptions in the window: their recomputation is not in the rows, "
                     "so the fit overstates the cost of the steps they happened in")
    full = [*theta.tolist(), *([0.0] * (4 - cols))]
    return Fit(coefficients=Coefficients(*full), rows=len(y), outliers=int((~inlier).sum()), rel_rmse=rmse,
               rel_median_abs=float(np.median(np.abs(rel))), r2=r2,
               std_errors=Coefficients(*(std + [0.0] * (4 - cols))) if std is not None else None,
               coverage_ratio=obs.coverage_ratio, notes=tuple(notes),
               observed_max_seqs=float(obs.X[:, 3].max()) if obs.X.shape[1] > 3 and len(obs) else None)


def _std_errors(Xs: Matrix, rel: NDArray[np.float64], w: NDArray[np.float64],
                theta: NDArray[np.float64]) -> list[float] | None:
    n, k = Xs.shape
    if n <= k:
        return None
    gram = (Xs * w[:, None]).T @ Xs
    sigma2 = float(np.sum(w * rel ** 2)) / (n - k)
    try:
        cov = np.linalg.inv(gram) * sigma2
    except np.linalg.LinAlgError:
        return None
    return [float(math.sqrt(max(v, 0.0))) for v in np.diag(cov)]


# --- online: decayed sufficient statistics ---------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CalibrationState:
    """What an online calibration carries between windows: decayed weighted normal equations."""

    gram: Matrix
    moment: NDArray[np.float64]
    rows_effective: float
    fit: Fit


def update(state: CalibrationState | None, obs: Observations, *, decay: float = 0.5,
           prior: Coefficients | None = None, prior_weight: float = 0.0,
           fit_per_seq: bool = False) -> CalibrationState:
    """Fold a new window of observations in: the window is fitted robustly on its own (its Huber weights
    and scale), then its normal equations are added to the old ones multiplied by `decay` (0: forget the
    past; 1: never forget), and the combined system is solved for non-negative coefficients."""
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    cols = 4 if fit_per_seq else 3
    window = fit(obs, prior=prior, prior_weight=prior_weight, fit_per_seq=fit_per_seq)
    X, y = obs.X[:, :cols], obs.y
    theta = np.array(window.coefficients.as_list()[:cols])
    scale = np.maximum(X @ theta, 1e-3 * np.mean(y) + 1e-12)
    w, _ = _huber((y - X @ theta) / scale, 1.345)
    Xs, ys = X / scale[:, None], y / scale
    gram = (Xs * w[:, None]).T @ Xs
    moment = (Xs * w[:, None]).T @ ys
    rows = float(len(y))
    if state is not None and state.gram.shape == gram.shape:
        gram = gram + decay * state.gram
        moment = moment + decay * state.moment
        rows += decay * state.rows_effective
    theta = nnls_normal(gram, moment)
    coefs = Coefficients(*[*theta.tolist(), *([0.0] * (4 - cols))])
    combined = Fit(coefficients=coefs, rows=window.rows, outliers=window.outliers, rel_rmse=window.rel_rmse,
                   rel_median_abs=window.rel_median_abs, r2=window.r2, std_errors=window.std_errors,
                   coverage_ratio=window.coverage_ratio, notes=window.notes, observed_max_seqs=window.observed_max_seqs)
    return CalibrationState(gram=gram, moment=moment, rows_effective=rows, fit=combined)


def fit_rows(requests: Sequence[Mapping[str, Any]], samples: Iterable[Mapping[str, Any]] = (), *,
             max_num_batched_tokens: int | None = None, prior: Coefficients | None = None,
             prior_weight: float = 0.0, fit_per_seq: bool = False) -> tuple[Fit, float]:
    """One replica's rows -> (the fitted step cost, its API path in seconds; 0 when no row knows it): what a
    replica model is calibrated from, whether the rows come from the store or from a benchmark's span sink."""
    result = fit(observations(requests, samples, max_num_batched_tokens=max_num_batched_tokens), prior=prior,
                 prior_weight=prior_weight, fit_per_seq=fit_per_seq)
    return result, api_path_s(requests) or 0.0


# --- the store edge -------------------------------------------------------------------------------
def load_rows(store: Store, replica: str, *, since_unix_s: float | None = None, until_unix_s: float | None = None,
              limit: int = 1_000_000) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One replica's request rows and successful engine samples in [since, until)."""
    reqs = store.requests(since_unix_s=since_unix_s, until_unix_s=until_unix_s, replica=replica, limit=limit)
    samples = store.engine_samples(since_unix_s=since_unix_s, until_unix_s=until_unix_s, replica=replica,
                                   limit=limit)
    return reqs, [s for s in samples if s.get("scrape_ok")]


def kv_capacity(samples: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(KV capacity tokens, block size) from the newest sample that knows both; None if none does."""
    known = [s for s in samples if s.get("kv_capacity_tokens") and s.get("kv_block_size_tokens")]
    if not known:
        return None
    newest = max(known, key=lambda s: float(s["ts_unix_s"]))
    return int(newest["kv_capacity_tokens"]), int(newest["kv_block_size_tokens"])


def calibrated_replica(store: Store, replica: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                       since_unix_s: float | None = None, until_unix_s: float | None = None,
                       prior: Coefficients | None = None, prior_weight: float = 0.0, fit_per_seq: bool = False,
                       max_model_len: int | None = None, prefix_caching: bool = True) -> tuple[ReplicaModel, Fit]:
    """A replica model of an observed replica (GPU or CPU): coefficients fitted from its rows in the window,
    KV capacity and block size from its newest engine sample, the API path and its growth with the load from its
    rows (`api_path_s`, `api_path_per_request_s`). The
    engine limits and whether vLLM's prefix cache is on are the replica's own args."""
    reqs, samples = load_rows(store, replica, since_unix_s=since_unix_s, until_unix_s=until_unix_s)
    result, path = fit_rows(reqs, samples, max_num_batched_tokens=max_num_batched_tokens, prior=prior,
                            prior_weight=prior_weight, fit_per_seq=fit_per_seq)
    cap = kv_capacity(samples)
    if cap is None:
        raise ValueError(f"no engine sample of replica {replica!r} in the window knows its KV capacity "
                         "(kv_capacity_tokens and kv_block_size_tokens): scrape it first")
    model = replica_from_fit(result.step_cost, kv_capacity_tokens=cap[0], block_size=cap[1],
                             max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, name=replica, api_path_s=path,
                             prefix_caching=prefix_caching)
    per_request = api_path_per_request_s(reqs, model)
    return dataclasses.replace(model, api_path_per_request_s=per_request or 0.0), result
