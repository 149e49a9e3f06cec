"""Continuous batching: which sequences compute which tokens at each step.

Requests join and leave the running batch at every step. Running sequences go first (decodes,
then unfinished prefill chunks); waiting ones are admitted while the step's token budget, the
sequence limit and the cache allow, their prompts split into chunks under the budget. When a
running sequence needs a block and none is free, the most recently admitted other sequence is
preempted: its blocks are freed and it waits to be recomputed, so the cache running out slows
requests down instead of failing them.
"""

from __future__ import annotations

from collections import deque

from swarmoe.engine.kv_cache import BlockManager
from swarmoe.engine.runner import Work
from swarmoe.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        budget = self.max_num_batched_tokens
        work: list[Work] = []
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            take = min(seq.num_tokens - seq.num_computed, budget)
            if take <= 0:
                continue
            while not self.blocks.ensure(seq, seq.num_computed + take):
                victim = self._victim(exclude=seq)
                if victim is None:
                    self._preempt(seq)
                    break
                self._preempt(victim)
                work = [w for w in work if w.seq is not victim]
            else:
                work.append(self._work(seq, take))
                budget -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            take = min(seq.num_tokens - seq.num_computed, budget)
            work.append(self._work(seq, take))
            budget -= take
        return work

    def _work(self, seq: Sequence, take: int) -> Work:
        end = seq.num_computed + take
        self.blocks.register_full_blocks(seq, upto=end)
        return Work(seq, seq.num_computed, end)

    def _victim(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq is not exclude:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED

    def find(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
