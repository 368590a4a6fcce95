"""Step building: one scheduled step's rows -> the tokens, positions and attention metadata of
one forward pass over the paged KV cache (lmstack.model.paged).

A row is one sequence's new tokens, its block table and how many of its tokens are computed
before this step. Rows go into lanes, the rows of one dense (L, T) batch: one sequence per lane,
or (lane filling) several short ones side by side, kept apart by the mask. The new tokens' keys
and values go to slot block_table[p // block_size] * block_size + p % block_size for position
p = num_computed + i.
Shapes: R sequences, L lanes, T new tokens per lane (padded), N real new tokens, S key slots
(the longest lane context, in whole blocks), NB key blocks of the longest lane.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from lmstack.model.paged import AttnMetadata, LaneBlocks, PagedKVCache

# inductor's CPU flex_attention kernel needs AVX2 or better, and no macOS
FLEX_ON_CPU = sys.platform != "darwin" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@dataclass
class StepRow:
    """One sequence's part of a step."""

    tokens: list[int]
    """The new token ids (their values do not matter when the caller passes a token tensor)."""
    block_table: list[int]
    num_computed: int
    """Tokens of the sequence whose keys/values are cached before this step."""


def prepare_step(kv: PagedKVCache, rows: list[StepRow], device: torch.device | str,
                 fill_lanes: bool = False, compiled: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
    """Returns tokens (L, T) right-padded with 0, positions (L, T), and the step's AttnMetadata.

    Without `fill_lanes` lane b is row b (L = R), so row b's last logits are at
    [b, query_lens[b] - 1]. With it short rows share lanes (first fit, longest first; a lane
    holds at most as many tokens and key blocks as the longest row), so prompts of mixed lengths
    are not all padded to the longest; see metadata.logits_index / logits_rows. `compiled`: the
    step will run traced by torch.compile (see attention_for).
    """
    bs = kv.block_size
    n = [len(r.tokens) for r in rows]
    computed = [r.num_computed for r in rows]
    ctx = [c + k for c, k in zip(computed, n, strict=True)]
    n_blocks = [-(-c // bs) for c in ctx]
    _check_rows(kv, rows, n, computed, n_blocks)
    from_start = not any(computed)  # the new keys are the whole context: no gather
    lanes = _Lanes.first_fit(n, n_blocks, from_start) if fill_lanes else _Lanes.one_per_row(n, n_blocks)
    L, T = lanes.count, lanes.width
    # one tensor for every per-row list: building small tensors is a large part of a step
    per_row = torch.tensor([n, computed, ctx, n_blocks, lanes.lane, lanes.tok_off,
                            lanes.blk_off, lanes.order])  # (8, R)
    n_t, computed_t, ctx_t, n_blocks_t, lane, tok_off, blk_off, order = per_row
    row, i = _ragged(n_t)  # (N,): each new token's sequence and index within it
    pos = computed_t[row] + i
    new_index = lane[row] * T + tok_off[row] + i
    key_blocks, k_row, k_pos = _lane_keys(kv, lanes, [r.block_table for r in rows], n_blocks_t, lane, blk_off)
    slots = key_blocks.flatten()[lane[row] * lanes.blocks + blk_off[row] + pos // bs] * bs + pos % bs
    q_row, q_pos = _lane_queries(lanes, ctx_t, row, pos, new_index)
    if from_start:  # the keys are the lanes' own new tokens; padding columns belong to no row
        k_row = torch.full((L * T,), -1, dtype=torch.long).index_put_((new_index,), row).view(L, T)
        k_pos = q_pos
    tokens = torch.zeros(L * T, dtype=torch.long)
    tokens[new_index] = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.long)
    logits_index, logits_rows = _logits_at(lanes, tok_off + n_t - 1, lane, order)
    meta = AttnMetadata(
        kv=kv, query_lens=n_t.to(device), context_lens=ctx_t.to(device),
        positions=q_pos.to(device), new_index=new_index.to(device),
        logits_index=logits_index.to(device), logits_rows=logits_rows.to(device),
        slot_mapping=slots.to(device), key_blocks=key_blocks.to(device),
        attn_mask=_lane_mask(q_row, q_pos, k_row, k_pos, kv.sliding_window).to(device),
        from_start=from_start, dense=bool(torch.equal(new_index, torch.arange(L * T))))
    if T == 1 and not from_start and kv.sliding_window is None and kv.k[0].device.type == "cpu":
        meta.attention = attention_for(compiled, L * lanes.blocks, int(n_blocks_t.sum()))
        if meta.attention != "gather":  # one sequence per lane
            meta.lane_blocks = _lane_blocks(kv, key_blocks, n_blocks_t, ctx_t)
    return tokens.view(L, T).to(device), meta.positions, meta


def attention_for(compiled: bool, gathered_blocks: int, context_blocks: int) -> str:
    """How a CPU decode step attends (AttnMetadata.attention). Compiled: "flex", which reads
    the pool in place, where inductor has a CPU kernel for it (eager flex_attention would score
    every slot of the pool). Eager: "by_block" when the gather would copy at least as many
    blocks of padding as of context: it copies only the lanes' own blocks but runs a few more
    small ops per layer, which pays only once the padding is as large as what attention reads."""
    if compiled:
        return "flex" if FLEX_ON_CPU else "gather"
    return "by_block" if gathered_blocks - context_blocks >= context_blocks else "gather"


def split_decodes(rows: list[StepRow]) -> list[list[int]]:
    """Row indices for separate forward passes: single-token rows, then the longer ones.

    One dense (L, T) batch pads every lane to the longest chunk, so a step mixing a 512-token
    prefill chunk with decodes would compute 512 positions per decode; two passes do not.
    """
    decodes = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
    others = [i for i, r in enumerate(rows) if len(r.tokens) > 1]
    return [g for g in (decodes, others) if g]


@dataclass
class _Lanes:
    """Which lane (row of the dense batch) each sequence occupies, and where in it."""

    lane: list[int]
    tok_off: list[int]
    """Column of the sequence's first new token in its lane."""
    blk_off: list[int]
    """Index of the sequence's first key block among its lane's key blocks."""
    order: list[int]
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
    def first_fit(cls, n: list[int], n_blocks: list[int], from_start: bool) -> _Lanes:
        """First fit, longest first. From the start, keys are the lane's own tokens, so only
        tokens bound a lane; otherwise its key blocks are bounded too (they set S for every lane)."""
        width, cap = max(n), (sum(n_blocks) if from_start else max(n_blocks))
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
            out.order[r] = out.order[out.last_row[j]] + 1 if used_t[j] else 0
            used_t[j] += n[r]
            used_b[j] += n_blocks[r]
            out.last_row[j] = r
            if used_t[j] == width:
                open_lanes.remove(j)
        out.blocks = max(used_b)
        return out


def _logits_at(lanes: _Lanes, last_col: torch.Tensor, lane: torch.Tensor,
               order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnMetadata.logits_index (L, K) and logits_rows (R,), from each row's last column."""
    K = int(order.max()) + 1
    last_row = torch.tensor(lanes.last_row)
    index = last_col[last_row][:, None].repeat(1, K)  # (L, K), padded with the lane's last column
    index[lane, order] = last_col
    return index, lane * K + order


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
    L, bs = key_blocks.shape[0], kv.block_size
    last = key_blocks[torch.arange(L), n_blocks - 1].int()
    return LaneBlocks((n_blocks - 1).int().view(L, 1, 1), key_blocks.int().view(L, 1, 1, -1),
                      last.view(L, 1, 1, 1).expand(L, 1, 1, kv.num_blocks), (ctx - 1) % bs + 1, bs)


def _check_rows(kv: PagedKVCache, rows: list[StepRow], n: list[int], computed: list[int],
                n_blocks: list[int]) -> None:
    if not rows:
        raise ValueError("prepare_step needs at least one row")
    for i, (row, k, c, nb) in enumerate(zip(rows, n, computed, n_blocks, strict=True)):
        if k == 0 or c < 0:
            raise ValueError(f"row {i}: needs >= 1 new token and num_computed >= 0, "
                             f"got {k} tokens and num_computed={c}")
        if len(row.block_table) < nb:
            raise ValueError(f"row {i}: {len(row.block_table)} blocks of {kv.block_size} slots cannot hold "
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
