"""The simulated engine's live step loop: the simulator's vLLM V1 scheduler run against a real clock.

Requests arriving over HTTP are batched, chunked, preempted and answered at the times the step-cost
model says a GPU replica would answer them. Times here are *simulated seconds* since the engine
started (the wall clock times `speedup`). Each arrival is stamped with the simulated time it reaches
the engine, and before it is queued the engine runs every step that starts before it: exactly what
`simulate()` does with a recorded workload, so replaying the arrivals this engine saw gives back its
latencies (the tests hold them equal). Tokens are released when the clock passes the end of the step
that produced them; if the host lags, they are released late, but the simulated times stay exact.

Not simulated: a client that disconnects does not free its request's slot early (it runs to its
end and is counted as aborted), and the simulated model never stops before max_tokens (no EOS; a stop
string found in its fixed text is turned into a shorter max_tokens before the request is queued).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator_engine import FastEngine
from controlplane.tuning.simulator_parts import Book


@dataclass(frozen=True)
class RequestInfo:
    """What the engine carries for the telemetry of a request, untouched."""

    request_id: str
    max_tokens_param: int | None = None  # as vLLM resolves it: the client's, else max_model_len - prompt
    temperature: float | None = None  # as resolved: the client's, else 1.0 (vLLM's default)
    top_p: float | None = None
    n: int | None = None
    trace_headers: Mapping[str, str] = field(default_factory=dict)  # W3C traceparent / tracestate


@dataclass(frozen=True)
class Timing:
    """A finished request's phases in simulated seconds, defined as vLLM defines them."""

    arrival_s: float
    scheduled_s: float
    first_token_s: float
    finished_s: float
    prompt_tokens: int
    completion_tokens: int
    preemptions: int

    @property
    def queue_s(self) -> float:
        return self.scheduled_s - self.arrival_s

    @property
    def prefill_s(self) -> float:
        return self.first_token_s - self.scheduled_s

    @property
    def decode_s(self) -> float:
        return self.finished_s - self.first_token_s

    @property
    def inference_s(self) -> float:
        return self.finished_s - self.scheduled_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        steps = self.completion_tokens - 1
        return self.decode_s / steps if steps > 0 else None


@dataclass(frozen=True)
class Tokens:
    """`count` more output tokens, the last produced at simulated time `at_s`."""

    count: int
    at_s: float


@dataclass(frozen=True)
class Finished:
    timing: Timing


Event = Tokens | Finished


class LiveRequest:
    """One request in the live engine; `events` is what its HTTP handler reads."""

    __slots__ = ("info", "slot", "arrival_s", "prompt_tokens", "max_tokens", "emitted", "last_token_s", "events",
                 "aborted", "finish_reason")

    def __init__(self, info: RequestInfo, slot: int, arrival_s: float, prompt_tokens: int, max_tokens: int) -> None:
        self.info = info
        self.slot = slot
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.emitted = 0
        self.last_token_s = math.nan
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.aborted = False  # the client went away; the engine still runs it to its end
        self.finish_reason = "length"  # "stop" when a stop string ends it at max_tokens (see sim_api)


class Observer(Protocol):
    """Telemetry: told of every released token batch and every finished request."""

    def tokens(self, req: LiveRequest, count: int, first: bool, itl_s: float | None, itl_count: int) -> None:
        """`count` new tokens of `req` (`first`: the first among them); `itl_count` inter-token gaps of
        `itl_s` each (the mean, when one pass released several tokens)."""

    def finished(self, req: LiveRequest, timing: Timing) -> None: ...


@dataclass(frozen=True)
class Occupancy:
    running: int
    waiting: int
    kv_usage_ratio: float
    preemptions: int


