"""ModelConfig: one typed description of every model family lmstack builds, plus named presets.

A family (GPT-2, Llama, Mistral, Qwen2) is a choice of typed fields, never a name to search.
The config is saved as JSON next to the weights (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class RopeScaling:
    """Stretch RoPE to longer contexts.

    `linear` divides every frequency by `factor` (position interpolation).
    `llama3` divides only the low frequencies, blending smoothly between `low_freq_factor`
    and `high_freq_factor` wavelengths of `original_max_len` (Llama 3.1).
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling.kind={self.kind!r}: use 'linear' or 'llama3'")
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be >= 1")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("rope_scaling needs 0 < low_freq_factor < high_freq_factor")


@dataclass
class ModelConfig:
    """Shape and family of a decoder-only Transformer."""

    vocab_size: int = 32000
    dim: int = 512
    """Width of the residual stream (HF `hidden_size`)."""
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head)."""
    head_dim: int | None = None
    """Per-head width; None means dim // n_heads."""
    hidden_dim: int = 1376
    """Width of the MLP's inner layer (HF `intermediate_size`)."""
    max_seq_len: int = 2048
    """Longest sequence the model handles (RoPE table / learned position table size)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    """Only for mlp='gelu': GPT-2 uses the tanh approximation."""
    pos: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    norm_bias: bool = True
    """LayerNorm only: learn a bias next to the scale."""
    tie_embeddings: bool = False
    sliding_window: int | None = None
    """Mistral: each query sees at most this many previous positions (None: all)."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                                 "change n_heads or set head_dim")
            self.head_dim = self.dim // max(self.n_heads, 1)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"),
                   "pos": ("rope", "learned"), "gelu_approximate": ("tanh", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps={self.norm_eps} must be in (0, 1)")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; "
                             f"valid fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope")
_GPT2 = dict(norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, out_bias=True,
             mlp_bias=True, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    # tiny shapes for tests: a forward pass takes milliseconds
    "tiny-llama": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       hidden_dim=128, max_seq_len=128, **_LLAMA),
    "tiny-gpt2": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=256,
                      max_seq_len=128, **_GPT2),
    # CPU-sized Llama shapes (parameter counts with an 8192-token vocabulary, untied)
    "llama-10m": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                      hidden_dim=704, max_seq_len=512, **_LLAMA),
    "llama-50m": dict(vocab_size=8192, dim=512, n_layers=14, n_heads=8, n_kv_heads=4,
                      hidden_dim=1408, max_seq_len=1024, **_LLAMA),
    "llama-150m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       hidden_dim=2048, max_seq_len=2048, **_LLAMA),
    # the published GPT-2 small shape (124M parameters)
    "gpt2-124m": dict(vocab_size=50257, dim=768, n_layers=12, n_heads=12, hidden_dim=3072,
                      max_seq_len=1024, norm_eps=1e-5, **_GPT2),
}
