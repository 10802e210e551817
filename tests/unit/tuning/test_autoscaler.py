import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from controlplane.tuning import autoscaler as a
from controlplane.tuning.autoscaler import (
    AutoscalerConfig,
    AutoscalerState,
    DecisionRecord,
    Observation,
    ReplicaReading,
    SloAutoscaler,
    decide,
    write_decision,
)
from controlplane.tuning.capacity import FleetCapacity

CAP = FleetCapacity((1, 2, 4), (10.0, 11.0, 12.0), in_flight_per_replica=40.0)
CFG = AutoscalerConfig(CAP, max_replicas=20, startup_s=90.0, interval_s=15.0, target_utilization=0.95)


def obs(rate: float | None, replicas: int, *, ready: int | None = None, running: int | None = 5,
        waiting: int | None = 0, kv: float | None = 0.2, good: float | None = None, finished: int = 0) -> Observation:
    ready = replicas if ready is None else ready
    readings = tuple(ReplicaReading(f"r{i}", running, waiting, kv) for i in range(ready))
    return Observation("chat", replicas, ready, rate, readings, slo_good_ratio=good, finished=finished)


def run(rates: Sequence[float | None], replicas: int, cfg: AutoscalerConfig = CFG, **kw: Any) -> list[a.Decision]:
    """Step the policy every interval, applying each decision as the supervisor would."""
    state, out = AutoscalerState(), []
    for k, r in enumerate(rates):
        d, state = decide(obs(r, replicas, **kw), cfg, state, (k + 1) * cfg.interval_s)
        out.append(d)
        replicas = d.desired_replicas
    return out


def test_a_steady_load_is_served_by_the_fewest_replicas_at_the_target_utilization() -> None:
    decisions = run([100.0] * 3, 4)
    # 100 req/s at 0.95 of 12 req/s per replica (fleets of >= 4): ceil(100 / 11.4) = 9
    assert decisions[0].reason == a.SCALE_UP_FORECAST and decisions[0].desired_replicas == 9
    assert [d.reason for d in decisions[1:]] == [a.HOLD_STEADY, a.HOLD_STEADY]
    assert decisions[0].inputs["load_rps"] == pytest.approx(100.0)


def test_unknown_readings_never_scale_down_and_say_so() -> None:
    # The load fell to almost nothing, but every interval some reading is missing.
    for missing in ("rate", "running", "waiting", "kv", "ready"):
        state = AutoscalerState()
        _, state = decide(obs(100.0, 9), CFG, state, 0.0)
        for k in range(1, 40):
            o = obs(1.0, 9)
            if missing == "rate":
                o = replace(o, arrival_rate_rps=None)
            elif missing == "ready":
                o = replace(o, ready_replicas=None)
            else:
                first = o.readings[0]
                blank = {"running": replace(first, num_running=None), "waiting": replace(first, num_waiting=None),
                         "kv": replace(first, kv_usage_ratio=None)}[missing]
                o = replace(o, readings=(blank,) + o.readings[1:])
            d, state = decide(o, CFG, state, k * 15.0)
            assert d.desired_replicas >= 9, missing
            assert d.reason == a.HOLD_UNKNOWN, (missing, d.reason)


def test_random_gaps_in_the_data_never_lower_the_count_on_an_interval_with_a_gap() -> None:
    rng = random.Random(7)
    state, n = AutoscalerState(), 10
    for k in range(400):
        rate = rng.choice([None, rng.uniform(0, 150)])
        o = obs(rate, n, running=rng.choice([None, 3]), kv=rng.choice([None, 0.1, 0.5]))
        d, state = decide(o, CFG, state, k * 15.0)
        gap = rate is None or any(not r.known for r in o.readings)
        if gap:
            assert d.desired_replicas >= n
        n = d.desired_replicas


def test_a_scale_down_waits_one_lead_time_then_follows_the_highest_want_of_that_window() -> None:
    decisions = run([100.0] * 2 + [30.0] * 14, 9)
    reasons = [d.reason for d in decisions]
    assert a.SCALE_DOWN_SPARE in reasons
    first = reasons.index(a.SCALE_DOWN_SPARE)
    down_since = next(i for i, r in enumerate(reasons) if r == a.HOLD_DOWNSCALE_DELAY)
    assert (first - down_since) * 15.0 >= CFG.down_delay_s == 105.0
    assert decisions[first].desired_replicas < 9
    assert all(d.desired_replicas == 9 for d in decisions[:first])


