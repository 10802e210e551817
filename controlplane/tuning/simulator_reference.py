"""The naive replica: vLLM V1's scheduler stepped one engine step at a time, touching every running
request in every step. Too slow for real workloads; it is the oracle the fast engine is tested
against and the reference the speed benchmark measures against.
"""

from __future__ import annotations

from collections import deque

from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator_parts import Book, Samples


class _Req:
    __slots__ = ("rid", "prompt", "output", "k", "computed", "blocks")

    def __init__(self, rid: int, prompt: int, output: int) -> None:
        self.rid, self.prompt, self.output = rid, prompt, output
        self.k = 0  # output tokens generated
        self.computed = 0  # tokens whose KV is in the cache
        self.blocks = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the request has (prompt + outputs): what it must compute before sampling again."""
        return self.prompt + self.k


class _FreeBlocks:
    """vLLM's free block queue kept block by block, (owner, index) each, to check `simulator_parts.FreeQueue`'s
    segments against: freed blocks without a hash (a partial last block) to the head, full ones to the tail
    last block first, new blocks from the head; a preempted request's blocks carry its id (-1: anonymous).
    `owned` counts each owner's blocks in the queue, so that a lookup without any costs nothing."""

    def __init__(self, blocks: int) -> None:
        self.q: deque[tuple[int, int]] = deque((-1, 0) for _ in range(blocks))
        self.owned: dict[int, int] = {}

    def take(self, k: int) -> None:
        for _ in range(k):
            owner, _ = self.q.popleft()
            if owner >= 0:
                self.owned[owner] -= 1

    def give(self, blocks: int, full: int, owner: int = -1) -> None:
        for _ in range(blocks - full):
            self.q.appendleft((-1, 0))
        for i in reversed(range(full)):
            self.q.append((owner, i if owner >= 0 else 0))
        if owner >= 0:
            self.owned[owner] = self.owned.get(owner, 0) + full

    def hits(self, owner: int, cap: int) -> int:
        if not self.owned.get(owner):
            return 0
        have = {i for o, i in self.q if o == owner}
        h = 0
        while h < cap and h in have:
            h += 1
        return h

    def claim(self, owner: int, hit: int) -> None:
        """Take back the first `hit` blocks; the owner's others stay, anonymous."""
        if self.owned.pop(owner, None) is not None:
            self.q = deque((-1, 0) if o == owner else (o, i) for o, i in self.q if not (o == owner and i < hit))


class ReferenceEngine:
    """Same interface as `FastEngine`; `cut` is ignored (every step that starts before t is run)."""

    def __init__(self, model: ReplicaModel, book: Book, index: int, sample_interval_s: float | None) -> None:
        self.index = index
        self.m = model
        self.b = book
        self.clock = 0.0
        self.running: list[_Req] = []
        self.waiting: deque[_Req] = deque()
        self.used = 0
        self.fq = _FreeBlocks(model.num_kv_blocks)
        self.outstanding = 0
        self.fins: deque[float] = deque()  # finish times, in order
        self.steps = 0
        self.tokens = 0
        self.preemptions = 0
        self.samples = Samples(sample_interval_s)

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def enqueue(self, r: int, t: float) -> bool:
        b = self.b
        if b.prompt[r] + b.output[r] > self.m.max_model_len:
            return False
        if not self.busy():
            while self.samples.next_s < t:
                self.samples.take(0, 0, self.used / self.m.num_kv_blocks)
            self.clock = max(self.clock, t)
        self.waiting.append(_Req(r, b.prompt[r], b.output[r]))
        self.outstanding += 1
        return True

    def outstanding_at(self, t: float) -> int:
        while self.fins and self.fins[0] <= t:
            self.fins.popleft()
        return self.outstanding + len(self.fins)

    def advance(self, t: float, cut: bool) -> None:
        while self.busy() and self.clock < t:
            self._step()

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.m.block_size)

    def _take(self, k: int) -> None:
        self.used += k
        self.fq.take(k)

    def _preempt(self, req: _Req) -> None:
        self.used -= req.blocks
        self.fq.give(req.blocks, req.computed // self.m.block_size, req.rid if self.m.prefix_caching else -1)
        req.blocks = 0
        req.computed = 0
        self.b.preempt[req.rid] += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _step(self) -> None:
        m, b = self.m, self.b
        t0 = self.clock
        budget = m.max_num_batched_tokens
        scheduled: list[tuple[_Req, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            new = min(req.num_tokens - req.computed, budget)
            if new == 0:
                i += 1
                continue
            need = self._blocks_for(req.computed + new) - req.blocks
            self_preempted = False
            while need > m.num_kv_blocks - self.used:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    self_preempted = True
                    break
            if self_preempted:
                break
            req.blocks += need
            self._take(need)
            scheduled.append((req, new))
            budget -= new
            i += 1
        if not preempted:
            while budget > 0 and self.waiting and len(self.running) < m.max_num_seqs:
                req = self.waiting[0]
                free = m.num_kv_blocks - self.used
                if m.reserve_full_sequence and self._blocks_for(req.num_tokens) > free:
                    break
                hit = self.fq.hits(req.rid, (req.num_tokens - 1) // m.block_size)
                have = hit * m.block_size
                new = min(req.num_tokens - have, budget)
                need = self._blocks_for(have + new)  # the hits count against the free blocks too, as in vLLM
                if need > free:
                    break
                self.waiting.popleft()
                self.running.append(req)
                self.fq.claim(req.rid, hit)
                req.computed = have
                req.blocks = need
                self.used += hit
                self._take(need - hit)
                if b.t_sched[req.rid] != b.t_sched[req.rid]:
                    b.t_sched[req.rid] = t0
                scheduled.append((req, new))
                budget -= new
        tokens = sum(n for _, n in scheduled)
        if tokens:
            kv = sum(r.computed + n for r, n in scheduled)
            attn = sum(n * r.computed + n * (n + 1) // 2 for r, n in scheduled)
            self.clock = t0 + m.step_cost.step_time(tokens, kv, len(scheduled), attn)
            self.steps += 1
            self.tokens += tokens
        elif not preempted:
            raise RuntimeError(f"replica {self.index} cannot schedule anything")
        t1 = self.clock
        while self.samples.next_s < t1:
            self.samples.take(len(self.running), len(self.waiting), self.used / m.num_kv_blocks)
        for req, n in scheduled:
            req.computed += n
            if req.computed < req.num_tokens:
                continue  # a partial prefill
            req.k += 1
            if b.t_first[req.rid] != b.t_first[req.rid]:
                b.t_first[req.rid] = t1
            if req.k >= req.output:
                self.running.remove(req)
                self.used -= req.blocks
                self.fq.give(req.blocks, req.computed // m.block_size)
                b.t_fin[req.rid] = t1
                b.kk[req.rid] = req.k
                self.outstanding -= 1
                self.fins.append(t1)
