"""Sequence: the engine's state for one request (pure Python, no torch).

A sequence's tokens are its prompt followed by its outputs. `num_computed_tokens` of them have
keys/values in the paged cache (in the blocks of `block_table`); the scheduler computes the rest,
a chunk per step. Preemption throws the cache away (num_computed_tokens = 0) but keeps the
outputs, so the sequence is recomputed from prompt + outputs when it runs again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass
class Sequence:
    seq_id: int
    """Arrival order: a lower id arrived earlier (FCFS and preemption order)."""
    prompt_token_ids: list[int]
    params: Any  # SamplingParams; typed loosely so the policy layer does not import torch
    arrival_time: float = 0.0
    request_id: str = ""
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the sequence (last) started."""
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the leading full blocks of the tokens (the BlockManager's bookkeeping)."""
    num_committed_blocks: int = 0
    """Leading blocks already offered to the prefix cache."""
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs without copying the whole list."""
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