def test_the_scale_down_delay_counts_known_data_only() -> None:
    # The load falls; then the router's count and every scrape fail for 90 s. Those 90 s are not evidence that
    # fewer replicas would do: the delay waits for a full 105 s of known intervals, and the stabilisation
    # window holds the wants of those intervals, not of one known interval after the gap.
    state = AutoscalerState()
    for k in range(4):
        _, state = decide(obs(100.0, 9), CFG, state, k * 15.0)
    t = 60.0
    d, state = decide(obs(30.0, 9), CFG, state, t)
    assert d.reason == a.HOLD_DOWNSCALE_DELAY
    for _ in range(6):
        t += 15.0
        d, state = decide(replace(obs(None, 9, running=None), arrival_rate_rps=None), CFG, state, t)
        assert d.reason == a.HOLD_UNKNOWN and d.desired_replicas == 9
    reasons = []
    while len(reasons) < 12 and (not reasons or reasons[-1] != a.SCALE_DOWN_SPARE):
        t += 15.0
        d, state = decide(obs(30.0, 9), CFG, state, t)
        reasons.append(d.reason)
    assert reasons[-1] == a.SCALE_DOWN_SPARE
    # one known interval before the gap, and 7 after: 8 intervals 15 s apart span the 105 s delay
    assert len(reasons) == 7 and d.inputs["wanted_for_s"] == 105.0
    assert len(state.down_wants) == 8 and state.down_wants[0][0] == 60.0


def test_a_load_between_the_two_utilizations_holds_by_hysteresis() -> None:
    # 44 req/s: 4 replicas (48 req/s) would run at 0.92, under the 0.95 target, but over the 0.9 a scale-down
    # needs: 5 replicas stay.
    decisions = run([44.0] * 3, 5)
    assert decisions[-1].reason == a.HOLD_HYSTERESIS and decisions[-1].desired_replicas == 5
    assert decisions[-1].inputs["want_up"] == 4 and decisions[-1].inputs["want_down"] == 5


def test_removing_replicas_is_refused_when_the_load_seen_now_would_overflow_the_rest() -> None:
    # The forecast says 2 replicas, but the 9 replicas hold 35 requests each in flight right now.
    decisions = run([15.0] * 12, 9, running=35)
    assert decisions[-1].reason == a.HOLD_N_MINUS_1 and decisions[-1].desired_replicas == 9
    assert "in flight" in str(decisions[-1].inputs["unsafe"])


def test_observed_slo_trouble_scales_up_at_once_even_with_an_upscale_delay() -> None:
    cfg = replace(CFG, upscale_delay_s=60.0)
    state = AutoscalerState()
    _, state = decide(obs(30.0, 4), cfg, state, 0.0)
    d, state = decide(obs(30.0, 4, good=0.9, finished=500), cfg, state, 15.0)  # burning 10x the budget
    assert d.desired_replicas == 4  # one interval of it is the transient of a step
    d, state = decide(obs(30.0, 4, good=0.9, finished=500), cfg, state, 15.0)
    assert d.reason == a.SCALE_UP_SLO_RISK and d.desired_replicas == 5  # +max(1, ceil(0.25 * 4))
    # While the replica it asked for is starting, more trouble does not add more.
    d, state = decide(obs(30.0, 5, ready=4, good=0.9, finished=500), cfg, state, 30.0)
    assert d.reason == a.HOLD_STARTING and d.desired_replicas == 5
    # A few bad requests among few finished are noise, not risk.
    d, _ = decide(obs(30.0, 5, good=0.9, finished=10), cfg, state, 45.0)
    assert d.reason != a.SCALE_UP_SLO_RISK


def test_a_queue_building_on_the_replicas_is_risk() -> None:
    d, state = decide(obs(30.0, 4, waiting=20), CFG, AutoscalerState(), 0.0)
    d, _ = decide(obs(30.0, 4, waiting=20), CFG, state, 15.0)
    assert d.reason == a.SCALE_UP_SLO_RISK and d.desired_replicas == 5


