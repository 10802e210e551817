"""Pieces both replica engines share: the per-request book, the scrape-like samples, and the closed-form
sums of a decode stretch's step times (a max of lines in the step index).
"""

from __future__ import annotations

import math
from collections import deque

Line = tuple[float, float]  # a roof along a decode stretch: step k costs A + V*k


class Book:
    """Per-request state shared by all replicas' engines. Plain lists: the hot loops index them one by one."""

    __slots__ = ("prompt", "output", "kk", "g1", "phase", "gfin", "t_sched", "t_first", "t_fin", "preempt")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        n = len(prompt)
        nan = math.nan
        self.prompt, self.output = prompt, output
        self.kk = [0] * n  # output tokens generated as of step g1 (for a waiting request: so far)
        self.g1 = [0] * n
        self.phase = [0] * n  # step-number residue (mod block size) at which it needs a new block
        self.gfin = [-1] * n  # step number at whose end it finishes; -1: not decoding
        self.t_sched = [nan] * n
        self.t_first = [nan] * n
        self.t_fin = [nan] * n
        self.preempt = [0] * n

    def add(self, prompt: int, output: int, slot: int | None = None) -> int:
        """Book one more request and return its index: a new one, or `slot`, the index of a finished request
        to reuse (the live simulated engine books requests as they arrive and recycles finished ones' slots)."""
        if slot is None:
            slot = len(self.prompt)
            for column in (self.prompt, self.output, self.kk, self.g1, self.phase, self.gfin, self.t_sched,
                           self.t_first, self.t_fin, self.preempt):
                column.append(0)
        self.prompt[slot], self.output[slot] = prompt, output
        self.kk[slot] = self.g1[slot] = self.phase[slot] = self.preempt[slot] = 0
        self.gfin[slot] = -1
        self.t_sched[slot] = self.t_first[slot] = self.t_fin[slot] = math.nan
        return slot


class FreeQueue:
    """vLLM V1's free KV-block queue, as far as its prefix cache can hand blocks back to a preempted request.

    vLLM (v1/core/block_pool.py: free_blocks, get_new_blocks) puts freed blocks without a hash (a request's
    partial last block) at the head of the free queue, to be reused first, and full, hashed blocks at the tail,
    last block first; new allocations pop from the head and evict what they pop. A preempted request scheduled
    again gets its leading full blocks that are still in the queue as prefix-cache hits and recomputes only
    the rest. Blocks of finished requests and of requests that never ran are anonymous here: the workloads carry
    lengths, not token contents, so a hit on another request's blocks is not modelled.

    Segments are [owner, blocks]: owner -1 for anonymous blocks, else a preempted request's cached blocks in
    queue order (its last one first), so the leading `blocks` of that request are still cached. A plain deque
    with lazy deletion: between preemptions it is one anonymous segment, and the hot path a subtraction.
    """

    __slots__ = ("segs", "owned")

    def __init__(self, blocks: int) -> None:
        self.segs: deque[list[int]] = deque([[-1, blocks]])
        self.owned: dict[int, list[int]] = {}

    def take(self, k: int) -> None:
        """Pop k blocks from the head for new allocations, evicting whatever they cached."""
        segs = self.segs
        while k:
            s = segs[0]
            if s[1] > k:
                s[1] -= k
                return
            k -= s[1]
            segs.popleft()
            if s[0] >= 0:
                del self.owned[s[0]]

    def give(self, blocks: int, full: int, owner: int = -1) -> None:
        """Free a request's `blocks`, of which the first `full` are full (hashed): those go to the tail, as
        `owner`'s cached prefix when owner >= 0 (a preempted request), the partial one to the head."""
        segs = self.segs
        if full:
            if owner >= 0:
                seg = [owner, full]
                segs.append(seg)
                self.owned[owner] = seg
            elif segs and segs[-1][0] < 0:
                segs[-1][1] += full
            else:
                segs.append([-1, full])
        if blocks > full:
            if segs and segs[0][0] < 0:
                segs[0][1] += blocks - full
            else:
                segs.appendleft([-1, blocks - full])

    def hits(self, owner: int, cap: int, popped: int = 0) -> int:
        """Leading blocks of `owner` still cached (at most cap), after `popped` more blocks leave the head."""
        seg = self.owned.get(owner)
        if seg is None:
            return 0
        left = seg[1]
        if popped:
            for s in self.segs:
                if s is seg:
                    break
                popped -= s[1]
                if popped <= 0:
                    break
            if popped > 0:
                left -= popped
        return max(0, min(left, cap))

    def claim(self, owner: int, hit: int) -> None:
        """`owner` is scheduled again and takes back its first `hit` blocks; the rest of its segment stays
        in the queue as anonymous blocks."""
        seg = self.owned.pop(owner, None)
        if seg is not None:
            seg[0], seg[1] = -1, seg[1] - hit


