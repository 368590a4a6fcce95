"""The LLM engine on tiny random models (CPU): greedy invariance against the reference decoder,
sampling functions on hand-made distributions, seeds, stop conditions, streaming, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.infer import compiled as compiled_module
from lmstack.infer.compiled import SHARED, CompileCache, Variant, decode_variant
from lmstack.infer.sampling import BatchSampling, apply_penalties, min_p_mask, sample
from lmstack.kernels import CPU_PACKED, swap_linears
from lmstack.kernels.packed import COPIES, PackedLinear
from lmstack.model import ModelConfig, Transformer, generate
from lmstack.model.generate import top_k_mask, top_p_mask

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)




def build(preset: str, seed: int = 0) -> Transformer:
    # a wider init than the default spreads the logits, so greedy ties are (far) rarer than fp noise
    return Transformer.build(ModelConfig.from_preset(preset, init_std=0.1), seed=seed).eval()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request):
    return build(request.param)


def mixed_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (60,), generator=g).tolist()
    other = torch.randint(0, 256, (40,), generator=g).tolist()
    # mixed lengths; several share a long prefix with `base` (prefix caching has work to do)
    return [base[:1], base[:19] + [3], other[:7], base[:37], base[:33] + [5, 6], other[:40],
            base[:60], [9, 9, 9]]


@pytest.fixture(scope="module")
def reference(model):
    return [generate(model, [p], MAX_TOKENS)[0] for p in mixed_prompts()]


def assert_all_free(llm: LLM) -> None:
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks
    assert all(r == 0 for r in llm.blocks.ref_counts) and not llm.requests


# ----------------------------------------------------------------------------- greedy invariance

ENGINES = {
    "continuous batching": dict(),
    "chunked prefill": dict(max_num_batched_tokens=8, max_prefill_chunk=3),
    "no prefix caching": dict(enable_prefix_caching=False, block_size=4),
    "two seats": dict(max_num_seqs=2, block_size=8),
    # the longest request alone needs 18 blocks of 4: 20 blocks force preemption
    "preemption": dict(num_blocks=20, block_size=4),
}


@pytest.mark.parametrize("options", ENGINES.values(), ids=ENGINES.keys())
def test_greedy_matches_one_at_a_time_generate(model, reference, options):
    llm = LLM(model, **options)
    outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    if "num_blocks" in options:
        assert llm.stats()["num_preemptions"] > 0
    assert_all_free(llm)


@pytest.mark.parametrize("pack", [False, True])
def test_packed_and_unpacked_engines_give_the_reference_tokens(reference, model, pack):
    """LLM(pack_weights=...) packs a CPU model's linears (or leaves them alone); both kernels
    give the reference decoder's greedy tokens."""
    fresh = Transformer.build(model.config, seed=0).eval()  # the same weights, no kernels
    llm = LLM(fresh, pack_weights=pack)
    linears = [type(m) for m in fresh.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(t is PackedLinear for t in linears) == pack
    assert any(t is PackedLinear for t in linears) == pack
    assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == reference


def test_compiled_decode_gives_the_reference_tokens_until_the_weights_change(model, reference,
                                                                           monkeypatch):
    """LLM(compile=True) runs decode steps through inductor (weights frozen in) and gives the
    reference tokens; once a weight changes in place, decode runs eagerly with the new weights."""
    from lmstack.infer.compiled import CompiledDecode

    # fp32 steps of at most 4 rows frozen (8 by default), so the 8 prompts' steps take both kinds
    fresh = Transformer.build(model.config, seed=0).eval()
    # no prefix caching: cached blocks would keep keys/values of the old weights
    llm = LLM(fresh, compile=True, enable_prefix_caching=False, compile_probe_steps=0,
              compile_frozen_rows=4)
    calls, decode = [], llm.runner.decode
    for name in ("frozen", "graph"):
        step = getattr(decode, name)
        setattr(decode, name, lambda *a, s=step, **k: calls.append(1) or s(*a, **k))
    with torch.profiler.profile() as prof:
        assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == reference
    # steps of several lanes ran oneDNN's packed linears inside the graph (eager never calls the op)
    assert any(e.name == "lmstack::packed_linear" for e in prof.events())
    assert isinstance(llm.runner.decode, CompiledDecode)
    assert len(calls) >= MAX_TOKENS - 1 and llm.runner.decode.eager_reason is None
    # another engine over the same, unchanged model reuses the compiled steps; a copy has
    # weights of its own, and compiled steps of its own
    assert LLM(fresh, compile=True, compile_probe_steps=0,
               compile_frozen_rows=4).runner.decode is llm.runner.decode
    assert LLM(copy.deepcopy(fresh), compile=True).runner.decode is not llm.runner.decode
    with torch.no_grad():
        fresh.layers[0].mlp.down_proj.weight.mul_(-3.0)
    changed = [generate(fresh, [p], MAX_TOKENS)[0] for p in mixed_prompts()]
    assert changed != reference
    n = len(calls)
    with pytest.warns(RuntimeWarning, match="weights changed"):
        outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == changed and len(calls) == n
    assert_all_free(llm)
    # a new engine compiles the new weights (not the first engine's frozen copies)
    again = LLM(fresh, compile=True, enable_prefix_caching=False, compile_probe_steps=0,
                compile_frozen_rows=4)
    assert [o.token_ids for o in again.generate(mixed_prompts(), GREEDY)] == changed
    assert again.runner.decode.eager_reason is None
    assert again.runner.decode is not llm.runner.decode


def test_compiled_decode_with_chunked_prefill_and_preemption(monkeypatch):
    """Compiled decode steps between prefill chunks and preemptions give the reference tokens.
    (Without inductor's GEMM autotuning, which the test above covers: these shapes recompile.)"""
    from lmstack.infer import compiled

    monkeypatch.setattr(compiled, "CPU_FROZEN", compiled.FROZEN)
    model = build("tiny-llama")
    reference = [generate(model, [p], MAX_TOKENS)[0] for p in mixed_prompts()]
    llm = LLM(model, compile=True, num_blocks=20, block_size=4, max_num_batched_tokens=8,
              max_prefill_chunk=3, compile_probe_steps=0)
    calls, step = [], llm.runner.decode.frozen
    llm.runner.decode.frozen = lambda *a: calls.append(1) or step(*a)
    assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == reference
    assert llm.stats()["num_preemptions"] > 0 and llm.runner.decode.eager_reason is None
    assert len(calls) >= MAX_TOKENS - 1
    assert_all_free(llm)


def test_compiled_decode_builds_one_graph_for_every_batch_of_several_lanes(monkeypatch):
    """As requests finish the batch shrinks (4, 3, 2, then 1 lane): one graph serves every
    batch of several lanes (dynamic from the first step: no static graph first), another a
    single lane; the tokens are the reference ones."""
    from lmstack.infer import compiled

    monkeypatch.setattr(compiled, "CPU_FROZEN", compiled.FROZEN)  # no GEMM autotuning: faster
    model = build("tiny-llama")
    prompts, lengths = mixed_prompts()[:4], [3, 5, 7, 9]
    reference = [generate(model, [p], n)[0] for p, n in zip(prompts, lengths, strict=True)]
    llm = LLM(model, compile=True, compile_probe_steps=0)
    step = llm.runner.decode.frozen
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o.token_ids for o in outs] == reference
    code = step._torchdynamo_orig_callable.__code__
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 2
    assert llm.runner.decode.eager_reason is None


