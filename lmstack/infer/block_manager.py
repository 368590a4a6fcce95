"""BlockManager: which KV-cache blocks belong to which sequence (pure Python, no torch).

The paged KV pool is `num_blocks` blocks of `block_size` token slots. A sequence's block table
lists its blocks in order; token p lives in block_table[p // block_size] at p % block_size.

Prefix caching: a full block whose keys/values are computed is registered under the key
(hash of the previous block's key, its tokens), so the key names the block's whole prefix and a
later sequence with the same leading tokens reuses the block instead of recomputing it (blocks
are shared by reference count). Only full blocks are shared, so a shared block is never written.
A block whose reference count drops to 0 goes to the back of the free list but keeps its key:
it can still be hit until it is handed out again (least recently freed first = LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict

from lmstack.infer.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}  # key -> block id, for full computed blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------- prefix cache

    def _key(self, seq: Sequence, i: int) -> BlockKey:
        """Key of the sequence's block i (extends seq.block_hashes up to i)."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            seq.block_hashes.append(hash(self._raw_key(seq, j)))
        return self._raw_key(seq, i)

    def _raw_key(self, seq: Sequence, i: int) -> BlockKey:
        bs = self.block_size
        prev = seq.block_hashes[i - 1] if i > 0 else None
        return prev, tuple(seq.token_slice(i * bs, (i + 1) * bs))

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the leading full blocks of a sequence with no blocks yet;
        return how many tokens they cover. At least one token is always left to compute,
        because the last token's logits are needed."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        self.queried_tokens += seq.num_tokens
        if not self.enable_prefix_caching:
            return 0
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(self._key(seq, i))
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        hit = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = hit
        seq.num_committed_blocks = len(seq.block_table)
        self.hit_tokens += hit
        return hit

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_committed_blocks, full):
            block = seq.block_table[i]
            key = self._key(seq, i)
            if self.block_key[block] is None and key not in self.cached:
                self.cached[key] = block  # else a prefix hit, or another sequence was first
                self.block_key[block] = key
        seq.num_committed_blocks = max(seq.num_committed_blocks, full)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block, so that none is reused (after the model's weights change
        their keys and values are stale); return how many were cached. Blocks in use stay
        with their sequences."""
        n = len(self.cached)
        self.cached.clear()
        self.block_key = [None] * self.num_blocks
        return n

    # ------------------------------------------------------------------------- allocation

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold num_new_tokens more tokens; False (and no change) if
        there are not enough free blocks."""
        if not self.can_allocate(seq, num_new_tokens):
            return False
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            key = self.block_key[block]
            if key is not None:  # evict: the block's old contents are about to be overwritten
                del self.cached[key]
                self.block_key[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks stay cached (by key) until reused."""
        for block in reversed(seq.block_table):  # tail first, so it is evicted first
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed with reference count "
                                   f"{self.ref_counts[block]} (double free)")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_committed_blocks = 0
