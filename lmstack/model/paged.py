"""Paged KV cache: a pool of fixed-size blocks per layer, and the per-step metadata the model reads.

The engine owns which blocks belong to which sequence (its block tables) and builds each step's
metadata (lmstack.infer.step); this file holds the pool and implements the model's cache
protocol over it: `mask(T, pad_mask)` once, `attend(layer, q, k, v, mask, attention)` per layer,
`advance(T)` at the end. How a step attends is an explicit field of its metadata.

Attention is plain PyTorch: new keys/values are scattered into the pool at their slots, then
queries attend over each lane's context in one of three ways (`AttnMetadata.attention`):
- "gather": each lane's keys/values are copied out of the pool by block tables into a padded
  (L, Hkv, S, D) tensor that SDPA reads with an (L, 1, T, S) boolean mask;
- "by_block" (eager decode steps): each lane's own blocks are copied and scored one block at a
  time, and the blocks' softmaxes merged per lane (no padding to the longest lane);
- "flex" (compiled CPU decode steps): `flex_attention` reads the pool in place, block by block
  through each lane's block ids.
A lane is one row of the dense batch; it holds one sequence, or several short ones side by
side, kept apart by the mask.
Shapes: R sequences, L lanes, T new tokens per lane (padded), N real new tokens, S key slots
(the longest lane context, in whole blocks), Hkv key/value heads, D head_dim, P pool slots,
Q (lane, block) pairs of a decode step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class PagedKVCache:
    """Pool of fixed-size blocks per layer: k[layer], v[layer] of shape (Hkv, num_blocks, block_size, D).

    Heads first, so the keys gathered for one (sequence, head) are one contiguous (S, D) run:
    SDPA reads that layout about twice as fast as keys with heads interleaved.
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sliding_window: int | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        shape = (n_kv_heads, num_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.sliding_window = sliding_window

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                   p.device, p.dtype, cfg.sliding_window)

    @staticmethod
    def blocks_for_budget(model: torch.nn.Module, budget_bytes: int, block_size: int = 16,
                          dtype: torch.dtype | None = None) -> int:
        """How many blocks fit in `budget_bytes` of keys and values."""
        per_block = model.kv_bytes_per_token(dtype) * block_size
        blocks = budget_bytes // per_block
        if blocks <= 0:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {per_block} "
                             "bytes; raise the KV cache memory budget or lower block_size")
        return int(blocks)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as (Hkv, P, D) views, P = num_blocks * block_size."""
        k, v = self.k[layer], self.v[layer]
        return k.flatten(1, 2), v.flatten(1, 2)


@dataclass
class AttnMetadata:
    """One engine step over a PagedKVCache; passed as `cache=` to `Transformer.forward`."""

    kv: PagedKVCache
    query_lens: torch.Tensor
    """(R,) long: new tokens per sequence (R sequences, in the order of prepare_step's rows)."""
    context_lens: torch.Tensor
    """(R,) long: tokens in each sequence's context after this step (computed before + new)."""
    positions: torch.Tensor
    """(L, T) long: absolute positions; padded queries repeat their lane's last real position."""
    new_index: torch.Tensor
    """(N,) long: where each real new token sits in the flattened (L * T) lanes, row by row."""
    logits_index: torch.Tensor
    """(L, K) long: columns of the last new tokens of each lane's (up to K) sequences, for
    `Transformer.forward(logits_index=)`; padded with the lane's last column."""
    logits_rows: torch.Tensor
    """(R,) long: where each sequence's last-token logits sit in the flattened (L * K) result."""
    slot_mapping: torch.Tensor
    """(N,) long: pool slot each real new token's key/value is written to."""
    key_blocks: torch.Tensor
    """(L, S / block_size) long: each lane's sequences' blocks one after another, padded with
    block 0 (masked out)."""
    attn_mask: torch.Tensor
    """(L, 1, T, S) bool: True where a query may attend a key."""
    from_start: bool = False
    """Every sequence starts at position 0, so the new keys are the whole context: attention
    reads them directly (then S = T, not a whole number of blocks)."""
    attention: str = "gather"
    """How queries attend over the pool when not from_start: "gather", "by_block" (eager, needs
    lane_blocks) or "flex" (traced by torch.compile only, needs lane_blocks); see the module
    docstring."""
    dense: bool = False
    """new_index is every lane column in order (e.g. a decode step: one token per lane), so the
    new keys/values are written without first being picked out of the lanes."""
    lane_blocks: LaneBlocks | None = None
    """Each lane's blocks, for the "by_block" and "flex" ways (decode steps without a sliding
    window)."""

    def mask(self, T: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """The step's mask; padding is already known from query_lens, so pad_mask is ignored."""
        if T != self.attn_mask.shape[2]:
            raise ValueError(f"the step was prepared for {self.attn_mask.shape[2]} new tokens per "
                             f"row, the model got {T}; pass prepare_step's tokens unchanged")
        return self.attn_mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor, attention) -> torch.Tensor:
        """Write the new (L, Hkv, T, D) keys/values into the pool, then attend (L, H, T, D)
        queries over each lane's context as `self.attention` says (the "gather" way through
        `attention(q, keys, values, mask)`)."""
        self.update(layer, k, v)
        if self.from_start:  # the new keys are the whole context
            return attention(q, k, v, mask)
        if self.attention == "flex":
            return self.lane_blocks.attend(q, *self.kv.flat(layer))
        if self.attention == "by_block":
            return self.lane_blocks.attend_by_block(q, *self.kv.flat(layer))
        return attention(q, *self.gather(layer), mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new (L, Hkv, T, D) keys/values into the pool at their slots."""
        pool_k, pool_v = self.kv.flat(layer)
        L, Hkv, T, D = k.shape
        for new, pool in ((k, pool_k), (v, pool_v)):
            rows = new.transpose(0, 1).reshape(Hkv, L * T, D)  # (Hkv, L * T, D)
            if not self.dense:
                rows = rows[:, self.new_index]  # (Hkv, N, D): drop padding, order by row
            pool.index_copy_(1, self.slot_mapping, rows.to(pool.dtype))

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each lane's keys/values copied out of the pool, (L, Hkv, S, D), padded to S slots."""
        Hkv, D = self.kv.k[layer].shape[0], self.kv.k[layer].shape[-1]
        L = self.key_blocks.shape[0]
        # whole blocks: index_select of contiguous (block_size, D) chunks is several times
        # faster than gathering single slots
        blocks = self.key_blocks.flatten()
        S = self.key_blocks.shape[1] * self.kv.block_size  # a product: no division for compile to guard
        k_all = self.kv.k[layer].index_select(1, blocks).view(Hkv, L, S, D)  # (Hkv, L, S, D)
        v_all = self.kv.v[layer].index_select(1, blocks).view(Hkv, L, S, D)
        return k_all.transpose(0, 1), v_all.transpose(0, 1)  # (L, Hkv, S, D)

    def advance(self, T: int) -> None:
        """Nothing to do: the scheduler tracks how many tokens each sequence has computed."""


@dataclass
class LaneBlocks:
    """A decode step's blocks, for attention without the padded gather.

    Compiled: flex_attention reads per lane the ids of its full blocks (every slot attended)
    and of its last block, of which the first `last_fill` slots are attended, and visits only
    these blocks of the pool, with no copy (shapes as BlockMask takes them: L lanes, NB blocks
    of the longest lane, int32). Eager: `attend_by_block` over the step's (lane, block) pairs.
    """

    full_count: torch.Tensor
    """(L, 1, 1): full blocks per lane (all but the last)."""
    full: torch.Tensor
    """(L, 1, 1, NB): block ids, the lane's first full_count used (its last block and padding
    follow)."""
    last: torch.Tensor
    """(L, 1, 1, pool blocks): the lane's last block, expanded (stride 0) to the row the kernel
    wants: one as long as the pool has blocks, of which it reads the first."""
    last_fill: torch.Tensor
    """(L,) long: slots of the last block that hold keys."""
    block_size: int

    @functools.cached_property
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's Q (lane, block) pairs, lane by lane: each one's lane (Q,) and block id
        (Q,), and a (1, Q, 1, block_size) fp32 bias, 0 at slots that hold keys and -inf past
        them. Built at the first eager use (compiled steps never need them)."""
        L, NB, bs = self.full.shape[0], self.full.shape[-1], self.block_size
        n_blocks = self.full_count.view(L).long() + 1
        count = int(self.full_count.sum()) + L
        lane = torch.arange(L).repeat_interleave(n_blocks, output_size=count)
        block = self.full.view(L, NB)[torch.arange(NB) < n_blocks[:, None]].long()
        bias = torch.zeros(count, bs)
        bias[n_blocks.cumsum(0) - 1] = torch.zeros(L, bs).masked_fill_(
            torch.arange(bs) >= self.last_fill[:, None], float("-inf"))  # the lanes' last blocks
        return lane, block, bias.view(1, count, 1, bs)

    def attend(self, q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor) -> torch.Tensor:
        """q (L, H, 1, D) over pools (Hkv, P, D) -> (L, H, 1, D).

        The G = H / Hkv query heads that share a key/value head go in as G query rows of one
        head: the kernel then reads each block once per key/value head, not once per query
        head."""
        (L, H, _, D), (Hkv, P, _), bs = q.shape, pool_k.shape, self.block_size
        G, fill = H // Hkv, self.last_fill
        blocks = BlockMask.from_kv_blocks(
            torch.ones_like(self.full_count), self.last,  # the partial blocks
            self.full_count, self.full, BLOCK_SIZE=(G, bs),
            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx % bs < fill[b],
            seq_lengths=(G, P), compute_q_blocks=False)
        # the query scaled here, not in the kernel: a buffer of its own, as inductor's CPU
        # kernel choice expects (it reads the shape of the query's storage, which for a view of
        # a linear's output is 2-D; a plain clone was optimised away)
        rows = q.reshape(L, Hkv, G, D) * D ** -0.5
        out = flex_attention(rows, pool_k[None], pool_v[None], block_mask=blocks, scale=1.0)
        return out.view(L, H, 1, D)

    def attend_by_block(self, q: torch.Tensor, pool_k: torch.Tensor,
                        pool_v: torch.Tensor) -> torch.Tensor:
        """Eager: q (L, H, 1, D) over pools (Hkv, P, D) -> (L, H, 1, D), block by block.

        Each (lane, block) pair is scored alone, so only the lanes' own blocks are copied out of
        the pool (the gather pads every lane to the longest), and each pair's softmax stays
        unnormalised until the pairs of a lane are merged: with a pair's peak score m, exp-sum
        s and output o, out = sum(w o) / sum(w s), w = exp(m - the lane's peak), as split-K
        decoding kernels merge their splits."""
        (L, H, _, D), Hkv, bs = q.shape, pool_k.shape[0], self.block_size
        G, (lane, blocks, bias) = H // Hkv, self.pairs
        k = pool_k.view(Hkv, -1, bs, D).index_select(1, blocks)  # (Hkv, Q, bs, D)
        v = pool_v.view(Hkv, -1, bs, D).index_select(1, blocks)
        rows = (q.reshape(L, Hkv, G, D) * D ** -0.5).index_select(0, lane).transpose(0, 1)
        scores = (rows @ k.transpose(-1, -2)).float() + bias  # (Hkv, Q, G, bs)
        peak = scores.amax(-1)  # (Hkv, Q, G); every pair has a key
        probs = (scores - peak[..., None]).exp_()
        outs, sums = (probs.to(v.dtype) @ v).float(), probs.sum(-1)  # (Hkv, Q, G, D), (Hkv, Q, G)
        by_lane = lane.view(1, -1, 1).expand_as(peak)
        lane_peak = peak.new_full((Hkv, L, G), float("-inf")).scatter_reduce_(1, by_lane, peak, "amax")
        w = (peak - lane_peak.index_select(1, lane)).exp_()
        out = outs.new_zeros(Hkv, L, G, D).index_add_(1, lane, outs * w[..., None])
        total = sums.new_zeros(Hkv, L, G).index_add_(1, lane, sums * w)
        return (out / total[..., None]).to(q.dtype).transpose(0, 1).reshape(L, H, 1, D)
