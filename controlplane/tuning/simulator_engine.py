"""One vLLM V1 replica's scheduler, simulated event to event instead of step by step.

The scheduling rules are vLLM V1's (v1/core/sched/scheduler.py): running requests first, each
decode 1 token and a partial prefill its remaining chunk, within the max_num_batched_tokens budget;
then waiting requests FCFS while budget and max_num_seqs allow (the full sequence must fit in free
KV blocks: scheduler_reserve_full_isl), the last one's prefill chunked to the budget left; no
admissions in a step that preempted; when a running request cannot get a block, the last running
request is preempted (blocks freed, back to the head of the queue, recomputed later, except the leading
blocks the prefix cache still holds when it is scheduled again: simulator_parts.FreeQueue).

Why it is fast: in this scheduler the running list is always [decoding..., at most one partial
prefill], and every decoding request advances one token per step. So between events (an arrival,
a finish, a prefill, the KV cache running out) the batch is constant, the step times are a
max-of-lines in the step index, and a whole stretch of steps is summed in closed form. Per-request
state is kept lazily (tokens so far = tokens at admission + steps since), block needs come from a
histogram of block-boundary phases, finishes from a heap keyed by step number. No approximation:
`simulator_reference.ReferenceEngine` steps naively and the tests hold the two equal.

Not modelled (vLLM behaviours that change these numbers): prefix-cache hits on other requests' blocks
(workloads carry lengths, not tokens), the KV watermark (0 by default),
long_prefill_token_threshold (off by default), speculative decoding, async scheduling overlap.
"""

from __future__ import annotations

from collections import deque
from heapq import heappop, heappush

from controlplane.tuning.perf_model import ReplicaModel
from controlplane.tuning.simulator_parts import Book, FreeQueue, Line, Samples, first_reach, stretch_time


