"""Scheduler: which sequences run in the next step, and how many tokens each (pure Python).

One step is one forward pass over a batch mixing prefill chunks and single-token decodes
(continuous batching with chunked prefill, as in vLLM v1 / Sarathi-Serve):

1. Running sequences, oldest first, each get min(tokens left to compute, token budget left,
   prefill chunk) new tokens. When the block pool is exhausted the youngest running sequence is
   preempted (its blocks freed; it is recomputed later from prompt + outputs) until the
   sequence fits; if it is itself the youngest, it is preempted and the pass stops.
2. If nothing was preempted, waiting sequences join in arrival order (FCFS: a sequence that
   does not fit blocks the ones behind it) while there is token budget, a seat
   (max_num_seqs) and blocks, first reusing prefix-cached blocks.

A sequence samples a token in a step only when the step computes its last uncomputed token.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether row i computes its sequence's last token (so a new token is sampled)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_prefill_chunk: int | None = None,
                 num_lookahead_slots: int = 0):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                             f"{max_num_batched_tokens} must be positive")
        if max_prefill_chunk is not None and max_prefill_chunk <= 0:
            raise ValueError(f"max_prefill_chunk={max_prefill_chunk} must be positive or None")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = max_prefill_chunk or max_num_batched_tokens
        self.lookahead = num_lookahead_slots
        """Slots reserved past a decoding sequence for speculative tokens (k), when free."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by seq_id: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget, self.chunk)
            if self.lookahead and n == seq.num_uncomputed:  # never preempts: False if short
                self.blocks.allocate(seq, n + self.lookahead)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return budget
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget, self.chunk)
            if not self.blocks.allocate(seq, n):
                self.blocks.free_sequence(seq)  # give back the prefix hits while it waits
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it first in line to be recomputed."""
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> None:
        """After the step's forward pass: the scheduled tokens now have cached keys/values."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.blocks.commit(seq)

    def accept_drafts(self, seq: Sequence, n: int) -> None:
        """After a speculative step's `advance`: n accepted draft tokens, appended to the
        sequence, have cached keys/values too (the verify pass computed them)."""
        seq.num_computed_tokens += n

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop a sequence (finished or aborted, running or waiting) and free its blocks now."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
