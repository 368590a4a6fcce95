"""What the engine hands back per request, and the incremental text that goes into it.

`RequestOutput` is cumulative (all tokens and text so far) and carries the delta since the
previous output of the same request, so one type serves `generate`, streaming and the server.
`IncrementalText` turns tokens into text one at a time: it re-decodes only a short window of
tokens (so multi-byte characters split across tokens come out whole, never as U+FFFD), finds
stop strings as they complete, and holds back a tail that might still become a stop string,
so streamed text never shows part of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Detokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """The n most likely tokens at this position and their logprobs (SamplingParams.logprobs)."""


@dataclass
class RequestMetrics:
    arrival_time: float
    """time.time() when add_request accepted the request."""
    first_scheduled_time: float | None = None
    """When a step first ran it (the time between is its time in the queue)."""
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    """Speculative decoding: tokens the draft proposed for this request ..."""
    num_accepted_draft_tokens: int = 0
    """... and how many of them the target accepted."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    """"stop" (EOS, stop token or stop string), "length" (max_tokens or context) or "abort"."""
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token that ended the request, if one did."""


class IncrementalText:
    """Text of a growing token list, with stop-string detection."""

    CONTEXT = 5  # prompt tokens decoded before the first output token (tokenizers with spaces)

    def __init__(self, tokenizer: Detokenizer | None, prompt_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0  # ids[prefix:read] were decoded last time, as context
        self.read = len(self.ids)
        self.text = ""
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0

    def add(self, token: int) -> str | None:
        """Append a token; return the stop string it completed (cut from the text), if any."""
        if self.tokenizer is None:
            return None
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        start = max(0, len(self.text) - self.hold)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._cut_stop(start)

    def flush(self) -> None:
        """At the end: decode what was held back waiting for a character to complete."""
        if self.tokenizer is not None and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def _cut_stop(self, start: int) -> str | None:
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return None
        i, s = min(found)
        self.text = self.text[:i]
        return s

    def delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, the last `hold` characters wait."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