@pytest.mark.parametrize("lanes", [1, 2, 6])
def test_compiled_bf16_decode_step_matches_eager_logits(lanes, decode_step_logits):
    """bf16 decode steps through inductor give the eager step's logits up to bf16 rounding, for
    a short and a longer context (one graph: the key dimension is dynamic). On CPU one or two
    lanes run inductor's C++ GEMM on frozen weights, six lanes oneDNN's packed linears (if this
    CPU packs bf16)."""
    from lmstack.infer import compiled

    model = build("tiny-llama").to(torch.bfloat16)
    swap_linears(model, CPU_PACKED)
    step = compiled.CompiledDecode(model, probe_steps=0)
    with torch.profiler.profile() as prof:
        results = decode_step_logits(model, step, lanes)
    assert step.eager_reason is None
    for out, eager, is_compiled in results:
        assert is_compiled
        scale = eager.abs().max()
        assert (out - eager).abs().max() <= 0.05 * scale  # measured: 0.006-0.012
        assert (out - eager).abs().mean() <= 0.01 * scale  # measured: 0.0015-0.0026
    packed_op = any(e.name == "lmstack::packed_linear" for e in prof.events())
    assert packed_op == (lanes > compiled.frozen_max_rows(torch.bfloat16) == 4)


def test_compiled_decode_falls_back_to_eager_when_compilation_fails(model, reference):
    llm = LLM(model, compile=True, pack_weights=False, compile_cache=CompileCache())

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no kernel for this op\nmore detail")

    llm.runner.decode.frozen = llm.runner.decode.graph = broken
    with pytest.warns(RuntimeWarning, match="compilation failed .*no kernel for this op"):
        outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert "no kernel" in llm.runner.decode.eager_reason
    assert_all_free(llm)


