"""One decoder-only Transformer that is GPT-2, Llama, Mistral or Qwen2 by config.

Shapes: B batch, T new tokens, S key slots (cache), H query heads, Hkv key/value heads,
D head_dim, C model width (dim), V vocabulary.
Parameter names follow Hugging Face's Llama (`q_proj`, `gate_proj`, `input_layernorm`, ...),
so conversion is nearly a rename and LoRA can target `q_proj` / `v_proj` directly.

Build on the meta device, then `to_empty` and one `init_weights()`:
    model = Transformer.build(config, device="cpu")
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.cache import causal_mask
from lmstack.model.config import ModelConfig, RopeScaling
from lmstack.model.cpu import NATIVE_CPU_BF16


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


# ----------------------------------------------------------------------------- seams for swapped-in kernels

class Fanout(nn.Module):
    """The seam where linears that read the same input run: `fanout(x, owner)` is
    [owner.<name>(x) for name in names]. It holds no parameters; a kernel swapped in for it may
    run the linears as one product (q/k/v, gate/up) when they are plain linears."""

    def __init__(self, *names: str):
        super().__init__()
        self.names = names

    def forward(self, x: torch.Tensor, owner: nn.Module) -> list[torch.Tensor]:
        return [getattr(owner, name)(x) for name in self.names]


class TiedHead(nn.Module):
    """The output projection of tied embeddings: x @ embedding.T. The seam a kernel can replace
    (the weight stays the embedding's, so there is no second Parameter to re-tie)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (D/2,) of rotary embeddings, optionally rescaled for long context."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, out)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_seq_len, D) in fp32, halves repeated for rotate-half."""
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (max_seq_len, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D) already in x's dtype."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- attention

def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V written out, in fp32; the yardstick for SDPA in tests.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: (B, 1, T, S) bool or None for causal (T == S).
    """
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1).float()
    v = v.repeat_interleave(H // Hkv, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         mask: torch.Tensor | None) -> torch.Tensor:
    """Fused attention; mask=None means plain causal over T == S.

    bf16 on CPU (bf16 inputs, or bf16 autocast) runs in fp32 with autocast off, and is cast
    back, where that was measured faster (docs/performance.md): without native bf16 kernels
    SDPA's bf16 fallback is slower than the casts plus fp32, and with them its bf16 backward
    still is, so training (inputs that need grad) takes fp32 too. fp32 is no less accurate.
    """
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    dtype = torch.bfloat16 if autocast_bf16 else q.dtype  # what SDPA would compute in
    if (dtype == torch.bfloat16 and q.device.type == "cpu"
            and (not NATIVE_CPU_BF16 or q.requires_grad)):
        with torch.autocast("cpu", enabled=False):
            return sdpa(q.float(), k.float(), v.float(), mask).to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def document_mask(segment_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) causal and block-diagonal boolean mask of packed rows (segment_ids (B, T)):
    a query sees earlier keys of its own document only. SDPA takes it, with a CPU backward."""
    i = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    allowed = i[None, :] <= i[:, None]  # (T, T): key <= query
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (allowed & same)[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.qkv = Fanout("q_proj", "k_proj", "v_proj")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, self)  # q_proj(x), k_proj(x), v_proj(x)
        # -1, not n_heads: under tensor parallelism a rank holds H / tp heads (and Hkv / tp)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = sdpa(q, k, v, mask)
        else:  # writes k, v, then attends over everything cached (with sdpa, or its own way)
            y = cache.attend(self.layer_idx, q, k, v, mask, sdpa)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).  GELU: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.approximate = cfg.gelu_approximate
        if self.gated:
            self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
            self.gate_up = Fanout("gate_proj", "up_proj")
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up(x, self)  # gate_proj(x), up_proj(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        # tied embeddings reuse embed_tokens.weight in forward: no shared Parameter to re-tie
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tied_head = TiedHead() if cfg.tie_embeddings else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg, device=self.embed_tokens.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, seed: int | None = None) -> Transformer:
        """Construct on the meta device (no memory, no init), materialise, then init once."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights()
        return model.to(dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init: N(0, std) weights, residual projections scaled by 1/sqrt(2L)."""
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(m.weight, mean=0.0, std=std * scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.reset_parameters()
        if self.config.pos == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.config, device=self.rope_cos.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, pad_mask: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V).

        positions: (B, T) or (T,) absolute positions; default counts on from the cache length.
        cache: None (one full causal pass) or a StaticCache to read and extend.
        pad_mask: (B, T) True for real tokens; padding is hidden from every query.
        logits_index: (B, K) positions whose logits are wanted -> logits (B, K, V); an engine
            needs only each row's last token, and the head over every prefill token is costly.
        segment_ids: (B, T) the document of each token of rows packed with several documents:
            a token attends only to earlier tokens of its own document (pass positions that
            restart at each document's first token too).
        """
        B, T = tokens.shape
        if positions is None:  # explicit positions are the caller's to keep in range
            start = cache.length if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(f"{start + T} tokens exceed max_seq_len="
                                 f"{self.config.max_seq_len}; shorten the input")
            positions = torch.arange(start, start + T, device=tokens.device)
        x = self.embed_tokens(tokens)  # (B, T, C)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            pos = positions.expand(B, T)
            rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))
        mask = self._mask(T, cache, pad_mask, tokens.device, segment_ids)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        x = self.norm(x)
        if self.lm_head is None:
            return self.tied_head(x, self.embed_tokens.weight)
        return self.lm_head(x)

    def _mask(self, T: int, cache, pad_mask, device, segment_ids) -> torch.Tensor | None:
        window = self.config.sliding_window
        if segment_ids is not None:
            if cache is not None or pad_mask is not None:
                raise ValueError("segment_ids is for one full pass: drop cache and pad_mask")
            return document_mask(segment_ids, window)
        if cache is not None:
            return cache.mask(T, pad_mask)
        if pad_mask is None and (window is None or T <= window):
            return None  # plain causal: SDPA's fastest path
        if pad_mask is None:
            pad_mask = torch.ones(1, T, dtype=torch.bool, device=device)
        return causal_mask(0, pad_mask, window)

    # ------------------------------------------------------------------------- accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if self.lm_head is None:  # tied: the output projection still does matmul work
                n += self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length.

        6 per weight per token for the matmuls (2 forward, 4 backward), plus attention scores
        and values: 2 matmuls of (T x D) by (D x T) per head, 6 * 2 * L * H * D * T / T per token
        (counted for the full T x T square, as PaLM's appendix B does).
        """
        c = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        dtype = dtype or next(self.parameters()).dtype
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()
