import numpy as np
import pytest

from controlplane.store.repo import Store
from controlplane.tuning.workload import (
    Diurnal,
    Empirical,
    Fixed,
    LogNormal,
    OnOff,
    Poisson,
    Uniform,
    Workload,
    arrival_times,
    from_rows,
    load_trace,
    sample_lengths,
    synthetic,
)


def test_the_same_seed_gives_the_same_workload_and_another_seed_another() -> None:
    a = synthetic(OnOff(20, 1, 5, 5), LogNormal(300, 0.7), Uniform(10, 100), n=500, seed=7)
    b = synthetic(OnOff(20, 1, 5, 5), LogNormal(300, 0.7), Uniform(10, 100), n=500, seed=7)
    c = synthetic(OnOff(20, 1, 5, 5), LogNormal(300, 0.7), Uniform(10, 100), n=500, seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_poisson_gaps_are_exponential_at_the_given_rate() -> None:
    t = arrival_times(Poisson(50.0), np.random.default_rng(1), n=40_000)
    gaps = np.diff(t)
    assert len(t) == 40_000 and gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


def _dispersion(times: np.ndarray, bin_s: float) -> float:
    counts = np.bincount((times // bin_s).astype(int))
    return float(counts.var() / counts.mean())


def test_on_off_arrivals_keep_their_mean_rate_but_come_in_bursts() -> None:
    p = OnOff(on_rps=40, off_rps=2, mean_on_s=5, mean_off_s=5)
    t = arrival_times(p, np.random.default_rng(2), duration_s=4000)
    assert len(t) / 4000 == pytest.approx(p.mean_rps, rel=0.10)
    assert _dispersion(t, 1.0) > 5  # Poisson counts have variance = mean (dispersion 1)
    assert _dispersion(arrival_times(Poisson(21), np.random.default_rng(2), duration_s=4000), 1.0) < 1.3


def test_diurnal_arrivals_follow_the_sinusoid() -> None:
    p = Diurnal(mean_rps=20, amplitude=0.5, period_s=100)
    t = arrival_times(p, np.random.default_rng(3), duration_s=20_000)
    rising = np.sum((t % 100) < 50)  # sin > 0 over the first half period
    # The rate integrates to mean*(1 + 2a/pi) over the first half and mean*(1 - 2a/pi) over the second.
    assert rising / (len(t) - rising) == pytest.approx((1 + 1 / np.pi) / (1 - 1 / np.pi), rel=0.05)
    assert len(t) / 20_000 == pytest.approx(20, rel=0.03)


def test_n_arrivals_or_all_arrivals_within_a_duration_but_not_both() -> None:
    rng = np.random.default_rng(0)
    assert len(arrival_times(Diurnal(10, 0.9, 60), rng, n=321)) == 321
    assert arrival_times(Poisson(10), rng, duration_s=30).max() < 30
    with pytest.raises(ValueError, match="exactly one of n"):
        arrival_times(Poisson(10), rng, n=5, duration_s=5)
    with pytest.raises(ValueError, match="Poisson rate must be > 0"):
        arrival_times(Poisson(0), rng, n=5)
    with pytest.raises(ValueError, match="0 <= amplitude <= 1"):
        arrival_times(Diurnal(10, 1.5), rng, n=5)


def test_length_distributions_stay_in_their_bounds() -> None:
    rng = np.random.default_rng(4)
    assert set(sample_lengths(Fixed(128), 50, rng).tolist()) == {128}
    u = sample_lengths(Uniform(200, 202), 3000, rng)
    assert set(u.tolist()) == {200, 201, 202}
    ln = sample_lengths(LogNormal(median=500, sigma=0.5, low=10, high=2000), 20_000, rng)
    assert np.median(ln) == pytest.approx(500, rel=0.05) and ln.min() >= 10 and ln.max() <= 2000
    assert set(sample_lengths(Empirical((3, 7, 7)), 100, rng).tolist()) <= {3, 7}
    with pytest.raises(ValueError, match="1 <= low <= high"):
        sample_lengths(Uniform(5, 1), 1, rng)


def test_a_workload_refuses_unsorted_arrivals_and_empty_requests() -> None:
    with pytest.raises(ValueError, match="ascending"):
        Workload(np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match=">= 1 prompt and >= 1 output token"):
        Workload(np.array([0.0]), np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="differ in length"):
        Workload(np.array([0.0]), np.array([1, 2]), np.array([3]))


def test_rows_with_unknown_token_counts_are_left_out_and_counted_not_read_as_zero() -> None:
    rows = [{"arrival_unix_s": 105.0, "prompt_tokens": 20, "completion_tokens": 5},
            {"arrival_unix_s": 100.0, "prompt_tokens": 10, "completion_tokens": 3},
            {"arrival_unix_s": 101.0, "prompt_tokens": None, "completion_tokens": 3},
            {"arrival_unix_s": 102.0, "prompt_tokens": 8, "completion_tokens": 0}]
    wl = from_rows(rows)
    assert wl.arrival_s.tolist() == [0.0, 5.0] and wl.prompt_tokens.tolist() == [10, 20]
    assert wl.output_tokens.tolist() == [3, 5] and wl.skipped_rows == 2


def test_a_recorded_trace_is_loaded_from_the_store_for_one_replica_and_window(store: Store) -> None:
    def row(i: int, replica: str, t: float, prompt: int | None) -> dict:  # type: ignore[type-arg]
        return {"replica": replica, "request_id": f"r{i}", "arrival_unix_s": t, "prompt_tokens": prompt,
                "completion_tokens": 4, "trace_id": f"{i:032x}", "span_id": f"{i:016x}"}

    store.write_spans([row(0, "a", 1000.0, 30), row(1, "a", 1002.5, 40), row(2, "b", 1001.0, 50),
                       row(3, "a", 1003.0, None), row(4, "a", 1100.0, 60)], [])
    wl = load_trace(store, replica="a", since_unix_s=1000.0, until_unix_s=1050.0)
    assert wl.arrival_s.tolist() == [0.0, 2.5] and wl.prompt_tokens.tolist() == [30, 40]
    assert wl.skipped_rows == 1 and wl.name == "trace:a"
    assert len(load_trace(store)) == 4