@pytest.mark.parametrize("probe_steps", [0, 2])
def test_a_variant_that_fails_to_compile_leaves_the_other_running(model, reference, probe_steps):
    """Only the frozen-weight graphs fail (as inductor's C++-template-only options do for an int4
    product on a CPU without AVX-512): the packed-weight graphs run the decode steps (or eager,
    where a probe finds it faster), with one warning naming the frozen graphs, and the tokens
    stay the reference."""
    llm = LLM(model, compile=True, compile_cache=CompileCache(), compile_probe_steps=probe_steps,
              compile_frozen_rows=64, enable_prefix_caching=False)  # the rows rule says frozen
    decode, packed_calls = llm.runner.decode, []

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("no choices for this op")

    packed = decode.graph
    decode.frozen = broken
    decode.graph = lambda *a: packed_calls.append(1) or packed(*a)
    with pytest.warns(RuntimeWarning, match="frozen-weight graphs: compilation failed .*no choices"):
        outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert decode.eager_reason is None and set(decode.failed) == {Variant.FROZEN}
    assert packed_calls  # the packed-weight graphs ran steps
    assert all(Variant.FROZEN not in p.candidates for p in decode.probes.values())
    assert_all_free(llm)


def test_decode_variant_is_a_pure_function_of_the_step():
    """Frozen weights up to 2 rows per byte of a weight element (8 fp32, 4 bf16), oneDNN's packed
    products above, on CPU; CUDA has only frozen graphs."""
    limit = compiled_module.frozen_max_rows
    assert (limit(torch.float32), limit(torch.bfloat16)) == (8, 4)
    assert decode_variant(8, 8, on_cpu=True) is Variant.FROZEN
    assert decode_variant(9, 8, on_cpu=True) is Variant.PACKED
    assert decode_variant(5, 4, on_cpu=True) is Variant.PACKED  # e.g. one lane verifying 4 drafts
    assert decode_variant(64, 4, on_cpu=False) is Variant.FROZEN


def test_compiled_steps_that_do_not_pay_run_eagerly(model, reference, monkeypatch):
    """Each kind of decode step is timed on both compiled variants and eagerly over its first
    steps; where the compiled steps were slower, eager is kept with one warning, and the tokens
    stay the reference."""
    import time

    monkeypatch.setattr(compiled_module, "CPU_FROZEN", compiled_module.FROZEN)
    llm = LLM(model, compile=True, compile_cache=CompileCache(), compile_probe_steps=2,
              enable_prefix_caching=False)
    decode, calls = llm.runner.decode, []
    for name in ("frozen", "graph"):
        step = getattr(decode, name)
        setattr(decode, name, lambda *a, s=step, n=name: calls.append(n) or time.sleep(0.1) or s(*a))
    with pytest.warns(RuntimeWarning, match="run eagerly from now on"):
        outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    judged = [p for p in decode.probes.values() if p.decided]
    assert judged and all(p.choice is compiled_module.EAGER for p in judged)
    assert all(set(p.timings) == {Variant.FROZEN, Variant.PACKED, None} for p in judged)
    assert {"frozen", "graph"} <= set(calls)  # both variants were tried
    n = len(calls)
    assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == reference
    assert len(calls) == n  # the same kinds of steps again: all eager now


