"""The Transformer's numerics: SDPA vs a written-out reference, cached decoding vs full forward,
config validation, meta-device build and the model's own accounting."""

import math

import pytest
import torch

import lmstack.model.transformer as transformer
from lmstack.model import ModelConfig, StaticCache, Transformer, generate
from lmstack.model.cache import causal_mask
from lmstack.model.generate import left_pad, top_k_mask, top_p_mask
from lmstack.model.transformer import reference_attention, rope_frequencies, sdpa


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (6, 1)])
def test_sdpa_matches_reference_causal_gqa(H, Hkv):
    torch.manual_seed(0)
    q = torch.randn(2, H, 11, 16)
    k, v = torch.randn(2, Hkv, 11, 16), torch.randn(2, Hkv, 11, 16)
    assert (sdpa(q, k, v, None) - reference_attention(q, k, v)).abs().max() <= 1e-5


def test_sdpa_matches_reference_with_padding_and_cache_offset():
    torch.manual_seed(1)
    B, H, Hkv, T, S, D = 3, 8, 2, 4, 10, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[0, :3] = False  # left padding of different lengths
    key_valid[1, :6] = False
    mask = causal_mask(S - T, key_valid)  # the last T slots query all S
    assert mask.shape == (B, 1, T, S)
    diff = (sdpa(q, k, v, mask) - reference_attention(q, k, v, mask)).abs().max()
    assert diff <= 1e-5
    # a query at slot s sees no later slot and no padding (except itself)
    assert not mask[1, 0, 0, :6].any() and mask[1, 0, 0, 6]
    assert not mask[2, 0, 0, S - T + 1:].any()


@pytest.mark.parametrize("native", [False, True])  # the fp32 detour on CPUs without bf16 kernels, or not
def test_bf16_sdpa_matches_the_fp32_reference(native, monkeypatch):
    monkeypatch.setattr(transformer, "NATIVE_CPU_BF16", native)
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = causal_mask(12 - 5, torch.ones(2, 12, dtype=torch.bool))
    out = sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), mask)
    assert (out.float() - ref).abs().max() <= 2e-2  # bf16 rounding of the output


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_sdpa_with_grad_runs_in_fp32(native, autocast, monkeypatch):
    """Training in bf16 (bf16 inputs, or fp32 ones under bf16 autocast) computes attention in
    fp32 on every CPU, returns bf16, and its gradients match the fp32 reference."""
    monkeypatch.setattr(transformer, "NATIVE_CPU_BF16", native)
    seen, real = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
                        or real(q, *a, **kw))
    torch.manual_seed(2)
    leaves = [torch.randn(2, 8, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)]
    leaves = [t.bfloat16().float().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sdpa(*(t if autocast else t.bfloat16() for t in leaves), None)
    assert seen == [(torch.float32, False)] and out.dtype == torch.bfloat16  # fp32, autocast off
    grad = torch.randn(out.shape)
    out.float().backward(grad)
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    reference_attention(*refs, None).backward(grad)
    for got, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, ref.grad, rtol=2e-2, atol=2e-2)


def test_sliding_window_mask_limits_lookback():
    mask = causal_mask(0, torch.ones(1, 8, dtype=torch.bool), sliding_window=3)[0, 0]
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert not mask[7, :5].any() and mask[7, 5:].all()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_incremental_decoding_matches_full_forward(preset):
    model = Transformer.build(ModelConfig.from_preset(preset), seed=0).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        full = model(x)
        cache = StaticCache.for_model(model, 2, 32)
        steps = [model(x[:, :9], cache=cache)]
        steps += [model(x[:, i:i + 1], cache=cache) for i in range(9, 17)]
    assert cache.length == 17
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_left_padded_batch_matches_each_prompt_alone():
    model = Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=0).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batched = generate(model, prompts, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 12 for out in batched)


def test_sliding_window_model_decodes_like_full_forward():
    cfg = ModelConfig.from_preset("tiny-llama", sliding_window=4)
    model = Transformer.build(cfg, seed=0).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(x)
        cache = StaticCache.for_model(model, 1, 12)
        steps = [model(x[:, i:i + 1], cache=cache) for i in range(12)]
        no_window = Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=0).eval()(x)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    assert (full[:, :4] - no_window[:, :4]).abs().max() <= 1e-5  # window not yet reached
    assert (full[:, -1] - no_window[:, -1]).abs().max() > 1e-3  # window cuts the past


def test_generate_stops_at_stop_token_and_is_seeded():
    model = Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=0).eval()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=10)[0]
    stop = greedy[3]
    first = greedy.index(stop)
    assert generate(model, [[1, 2, 3]], 10, stop_tokens=[stop])[0] == greedy[:first + 1]
    a = generate(model, [[1, 2, 3]], 10, temperature=1.0, seed=7)
    b = generate(model, [[1, 2, 3]], 10, temperature=1.0, seed=7)
    c = generate(model, [[1, 2, 3]], 10, temperature=1.0, seed=8)
    assert a == b and a != c


def test_top_k_and_top_p_masks_are_exact():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda masked: torch.isfinite(masked)[0].tolist()
    assert kept(top_k_mask(logits, 2)) == [True, True, False, False, False]
    assert kept(top_p_mask(logits, 0.5)) == [True, False, False, False, False]
    assert kept(top_p_mask(logits, 0.7)) == [True, True, False, False, False]
    assert kept(top_p_mask(logits, 0.71)) == [True, True, True, False, False]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert kept(top_p_mask(shuffled, 0.71)) == [False, True, False, True, True]


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    cfg = ModelConfig.from_preset("tiny-llama", rope_scaling=dict(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64))
    base = rope_frequencies(cfg.head_dim, cfg.rope_theta, None)
    scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4
    low = wavelen > 64
    assert torch.equal(scaled[high], base[high])
    assert torch.allclose(scaled[low], base[low] / 8)


def test_meta_build_is_deterministic_and_inits_once():
    cfg = ModelConfig.from_preset("tiny-llama")
    a, b = Transformer.build(cfg, seed=3), Transformer.build(cfg, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not any(p.is_meta for p in a.parameters())
    assert a.layers[0].self_attn.o_proj.weight.std() < a.layers[0].self_attn.q_proj.weight.std()
    assert torch.equal(a.layers[0].input_layernorm.weight, torch.ones(cfg.dim))


def test_accounting_counts_params_flops_and_kv_bytes():
    cfg = ModelConfig.from_preset("gpt2-124m")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == 124_439_808  # the published GPT-2 small count
    n = model.num_params(exclude_embeddings=True)
    assert n == 124_439_808 - 1024 * 768  # tied head counted once, position table dropped
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert model.kv_bytes_per_token(torch.bfloat16) == 2 * 12 * 12 * 64 * 2


@pytest.mark.parametrize("field,value,match", [
    ("n_heads", 5, "dim=64 is not divisible by n_heads=5"),
    ("n_kv_heads", 3, "multiple of n_kv_heads=3"),
    ("norm", "batchnorm", "norm='batchnorm'"),
    ("vocab_size", 0, "vocab_size=0 must be positive"),
    ("norm_eps", 0.0, "norm_eps"),
    ("sliding_window", -1, "sliding_window"),
])
def test_config_rejects_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset("tiny-llama", **{field: value})


def test_config_round_trips_through_json(tmp_path):
    cfg = ModelConfig.from_preset("tiny-llama", rope_scaling=dict(kind="linear", factor=2.0))
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(KeyError, match="tiny-llama"):
        ModelConfig.from_preset("no-such-model")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"hiden_size": 3})


def test_bad_generation_requests_raise():
    model = Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0, "cpu")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))
