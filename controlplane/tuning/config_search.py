"""Configuration search for a running deployment: from its own recorded requests to a stored `reconfigure`
recommendation, optionally checked for real on a canary replica first.

The model is the one the plane's tuner uses: step costs fitted from a ready replica's `llm_request` spans and
engine samples (`calibrate.calibrated_replica`, per-sequence term and API path), KV capacity from its
/metrics; the workload is the deployment's recorded trace. The search (`search.search`) then tries the
batch limits the deployment allows (`spec.tuning`) and sizes the fleet for the target rate. A calibrated
model predicts the precision it observed, and parallelism stays as it is; another KV-cache dtype or weight
quantization the spec allows is predicted by a prior (`search_space.CalibratedFactory`; for weights the
roofline's ratios where the card and the model's shape are known) and recommended only after a canary trial,
where a lower one first meets the quality guard against a replica of the running configuration.

Pure parts: `space_for`, `trial_plans`, `judge`, `proposal`. Edges: `SupervisorCanary` (starts a canary through
the supervisor and drives it) and `run_search` (reads the store, runs the search, stores the recommendation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from controlplane.loadgen import ClientResult, RequestPlan, run_load
from controlplane.supervisor.spec import (
    Deployment,
    EngineConfig,
    TuningSection,
    kv_dtype_conflict,
    quantization_conflict,
)
from controlplane.tuning import catalog, quality
from controlplane.tuning.capacity import Objective, Prediction, objectives_from_slos
from controlplane.tuning.catalog import KvPrecision, WeightPrecision
from controlplane.tuning.perf_model import EngineArgs
from controlplane.tuning.recommendations import Proposal
from controlplane.tuning.search import Canary, CanaryVerdict, SearchOptions, SearchResult, search
from controlplane.tuning.search_space import Cell, RooflineWeightPriors, SearchSpace, WeightPriors
from controlplane.tuning.workload import Workload

T = TypeVar("T")
log = logging.getLogger(__name__)

MIN_REQUESTS = 200  # recorded requests of a replica before its step costs are fitted (as the tuner loop)
TRIAL_VOCAB = (100, 1000)  # token ids of a trial's prompts: in any model's vocabulary, never special tokens


class SearchInputError(ValueError):
    """The search cannot run as asked; the message says what is missing and how to provide it."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _around(current: int, factors: Sequence[float], lo: int) -> tuple[int, ...]:
    return tuple(sorted({max(lo, int(round(current * f))) for f in factors}))


def space_for(engine: EngineConfig, tuning: TuningSection, *, checkpoint: str | None = None) -> SearchSpace:
    """The batch limits to try: the spec's `tuning` lists, or powers of two around the current values (1/4x to
    2x sequences, 1/2x to 2x tokens); and the KV-cache precisions `tuning.kv_cache_dtype` and the weight
    quantizations `tuning.quantization` allow besides the running ones. The current values are always included,
    so the comparison has them. `checkpoint`: the quantization the checkpoint itself was saved with (its
    config.json), which no flag can change."""
    if engine.max_num_seqs is None or engine.max_num_batched_tokens is None:
        raise SearchInputError("spec.engine.max_num_seqs and max_num_batched_tokens must be set: the fit of the "
                               "running replica's step costs needs its own limits (vLLM's defaults differ by "
                               "platform and version)")
    seqs = tuning.max_num_seqs or _around(engine.max_num_seqs, (0.25, 0.5, 1, 2), 1)
    tokens = tuning.max_num_batched_tokens or _around(engine.max_num_batched_tokens, (0.5, 1, 2), 16)
    seqs = tuple(sorted(set(seqs) | {engine.max_num_seqs}))
    tokens = tuple(sorted(set(tokens) | {engine.max_num_batched_tokens}))
    # Batch limits, and the precisions the spec allows besides the running ones; parallelism stays (the fit
    # predicts only what the replica runs; see CalibratedFactory for the priors of another precision).
    weights, kv = running_precision(engine)
    # One --kv-cache-dtype per precision, the spec's own string: the search tells them apart by bytes per element
    # only (the spec refuses two formats of one width; checked again here for a config built in code).
    why = kv_dtype_conflict(engine.kv_cache_dtype, tuning.kv_cache_dtype)
    if why is not None:
        raise SearchInputError(f"spec.tuning.kv_cache_dtype: {why}")
    args = {kv: engine.kv_cache_dtype}
    for d in tuning.kv_cache_dtype:
        args.setdefault(catalog.VLLM_KV_CACHE_DTYPE[d], d)
    # Likewise the weights: one --quantization per precision ("none": the checkpoint's own weights), switched by
    # the flag only, so never away from a checkpoint quantized beforehand.
    why = quantization_conflict(engine.quantization, tuning.quantization, checkpoint=checkpoint)
    if why is not None:
        raise SearchInputError(f"spec.tuning.quantization: {why}")
    quants: dict[WeightPrecision, str] = {weights: engine.quantization or "none"}
    for q in tuning.quantization:
        quants.setdefault(catalog.vllm_weights(None if q == "none" else q), q)
    return SearchSpace(seqs, tokens, weights=tuple(quants), kv_cache=tuple(args), limits_only=True,
                       baseline=(weights, kv), kv_args=tuple(args.items()), quant_args=tuple(quants.items()))