def test_a_probe_keeps_the_fastest_candidate_per_row():
    """Candidates take turns (each compiled variant's first, compiling step untimed, first), and
    the one with the lowest best time wins, the rule's pick on a tie."""
    probe = compiled_module._Probe((Variant.FROZEN, Variant.PACKED, None))
    assert probe.next_turn() is Variant.FROZEN
    probe.warm |= {Variant.FROZEN, Variant.PACKED}
    probe.timings = {Variant.FROZEN: [3e-3, 2e-3], Variant.PACKED: [1e-3]}
    assert probe.next_turn() is None and not probe.ready(2)  # eager has no timing yet
    probe.timings[None] = [1.5e-3, 1.6e-3]
    assert probe.next_turn() is Variant.PACKED
    probe.timings[Variant.PACKED].append(1.2e-3)
    assert probe.ready(2)
    probe.decide()
    assert probe.decided and probe.choice is Variant.PACKED
    tie = compiled_module._Probe((Variant.PACKED, Variant.FROZEN, None),
                                 {Variant.PACKED: [1e-3], Variant.FROZEN: [1e-3], None: [1e-3]})
    tie.decide()
    assert tie.choice is Variant.PACKED


def test_prefix_cache_warm_equals_cold_and_hits(model, reference):
    llm = LLM(model, block_size=4)
    cold = llm.generate(mixed_prompts(), GREEDY)
    hits_cold = llm.blocks.hit_tokens
    warm = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in cold] == [o.token_ids for o in warm] == reference
    assert llm.blocks.hit_tokens - hits_cold >= 100  # most prompt blocks come from the cache
    assert sum(o.metrics.num_cached_tokens for o in warm) == llm.blocks.hit_tokens - hits_cold


def test_reset_prefix_cache_after_a_weight_change():
    """Cached blocks hold keys/values of the weights they were computed with: after an in-place
    change they would give wrong tokens, and reset_prefix_cache stops their reuse."""
    fresh = build("tiny-llama")
    llm = LLM(fresh, block_size=4)
    assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == [
        generate(fresh, [p], MAX_TOKENS)[0] for p in mixed_prompts()]
    cold_hits = llm.blocks.hit_tokens  # prompts sharing a prefix within the run
    with torch.no_grad():
        fresh.layers[0].self_attn.k_proj.weight.mul_(-2.0)
    changed = [generate(fresh, [p], MAX_TOKENS)[0] for p in mixed_prompts()]
    stale = [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)]
    assert stale != changed  # the old blocks were hit
    assert llm.reset_prefix_cache() > 0
    hits = llm.blocks.hit_tokens
    assert [o.token_ids for o in llm.generate(mixed_prompts(), GREEDY)] == changed
    assert llm.blocks.hit_tokens - hits == cold_hits  # as cold as the first run
    assert_all_free(llm)


@pytest.mark.parametrize("options", [{}, {"compile": True}, {"speculative": True},
                                     {"speculative": True, "compile": True}],
                         ids=["packed", "compiled", "speculative", "speculative-compiled"])
