"""Step building (lmstack.infer.step) and paged attention over PagedKVCache, against the
contiguous full forward pass."""

import dataclasses
import random

import pytest
import torch

from lmstack.infer import step as step_module
from lmstack.infer.runner import ModelRunner
from lmstack.infer.step import StepRow, prepare_step, split_decodes
from lmstack.model import ModelConfig, Transformer, paged
from lmstack.model.paged import PagedKVCache

TOL = 1e-5



def build(preset: str, **overrides) -> Transformer:
    return Transformer.build(ModelConfig.from_preset(preset, **overrides), seed=0).eval()


def shuffled_tables(lengths: list[int], block_size: int, num_blocks: int, seed: int) -> list[list[int]]:
    """Give each sequence enough blocks, drawn from a shuffled pool so tables are non-contiguous."""
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    return [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]


@torch.no_grad()
def run_schedule(model, seqs, schedule, block_size, seed=0, tables=None, fill=False):
    """Feed each sequence through the paged cache in the chunks `schedule` asks for.

    schedule: list of steps, each a list of (sequence index, number of new tokens).
    Returns per sequence the logits of each of its tokens, (len, V).
    """
    tables = tables or shuffled_tables([len(s) for s in seqs], block_size, 64, seed)
    kv = PagedKVCache.for_model(model, num_blocks=64, block_size=block_size)
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    for step in schedule:
        rows = [StepRow(seqs[i][done[i]:done[i] + n], tables[i], done[i]) for i, n in step]
        tokens, positions, meta = prepare_step(kv, rows, "cpu", fill_lanes=fill)
        logits = model(tokens, positions, cache=meta)
        assert torch.isfinite(logits).all()  # padded queries too
        if not fill:
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
@pytest.mark.parametrize("fill", [False, True], ids=["lane-per-row", "fill-lanes"])
@pytest.mark.parametrize("attention", ["gather", "by_block"])
def test_mixed_prefill_and_decode_match_full_forward(preset, overrides, block_size, fill, attention,
                                                     monkeypatch):
    """Eager decode steps attend by gathering or block by block (whatever the padding)."""
    monkeypatch.setattr(step_module, "attention_for", lambda *a: attention)
    model = build(preset, **overrides)
    seqs = random_seqs([16, 10, 22], model.config.vocab_size)
    assert_matches_full(model, seqs, run_schedule(model, seqs, MIXED, block_size, fill=fill))


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
    for fill in (False, True):
        got = run_schedule(model, seqs, schedule, rng.choice([2, 5, 8]), seed, fill=fill)
        assert_matches_full(model, seqs, got)


@pytest.mark.parametrize("fill", [False, True])
def test_prefill_from_start_of_different_lengths(fill):
    model = build("tiny-llama", sliding_window=4)
    seqs = random_seqs([5, 12, 1, 7, 3], model.config.vocab_size)
    step = [(0, 5), (1, 12), (2, 1), (3, 7), (4, 3)]
    assert_matches_full(model, seqs, run_schedule(model, seqs, [step], 4, fill=fill))
    kv = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    tables = shuffled_tables([5, 12, 1, 7, 3], 4, 16, seed=0)
    rows = [StepRow(s, t, 0) for s, t in zip(seqs, tables, strict=True)]
    tokens, _, _ = prepare_step(kv, rows, "cpu", fill_lanes=fill)
    assert tokens.shape == ((3, 12) if fill else (5, 12))  # 12 | 7 + 5 | 3 + 1


@torch.no_grad()
def test_shared_prefix_block_is_reused():
    """A second sequence reads the first one's full prefix block and computes only its tail."""
    model, bs = build("tiny-llama"), 4
    a = random_seqs([10], model.config.vocab_size)[0]
    b = a[:8] + random_seqs([5], model.config.vocab_size, seed=1)[0]
    kv = PagedKVCache.for_model(model, num_blocks=16, block_size=bs)
    table_a, table_b = [7, 2, 11], [7, 2, 5, 9]  # first two blocks (8 tokens) shared
    tokens, positions, meta = prepare_step(kv, [StepRow(a, table_a, 0)], "cpu")
    model(tokens, positions, cache=meta)
    tokens, positions, meta = prepare_step(kv, [StepRow(b[8:], table_b, 8)], "cpu")
    logits = model(tokens, positions, cache=meta)[0]
    torch.testing.assert_close(logits, model(torch.tensor([b]))[0, 8:], atol=TOL, rtol=0)


def test_slot_mapping_and_positions():
    kv = PagedKVCache(1, num_blocks=8, block_size=4, n_kv_heads=1, head_dim=2)
    tokens, positions, meta = prepare_step(kv, [StepRow([5, 6, 7], [3, 6], 3), StepRow([9], [1], 0)], "cpu")
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
def test_runner_forward_of_mixed_steps(preset):
    """Decodes and prefill chunks run as separate passes, the chunks filling lanes."""
    model = build(preset)
    seqs = random_seqs([16, 10, 22, 5], model.config.vocab_size)
    tables = shuffled_tables([len(s) for s in seqs], 3, 64, seed=1)
    runner = ModelRunner(model, PagedKVCache.for_model(model, num_blocks=64, block_size=3))
    done = [0] * len(seqs)
    for step in [*MIXED[:2], [(0, 1), (1, 1), (2, 11), (3, 5)], *MIXED[3:]]:
        rows = [StepRow(seqs[i][done[i]:done[i] + n], tables[i], done[i]) for i, n in step]
        got = runner.forward(rows)
        for b, (i, n) in enumerate(step):
            done[i] += n
            ref = model(torch.tensor([seqs[i][:done[i]]]))[0, -1]
            torch.testing.assert_close(got[b], ref, atol=TOL, rtol=0)


