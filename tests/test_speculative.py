"""Speculative decoding: accept/reject statistics, and token-identical greedy output in the engine."""

import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.speculative import accept_greedy, accept_sampled, sample_from
from lmstack.model import ModelConfig, Transformer

V, K, TRIALS = 12, 3, 40_000



def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of observed counts against probabilities.

    The survival function of chi-square with d degrees of freedom at x is the regularized upper
    incomplete gamma Q(d / 2, x / 2). A count in a zero-probability bin is impossible: p = 0.
    """
    keep = probs > 1e-9
    if counts[~keep].sum() > 0:
        return 0.0
    expected = probs[keep].double() * counts.sum()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(keep.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def far_apart(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target p (K + 1, V) and a draft q (K, V) that puts its mass where p has little."""
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(K + 1, V, generator=g) * 1.5).softmax(-1)
    q = (-3 * p[:K].log()).softmax(-1)  # peaks where p is smallest
    p[:, -1] = 0.0  # a token the target never emits but the draft often proposes
    return p / p.sum(-1, keepdim=True), q


def emitted_histograms(p, q, trials, seed):
    """Run `trials` independent verifications at once; histogram the tokens at positions 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    draft = sample_from(q.expand(trials, K, V), g)  # (trials, K)
    tokens, n = accept_sampled(p.expand(trials, -1, -1), q.expand(trials, -1, -1), draft, g)
    first = torch.bincount(tokens[:, 0], minlength=V)
    second = torch.bincount(tokens[n >= 1, 1], minlength=V)  # emitted only when draft 0 was accepted
    return first, second, n


def test_sample_from_matches_probs():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = torch.bincount(sample_from(probs.expand(20_000, 4), g), minlength=4)
    assert chi_square_p_value(counts, probs) > 1e-3


def test_first_token_follows_target_distribution():
    p, q = far_apart(seed=1)
    first, second, n = emitted_histograms(p, q, TRIALS, seed=2)
    assert chi_square_p_value(first, p[0]) > 1e-3
    assert chi_square_p_value(second, p[1]) > 1e-3
    # power check: the draft's own distribution is rejected by the same test
    assert chi_square_p_value(torch.bincount(sample_from(q[0].expand(TRIALS, V)), minlength=V),
                              p[0]) < 1e-6


def test_acceptance_rate_is_overlap_of_p_and_q():
    p, q = far_apart(seed=3)
    _, _, n = emitted_histograms(p, q, TRIALS, seed=4)
    overlap = torch.minimum(p[0], q[0]).sum()  # P(accept draft 0) = sum_x min(p(x), q(x))
    assert (n >= 1).float().mean().item() == pytest.approx(overlap.item(), abs=0.01)


def test_identical_draft_is_always_accepted_and_bonus_follows_last_target():
    p, _ = far_apart(seed=5)
    q = p[:K].clone()
    g = torch.Generator().manual_seed(6)
    draft = sample_from(q.expand(TRIALS, K, V), g)
    tokens, n = accept_sampled(p.expand(TRIALS, -1, -1), q.expand(TRIALS, -1, -1), draft, g)
    assert (n == K).all()
    assert torch.equal(tokens[:, :K], draft)
    assert chi_square_p_value(torch.bincount(tokens[:, K], minlength=V), p[K]) > 1e-3


def test_unbatched_shapes():
    p, q = far_apart(seed=7)
    tokens, n = accept_sampled(p, q, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert tokens.shape == (K + 1,) and n.shape == ()
    assert 0 <= int(n) <= K


def test_greedy_accepts_matching_prefix_then_takes_target_argmax():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, K + 1, V, generator=g)
    best = logits.argmax(-1)
    draft = best[:, :K].clone()
    draft[1, 0] = (best[1, 0] + 1) % V  # reject at 0
    draft[2, 2] = (best[2, 2] + 1) % V  # reject at 2
    draft[3, 1] = (best[3, 1] + 1) % V  # reject at 1; the later match must not count
    tokens, n = accept_greedy(logits, draft)
    assert n.tolist() == [K, 0, 2, 1]
    assert torch.equal(tokens, best)  # emitted tokens are exactly plain greedy's


# ----------------------------------------------------------------------------- in the engine

def tiny(seed: int, **overrides) -> Transformer:
    return Transformer.build(ModelConfig.from_preset("tiny-llama", **overrides), seed=seed).eval()


PROMPTS = [[1, 2, 3], [7] * 11, list(range(40, 60)), [5], [9, 8, 7, 6, 5, 4, 3, 2]]
MAX_TOKENS = [20, 7, 33, 1, 25]


def greedy_run(target, prompts=PROMPTS, stop=(), **options):
    llm = LLM(target, block_size=4, **options)
    params = [SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=list(stop))
              for m in MAX_TOKENS]
    return llm, [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_random_draft_matches_plain_greedy(k):
    target, draft = tiny(0), tiny(1, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64)
    _, plain = greedy_run(target)
    llm, spec = greedy_run(target, speculative_model=draft, num_speculative_tokens=k)
    assert spec == plain
    stats = llm.stats()
    assert stats["spec_draft_tokens"] > 0  # speculative steps did run
    assert 0.0 <= stats["spec_acceptance_rate"] < 1.0


def test_compiled_speculative_steps_match_plain_greedy(monkeypatch):
    """compile=True: the draft's steps and the target's verify pass run compiled, same tokens.
    (Without inductor's GEMM autotuning, which test_engine covers: it would take minutes here.)"""
    from lmstack.infer import compiled as compiled_module

    monkeypatch.setattr(compiled_module, "CPU_FROZEN", compiled_module.FROZEN)
    target, draft = tiny(0), tiny(1, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64)
    _, plain = greedy_run(target)
    llm = LLM(target, block_size=4, compile=True, speculative_model=draft, num_speculative_tokens=3,
              compile_probe_steps=0)
    widths = {"target": [], "draft": []}
    for name, step in (("target", llm.runner.decode), ("draft", llm.speculator.draft_runner.decode)):
        compiled = step.frozen
        step.frozen = lambda m, t, *a, c=compiled, w=widths[name]: w.append(t.shape[1]) or c(m, t, *a)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in MAX_TOKENS]
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == plain
    assert llm.stats()["spec_draft_tokens"] > 0
    assert 4 in widths["target"] and set(widths["draft"]) == {1}  # verify: k + 1 tokens
    assert llm.runner.decode.eager_reason is None
    assert llm.speculator.draft_runner.decode.eager_reason is None