def test_weights_changed_after_writes_through_data(options, monkeypatch):
    """Writes through `.data` skip the version counters that packed copies and compiled steps
    check, so the engine goes on with copies of the old weights; weights_changed() packs and
    compiles again and drops cached blocks: then the new model's tokens, alone (a one-lane
    compiled graph, weights frozen in) and in a batch."""
    from lmstack.infer import compiled

    monkeypatch.setattr(compiled, "CPU_FROZEN", compiled.FROZEN)  # no GEMM autotuning: faster
    model = build("tiny-llama")
    prompts = mixed_prompts()
    reference = [generate(model, [p], MAX_TOKENS)[0] for p in prompts]
    draft = build("tiny-llama", seed=1) if options.get("speculative") else None
    llm = LLM(model, compile=options.get("compile", False), speculative_model=draft,
              compile_probe_steps=0)

    def tokens() -> list[list[int]]:  # one request alone, then all together
        alone = llm.generate([prompts[0]], GREEDY)[0].token_ids
        return [alone] + [o.token_ids for o in llm.generate(prompts[1:], GREEDY)]

    assert tokens() == reference
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.down_proj.weight.data.mul_(-3.0)
            layer.mlp.up_proj.weight.data.mul_(2.0)  # part of the gate/up stacked copy
    unpacked = copy.deepcopy(model)  # a copy has no packed copies: the new weights' reference
    changed = [generate(unpacked, [p], MAX_TOKENS)[0] for p in prompts]
    assert changed != reference
    assert tokens() == reference  # unseen: the engine still computes with the old copies
    watched = [model.layers[0].mlp.down_proj.weight, model.layers[0].mlp.gate_proj.weight]
    if draft is not None:
        watched.append(draft.layers[0].mlp.down_proj.weight)
    assert all(COPIES.get(w) is not None for w in watched)
    old_steps = [r.decode for r in llm.runners]
    assert llm.weights_changed() > 0  # cached prompt blocks dropped
    # the packed copies (the draft's too: its tokens only steer acceptance) are gone, and
    # compiled steps are new
    assert all(COPIES.get(w) is None for w in watched)
    assert all((r.decode is old) == (old is None) for r, old in zip(llm.runners, old_steps, strict=True))
    assert tokens() == changed
    if options.get("compile"):  # compiled again, not eager
        for runner in llm.runners:
            assert runner.decode.eager_reason is None
            assert runner.decode is SHARED.get(runner.model, probe_steps=0)
    assert_all_free(llm)


def test_requests_joining_a_running_batch(model, reference):
    """An outer loop adds a request every step: outputs do not depend on the neighbours."""
    llm = LLM(model, block_size=4, max_num_batched_tokens=16)
    prompts, done = mixed_prompts(), {}
    ids = []
    for p in reversed(prompts):
        ids.append(llm.add_request(p, GREEDY))
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    while llm.has_unfinished():
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    assert [done[i].token_ids for i in reversed(ids)] == reference
    assert_all_free(llm)


def test_bfloat16_engine_picks_the_argmax_up_to_rounding():
    """bf16 kernels differ in rounding between batch shapes, so near-ties may flip; every
    greedy pick must still be the full-sequence forward's argmax within bf16 rounding."""
    model = build("tiny-llama")
    llm = LLM(model, dtype="bfloat16")
    assert llm.kv.k[0].dtype == torch.bfloat16 and llm.model.lm_head.weight.dtype == torch.bfloat16
    prompts = mixed_prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for p, o in zip(prompts, outs, strict=True):
        logits = llm.model(torch.tensor([p + o.token_ids]))[0, len(p) - 1:-1].float()  # (8, V)
        chosen = logits.gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1)
        assert (logits.max(-1).values - chosen).max() < 0.05


# ----------------------------------------------------------------------------- sampling functions

def test_top_k_per_row_is_exact():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    out = top_k_mask(logits, torch.tensor([2, 2, 0]))
    keep = torch.isfinite(out)
    assert keep.tolist() == [[True, True, False, False], [False, True, True, True],  # tie kept
                             [True, True, True, True]]


def test_top_p_and_min_p_per_row_are_exact():
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(3, 4)
    kept = torch.isfinite(top_p_mask(logits, torch.tensor([0.5, 0.75, 0.8])))
    assert kept.sum(-1).tolist() == [1, 2, 3]
    kept = torch.isfinite(min_p_mask(logits, torch.tensor([0.0, 0.5, 0.6])))
    assert kept.sum(-1).tolist() == [4, 2, 1]


def test_penalties_on_a_hand_made_row():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    prompt = torch.tensor([[1, 0, 0, 0]])
    output = torch.tensor([[0, 2, 0, 0]])
    out = apply_penalties(logits, prompt, output, torch.tensor([2.0]), torch.tensor([0.25]),
                          torch.tensor([0.5]))
    assert out.tolist() == [[1.0, -2.0 * 2 - 0.5 * 2 - 0.25, 1.0, 0.5]]


def test_sampled_frequencies_follow_the_masked_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    n = 20000
    params = [SamplingParams(temperature=1.0, top_k=3)] * n
    s = BatchSampling.from_params(params, "cpu")
    g = torch.Generator().manual_seed(0)
    tokens = sample(probs.log().expand(n, 5), s, [None] * n, g)
    freq = torch.bincount(tokens, minlength=5).float() / n
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0]) / 0.9
    assert freq[3:].sum() == 0
    assert torch.allclose(freq, expected, atol=0.015)