def test_a_forecast_scale_up_waits_out_the_upscale_delay() -> None:
    cfg = replace(CFG, upscale_delay_s=30.0)
    decisions = run([100.0] * 4, 4, cfg)
    assert [d.reason for d in decisions[:3]] == [a.HOLD_UPSCALE_DELAY, a.HOLD_UPSCALE_DELAY, a.SCALE_UP_FORECAST]


def test_the_count_stays_within_the_bounds() -> None:
    decisions = run([1000.0] * 2, 20)
    assert decisions[0].reason == a.HOLD_AT_MAX and decisions[0].desired_replicas == 20
    d, _ = decide(obs(10.0, 25), CFG, AutoscalerState(), 0.0)
    assert d.reason == a.SCALE_TO_BOUNDS and d.desired_replicas == 20
    d, _ = decide(obs(0.0, 1), replace(CFG, min_replicas=2), AutoscalerState(), 0.0)
    assert d.reason == a.SCALE_TO_BOUNDS and d.desired_replicas == 2


def test_a_ramp_is_met_ahead_by_one_lead_time() -> None:
    rates = [20.0 + 0.1 * 15 * k for k in range(50)]  # +0.1 req/s each second
    state, n = AutoscalerState(), 3
    for k, r in enumerate(rates):
        d, state = decide(obs(r, n), CFG, state, (k + 1) * 15.0)
        n = d.desired_replicas
    # The level lags the ramp by one interval (EWMA, alpha 0.5); the trend adds the lead time.
    assert d.inputs["load_rps"] == pytest.approx(rates[-1] + 0.1 * (105 - 15), rel=1e-6)
    assert n >= CAP.replicas_for(rates[-1] + 0.1 * 90, CFG.target_utilization)


def test_a_decision_is_recorded_through_the_injected_writer() -> None:
    calls: list[tuple[str, str, Mapping[str, Any]]] = []
    d, _ = decide(obs(100.0, 4), CFG, AutoscalerState(), 0.0)
    rec = DecisionRecord(1_700_000_000.0, "chat", "controlplane", 4, d.desired_replicas, d.reason, d.inputs)
    write_decision(lambda kind, reason, attrs: calls.append((kind, reason, attrs)), rec)
    [(kind, reason, attrs)] = calls
    assert kind == a.DECISION_KIND and reason == a.SCALE_UP_FORECAST
    assert attrs["current"] == 4 and attrs["desired"] == 9 and attrs["deployment"] == "chat"
    assert attrs["inputs"]["rate_rps"] == 100.0 and attrs["policy"] == "controlplane"


def test_the_bound_policy_is_the_pure_function() -> None:
    pol = SloAutoscaler(CFG)
    d1, s1 = pol.decide(obs(100.0, 4), pol.initial_state(), 0.0)
    d2, s2 = decide(obs(100.0, 4), CFG, AutoscalerState(), 0.0)
    assert d1 == d2 and s1 == s2 and pol.name == "controlplane"


def test_bad_settings_are_refused_naming_the_rule() -> None:
    with pytest.raises(ValueError, match="scale_down_utilization .* < target_utilization"):
        AutoscalerConfig(CAP, target_utilization=0.8, scale_down_utilization=0.9)
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalerConfig(CAP, min_replicas=5, max_replicas=2)
    assert math.isclose(AutoscalerConfig(CAP, downscale_delay_s=600).down_delay_s, 600)


def test_recent_requests_missing_the_objective_lower_the_utilization_target() -> None:
    state = AutoscalerState()
    for k in range(20):  # 3% bad: burning the 1% budget 3x, under the risk threshold of 4x
        d, state = decide(obs(100.0, 9, good=0.97, finished=300), CFG, state, k * 15.0)
        assert d.reason != a.SCALE_UP_SLO_RISK
    assert d.inputs["utilization_target"] == pytest.approx(0.95 / (1 + 0.05 * (3 - 1)), rel=1e-3)
    assert d.desired_replicas == CAP.replicas_for(100.0, 0.95 / 1.1) > CAP.replicas_for(100.0, 0.95)
    fine = AutoscalerState()
    for k in range(20):
        d, fine = decide(obs(100.0, 9, good=1.0, finished=300), CFG, fine, k * 15.0)
    assert d.inputs["utilization_target"] == 0.95