def test_target_as_its_own_draft_accepts_everything():
    target = tiny(0)
    _, plain = greedy_run(target)
    llm, spec = greedy_run(target, speculative_model=tiny(0), num_speculative_tokens=4)
    assert spec == plain
    assert llm.stats()["spec_acceptance_rate"] == 1.0
    out = llm.generate([[3, 1, 4]], SamplingParams(max_tokens=9, temperature=0.0))[0]
    assert out.metrics.num_accepted_draft_tokens == out.metrics.num_draft_tokens > 0


def test_stop_tokens_and_preemption_match_plain_greedy():
    """A stop token inside an accepted run ends the output there; a small pool forces
    preemptions and steps without room for the draft tokens."""
    target, draft = tiny(0), tiny(2, n_layers=1)
    _, ref = greedy_run(target)
    stop = [ref[2][5]]
    _, plain = greedy_run(target, stop=stop, num_blocks=16)
    llm, spec = greedy_run(target, stop=stop, num_blocks=16,
                           speculative_model=draft, num_speculative_tokens=3)
    assert spec == plain
    assert any(len(t) < m and t[-1] == stop[0] for t, m in zip(spec, MAX_TOKENS, strict=True))
    assert llm.stats()["num_preemptions"] > 0 and llm.stats()["spec_draft_tokens"] > 0


def test_sampling_with_a_seed_is_reproducible_and_valid():
    target, draft = tiny(0), tiny(3, n_layers=1)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_k=50, seed=7)
    runs = [LLM(target, block_size=4, speculative_model=draft, num_speculative_tokens=3)
            .generate(PROMPTS[:3], params) for _ in range(2)]
    tokens = [[o.token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1]
    assert all(len(t) == 24 and max(t) < target.config.vocab_size for t in tokens[0])


def test_speculative_errors():
    target = tiny(0)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(target, speculative_model=tiny(1), num_speculative_tokens=0)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(target, speculative_model=tiny(1, vocab_size=300))


def test_sampled_speculative_tokens_follow_the_target():
    """Plain and speculative sampling give the same distribution of later tokens (two-sample
    chi-square over an 8-token vocabulary, many requests in one batch)."""
    target, draft = tiny(0, vocab_size=8), tiny(4, vocab_size=8, n_layers=1)
    params = SamplingParams(max_tokens=4, temperature=1.0)
    runs = []
    for opts in ({}, {"speculative_model": draft, "num_speculative_tokens": 3}):
        llm = LLM(target, block_size=4, max_num_seqs=512, seed=len(opts), **opts)
        outs = llm.generate([[1, 2, 3]] * 3000, params)
        runs.append(torch.tensor([o.token_ids for o in outs]))  # (requests, 4)
    assert 0.05 < llm.stats()["spec_acceptance_rate"] < 0.95  # both accepts and rejections
    for position in (1, 2, 3):  # token 0 comes from the prefill step, not from speculation
        a, b = (torch.bincount(r[:, position], minlength=8).double() for r in runs)
        keep = (a + b) > 0
        stat = ((a - b)[keep] ** 2 / (a + b)[keep]).sum()
        dof = torch.tensor(int(keep.sum()) - 1, dtype=torch.float64)
        assert torch.special.gammaincc(dof / 2, stat / 2) > 1e-3
