"""Fakes for driving the simulated engine in tests: a settable clock and a recording observer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from controlplane.engines.sim_engine import LiveEngine, LiveRequest, Observer, Timing


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Recorder:
    """Observer that keeps what the engine reports (and passes it on)."""

    clock: FakeClock
    inner: Observer | None = None
    timings: dict[str, Timing] = field(default_factory=dict)
    finished_reqs: dict[str, LiveRequest] = field(default_factory=dict)
    releases: dict[str, list[tuple[float, int, bool]]] = field(default_factory=dict)  # (clock, count, first)

    def tokens(self, req: LiveRequest, count: int, first: bool, itl_s: float | None, itl_count: int) -> None:
        self.releases.setdefault(req.info.request_id, []).append((self.clock.t, count, first))
        if self.inner:
            self.inner.tokens(req, count, first, itl_s, itl_count)

    def finished(self, req: LiveRequest, timing: Timing) -> None:
        self.timings[req.info.request_id] = timing
        self.finished_reqs[req.info.request_id] = req
        if self.inner:
            self.inner.finished(req, timing)


def run_until(engine: LiveEngine, clock: FakeClock, t_end: float) -> None:
    """Pass after pass, as `run()` sleeps between them, until the next pass is due at or after t_end."""
    while True:
        nxt = engine.step()
        if nxt is None or nxt >= t_end:
            break
        clock.t = nxt if nxt > clock.t else clock.t + 1e-9  # a step starting exactly now runs in the next pass
    if math.isfinite(t_end):
        clock.t = max(clock.t, t_end)