# ----------------------------------------------------------------------------- seeds and stops

def test_seeded_request_is_the_same_alone_or_in_a_batch():
    model = build("tiny-llama")
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = LLM(model).generate([[5, 6, 7]], p)[0].token_ids
    others = [SamplingParams(max_tokens=12, temperature=1.0), SamplingParams(max_tokens=3, seed=7)]
    llm = LLM(model, max_prefill_chunk=4, seed=99, num_blocks=12, block_size=4)
    batch = llm.generate([list(range(30)), [5, 6, 7], [1, 2]], [others[0], p, others[1]])
    assert batch[1].token_ids == alone
    assert batch[1].metrics.num_preemptions > 0  # and a preemption in between changes nothing
    other_seed = LLM(model).generate([[5, 6, 7]], SamplingParams(max_tokens=12, seed=4321))
    assert other_seed[0].token_ids != alone


class LetterTokenizer:
    """Token t is the letter chr(97 + t % 26): every output decodes to plain ASCII."""

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


def test_stop_string_is_cut_and_never_streamed(model):
    llm = LLM(model, LetterTokenizer())
    full = llm.generate("hello", SamplingParams(max_tokens=24, temperature=0))[0]
    stop = full.text[9:12]
    cut = full.text.find(stop)
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop, "zzzzzz"])
    deltas = list(llm.stream("hello", params))
    final = deltas[-1]
    assert final.text == full.text[:cut] and final.finish_reason == "stop"
    assert final.stop_reason == stop
    assert "".join(d.delta_text for d in deltas) == final.text
    assert sum((d.delta_token_ids for d in deltas), []) == final.token_ids
    assert_all_free(llm)


def test_eos_and_stop_tokens_end_generation(model):
    llm = LLM(model, LetterTokenizer())
    full = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0))[0]
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    out = LLM(model, LetterTokenizer(eos_id=eos)).generate("abc", SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.text == full.text[:first]  # the EOS token is not part of the text
    ignore = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert LLM(model, LetterTokenizer(eos_id=eos)).generate("abc", ignore)[0].token_ids == full.token_ids
    by_id = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[eos]))[0]
    assert by_id.token_ids == out.token_ids and by_id.stop_reason == eos


def test_logprobs_match_the_model():
    model = build("tiny-llama")
    llm = LLM(model)
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    logp = model(torch.tensor([prompt + out.token_ids])).float().log_softmax(-1)[0]
    for i, lp in enumerate(out.logprobs):
        pos = len(prompt) - 1 + i
        assert lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, logp[pos, lp.token_id].item(), abs_tol=1e-4)
        assert list(lp.top) == logp[pos].topk(3).indices.tolist()  # greedy: top-1 is the token


def test_prompt_logprobs_match_the_model_and_the_decoded_logprobs():
    model = build("tiny-llama")
    llm = LLM(model, block_size=4)
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=2))[0]
    scored = llm.prompt_logprobs(prompt + out.token_ids, 2)
    logp = model(torch.tensor([prompt + out.token_ids])).float().log_softmax(-1)[0]
    assert scored[0] is None and len(scored) == len(prompt) + len(out.token_ids)
    for pos, lp in enumerate(scored[1:]):
        assert lp.token_id == (prompt + out.token_ids)[pos + 1]
        assert math.isclose(lp.logprob, logp[pos, lp.token_id].item(), abs_tol=1e-4)
        assert list(lp.top) == logp[pos].topk(2).indices.tolist()
    for decoded, again in zip(out.logprobs, scored[len(prompt):], strict=True):  # paged = one pass
        assert decoded.token_id == again.token_id
        assert math.isclose(decoded.logprob, again.logprob, abs_tol=1e-4)
    assert_all_free(llm)


def test_timing_and_stream_early_close(model):
    llm = LLM(model)
    out = llm.generate([[1, 2, 3]], GREEDY)[0].metrics
    assert out.arrival_time <= out.first_token_time <= out.finish_time
    it = llm.stream([[1, 2, 3], [4, 5]], GREEDY)
    next(it)
    it.close()  # leaving early aborts what is still running
    assert_all_free(llm)


