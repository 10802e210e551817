"""The log-bucket sketch: quantiles within 1% of exact on skewed data, exact merge, exact threshold bounds."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.slo import sketch as sk


def _skewed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    body = rng.lognormal(-2.5, 1.2, n)  # ~80 ms median, long right tail
    tail = rng.pareto(1.2, n) + 1.0  # heavy tail on 3% of requests
    return np.where(rng.random(n) < 0.03, body * tail * 10, body)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_of_skewed_latencies_are_within_one_percent_of_exact_numpy_quantiles(seed: int) -> None:
    values = _skewed(200_000, seed)
    sketch = sk.LogSketch.of(values)
    for q in (0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        got = sketch.quantile(q)
        assert got is not None
        assert abs(got - exact) / exact <= 0.01, (q, got, exact)
        assert abs(got - exact) / exact <= sk.RELATIVE_ACCURACY + 1e-9, (q, got, exact)


def test_merging_stored_blobs_gives_the_same_sketch_as_all_the_values_at_once() -> None:
    values = _skewed(30_000, 7)
    parts = np.array_split(values, 13)
    merged = sk.LogSketch.merged(sk.LogSketch.of(p).to_blob() for p in parts)
    assert np.array_equal(merged.counts, sk.LogSketch.of(values).counts)
    assert merged.count == values.size


def test_threshold_bounds_always_contain_the_exact_count_and_differ_by_one_bucket_at_most() -> None:
    values = _skewed(50_000, 3)
    sketch = sk.LogSketch.of(values)
    rng = np.random.default_rng(4)
    for threshold in [*rng.uniform(0.001, 2.0, 200), *values[:50]]:  # incl. thresholds equal to a value
        low, high = sketch.count_le(float(threshold))
        exact = int((values <= threshold).sum())
        assert low <= exact <= high
        in_bucket = values[sk.keys_of(values) == sk.key_of(float(threshold))]
        assert high - low == in_bucket.size


def test_zero_and_tiny_values_share_the_zero_bucket_and_nan_is_ignored() -> None:
    sketch = sk.LogSketch.of(np.array([0.0, 0.0, 5e-7, np.nan, 1.0]))
    assert sketch.count == 4
    assert sketch.quantile(0.5) == 0.0
    assert abs((sketch.quantile(1.0) or 0) - 1.0) <= sk.RELATIVE_ACCURACY


def test_an_empty_sketch_has_no_quantiles_and_bad_quantiles_are_refused() -> None:
    assert sk.LogSketch().quantile(0.99) is None
    with pytest.raises(ValueError, match="within"):
        sk.LogSketch.of([1.0]).quantile(1.5)


def test_a_blob_of_an_unknown_format_is_refused_with_its_format_number() -> None:
    blob = bytearray(sk.LogSketch.of([0.1]).to_blob())
    blob[0] = 9
    with pytest.raises(ValueError, match="format 9"):
        sk.decode(bytes(blob))
