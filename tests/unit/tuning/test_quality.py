"""The quality guard's arithmetic and judgement (the real-vLLM comparison is in tests/integration)."""

from __future__ import annotations

import pytest

from controlplane.tuning.quality import Completion, QualityBudget, compare_one, judge, summarize


def c(tokens: str, logprobs: list[float]) -> Completion:
    return Completion(tuple(tokens), tuple(logprobs))


def test_agreement_counts_the_shared_prefix_only() -> None:
    # Same tokens after the divergence do not count: the contexts differ from there on.
    cmp = compare_one("p", c("abcdef", [-1.0] * 6), c("abXdef", [-1.5, -1.0, -2.0, -1.0, -1.0, -1.0]))
    assert (cmp.agreed_prefix, cmp.reference_tokens, cmp.agreement) == (2, 6, pytest.approx(1 / 3))
    assert cmp.logprob_drift == pytest.approx(0.25)  # mean of |delta| over the two shared tokens


def test_identical_outputs_pass_a_strict_budget() -> None:
    report = summarize([compare_one("p", c("abc", [-1, -2, -3]), c("abc", [-1, -2, -3]))])
    verdict = judge(report, QualityBudget(min_greedy_agreement=1.0, max_logprob_drift=0.0))
    assert verdict.ok and verdict.reasons == ()


def test_low_agreement_and_high_drift_are_both_named() -> None:
    report = summarize([compare_one("p", c("abcd", [-1, -1, -1, -1]), c("abzz", [-3, -3, -1, -1])),
                        compare_one("q", c("ab", [-1, -1]), c("ab", [-1, -1]))])
    assert report.mean_agreement == pytest.approx(0.75)
    verdict = judge(report, QualityBudget(min_greedy_agreement=0.9, max_logprob_drift=0.5))
    assert not verdict.ok
    assert verdict.reasons == ("greedy agreement 0.750 < 0.900", "logprob drift 2.000 > 0.500 nats")


def test_drift_that_cannot_be_measured_fails_instead_of_reading_as_zero() -> None:
    report = summarize([compare_one("p", c("ab", [-1, -1]), c("xy", [-1, -1]))])
    assert report.max_logprob_drift is None
    verdict = judge(report, QualityBudget(min_greedy_agreement=0.0, max_logprob_drift=100.0))
    assert not verdict.ok and "unknown" in verdict.reasons[0]


def test_a_non_finite_logprob_is_the_worst_drift_never_a_nan_within_budget() -> None:
    inf = float("-inf")
    # Both sides -inf on an agreed token: |-inf - -inf| is NaN, which compares as within any budget.
    report = summarize([compare_one("p", c("ab", [-1.0, inf]), c("ab", [-3.9, inf])),
                        compare_one("q", c("ab", [-1, -1]), c("ab", [-1, -1]))])
    assert report.max_logprob_drift == float("inf")
    verdict = judge(report, QualityBudget(min_greedy_agreement=0.0, max_logprob_drift=100.0))
    assert not verdict.ok and verdict.reasons == ("logprob drift inf > 100.000 nats",)
    assert verdict.evidence()["max_logprob_drift"] is None  # JSON has no infinity; the reason says it


@pytest.mark.parametrize("body", ['{"choices": []}', '{"choices": [{"logprobs": null}]}', "not json",
                                  '{"choices": [{"logprobs": {"tokens": ["a"], "token_logprobs": []}}]}'])
def test_an_answer_without_token_logprobs_is_a_probe_error_naming_the_server(body: str) -> None:
    import asyncio

    import httpx

    from controlplane.tuning.quality import QualityProbeError, complete

    async def go() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            await complete(client, "http://tiny-0:8000", "tiny", "hello", 4)

    with pytest.raises(QualityProbeError, match="http://tiny-0:8000"):
        asyncio.run(go())


def test_an_empty_or_short_answer_agrees_with_nothing_beyond_it() -> None:
    full = c("abcdefgh", [-1.0] * 8)
    assert compare_one("p", c("", []), full).agreement == 0.0  # an empty reference read as full agreement
    assert compare_one("p", c("a", [-1.0]), full).agreement == pytest.approx(1 / 8)  # 1 of 8, not 1 of 1
    assert compare_one("p", full, c("ab", [-1.0, -1.0])).agreement == pytest.approx(2 / 8)


@pytest.mark.parametrize("tokens", [[], ["a"]])
def test_an_answer_shorter_than_asked_is_a_partial_comparison_not_a_result(tokens: list[str]) -> None:
    import asyncio
    import json

    import httpx

    from controlplane.tuning.quality import QualityProbeError, complete

    body = {"choices": [{"finish_reason": "length",
                         "logprobs": {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens)}}]}

    async def go() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=json.dumps(body)))
        async with httpx.AsyncClient(transport=transport) as client:
            await complete(client, "http://tiny-0:8000", "tiny", "hello", 4)

    with pytest.raises(QualityProbeError, match=f"{len(tokens)} tokens answered, 4 asked for"):
        asyncio.run(go())