def running_precision(engine: EngineConfig) -> tuple[WeightPrecision, KvPrecision]:
    """(weights, KV cache) of a running configuration, by the precision its vLLM flags store."""
    return catalog.vllm_weights(engine.quantization), catalog.VLLM_KV_CACHE_DTYPE[engine.kv_cache_dtype]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_hf_config(model_path: str) -> dict[str, Any] | None:
    """The model directory's config.json, or None where this host cannot read it (a Ray node's path, a
    simulated deployment, a bad file): then nothing is inferred from it. A separate hf_quant_config.json (older
    ModelOpt checkpoints; vLLM reads it too) is merged in as its quantization_config."""
    if not model_path:  # an external deployment names no directory: not the plane's working directory
        return None
    data = _read_json(Path(model_path) / "config.json")
    if data is None:
        return None
    extra = _read_json(Path(model_path) / "hf_quant_config.json")
    if extra is not None and "quantization_config" not in data:
        data["quantization_config"] = {"quant_method": "modelopt", **extra}
    return data


def checkpoint_quantization(hf_config: Mapping[str, Any] | None) -> str | None:
    """The quantization a checkpoint was saved with (config.json's quantization_config.quant_method, or the
    compression_config of older compressed-tensors checkpoints, as vLLM reads them), or None."""
    for key in ("quantization_config", "compression_config"):
        qc = (hf_config or {}).get(key)
        if isinstance(qc, Mapping):
            return str(qc.get("quant_method") or ("compressed-tensors" if key == "compression_config" else
                                                   "unnamed"))
    return None


def model_shape(dep: Deployment, hf_config: Mapping[str, Any] | None) -> catalog.ModelShape | None:
    """The deployment's model shape for the roofline: the simulated engine's catalog model, or the shape in the
    model directory's config.json (never a guess from the served name, which is a client-facing label)."""
    if dep.simulated is not None:
        try:
            return catalog.model(dep.simulated.model)
        except catalog.CatalogError:
            return None
    if hf_config is None:
        return None
    try:
        return catalog.shape_from_hf_config(hf_config, Path(dep.model_path).name or dep.served_name)
    except catalog.CatalogError as exc:
        log.info("no roofline shape for %s: %s", dep.name, exc)
        return None


def weight_priors(dep: Deployment, shape: catalog.ModelShape | None, workload: Workload) -> WeightPriors | None:
    """Each cell's weight prior: the roofline's ratios at the cell's limits when the deployment's accelerator is
    in the catalog and its model's shape is known, else None (the calibrated figures are kept). A precision the
    roofline says cannot run there (weights that do not fit) is rejected by the search's factory with the
    roofline's reason."""
    try:
        accel = catalog.accelerator(dep.accelerator)
    except catalog.CatalogError:
        return None
    eng = dep.engine
    if shape is None or eng.pipeline_parallel_size != 1:  # the roofline places every weight on each GPU
        return None
    weights, kv = running_precision(eng)
    args = EngineArgs(max_num_seqs=eng.max_num_seqs, max_num_batched_tokens=eng.max_num_batched_tokens,
                      gpu_memory_utilization=eng.gpu_memory_utilization or EngineArgs.gpu_memory_utilization,
                      max_model_len=eng.max_model_len, tensor_parallel_size=eng.tensor_parallel_size,
                      weights=weights, kv_cache=kv)
    context = 1024
    if len(workload):
        context = max(1, int(float(np.mean(workload.prompt_tokens)) + float(np.mean(workload.output_tokens)) / 2))
    return RooflineWeightPriors(shape, accel, args, context)


def quality_check(reference_url: str, candidate_url: str, dep: Deployment) -> quality.QualityVerdict:
    """The quality guard (blocking): the fixed prompts on a replica of the running configuration and on the
    candidate, judged by the deployment's `quality` budget. Raises quality.QualityProbeError when either
    server cannot answer."""
    report = quality.compare_blocking(reference_url, candidate_url, dep.served_name)
    return quality.judge(report, quality.QualityBudget(dep.quality.min_greedy_agreement,
                                                       dep.quality.max_logprob_drift))


