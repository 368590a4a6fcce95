"""Paged KV cache: a pool of fixed-size blocks per layer, and the per-step metadata the model reads.

The engine owns which blocks belong to which sequence (its block tables); this file only turns
one step's rows into tensors and implements the model's cache protocol over the pool:
`mask(T, pad_mask)` once, `update(layer, k, v)` per layer, `advance(T)` at the end.

Attention is plain PyTorch: new keys/values are scattered into the pool at their slots, then each
row's keys/values are gathered back by its block table into a padded (B, Hkv, S, D) tensor that
SDPA reads with a (B, 1, T, S) boolean mask. Shapes: B rows, T new tokens (padded), S key slots
(the longest context in the step, rounded up to whole blocks), Hkv key/value heads, D head_dim,
P pool slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class PagedKVCache:
    """Pool of fixed-size blocks per layer: k[layer], v[layer] of shape (num_blocks, block_size, Hkv, D)."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sliding_window: int | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
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
        """The layer's keys and values as (P, Hkv, D) views, P = num_blocks * block_size."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])


@dataclass
class AttnMetadata:
    """One engine step over a PagedKVCache; passed as `cache=` to `Transformer.forward`."""

    kv: PagedKVCache
    query_lens: torch.Tensor
    """(B,) long: valid new tokens per row; the row's last logits sit at query_lens - 1."""
    context_lens: torch.Tensor
    """(B,) long: tokens in the row's context after this step (computed before + new)."""
    positions: torch.Tensor
    """(B, T) long: absolute positions; padded queries repeat the row's last valid position."""
    new_index: torch.Tensor
    """(N,) long: indices into the flattened (B * T) new tokens that are real."""
    slot_mapping: torch.Tensor
    """(N,) long: pool slot each real new token's key/value is written to."""
    key_blocks: torch.Tensor
    """(B, S / block_size) long: each row's block table padded with block 0 (masked out)."""
    attn_mask: torch.Tensor
    """(B, 1, T, S) bool: True where a query may attend a key."""
    fresh: bool = False
    """Every row starts at position 0, so the new keys are the whole context: skip the gather
    (then S = T, not a whole number of blocks)."""

    def mask(self, T: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """The step's mask; padding is already known from query_lens, so pad_mask is ignored."""
        if T != self.attn_mask.shape[2]:
            raise ValueError(f"the step was prepared for {self.attn_mask.shape[2]} new tokens per "
                             f"row, the model got {T}; pass prepare_step's tokens unchanged")
        return self.attn_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, Hkv, T, D) keys/values into the pool; return (B, Hkv, S, D) contexts."""
        pool_k, pool_v = self.kv.flat(layer)
        B, Hkv, T, D = k.shape
        for new, pool in ((k, pool_k), (v, pool_v)):
            rows = new.transpose(1, 2).reshape(B * T, Hkv, D)[self.new_index]  # (N, Hkv, D)
            pool.index_copy_(0, self.slot_mapping, rows.to(pool.dtype))
        if self.fresh:
            return k, v
        # whole blocks: index_select of contiguous (block_size, Hkv, D) chunks is several times
        # faster than gathering single slots
        blocks = self.key_blocks.flatten()
        k_all = self.kv.k[layer].index_select(0, blocks).view(B, -1, Hkv, D)  # (B, S, Hkv, D)
        v_all = self.kv.v[layer].index_select(0, blocks).view(B, -1, Hkv, D)
        return k_all.transpose(1, 2), v_all.transpose(1, 2)  # (B, Hkv, S, D)

    def advance(self, T: int) -> None:
        """Nothing to do: the scheduler tracks how many tokens each sequence has computed."""


Row = tuple[list[int], list[int], int]


def prepare_step(kv: PagedKVCache, rows: list[Row], device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
    """rows: one per sequence: (new_token_ids, block_table, num_computed_tokens_before_this_step).

    Returns tokens (B, T) right-padded with 0, positions (B, T), and the step's AttnMetadata.
    The new tokens' KV go to slot block_table[p // block_size] * block_size + p % block_size
    for p = num_computed + i.
    """
    _check_rows(kv, rows)
    bs = kv.block_size
    q_lens = torch.tensor([len(r[0]) for r in rows])
    computed = torch.tensor([r[2] for r in rows])
    ctx_lens = computed + q_lens
    B, T = len(rows), int(q_lens.max())
    fresh = bool((computed == 0).all())  # the new keys are the whole context: no gather
    S = T if fresh else -(-int(ctx_lens.max()) // bs) * bs  # key slots, whole blocks
    valid = torch.arange(T)[None, :] < q_lens[:, None]  # (B, T)
    tokens = torch.zeros(B, T, dtype=torch.long)
    tokens[valid] = torch.tensor([t for r in rows for t in r[0]], dtype=torch.long)
    tables = _pad_tables([r[1] for r in rows], -(-int(ctx_lens.max()) // bs))  # (B, blocks)
    positions = torch.minimum(computed[:, None] + torch.arange(T), ctx_lens[:, None] - 1)
    slots = tables.gather(1, positions // bs) * bs + positions % bs  # (B, T)
    meta = AttnMetadata(
        kv=kv, query_lens=q_lens.to(device), context_lens=ctx_lens.to(device),
        positions=positions.to(device), new_index=valid.flatten().nonzero().squeeze(1).to(device),
        slot_mapping=slots[valid].to(device), key_blocks=tables[:, : S // bs].to(device),
        attn_mask=_step_mask(positions, ctx_lens, S, kv.sliding_window).to(device), fresh=fresh)
    return tokens.to(device), meta.positions, meta


def _check_rows(kv: PagedKVCache, rows: list[Row]) -> None:
    if not rows:
        raise ValueError("prepare_step needs at least one row")
    for i, (new, table, computed) in enumerate(rows):
        if not new or computed < 0:
            raise ValueError(f"row {i}: needs >= 1 new token and num_computed >= 0, "
                             f"got {len(new)} tokens and num_computed={computed}")
        if len(table) * kv.block_size < computed + len(new):
            raise ValueError(f"row {i}: {len(table)} blocks of {kv.block_size} slots cannot hold "
                             f"{computed + len(new)} tokens; allocate more blocks first")
        if table and not 0 <= min(table) <= max(table) < kv.num_blocks:
            raise ValueError(f"row {i}: block ids must lie in [0, {kv.num_blocks}), got {table}")


def _pad_tables(tables: list[list[int]], width: int) -> torch.Tensor:
    """Block tables -> (B, width) long, padded with block 0 (its slots are masked out)."""
    width = max(width, max(len(t) for t in tables))
    out = torch.zeros(len(tables), width, dtype=torch.long)
    for b, t in enumerate(tables):
        out[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out


def _step_mask(positions: torch.Tensor, ctx_lens: torch.Tensor, S: int,
               window: int | None) -> torch.Tensor:
    """(B, 1, T, S): a query sees real keys at or before its position (within the window).

    A padded query sits at its row's last real position, so it always sees itself: no query
    has an empty softmax row and SDPA never yields NaN.
    """
    q = positions[:, :, None]  # (B, T, 1)
    k = torch.arange(S)[None, None, :]  # (1, 1, S)
    allowed = (k <= q) & (k < ctx_lens[:, None, None])
    if window is not None:
        allowed &= q - k < window
    return allowed[:, None]