def test_an_interval_with_a_failed_scrape_pauses_a_scale_down_without_restarting_its_delay() -> None:
    state = AutoscalerState()
    _, state = decide(obs(100.0, 9), CFG, state, 0.0)
    reasons = []
    for k in range(1, 12):
        o = obs(30.0, 9, running=None if k == 5 else 5)  # t=75: one replica's scrape failed
        d, state = decide(o, CFG, state, k * 15.0)
        reasons.append(d.reason)
        if d.desired_replicas < 9:
            break
    assert reasons[4] == a.HOLD_UNKNOWN
    # Wanted from t=15; the delay (105 s of known data) ends at t=135: one interval later than if nothing had
    # failed (t=120), not a whole delay later.
    assert reasons[-1] == a.SCALE_DOWN_SPARE and len(reasons) == 9


# --- the observed-goodput floor ------------------------------------------------------------------------------
PESSIMIST = AutoscalerConfig(FleetCapacity((1, 2, 4), (5.0, 5.0, 5.0), in_flight_per_replica=40.0), max_replicas=8)


def test_a_fleet_seen_serving_the_load_within_the_slo_is_not_scaled_up_by_a_pessimistic_model() -> None:
    # The model says one replica sustains 5 req/s; the one replica is serving 8 req/s, every request good.
    held = run([8.0] * 6, 1, PESSIMIST, good=1.0, finished=120)
    assert [d.reason for d in held] == [a.HOLD_PROVEN] * 6
    assert all(d.desired_replicas == 1 for d in held)
    assert held[-1].inputs["proven_rps_per_replica"] == pytest.approx(8.0)
    # Without that evidence (no finished requests judged) the same load scales up on the model's word.
    blind = run([8.0] * 6, 1, PESSIMIST, finished=0)
    assert blind[0].reason == a.SCALE_UP_FORECAST and blind[0].desired_replicas == 2


def test_the_floor_covers_only_what_was_proven() -> None:
    # Proven at 8 req/s; the load then rises to 12: past the floor, the model decides again.
    decisions = run([8.0, 8.0, 12.0], 1, PESSIMIST, good=1.0, finished=120)
    assert decisions[1].reason == a.HOLD_PROVEN
    assert decisions[2].reason == a.SCALE_UP_FORECAST and decisions[2].desired_replicas > 1


def test_a_burst_onset_proves_only_the_goodput_completed_not_the_arrivals() -> None:
    # The arrivals jumped to 12 req/s, but the requests finishing within the SLO are still 8 req/s' worth
    # (120 in 15 s): nothing above 8 req/s is proven, so the model's scale-up goes ahead.
    [d] = run([12.0], 1, PESSIMIST, good=1.0, finished=120)
    assert d.reason == a.SCALE_UP_FORECAST and d.desired_replicas > 1
    assert d.inputs["proven_rps_per_replica"] == pytest.approx(8.0)


def test_the_goodput_is_over_the_window_the_finished_requests_were_counted_in() -> None:
    # A round that took 20 s (a calibration ran in it): 150 good requests are 7.5 req/s, not 150 / 15 = 10.
    o = replace(obs(10.0, 1, good=1.0, finished=150), finished_window_s=20.0)
    d, _ = decide(o, PESSIMIST, AutoscalerState(), 15.0)
    assert d.inputs["proven_rps_per_replica"] == pytest.approx(7.5)
    d, _ = decide(replace(o, finished_window_s=None), PESSIMIST, AutoscalerState(), 15.0)
    assert d.inputs["proven_rps_per_replica"] == pytest.approx(10.0)


@pytest.mark.parametrize("bad", ["under_objective", "too_few", "queued", "kv_full", "unknown_reading"])
def test_an_interval_proves_nothing_unless_the_slo_held_on_enough_requests_without_queueing(bad: str) -> None:
    kw: dict[str, Any] = {"good": 1.0, "finished": 120}
    if bad == "under_objective":
        kw["good"] = 0.985  # under the 0.99 objective, though not burning fast enough to be risk
    elif bad == "too_few":
        kw["finished"] = 10
    elif bad == "queued":
        kw["waiting"] = 3
    elif bad == "kv_full":
        kw["kv"] = 0.95
    else:
        kw["running"] = None
    first = run([8.0], 1, PESSIMIST, **kw)[0]
    assert first.reason != a.HOLD_PROVEN
    if bad != "unknown_reading":  # an unknown reading does not stop a scale-up, only a scale-down
        assert first.reason == a.SCALE_UP_FORECAST, first.reason