class FastEngine:
    """The event-driven replica. `advance(t)` runs the steps that start before t; `enqueue` adds a request."""

    __slots__ = ("index", "bs", "budget", "max_seqs", "nblocks", "max_len", "full_fit", "roofs", "b", "clock",
                 "G", "dec", "pre", "pre_done", "waiting", "heap", "h2", "S", "U", "outstanding", "fins",
                 "planned", "plan_n", "plan_end", "steps", "tokens", "preemptions", "samples", "fq", "caching")

    def __init__(self, model: ReplicaModel, book: Book, index: int, sample_interval_s: float | None) -> None:
        self.index = index
        self.bs = model.block_size
        self.budget = model.max_num_batched_tokens
        self.max_seqs = model.max_num_seqs
        self.nblocks = model.num_kv_blocks
        self.max_len = model.max_model_len
        self.full_fit = model.reserve_full_sequence
        self.roofs = [r.as_tuple() for r in model.step_cost.roofs]
        self.b = book
        self.clock = 0.0
        self.G = 0  # steps run so far
        self.dec: dict[int, None] = {}  # decoding requests in running order (dicts keep insertion order)
        self.pre = -1  # the partially prefilled request (always last in running), or -1
        self.pre_done = 0
        self.waiting: deque[int] = deque()
        self.heap: list[tuple[int, int]] = []  # (finish step, request)
        self.h2 = [0] * (2 * self.bs)  # decoders per block-phase, stored twice for wrap-around slices
        self.S = 0  # KV tokens computed, summed over decoders
        self.U = 0  # KV blocks in use
        self.fq = FreeQueue(model.num_kv_blocks)  # the free ones, in vLLM's eviction order
        self.caching = model.prefix_caching
        self.outstanding = 0
        self.fins: deque[float] = deque()  # finish times not yet passed by outstanding_at, in order
        self.planned = False
        self.plan_n = 0
        self.plan_end = 0.0
        self.steps = 0
        self.tokens = 0
        self.preemptions = 0
        self.samples = Samples(sample_interval_s)

    # --- the public surface ---------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.dec) or self.pre >= 0 or bool(self.waiting)

    def enqueue(self, r: int, t: float) -> bool:
        """Queue request r arriving at t (after `advance(t, cut=True)`); False if it can never run here."""
        b = self.b
        if b.prompt[r] + b.output[r] > self.max_len:
            return False
        if not self.busy():
            while self.samples.next_s < t:
                self.samples.take(0, 0, self.U / self.nblocks)
            self.clock = max(self.clock, t)
        self.waiting.append(r)
        self.outstanding += 1
        self.planned = False
        return True

    def generated(self, r: int) -> int:
        """Output tokens request r has produced as of the last committed step (decoders are kept lazily)."""
        b = self.b
        return b.kk[r] + self.G - b.g1[r] if r in self.dec else b.kk[r]

    def snapshot(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage ratio) as of the last step run: what a scrape would read now."""
        return len(self.dec) + (self.pre >= 0), len(self.waiting), self.U / self.nblocks

    def outstanding_at(self, t: float) -> int:
        """Requests routed here and not finished by t: the engine may have run past t (to a later request's entry),
        so the ones it finished after t count again. t never decreases from one call to the next."""
        fins = self.fins
        while fins and fins[0] <= t:
            fins.popleft()
        return self.outstanding + len(fins)

    def advance(self, t: float, cut: bool) -> None:
        """Run every step that starts before t. With cut=False a decode stretch that ends after t is left
        pending (nothing in it is visible before its end), which saves work for replicas not routed to."""
        while self.dec or self.pre >= 0 or self.waiting:
            if self.clock >= t:
                return
            if not self.planned:
                self._plan()
            n = self.plan_n
            if n == 0:
                self._general_step()
            elif self.plan_end <= t:
                self._commit(n, self.plan_end)
            elif not cut:
                return
            else:
                lines = self._lines()
                m = first_reach(lines, n, t - self.clock)
                self._commit(m, self.plan_end if m == n else self.clock + stretch_time(lines, m))
                return

    # --- decode stretches -----------------------------------------------------------------------
    def _lines(self) -> list[Line]:
        d = len(self.dec)
        s1 = self.S + d
        return [(c + (kt + ks) * d + (kv + ka) * s1, (kv + ka) * d) for c, kt, kv, ks, ka in self.roofs]

    def _blocks_over(self, n: int) -> int:
        """KV blocks the decoders need over the next n steps."""
        q, rem = divmod(n, self.bs)
        s = self.G % self.bs
        return q * len(self.dec) + (sum(self.h2[s:s + rem]) if rem else 0)

    def _plan(self) -> None:
        """plan_n > 0: the next steps are a pure-decode stretch of that length; 0: a general step."""
        self.planned = True
        self.plan_n = 0
        if self.pre >= 0 or not self.dec or (self.waiting and self._head_fits()):
            return
        heap, gfin = self.heap, self.b.gfin
        while gfin[heap[0][1]] != heap[0][0]:
            heappop(heap)
        n = heap[0][0] - self.G
        free = self.nblocks - self.U
        if self._blocks_over(n) > free:
            n = self._first_kv_shortfall(free)
            if n == 0:
                return
        self.plan_n = n
        self.plan_end = self.clock + stretch_time(self._lines(), n)

    def _first_kv_shortfall(self, free: int) -> int:
        """The first step (from now) at which the decoders need more blocks than are free."""
        bs, h, d, g = self.bs, self.h2, len(self.dec), self.G
        cycles = free // d  # whole block cycles that fit: each costs every decoder one block
        j, used = cycles * bs, cycles * d
        while used + h[(g + j) % bs] <= free:
            used += h[(g + j) % bs]
            j += 1
        return j

    def _head_fits(self) -> bool:
        """Would the head of the queue be admitted in the next step? Nothing in a decode stretch makes it
        more likely (free blocks only shrink), so a blocked head stays blocked until the stretch ends."""
        d = len(self.dec)
        left = self.budget - d
        if left <= 0 or d + (self.pre >= 0) >= self.max_seqs:
            return False
        r = self.waiting[0]
        target = self.b.prompt[r] + self.b.kk[r]
        need = self.h2[self.G % self.bs]
        free = self.nblocks - self.U - need
        bs = self.bs
        if self.full_fit and -(-target // bs) > free:
            return False
        # Cached blocks it would get back (after this step's decoders took theirs): fewer later in a stretch,
        # but each block lost costs a free block too, so a head that does not fit now does not fit later.
        have = self.fq.hits(r, (target - 1) // bs, need) * bs if self.fq.owned else 0
        return -(-min(target, have + left) // bs) <= free

    def _commit(self, n: int, end: float) -> None:
        d = len(self.dec)
        smp = self.samples
        if smp.next_s < end:  # rare (once per sample interval): find the step each sample time falls in
            lines = self._lines()
            while smp.next_s < end:
                m = first_reach(lines, n, smp.next_s - self.clock)
                smp.take(d, len(self.waiting), (self.U + self._blocks_over(m)) / self.nblocks)
        k = self._blocks_over(n)
        self.U += k
        self.fq.take(k)
        self.S += n * d
        self.G += n
        self.clock = end
        self.steps += n
        self.tokens += n * d
        self._finish_due()
        self.planned = False

    def _finish_due(self) -> None:
        b, heap, g, bs, h2, dec = self.b, self.heap, self.G, self.bs, self.h2, self.dec
        gfin = b.gfin
        while heap and heap[0][0] <= g:
            gf, r = heappop(heap)
            if gfin[r] != gf:
                continue  # stale: the request was preempted since
            del dec[r]
            e = b.phase[r]
            h2[e] -= 1
            h2[e + bs] -= 1
            comp = b.prompt[r] + b.output[r] - 1
            self.S -= comp
            blocks = -(-comp // bs)
            self.U -= blocks
            self.fq.give(blocks, comp // bs)
            gfin[r] = -1
            b.kk[r] = b.output[r]
            b.t_fin[r] = self.clock
            self.outstanding -= 1
            self.fins.append(self.clock)

    # --- the general step (admissions, prefills, preemptions) -------------------------------------
    def _drop_decoder(self, r: int) -> int:
        """Preempt decoder r (already removed from `dec`): free its blocks, requeue it at the head."""
        b, bs = self.b, self.bs
        k = b.kk[r] + self.G - b.g1[r]
        comp = b.prompt[r] + k - 1
        e = b.phase[r]
        self.h2[e] -= 1
        self.h2[e + bs] -= 1
        self.S -= comp
        blocks = -(-comp // bs)
        self.U -= blocks
        self.fq.give(blocks, comp // bs, r if self.caching else -1)
        b.kk[r] = k
        b.gfin[r] = -1
        b.preempt[r] += 1
        self.preemptions += 1
        self.waiting.appendleft(r)
        return blocks

    def _drop_prefill(self) -> int:
        r, blocks = self.pre, -(-self.pre_done // self.bs)
        self.U -= blocks
        self.fq.give(blocks, self.pre_done // self.bs, r if self.caching else -1)
        self.pre = -1
        self.b.preempt[r] += 1
        self.preemptions += 1
        self.waiting.appendleft(r)
        return blocks

    def _schedule_decoders_short(self, free: int) -> None:
        """The decoders need more blocks than are free: walk them in running order, preempting from the
        end of the running list (the partial prefill first) until each one's block fits, as vLLM does."""
        bs, ph, dec = self.bs, self.b.phase, self.dec
        want = self.G % bs
        for r in list(dec):
            if r not in dec:
                break  # preempted from the end: everything after it is gone too
            if ph[r] != want:
                continue
            while free < 1:
                if self.pre >= 0:
                    free += self._drop_prefill()
                    continue
                victim, _ = dec.popitem()
                free += self._drop_decoder(victim)
                if victim == r:
                    break
            if r not in dec:
                break
            free -= 1
            self.U += 1
            self.fq.take(1)

    def _general_step(self) -> None:
        b, bs = self.b, self.bs
        prompt, kk = b.prompt, b.kk
        t0 = self.clock
        budget = self.budget
        free = self.nblocks - self.U
        need = self.h2[self.G % bs]
        preempted = False
        if need <= free:
            self.U += need
            self.fq.take(need)
            free -= need
        else:
            before = self.preemptions
            self._schedule_decoders_short(free)
            preempted = self.preemptions > before
            free = self.nblocks - self.U
        d = len(self.dec)
        tokens = seqs = d
        kv = attn = self.S + d
        budget -= d
        done: list[int] = []  # requests whose prompt completes in this step, in running order
        p = self.pre
        if p >= 0:
            target = prompt[p] + kk[p]
            have = self.pre_done
            chunk = min(target - have, budget)
            if chunk > 0:
                new_blocks = -(-(have + chunk) // bs) - -(-have // bs)
                if new_blocks > free:
                    self._drop_prefill()  # it is the last running request: it preempts itself
                    preempted = True
                else:
                    free -= new_blocks
                    self.U += new_blocks
                    self.fq.take(new_blocks)
                    budget -= chunk
                    tokens += chunk
                    seqs += 1
                    kv += have + chunk
                    attn += chunk * have + chunk * (chunk + 1) // 2
                    if have + chunk == target:
                        done.append(p)
                        self.pre = -1
                    else:
                        self.pre_done = have + chunk
        running = d + (self.pre >= 0) + (p >= 0 and self.pre < 0 and not preempted)
        if not preempted:
            waiting, full_fit, max_seqs, fq = self.waiting, self.full_fit, self.max_seqs, self.fq
            while budget > 0 and waiting and running < max_seqs:
                r = waiting[0]
                target = prompt[r] + kk[r]
                if full_fit and -(-target // bs) > free:
                    break
                hit = fq.hits(r, (target - 1) // bs) if fq.owned else 0
                have = hit * bs
                chunk = min(target - have, budget)
                new_blocks = -(-(have + chunk) // bs)  # the hits count against the free blocks too
                if new_blocks > free:
                    break
                waiting.popleft()
                if fq.owned:
                    fq.claim(r, hit)
                fq.take(new_blocks - hit)
                free -= new_blocks
                self.U += new_blocks
                budget -= chunk
                running += 1
                tokens += chunk
                seqs += 1
                kv += have + chunk
                attn += chunk * have + chunk * (chunk + 1) // 2
                if b.t_sched[r] != b.t_sched[r]:  # NaN: first time scheduled
                    b.t_sched[r] = t0
                if have + chunk == target:
                    done.append(r)
                else:
                    self.pre, self.pre_done = r, have + chunk
        if tokens:
            dt = 0.0
            for c, kt, kvc, ks, ka in self.roofs:
                v = c + kt * tokens + kvc * kv + ks * seqs + ka * attn
                if v > dt:
                    dt = v
            self.clock = t1 = t0 + dt
            self.steps += 1
            self.tokens += tokens
        elif preempted:
            t1 = t0  # everything was preempted: vLLM runs no forward pass
        else:
            raise RuntimeError(f"replica {self.index} cannot schedule anything: the head of its queue needs more "
                               "KV blocks than the replica has")
        smp = self.samples
        while smp.next_s < t1:
            smp.take(running, len(self.waiting), self.U / self.nblocks)
        self.S += d
        self.G += 1
        g = self.G
        for r in done:
            k = kk[r] + 1
            if b.t_first[r] != b.t_first[r]:
                b.t_first[r] = t1
            target = prompt[r] + kk[r]
            if k >= b.output[r]:
                self.U -= -(-target // bs)
                self.fq.give(-(-target // bs), target // bs)
                kk[r] = k
                b.t_fin[r] = t1
                self.outstanding -= 1
                self.fins.append(t1)
                continue
            kk[r] = k
            b.g1[r] = g
            e = (g - target) % bs  # step numbers at which its computed tokens sit on a block boundary
            b.phase[r] = e
            self.h2[e] += 1
            self.h2[e + bs] += 1
            self.dec[r] = None
            self.S += target
            gf = g + b.output[r] - k
            b.gfin[r] = gf
            heappush(self.heap, (gf, r))
        self._finish_due()
        self.planned = False
