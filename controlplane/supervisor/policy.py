"""Pure decisions of the supervisor: restart back-off, crash loops, liveness, scale-down victims, slots.

No clocks, no I/O: every function takes `now` and returns a value, so the rules are unit-tested
with plain numbers and the supervisor only carries them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

# Replica states. "active" ones count towards the desired number of replicas.
STARTING, READY, UNREADY, CRASHED = "starting", "ready", "unready", "crashed"
DRAINING, STOPPED, CRASHLOOP, FAILED = "draining", "stopped", "crashloop", "failed"
ACTIVE_STATES = frozenset({STARTING, READY, UNREADY, CRASHED})
# A crash-looping replica still holds its place: replacing it would only loop again elsewhere.
COUNTED_STATES = ACTIVE_STATES | {CRASHLOOP}


@dataclass(frozen=True)
class RestartRules:
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    crashloop_restarts: int = 5
    crashloop_window_s: float = 600.0


@dataclass(frozen=True)
class RestartDecision:
    action: Literal["restart", "crashloop"]
    delay_s: float
    recent_crashes: int  # crashes inside the window, this one included
    crash_times: tuple[float, ...]  # the history to keep (inside the window)


def on_crash(history: Sequence[float], now: float, rules: RestartRules) -> RestartDecision:
    """Exponential back-off (initial * 2^(k-1), capped); k crashes within the window -> crash loop.

    Only crashes inside the window count, so a replica that ran well for a while starts again from
    the initial delay (as Kubernetes resets CrashLoopBackOff after a stable run).
    """
    recent = tuple(t for t in history if now - t <= rules.crashloop_window_s) + (now,)
    k = len(recent)
    if k >= rules.crashloop_restarts:
        return RestartDecision("crashloop", 0.0, k, recent)
    delay = min(rules.backoff_initial_s * 2 ** (k - 1), rules.backoff_max_s)
    return RestartDecision("restart", delay, k, recent)


@dataclass(frozen=True)
class Liveness:
    failures: int
    dead: bool


def on_probe(failures: int, ok: bool, threshold: int) -> Liveness:
    """Consecutive failed /health probes; `dead` once `threshold` in a row failed. One success resets."""
    if ok:
        return Liveness(0, False)
    failures += 1
    return Liveness(failures, failures >= threshold)


@dataclass(frozen=True)
class ReplicaView:
    name: str
    state: str
    slot: int
    outstanding: int
    started_unix_s: float


def scale_down_victims(replicas: Iterable[ReplicaView], count: int) -> list[str]:
    """Which replicas to drain when removing `count`: not-ready ones first (they serve nothing),
    then the ready ones with the fewest requests in flight (shortest drain), newest first on ties."""
    order = {CRASHLOOP: 0, CRASHED: 1, STARTING: 2, UNREADY: 3, READY: 4}
    active = [r for r in replicas if r.state in COUNTED_STATES]
    active.sort(key=lambda r: (order[r.state], r.outstanding, -r.started_unix_s, -r.slot))
    return [r.name for r in active[:max(count, 0)]]


def free_slot(used: Iterable[int], limit: int) -> int | None:
    """The lowest replica slot not in use (a slot fixes the port and the CPU cores); None when full."""
    taken = set(used)
    for slot in range(limit):
        if slot not in taken:
            return slot
    return None


def next_replica_name(deployment: str, existing: Iterable[str]) -> str:
    """`<deployment>-<n>` with n one past the highest ever used: names are never reused, so the
    history of one replica in the store is never mixed with another's."""
    prefix = deployment + "-"
    numbers = [int(n[len(prefix):]) for n in existing if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return f"{prefix}{max(numbers, default=-1) + 1}"
