"""Paged attention (PagedKVCache + prepare_step) against the contiguous full forward pass."""

import dataclasses
import random

import pytest
import torch

from lmstack.model import ModelConfig, Transformer, paged
from lmstack.model.paged import PagedKVCache, last_token_logits, prepare_step, split_decodes

TOL = 1e-5



def build(preset: str, **overrides) -> Transformer:
    return Transformer.build(ModelConfig.from_preset(preset, **overrides), seed=0).eval()


def shuffled_tables(lengths: list[int], block_size: int, num_blocks: int, seed: int) -> list[list[int]]:
    """Give each sequence enough blocks, drawn from a shuffled pool so tables are non-contiguous."""
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    return [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]


@torch.no_grad()
def run_schedule(model, seqs, schedule, block_size, seed=0, tables=None, pack=False):
    """Feed each sequence through the paged cache in the chunks `schedule` asks for.

    schedule: list of steps, each a list of (sequence index, number of new tokens).
    Returns per sequence the logits of each of its tokens, (len, V).
    """
    tables = tables or shuffled_tables([len(s) for s in seqs], block_size, 64, seed)
    kv = PagedKVCache.for_model(model, num_blocks=64, block_size=block_size)
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    for step in schedule:
        rows = [(seqs[i][done[i]:done[i] + n], tables[i], done[i]) for i, n in step]
        tokens, positions, meta = prepare_step(kv, rows, "cpu", pack=pack)
        logits = model(tokens, positions, cache=meta)
        assert torch.isfinite(logits).all()  # padded queries too
        if not pack:
            assert tokens.shape[0] == len(rows)
        new = logits.flatten(0, 1)[meta.new_index].split([n for _, n in step])
        for b, (i, n) in enumerate(step):
            assert int(meta.query_lens[b]) == n
            out[i].append(new[b])
            done[i] += n
    assert done == [len(s) for s in seqs], "schedule must cover every token"
    return [torch.cat(o) for o in out]


@torch.no_grad()
def assert_matches_full(model, seqs, got):
    for s, logits in zip(seqs, got, strict=True):
        ref = model(torch.tensor([s]))[0]
        torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)


def random_seqs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


MIXED = [  # prefill chunk of one row next to decodes of others
    [(0, 13), (1, 4)],
    [(0, 1), (1, 3), (2, 9)],
    [(0, 1), (1, 1), (2, 11)],
    [(2, 1), (0, 1), (1, 1)],
    [(1, 1), (2, 1)],
]


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-llama", {}),                    # GQA + RoPE
    ("tiny-gpt2", {}),                     # MHA + learned positions
    ("tiny-llama", {"sliding_window": 5}),  # windowed keys span several blocks
])
@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("by_block", [False, True], ids=["gather", "by-block"])
def test_mixed_prefill_and_decode_match_full_forward(preset, overrides, block_size, pack, by_block,
                                                     monkeypatch):
    """by_block: eager decode steps attend block by block, not only past a padding size."""
    if by_block:
        monkeypatch.setattr(paged, "BY_BLOCK_MIN_PADDING", 0)
    model = build(preset, **overrides)
    seqs = random_seqs([16, 10, 22], model.config.vocab_size)
    assert_matches_full(model, seqs, run_schedule(model, seqs, MIXED, block_size, pack=pack))


def random_schedule(lengths: list[int], rng: random.Random) -> list[list[tuple[int, int]]]:
    """Random chunk sizes for every sequence, rows in random order, until all are consumed."""
    left, steps = list(lengths), []
    while any(left):
        live = [i for i, n in enumerate(left) if n and rng.random() < 0.8] or [left.index(max(left))]
        rng.shuffle(live)
        step = [(i, rng.randint(1, min(left[i], 7))) for i in live]
        for i, n in step:
            left[i] -= n
        steps.append(step)
    return steps


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_and_tables(seed):
    rng = random.Random(seed)
    model = build("tiny-llama")
    lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 5))]
    seqs = random_seqs(lengths, model.config.vocab_size, seed)
    schedule = random_schedule(lengths, rng)
    for pack in (False, True):
        got = run_schedule(model, seqs, schedule, rng.choice([2, 5, 8]), seed, pack=pack)
        assert_matches_full(model, seqs, got)


@pytest.mark.parametrize("pack", [False, True])
def test_fresh_prefill_batch_of_different_lengths(pack):
    model = build("tiny-llama", sliding_window=4)
    seqs = random_seqs([5, 12, 1, 7, 3], model.config.vocab_size)
    step = [(0, 5), (1, 12), (2, 1), (3, 7), (4, 3)]
    assert_matches_full(model, seqs, run_schedule(model, seqs, [step], 4, pack=pack))
    kv = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    tables = shuffled_tables([5, 12, 1, 7, 3], 4, 16, seed=0)
    tokens, _, _ = prepare_step(kv, [(s, t, 0) for s, t in zip(seqs, tables, strict=True)], "cpu", pack)
    assert tokens.shape == ((3, 12) if pack else (5, 12))  # 12 | 7 + 5 | 3 + 1


