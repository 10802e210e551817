"""bench/overhead.py's pure parts: block order, per-block figures, spread, paired loss and its interval, verdict."""

from __future__ import annotations

import pytest

from bench.overhead import (
    WITH,
    WITHOUT,
    Block,
    Loss,
    block_figures,
    block_order,
    bootstrap_median,
    loss,
    paired_losses,
    spread,
    summarise,
    verdict,
)
from controlplane.loadgen import ClientResult


def _result(sent: float, e2e: float | None, tokens: int, ok: bool = True) -> ClientResult:
    return ClientResult("t" * 32, ok, sent, 0.01 if ok else None, e2e, tokens, None if ok else "HTTP 500: boom")


def _block(index: int, pair: int, arm: str, tok_s: float, req_s: float, cpu_s: float | None = None) -> Block:
    assert arm in (WITH, WITHOUT)
    return Block(index, pair, WITH if arm == WITH else WITHOUT, 10, 100, 1.0, tok_s, req_s, None, 0, cpu_s)


def test_blocks_alternate_abba_with_each_pair_adjacent() -> None:
    order = block_order(4)
    assert [arm for _, arm in order] == [WITH, WITHOUT, WITHOUT, WITH, WITH, WITHOUT, WITHOUT, WITH]
    assert [pair for pair, _ in order] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_every_pair_holds_one_block_of_each_arm_and_each_arm_leads_every_other_pair() -> None:
    order = block_order(5)
    for pair in range(5):
        assert sorted(arm for p, arm in order if p == pair) == sorted([WITH, WITHOUT])
    leaders = [order[2 * i][1] for i in range(5)]
    assert leaders == [WITH, WITHOUT, WITH, WITHOUT, WITH]


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        block_order(0)


def test_block_wall_time_runs_from_the_first_send_to_the_last_completion() -> None:
    # The last to finish is not the last sent: wall = max(sent + e2e) - min(sent) = (100.5 + 3.5) - 100.0.
    fig = block_figures([_result(100.0, 2.0, 30), _result(100.5, 3.5, 50), _result(101.0, 1.0, 20)])
    assert fig.wall_s == pytest.approx(4.0)
    assert fig.output_tokens == 100
    assert fig.requests == 3
    assert fig.tokens_per_s == pytest.approx(25.0)
    assert fig.requests_per_s == pytest.approx(0.75)


def test_a_block_with_a_failed_request_is_refused_with_its_error() -> None:
    with pytest.raises(ValueError, match=r"1 of 2 requests failed, e\.g\. HTTP 500: boom"):
        block_figures([_result(0.0, 1.0, 10), _result(0.0, None, 0, ok=False)])


def test_an_empty_block_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one request"):
        block_figures([])


def test_spread_reports_median_extremes_and_relative_spread() -> None:
    s = spread([90.0, 110.0, 100.0, 105.0])
    assert (s.n, s.median, s.min, s.max) == (4, 102.5, 90.0, 110.0)
    assert s.rel_spread == pytest.approx(20.0 / 102.5)


def test_paired_loss_is_positive_when_the_instrumented_server_is_slower() -> None:
    assert paired_losses([98.0, 100.0, 103.0], [100.0, 100.0, 100.0]) == pytest.approx([0.02, 0.0, -0.03])


def test_pairs_must_match_in_number() -> None:
    with pytest.raises(ValueError, match="got 2 and 3"):
        paired_losses([1.0, 2.0], [1.0, 2.0, 3.0])


def test_a_reference_block_without_throughput_is_refused() -> None:
    with pytest.raises(ValueError, match="no throughput"):
        paired_losses([1.0], [0.0])


def test_bootstrap_interval_holds_the_median_and_stays_within_the_data() -> None:
    values = [0.01, -0.02, 0.03, 0.005, 0.015, -0.01]
    lo, hi = bootstrap_median(values)
    assert min(values) <= lo <= 0.0075 <= hi <= max(values)  # 0.0075: the sample median
    assert lo < hi


def test_bootstrap_interval_is_wider_for_more_dispersed_losses() -> None:
    tight = bootstrap_median([0.01, 0.011, 0.009, 0.0105, 0.0095, 0.01])
    wide = bootstrap_median([0.01, 0.05, -0.03, 0.04, -0.02, 0.01])
    assert wide[1] - wide[0] > 5 * (tight[1] - tight[0])


def test_bootstrap_of_identical_losses_is_a_point_and_is_repeatable() -> None:
    assert bootstrap_median([0.004] * 5) == (0.004, 0.004)
    values = [0.01, -0.02, 0.03, 0.005]
    assert bootstrap_median(values, seed=7) == bootstrap_median(values, seed=7)


def test_bootstrap_rejects_a_level_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        bootstrap_median([0.1, 0.2], level=95)


def test_loss_is_the_median_pair_with_its_extremes() -> None:
    x = loss([99.0, 95.0, 100.0], [100.0, 100.0, 100.0])
    assert x.point == pytest.approx(0.01)
    assert x.min == pytest.approx(0.0) and x.max == pytest.approx(0.05) and x.pairs == 3
    assert x.lo <= x.point <= x.hi


@pytest.mark.parametrize(("lo", "hi", "want"), [
    (-0.01, 0.02, "met"),  # the whole interval within 2%, the edge included
    (0.021, 0.05, "not met"),  # the whole interval past 2%
    (0.0, 0.03, "inconclusive"),  # straddles the target
])
def test_verdict_needs_the_whole_interval_on_one_side_of_the_target(lo: float, hi: float, want: str) -> None:
    assert verdict(Loss((lo + hi) / 2, lo, hi, lo, hi, 3), target=0.02) == want


def test_summary_compares_each_pairs_two_arms_not_alternate_blocks_of_the_run() -> None:
    # Run order AB BA AB: taking every other block as "with" would set pair 1's reference against its traced
    # block the wrong way round (a -1.5% loss) and put the verdict's interval in the wrong place.
    blocks = [
        _block(0, 0, WITH, 99.0, 9.9), _block(1, 0, WITHOUT, 100.0, 10.0),
        _block(2, 1, WITHOUT, 50.0, 5.0), _block(3, 1, WITH, 49.25, 4.925),
        _block(4, 2, WITH, 198.0, 19.8), _block(5, 2, WITHOUT, 200.0, 20.0),
    ]
    s = summarise(blocks)
    tok = s["tokens_per_s"]
    assert tok.loss.point == pytest.approx(0.01)
    assert tok.loss.min == pytest.approx(0.01) and tok.loss.max == pytest.approx(0.015)
    assert tok.with_plane.median == 99.0 and tok.without_plane.median == 100.0
    assert s["requests_per_s"].loss.point == pytest.approx(0.01)
    assert tok.verdict == "met"


def test_cpu_cost_is_summarised_as_requests_per_server_cpu_second_only_when_every_block_has_it() -> None:
    # Pairs of 10 requests: the instrumented server spent 0.105 s of CPU where the reference spent 0.100 s.
    blocks = [_block(i, i // 2, WITH if i % 2 == 0 else WITHOUT, 100.0, 10.0, 0.105 if i % 2 == 0 else 0.100)
              for i in range(6)]
    cpu = summarise(blocks)["requests_per_cpu_s"]
    assert cpu.with_plane.median == pytest.approx(10 / 0.105)
    assert cpu.loss.point == pytest.approx(1 - 0.100 / 0.105)  # ~4.8 %: more CPU per request, fewer per CPU second
    assert cpu.verdict == "not met"
    blind = blocks[:-1] + [_block(5, 2, WITHOUT, 100.0, 10.0, None)]
    assert "requests_per_cpu_s" not in summarise(blind)
