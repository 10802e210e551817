from collections.abc import Sequence

import numpy as np
import pytest

from controlplane.tuning.forecast import Forecast, ForecastConfig, ForecastState, step

CFG = ForecastConfig()
LEAD = 105.0


def feed(rates: Sequence[float | None], dt: float = 15.0,
         cfg: ForecastConfig = CFG) -> tuple[ForecastState, list[Forecast]]:
    state, out = ForecastState(), []
    for k, r in enumerate(rates):
        state, fc = step(state, r, (k + 1) * dt, LEAD, cfg)
        if fc is not None:
            out.append(fc)
    return state, out


def test_nothing_known_means_no_forecast_and_an_unknown_reading_leaves_the_state_alone() -> None:
    state, out = feed([None, None])
    assert out == [] and state == ForecastState()
    state, out = feed([10.0, None])
    assert len(state.history) == 1 and len(out) == 2 and out[1].level_rps == 10.0


def test_the_level_is_an_ewma_of_the_readings() -> None:
    _, out = feed([10.0, 20.0, 20.0])
    assert [f.level_rps for f in out] == [10.0, 15.0, 17.5]


def test_a_steady_ramp_is_extrapolated_over_the_lead_time() -> None:
    rates = [10.0 + 0.05 * 15 * k for k in range(60)]  # +0.05 req/s every second
    _, out = feed(rates)
    last = out[-1]
    assert last.slope_rps_per_s == pytest.approx(0.05, rel=1e-6)
    assert last.base_rps == pytest.approx(last.level_rps + 0.05 * LEAD)


def test_a_step_is_not_a_trend() -> None:
    for after in (1, 3, 12):  # just after the step, and once it is 3 minutes old
        _, out = feed([20.0] * 40 + [60.0] * after)
        assert out[-1].slope_rps_per_s == pytest.approx(0.0, abs=1e-9), after
        assert out[-1].base_rps == pytest.approx(out[-1].level_rps)


def test_a_falling_load_is_not_forecast_below_its_level() -> None:
    _, out = feed([100.0 - k for k in range(40)])
    assert out[-1].slope_rps_per_s == 0.0 and out[-1].base_rps == out[-1].level_rps


def test_recurring_bursts_are_provisioned_for_from_the_lulls_but_not_stacked_on_a_burst() -> None:
    cycle = [20.0] * 16 + [60.0] * 8  # 4-minute lulls, 2-minute bursts
    rates = cycle * 8
    _, lull = feed(rates + [20.0] * 12)
    _, burst = feed(rates + [20.0] * 16 + [60.0] * 6)
    assert lull[-1].margin_rps == pytest.approx(40.0, abs=2.0)  # the jump a lull has seen, within one lead time
    assert lull[-1].load_rps <= 60.0 * (1 + CFG.peak_slack)  # but not above the height the bursts reached
    assert burst[-1].margin_rps < 0.3 * 40.0  # from the top of a burst the load rose little further


def test_on_noisy_random_bursts_the_forecast_never_passes_their_height_by_more_than_the_trends_rise() -> None:
    # Bursts of 100 req/s over lulls of 40, random lengths (mean 2 and 4 minutes), Poisson counts: the bench's
    # bursty trace in small. Between bursts the trend is sometimes a little above zero by chance; that used to
    # lift the cap off the margin, stacking the lull-to-burst jump on a level still coming down from the last
    # burst (up to 48 req/s over the bursts' height here; 43 replicas where 38 had served in bench/autoscale.py).
    rng = np.random.default_rng(7)
    rates: list[float] = []
    on = False
    while len(rates) < 240:
        n = max(1, round(rng.exponential(120.0 if on else 240.0) / 15))
        rates += (rng.poisson((100.0 if on else 40.0) * 15, size=n) / 15).tolist()
        on = not on
    rates = rates[:240]
    _, out = feed(rates)
    sustained = [float(np.mean(rates[max(0, i - 3):i + 1])) for i in range(len(rates))]  # 60 s at 15 s steps
    # (where the level plus trend is above that height already, nothing is added to it)
    over = [f.load_rps - max(f.base_rps, max(sustained[:k + 1]) * (1 + CFG.peak_slack) + f.slope_rps_per_s * LEAD)
            for k, f in enumerate(out)]
    assert max(over) <= 1e-9, max(over)
    lulls = [f for r, f in zip(rates, out, strict=True) if r < 60.0]
    assert np.median([f.margin_rps for f in lulls[len(lulls) // 2:]]) > 20.0  # bursts still provisioned for


def test_a_load_rising_past_its_old_high_may_pass_it_by_the_trends_rise() -> None:
    rates = [60.0] * 8 + [20.0] * 10 + [20.0 + 3.0 * k for k in range(30)]  # a ramp of 0.2 req/s per s to 107
    _, out = feed(rates)
    last = out[-1]
    assert last.slope_rps_per_s == pytest.approx(0.2, rel=0.05)
    assert last.load_rps >= last.base_rps > rates[-1] + 0.2 * LEAD / 2  # ahead of the ramp, past the old 60


def test_counting_noise_on_a_flat_load_leaves_only_a_small_margin() -> None:
    rng = np.random.default_rng(3)
    rates = (rng.poisson(40 * 15, size=200) / 15).tolist()
    _, out = feed(rates)
    assert out[-1].margin_rps < 0.15 * 40 and out[-1].slope_rps_per_s < 0.01


def test_bad_forecast_settings_are_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="surge_quantile in \\(0, 1\\)"):
        ForecastConfig(surge_quantile=1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        ForecastConfig(sustain_s=0)