@torch.no_grad()
def test_shared_prefix_block_is_reused():
    """A second sequence reads the first one's full prefix block and computes only its tail."""
    model, bs = build("tiny-llama"), 4
    a = random_seqs([10], model.config.vocab_size)[0]
    b = a[:8] + random_seqs([5], model.config.vocab_size, seed=1)[0]
    kv = PagedKVCache.for_model(model, num_blocks=16, block_size=bs)
    table_a, table_b = [7, 2, 11], [7, 2, 5, 9]  # first two blocks (8 tokens) shared
    tokens, positions, meta = prepare_step(kv, [(a, table_a, 0)], "cpu")
    model(tokens, positions, cache=meta)
    tokens, positions, meta = prepare_step(kv, [(b[8:], table_b, 8)], "cpu")
    logits = model(tokens, positions, cache=meta)[0]
    torch.testing.assert_close(logits, model(torch.tensor([b]))[0, 8:], atol=TOL, rtol=0)


def test_slot_mapping_and_positions():
    kv = PagedKVCache(1, num_blocks=8, block_size=4, n_kv_heads=1, head_dim=2)
    tokens, positions, meta = prepare_step(kv, [([5, 6, 7], [3, 6], 3), ([9], [1], 0)], "cpu")
    assert tokens.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert positions.tolist() == [[3, 4, 5], [0, 0, 0]]  # padding repeats the last real position
    assert meta.slot_mapping.tolist() == [3 * 4 + 3, 6 * 4 + 0, 6 * 4 + 1, 1 * 4 + 0]
    assert meta.context_lens.tolist() == [6, 1]
    assert meta.attn_mask.shape == (2, 1, 3, 8)  # keys in whole blocks: 6 tokens -> 2 blocks
    assert meta.key_blocks.tolist() == [[3, 6], [1, 0]]
    assert meta.attn_mask[0, 0].sum(-1).tolist() == [4, 5, 6]
    assert meta.attn_mask[1, 0, :, 1:].sum() == 0  # row 1 has one real key


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@torch.no_grad()
def test_last_token_logits_of_mixed_steps(preset):
    """Decodes and prefill chunks run as separate passes, the chunks packed into lanes."""
    model = build(preset)
    seqs = random_seqs([16, 10, 22, 5], model.config.vocab_size)
    tables = shuffled_tables([len(s) for s in seqs], 3, 64, seed=1)
    kv = PagedKVCache.for_model(model, num_blocks=64, block_size=3)
    done = [0] * len(seqs)
    for step in [*MIXED[:2], [(0, 1), (1, 1), (2, 11), (3, 5)], *MIXED[3:]]:
        rows = [(seqs[i][done[i]:done[i] + n], tables[i], done[i]) for i, n in step]
        got = last_token_logits(model, kv, rows, "cpu")
        for b, (i, n) in enumerate(step):
            done[i] += n
            ref = model(torch.tensor([seqs[i][:done[i]]]))[0, -1]
            torch.testing.assert_close(got[b], ref, atol=TOL, rtol=0)


def test_packed_lanes():
    kv = PagedKVCache(1, num_blocks=8, block_size=4, n_kv_heads=1, head_dim=2)
    rows = [([5, 6, 7], [3, 6], 3), ([9], [1], 0), ([4, 4], [2], 0)]
    tokens, positions, meta = prepare_step(kv, rows, "cpu", pack=True)
    assert tokens.tolist() == [[5, 6, 7], [4, 4, 9]]  # rows 2 and 1 share the second lane
    assert positions.tolist() == [[3, 4, 5], [0, 1, 0]]
    assert meta.logits_index.tolist() == [[2, 2], [1, 2]]  # lane 0 has one row: padded
    assert meta.logits_rows.tolist() == [0, 3, 2]
    assert meta.key_blocks.tolist() == [[3, 6], [2, 1]]
    mask = meta.attn_mask[1, 0].int().tolist()  # lane 1: keys = row 2's block, then row 1's
    assert mask == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    assert split_decodes(rows) == [[1], [0, 2]]
    assert not meta.dense  # lane 0 has padding, lane 1 holds row 2 before row 1
    decodes = [([5], [3, 6], 5), ([9], [1], 0)]
    assert prepare_step(kv, decodes, "cpu", pack=True)[2].dense


def test_errors():
    kv = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="cannot hold"):
        prepare_step(kv, [([1, 2, 3], [0], 3)], "cpu")
    with pytest.raises(ValueError, match="block ids"):
        prepare_step(kv, [([1], [4], 0)], "cpu")
    with pytest.raises(ValueError, match="new token"):
        prepare_step(kv, [([], [0], 0)], "cpu")
    with pytest.raises(ValueError, match="at least one row"):
        prepare_step(kv, [], "cpu")


