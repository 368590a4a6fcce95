"""HF interop: tiny random transformers models load into lmstack with the same logits and greedy
tokens, lmstack models save into directories transformers loads, and bad inputs fail clearly."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from lmstack.model import ModelConfig, RopeScaling, Transformer, generate  # noqa: E402
from lmstack.model.hf import config_from_hf, config_to_hf, hf_model_type, load_hf, save_hf  # noqa: E402

V = 256
_LLAMA_SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=None, eos_token_id=None)
HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=None, eos_token_id=None),
    "llama-gqa-llama3": lambda: LlamaConfig(
        **_LLAMA_SHAPE, attention_bias=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-tied": lambda: LlamaConfig(
        **_LLAMA_SHAPE, head_dim=32, mlp_bias=True, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral-window": lambda: MistralConfig(**_LLAMA_SHAPE, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**_LLAMA_SHAPE),
}




@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights and biases far from HF's init (zero biases, unit norms), so a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        is_norm = "norm" in name or ".ln_" in name
        p.copy_(1 + noise if is_norm and name.endswith("weight") else noise)


def hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager")
    randomize_(model, seed)
    return model.eval()


def max_logit_diff(hf, ours, tokens) -> float:
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    diff = max_logit_diff(hf, ours, tokens)
    print(f"{name}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_generation_matches_transformers(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 13, 9)]
    want = hf_generate(hf, prompts, 32)
    assert generate(ours, prompts, 32, pad_id=0) == want


def hf_generate(model, prompts, n):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    return out[:, T:].tolist()


# ----------------------------------------------------------------------------- lmstack -> HF

LMSTACK_CONFIGS = {
    "llama": lambda: ModelConfig.from_preset(
        "tiny-llama", rope_scaling=RopeScaling("llama3", 4.0, original_max_len=32)),
    "gpt2": lambda: ModelConfig.from_preset("tiny-gpt2", gelu_approximate="none"),
    "qwen2-window": lambda: ModelConfig.from_preset("tiny-llama", qkv_bias=True, sliding_window=8),
}


def lmstack_model(name: str) -> Transformer:
    model = Transformer.build(LMSTACK_CONFIGS[name]())
    randomize_(model)
    return model.eval()


@pytest.mark.parametrize("name", list(LMSTACK_CONFIGS))
def test_save_hf_loads_in_transformers(name, tmp_path):
    ours = lmstack_model(name)
    save_hf(ours, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__.lower().startswith(hf_model_type(ours.config))
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    diff = max_logit_diff(hf, ours, tokens)
    print(f"lmstack {name} -> transformers: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert config_from_hf(hf.config.to_dict()) == ours.config  # transformers read what we meant
    assert load_hf(tmp_path / "out").config == ours.config


def test_sharded_save_loads_in_both(tmp_path):
    ours = lmstack_model("llama")
    save_hf(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    tokens = torch.randint(0, V, (1, 12))
    want = ours(tokens)
    assert (load_hf(tmp_path)(tokens) - want).abs().max() == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_logit_diff(hf, ours, tokens) <= 1e-4
    save_hf(ours, tmp_path)  # unsharded into the same directory: the old shards go away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (load_hf(tmp_path)(tokens) - want).abs().max() == 0


def test_dtype_is_written_and_read(tmp_path):
    ours = lmstack_model("gpt2")
    save_hf(ours, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(tmp_path).embed_tokens.weight.dtype == torch.bfloat16
    assert load_hf(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32
    assert next(ours.parameters()).dtype == torch.float32  # saving does not cast the model


def test_pytorch_model_bin(tmp_path):
    hf = hf_model("qwen2")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = torch.randint(0, V, (2, 10))
    assert max_logit_diff(hf, load_hf(tmp_path), tokens) <= 1e-4
    # the sharded form: two .bin files and an index
    (tmp_path / "pytorch_model.bin").unlink()
    names = list(hf.state_dict())
    halves = {"a.bin": names[: len(names) // 2], "b.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: hf.state_dict()[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert max_logit_diff(hf, load_hf(tmp_path), tokens) <= 1e-4


def test_gpt2_file_without_prefix_and_with_buffers(tmp_path):
    hf = hf_model("gpt2")
    hf.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128).tril()  # old files carry the mask buffer
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()  # tied: present and ignored
    save_file(sd, tmp_path / "model.safetensors")
    assert max_logit_diff(hf, load_hf(tmp_path), torch.randint(0, V, (2, 10))) <= 1e-4


# ----------------------------------------------------------------------------- configs

def test_old_and_new_rope_fields_read_the_same():
    base = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    old = config_from_hf({**base, "rope_theta": 5e5,
                          "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                      "rope_theta": 5e5}})
    assert old == new and old.rope_scaling == RopeScaling("linear", 2.0) and old.rope_theta == 5e5


def test_config_round_trip_per_family():
    for name in HF_CONFIGS:
        cfg = config_from_hf(HF_CONFIGS[name]().to_dict())
        assert config_from_hf(config_to_hf(cfg)) == cfg, name


@pytest.mark.parametrize("overrides, match", [
    (dict(pos="rope", norm="layernorm", mlp="gelu"), "gpt2, which needs pos='learned'"),
    (dict(out_bias=True), "llama, which needs qkv_bias == out_bias"),
    (dict(sliding_window=8, mlp_bias=True), "mistral, which needs no biases"),
    (dict(qkv_bias=True, head_dim=32), "qwen2, which needs head_dim"),
])
def test_save_rejects_configs_no_family_expresses(overrides, match, tmp_path):
    model = Transformer.build(ModelConfig.from_preset("tiny-llama", **overrides))
    with pytest.raises(ValueError, match=match):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, match", [
    (dict(model_type="bert"), r"model_type='bert' is not supported.*'gpt2', 'llama'"),
    (dict(num_key_value_heads=3), "n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(num_attention_heads=5, head_dim=None), "dim=64 is not divisible by n_heads=5"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "mixes sliding and full"),
])
def test_bad_llama_configs(change, match):
    hf = {**_LLAMA_SHAPE, "model_type": "llama", "head_dim": 16, **change}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("change, match", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(activation_function="relu"), "activation_function='relu'"),
])
def test_bad_gpt2_configs(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**HF_CONFIGS["gpt2"]().to_dict(), **change})


# ----------------------------------------------------------------------------- bad directories

@pytest.fixture
def llama_dir(tmp_path):
    hf_model("llama-gqa-llama3").save_pretrained(tmp_path)
    return tmp_path


def test_missing_directory_config_and_weights(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        load_hf(llama_dir)


def test_unknown_model_type_in_directory(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(ValueError, match="model_type='falcon' is not supported"):
        load_hf(llama_dir)


def test_truncated_safetensors(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        load_hf(llama_dir)


def test_wrong_shape_missing_and_unexpected_tensors(llama_dir):
    file = llama_dir / "model.safetensors"
    good = load_file(file)
    bad = {**good, "model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)}
    save_file(bad, file)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight'.*\(100, 64\).*\(128, 64\)"):
        load_hf(llama_dir)
    bad = {k: v for k, v in good.items() if k != "model.norm.weight"} | {"model.extra": torch.zeros(1)}
    save_file(bad, file)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]; unexpected \['model.extra'\]"):
        load_hf(llama_dir)


def test_missing_shard_is_named(tmp_path):
    save_hf(lmstack_model("gpt2"), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {shard}, which is missing"):
        load_hf(tmp_path)
