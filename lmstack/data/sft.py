"""Chat fine-tuning data: `.jsonl` records of OpenAI-style `messages` -> token rows whose targets
are the assistant's tokens only, one conversation per row or several packed into each row.

A record is one JSON object per line: {"messages": [{"role": "user", "content": "..."}, ...]}
with roles system / user / assistant / tool and at least one assistant turn after the first
message. A malformed record is skipped and counted with its file:line (`strict` stops at the
first one instead).

Targets. The conversation is rendered with the tokenizer's chat template one assistant turn at a
time: the text before turn i is the template over messages[:i] with the generation prompt, and
turn i is what rendering messages[:i+1] adds to it (its content and the template's end-of-turn,
e.g. `...<|im_end|>\\n` in ChatML). Those tokens are the targets; every other token (system,
user, tool turns, the generation prompt) is context only. Turns after the last assistant turn
are dropped.

Truncation rule: a conversation of more than seq_len + 1 tokens keeps its first seq_len + 1 (its
start holds the instructions; the cut falls in a later turn) and is counted; one with no
assistant token left in them is dropped and counted.

Packing puts conversations one after another into rows of seq_len tokens (in order, a new row when
the next one does not fit; the rest of a row is padding). Each row carries `segment_ids` (which
conversation a token belongs to; padding is a segment of its own) and `positions` that restart at
0 for every conversation, so the model's block-diagonal causal mask (Transformer.forward) keeps
attention inside one conversation, and a packed conversation is computed as it would be alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmstack.model.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

IGNORE_INDEX = -100  # the training loop's "not a target" (lmstack.train.IGNORE_INDEX)
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A chat record that cannot be trained on (skipped and counted unless strict)."""


@dataclass
class Example:
    """One tokenized conversation, shifted for next-token prediction."""

    inputs: list[int]
    targets: list[int]  # the next token where it is the assistant's, else IGNORE_INDEX