def test_a_proof_expires_after_its_window() -> None:
    cfg = replace(PESSIMIST, proven_window_s=60.0)
    state = AutoscalerState()
    d, state = decide(obs(8.0, 1, good=1.0, finished=120), cfg, state, 15.0)
    assert d.reason == a.HOLD_PROVEN
    d, state = decide(obs(8.0, 1, good=None, finished=0), cfg, state, 60.0)  # 45 s later: still proven
    assert d.reason == a.HOLD_PROVEN
    d, state = decide(obs(8.0, 1, good=None, finished=0), cfg, state, 90.0)  # 75 s later: expired
    assert d.reason == a.SCALE_UP_FORECAST


def test_observed_trouble_overrides_the_floor() -> None:
    state = AutoscalerState()
    _, state = decide(obs(8.0, 1, good=1.0, finished=120), PESSIMIST, state, 15.0)
    for k in range(2, 4):  # two intervals burning the budget 50x
        d, state = decide(obs(8.0, 1, good=0.5, finished=120), PESSIMIST, state, k * 15.0)
    assert d.reason == a.SCALE_UP_SLO_RISK and d.desired_replicas >= 2


def test_the_floor_needs_a_positive_window() -> None:
    with pytest.raises(ValueError, match="proven_window_s"):
        replace(PESSIMIST, proven_window_s=0.0)


def test_a_pause_in_known_data_longer_than_the_downscale_delay_starts_the_delay_over() -> None:
    cfg = AutoscalerConfig(capacity=FleetCapacity((1,), (10.0,)), max_replicas=8)
    known = Observation("d", 4, 4, 5.0, tuple(ReplicaReading(f"r{i}", 1, 0, 0.1) for i in range(4)))
    unknown = Observation("d", 4, 4, None, tuple(ReplicaReading(f"r{i}") for i in range(4)))
    st, t = AutoscalerState(), 0.0
    for _ in range(6):  # 90 s of known, light load: wanting fewer
        t += 15
        d, st = decide(known, cfg, st, t)
    for _ in range(41):  # 10 min 15 s without readings (longer than down_blackout_s)
        t += 15
        d, st = decide(unknown, cfg, st, t)
    assert d.reason == a.HOLD_UNKNOWN
    for _ in range(2):
        t += 15
        d, st = decide(known, cfg, st, t)
        assert d.desired_replicas == 4 and d.reason == a.HOLD_DOWNSCALE_DELAY  # not on 30 s of data after the gap
    while d.desired_replicas == 4:  # a whole delay of known data again, then down
        t += 15
        d, st = decide(known, cfg, st, t)
    assert t >= 41 * 15 + 6 * 15 + cfg.down_delay_s and d.reason == a.SCALE_DOWN_SPARE


@pytest.mark.parametrize("gap", ["no_rounds", "clock_back"])
def test_time_without_decisions_or_a_clock_stepped_back_starts_the_downscale_delay_over(gap: str) -> None:
    # Rounds that failed for an hour (or a deployment held at 0) call decide() not at all: that hour is as
    # unknown as an hour of failed scrapes, and the first known interval after it must not finish the delay.
    cfg = AutoscalerConfig(capacity=FleetCapacity((1,), (10.0,)), max_replicas=8)
    known = Observation("d", 4, 4, 5.0, tuple(ReplicaReading(f"r{i}", 1, 0, 0.1) for i in range(4)))
    st, t = AutoscalerState(), 0.0
    for _ in range(7):  # 105 s of known, light load: wanting fewer
        t += 15
        d, st = decide(known, cfg, st, t)
    assert d.reason == a.HOLD_DOWNSCALE_DELAY
    t += 3600.0 if gap == "no_rounds" else -3600.0
    d, st = decide(known, cfg, st, t)
    assert d.desired_replicas == 4 and d.reason == a.HOLD_DOWNSCALE_DELAY and d.inputs["wanted_for_s"] == 0.0
    for _ in range(5):  # and it runs on from there: a whole delay of known data again, then down
        t += 15
        d, st = decide(known, cfg, st, t)
    assert d.reason == a.HOLD_DOWNSCALE_DELAY and d.inputs["wanted_for_s"] == 75.0