# ----------------------------------------------------------------------------- bad input

def test_bad_requests_raise_and_leave_the_engine_working(model, reference):
    llm = LLM(model, LetterTokenizer(), num_blocks=30, block_size=4)
    too_long = list(range(model.config.max_seq_len))
    bad = [("", GREEDY, "empty"), ([], GREEDY, "empty"), (too_long, GREEDY, "context"),
           ([1, 999], GREEDY, "vocabulary|token ids"), ([1, 2], SamplingParams(max_tokens=500), "blocks")]
    for prompt, params, match in bad:
        with pytest.raises(ValueError, match=match):
            llm.add_request(prompt, params)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="empty"):  # one bad prompt: none of them is queued
        llm.generate([[1, 2], []], GREEDY)
    assert_all_free(llm)
    rid = llm.add_request(mixed_prompts()[3], SamplingParams(max_tokens=3))
    llm.step()
    assert llm.abort(rid).finish_reason == "abort"
    assert_all_free(llm)
    outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert_all_free(llm)


def test_abort_mid_prefill_frees_blocks_at_once(model):
    llm = LLM(model, block_size=4, max_num_batched_tokens=8)
    rid = llm.add_request(list(range(50)), GREEDY)
    llm.step()
    seq = llm.requests[rid].seq
    assert 0 < seq.num_computed_tokens < 50 and llm.blocks.num_free_blocks < llm.blocks.num_blocks
    llm.abort(rid)
    assert_all_free(llm)
    assert not llm.has_unfinished()


# ----------------------------------------------------------------------------- loading and CLI

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """An lmstack checkpoint dir (with a trained tokenizer) and an HF dir of the same model."""
    from safetensors.torch import save_file

    from lmstack.model.hf import save_hf
    from lmstack.model.tokenizer import Tokenizer

    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello engine"] * 20
    tok = Tokenizer.train(text, vocab_size=300)
    model = Transformer.build(ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size,
                                                      init_std=0.1), seed=3).eval()
    ckpt, hf = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("hf")
    model.config.save(ckpt / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    tok.save(ckpt)
    save_hf(model, hf)
    tok.save(hf)
    return model, tok, ckpt, hf


def test_loading_checkpoint_and_hf_dirs(model_dirs):
    model, tok, ckpt, hf = model_dirs
    params = SamplingParams(max_tokens=8, temperature=0)
    want = LLM(model, tok).generate("hello world", params)[0]
    for path in (ckpt, hf):
        out = LLM(str(path)).generate("hello world", params)[0]
        assert out.token_ids == want.token_ids and out.text == want.text


def test_generate_cli_prints_json(model_dirs, capsys):
    import json

    from lmstack.cli import main

    model, tok, ckpt, _ = model_dirs
    want = LLM(model, tok).generate("the quick", SamplingParams(max_tokens=6, temperature=0))[0]
    code = main(["generate", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "6",
                 "--temperature", "0", "--json", "true", "--block-size", "4"])
    assert code == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert main(["generate", str(ckpt), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


class Int8Linear(torch.nn.Module):
    """A stand-in for a quantized layer: int8 weight + per-row scale, no float `weight`."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", (w / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def test_quantized_weights_run_and_match_the_reference():
    model = build("tiny-llama", seed=5)
    for block in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, Int8Linear(getattr(block.self_attn, name)))
    prompts = mixed_prompts()[:5]
    ref = [generate(model, [p], 8)[0] for p in prompts]
    outs = LLM(model, block_size=4, max_prefill_chunk=5).generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    assert [o.token_ids for o in outs] == ref


def test_special_tokens_are_left_out_of_text_unless_asked(model_dirs):
    from lmstack.infer.outputs import IncrementalText

    tok = model_dirs[1]
    ids = tok.encode("hello<|im_end|> world")
    assert tok.token_to_id("<|im_end|>") in ids
    for skip, want in ((True, "hello world"), (False, "hello<|im_end|> world")):
        text = IncrementalText(tok, [], [], skip_special_tokens=skip)
        for t in ids:
            text.add(t)
        text.flush()
        assert text.text == want