def trial_plans(workload: Workload, rps: float, count: int, seed: int, *,
                max_model_len: int | None) -> list[RequestPlan]:
    """`count` requests for a canary trial: prompt and output lengths drawn from the recorded workload, Poisson
    arrivals at `rps`, token-id prompts (no tokenizer involved), prompts shortened to fit max_model_len."""
    if len(workload) == 0:
        raise SearchInputError("the workload has no request with known prompt and output lengths")
    if not (rps > 0 and math.isfinite(rps)) or count < 1:
        raise ValueError(f"a trial needs rps > 0 and count >= 1, got {rps} and {count}")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(workload), size=count)
    gaps = rng.exponential(1.0 / rps, size=count)
    t = np.cumsum(gaps) - gaps[0]
    plans = []
    for i, k in enumerate(pick):
        out = int(workload.output_tokens[k])
        prompt = int(workload.prompt_tokens[k])
        if max_model_len is not None:
            out = max(1, min(out, max_model_len // 2))
            prompt = max(1, min(prompt, max_model_len - out - 1))
        ids = [int(x) for x in rng.integers(*TRIAL_VOCAB, size=prompt)]
        plans.append(RequestPlan(ids, out, float(t[i])))
    return plans


def _value(r: ClientResult, sli: str) -> float | None:
    if r.ttft_s is None or r.e2e_s is None:
        return None
    if sli == "ttft":
        return r.ttft_s
    if sli == "e2e":
        return r.e2e_s
    if sli in ("tpot", "itl"):
        return 0.0 if r.completion_tokens <= 1 else (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)
    return None  # queue time: the client cannot see it


def requests_to_judge(o: Objective, min_requests: int = 50) -> int:
    """The results a trial needs before its attainment says anything of `o`: one bad request in the budget."""
    return max(min_requests, math.ceil(1.0 / (1.0 - o.objective) - 1e-9))


def judge(results: Sequence[ClientResult], objectives: Sequence[Objective], *, min_requests: int = 50,
          note: str = "") -> CanaryVerdict:
    """Measured attainment per SLO from a trial's client timings. A failed request is bad (it was not served
    within the SLO); an SLI the client cannot measure (queue time) or fewer than `min_requests` results leave
    the attainment unknown (None), which is never a pass. So do fewer results than one bad request in the
    objective's budget takes (1 / (1 - objective): 100 for 99 %): 20 good results say nothing of 99.9 %."""
    preds = []
    for o in objectives:
        known = len(results) >= requests_to_judge(o, min_requests) and all(t.sli != "queue" for t in o.targets)
        if not known:
            preds.append(Prediction(o.name, o.objective, None, None))
            continue
        good = 0
        for r in results:
            values = [_value(r, t.sli) for t in o.targets]
            if r.ok and all(v is not None and v <= t.threshold_s for v, t in zip(values, o.targets, strict=True)):
                good += 1
        att = good / len(results)
        single = o.targets[0] if len(o.targets) == 1 else None
        q = None
        if single is not None:
            vals = sorted(v for r in results if r.ok and (v := _value(r, single.sli)) is not None)
            q = float(np.quantile(vals, o.objective)) if vals else None
        preds.append(Prediction(o.name, o.objective, att, att - o.objective, q,
                                single.threshold_s if single else None))
    failed = sum(1 for r in results if not r.ok)
    text = f"{len(results)} requests, {failed} failed" + (f"; {note}" if note else "")
    return CanaryVerdict(tuple(preds), text)


def current_evidence(current_replicas: int, price: float, baseline: SearchResult) -> dict[str, Any]:
    """The running configuration as the same model sees it: `baseline` is a search over its cell alone."""
    return {"replicas": current_replicas, "usd_per_hour": current_replicas * price if price else None,
            "capacity_rps_per_replica": baseline.capacity_rps_per_replica,
            "replicas_needed": baseline.replicas,  # None: it cannot meet every SLO at the target rate
            "usd_per_hour_needed": baseline.usd_per_hour if baseline.priced else None,
            "cost_per_hour_needed": baseline.usd_per_hour,  # the search's currency: GPU-hours when unpriced
            "slos_at_replicas_needed": [{"name": p.name, "attainment": p.attainment, "margin": p.margin}
                                        for p in baseline.predictions]}


def proposal(dep: Deployment, current_replicas: int, result: SearchResult, *, calibration: Mapping[str, Any],
             workload: Mapping[str, Any], current: Mapping[str, Any]) -> Proposal | None:
    """The recommendation for a search's outcome (`current`: `current_evidence` of the running configuration):
    None when the search chose nothing or chose what runs now."""
    if result.chosen is None or result.replicas is None:
        return None
    changes = result.engine_changes
    engine_now = {k: dep.engine.as_dict()[k] for k in changes}
    if changes == engine_now and result.replicas == current_replicas:
        return None
    evidence = {**result.evidence(), "calibration": dict(calibration), "workload": dict(workload),
                "current": {"engine": engine_now, **current}}
    needed = current.get("cost_per_hour_needed")  # compared in the search's currency (GPU-hours when unpriced)
    replicas_needed = current.get("replicas_needed")
    if replicas_needed is None:
        reason = "current_config_cannot_meet_slo"  # at the target rate, within the allowed replica count
    elif current_replicas < replicas_needed:
        reason = "scale_to_meet_slo"  # the fleet is too small for the load, whatever else changes with it
    elif changes == engine_now:
        reason = "scale_down_slo_still_met"
    elif needed is not None and result.usd_per_hour is not None and result.usd_per_hour < needed:
        reason = "cheaper_config_meets_slo"
    elif result.replicas < current_replicas:
        reason = "scale_down_slo_still_met"  # the saving is the count's; the new limits cost the same
    else:
        reason = "same_cost_more_headroom"
    rmse = calibration.get("rel_rmse")
    confidence = None if rmse is None else max(0.0, min(1.0, 1.0 - float(rmse)))
    seen = calibration.get("observed_max_seqs_per_step")
    if confidence is not None and result.chosen is not None:
        # A fit on batches of at most `seen` sequences extrapolates to the chosen limit: trust it that much less.
        confidence *= 0.0 if not seen else min(1.0, float(seen) / result.chosen.max_num_seqs)
    confidence = None if confidence is None else round(confidence, 3)
    # engine_config: the whole configuration it was made for (a later change to any of it makes it stale).
    return Proposal(dep.name, "reconfigure", reason, {"engine": engine_now, "engine_config": dep.engine.as_dict(),
                                                      "replicas": current_replicas},
                    {"engine": changes, "replicas": result.replicas}, evidence, confidence)


# --- edges --------------------------------------------------------------------------------------------------
async def resize_then_roll(control: Any, deployment: str, engine: Mapping[str, Any], replicas: int | None, *,
                           current_replicas: int | None, actor: str, reason: str,
                           wait_rolled: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Apply a searched configuration. Growing: resize first (a rolling change refuses resizes while it runs),
    then roll every replica onto `engine`. Shrinking: roll first and resize once the roll is over, so the fleet
    never runs fewer replicas of the old configuration than the old configuration needs; with `wait_rolled`
    this waits for it, without it a background task does. The reconfigure's answer, with the resize's under
    "scale" (or what is still to come under "scale_after_roll")."""
    out: dict[str, Any] = {}
    shrink = replicas is not None and current_replicas is not None and replicas < current_replicas
    if replicas is not None and replicas != current_replicas and not shrink:
        out["scale"] = await control.scale(deployment, int(replicas), actor=actor, reason=reason)
    try:
        rolled: dict[str, Any] = await control.reconfigure(deployment, dict(engine), actor=actor, reason=reason)
    except Exception:
        if "scale" in out and current_replicas is not None:  # refused: not half applied (grown, old engine)
            try:
                await control.scale(deployment, int(current_replicas), actor=actor, reason=f"undo_{reason}")
            except Exception:  # noqa: BLE001 - the refusal is what the caller must see; this is logged
                log.exception("%s: could not put the count back to %s after the change was refused", deployment,
                              current_replicas)
        raise
    if shrink:
        assert replicas is not None
        later = _scale_after_roll(control, deployment, int(replicas), actor, reason, wait_rolled)
        if wait_rolled is not None:
            out["scale"] = await later
        else:
            _BACKGROUND.add(task := asyncio.ensure_future(later))
            task.add_done_callback(_BACKGROUND.discard)
            out["scale_after_roll"] = {"deployment": deployment, "replicas": int(replicas)}
    return rolled | out


async def _scale_after_roll(control: Any, deployment: str, replicas: int, actor: str, reason: str,
                            wait_rolled: Callable[[], Awaitable[None]] | None, retry_s: float = 2.0,
                            give_up_s: float = 3600.0) -> dict[str, Any]:
    """Resize once the rolling change is over: the supervisor refuses (409) while it runs."""
    if wait_rolled is not None:
        await wait_rolled()
    waited = 0.0
    while True:
        try:
            return dict(await control.scale(deployment, replicas, actor=actor, reason=reason))
        except Exception as exc:
            if getattr(exc, "status", None) != 409 or waited >= give_up_s:
                log.error("%s: resize to %d after the rolling change failed: %s", deployment, replicas, exc)
                raise
        await asyncio.sleep(retry_s)
        waited += retry_s


_BACKGROUND: set[asyncio.Future[Any]] = set()  # resizes waiting for a roll (kept referenced until done)


class CanaryControl(Protocol):
    async def start_canary(self, deployment: str, changes: Mapping[str, Any], *, actor: str,
                           reason: str) -> tuple[str, str | None]: ...
    async def stop_canary(self, deployment: str, *, actor: str, reason: str) -> None: ...


class SupervisorCanary(Canary):
    """Real trials (search.Canary): the supervisor starts a canary replica with the cell's engine args (never
    routed, never traced), this drives `requests` of the recorded workload at the per-replica rate the search
    assigned, straight to it, and judges the client's timings against the SLOs; then the canary is stopped.
    A lower precision first meets the quality guard against `reference()` (a ready replica of the running
    configuration, None when there is none): refused, it gets no load; without a reference it is unknown.
    Called from the search's worker thread; the supervisor's coroutines run on the plane's loop."""

    def __init__(self, control: CanaryControl, loop: asyncio.AbstractEventLoop, dep: Deployment,
                 workload: Workload, objectives: Sequence[Objective], *, requests: int, seed: int = 0,
                 progress: Callable[[str], None] = lambda line: None,
                 reference: Callable[[], str | None] = lambda: None,
                 check: Callable[[str, str, Deployment], quality.QualityVerdict] = quality_check) -> None:
        self.control, self.loop, self.dep = control, loop, dep
        self.workload, self.objectives, self.requests, self.seed = workload, list(objectives), requests, seed
        self.progress, self.reference, self.check = progress, reference, check
        self.tried = 0

    def _guard(self, name: str, url: str) -> CanaryVerdict | dict[str, Any]:
        """The quality guard's evidence, or the verdict that ends the trial (refused, or unknown)."""
        ref = self.reference()
        if ref is None:
            return CanaryVerdict((), f"{name}: no ready replica of the running configuration to compare it with; "
                                     "the quality guard could not run")
        self.progress(f"canary {self.tried}: quality guard, {len(quality.PROMPTS)} prompts against {ref}")
        try:
            qv = self.check(ref, url, self.dep)
        except quality.QualityProbeError as exc:
            return CanaryVerdict((), f"{name}: the quality guard could not compare: {exc}")
        ev = qv.evidence()
        self.progress(f"canary {self.tried}: greedy agreement {qv.report.mean_agreement:.3f}, logprob drift "
                      f"{qv.report.max_logprob_drift}; within the budget: {qv.ok}")
        if not qv.ok:
            drift = qv.report.max_logprob_drift
            figures = (f"greedy agreement {qv.report.mean_agreement:.3f}, logprob drift "
                       f"{'unknown' if drift is None else format(drift, '.3f')} nats over {len(qv.report.comparisons)} "
                       f"prompts against {ref}")
            return CanaryVerdict((), f"{name}: refused by the quality guard", quality=ev,
                                 refused=f"quality guard: {'; '.join(qv.reasons)} ({figures})")
        return ev

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def trial(self, cell: Cell, changes: Mapping[str, Any], rps: float) -> CanaryVerdict:
        self.tried += 1
        dep = self.dep.name
        self.progress(f"canary {self.tried}: starting a replica with {cell.label()}")
        name, url = self._on_loop(self.control.start_canary(dep, changes, actor="tuner", reason="canary_trial"))
        try:
            if url is None:
                return CanaryVerdict((), f"{name} with {cell.label()} never became ready", started=False)
            guard = self._guard(name, url) if cell.lower_precision else None
            if isinstance(guard, CanaryVerdict):
                self.progress(f"canary {self.tried}: {guard.refused or guard.note}")
                return guard
            max_len = self.dep.engine.with_changes(dict(changes)).max_model_len
            plans = trial_plans(self.workload, rps, self.requests, self.seed + self.tried, max_model_len=max_len)
            self.progress(f"canary {self.tried}: {name} ready; {len(plans)} requests at {rps:.3g} req/s")
            results = asyncio.run(run_load(url, self.dep.served_name, plans, concurrency=max(8, len(plans))))
        finally:
            self._on_loop(self.control.stop_canary(dep, actor="tuner", reason="canary_done"))
        verdict = dataclasses.replace(judge(results, self.objectives, min_requests=min(50, self.requests),
                                            note=f"{name}, {rps:.3g} req/s, client-side timings"), quality=guard)
        self.progress(f"canary {self.tried}: {verdict.note}; passed: {verdict.passed}")
        return verdict


def reference_url(rt: Any) -> str | None:
    """A ready replica of the running configuration (the quality guard's reference): never a canary or a rolling
    change's new replica, nor one still on other engine args."""
    return next((m.handle.url for m in list(rt.members.values())
                 if m.state == "ready" and not m.candidate and m.handle is not None and m.config == rt.dep.engine),
                None)


@dataclass(frozen=True)
class SearchParams:
    target_rps: float | None = None  # None: the recorded workload's mean rate
    window_s: float = 1800.0
    canary_trials: int | None = None  # None: the spec's tuning.canary_trials
    seed: int = 0
    mode: str | None = None  # recommend | auto; None: the plane's tuner mode


# Auto mode applies a searched configuration unattended only at or above this confidence (the calibration's fit,
# lowered by how far the chosen max_num_seqs lies beyond the batches it saw: half at twice), or after a canary.
AUTO_MIN_CONFIDENCE = 0.5


def run_search(store: Any, recs: Any, dep: Deployment, *, ready: Sequence[str], current_replicas: int,
               slos: Sequence[Any], params: SearchParams, now: float, replicas: Sequence[str] | None = None,
               canary_factory: Callable[[Workload, Sequence[Objective]], Canary] | None = None,
               progress: Callable[[str], None] = lambda line: None, mode: str = "recommend",
               auto_min_confidence: float = AUTO_MIN_CONFIDENCE) -> dict[str, Any]:
    """Calibrate on the deployment's best-observed ready replica (`ready`: those running the spec's engine
    args), search, store the recommendation in `mode` (`recommend` waits for a person; `auto` is applied and
    judged by `SearchJobs`, unless its confidence is under `auto_min_confidence` and no canary validated it:
    then it is stored for a person, and the result's `mode` and `held` say so). The workload is every request
    of the window on any of `replicas` (the deployment's replicas, stopped and restarting ones included; default
    `ready`): a replica missing from it would lower the measured rate and read as room to scale down. Returns
    what was decided, JSON-ready."""
    from controlplane.tuning.calibrate import calibrated_replica
    from controlplane.tuning.search_space import CalibratedFactory
    from controlplane.tuning.workload import from_rows

    objectives, skipped = objectives_from_slos(s for s in slos if s.deployment == dep.name)
    if not objectives:
        raise SearchInputError(f"no latency SLO names deployment {dep.name!r}: the search judges configurations "
                               "by them (add one to the SLO file)")
    hf_config = read_hf_config(dep.model_path) if dep.simulated is None else None
    space = space_for(dep.engine, dep.tuning, checkpoint=checkpoint_quantization(hf_config))
    if not dep.engine.chunked_prefill:
        raise SearchInputError(f"{dep.name} turns chunked prefill off (--no-enable-chunked-prefill): the search "
                               "models vLLM V1's chunked prefill, so its token budgets would not hold there")
    if not ready:
        raise SearchInputError(f"{dep.name} has no ready replica running its configuration to calibrate on "
                               "(starting, or a rolling change still running)")
    since = now - params.window_s
    progress(f"reading the requests of {dep.name} over the last {params.window_s:.0f} s")
    per_replica = {r: store.requests(since_unix_s=since, until_unix_s=now, replica=r, limit=50_000)
                   for r in dict.fromkeys([*ready, *(replicas or ())])}
    replica = max(ready, key=lambda r: len(per_replica[r]))
    if len(per_replica[replica]) < MIN_REQUESTS:
        raise SearchInputError(f"{replica} recorded {len(per_replica[replica])} requests in the last "
                               f"{params.window_s:.0f} s; the calibration needs at least {MIN_REQUESTS} "
                               "(send traffic, or widen window_s)")
    rows = [row for got in per_replica.values() for row in got]
    wl = from_rows(rows, name=f"trace:{dep.name}")
    eng = dep.engine
    assert eng.max_num_seqs is not None and eng.max_num_batched_tokens is not None  # space_for checked
    progress(f"fitting step costs on {replica} ({len(per_replica[replica])} requests)")
    model, fit = calibrated_replica(store, replica, max_num_seqs=eng.max_num_seqs,
                                    max_num_batched_tokens=eng.max_num_batched_tokens, since_unix_s=since,
                                    until_unix_s=now, max_model_len=eng.max_model_len, fit_per_seq=True,
                                    prefix_caching=eng.prefix_caching)
    price = dep.price_per_replica_hour_usd or None
    weights, kv = running_precision(eng)
    priors = weight_priors(dep, model_shape(dep, hf_config), wl)
    factory = CalibratedFactory(model.step_cost, kv_capacity_tokens=model.num_kv_blocks * model.block_size,
                                block_size=model.block_size, weights=weights, kv_cache=kv,
                                tensor_parallel_size=eng.tensor_parallel_size, max_model_len=eng.max_model_len,
                                usd_per_hour=price, api_path_s=model.api_path_s,
                                api_path_per_request_s=model.api_path_per_request_s,
                                prefix_caching=model.prefix_caching,
                                kv_capacity_scales=eng.num_gpu_blocks_override is None,
                                weight_priors=priors,
                                # The roofline moves the measured KV capacity to each cell's batch limits.
                                limits_kv=priors.limits_kv_scale if isinstance(priors, RooflineWeightPriors) else None)
    trials = dep.tuning.canary_trials if params.canary_trials is None else params.canary_trials
    if trials > 0 and canary_factory is not None:
        _check_canary_can_judge(dep, objectives)
    canary = canary_factory(wl, objectives) if trials > 0 and canary_factory is not None else None
    if trials > 0 and canary is None:
        raise SearchInputError(f"{dep.name}: canary trials need a supervised deployment (local or ray backend)")
    options = SearchOptions(canary_trials=max(1, trials), min_replicas=max(1, dep.min_replicas),
                            running=(eng.max_num_seqs, eng.max_num_batched_tokens),
                            max_replicas=max(1, dep.max_replicas))
    progress(f"searching {len(space)} configurations" + (f", up to {trials} canary trial(s)" if canary else ""))
    result = search(space, factory, objectives, wl, target_rps=params.target_rps, options=options, canary=canary)
    running = SearchSpace((eng.max_num_seqs,), (eng.max_num_batched_tokens,), weights=(weights,), kv_cache=(kv,),
                          limits_only=True, baseline=(weights, kv))
    baseline = search(running, factory, objectives, wl, target_rps=params.target_rps, options=options,
                      exhaustive=True)
    c = fit.coefficients
    calibration = {"replica": replica, "requests": len(per_replica[replica]), "steps": fit.rows,
                   "rel_rmse": fit.rel_rmse, "alpha_s": c.alpha_s, "beta_s_per_token": c.beta_s_per_token,
                   "gamma_s_per_kv_token": c.gamma_s_per_kv_token, "delta_s_per_seq": c.delta_s_per_seq,
                   "api_path_s": model.api_path_s, "api_path_per_request_s": model.api_path_per_request_s,
                   "kv_capacity_tokens": model.num_kv_blocks * model.block_size,
                   "observed_max_seqs_per_step": fit.observed_max_seqs,
                   # at the running limits; each cell's own limits were used for it
                   "weight_priors": {w.value: dataclasses.asdict(factory.weight_prior(w, eng.max_num_seqs,
                                                                                      eng.max_num_batched_tokens))
                                     for w in space.weights if w != weights}}
    workload = {"requests": len(wl), "skipped_rows": wl.skipped_rows, "duration_s": wl.duration_s,
                "window_s": params.window_s, "not_predicted": list(skipped)}
    now_ev = current_evidence(current_replicas, dep.price_per_replica_hour_usd, baseline)
    p = proposal(dep, current_replicas, result, calibration=calibration, workload=workload, current=now_ev)
    held = None
    if mode == "auto" and p is not None and not result.validated and (
            p.confidence is None or p.confidence < auto_min_confidence):
        # Applied unattended, a prediction the calibration barely covers (a fit on small batches extrapolated
        # to a larger max_num_seqs) risks the SLO to find out; a person, or a canary trial, decides instead.
        held = (f"confidence {p.confidence if p.confidence is not None else 'unknown'} is under auto mode's "
                f"{auto_min_confidence:g} and no canary validated it: left for a person to apply or dismiss")
        mode = "recommend"
    rid = recs.add(p, mode) if p is not None else None
    if p is None:
        why = ("nothing meets every SLO within the allowed configurations" if result.chosen is None
               else "the current configuration is already the cheapest that meets every SLO")
    else:
        why = f"{p.reason}: {result.chosen.label() if result.chosen else ''} x {result.replicas}"
    progress(why + (f" (recommendation {rid})" if rid else ""))
    if held:
        progress(f"auto mode: {held}")
    return {"deployment": dep.name, "recommendation_id": rid, "outcome": why, "validated": result.validated,
            "mode": mode, "held": held,
            "evidence": p.evidence if p is not None else {**result.evidence(), "calibration": calibration,
                                                          "workload": workload, "current": now_ev}}


def _check_canary_can_judge(dep: Deployment, objectives: Sequence[Objective]) -> None:
    """Refuse, before any replica starts, canary trials that could only end 'unknown'."""
    n = dep.tuning.canary_requests
    for o in objectives:
        if any(t.sli == "queue" for t in o.targets):
            raise SearchInputError(f"SLO {o.name} is on queue time, which a canary's client cannot measure: "
                                   "search without canary trials (canary_trials: 0)")
        need = requests_to_judge(o, min(50, n))
        if n < need:
            raise SearchInputError(f"SLO {o.name} ({o.objective:.4g}) needs at least {need} requests per canary "
                                   f"trial to be judged, and {dep.name} sends {n} (spec.tuning.canary_requests)")


@dataclass(frozen=True)
class AutoOptions:
    """How an auto-applied configuration is judged (as the tuner judges a scale change)."""

    verify_s: float = 120.0  # once every replica runs it, judge it on this long of finished requests
    ingest_lag_s: float = 10.0  # waited past the window: its last requests' spans are still on their way (batched)
    lookback_s: float = 300.0  # requests finishing this long before the change are its "before"
    min_requests: int = 50  # on each side; fewer: undecided (kept), never a rollback on too little
    poll_s: float = 1.0
    rollout_timeout_s: float = 1800.0
    min_confidence: float = AUTO_MIN_CONFIDENCE  # under it (and without a canary's pass): left for a person


Counts = Callable[[Any, float, float], tuple[float, int]]
"""(runtime, t0, t1) -> (good, known) requests of the deployment that finished in [t0, t1)."""


class SearchJobs:
    """Searches run in the background, one per deployment at a time, each in a worker thread (a search takes
    seconds of CPU, a canary trial minutes); `get` reports progress lines and the outcome. Kept in memory: a
    plane restart forgets them (their recommendations are in the store).

    mode `auto` (the plane's CONTROLPLANE_TUNER_MODE): the recommendation is applied through the supervisor
    (actor `tuner`: resize, then roll), and once every replica runs it, judged on the requests that finish in
    `verify_s` against those of the `lookback_s` before: if the share within every SLO fell by more than 2 points
    and now misses the objective (`loop.verdict`), the previous engine args and count are put back and the
    recommendation is `rolled_back`."""

    def __init__(self, store: Any, recs: Any, supervisor: Any, slos: Sequence[Any], *,
                 clock: Callable[[], float] = time.time, keep: int = 50, mode: str = "recommend",
                 auto: AutoOptions | None = None, counts: Counts | None = None,
                 sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep) -> None:
        self.store, self.recs, self.supervisor, self.slos, self.clock, self.keep = store, recs, supervisor, slos, \
            clock, keep
        self.mode = "auto" if mode == "auto" else "recommend"
        self.auto = auto or AutoOptions()
        self.counts = counts or self._stored_counts
        self.sleep = sleep
        self.jobs: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, deployment: str, params: SearchParams) -> dict[str, Any]:
        rt = self.supervisor.runtimes.get(deployment)
        if rt is None:
            known = ", ".join(self.supervisor.runtimes) or "none"
            raise SearchInputError(f"unknown deployment {deployment!r}; known: {known}", 404)
        busy = [j for j in self.jobs.values() if j["deployment"] == deployment and j["status"] == "running"]
        if busy:
            raise SearchInputError(f"{deployment}: search {busy[0]['id']} is still running; one at a time", 409)
        job: dict[str, Any] = {"id": next(self._ids), "deployment": deployment, "status": "running",
                               "started_unix_s": self.clock(), "finished_unix_s": None, "progress": [],
                               "result": None, "error": None,
                               "params": {"target_rps": params.target_rps, "window_s": params.window_s,
                                          "canary_trials": params.canary_trials,
                                          "mode": params.mode or self.mode}}
        self.jobs[job["id"]] = job
        for old in sorted(self.jobs)[:-self.keep]:
            if self.jobs[old]["status"] != "running":
                del self.jobs[old]
        task = asyncio.get_running_loop().create_task(self._run(job, rt, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dict(job)

    def get(self, job_id: int) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise SearchInputError(f"no search {job_id} (searches are kept in memory until the plane restarts)", 404)
        return {**job, "progress": list(job["progress"])}

    def list(self) -> list[dict[str, Any]]:
        return [self.get(i) for i in sorted(self.jobs, reverse=True)]

    async def _run(self, job: dict[str, Any], rt: Any, params: SearchParams) -> None:
        loop = asyncio.get_running_loop()

        def progress(line: str) -> None:
            job["progress"].append({"unix_s": self.clock(), "line": line})
            log.info("search %s (%s): %s", job["id"], job["deployment"], line)

        supervised = rt.backend.kind != "external"

        def canaries(wl: Workload, objectives: Sequence[Objective]) -> Canary:
            return SupervisorCanary(self.supervisor, loop, rt.dep, wl, objectives,
                                    requests=rt.dep.tuning.canary_requests, seed=params.seed, progress=progress,
                                    reference=lambda: reference_url(rt))

        ready = [m.name for m in rt.members.values()
                 if m.state == "ready" and not m.candidate and m.config == rt.dep.engine]
        mode = (params.mode or self.mode) if supervised else "recommend"
        try:
            replicas = [r["name"] for r in await asyncio.to_thread(self.store.deployment_replicas,
                                                                   rt.deployment_id)]
            job["result"] = await asyncio.to_thread(
                run_search, self.store, self.recs, rt.dep, ready=ready, current_replicas=rt.desired,
                slos=self.slos, params=params, now=self.clock(), replicas=replicas,
                canary_factory=canaries if supervised else None, progress=progress,
                mode=mode, auto_min_confidence=self.auto.min_confidence)
            rid = job["result"]["recommendation_id"]
            if rid is not None and job["result"]["mode"] == "auto":
                job["result"]["auto"] = await self._apply_and_judge(rt, rid, progress)
            job["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - a failed search is reported with its reason, never raised
            if not isinstance(exc, ValueError):
                log.exception("search %s failed", job["id"])
            job["status"], job["error"] = "failed", f"{exc}" if isinstance(exc, ValueError) else \
                f"{type(exc).__name__}: {exc}"
        finally:
            job["finished_unix_s"] = self.clock()

    # --- auto mode ------------------------------------------------------------------------------------------
    def _stored_counts(self, rt: Any, t0: float, t1: float) -> tuple[float, int]:
        from controlplane.tuning.loop import finished_between, recent_requests, slo_counts, slo_objectives

        objectives, objective = slo_objectives(self.slos, rt.dep.name)
        return slo_counts(finished_between(recent_requests(self.store, rt.members, t0, t1), t0, t1),
                          objectives, objective)

    async def _change(self, rt: Any, engine: Mapping[str, Any], replicas: int | None, reason: str) -> dict[str, Any]:
        return await resize_then_roll(self.supervisor, rt.dep.name, engine, replicas, current_replicas=rt.desired,
                                      actor="tuner", reason=reason, wait_rolled=lambda: self._rolled(rt))

    async def _rolled(self, rt: Any) -> None:
        t0 = self.clock()
        while rt.rollout is not None and not rt.rollout.done() and self.clock() - t0 < self.auto.rollout_timeout_s:
            await self.sleep(self.auto.poll_s)

    async def _apply_and_judge(self, rt: Any, rid: int, progress: Callable[[str], None]) -> dict[str, Any]:
        from controlplane.tuning.loop import ROLL_BACK, slo_objectives, verdict
        from controlplane.tuning.recommendations import (
            APPLIED,
            FAILED,
            ROLLED_BACK,
            SUPERSEDED,
            engine_changed_since,
            made_for_replicas,
        )

        rec = await asyncio.to_thread(self.recs.get, rid)
        proposed, current = rec["proposed"], rec["current"]
        was = made_for_replicas(rec)
        changed = engine_changed_since(rec, rt.dep.engine.as_dict())
        if (was is not None and was != rt.desired) or changed:
            # The count or the engine changed while it searched (the tuner scaled, a person reconfigured): the
            # proposal was sized for another fleet, and applying it would undo that change (its rollback would
            # restore the old one), as the API refuses such a recommendation.
            why = (f"made for {was} replica(s) of {rt.dep.name}, which has {rt.desired} now" if not changed else
                   f"made for {rt.dep.name} with {changed}") + ": not applied, search again"
            await asyncio.to_thread(self.recs.decide, rid, SUPERSEDED, by="tuner", outcome={"why": why})
            progress(f"auto mode: {why}")
            return {"verdict": "stale", "why": why}
        _, objective = slo_objectives(self.slos, rt.dep.name)
        now = self.clock()
        before = await asyncio.to_thread(self.counts, rt, now - self.auto.lookback_s, now)
        reason = f"recommendation_{rid}"
        progress(f"auto mode: applying recommendation {rid}")
        await asyncio.to_thread(self.recs.claim, rid, by="tuner")
        try:
            applied = await self._change(rt, proposed["engine"], proposed.get("replicas"), reason)
        except Exception as exc:  # noqa: BLE001 - the supervisor refused: the recommendation failed, say why
            await asyncio.to_thread(self.recs.decide, rid, FAILED, by="tuner", outcome={"error": str(exc)},
                                    expect=(APPLIED,))
            progress(f"auto mode: the supervisor refused it: {exc}")
            return {"verdict": "failed", "error": str(exc)}
        await asyncio.to_thread(self.recs.decide, rid, APPLIED, by="tuner", expect=(APPLIED,), outcome={
            "applied": applied, "before": {"good": before[0], "known": before[1]}})
        await self._rolled(rt)
        engine_now = rt.dep.engine.as_dict()
        if any(engine_now.get(k) != v for k, v in proposed["engine"].items()):
            why = "the rolling change did not complete (its new replica never became ready; the supervisor rolled back)"
            await asyncio.to_thread(self.recs.decide, rid, FAILED, by="tuner", expect=(APPLIED,),
                                    outcome={"verdict": "rollout_rolled_back", "why": why})
            progress(f"auto mode: {why}")
            return {"verdict": "rollout_rolled_back"}
        # The spec says the new configuration; the replicas may not all run it yet (a rolling change blocked
        # without a free slot, or past the timeout): judging then would credit the old one's requests to it.
        behind = [m.name for m in getattr(rt, "counted", ())
                  if any(m.config.as_dict().get(k) != v for k, v in proposed["engine"].items())]
        if behind:
            why = f"not every replica runs it after the rolling change ({', '.join(behind)} still on the previous one)"
            await asyncio.to_thread(self.recs.decide, rid, FAILED, by="tuner", expect=(APPLIED,),
                                    outcome={"verdict": "not_in_effect", "why": why})
            progress(f"auto mode: {why}")
            return {"verdict": "not_in_effect"}
        effective = self.clock()
        progress(f"auto mode: every replica runs it; judging it on {self.auto.verify_s:.0f} s of requests")
        await self.sleep(self.auto.verify_s + self.auto.ingest_lag_s)
        after = await asyncio.to_thread(self.counts, rt, effective, effective + self.auto.verify_s)
        v = verdict(before, after, objective=objective, min_requests=self.auto.min_requests)
        outcome: dict[str, Any] = {"verdict": v, "after": {"good": after[0], "known": after[1]},
                                   "in_effect_unix_s": effective, "judged_unix_s": self.clock()}
        if v == ROLL_BACK:
            # The engine args go back. The count goes back only from a scale-down, and only if nobody changed it
            # since: a scale-up is kept (the SLO getting worse is no time to shrink; the autoscaler judges the
            # count), and a count changed meanwhile (the tuner's risk scale-up, a person) is theirs.
            count = current.get("replicas")
            grew = count is not None and proposed.get("replicas") is not None and proposed["replicas"] > count
            if grew or rt.desired != proposed.get("replicas", rt.desired):
                outcome["count_kept"] = rt.desired
                count = None
            progress("auto mode: the SLO got worse; putting the previous engine args back"
                     + ("" if count is None else f" and {count} replica(s)"))
            try:
                outcome["rollback"] = await self._change(rt, current["engine"], count,
                                                         f"rollback_recommendation_{rid}")
            except Exception as exc:  # noqa: BLE001 - recorded with the outcome
                outcome["rollback_error"] = str(exc)
            await asyncio.to_thread(self.recs.decide, rid, ROLLED_BACK, by="tuner", outcome=outcome,
                                    expect=(APPLIED,))
        else:
            await asyncio.to_thread(self.recs.decide, rid, APPLIED, by="tuner", outcome=outcome, expect=(APPLIED,))
        progress(f"auto mode: {v} (before {before[0]:g}/{before[1]} within the SLOs, after {after[0]:g}/{after[1]})")
        return outcome
