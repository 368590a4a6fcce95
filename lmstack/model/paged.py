"""Paged KV cache: a pool of fixed-size blocks per layer, and the per-step metadata the model reads.

The engine owns which blocks belong to which sequence (its block tables); this file only turns
one step's rows into tensors and implements the model's cache protocol over the pool:
`mask(T, pad_mask)` once, `attend(layer, q, k, v, mask, attention)` per layer, `advance(T)` at
the end.

Attention is plain PyTorch: new keys/values are scattered into the pool at their slots, then each
lane's keys/values are gathered back by block tables into a padded (L, Hkv, S, D) tensor that
SDPA reads with an (L, 1, T, S) boolean mask. A lane is one row of the dense batch; it holds one
sequence, or (with `pack`) several short ones side by side, kept apart by the mask.
Decode steps on CPU (no sliding window) skip the padded gather (see LaneBlocks). Compiled,
`flex_attention` reads the pool in place, block by block through each lane's block ids; eager,
each lane's own blocks are copied and scored one block at a time, and the blocks' softmaxes
merged per lane. The gather copied every lane's context padded to the longest, per layer and
step, and took about as long as SDPA itself.
Shapes: R sequences, L lanes, T new tokens per lane (padded), N real new tokens, S key slots
(the longest lane context, in whole blocks), Hkv key/value heads, D head_dim, P pool slots,
Q (lane, block) pairs of a decode step.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# inductor's CPU flex_attention kernel needs AVX2 or better, and no macOS
FLEX_ON_CPU = sys.platform != "darwin" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
BY_BLOCK_MIN_PADDING = 1 << 20
"""Eager decode steps attend block by block (LaneBlocks.attend_by_block) when the gather would
copy at least this many bytes of padding per layer: ~70 us at the ~15 GB/s the gather reached,
about what the ~20 more small ops of the block-by-block path cost (one-off measurements, Zen 4:
with one lane, so no padding, it decoded llama-150m bf16 at 59.0 against the gather's 64.0
tokens/s)."""


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
    fresh: bool = False
    """Every sequence starts at position 0, so the new keys are the whole context: skip the
    gather (then S = T, not a whole number of blocks)."""
    dense: bool = False
    """new_index is every lane column in order (e.g. a decode step: one token per lane), so the
    new keys/values are written without first being picked out of the lanes."""
    lane_blocks: LaneBlocks | None = None
    """A decode step on CPU without a sliding window: each lane's blocks, for attention that
    reads the pool in place when compiled."""

    def mask(self, T: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """The step's mask; padding is already known from query_lens, so pad_mask is ignored."""
        if T != self.attn_mask.shape[2]:
            raise ValueError(f"the step was prepared for {self.attn_mask.shape[2]} new tokens per "
                             f"row, the model got {T}; pass prepare_step's tokens unchanged")
        return self.attn_mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor, attention) -> torch.Tensor:
        """Write the new (L, Hkv, T, D) keys/values into the pool, then attend (L, H, T, D)
        queries over each lane's context: with lane_blocks block by block (eager) or with
        flex_attention over the pool in place (compiled); else `attention(q, keys, values,
        mask)` over the gathered context."""
        self.update(layer, k, v)
        if self.fresh:  # the new keys are the whole context
            return attention(q, k, v, mask)
        blocks, compiling = self.lane_blocks, torch.compiler.is_compiling()
        if blocks is not None and compiling and FLEX_ON_CPU:
            # eager flex_attention would score every pool slot: compiled only
            return blocks.attend(q, *self.kv.flat(layer))
        if blocks is not None and not compiling and blocks.by_block:  # by_block: never traced
            return blocks.attend_by_block(q, *self.kv.flat(layer))
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
    of the longest lane, int32). Eager: `attend_by_block` over the step's (lane, block) pairs,
    if `by_block`.
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
    by_block: bool
    """Eager steps attend block by block: padding to the longest lane would copy at least
    BY_BLOCK_MIN_PADDING bytes per layer."""

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
        head (1.15-1.2x faster at 8 / 4 heads, one-off microbenchmark)."""
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
        decoding kernels merge their splits. One-off microbenchmarks against gather + SDPA
        (47 lanes, 32-slot blocks, llama-10m heads, Zen 4): lanes of 20-250 tokens 0.87 vs
        1.08 ms per layer; one lane of 2,000 tokens and 46 of 20-120 (the gather pads all to
        the longest) 0.75-2.0 vs 11 ms. Engine, eager, one-off A/B script in one process (with
        BY_BLOCK_MIN_PADDING): serving benchmark (a) 2,010 vs 1,958 tokens/s (medians of 8
        rounds); one request with a 1,500-token prompt among 31 short ones, 1,784 vs 269."""
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