def test_filled_lanes():
    kv = PagedKVCache(1, num_blocks=8, block_size=4, n_kv_heads=1, head_dim=2)
    rows = [StepRow([5, 6, 7], [3, 6], 3), StepRow([9], [1], 0), StepRow([4, 4], [2], 0)]
    tokens, positions, meta = prepare_step(kv, rows, "cpu", fill_lanes=True)
    assert tokens.tolist() == [[5, 6, 7], [4, 4, 9]]  # rows 2 and 1 share the second lane
    assert positions.tolist() == [[3, 4, 5], [0, 1, 0]]
    assert meta.logits_index.tolist() == [[2, 2], [1, 2]]  # lane 0 has one row: padded
    assert meta.logits_rows.tolist() == [0, 3, 2]
    assert meta.key_blocks.tolist() == [[3, 6], [2, 1]]
    mask = meta.attn_mask[1, 0].int().tolist()  # lane 1: keys = row 2's block, then row 1's
    assert mask == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    assert split_decodes(rows) == [[1], [0, 2]]
    assert not meta.dense  # lane 0 has padding, lane 1 holds row 2 before row 1
    decodes = [StepRow([5], [3, 6], 5), StepRow([9], [1], 0)]
    assert prepare_step(kv, decodes, "cpu", fill_lanes=True)[2].dense


def test_errors():
    kv = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="cannot hold"):
        prepare_step(kv, [StepRow([1, 2, 3], [0], 3)], "cpu")
    with pytest.raises(ValueError, match="block ids"):
        prepare_step(kv, [StepRow([1], [4], 0)], "cpu")
    with pytest.raises(ValueError, match="new token"):
        prepare_step(kv, [StepRow([], [0], 0)], "cpu")
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
        not step_module.FLEX_ON_CPU, reason="inductor's CPU flex_attention needs AVX2")),
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
                rows = [StepRow(s[8:-1], tables[i], 8)]
            else:
                rows = [StepRow(s[:-1], tables[i], 0)]
            tokens, positions, meta = prepare_step(kv, rows, "cpu")
            model(tokens, positions, cache=meta)
    decode = [StepRow(s[-1:], t, len(s) - 1) for s, t in zip(seqs, tables, strict=True)]  # ctx 9, 12, 7, 3
    if not compiled:  # these contexts pad too little for the rule to choose it
        monkeypatch.setattr(step_module, "attention_for", lambda *a: "by_block")
    tokens, positions, meta = prepare_step(kv, decode, "cpu", compiled=compiled)
    assert meta.attention == ("flex" if compiled else "by_block")
    blocks = meta.lane_blocks
    assert blocks.last_fill.tolist() == [1, 4, 3, 3]
    assert blocks.full_count.flatten().tolist() == [2, 2, 1, 0]
    lane, block, bias = blocks.pairs
    assert lane.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3]
    assert block.tolist() == [b for t, n in zip(tables, [3, 3, 2, 1], strict=True) for b in t[:n]]
    assert (bias[0, :, 0] == 0).sum(1).tolist() == [4, 4, 1, 4, 4, 4, 4, 3, 3]  # keys per pair
    with torch.no_grad():
        ref = model(tokens, positions, cache=dataclasses.replace(meta, attention="gather"))

    def no_gather(*args):
        raise AssertionError("the decode step gathered the lanes' keys")

    monkeypatch.setattr(paged.AttnMetadata, "gather", no_gather)
    step = lambda t, p, m: model(t, p, cache=m)  # noqa: E731
    if compiled:
        step = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        got = step(tokens, positions, meta)
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)


def test_attention_is_chosen_when_the_step_is_built():
    """CPU decode steps without a window attend by lane blocks: "flex" when compiled, else "by_block"
    once the gather would copy as many blocks of padding as of context; everything else gathers."""
    seqs = [StepRow([1], [0, 1, 3], 9), StepRow([2], [2], 2)]  # 3 + 1 blocks; the gather copies 6
    kv = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2)
    meta = prepare_step(kv, seqs, "cpu")[2]
    assert meta.attention == "gather" and meta.lane_blocks is None  # 2 padding blocks < 4
    long = [*seqs, StepRow([3], [2], 1), StepRow([4], [1], 0)]  # 6 blocks, 12 gathered
    meta = prepare_step(kv, long, "cpu")[2]
    assert meta.attention == "by_block" and meta.lane_blocks is not None
    if step_module.FLEX_ON_CPU:
        assert prepare_step(kv, seqs, "cpu", compiled=True)[2].attention == "flex"
    assert step_module.attention_for(False, 8, 4) == "by_block"
    assert step_module.attention_for(False, 7, 4) == "gather"
    assert prepare_step(kv, [StepRow([1, 2], [0, 1], 4)], "cpu")[2].lane_blocks is None  # 2 new tokens
    from_start = prepare_step(kv, [StepRow([1], [0], 0)], "cpu")[2]
    assert from_start.from_start and from_start.lane_blocks is None  # no pool read
    windowed = PagedKVCache(1, num_blocks=4, block_size=4, n_kv_heads=1, head_dim=2, sliding_window=3)
    assert prepare_step(windowed, long, "cpu", compiled=True)[2].attention == "gather"
