"""Serving throughput of the lmstack engine against baselines measured in the same run.

(a) A batch of requests with mixed prompt and output lengths, greedy, no EOS: output tokens/s of
    the lmstack LLM engine (continuous batching over the paged KV cache) vs static batching
    (pad to the longest prompt, run until the longest output: lmstack.model.generate and
    transformers generate()) vs transformers' own continuous batching (ContinuousBatchingManager,
    what `generate_batch` drives). All load the same HF directory of random weights.
(b) Single-request decode tokens/s vs the memory-bandwidth bound: weight bytes read per token
    over a bandwidth measured here (sum of a tensor far larger than the caches).
(c) Speculative decoding: speedup over plain decoding and the acceptance rate, for a layer-skip
    draft (the target's first 2 layers and head; the target's deeper layers are damped so that
    the draft agrees with random weights at all) and an unrelated random draft (no agreement).

    .venv/bin/python benchmarks/serve_throughput.py --quick     # under 3 minutes on 2 cores
    .venv/bin/python benchmarks/serve_throughput.py             # the full sizes
    .venv/bin/python benchmarks/serve_throughput.py --parts a --lengths loguniform

Timings on shared cores are noisy; compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.engine import EngineConfig
from lmstack.model import ModelConfig, Transformer, generate
from lmstack.model.hf import save_hf

# ----------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run in minutes")
    p.add_argument("--requests", type=int, help="(a) number of requests (default 64, quick 32)")
    p.add_argument("--prompt-len", type=int, nargs=2, help="(a) min max prompt tokens")
    p.add_argument("--output-len", type=int, nargs=2, help="(a) min max output tokens")
    p.add_argument("--lengths", choices=["uniform", "loguniform"], default="uniform",
                   help="(a) length distribution within the ranges; loguniform is long-tailed "
                        "like chat traffic (many short, a few long)")
    p.add_argument("--preset", default="llama-10m", help="(a) model shape")
    p.add_argument("--dim", type=int, help="(a) override the preset's width")
    p.add_argument("--layers", type=int, help="(a) override the preset's depth")
    p.add_argument("--decode-preset", default="llama-150m", help="(b) model shape (bf16)")
    p.add_argument("--decode-tokens", type=int, help="(b) tokens to decode (default 64, quick 24)")
    p.add_argument("--spec-k", type=int, default=4, help="(c) draft tokens per step")
    p.add_argument("--spec-preset", default="llama-50m", help="(c) target shape")
    p.add_argument("--spec-damp", type=float, nargs="+", default=[0.05, 0.01],
                   help="(c) scales of the target's residual outputs past its first 2 layers, one "
                        "run each: random weights give a layer-skip draft no agreement, damping "
                        "gives some (smaller: more), like a real draft of a trained target")
    p.add_argument("--parts", default="abc", help="which parts to run, e.g. 'a' or 'bc'")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="LLM(pack_weights=...): run the engine's linears on oneDNN-packed weight "
                        "copies on CPU (--no-pack: F.linear, for comparison; lmstack's static "
                        "batch then runs unpacked too)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="(a, b) also run the engine with LLM(compile=True): decode steps through "
                        "torch.compile (tens of seconds of compilation first, not timed)")
    p.add_argument("--compile-spec", action="store_true",
                   help="(c) also time one request with LLM(compile=True), plain and with the "
                        "layer-skip draft (a few minutes of compilation)")
    p.add_argument("--skip-hf-cb", action="store_true", help="(a) skip transformers' continuous batching")
    p.add_argument("--repeats", type=int, default=3,
                   help="(a) runs of each method, taking turns; the table shows each one's best "
                        "(load from other processes comes in bursts that a single run can't tell "
                        "from the method's own speed)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; on oversubscribed shared cores more than one "
                        "makes small ops up to 100x slower (OpenMP threads wait on each other)")
    args = p.parse_args(argv)
    quick = args.quick
    args.requests = args.requests or (32 if quick else 64)
    args.prompt_len = args.prompt_len or ([4, 48] if quick else [8, 128])
    args.output_len = args.output_len or ([4, 48] if quick else [8, 128])
    args.decode_tokens = args.decode_tokens or (24 if quick else 64)
    return args


def save_random_model(preset: str, folder: Path, dtype: torch.dtype, min_len: int = 0,
                      **overrides) -> Path:
    """A random-weight model of a preset shape (overrides: None keeps the preset's) as an HF dir."""
    cfg = ModelConfig.from_preset(preset)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "dim" in overrides:  # keep head_dim consistent with the new width
        overrides["head_dim"] = overrides["dim"] // cfg.n_heads
        overrides.setdefault("hidden_dim", overrides["dim"] * cfg.hidden_dim // cfg.dim)
    cfg = ModelConfig.from_preset(preset, max_seq_len=max(cfg.max_seq_len, min_len), **overrides)
    save_hf(Transformer.build(cfg, seed=0), folder / preset, dtype=dtype)
    return folder / preset


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts and output lengths, uniform or log-uniform (many short, a few long)."""
    rng = random.Random(0)
    if args.lengths == "uniform":
        draw = lambda lo, hi: rng.randint(lo, hi)
    else:
        draw = lambda lo, hi: round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    prompts = [[rng.randrange(vocab) for _ in range(draw(*args.prompt_len))]
               for _ in range(args.requests)]
    return prompts, [draw(*args.output_len) for _ in range(args.requests)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def table(title: str, rows: list[tuple[str, float, str]], unit: str, baseline: str) -> None:
    """Print rows of (name, value, note) with each value's ratio to the baseline row's."""
    base = {r[0]: r[1] for r in rows}[baseline]
    print(f"\n{title}\n{'':2}{'method':48}{unit:>14}{'ratio':>9}  note")
    for name, value, note in rows:
        print(f"{'':2}{name:48}{value:14.1f}{value / base:9.2f}  {note}")


# ----------------------------------------------------------------------------- (a) throughput

BLOCK = EngineConfig.block_size  # KV block (page) size of both engines: lmstack's default


def pool_blocks(prompts, lens) -> int:
    """Room for every request at once (and a block to spare each)."""
    return sum(-(-(len(p) + n) // BLOCK) + 1 for p, n in zip(prompts, lens, strict=True))


def lmstack_engine(model, prompts, lens, max_batched_tokens: int, pack: bool,
                   compile: bool = False) -> LLM:
    return LLM(model, max_num_seqs=len(prompts), max_num_batched_tokens=max_batched_tokens,
               pack_weights=pack, compile=compile, num_blocks=pool_blocks(prompts, lens))


def run_lmstack_engine(llm: LLM, prompts, lens) -> int:
    llm.reset_prefix_cache()  # every run starts cold, as a new engine would
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0) for n in lens])
    return sum(len(o.token_ids) for o in outs)


def run_lmstack_static(model, prompts, lens, batch: int) -> int:
    useful = 0
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], lens[i:i + batch]
        generate(model, ps, max_new_tokens=max(ns))  # every row runs to the longest output
        useful += sum(ns)
    return useful


def run_hf_static(hf, prompts, lens, batch: int) -> int:
    useful = 0
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], lens[i:i + batch]
        T = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps])
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ns), min_new_tokens=max(ns),
                    do_sample=False, pad_token_id=0, eos_token_id=None)
        useful += sum(ns)
    return useful


def run_hf_continuous(hf, prompts, lens, max_batched_tokens: int) -> int:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(lens))
    # its throughput here did not depend on the page size (16, 32, 256: within the noise)
    cb = ContinuousBatchingConfig(page_size=BLOCK, num_blocks=pool_blocks(prompts, lens),
                                  max_batch_tokens=max_batched_tokens,
                                  max_requests_per_batch=len(prompts), use_cuda_graph=False)
    done = 0
    with hf.continuous_batching_context_manager(gen, continuous_batching_config=cb,
                                                warmup=False, timeout=600) as manager:
        ids = {manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, lens, strict=True)}
        while ids:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                ids.discard(result.request_id)
                done += len(result.generated_tokens)
    return done


def part_a(args, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lmstack.infer.loading import load_model

    path = save_random_model(args.preset, folder, torch.float32,
                             args.prompt_len[1] + args.output_len[1], dim=args.dim,
                             n_layers=args.layers)
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts, lens = workload(args, model.config.vocab_size)
    budget = 1024
    # one engine per setting for all runs (a compiled one keeps its compiled steps)
    engines = {False: lmstack_engine(model, prompts, lens, budget, args.pack)}
    if args.compile:
        engines[True] = lmstack_engine(model, prompts, lens, budget, args.pack, compile=True)
    methods = [
        ("lmstack LLM (continuous batching)", lambda p, n: run_lmstack_engine(engines[False], p, n)),
        ("lmstack static batch (model.generate)", lambda p, n: run_lmstack_static(model, p, n, len(p))),
        ("transformers generate() static batch", lambda p, n: run_hf_static(hf, p, n, len(p))),
    ]
    if args.compile:
        methods.insert(1, ("lmstack LLM, compile=True",
                           lambda p, n: run_lmstack_engine(engines[True], p, n)))
    if not args.skip_hf_cb:
        methods.append(("transformers continuous batching",
                        lambda p, n: run_hf_continuous(hf, p, n, budget)))
    best: dict[str, tuple[float, int]] = {}
    with torch.inference_mode():
        for _, fn in methods:
            fn(prompts[:2], [2, 2])  # warm up allocators and lazy initialisation
        if args.compile:  # compile for every batch size (the graph turns dynamic at the second)
            methods[1][1](prompts, lens)
        for _ in range(args.repeats):
            for name, fn in methods:
                seconds, tokens = timed(lambda fn=fn: fn(prompts, lens))
                best[name] = min(best.get(name, (seconds, tokens)), (seconds, tokens))
    rows = [(name, tokens / seconds, f"{tokens} tokens in {seconds:.1f} s (best of {args.repeats})")
            for name, (seconds, tokens) in best.items()]
    title = (f"(a) {args.requests} requests, {args.lengths} prompts {args.prompt_len}, outputs "
             f"{args.output_len} "
             f"tokens, {args.preset} fp32, {model.num_params() / 1e6:.0f}M params, greedy")
    table(title, rows, "out tok/s", rows[0][0])
    ours = [r for r in rows if r[0].startswith("lmstack LLM")]
    for name, value, _ in ours:
        speedups = ", ".join(f"{value / r[1]:.2f}x {r[0]}" for r in rows if r not in ours)
        print(f"  {name} vs: {speedups}")
    print("  goals: >= 2x transformers generate(), >= 4x transformers continuous batching")


# ----------------------------------------------------------------------------- (b) decode

def measured_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of reading a tensor much larger than the caches (best of a few)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(timed(x.sum)[0] for _ in range(5))
    return x.numel() * 4 / best


def decode_rate(llm: LLM, prompt: list[int], n: int) -> float:
    """Decode tokens/s of one request: tokens after the first over the time after the first."""
    out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0]
    m = out.metrics
    return (len(out.token_ids) - 1) / (m.finish_time - m.first_token_time)


def static_decode_rate(model: Transformer, prompt: list[int], n: int) -> float:
    """Decode tokens/s of lmstack.model.generate (StaticCache, no engine): n tokens minus 1."""
    one = min(timed(lambda: generate(model, [prompt], 1))[0] for _ in range(2))
    return (n - 1) / (timed(lambda: generate(model, [prompt], n))[0] - one)


@torch.inference_mode()
def matvec_ceiling(model: Transformer) -> float:
    """Tokens/s if a token cost only one (1, in) x (in, out) product per linear layer: the
    speed of the matrix-vector kernel itself (on the packed weights once an LLM has packed
    them), with nothing else of the model around it."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = next(model.parameters()).dtype
    inputs = [torch.zeros(1, m.in_features, dtype=dtype) for m in linears]
    run = lambda: [m(x) for m, x in zip(linears, inputs, strict=True)]
    run()
    return 1 / min(timed(run)[0] for _ in range(5))


def part_b(args, folder: Path) -> None:
    from lmstack.infer.loading import load_model

    path = save_random_model(args.decode_preset, folder, torch.bfloat16)
    model = load_model(path)
    # every weight but the embedding table is read once per token (the table: one row)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if n != "embed_tokens.weight")
    bandwidth = measured_bandwidth()
    prompt = list(range(1, 17))
    engines = {"lmstack LLM decode": LLM(model, max_num_seqs=1, num_blocks=64, pack_weights=args.pack)}
    if args.compile:
        engines["lmstack LLM decode, compile=True"] = LLM(
            model, max_num_seqs=1, num_blocks=64, pack_weights=args.pack, compile=True)
    for llm in engines.values():  # warm up; compiles the decode step (one graph for all lengths)
        decode_rate(llm, prompt, 20)
    # best of 3, taking turns: one request is short, and other work on shared cores stalls it
    rates = dict.fromkeys(engines, 0.0)
    for _ in range(3):
        for name, llm in engines.items():
            rates[name] = max(rates[name], decode_rate(llm, prompt, args.decode_tokens))
    bound = bandwidth / weight_bytes
    ceiling = matvec_ceiling(model)
    static = max(static_decode_rate(model, prompt, args.decode_tokens) for _ in range(3))
    title = (f"(b) single-request decode, {args.decode_preset} bf16, {model.num_params() / 1e6:.0f}M "
             f"params, {weight_bytes / 1e6:.0f} MB read per token, {bandwidth / 1e9:.1f} GB/s measured")
    table(title, [("bandwidth bound (weight bytes / bandwidth)", bound, "upper limit"),
                  ("bf16 matvec kernels alone (every linear once)", ceiling,
                   f"{weight_bytes * ceiling / 1e9:.1f} GB/s through the linears"),
                  ("lmstack.model.generate (StaticCache, no engine)", static,
                   f"{bound / static:.2f}x from the bound"),
                  *[(name, rate, f"{bound / rate:.2f}x from the bound (goal: within 2x)")
                    for name, rate in rates.items()]],
          "tok/s", "bandwidth bound (weight bytes / bandwidth)")


# ----------------------------------------------------------------------------- (c) speculative

def layer_skip_draft(target: Transformer, n_layers: int) -> Transformer:
    """The target's first n_layers, final norm and head: a cheap draft that often agrees."""
    cfg = ModelConfig.from_dict({**target.config.to_dict(), "n_layers": n_layers})
    draft = Transformer.build(cfg)
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft.eval()


@torch.no_grad()
def damp_deep_layers(model: Transformer, keep: int, factor: float) -> None:
    """Scale the residual outputs of layers past `keep`, so the first layers decide more."""
    for layer in model.layers[keep:]:
        layer.self_attn.o_proj.weight.mul_(factor)
        layer.mlp.down_proj.weight.mul_(factor)


def part_c(args, folder: Path) -> None:
    from lmstack.infer.loading import load_model

    path = save_random_model(args.spec_preset, folder, torch.float32)
    for damp in args.spec_damp:
        spec_run(args, load_model(path), damp)


def spec_run(args, target: Transformer, damp: float) -> None:
    damp_deep_layers(target, 2, damp)
    drafts = {"layer-skip draft (first 2 layers)": layer_skip_draft(target, 2),
              "random draft (llama-10m)": Transformer.build(
                  ModelConfig.from_preset("llama-10m", vocab_size=target.config.vocab_size), seed=1)}
    shape = argparse.Namespace(requests=8, prompt_len=[8, 32], lengths="uniform",
                               output_len=[args.decode_tokens] * 2)
    prompts, lens = workload(shape, target.config.vocab_size)
    for batch in (1, 8):
        rows = []
        runs = [("plain decoding", None, False), *((n, d, False) for n, d in drafts.items())]
        if args.compile_spec and batch == 1:
            first = next(iter(drafts))
            runs += [("plain decoding, compile=True", None, True),
                     (f"{first}, compile=True", drafts[first], True)]
        for name, draft, compile in runs:
            opts = {} if draft is None else {"speculative_model": draft,
                                             "num_speculative_tokens": args.spec_k}
            llm = LLM(target, max_num_seqs=batch, num_blocks=128, pack_weights=args.pack,
                      compile=compile, **opts)
            # warm up (and compile: as long as a generation, for each graph)
            llm.generate(prompts[:1], SamplingParams(max_tokens=64 if compile else 4, temperature=0.0))
            params = [SamplingParams(max_tokens=n, temperature=0.0) for n in lens[:batch]]
            seconds, outs = timed(lambda llm=llm, p=params, b=batch: llm.generate(prompts[:b], p))
            tokens = sum(len(o.token_ids) for o in outs)
            rate = llm.stats().get("spec_acceptance_rate")
            note = "" if rate is None else f"acceptance {rate:.2f}"
            rows.append((name, tokens / seconds, note))
        table(f"(c) speculative decoding, {args.spec_preset} fp32 target (layers past 2 damped "
              f"x{damp}), k={args.spec_k}, {batch} request(s), greedy", rows,
              "out tok/s", "plain decoding")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cores may be shared, "
          "so compare ratios within this run")
    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
            if part in args.parts:
                fn(args, Path(tmp))


if __name__ == "__main__":
    main()