def test_shorter_pauses_and_slow_rounds_only_pause_the_downscale_delay() -> None:
    # A large fleet where some scrape fails in most intervals, and rounds that take longer than the interval,
    # must still scale down: only a long run of unknown intervals starts the delay over.
    cfg = AutoscalerConfig(capacity=FleetCapacity((1,), (10.0,)), max_replicas=8, startup_s=0.0)
    known = Observation("d", 4, 4, 5.0, tuple(ReplicaReading(f"r{i}", 1, 0, 0.1) for i in range(4)))
    unknown = Observation("d", 4, 4, None, tuple(ReplicaReading(f"r{i}") for i in range(4)))
    st, t, reasons = AutoscalerState(), 0.0, []
    for k in range(40):
        t += 15.05  # each round a little late
        d, st = decide(unknown if k % 3 else known, cfg, st, t)  # two of three rounds unknown
        reasons.append(d.reason)
        if d.desired_replicas < 4:
            break
    assert d.reason == a.SCALE_DOWN_SPARE, reasons


def test_rounds_slower_than_the_interval_count_only_their_excess_as_unobserved() -> None:
    # Rounds every 31 s (the interval is 15 s): 19 unknown rounds in 9.8 minutes pause the delay, as 19 unknown
    # rounds at the interval do; they are not taken for a 10-minute blackout of wall-clock time.
    cfg = AutoscalerConfig(capacity=FleetCapacity((1,), (10.0,)), max_replicas=8)
    known = Observation("d", 4, 4, 5.0, tuple(ReplicaReading(f"r{i}", 1, 0, 0.1) for i in range(4)))
    unknown = Observation("d", 4, 4, None, tuple(ReplicaReading(f"r{i}") for i in range(4)))
    st, t = AutoscalerState(), 0.0
    for _ in range(4):
        t += 31.0
        d, st = decide(known, cfg, st, t)
    wanted = d.inputs["wanted_for_s"]
    for _ in range(19):
        t += 31.0
        d, st = decide(unknown, cfg, st, t)
    t += 31.0
    d, st = decide(known, cfg, st, t)
    assert d.inputs["wanted_for_s"] == wanted + cfg.interval_s  # carried on, not started over


def test_no_scale_down_in_an_interval_that_burns_the_budget_even_before_it_counts_as_risk() -> None:
    # 4 replicas for 12 req/s (2 would do): the scale-down delay runs out in quiet intervals, then the SLO burns
    # at 10x for one interval, fewer than the two a risk scale-up needs.
    cfg = replace(CFG, slo_objective=0.99, min_finished=10)
    ends: list[tuple[a.Decision, AutoscalerState]] = []
    for good in (0.999, 0.90):
        state = AutoscalerState()
        for k in range(8):  # the 8th interval ends the scale-down delay
            d, state = decide(obs(12.0, 4, good=good if k == 7 else 0.999, finished=100), cfg, state,
                              (k + 1) * cfg.interval_s)
            assert k == 7 or d.reason == a.HOLD_DOWNSCALE_DELAY, (k, d)
        ends.append((d, state))
    assert (ends[0][0].desired_replicas, ends[0][0].reason) == (2, a.SCALE_DOWN_SPARE)  # quiet to the end
    assert (ends[1][0].desired_replicas, ends[1][0].reason) == (4, a.HOLD_TROUBLE)  # burning at 10x in the last
    # ... and the delay starts over: the next quiet interval does not scale down at once.
    d, _ = decide(obs(12.0, 4, good=0.999, finished=100), cfg, ends[1][1], 9 * cfg.interval_s)
    assert (d.desired_replicas, d.reason) == (4, a.HOLD_DOWNSCALE_DELAY)


def test_a_crash_looping_replica_is_not_counted_as_capacity_for_the_forecast() -> None:
    # 3 replicas, one crash-looping; 28 req/s needs 3 serving ones (capacity ~10 req/s each).
    o = replace(obs(28.0, 3, ready=2), lost_replicas=1)
    cfg = replace(CFG, upscale_delay_s=0.0)
    d, _ = decide(o, cfg, AutoscalerState(), 15.0)
    assert (d.desired_replicas, d.reason) == (4, a.SCALE_UP_FORECAST)
    d, _ = decide(obs(28.0, 3), cfg, AutoscalerState(), 15.0)  # all three serving: enough
    assert (d.desired_replicas, d.reason) == (3, a.HOLD_STEADY)
