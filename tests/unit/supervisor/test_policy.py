"""The supervisor's pure rules: back-off, crash loops, liveness, scale-down victims, slots, names."""

from __future__ import annotations

from controlplane.supervisor import policy
from controlplane.supervisor.policy import ReplicaView, RestartRules

RULES = RestartRules(backoff_initial_s=5, backoff_max_s=60, crashloop_restarts=5, crashloop_window_s=600)


def _crash_n_times(n: int, every_s: float) -> list[policy.RestartDecision]:
    history: tuple[float, ...] = ()
    out = []
    for i in range(n):
        d = policy.on_crash(history, 1000 + i * every_s, RULES)
        history = d.crash_times
        out.append(d)
    return out


def test_restart_delay_doubles_from_the_initial_delay_and_is_capped() -> None:
    rules = RestartRules(backoff_initial_s=5, backoff_max_s=30, crashloop_restarts=10, crashloop_window_s=600)
    history: tuple[float, ...] = ()
    delays = []
    for i in range(6):
        d = policy.on_crash(history, 100.0 + i, rules)
        history = d.crash_times
        delays.append(d.delay_s)
    assert delays == [5, 10, 20, 30, 30, 30]


def test_the_fifth_crash_within_the_window_is_a_crash_loop() -> None:
    decisions = _crash_n_times(5, every_s=10)
    assert [d.action for d in decisions] == ["restart"] * 4 + ["crashloop"]
    assert decisions[-1].recent_crashes == 5


def test_crashes_older_than_the_window_are_forgotten() -> None:
    decisions = _crash_n_times(8, every_s=200)  # never more than 4 inside 600 s
    assert all(d.action == "restart" for d in decisions)
    assert decisions[-1].recent_crashes == 4  # this one and the three within 600 s


def test_a_stable_run_starts_the_back_off_again_from_the_initial_delay() -> None:
    first = policy.on_crash((), 0.0, RULES)
    later = policy.on_crash(first.crash_times, 5000.0, RULES)
    assert later.delay_s == RULES.backoff_initial_s


def test_liveness_needs_consecutive_failures_and_one_success_resets() -> None:
    failures = 0
    verdicts = []
    for ok in (False, False, True, False, False, False):
        v = policy.on_probe(failures, ok, threshold=3)
        failures = v.failures
        verdicts.append(v.dead)
    assert verdicts == [False, False, False, False, False, True]


def test_scale_down_drains_non_ready_replicas_first_then_the_least_busy() -> None:
    views = [
        ReplicaView("a", policy.READY, 0, outstanding=5, started_unix_s=1),
        ReplicaView("b", policy.READY, 1, outstanding=1, started_unix_s=2),
        ReplicaView("c", policy.STARTING, 2, outstanding=0, started_unix_s=3),
        ReplicaView("d", policy.DRAINING, 3, outstanding=0, started_unix_s=4),
        ReplicaView("e", policy.CRASHLOOP, 4, outstanding=0, started_unix_s=0),
    ]
    assert policy.scale_down_victims(views, 1) == ["e"]
    assert policy.scale_down_victims(views, 3) == ["e", "c", "b"]
    assert "d" not in policy.scale_down_victims(views, 10)  # already draining


def test_ties_remove_the_newest_replica() -> None:
    views = [ReplicaView("old", policy.READY, 0, 0, 10.0), ReplicaView("new", policy.READY, 1, 0, 20.0)]
    assert policy.scale_down_victims(views, 1) == ["new"]


def test_slots_are_reused_lowest_first_and_names_never_are() -> None:
    assert policy.free_slot([0, 2], 4) == 1
    assert policy.free_slot([0, 1], 2) is None
    assert policy.next_replica_name("tiny", []) == "tiny-0"
    assert policy.next_replica_name("tiny", ["tiny-0", "tiny-7", "tinyx-9", "other-3"]) == "tiny-8"
