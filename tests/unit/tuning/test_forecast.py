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