class Samples:
    """The replica's state at regular times: what a scrape in the middle of a step would see (the
    requests scheduled in that step as running, KV blocks allocated for it)."""

    __slots__ = ("interval_s", "next_s", "t_s", "running", "waiting", "kv_usage")

    def __init__(self, interval_s: float | None) -> None:
        self.interval_s = interval_s or math.inf
        self.next_s = 0.0 if interval_s else math.inf
        self.t_s: list[float] = []
        self.running: list[int] = []
        self.waiting: list[int] = []
        self.kv_usage: list[float] = []

    def take(self, running: int, waiting: int, kv_usage: float) -> None:
        """Record the state at the next sample time and move on to the one after."""
        self.t_s.append(self.next_s)
        self.running.append(running)
        self.waiting.append(waiting)
        self.kv_usage.append(kv_usage)
        self.next_s += self.interval_s


def envelope(lines: list[Line], n: int) -> list[tuple[int, int, float, float]]:
    """Segments (k0, k1, A, V) of max_i(A_i + V_i*k) over integer k in [0, n): the upper envelope of
    lines is convex, so each segment's line is overtaken only by one with a larger slope."""
    cur = max(lines)
    segs = []
    k = 0
    while k < n:
        nxt: Line | None = None
        k_next = n
        for a, v in lines:
            if v > cur[1]:
                x = (cur[0] - a) / (v - cur[1])  # real k where this line meets the current one
                if x < k_next:
                    kk = max(k + 1, math.floor(x) + 1)
                    if kk < k_next or (kk == k_next and nxt is not None and v > nxt[1]):
                        k_next, nxt = kk, (a, v)
        segs.append((k, k_next, cur[0], cur[1]))
        if nxt is None:
            break
        k, cur = k_next, nxt
    return segs


def _seg_sum(k0: int, k1: int, a: float, v: float) -> float:
    return (k1 - k0) * a + v * (k1 * (k1 - 1) - k0 * (k0 - 1)) * 0.5


def _partial(a0: float, v: float, m: int) -> float:
    """Seconds of the first m steps of a segment whose first step costs a0, each next one v more."""
    return m * a0 + v * m * (m - 1) * 0.5


def stretch_time(lines: list[Line], n: int) -> float:
    """Seconds of decode steps 0..n-1."""
    if len(lines) == 1:
        a, v = lines[0]
        return n * a + v * n * (n - 1) * 0.5
    return sum(_seg_sum(k0, k1, a, v) for k0, k1, a, v in envelope(lines, n))


def first_reach(lines: list[Line], n: int, target: float) -> int:
    """The fewest steps m in [1, n] whose summed time is >= target (n if none reach it)."""
    acc = 0.0
    segs = [(0, n, lines[0][0], lines[0][1])] if len(lines) == 1 else envelope(lines, n)
    for k0, k1, a, v in segs:
        seg = _seg_sum(k0, k1, a, v)
        if acc + seg < target:
            acc += seg
            continue
        rem = target - acc
        a0 = a + v * k0  # cost of this segment's first step

        if v > 0:
            b = a0 - 0.5 * v
            m = math.ceil((-b + math.sqrt(b * b + 2.0 * v * rem)) / v)
        else:
            m = math.ceil(rem / a0) if a0 > 0 else 1
        m = min(max(m, 1), k1 - k0)
        while m > 1 and _partial(a0, v, m - 1) >= rem:
            m -= 1
        while m < k1 - k0 and _partial(a0, v, m) < rem:
            m += 1
        return k0 + m
    return n
