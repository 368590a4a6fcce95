"""Engine policy in pure Python: BlockManager, Scheduler, SamplingParams, incremental text.

The property test drives the real Scheduler + BlockManager with random arrivals, lengths,
aborts and a tiny pool (so preemption happens), and keeps a fake KV pool: each computed token
writes (its whole prefix) into its slot, so a block shared through the prefix cache or reused
after eviction must hold exactly the prefix the sequence expects.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.outputs import IncrementalText
from lmstack.infer.sampling import SamplingParams
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import FinishReason, Sequence, SequenceStatus


def make_seq(seq_id: int, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(max_tokens=max_tokens))


# ----------------------------------------------------------------------------- BlockManager

def test_prefix_cache_hits_only_full_computed_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(0, list(range(10)))
    assert bm.match_prefix(a) == 0
    assert bm.allocate(a, 10) and len(a.block_table) == 3
    a.num_computed_tokens = 10
    bm.commit(a)  # blocks 0 and 1 are full (8 tokens); the third holds 2
    b = make_seq(1, list(range(8)) + [99, 98, 97])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    c = make_seq(2, list(range(8)))  # fully cached prompt: the last block is recomputed
    assert bm.match_prefix(c) == 4
    d = make_seq(3, [5] + list(range(1, 8)))  # differs in the first block: no hit anywhere
    assert bm.match_prefix(d) == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.commit(a)
    first_two = a.block_table[:2]
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4 and all(r == 0 for r in bm.ref_counts)
    warm = make_seq(1, [1, 2, 3, 4, 9])
    assert bm.match_prefix(warm) == 4 and warm.block_table == first_two
    bm.free_sequence(warm)
    # taking every block evicts the cached ones; the cache must forget them
    hog = make_seq(2, list(range(100, 108)))
    assert bm.allocate(hog, 8) and not bm.cached
    bm.free_sequence(hog)
    assert bm.match_prefix(make_seq(3, [1, 2, 3, 4, 9])) == 0


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_seq(0, [1, 2, 3])
    bm.allocate(a, 3)
    table = list(a.block_table)
    bm.free_sequence(a)
    a.block_table = table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free_sequence(a)


# ----------------------------------------------------------------------------- Scheduler

def run_step(sched: Scheduler, token: int = 7):
    batch = sched.schedule()
    sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
    sched.advance(batch)
    for s in sampled:
        s.output_token_ids.append(token)
        if len(s.output_token_ids) >= s.params.max_tokens:
            sched.finish(s, FinishReason.LENGTH)
    return batch


def test_chunked_prefill_mixes_with_decodes_under_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8, max_prefill_chunk=5)
    short, long = make_seq(0, [1, 2], max_tokens=10), make_seq(1, list(range(20)), max_tokens=2)
    sched.add(short)
    sched.add(long)
    b = run_step(sched)
    assert b.num_new_tokens == [2, 5]  # short prefill + first chunk of the long prompt
    b = run_step(sched)
    assert b.num_new_tokens == [1, 5] and b.num_tokens <= 8  # a decode rides along
    while long.num_computed_tokens < 20:
        b = run_step(sched)
        assert b.num_tokens <= 8 and max(b.num_new_tokens) <= 5
    assert long.output_token_ids == [7]  # sampled exactly when its prompt completed


def test_fcfs_and_preemption_of_the_youngest():
    bm = BlockManager(num_blocks=6, block_size=2)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    seqs = [make_seq(i, [i + 1] * 4, max_tokens=6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # all three prefill: 2 blocks each, pool full
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING] * 3
    b = run_step(sched)  # each needs a third block: the youngest gives way
    assert b.preempted == [seqs[2]] and seqs[2].status is SequenceStatus.WAITING
    assert seqs[2].block_table == [] and seqs[2].num_computed_tokens == 0
    assert seqs[2].output_token_ids == [7]  # outputs survive preemption
    while sched.has_unfinished():
        run_step(sched)
    assert all(len(s.output_token_ids) == 6 for s in seqs)
    assert bm.num_free_blocks == 6 and sched.num_preemptions >= 1


def test_abort_mid_prefill_frees_blocks_at_once():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_batched_tokens=4)
    s = make_seq(0, list(range(30)))
    sched.add(s)
    run_step(sched)
    assert 0 < s.num_computed_tokens < 30 and bm.num_free_blocks < 16
    sched.finish(s, FinishReason.ABORT)
    assert bm.num_free_blocks == 16 and s.finish_reason is FinishReason.ABORT
    assert not sched.has_unfinished()


# ----------------------------------------------------------------------------- property test

class EngineModel(RuleBasedStateMachine):
    """Random arrivals / steps / aborts against a fake KV pool that records prefixes."""

    lookahead = 0

    def __init__(self):
        super().__init__()
        self.bs = 2
        self.bm = BlockManager(num_blocks=8, block_size=self.bs)
        self.sched = Scheduler(self.bm, max_num_seqs=4, max_num_batched_tokens=6,
                               max_prefill_chunk=3, num_lookahead_slots=self.lookahead)
        self.pool: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, slot) -> prefix
        self.live: list[Sequence] = []
        self.next_id = 0
        self.rng = random.Random(0)

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=8),
          max_tokens=st.integers(1, 6))
    def add(self, prompt, max_tokens):
        # a request alone always fits the pool (the engine checks this in add_request)
        if self.bm.blocks_for(len(prompt) + max_tokens) > self.bm.num_blocks:
            return
        seq = make_seq(self.next_id, prompt, max_tokens)
        self.next_id += 1
        self.sched.add(seq)
        self.live.append(seq)

    @rule()
    def step(self):
        batch = self.sched.schedule()
        if self.live:
            assert batch.seqs, "requests are waiting but nothing was scheduled"
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert all(n >= 1 for n in batch.num_new_tokens)
        assert len(self.sched.running) <= self.sched.max_num_seqs
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            self._write(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        self.sched.advance(batch)
        for s in sampled:
            s.output_token_ids.append(self.rng.randrange(3))
            if len(s.output_token_ids) >= s.params.max_tokens:
                self._end(s, FinishReason.LENGTH)

    @rule(n=st.integers(2, 6))
    def steps(self, n):
        for _ in range(n):
            self.step()

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 99))
    def abort(self, pick):
        if pick < 40:  # abort less often than requests arrive, so the pool fills up
            self._end(self.live[pick % len(self.live)], FinishReason.ABORT)

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        tokens = seq.token_ids
        for p in range(start, end):
            block = seq.block_table[p // self.bs]
            assert self.bm.ref_counts[block] == 1, "wrote into a shared block"
            self.pool[(block, p % self.bs)] = tuple(tokens[:p + 1])

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        self.sched.finish(seq, reason)
        self.live.remove(seq)

    @invariant()
    def blocks_are_consistent(self):
        holders = [b for s in self.sched.running for b in s.block_table]
        for block, ref in enumerate(self.bm.ref_counts):
            assert ref >= 0
            assert ref == holders.count(block)
            assert (block in self.bm.free) == (ref == 0)
        for key, block in self.bm.cached.items():
            assert self.bm.block_key[block] == key
        assert all(not s.block_table for s in self.sched.waiting)

    @invariant()
    def cached_contents_are_right(self):
        for seq in self.sched.running:
            tokens = seq.token_ids
            for p in range(seq.num_computed_tokens):
                got = self.pool.get((seq.block_table[p // self.bs], p % self.bs))
                assert got == tuple(tokens[:p + 1]), f"seq {seq.seq_id} token {p}"

    def teardown(self):
        for _ in range(500):
            if not self.live:
                break
            self.step()
        assert not self.live, "requests never finished (livelock)"
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(r == 0 for r in self.bm.ref_counts)


class SpeculativeEngineModel(EngineModel):
    """The same with 3 lookahead slots reserved per decoding sequence (speculative decoding)."""

    lookahead = 3


SETTINGS = settings(max_examples=100, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
EngineModel.TestCase.settings = SpeculativeEngineModel.TestCase.settings = SETTINGS
test_scheduler_properties = EngineModel.TestCase
test_scheduler_properties_with_lookahead = SpeculativeEngineModel.TestCase


# ----------------------------------------------------------------------------- params and text

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("stop", [""]), ("stop_token_ids", [-1]), ("logprobs", -1),
])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_waits_for_whole_characters_and_cuts_stop_strings():
    tok = ByteTokenizer()
    text = IncrementalText(tok, [104, 105], stop=["END"])
    deltas = []
    for b in "héllo wENDx".encode():
        stop = text.add(b)
        deltas.append(text.delta(finished=stop is not None))
        assert "\ufffd" not in text.text
        if stop:
            break
    assert stop == "END" and text.text == "héllo w"
    assert "".join(deltas) == "héllo w"
    assert all("E" not in d for d in deltas)  # the held-back tail never leaked a partial stop
