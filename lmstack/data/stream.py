"""Pretraining batches from prepared token shards: random or sequential windows, rank-aware, resumable.

The shards of a split are read as one long token array through lazily opened `np.memmap`s, so a
window may cross a shard boundary and nothing is loaded into memory up front.

Every step draws one *global* batch of `batch_size * world_size` windows and rank r keeps rows
[r*B, (r+1)*B). So ranks never share a window within a step, the union of the ranks' batches is
exactly what one process with the global batch size would see, and the whole position is the step
counter: random mode seeds a fresh `np.random.Generator` from (seed, step) for each step. The state
is therefore the same on every rank, rank 0 can save it alone, and a resumed run (even with another
world size, as long as the global batch is the same) continues with exactly the batches it would
have drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmstack.data.shards import DTYPES, load_meta

MODES = ("random", "sequential")


class TokenStream:
    """(inputs, targets) batches of `seq_len` tokens from one split of a prepared data dir."""

    def __init__(self, data_dir: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, mode: str = "random") -> None:
        _check_args(batch_size, seq_len, seed, rank, world_size, mode)
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"split {split!r} is not in {data_dir}; it has {sorted(meta['splits'])}")
        shards = meta["splits"][split]["shards"]
        self.paths = [Path(data_dir) / s["file"] for s in shards]
        self.ends = np.cumsum([s["tokens"] for s in shards], dtype=np.int64)  # global end of each shard
        self.num_tokens = int(self.ends[-1]) if shards else 0
        if seq_len + 1 > self.num_tokens:
            raise ValueError(f"seq_len={seq_len} needs {seq_len + 1} tokens per window but the {split!r} "
                             f"split of {data_dir} has {self.num_tokens}; lower seq_len or add text")
        self.vocab_size: int = meta["vocab_size"]
        self.dtype = DTYPES[meta["dtype"]]
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.step = 0
        self._maps: dict[int, np.memmap] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def windows_per_epoch(self) -> int:
        """Non-overlapping windows in the split (sequential mode; the tail that is too short is dropped)."""
        return (self.num_tokens - 1) // self.seq_len

    @property
    def epoch(self) -> int:
        """Completed passes over the split (sequential mode: exact; random mode: tokens drawn / split size)."""
        drawn = self.step * self.global_batch
        if self.mode == "sequential":
            return drawn // self.windows_per_epoch
        return drawn * self.seq_len // self.num_tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, T) int64 and targets (B, T) int64, the inputs shifted left by one token."""
        starts = self._global_starts(self.step)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.step += 1
        rows = np.stack([self._read(int(s), self.seq_len + 1) for s in starts])  # (B, T+1)
        buf = torch.from_numpy(rows.astype(np.int64))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def _global_starts(self, step: int) -> np.ndarray:
        """Start offsets of all `global_batch` windows of `step`."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, self.num_tokens - self.seq_len, size=self.global_batch)
        first = step * self.global_batch
        windows = np.arange(first, first + self.global_batch) % self.windows_per_epoch
        return windows * self.seq_len

    def all_tokens(self) -> np.ndarray:
        """Every token of the split in order (for statistics such as a unigram baseline)."""
        return self._read(0, self.num_tokens)

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries."""
        parts = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while length > 0:
            offset = start - (int(self.ends[shard - 1]) if shard else 0)
            part = self._shard(shard)[offset:offset + length]
            parts.append(part)
            start, length, shard = start + len(part), length - len(part), shard + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    # ---- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position plus what must match on resume; identical on every rank."""
        return {"step": self.step, "mode": self.mode, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved step; refuse a state that would not give the same batches."""
        mine = self.state_dict()
        wrong = {k: (state.get(k), mine[k]) for k in mine if k != "step" and state.get(k) != mine[k]}
        if wrong:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(f"cannot resume this TokenStream exactly ({detail}); use the saved settings "
                             "(global batch = batch_size * world_size) and the same prepared data")
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError(f"saved step {state.get('step')!r} is not a non-negative int")
        self.step = state["step"]


def _check_args(batch_size: int, seq_len: int, seed: int, rank: int, world_size: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
