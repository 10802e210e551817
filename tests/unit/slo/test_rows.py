"""Row rules shared by the rollup and the queries: three-valued goodput, exact bucketing, target keys."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.slo import rows
from controlplane.slo.model import LatencyTarget
from controlplane.slo.rollup import LEVELS_S
from tests.unit.slo.factories import NOW


def test_goodput_is_three_valued_a_known_miss_is_bad_even_when_another_value_is_unknown() -> None:
    nan = float("nan")
    cols = {"ttft_s": np.array([0.1, 0.1, 0.9, nan, nan, 0.1]),
            "tpot_s": np.array([0.01, 0.09, nan, 0.01, 0.09, nan])}
    good, known = rows.good_known(cols, (LatencyTarget("ttft", 0.2), LatencyTarget("tpot", 0.02)))
    assert good.tolist() == [True, False, False, False, False, False]
    assert known.tolist() == [True, True, True, False, True, False]


def test_bucket_starts_agree_with_the_range_comparisons_the_sql_uses() -> None:
    arrivals = np.array([NOW, 1_717_200_000.0, np.nextafter(1_717_200_000.0, 0), 59.999999999])
    for level in LEVELS_S:
        b = rows.bucket_starts(arrivals, level)
        assert np.all((b <= arrivals) & (arrivals < b + level)) and np.all(b % level == 0)


def test_an_unknown_sli_in_a_target_key_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown SLI 'ttfx'"):
        rows.parse_key("ttfx<=0.5")


def test_target_keys_are_canonical_whatever_the_order_of_the_targets() -> None:
    a = rows.target_key([LatencyTarget("tpot", 0.05), LatencyTarget("ttft", 0.5)])
    assert a == rows.target_key([LatencyTarget("ttft", 0.5), LatencyTarget("tpot", 0.05)]) == "tpot<=0.05&ttft<=0.5"
    assert rows.parse_key(a) == (LatencyTarget("tpot", 0.05), LatencyTarget("ttft", 0.5))


def test_a_per_token_target_is_met_by_an_answer_of_one_token_not_left_unknown() -> None:
    nan = float("nan")
    # ttft good/bad x one-token answer / a missing TPOT of a longer answer / unknown length
    cols = {"ttft_s": np.array([0.1, 0.9, 0.1, 0.9, 0.1]),
            "tpot_s": np.array([nan, nan, nan, nan, nan]),
            rows.TOKENS: np.array([1.0, 1.0, 20.0, 20.0, nan])}
    for per_token in ("tpot", "itl"):
        good, known = rows.good_known(cols, (LatencyTarget("ttft", 0.2), LatencyTarget(per_token, 0.02)))
        assert good.tolist() == [True, False, False, False, False]
        assert known.tolist() == [True, True, False, True, False]  # a miss stays bad; a missing TPOT unknown
    # Without the output length (rows written before it was read) the old rule holds.
    del cols[rows.TOKENS]
    good, known = rows.good_known(cols, (LatencyTarget("ttft", 0.2), LatencyTarget("tpot", 0.02)))
    assert good.tolist() == [False] * 5 and known.tolist() == [False, True, False, True, False]


def test_a_request_that_ended_without_a_first_token_after_the_threshold_missed_its_ttft_target() -> None:
    nan = float("nan")
    # no token: aborted after 30 s / failed at once (0.1 s) / e2e unknown; a served request for contrast; and a
    # request that produced 200 tokens but whose TTFT reading is missing (an engine without the attribute)
    cols = {"ttft_s": np.array([nan, nan, nan, 0.1, nan]), "e2e_s": np.array([30.0, 0.1, nan, 2.0, 5.0]),
            "tpot_s": np.array([nan, nan, nan, 0.01, 0.02]), rows.TOKENS: np.array([0.0, 0.0, 0.0, 20.0, 200.0])}
    good, known = rows.good_known(cols, (LatencyTarget("ttft", 0.5),))
    assert good.tolist() == [False, False, False, True, False]
    assert known.tolist() == [True, False, False, True, False]  # the missing reading stays unknown
    good, known = rows.good_known(cols, (LatencyTarget("ttft", 0.5),), as_sketch=True)  # as a sketch counts
    assert known.tolist() == [False, False, False, True, False]
    good, known = rows.good_known(cols, (LatencyTarget("e2e", 60.0),))  # only a TTFT target reads it so
    assert good.tolist() == [True, True, False, True, True]
    # No token is no TPOT to meet either: unknown, not met as a one-token answer is.
    good, known = rows.good_known(cols, (LatencyTarget("tpot", 0.05),))
    assert known.tolist() == [False, False, False, True, True]