def test_blocks_for_budget():
    model = build("tiny-llama")
    per_token = model.kv_bytes_per_token()  # 2 * 2 layers * 2 heads * 16 dims * 4 bytes
    assert PagedKVCache.blocks_for_budget(model, per_token * 16 * 10 + 5, block_size=16) == 10
    kv = PagedKVCache.for_model(model, num_blocks=10, block_size=16)
    pool_bytes = sum(t.numel() * t.element_size() for t in kv.k + kv.v)
    assert pool_bytes == per_token * 16 * 10
    with pytest.raises(ValueError, match="budget"):
        PagedKVCache.blocks_for_budget(model, per_token, block_size=16)


@pytest.mark.parametrize("compiled", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        not paged.FLEX_ON_CPU, reason="inductor's CPU flex_attention needs AVX2")),
], ids=["eager", "compiled"])
@pytest.mark.parametrize("preset,dtype,atol", [
    ("tiny-llama", torch.float32, TOL),  # GQA: query heads fold onto their key/value head
    ("tiny-gpt2", torch.float32, TOL),   # MHA
    ("tiny-llama", torch.bfloat16, 3e-2),
])
def test_decode_attends_by_lane_blocks_without_the_gather(preset, dtype, atol, compiled,
                                                           monkeypatch):
    """A decode step reads each lane's blocks through LaneBlocks, by (lane, block) pairs eager
    and with flex_attention over the pool compiled, never gathering the padded context, and
    gives the gather path's logits: contexts ending mid-block, on a block's last slot and on a
    new block's first, a block shared by two sequences, and lanes of different lengths."""
    model = build(preset).to(dtype)
    bs = 4
    kv = PagedKVCache.for_model(model, num_blocks=32, block_size=bs)
    seqs = random_seqs([9, 12, 7, 3], model.config.vocab_size)
    seqs[1][:8] = seqs[0][:8]
    tables = shuffled_tables([len(s) + 1 for s in seqs], bs, 32, seed=3)
    tables[1][:2] = tables[0][:2]  # seqs 0 and 1 share their first two (full) blocks
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill all but the last token
            if i == 1:  # its shared blocks are filled: only the rest
                rows = [(s[8:-1], tables[i], 8)]
            else:
                rows = [(s[:-1], tables[i], 0)]
            tokens, positions, meta = prepare_step(kv, rows, "cpu")
            model(tokens, positions, cache=meta)
    decode = [(s[-1:], t, len(s) - 1) for s, t in zip(seqs, tables, strict=True)]  # ctx 9, 12, 7, 3
    tokens, positions, meta = prepare_step(kv, decode, "cpu")
    blocks = meta.lane_blocks
    assert blocks.last_fill.tolist() == [1, 4, 3, 3]
    assert blocks.full_count.flatten().tolist() == [2, 2, 1, 0]
    lane, block, bias = blocks.pairs
    assert lane.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3]
    assert block.tolist() == [b for t, n in zip(tables, [3, 3, 2, 1], strict=True) for b in t[:n]]
    assert (bias[0, :, 0] == 0).sum(1).tolist() == [4, 4, 1, 4, 4, 4, 4, 3, 3]  # keys per pair
    blocks.by_block = True  # whatever the padding: these contexts pad little
    with torch.no_grad():
        ref = model(tokens, positions, cache=dataclasses.replace(meta, lane_blocks=None))  # gathers

    def no_gather(*args):
        raise AssertionError("the decode step gathered the lanes' keys")

    monkeypatch.setattr(paged.AttnMetadata, "gather", no_gather)
    step = lambda t, p, m: model(t, p, cache=m)  # noqa: E731
    if compiled:
        step = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        got = step(tokens, positions, meta)
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)


def test_lane_blocks_only_for_decode_steps_without_a_window(monkeypatch):
    seqs = [([1], [0, 1], 5), ([2], [2], 2)]
    kv = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    assert prepare_step(kv, seqs, "cpu")[2].lane_blocks is not None
    # eager steps attend by block once padding to the longest lane would copy enough: here one
    # padded block of 4 slots x 2 dims x 4 bytes, keys and values, 64 bytes
    monkeypatch.setattr(paged, "BY_BLOCK_MIN_PADDING", 64)
    assert prepare_step(kv, seqs, "cpu")[2].lane_blocks.by_block
    monkeypatch.setattr(paged, "BY_BLOCK_MIN_PADDING", 65)
    assert not prepare_step(kv, seqs, "cpu")[2].lane_blocks.by_block
    assert prepare_step(kv, [([1, 2], [0, 1], 4)], "cpu")[2].lane_blocks is None  # 2 new tokens
    assert prepare_step(kv, [([1], [0], 0)], "cpu")[2].lane_blocks is None  # fresh: no pool read
    windowed = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2, sliding_window=3)
    assert prepare_step(windowed, seqs, "cpu")[2].lane_blocks is None
