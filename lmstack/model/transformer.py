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
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.cache import causal_mask
from lmstack.model.config import ModelConfig, RopeScaling


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


# whether this CPU has native bf16 matmul kernels (AVX512-BF16 or AMX); a constant, so that
# torch.compile reads it without a graph break
NATIVE_CPU_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()

MKL = torch.backends.mkl.is_available()  # `linear`'s operand order was measured with MKL only
MKLDNN = torch.backends.mkldnn.is_available()


class PackedWeight:
    """A copy of a linear weight in oneDNN's blocked layout, for CPU inference; or of several
    weights of one input stacked along their outputs (q/k/v, gate/up), for one product where
    there were several (see `stacked_linear`).

    oneDNN's linear over a prepacked weight ran the products of decode and prefill 1.15-1.9x
    faster than F.linear (fp32 and bf16, 1-512 rows; Zen 4), bf16 matrix-vector products at
    24 GB/s against 13. The copy remembers which tensors it was made from and their data
    pointers and version counters: any in-place change since (optimizer step, load_state_dict,
    LoRA merge, `.data =`, a dtype cast) makes it stale, and `linear` ignores a stale copy.
    Writes through `.data` (`w.data.copy_(...)`) skip the version counter and go unseen: after
    them, `pack_for_cpu_inference(repack=True)` (or `LLM.weights_changed()`).
    """

    def __init__(self, *weights: torch.Tensor):
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(stacked.detach(), None)
        self._sources = [weakref.ref(w) for w in weights]
        self._stamps = [(w.data_ptr(), w._version) for w in weights]
        _PACKED_BY_PTRS[tuple(ptr for ptr, _ in self._stamps)] = self

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        """CPU fp32, or bf16 where the CPU has native bf16 instructions (else oneDNN's bf16 is
        slow); not inference-mode tensors, which keep no version counter to detect changes."""
        return (MKLDNN and weight.device.type == "cpu" and not weight.is_inference()
                and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and NATIVE_CPU_BF16))

    def matches(self, *weights: torch.Tensor) -> bool:
        return len(weights) == len(self._sources) and all(
            source() is w and stamp == (w.data_ptr(), w._version)
            for source, stamp, w in zip(self._sources, self._stamps, weights, strict=True))

    def serves(self, x: torch.Tensor, *weights: torch.Tensor) -> bool:
        """Whether this copy computes x @ cat(weights).T: still fresh, x of the weights' dtype."""
        return x.dtype == weights[0].dtype and self.matches(*weights)

    # a copied or pickled model has weights of its own: it gets no packed copy (oneDNN's opaque
    # tensors can be neither), and packs again when an engine asks
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()  # unpickles as None


def _pack(*weights: torch.Tensor, current: PackedWeight | None) -> PackedWeight | None:
    """A packed copy of the weights (stacked): `current` if it still matches, None where packing
    is unsupported."""
    if current is not None and current.matches(*weights):
        return current
    supported = all(PackedWeight.supports(w) and w.dtype == weights[0].dtype for w in weights)
    return PackedWeight(*weights) if supported else None


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [], "")


# packed copies by their weights' data pointers, for `packed_linear_op`
_PACKED_BY_PTRS: weakref.WeakValueDictionary[tuple[int, ...], PackedWeight] = weakref.WeakValueDictionary()
PACKED_IN_GRAPHS = False
"""Whether code traced by torch.compile runs linears as `packed_linear_op` (set by
lmstack.infer.compiled around the calls it compiles that way)."""