@dataclass
class SFTStats:
    """What reading a chat file kept and left out."""

    path: str
    records: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0
    dropped: int = 0  # truncated until no assistant token was left

    def summary(self, show: int = 5) -> str:
        lines = [f"{self.path}: {self.records} records, {self.kept} kept; {len(self.skipped)} "
                 f"malformed (skipped), {self.truncated} truncated to seq_len + 1 tokens, "
                 f"{self.dropped} dropped (no assistant token within seq_len + 1)"]
        lines += [f"  skipped {where}" for where in self.skipped[:show]]
        if len(self.skipped) > show:
            lines.append(f"  ... and {len(self.skipped) - show} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- records

def check_record(record) -> list[dict]:
    """The record's messages, or RecordError saying what is wrong with it."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise RecordError('expected an object with a "messages" list')
    messages = record["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RecordError(f'message {i} needs a "role" and a string "content"')
        if m.get("role") not in ROLES:
            raise RecordError(f"message {i} has unknown role {m.get('role')!r}; "
                              f"roles are {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant turn: nothing to train on")
    if messages[0]["role"] == "assistant":
        raise RecordError("the conversation starts with an assistant turn; begin with a "
                          "system or user message")
    return messages


def read_records(path: str | Path, strict: bool = False,
                 stats: SFTStats | None = None) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of each valid record of a .jsonl file; malformed ones are
    counted in stats (with file:line), or raise ValueError with strict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such chat file (.jsonl, one record per line)")
    stats = stats if stats is not None else SFTStats(str(path))
    found = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.records += 1
            try:
                found.append((lineno, check_record(json.loads(line))))
            except (json.JSONDecodeError, RecordError) as e:
                where = f"{path}:{lineno}: {e}"
                if strict:
                    raise ValueError(f"{where} (strict mode stops at the first bad record; "
                                     "without --strict it is skipped and counted)") from e
                stats.skipped.append(where)
    return found


# ----------------------------------------------------------------------------- rendering

def check_chat_template(tokenizer: Tokenizer) -> None:
    if tokenizer.chat_template is None:
        raise ValueError(
            "the tokenizer has no chat template, so chat records cannot be rendered; add one: "
            "set tokenizer.chat_template (lmstack.model.tokenizer.DEFAULT_CHAT_TEMPLATE is "
            "ChatML), or put a chat_template.jinja file next to tokenizer.json, or a "
            '"chat_template" entry in its tokenizer_config.json')


def render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(tokens, is_target) of a conversation: the assistant turns' tokens are targets."""
    tokens, is_target, done = [], [], ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i in range(1, last + 1):
        if messages[i]["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template renders a conversation differently from its "
                             "prefixes, so assistant turns cannot be located; use a template "
                             "that appends each message (e.g. ChatML)")
        for text, target in ((prompt[len(done):], False), (full[len(prompt):], True)):
            ids = tokenizer.encode(text)
            tokens += ids
            is_target += [target] * len(ids)
        done = full
    return tokens, is_target


def to_example(tokens: list[int], is_target: list[bool]) -> Example:
    targets = [t if keep else IGNORE_INDEX for t, keep in zip(tokens[1:], is_target[1:], strict=True)]
    return Example(tokens[:-1], targets)


def load_sft(path: str | Path, tokenizer: Tokenizer, seq_len: int,
             strict: bool = False) -> tuple[list[Example], SFTStats]:
    """Read, render and truncate a chat file (the rules are in the module docstring)."""
    check_chat_template(tokenizer)
    stats = SFTStats(str(path))
    examples = []
    for _, messages in read_records(path, strict, stats):
        tokens, is_target = render(tokenizer, messages)
        if len(tokens) > seq_len + 1:
            stats.truncated += 1
            tokens, is_target = tokens[:seq_len + 1], is_target[:seq_len + 1]
        if not any(is_target[1:]):
            stats.dropped += 1
            continue
        examples.append(to_example(tokens, is_target))
    stats.kept = len(examples)
    return examples, stats


# ----------------------------------------------------------------------------- rows and batches

def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Examples grouped into rows of at most seq_len tokens, in order."""
    rows, length = [[]], 0
    for ex in examples:
        if rows[-1] and length + len(ex.inputs) > seq_len:
            rows.append([])
            length = 0
        rows[-1].append(ex)
        length += len(ex.inputs)
    return [row for row in rows if row]


def collate(rows: list[list[Example]], seq_len: int, pad_id: int = 0,
            packed: bool = True) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, segment_ids), each (B, seq_len); (inputs, targets) when
    not packed (one example a row, padding after it: plain causal attention is then exact)."""
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    segments = torch.zeros((B, seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = len(ex.inputs)
            inputs[b, start:start + n] = torch.tensor(ex.inputs)
            targets[b, start:start + n] = torch.tensor(ex.targets)
            positions[b, start:start + n] = torch.arange(n)
            segments[b, start:start + n] = s
            start += n
        positions[b, start:] = torch.arange(seq_len - start)
        segments[b, start:] = len(row)  # padding: a segment of its own
    return (inputs, targets, positions, segments) if packed else (inputs, targets)


class SFTBatches:
    """Shuffled chat batches for the training loop (a BatchSource), epoch after epoch.

    Each epoch orders the examples by a permutation drawn from (seed, epoch), then packs them
    (or takes one per row). The state is (epoch, row), so a resumed run continues exactly."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int,
                 pack_rows: bool = True, seed: int = 0, pad_id: int = 0):
        if not examples:
            raise ValueError("no chat examples to train on; check the data file's summary")
        too_long = max(len(ex.inputs) for ex in examples)
        if too_long > seq_len:
            raise ValueError(f"an example has {too_long} tokens > seq_len={seq_len}; "
                             "load_sft with the same seq_len truncates them")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pack_rows, self.seed, self.pad_id = pack_rows, seed, pad_id
        self.epoch, self.row = 0, 0
        self._rows: list[list[Example]] | None = None

    def rows(self, epoch: int) -> list[list[Example]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        shuffled = [self.examples[i] for i in order]
        return pack(shuffled, self.seq_len) if self.pack_rows else [[ex] for ex in shuffled]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = []
        while len(batch) < self.batch_size:
            if self._rows is None:
                self._rows = self.rows(self.epoch)
            if self.row == len(self._rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
                continue
            batch.append(self._rows[self.row])
            self.row += 1
        return collate(batch, self.seq_len, self.pad_id, self.pack_rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row, self._rows = state["epoch"], state["row"], None


def fixed_batches(examples: list[Example], batch_size: int, seq_len: int, pack_rows: bool = True,
                  pad_id: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Every example once, in order: validation batches (the loss counts assistant tokens only,
    since the other targets are IGNORE_INDEX)."""
    rows = pack(examples, seq_len) if pack_rows else [[ex] for ex in examples]
    return [collate(rows[i:i + batch_size], seq_len, pad_id, pack_rows)
            for i in range(0, len(rows), batch_size)]


__all__ = ["DEFAULT_CHAT_TEMPLATE", "Example", "RecordError", "SFTBatches", "SFTStats",
           "check_chat_template", "check_record", "collate", "fixed_batches", "load_sft", "pack",
           "read_records", "render"]