Row = tuple[list[int], list[int], int]


def prepare_step(kv: PagedKVCache, rows: list[Row], device: torch.device | str,
                 pack: bool = False) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
    """rows: one per sequence: (new_token_ids, block_table, num_computed_tokens_before_this_step).

    Returns tokens (L, T) right-padded with 0, positions (L, T), and the step's AttnMetadata.
    Without `pack` lane b is row b (L = R), so row b's last logits are at [b, query_lens[b] - 1].
    With `pack` short rows share lanes (first fit, longest first; a lane holds at most as many
    tokens and key blocks as the longest row), so prompts of mixed lengths are not all padded
    to the longest; see metadata.logits_index / logits_rows. The new tokens' KV go to
    slot block_table[p // block_size] * block_size + p % block_size for p = num_computed + i.
    """
    bs = kv.block_size
    n = [len(r[0]) for r in rows]
    computed = [r[2] for r in rows]
    ctx = [c + k for c, k in zip(computed, n, strict=True)]
    n_blocks = [-(-c // bs) for c in ctx]
    _check_rows(kv, rows, n, computed, n_blocks)
    fresh = not any(computed)  # the new keys are the whole context: no gather
    lanes = _Lanes.pack(n, n_blocks, fresh) if pack else _Lanes.one_per_row(n, n_blocks)
    L, T = lanes.count, lanes.width
    # one tensor for every per-row list: building small tensors is a large part of a step
    per_row = torch.tensor([n, computed, ctx, n_blocks, lanes.lane, lanes.tok_off,
                            lanes.blk_off, lanes.slot])  # (8, R)
    n_t, computed_t, ctx_t, n_blocks_t, lane, tok_off, blk_off, slot = per_row
    row, i = _ragged(n_t)  # (N,): each new token's sequence and index within it
    pos = computed_t[row] + i
    new_index = lane[row] * T + tok_off[row] + i
    key_blocks, k_row, k_pos = _lane_keys(kv, lanes, [r[1] for r in rows], n_blocks_t, lane, blk_off)
    slots = key_blocks.flatten()[lane[row] * lanes.blocks + blk_off[row] + pos // bs] * bs + pos % bs
    q_row, q_pos = _lane_queries(lanes, ctx_t, row, pos, new_index)
    if fresh:  # the keys are the lanes' own new tokens; padding columns belong to no row
        k_row = torch.full((L * T,), -1, dtype=torch.long).index_put_((new_index,), row).view(L, T)
        k_pos = q_pos
    tokens = torch.zeros(L * T, dtype=torch.long)
    tokens[new_index] = torch.tensor([t for r in rows for t in r[0]], dtype=torch.long)
    logits_index, logits_rows = _logits_at(lanes, tok_off + n_t - 1, lane, slot)
    meta = AttnMetadata(
        kv=kv, query_lens=n_t.to(device), context_lens=ctx_t.to(device),
        positions=q_pos.to(device), new_index=new_index.to(device),
        logits_index=logits_index.to(device), logits_rows=logits_rows.to(device),
        slot_mapping=slots.to(device), key_blocks=key_blocks.to(device),
        attn_mask=_lane_mask(q_row, q_pos, k_row, k_pos, kv.sliding_window).to(device),
        fresh=fresh, dense=bool(torch.equal(new_index, torch.arange(L * T))))
    if (T == 1 and not fresh and kv.sliding_window is None
            and kv.k[0].device.type == "cpu"):  # one sequence per lane
        meta.lane_blocks = _lane_blocks(kv, key_blocks, n_blocks_t, ctx_t)
    return tokens.view(L, T).to(device), meta.positions, meta


@torch.no_grad()
def last_token_logits(model: torch.nn.Module, kv: PagedKVCache, rows: list[Row],
                      device: torch.device | str, decode_model=None) -> torch.Tensor:
    """Run the model over the rows' new tokens; logits (R, V) at each row's last one.

    Single-token rows and longer ones run as separate passes (see split_decodes), the longer
    ones packed into lanes, and the head runs only at the last tokens. `decode_model`, if
    given, runs the single-token pass instead of `model` (e.g. a compiled one).
    """
    groups = split_decodes(rows)
    out = None
    for group in groups:
        tokens, positions, meta = prepare_step(kv, [rows[i] for i in group], device, pack=True)
        decodes = tokens.shape[1] == 1 and not meta.fresh  # a 1-token prompt is fresh
        run = decode_model if decode_model is not None and decodes else model
        logits = run(tokens, positions, cache=meta, logits_index=meta.logits_index)
        logits = logits.flatten(0, 1)[meta.logits_rows]  # (G, V)
        if len(groups) == 1:
            return logits
        if out is None:
            out = logits.new_empty(len(rows), logits.shape[-1])
        out[torch.tensor(group, device=device)] = logits
    return out


def split_decodes(rows: list[Row]) -> list[list[int]]:
    """Row indices for separate forward passes: single-token rows, then the longer ones.

    One dense (L, T) batch pads every lane to the longest chunk, so a step mixing a 512-token
    prefill chunk with decodes would compute 512 positions per decode; two passes do not.
    """
    decodes = [i for i, r in enumerate(rows) if len(r[0]) == 1]
    others = [i for i, r in enumerate(rows) if len(r[0]) > 1]
    return [g for g in (decodes, others) if g]


@dataclass
class _Lanes:
    """Which lane (row of the dense batch) each sequence occupies, and where in it."""

    lane: list[int]
    tok_off: list[int]
    """Column of the sequence's first new token in its lane."""
    blk_off: list[int]
    """Index of the sequence's first key block among its lane's key blocks."""
    slot: list[int]
    """How many sequences precede this one in its lane."""
    last_row: list[int]
    """Per lane: the sequence whose tokens end the lane (padding queries borrow its position)."""
    width: int
    blocks: int

    @property
    def count(self) -> int:
        return len(self.last_row)

    @classmethod
    def one_per_row(cls, n: list[int], n_blocks: list[int]) -> _Lanes:
        R = len(n)
        return cls(list(range(R)), [0] * R, [0] * R, [0] * R, list(range(R)), max(n), max(n_blocks))

    @classmethod
    def pack(cls, n: list[int], n_blocks: list[int], fresh: bool) -> _Lanes:
        """First fit, longest first. Fresh keys are the lane's own tokens, so only tokens bound
        a lane then; otherwise its key blocks are bounded too (they set S for every lane)."""
        width, cap = max(n), (sum(n_blocks) if fresh else max(n_blocks))
        if width == 1:  # one token per lane (a decode step): nothing to share
            return cls.one_per_row(n, n_blocks)
        R = len(n)
        out = cls([0] * R, [0] * R, [0] * R, [0] * R, [], width, 0)
        used_t: list[int] = []
        used_b: list[int] = []
        open_lanes: list[int] = []  # lanes with room for another token
        for r in sorted(range(R), key=lambda r: -n[r]):
            j = next((j for j in open_lanes
                      if used_t[j] + n[r] <= width and used_b[j] + n_blocks[r] <= cap), None)
            if j is None:
                j = len(used_t)
                used_t.append(0)
                used_b.append(0)
                out.last_row.append(r)
                open_lanes.append(j)
            out.lane[r], out.tok_off[r], out.blk_off[r] = j, used_t[j], used_b[j]
            out.slot[r] = out.slot[out.last_row[j]] + 1 if used_t[j] else 0
            used_t[j] += n[r]
            used_b[j] += n_blocks[r]
            out.last_row[j] = r
            if used_t[j] == width:
                open_lanes.remove(j)
        out.blocks = max(used_b)
        return out


def _logits_at(lanes: _Lanes, last_col: torch.Tensor, lane: torch.Tensor,
               slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnMetadata.logits_index (L, K) and logits_rows (R,), from each row's last column."""
    K = int(slot.max()) + 1
    last_row = torch.tensor(lanes.last_row)
    index = last_col[last_row][:, None].repeat(1, K)  # (L, K), padded with the lane's last column
    index[lane, slot] = last_col
    return index, lane * K + slot


def _ragged(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Owner and index of each item of consecutive runs: [2, 3] -> [0,0,1,1,1], [0,1,0,1,2]."""
    owner = torch.arange(len(lengths)).repeat_interleave(lengths)
    start = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    return owner, torch.arange(len(owner)) - start


def _lane_queries(lanes: _Lanes, ctx: torch.Tensor, row: torch.Tensor, pos: torch.Tensor,
                  new_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, T) sequence and position of each query. A padding query copies its lane's last
    sequence at that sequence's last position, so it sees at least itself: SDPA never gets an
    empty softmax row (which would be NaN)."""
    q_row = torch.tensor(lanes.last_row).repeat_interleave(lanes.width)
    q_pos = (ctx - 1)[q_row]
    q_row[new_index], q_pos[new_index] = row, pos
    return q_row.view(lanes.count, -1), q_pos.view(lanes.count, -1)


def _lane_keys(kv: PagedKVCache, lanes: _Lanes, tables: list[list[int]], n_blocks: torch.Tensor,
               lane: torch.Tensor, blk_off: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each lane's key blocks (L, NB), and the sequence and position of each key slot (L, S)."""
    L, NB, bs = lanes.count, lanes.blocks, kv.block_size
    used = torch.tensor([b for t, m in zip(tables, n_blocks.tolist(), strict=True) for b in t[:m]])
    if used.min() < 0 or used.max() >= kv.num_blocks:
        raise ValueError(f"block ids must lie in [0, {kv.num_blocks}); got {used.min()} .. "
                         f"{used.max()}; pass block tables from this cache's allocator")
    row, j = _ragged(n_blocks)  # (total blocks,)
    flat = lane[row] * NB + blk_off[row] + j
    key_blocks = torch.zeros(L * NB, dtype=torch.long)
    blk_row = torch.full((L * NB,), -1, dtype=torch.long)  # padding blocks belong to no row
    blk_idx = torch.zeros(L * NB, dtype=torch.long)
    key_blocks[flat], blk_row[flat], blk_idx[flat] = used, row, j
    k_row = blk_row.view(L, NB).repeat_interleave(bs, dim=1)  # (L, S)
    k_pos = (blk_idx.view(L, NB) * bs).repeat_interleave(bs, dim=1) + torch.arange(bs).repeat(NB)
    return key_blocks.view(L, NB), k_row, k_pos


def _lane_blocks(kv: PagedKVCache, key_blocks: torch.Tensor, n_blocks: torch.Tensor,
                 ctx: torch.Tensor) -> LaneBlocks:
    """LaneBlocks of a decode step: one new token per lane, so row r is lane r (_Lanes)."""
    (L, NB), bs, pool = key_blocks.shape, kv.block_size, kv.k[0]
    padding = (L * NB - int(n_blocks.sum())) * 2 * pool[:, 0].numel() * pool.element_size()  # k, v
    last = key_blocks[torch.arange(L), n_blocks - 1].int()
    return LaneBlocks((n_blocks - 1).int().view(L, 1, 1), key_blocks.int().view(L, 1, 1, -1),
                      last.view(L, 1, 1, 1).expand(L, 1, 1, kv.num_blocks), (ctx - 1) % bs + 1,
                      bs, padding >= BY_BLOCK_MIN_PADDING)


def _check_rows(kv: PagedKVCache, rows: list[Row], n: list[int], computed: list[int],
                n_blocks: list[int]) -> None:
    if not rows:
        raise ValueError("prepare_step needs at least one row")
    for i, (row, k, c, nb) in enumerate(zip(rows, n, computed, n_blocks, strict=True)):
        if k == 0 or c < 0:
            raise ValueError(f"row {i}: needs >= 1 new token and num_computed >= 0, "
                             f"got {k} tokens and num_computed={c}")
        if len(row[1]) < nb:
            raise ValueError(f"row {i}: {len(row[1])} blocks of {kv.block_size} slots cannot hold "
                             f"{c + k} tokens; allocate more blocks first")


def _lane_mask(q_row: torch.Tensor, q_pos: torch.Tensor, k_row: torch.Tensor, k_pos: torch.Tensor,
               window: int | None) -> torch.Tensor:
    """(L, 1, T, S): a query sees keys of its own sequence at or before its position (within
    the window). Keys up to a query's position are all computed, so no length check is needed."""
    q_row, q_pos = q_row[:, :, None], q_pos[:, :, None]  # (L, T, 1)
    k_row, k_pos = k_row[:, None, :], k_pos[:, None, :]  # (L, 1, S)
    allowed = (q_row == k_row) & (k_pos <= q_pos)
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed[:, None]