def _stacked_bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The biases of stacked weights side by side (all given, or all None)."""
    return None if biases[0] is None else biases[0] if len(biases) == 1 else torch.cat(biases)


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether packed copies may serve x: CPU, no autograd, no autocast, not being traced
    (autograd and autocast must see F.linear, and torch.compile runs the products itself)."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu"))


def _packed_linear_impl(x: torch.Tensor, weights: list[torch.Tensor],
                        biases: list[torch.Tensor | None]) -> torch.Tensor:
    """x through the weights stacked (their outputs side by side; biases all given or all
    None): their fresh packed copy, if they have one, else F.linear."""
    bias = _stacked_bias(biases)
    packed = _PACKED_BY_PTRS.get(tuple(w.data_ptr() for w in weights))
    if packed is not None and packed.serves(x, *weights):
        return packed_linear(x, packed, bias)
    return F.linear(x, weights[0] if len(weights) == 1 else torch.cat(weights), bias)


# `lmstack::packed_linear`: _packed_linear_impl as an opaque op, which torch.compile leaves as
# it is (oneDNN's packed copies cannot be traced). Defined through torch.library.Library rather
# than the custom_op decorator, whose wrapping cost ~5 us more per call (one-off measurement:
# 134 against 127-130 us for a 47 x 256 x 704 product, 122-126 called directly); a compiled
# decode step of llama-10m makes 25 such calls.
_LIB = torch.library.Library("lmstack", "DEF")
_LIB.define("packed_linear(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor")
_LIB.impl("packed_linear", _packed_linear_impl, "CompositeExplicitAutograd")
packed_linear_op = torch.ops.lmstack.packed_linear.default


@torch.library.register_fake("lmstack::packed_linear")
def _(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear, through the fastest CPU inference kernel measured.

    CPU inference only (no autograd, no autocast: autocast must see F.linear):
    - fp32 with MKL, 2 rows, or 2-64 rows without a fresh packed copy: (weight @ x.T).T, the same
      products in the operand order MKL's GEMM ran 1.3-2.4x faster for those sizes (Zen 3), and
      still 1.4-1.6x faster than the packed kernel for exactly 2 rows (Zen 4);
    - with a fresh `PackedWeight` (see `Transformer.pack_for_cpu_inference`): the packed copy.
    Everything else keeps F.linear: builds without MKL (not measured), one row or more than 64
    unpacked (no gain / the transposed copy of a large result costs more), training (its
    backward through the swapped form was slower), unpacked bf16, CUDA, and code being traced
    by torch.compile (the compiler lays out and runs the products itself), unless
    PACKED_IN_GRAPHS asks for `packed_linear_op` there.
    """
    if torch.compiler.is_compiling() and PACKED_IN_GRAPHS:
        return packed_linear_op(x, [weight], [bias])
    if not _eager_cpu_inference(x):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    fp32 = x.dtype == torch.float32 and weight.dtype == torch.float32
    fresh = packed is not None and packed.serves(x, weight)
    if MKL and fp32 and (rows == 2 or not fresh and 2 <= rows <= 64):
        x2d = x.reshape(rows, x.shape[-1])
        y = weight @ x2d.T if bias is None else torch.addmm(bias[:, None], weight, x2d.T)  # (N, rows)
        return y.T.contiguous().view(*x.shape[:-1], weight.shape[0])
    if fresh:
        return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `linear`, with an optional packed copy
    (None also while its weight is part of a stacked copy, see `stacked_linear`)."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def stacked_linear(x: torch.Tensor, linears: tuple[nn.Module, ...],
                   packed: PackedWeight | None) -> list[torch.Tensor]:
    """[m(x) for m in linears], as one product through `packed`, the copy of their weights
    stacked, where it serves: CPU inference, every module still a plain `Linear` (not, say, a
    LoRA wrapper swapped in since), the copy fresh. Else one by one.

    q/k/v as one product and gate/up as another: 43 calls become 25 in a llama-10m decode step,
    and each call has more outputs to spread over the cores; one-off A/B of (a) compiled in one
    process, 4 turns each: +1% to +17% per turn, best 2,583 vs 2,284 tokens/s.
    """
    if packed is None or not all(type(m) is Linear for m in linears):
        return [m(x) for m in linears]
    weights, biases = [m.weight for m in linears], [m.bias for m in linears]
    if torch.compiler.is_compiling() and PACKED_IN_GRAPHS:
        y = packed_linear_op(x, weights, biases)  # checks the copy's freshness when it runs
    elif _eager_cpu_inference(x) and packed.serves(x, *weights):
        y = packed_linear(x, packed, _stacked_bias(biases))
    else:
        return [m(x) for m in linears]
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


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
    back, where that was measured faster: without native bf16 kernels SDPA's bf16 fallback is
    ~3x slower than the casts plus fp32; with them, its bf16 backward still is (forward +
    backward 6.0 ms vs 2.9 ms at 4x8x128x32 with GQA, Zen 4), so training (inputs that need
    grad) takes fp32 too. fp32 is no less accurate.
    """
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    dtype = torch.bfloat16 if autocast_bf16 else q.dtype  # what SDPA would compute in
    if (dtype == torch.bfloat16 and q.device.type == "cpu"
            and (not NATIVE_CPU_BF16 or q.requires_grad)):
        with torch.autocast("cpu", enabled=False):
            return sdpa(q.float(), k.float(), v.float(), mask).to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.stacked_packed: PackedWeight | None = None  # q/k/v's, see pack_for_cpu_inference

    def stacked(self) -> tuple[nn.Module, ...]:
        """The projections that read the same input, for one stacked product."""
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = stacked_linear(x, self.stacked(), self.stacked_packed)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
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
            self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.stacked_packed: PackedWeight | None = None  # gate/up's, see pack_for_cpu_inference

    def stacked(self) -> tuple[nn.Module, ...]:
        """The projections that read the same input, for one stacked product (none: GELU)."""
        return (self.gate_proj, self.up_proj) if self.gated else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = stacked_linear(x, self.stacked(), self.stacked_packed)
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
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head_packed: PackedWeight | None = None  # the tied head's, see pack_for_cpu_inference
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

    @torch.no_grad()
    def pack_for_cpu_inference(self, repack: bool = False) -> int:
        """Give every `Linear` (and a tied head) a `PackedWeight` for faster CPU inference, the
        projections that read one input (q/k/v, gate/up) one stacked copy between them (see
        `stacked_linear`); return how many Linears (and heads) are packed. The packed copies
        double those weights' memory, are used only without autograd, and are ignored once
        their weights change (call again then: copies that still match their weights are
        kept, not made again; `repack=True` makes every copy again, for writes through
        `.data`, which the copies cannot see)."""
        stacked = set()  # Linears served by a stacked copy (q/k/v, gate/up) instead of their own
        for owner in self.modules():
            if isinstance(owner, Attention | MLP):
                group = owner.stacked()
                plain = group and all(type(m) is Linear for m in group) and len(
                    {m.bias is None for m in group}) == 1
                owner.stacked_packed = _pack(
                    *[m.weight for m in group], current=None if repack else owner.stacked_packed
                ) if plain else None
                if owner.stacked_packed is not None:
                    stacked.update(group)
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.packed = None if m in stacked else _pack(m.weight, current=None if repack else m.packed)
        if self.lm_head is None:
            self.head_packed = _pack(self.embed_tokens.weight,
                                     current=None if repack else self.head_packed)
        return (sum(m.packed is not None for m in linears) + len(stacked)
                + (self.head_packed is not None))

    def packed_copies(self) -> dict[str, PackedWeight | None]:
        """Each Linear's packed copy by module name: its own, or the stacked one it is part of."""
        out = {}
        for name, owner in self.named_modules():
            for child_name, m in owner.named_children():
                if isinstance(m, Linear):
                    shared = isinstance(owner, Attention | MLP) and m in owner.stacked()
                    out[f"{name}.{child_name}".lstrip(".")] = (
                        owner.stacked_packed if shared and owner.stacked_packed is not None
                        else m.packed)
        return out

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, pad_mask: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V).

        positions: (B, T) or (T,) absolute positions; default counts on from the cache length.
        cache: None (one full causal pass) or a StaticCache to read and extend.
        pad_mask: (B, T) True for real tokens; padding is hidden from every query.
        logits_index: (B, K) positions whose logits are wanted -> logits (B, K, V); an engine
            needs only each row's last token, and the head over every prefill token is costly.
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
        mask = self._mask(T, cache, pad_mask, tokens.device)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        x = self.norm(x)
        if self.lm_head is None:
            return linear(x, self.embed_tokens.weight, packed=self.head_packed)
        return self.lm_head(x)

    def _mask(self, T: int, cache, pad_mask, device) -> torch.Tensor | None:
        if cache is not None:
            return cache.mask(T, pad_mask)
        window = self.config.sliding_window
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
