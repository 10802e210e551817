"""bench/tune.py's capacity bisection for the measured grid on real vLLM."""

from __future__ import annotations

import pytest

from bench.tune import bisect_capacity


def test_bisection_converges_on_the_highest_rate_meeting_the_objective() -> None:
    true_capacity = 7.3
    tried: list[float] = []

    def attain(rate: float) -> float:
        tried.append(rate)
        return 0.99 if rate <= true_capacity else 0.5

    cap, trials = bisect_capacity(attain, 3.0, 30.0, 6, 0.9)
    assert cap is not None and cap <= true_capacity
    assert cap > true_capacity / (30.0 / 3.0) ** (1 / 2 ** 6) / 1.0001  # within one final step of the truth
    assert [r for r, _ in trials] == tried and len(tried) == 6
    assert tried[0] == pytest.approx((3.0 * 30.0) ** 0.5)  # geometric midpoint first


def test_when_every_midpoint_fails_the_low_end_is_tried_and_may_fail_too() -> None:
    cap, trials = bisect_capacity(lambda r: 0.95 if r <= 3.0 else 0.0, 3.0, 30.0, 3, 0.9)
    assert cap == 3.0 and trials[-1] == (3.0, 0.95)
    cap, trials = bisect_capacity(lambda r: 0.0, 3.0, 30.0, 3, 0.9)
    assert cap is None and len(trials) == 4


def test_a_bad_range_is_refused() -> None:
    with pytest.raises(ValueError, match="lo"):
        bisect_capacity(lambda r: 1.0, 5.0, 5.0, 3, 0.9)