class LiveEngine:
    """One simulated replica. `submit` adds a request; `step` runs one pass of the loop at the current
    time (pure but for the injected clock, so tests drive it with a fake one); `run` loops forever."""

    def __init__(self, replica: ReplicaModel, *, speedup: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 observer: Observer | None = None) -> None:
        if not speedup > 0 or not math.isfinite(speedup):
            raise ValueError(f"speedup must be a finite number > 0, got {speedup}")
        self.replica = replica
        self.speedup = speedup
        self.observer = observer
        self.book = Book([], [])
        self.engine = FastEngine(replica, self.book, 0, None)
        # Nothing asks the engine how many are in flight at a past time, so its finish times need not be kept:
        # a deque of length 0 drops them (a replica serving for days would otherwise keep one float per request).
        self.engine.fins = deque(maxlen=0)
        self._clock = clock
        self._t0 = clock()
        self._unix0 = wall_clock()
        self._pending: deque[LiveRequest] = deque()
        self._live: dict[int, LiveRequest] = {}
        self._free: list[int] = []
        self._last_arrival_s = 0.0
        self._wake = asyncio.Event()
        # Wall-clock seconds between the end of a step and the release of its tokens, at worst: how far
        # the host fell behind the simulated clock (it delays what clients see, never the simulated times).
        self.max_release_lag_s = 0.0

    # --- time -----------------------------------------------------------------------------------
    def now_s(self) -> float:
        return (self._clock() - self._t0) * self.speedup

    def unix_at(self, sim_s: float) -> float:
        """The wall-clock time at which the engine's clock reads `sim_s`."""
        return self._unix0 + sim_s / self.speedup

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, info: RequestInfo, prompt_tokens: int, max_tokens: int) -> LiveRequest:
        """Stamp the arrival now and queue it for the next pass. The caller has checked the lengths
        (the HTTP layer answers 400 with vLLM's wording); here a bad one is a programming error."""
        if prompt_tokens < 1 or max_tokens < 1 or prompt_tokens + max_tokens > self.replica.max_model_len:
            raise ValueError(f"prompt {prompt_tokens} + max_tokens {max_tokens} must be >= 2 and <= max_model_len "
                             f"{self.replica.max_model_len}")
        t = max(self.now_s(), self._last_arrival_s)
        self._last_arrival_s = t
        slot = self.book.add(prompt_tokens, max_tokens, self._free.pop() if self._free else None)
        req = LiveRequest(info, slot, t, prompt_tokens, max_tokens)
        self._pending.append(req)
        self._wake.set()
        return req

    def occupancy(self) -> Occupancy:
        running, waiting, kv_usage = self.engine.snapshot()
        return Occupancy(running, waiting + len(self._pending), kv_usage, self.engine.preemptions)

    @property
    def in_flight(self) -> int:
        return len(self._live) + len(self._pending)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> float | None:
        """Release the tokens of steps that have ended, queue the arrivals, start the steps that are due.
        Returns the simulated time of the next pass, or None when idle (until the next arrival)."""
        now = self.now_s()
        eng = self.engine
        if now >= eng.clock:
            self._release(now)
        while self._pending:
            req = self._pending.popleft()
            eng.advance(req.arrival_s, True)  # the steps that started before it arrived
            accepted = eng.enqueue(req.slot, req.arrival_s)
            assert accepted, "submit() checked the length against max_model_len"
            self._live[req.slot] = req
        eng.advance(now, True)  # every step that starts before now; the last one may end after now
        if eng.clock > now:
            return eng.clock
        self._release(now)
        return now if eng.busy() else None

    def _release(self, now: float) -> None:
        """Hand every request the tokens its committed steps produced (all of them ended by now)."""
        eng, book, end = self.engine, self.book, self.engine.clock
        done: list[int] = []
        if self._live:
            self.max_release_lag_s = max(self.max_release_lag_s, (now - end) / self.speedup)
        for slot, req in self._live.items():
            new = eng.generated(slot) - req.emitted
            if new <= 0:
                continue
            fin = book.t_fin[slot]
            finished = fin == fin  # not NaN
            at = fin if finished else end
            first = req.emitted == 0
            if first:
                req.last_token_s = book.t_first[slot]
            itl_count = new - 1 if first else new
            if self.observer is not None:
                itl = (at - req.last_token_s) / itl_count if itl_count else None
                self.observer.tokens(req, new, first, itl, itl_count)
            req.emitted += new
            req.last_token_s = at
            req.events.put_nowait(Tokens(new, at))
            if finished:
                timing = Timing(req.arrival_s, book.t_sched[slot], book.t_first[slot], fin, req.prompt_tokens,
                                req.emitted, book.preempt[slot])
                if self.observer is not None:
                    self.observer.finished(req, timing)
                req.events.put_nowait(Finished(timing))
                done.append(slot)
        for slot in done:
            del self._live[slot]
            self._free.append(slot)

    async def run(self) -> None:
        """Pass after pass: sleep until the step in flight ends, or until an arrival when idle."""
        while True:
            self._wake.clear()
            nxt = self.step()
            if nxt is None:
                await self._wake.wait()
            else:
                await asyncio.sleep(max(0.0, (nxt - self.now_s()) / self.speedup))
