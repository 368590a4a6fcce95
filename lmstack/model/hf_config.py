"""Hugging Face `config.json` <-> ModelConfig for GPT-2, Llama, Mistral and Qwen2.

Reading rejects, with a ValueError naming the field, anything lmstack cannot run exactly
(other activations, RoPE types, GPT-2 attention variants, Qwen2's mixed sliding layers).
Which family a ModelConfig is written as follows from its typed fields (`hf_model_type`).
"""

from __future__ import annotations

from lmstack.model.config import ModelConfig, RopeScaling

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


# ----------------------------------------------------------------------------- config: HF -> lmstack

def config_from_hf(hf: dict) -> ModelConfig:
    """An HF `config.json` dict -> ModelConfig; ValueError for anything lmstack cannot run exactly."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported; lmstack reads "
                         f"{sorted(ARCHITECTURES)}")
    fields = _gpt2_fields(hf) if model_type == "gpt2" else _llama_fields(hf, model_type)
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # restate in terms of the file the user holds
        raise ValueError(f"{model_type} config.json describes no valid model: {e} "
                         "(hidden_size/n_embd -> dim, num_attention_heads/n_head -> n_heads, "
                         "num_key_value_heads -> n_kv_heads)") from e


def _need(hf: dict, key: str):
    if hf.get(key) is None:
        raise ValueError(f"{hf['model_type']} config.json has no {key!r}; add it")
    return hf[key]


def _gpt2_fields(hf: dict) -> dict:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"gpt2 config sets {flag}=true, which lmstack does not implement; "
                             "only plain GPT-2 attention is supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("gpt2 config sets scale_attn_weights=false; lmstack always scales by "
                         "1/sqrt(head_dim)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise ValueError(f"gpt2 activation_function={act!r} is not supported; use one of {sorted(_GELU)}")
    dim = _need(hf, "n_embd")
    return dict(vocab_size=_need(hf, "vocab_size"), dim=dim, n_layers=_need(hf, "n_layer"),
                n_heads=_need(hf, "n_head"), hidden_dim=hf.get("n_inner") or 4 * dim,
                max_seq_len=_need(hf, "n_positions"), norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approximate=_GELU[act],
                pos="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                init_std=hf.get("initializer_range", 0.02))


def _llama_fields(hf: dict, model_type: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{model_type} hidden_act={act!r} is not supported; SwiGLU needs 'silu'")
    theta, scaling = _rope_from_hf(hf)
    heads = _need(hf, "num_attention_heads")
    attn_bias = model_type == "llama" and hf.get("attention_bias", False)
    return dict(vocab_size=_need(hf, "vocab_size"), dim=_need(hf, "hidden_size"),
                n_layers=_need(hf, "num_hidden_layers"), n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
                hidden_dim=_need(hf, "intermediate_size"),
                max_seq_len=_need(hf, "max_position_embeddings"), norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope", rope_theta=theta,
                rope_scaling=scaling, qkv_bias=attn_bias or model_type == "qwen2", out_bias=attn_bias,
                mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False),
                sliding_window=_sliding_window(hf, model_type),
                init_std=hf.get("initializer_range", 0.02))


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """Both forms: transformers 5 `rope_parameters`, older `rope_theta` + `rope_scaling`."""
    # transformers 5 also lets `rope_scaling` win when a file carries both
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported; lmstack uses one RoPE")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    required = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    if kind not in required:
        raise ValueError(f"rope type {kind!r} is not supported; lmstack implements {list(required)}")
    missing = [k for k in required[kind] if k not in params]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {missing} in rope_scaling/rope_parameters")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(original))


def _sliding_window(hf: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type != "qwen2" or not hf.get("use_sliding_window"):
        return None
    # Qwen2 slides only in layers >= max_window_layers; lmstack has one window for every layer
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    sliding = {t == "sliding_attention" for t in types}
    if sliding == {True, False}:
        raise ValueError("qwen2 config mixes sliding and full attention layers (max_window_layers="
                         f"{hf.get('max_window_layers')}); lmstack needs all or none sliding")
    return _need(hf, "sliding_window") if sliding == {True} else None


# ----------------------------------------------------------------------------- config: lmstack -> HF

def hf_model_type(cfg: ModelConfig) -> str:
    """The HF family that expresses `cfg` exactly; ValueError saying why when none does."""
    if cfg.pos == "learned" or cfg.norm == "layernorm" or cfg.mlp == "gelu":
        family, checks = "gpt2", {
            "pos='learned', norm='layernorm', mlp='gelu'":
                (cfg.pos, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"),
            "qkv_bias, out_bias and mlp_bias all True": cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias,
            "norm_bias=True": cfg.norm_bias,
            "n_kv_heads == n_heads": cfg.n_kv_heads == cfg.n_heads,
            "head_dim == dim // n_heads": cfg.head_dim * cfg.n_heads == cfg.dim,
            "sliding_window=None": cfg.sliding_window is None}
    elif cfg.qkv_bias and not cfg.out_bias:
        family, checks = "qwen2", {
            "mlp_bias=False": not cfg.mlp_bias,
            "head_dim == dim // n_heads": cfg.head_dim * cfg.n_heads == cfg.dim}
    elif cfg.sliding_window is not None:
        family, checks = "mistral", {
            "no biases (qkv_bias, out_bias, mlp_bias False)":
                not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias)}
    else:
        family, checks = "llama", {"qkv_bias == out_bias": cfg.qkv_bias == cfg.out_bias}
    failed = [need for need, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"no Hugging Face family expresses this config: it is closest to {family}, "
                         f"which needs {'; '.join(failed)}")
    return family


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> an HF `config.json` dict (without dtype; `save_hf` adds it)."""
    model_type = hf_model_type(cfg)
    hf = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
          "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
          "initializer_range": cfg.init_std,
          # special tokens belong to the tokenizer; None keeps HF's per-family defaults out
          "bos_token_id": None, "eos_token_id": None}
    hf.update(_gpt2_config(cfg) if model_type == "gpt2" else _llama_config(cfg, model_type))
    return hf


def _gpt2_config(cfg: ModelConfig) -> dict:
    return {"n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_dim, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu"}


def _llama_config(cfg: ModelConfig, model_type: str) -> dict:
    hf = {"hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          **_rope_to_hf(cfg)}
    if model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        hf.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: spell out that every layer slides (or none does)
        sliding = cfg.sliding_window is not None
        hf.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                  max_window_layers=0 if sliding else cfg.n_layers,
                  layer_types=[("sliding" if sliding else "full") + "_attention"] * cfg.n_layers)
    return hf


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """Both forms, so old and new transformers read the same RoPE."""
    s, scaling = cfg.rope_scaling, None
    if s is not None:
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                           original_max_position_embeddings=s.original_max_len)
    params = {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}
