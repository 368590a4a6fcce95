"""Training throughput of lmstack against a peer model, measured in one run. Two peers:

- `--against transformers` (default): transformers' LlamaForCausalLM at a Llama preset. lmstack
  saves an HF directory and transformers loads it; the peer's loss is transformers' own causal-LM
  loss (`labels=`, summed with `num_items_in_batch=1`).
- `--against nanogpt`: a nanoGPT-style GPT written below (one `c_attn` Linear(C, 3C),
  `F.scaled_dot_product_attention(is_causal=True)`, GELU MLP, tied head) at a GPT-2-family
  shape, 6 layers x 6 heads x 384 wide, vocabulary 8192 (`gpt2-384x6`). Its weights are copied
  from lmstack's (q/k/v stacked into c_attn), and its loss is lmstack's summed cross-entropy over
  its logits. lmstack runs with `swap_linears(model, FUSED)`, so its q/k/v are one product too;
  --no-fuse takes the swap off, to measure the seam in the same script. Its attention is
  F.scaled_dot_product_attention as nanoGPT calls it (bf16 under bf16 autocast), where lmstack's
  `sdpa` trains in fp32 on CPU.

Both models have the same config and weights and see the same batch; with --compile, each block
of both models and the loss are compiled (`apply_compile`, `compiled_cross_entropy_sum`; for
transformers, each layer and its loss function). Everything else is lmstack's training step,
shared: loss sum / valid-token count, backward, global-norm clipping, AdamW
(`accumulate_gradients`, `Precision.step`, `make_optimizer` from `lmstack.train`).

MFU = tokens/s * flops_per_token / peak. The peak is measured here: square n x n x n matmuls in
the same dtype, every operand layout, the fastest call seen anywhere in the run (it is measured
again between rounds, so a busy moment at the start does not lower it).

    .venv/bin/python benchmarks/train_throughput.py                  # fp32 + bf16, ~2 minutes
    .venv/bin/python benchmarks/train_throughput.py --dtype fp32 --compile --profile
    .venv/bin/python benchmarks/train_throughput.py --against nanogpt --dtype bf16 --batch 8 --seq-len 256
    .venv/bin/python benchmarks/train_throughput.py --against nanogpt --dtype fp32 --no-fuse

Timings on shared cores are noisy: the two models take turns for --seconds, and the table shows
median steps, their ratio, and the ratio of each model's fastest step. With other processes on
the cores, --threads 1 is steadier: two OpenMP threads stall at every barrier while one of them
waits for a core (steps ~10x slower for seconds at a time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels import FUSED, swap_linears
from lmstack.model import ModelConfig, Transformer
from lmstack.model.config import PRESETS
from lmstack.model.cpu import NATIVE_CPU_BF16
from lmstack.model.hf import save_hf
from lmstack.train import (
    OptimConfig,
    accumulate_gradients,
    compiled_cross_entropy_sum,
    cross_entropy_sum,
    keep_freed_memory,
)
from lmstack.train.optim import make_optimizer, trainable_parameters
from lmstack.train.parallel import apply_compile
from lmstack.train.precision import Precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Batch = tuple[torch.Tensor, torch.Tensor]

SHAPES = {"gpt2-384x6": dict(PRESETS["gpt2-124m"], vocab_size=8192, dim=384, n_layers=6,
                             n_heads=6, hidden_dim=4 * 384)}
"""This benchmark's own shapes, next to lmstack's presets: nanoGPT's 6 x 6 heads x 384 (its
Shakespeare model) in GPT-2 small's family, with an 8192-token vocabulary."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="transformers", choices=("transformers", "nanogpt"),
                   help="the peer: transformers' LlamaForCausalLM, or this file's nanoGPT-style GPT")
    p.add_argument("--preset", help="model shape: a Llama preset against transformers (default "
                                    "llama-10m), a GPT-2 one against nanogpt (default gpt2-384x6)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction,
                   help="lmstack with swap_linears(model, FUSED): q/k/v (and gate/up) as one "
                        "product (default: on against nanogpt, off against transformers)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per turn")
    p.add_argument("--rounds", type=int, default=3, help="at least this many turns each")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="keep alternating until this much time has passed (per dtype and mode)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="training precisions (bf16 = autocast; weights and AdamW stay fp32)")
    p.add_argument("--compile", action="store_true",
                   help="also time both models with every block torch.compiled")
    p.add_argument("--peak-n", type=int, default=1024, help="side of the square peak matmuls")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep_freed_memory() as lmstack's loop does on CPU, for both models (one "
                        "process); --no-keep-freed-memory shows glibc's default")
    p.add_argument("--profile", action="store_true", help="print the top ops of each eager step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args(argv)
    # the defaults that depend on the peer (the only place they are set)
    if args.preset is None:
        args.preset = "gpt2-384x6" if args.against == "nanogpt" else "llama-10m"
    if args.fuse is None:
        args.fuse = args.against == "nanogpt"
    return args


# ----------------------------------------------------------------------------- matmul peak

def best_time(fn: Callable[[], object], min_s: float = 0.3, max_reps: int = 20) -> float:
    """Fastest of repeated calls after one warm-up; stops after min_s of timed calls."""
    fn()
    times: list[float] = []
    while len(times) < max_reps and sum(times) < min_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class Peak:
    """Matmul FLOP/s for one dtype, by operand layout (N as stored, T transposed): CPU kernels
    without native support for a dtype differ a lot by layout, and training uses all three."""

    dtype: torch.dtype
    n: int
    by_layout: dict[str, float] = field(default_factory=dict)

    def measure(self, layouts: tuple[str, ...] = ("NN", "NT", "TN")) -> None:
        a, b = torch.randn(self.n, self.n, dtype=self.dtype), torch.randn(self.n, self.n, dtype=self.dtype)
        operands = {"NN": (a, b), "NT": (a, b.t()), "TN": (a.t(), b)}
        for name in layouts:
            x, y = operands[name]
            flops = 2 * self.n**3 / best_time(lambda x=x, y=y: x @ y)
            self.by_layout[name] = max(flops, self.by_layout.get(name, 0.0))

    def remeasure_best(self) -> None:
        self.measure((max(self.by_layout, key=self.by_layout.get),))

    @property
    def flops(self) -> float:
        return max(self.by_layout.values())


# ----------------------------------------------------------------------------- nanoGPT-style peer
# Shapes: B batch, T tokens, C width, H heads, D = C / H, V vocabulary.

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_heads
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)  # q, k, v side by side
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(cfg.dim, cfg.hidden_dim),
                                             gelu=nn.GELU(approximate=cfg.gelu_approximate),
                                             c_proj=nn.Linear(cfg.hidden_dim, cfg.dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """tokens (B, T) -> logits (B, T, V). The blocks are `layers`, where apply_compile finds them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.layers:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # head tied to the token embedding


GPT2_FAMILY = dict(norm="layernorm", norm_bias=True, mlp="gelu", pos="learned", qkv_bias=True,
                   out_bias=True, mlp_bias=True, tie_embeddings=True, sliding_window=None)
RENAMES = {"input_layernorm": "ln_1", "self_attn.o_proj": "attn.c_proj",
           "post_attention_layernorm": "ln_2", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
"""lmstack's block modules -> the GPT's (c_attn is made from q/k/v; every one has a bias)."""


def gpt_weights(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """lmstack's GPT-2-family state dict under the GPT's names, q/k/v stacked into c_attn."""
    out = {"wte.weight": sd["embed_tokens.weight"], "wpe.weight": sd["pos_embed.weight"],
           "ln_f.weight": sd["norm.weight"], "ln_f.bias": sd["norm.bias"]}
    for i in range(n_layers):
        block = f"layers.{i}."
        for p in ("weight", "bias"):
            out[f"{block}attn.c_attn.{p}"] = torch.cat([sd[f"{block}self_attn.{n}_proj.{p}"] for n in "qkv"])
            out |= {f"{block}{theirs}.{p}": sd[f"{block}{ours}.{p}"] for ours, theirs in RENAMES.items()}
    return out


def gpt_copy(ours: Transformer, preset: str) -> GPT:
    c = ours.config
    if any(getattr(c, k) != v for k, v in GPT2_FAMILY.items()) or c.n_kv_heads != c.n_heads:
        raise ValueError(f"--preset {preset}: the nanoGPT peer is GPT-2's family ({GPT2_FAMILY}, "
                         "n_kv_heads = n_heads); use gpt2-384x6, tiny-gpt2 or gpt2-124m")
    gpt = GPT(c)
    gpt.load_state_dict(gpt_weights(ours.state_dict(), c.n_layers))
    return gpt


# ----------------------------------------------------------------------------- the two models

def hf_copy(ours: Transformer, folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    save_hf(ours, folder, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)


def hf_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss over already shifted targets; num_items_in_batch=1
    makes it a sum, which the shared step divides by the valid-token count as for lmstack."""
    return model(input_ids=inputs, labels=targets, shift_labels=targets, num_items_in_batch=1,
                 use_cache=False).loss


def compile_hf(model: nn.Module) -> None:
    """As apply_compile does for lmstack: each layer; and its loss function, as the loop's."""
    for layer in model.model.layers:
        layer.compile()
    model.loss_function = torch.compile(model.loss_function)


@dataclass
class Trainee:
    """A model with its loss, optimizer and precision, stepping as lmstack's loop does."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    precision: Precision
    optim: OptimConfig = field(default_factory=OptimConfig)
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.model, self.optim)
        self.params = trainable_parameters(self.model)

    def step(self, batch: Batch) -> float:
        loss, _ = accumulate_gradients(self.model, [batch], self.loss_fn, self.precision)
        self.precision.step(self.optimizer, self.params, self.optim.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed_steps(self, batch: Batch, n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            self.step(batch)
            self.times.append(time.perf_counter() - start)


def peer_trainee(args: argparse.Namespace, ours: Transformer, compiled: bool, precision: Precision,
                 folder: Path) -> Trainee:
    """The peer, with lmstack's weights (copied before any swap or compile of lmstack's model)."""
    if args.against == "nanogpt":
        gpt = gpt_copy(ours, args.preset)
        if compiled:
            apply_compile(gpt)
        return Trainee("nanoGPT", gpt, compiled_cross_entropy_sum if compiled else cross_entropy_sum,
                       precision)
    hf = hf_copy(ours, folder)
    if compiled:
        compile_hf(hf)
    return Trainee("transformers", hf, hf_loss_sum, precision)


def model_config(preset: str) -> ModelConfig:
    return ModelConfig(**SHAPES[preset]) if preset in SHAPES else ModelConfig.from_preset(preset)


def trainee_pair(args: argparse.Namespace, dtype: str, compiled: bool, folder: Path) -> list[Trainee]:
    cpu = torch.device("cpu")
    ours = Transformer.build(model_config(args.preset), seed=0)
    peer = peer_trainee(args, ours, compiled, Precision(dtype, cpu), folder)
    if args.fuse:
        swap_linears(ours, FUSED)
    if compiled:
        apply_compile(ours)
    loss = compiled_cross_entropy_sum if compiled else cross_entropy_sum  # as the loop picks
    return [Trainee("lmstack", ours, loss, Precision(dtype, cpu)), peer]


def random_batch(vocab: int, batch: int, seq_len: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs, targets


def race(pair: list[Trainee], batch: Batch, args: argparse.Namespace, peak: Peak) -> None:
    """A first step each (same weights: same loss, or the comparison is void; it also compiles
    and warms the allocator), then alternate, swapping who goes first, re-measuring the peak:
    a burst of load from another process then hits both models, not one."""
    ours, theirs = (t.step(batch) for t in pair)
    if abs(ours - theirs) > 1e-2 * abs(theirs):
        raise RuntimeError(f"initial losses differ: lmstack {ours:.5f}, {pair[1].name} {theirs:.5f}; "
                           "the two models are not the same computation")
    start, r = time.perf_counter(), 0
    while r < args.rounds or time.perf_counter() - start < args.seconds:
        for t in pair if r % 2 == 0 else pair[::-1]:
            t.timed_steps(batch, args.steps)
        peak.remeasure_best()
        r += 1


def profile_step(trainee: Trainee, batch: Batch, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainee.step(batch)
    print(f"\n{trainee.name} {trainee.precision.name}: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------- main

def measure(args: argparse.Namespace, dtype: str, compiled: bool, peak: Peak, folder: Path) -> dict:
    pair = trainee_pair(args, dtype, compiled, folder / f"{dtype}-{compiled}")
    batch = random_batch(pair[0].model.config.vocab_size, args.batch, args.seq_len)
    race(pair, batch, args, peak)
    if args.profile and not compiled:
        for trainee in pair:
            profile_step(trainee, batch)
    tokens = args.batch * args.seq_len
    ours, peer = (tokens / statistics.median(t.times) for t in pair)
    best_ratio = min(pair[1].times) / min(pair[0].times)
    return dict(preset=args.preset, dtype=dtype, mode="compiled" if compiled else "eager",
                peer_name=pair[1].name, ours=ours, peer=peer, best_ratio=best_ratio, steps=len(pair[0].times),
                flops=pair[0].model.flops_per_token(args.seq_len))


def print_peaks(peaks: dict[str, Peak]) -> None:
    for name, peak in peaks.items():
        cells = "  ".join(f"{k} {v / 1e9:6.1f}" for k, v in peak.by_layout.items())
        print(f"  {name:5} {cells}   peak {peak.flops / 1e9:6.1f}")


def print_table(rows: list[dict], peaks: dict[str, Peak]) -> None:
    """tokens/s and MFU from median steps; 'best' compares the fastest step of each instead,
    the least disturbed by other processes."""
    peer = rows[0]["peer_name"]
    print(f"\n| model | precision | mode | steps | tokens/s lmstack | tokens/s {peer} | ratio "
          f"| ratio best | MFU lmstack | MFU {peer} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = [tps * r["flops"] / peaks[r["dtype"]].flops for tps in (r["ours"], r["peer"])]
        print(f"| {r['preset']} | {r['dtype']} | {r['mode']} | {r['steps']} | {r['ours']:,.0f} "
              f"| {r['peer']:,.0f} | {r['ours'] / r['peer']:.2f}x | {r['best_ratio']:.2f}x "
              f"| {100 * mfu[0]:.1f}% | {100 * mfu[1]:.1f}% |")


def print_header(args: argparse.Namespace) -> None:
    peer = "nanoGPT-style GPT (this file)" if args.against == "nanogpt" else "transformers' LlamaForCausalLM"
    fused = ("swap_linears(model, FUSED): q/k/v (and gate/up) as one product" if args.fuse
             else "q/k/v one by one (no FUSED swap)")
    print(f"{args.preset}, batch {args.batch} x seq_len {args.seq_len}, {args.threads} threads, "
          "AdamW + clipping; steps = timed steps of each model")
    print(f"lmstack Transformer with {fused}; against {peer}")
    if "bf16" in args.dtype and not NATIVE_CPU_BF16:
        print("bf16: no native bf16 matmul on this CPU; both models' linears run through "
              "lmstack's CpuBf16Linear (lmstack/train/precision.py)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    peaks = {d: Peak(DTYPES[d], args.peak_n) for d in args.dtype}
    for peak in peaks.values():
        peak.measure()
    print_header(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            for compiled in (False, True) if args.compile else (False,):
                rows.append(measure(args, dtype, compiled, peaks[dtype], Path(tmp)))
    print(f"\nmatmul GFLOP/s, {args.peak_n}^3, best call in the run, by layout (N as stored, T transposed)")
    print_peaks(peaks)
    print_table(rows, peaks)


if __name__ == "__main__":
    main()
