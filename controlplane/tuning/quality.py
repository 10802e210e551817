"""Quality guard: before recommending a lower precision, compare it with the current configuration.

The same fixed prompts go to both servers through the OpenAI completions API with greedy decoding
and the chosen token's log-probability. Two figures per prompt:

- greedy agreement: the share of the reference's tokens the candidate reproduced before their first
  divergence (after a divergence the contexts differ, so later tokens say nothing about precision);
- logprob drift: the mean |logprob_ref - logprob_cand| of the chosen token over that shared prefix.

A candidate passes when the mean agreement and the worst-case drift are within the deployment's
declared quality budget. The judgement is a pure function; the HTTP part only collects the numbers.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

# A fixed, version-controlled prompt set: plain text in several registers, so agreement is measured
# on the same inputs every time (changing it changes the meaning of old reports).
PROMPTS: tuple[str, ...] = (
    "The replica drained its queue before the rolling update began, and then",
    "Explain in one sentence why tail latency matters for interactive chat:",
    "def fibonacci(n):\n    ",
    "Translate to French: the cache is full and requests are waiting.",
    "List three causes of a sudden rise in time to first token:",
    "Once upon a time, a scheduler had to choose between two requests",
    "SELECT replica, percentile_cont(0.99) WITHIN GROUP (ORDER BY ttft) FROM requests",
    "Q: What is the capital of Australia?\nA:",
)


@dataclass(frozen=True)
class QualityBudget:
    min_greedy_agreement: float = 0.9  # mean over prompts, 0-1
    max_logprob_drift: float = 0.5  # worst prompt, nats


@dataclass(frozen=True)
class Completion:
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class PromptComparison:
    prompt: str
    reference_tokens: int
    agreed_prefix: int
    agreement: float
    logprob_drift: float | None  # None when not even the first token agreed


@dataclass(frozen=True)
class QualityReport:
    comparisons: tuple[PromptComparison, ...]
    mean_agreement: float
    max_logprob_drift: float | None


@dataclass(frozen=True)
class QualityVerdict:
    ok: bool
    reasons: tuple[str, ...]
    report: QualityReport
    budget: QualityBudget

    def evidence(self) -> dict[str, object]:
        """JSON-ready, for a recommendation's evidence: the figures, the budget and the verdict."""
        drift = self.report.max_logprob_drift  # JSON has no infinity: an unbounded drift is in the reasons
        return {"ok": self.ok, "reasons": list(self.reasons), "prompts": len(self.report.comparisons),
                "mean_greedy_agreement": self.report.mean_agreement,
                "max_logprob_drift": drift if drift is not None and math.isfinite(drift) else None,
                "budget": {"min_greedy_agreement": self.budget.min_greedy_agreement,
                           "max_logprob_drift": self.budget.max_logprob_drift}}


def compare_one(prompt: str, ref: Completion, cand: Completion) -> PromptComparison:
    n = 0
    for a, b in zip(ref.tokens, cand.tokens, strict=False):
        if a != b:
            break
        n += 1
    # A logprob that is not a finite number (vLLM answers -inf or null for an impossible token) makes the drift
    # infinite, the worst: never a NaN, which would compare as within any budget.
    diffs = [abs(ref.logprobs[i] - cand.logprobs[i]) for i in range(n)]
    drift = None if not n else statistics.fmean(diffs) if all(math.isfinite(d) for d in diffs) else math.inf
    # Over the longer of the two: an empty or short answer on either side agrees with nothing beyond it (an empty
    # reference read as full agreement before).
    total = max(len(ref.tokens), len(cand.tokens))
    return PromptComparison(prompt, total, n, n / total if total else 0.0, drift)


def summarize(comparisons: Sequence[PromptComparison]) -> QualityReport:
    if not comparisons:
        raise ValueError("no prompts compared")
    drifts = [c.logprob_drift for c in comparisons if c.logprob_drift is not None]
    return QualityReport(tuple(comparisons), statistics.fmean(c.agreement for c in comparisons),
                         max(drifts) if drifts else None)


def judge(report: QualityReport, budget: QualityBudget) -> QualityVerdict:
    """Pass only within the budget; a drift that could not be measured does not pass as zero."""
    reasons = []
    if report.mean_agreement < budget.min_greedy_agreement:
        reasons.append(f"greedy agreement {report.mean_agreement:.3f} < {budget.min_greedy_agreement:.3f}")
    if report.max_logprob_drift is None:
        reasons.append("logprob drift unknown: no prompt agreed on its first token")
    elif not report.max_logprob_drift <= budget.max_logprob_drift:  # NaN included
        reasons.append(f"logprob drift {report.max_logprob_drift:.3f} > {budget.max_logprob_drift:.3f} nats")
    return QualityVerdict(not reasons, tuple(reasons), report, budget)


class QualityProbeError(RuntimeError):
    pass


async def complete(client: httpx.AsyncClient, base_url: str, model: str, prompt: str,
                   max_tokens: int) -> Completion:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1,
            "ignore_eos": True, "seed": 0}
    try:
        r = await client.post(base_url.rstrip("/") + "/v1/completions", json=body)
    except httpx.HTTPError as exc:
        raise QualityProbeError(f"{base_url}: {type(exc).__name__}: {exc}") from exc
    if r.status_code != 200:
        raise QualityProbeError(f"{base_url}: HTTP {r.status_code}: {r.text[:200]}")
    try:
        lp = r.json()["choices"][0]["logprobs"]
        values = [float(x) if x is not None and math.isfinite(x) else float("-inf") for x in lp["token_logprobs"]]
        tokens = tuple(str(t) for t in lp["tokens"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # not an OpenAI completions answer with logprobs
        raise QualityProbeError(f"{base_url}: the completion has no token logprobs ({type(exc).__name__}: {exc}): "
                                f"{r.text[:200]}") from exc
    if len(values) != len(tokens):
        raise QualityProbeError(f"{base_url}: {len(tokens)} tokens but {len(values)} logprobs")
    # With ignore_eos every answer has max_tokens tokens: a shorter one (cut by the model length, an error) is a
    # partial comparison, unknown. Taken as it is, a short reference made a candidate agree with all of it.
    if len(tokens) != max_tokens:
        raise QualityProbeError(f"{base_url}: {len(tokens)} tokens answered, {max_tokens} asked for (finish reason "
                                f"{r.json()['choices'][0].get('finish_reason')!r}): a partial answer compares nothing")
    return Completion(tokens, tuple(values))


async def compare(reference_url: str, candidate_url: str, model: str, *, prompts: Sequence[str] = PROMPTS,
                  max_tokens: int = 32, client: httpx.AsyncClient | None = None) -> QualityReport:
    """Send each prompt to both servers (one at a time: no batching effects) and compare."""
    own = client is None
    client = client or httpx.AsyncClient(timeout=120)
    try:
        out = []
        for p in prompts:
            ref = await complete(client, reference_url, model, p, max_tokens)
            cand = await complete(client, candidate_url, model, p, max_tokens)
            out.append(compare_one(p, ref, cand))
        return summarize(out)
    finally:
        if own:
            await client.aclose()


def compare_blocking(reference_url: str, candidate_url: str, model: str, **kw: object) -> QualityReport:
    return asyncio.run(compare(reference_url, candidate_url, model, **kw))  # type: ignore[arg-type]
