"""Load test of `lmstack serve` against `transformers serve --continuous-batching` and the
in-process engine, on the same random-weight model in the same run.

N concurrent clients each send streaming chat completions one after another (a closed loop),
on loopback, until the requests run out. Every request asks for exactly --max-tokens tokens
(the tokenizer has no end-of-text token, so neither server stops early). Reported per target:
requests/s, output tokens/s, time to first token (TTFT), time per output token after the first
(TPOT), the gaps between streamed chunks (ITL), at p50 and p99, failed requests, and the
server's CPU time per output token and the cores it kept busy on average (its process and the
ones it started: what the server itself spent, whatever else ran on the machine; the clients
run in this process and are not counted). The in-process row runs the same prompts through
`LLM.add_request`/`step` with the same number in flight: what the HTTP server costs on top of
the engine.

    .venv/bin/python benchmarks/serve_load.py                      # 32 clients, all three
    .venv/bin/python benchmarks/serve_load.py --concurrency 8 --requests 16 --skip transformers

Servers run as subprocesses with the same thread count. Timings on shared cores are noisy:
targets take turns (--repeats) and the table shows each one's best run; compare the ratios,
which come from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = ("the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm "
         "mat and birds sing in tall green trees near the old stone bridge").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32, help="clients sending at once")
    p.add_argument("--requests", type=int, default=64, help="requests in all, per target")
    p.add_argument("--prompt-words", type=int, default=24, help="words in each user message")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--preset", default="llama-10m", help="model shape (random weights)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer (and model) vocabulary")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each server (more than one slows small ops down on "
                        "oversubscribed shared cores)")
    p.add_argument("--skip", nargs="*", default=[], choices=["lmstack", "transformers", "engine"],
                   help="targets to leave out")
    p.add_argument("--compile", action="store_true",
                   help="lmstack's engines (served and in process) with compile=True")
    p.add_argument("--warmup-waves", type=int, default=0,
                   help="untimed waves of --concurrency requests at once before the timed ones "
                        "(compiled steps are built for the batch shapes they first meet)")
    p.add_argument("--thread-engine", action="store_true",
                   help="also run lmstack serve with its engine in a thread of the server's "
                        "process (--engine-process false), to compare the two layouts")
    p.add_argument("--timeout", type=float, default=600, help="seconds one target may take")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each target, taking turns; the table shows each one's best "
                        "(load from other processes comes in bursts)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the model

def make_model(folder: Path, preset: str, vocab_size: int) -> Path:
    """A random Llama of `preset`'s shape as an HF directory, with a trained tokenizer that has
    no end-of-text token (so every request runs to max_tokens on both servers)."""
    from lmstack.model import ModelConfig, Transformer
    from lmstack.model.hf import save_hf
    from lmstack.model.tokenizer import Tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(500)]
    corpus += [" ".join("".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(40))
               for _ in range(2000)]
    tok = Tokenizer.train(corpus, vocab_size, special_tokens=("<|im_start|>", "<|im_end|>"),
                          eos_token=None, pad_token=None, min_frequency=1)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, init_std=0.1)
    path = folder / preset
    save_hf(Transformer.build(cfg, seed=0).eval(), path)
    tok.save(path)
    return path


def prompts(n: int, words: int) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


# ----------------------------------------------------------------------------- measuring

@dataclass
class Result:
    start: float
    first: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process, or of a server process and the processes it
    started (lmstack's engine process), threads included."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    return sum(_process_cpu(p) for p in [pid, *descendants(pid)])


def _process_cpu(pid: int) -> float:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it may just have exited
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return 0.0


def descendants(pid: int) -> list[int]:
    children = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return [p for c in children for p in (c, *descendants(c))]


def summarize(name: str, results: list[Result], seconds: float, cpu: float) -> dict:
    ok = [r for r in results if r.error is None and r.first is not None]
    ttft = [r.first - r.start for r in ok]
    tpot = [(r.chunk_times[-1] - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [b - a for r in ok for a, b in itertools.pairwise(r.chunk_times)]
    tokens = sum(r.tokens for r in ok)
    return {"target": name, "req_s": len(ok) / seconds, "tok_s": tokens / seconds,
            "cpu_ms_tok": 1e3 * cpu / max(tokens, 1), "cores": cpu / seconds,
            "ttft": pcts(ttft), "tpot": pcts(tpot), "itl": pcts(itl),
            "failures": len(results) - len(ok), "tokens": tokens, "seconds": seconds}


def pcts(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return (float("nan"), float("nan"))
    if len(xs) == 1:
        return (xs[0], xs[0])
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return (statistics.median(xs), q[98])


# ----------------------------------------------------------------------------- HTTP targets

async def one_request(http: httpx.AsyncClient, url: str, model: str, text: str, args,
                      tokenizer) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True,
            "max_tokens": args.max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}
    r = Result(time.perf_counter())
    pieces = []
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if delta.get("content"):
                    now = time.perf_counter()
                    r.first = r.first or now
                    r.chunk_times.append(now)
                    pieces.append(delta["content"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        r.error = repr(e)
    if not r.tokens:  # a server that ignores include_usage: count the text's tokens
        r.tokens = len(tokenizer.encode("".join(pieces)))
    return r


async def closed_loop(url: str, model: str, texts: list[str], args, tokenizer,
                      pid: int) -> tuple[list[Result], float, float]:
    """(results, seconds, the server's CPU seconds) of the timed requests."""
    queue = list(reversed(texts))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=args.concurrency + 4)

    async def client(http):
        while queue:
            results.append(await one_request(http, url, model, queue.pop(), args, tokenizer))

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        await one_request(http, url, model, texts[0], args, tokenizer)  # warm-up
        for _ in range(args.warmup_waves):  # the batch shapes of the load (compiled steps)
            await asyncio.gather(*(one_request(http, url, model, t, args, tokenizer)
                                   for t in texts[:args.concurrency]))
        start, cpu = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        return results, time.perf_counter() - start, cpu_seconds(pid) - cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], url: str, threads: int, health: str, timeout: float = 300):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + health, timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{' '.join(cmd)} did not come up in {timeout}s")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_lmstack(model_dir: Path, texts, args, tokenizer, thread: bool = False) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmstack", "serve", str(model_dir), "--port", str(port),
           "--max-num-seqs", str(args.concurrency), "--log-level", "warning",
           "--model-name", "bench", "--engine-process", str(not thread).lower()]
    cmd += ["--compile"] if args.compile else []
    with server_process(cmd, url, args.threads, "/health") as proc:
        results, seconds, cpu = asyncio.run(closed_loop(url, "bench", texts, args, tokenizer, proc.pid))
    return summarize("lmstack serve" + (", engine in a thread" if thread else ""), results, seconds, cpu)


def run_transformers(model_dir: Path, texts, args, tokenizer) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--continuous-batching", "--dtype", "float32"]
    with server_process(cmd, url, args.threads, "/health") as proc:
        results, seconds, cpu = asyncio.run(closed_loop(url, str(model_dir), texts, args, tokenizer,
                                                        proc.pid))
    return summarize("transformers serve --continuous-batching", results, seconds, cpu)


# ----------------------------------------------------------------------------- in process

def run_engine(model_dir: Path, texts, args, tokenizer) -> dict:
    """The same closed loop without HTTP: `concurrency` requests in flight in one LLM."""
    import torch

    from lmstack.infer import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(model_dir, max_num_seqs=args.concurrency, compile=args.compile)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    ids = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                         add_generation_prompt=True)) for t in texts]
    llm.generate(ids[:1], params)  # warm-up
    for _ in range(args.warmup_waves):
        llm.generate(ids[:args.concurrency], params)
    pending, live, results = list(reversed(ids)), {}, []
    start, cpu = time.perf_counter(), cpu_seconds()
    while pending or live:
        while pending and len(live) < args.concurrency:
            live[llm.add_request(pending.pop(), params)] = Result(time.perf_counter())
        for out in llm.step():
            r, now = live[out.request_id], time.perf_counter()
            if out.delta_token_ids:
                r.first = r.first or now
                r.chunk_times.append(now)
            if out.finished:
                r.tokens = len(out.token_ids)
                results.append(live.pop(out.request_id))
    return summarize("lmstack LLM in process", results, time.perf_counter() - start,
                     cpu_seconds() - cpu)


# ----------------------------------------------------------------------------- the bound

def matmul_bound(model_dir: Path, texts, args, tokenizer) -> dict:
    """The output tokens/s the workload would reach if the model's linear products were all it
    cost: every weight (q/k/v and gate/up stacked, as the engine runs them) timed here as one
    product, by F.linear or oneDNN's packed product, whichever is faster, for a decode step of
    --concurrency rows and a prefill of --concurrency prompts at once; attention, sampling,
    HTTP and everything else free. No target can pass it.

    Then the same with attention added (`attn_tok_s`): per layer, one SDPA of the step's queries
    over keys and values already side by side in memory (no paged gather, no mask), a decode
    step's at the mean context of the decode steps (the prompt and half the output) and the
    prefill's causal over the prompt. The model's own products, with nothing else."""
    import timeit

    import torch
    import torch.nn.functional as F

    from lmstack.model.hf_config import config_from_hf

    torch.set_num_threads(args.threads)
    c = config_from_hf(json.loads((model_dir / "config.json").read_text()))
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = [(q_out + 2 * kv_out, c.dim), (c.dim, q_out), (2 * c.hidden_dim, c.dim), (c.dim, c.hidden_dim)]
    prompt = statistics.mean(len(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": t}], add_generation_prompt=True))) for t in texts)

    def best(*ways) -> float:
        return min(min(timeit.repeat(f, number=3, repeat=5)) / 3 for f in ways)

    def step_seconds(rows: int) -> float:
        total = 0.0
        for n, k in [*per_layer * c.n_layers, (c.vocab_size, c.dim)]:
            x, w = torch.randn(rows, k), torch.randn(n, k)
            ways = [functools.partial(F.linear, x, w)]
            if torch.backends.mkldnn.is_available():
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                ways.append(functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""))
            total += best(*ways)
        return total

    def attention_seconds(queries: int, keys: int) -> float:
        q = torch.randn(args.concurrency, c.n_heads, queries, c.head_dim)
        kv = torch.randn(2, args.concurrency, c.n_kv_heads, keys, c.head_dim)
        return c.n_layers * best(functools.partial(
            F.scaled_dot_product_attention, q, kv[0], kv[1], is_causal=queries > 1,
            enable_gqa=c.n_heads != c.n_kv_heads))

    decode, prefill = step_seconds(args.concurrency), step_seconds(round(args.concurrency * prompt))
    decode_attn = attention_seconds(1, round(prompt + args.max_tokens / 2))
    prefill_attn = attention_seconds(round(prompt), round(prompt))
    tokens = args.concurrency * args.max_tokens
    seconds = prefill + (args.max_tokens - 1) * decode
    with_attn = seconds + prefill_attn + (args.max_tokens - 1) * decode_attn
    return {"tok_s": tokens / seconds, "decode_ms": 1e3 * decode, "prefill_ms": 1e3 * prefill,
            "prompt_tokens": prompt, "attn_tok_s": tokens / with_attn,
            "decode_attn_ms": 1e3 * decode_attn, "prefill_attn_ms": 1e3 * prefill_attn}


# ----------------------------------------------------------------------------- report

def report(rows: list[dict], args, bound: dict | None = None) -> None:
    print(f"\n{args.concurrency} concurrent streaming clients, {args.requests} requests, "
          f"{args.prompt_words}-word prompts, {args.max_tokens} output tokens each, greedy, "
          f"{args.preset} (random weights), {args.threads} threads per server")
    head = (f"| {'target':42} | req/s | out tok/s | vs transformers | TTFT p50 / p99 (s) "
            f"| TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | CPU ms / tok | cores | failures |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    base = next((r["tok_s"] for r in rows if r["target"].startswith("transformers")), None)
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['target']:42} | {r['req_s']:5.2f} | {r['tok_s']:9.1f} | {ratio:>15} "
              f"| {r['ttft'][0]:8.2f} / {r['ttft'][1]:6.2f} "
              f"| {1e3 * r['tpot'][0]:8.1f} / {1e3 * r['tpot'][1]:7.1f} "
              f"| {1e3 * r['itl'][0]:7.1f} / {1e3 * r['itl'][1]:7.1f} "
              f"| {r['cpu_ms_tok']:12.2f} | {r['cores']:5.2f} | {r['failures']:8d} |")
    engine = next((r["tok_s"] for r in rows if r["target"].endswith("in process")), None)
    served = next((r["tok_s"] for r in rows if r["target"] == "lmstack serve"), None)
    if engine and served:
        print(f"\nlmstack serve reaches {served / engine:.0%} of the in-process engine's output tokens/s")
    if bound:
        print(f"\nmatmul bound (the linear products alone, measured in this run: a decode step of "
              f"{args.concurrency} rows {bound['decode_ms']:.2f} ms, the prefill of {args.concurrency} "
              f"prompts of {bound['prompt_tokens']:.0f} tokens {bound['prefill_ms']:.1f} ms): "
              f"{bound['tok_s']:,.0f} output tokens/s")
        print(f"with attention too (SDPA over contiguous keys, every layer: a decode step "
              f"{bound['decode_attn_ms']:.2f} ms more, the prefill {bound['prefill_attn_ms']:.1f} ms "
              f"more): {bound['attn_tok_s']:,.0f} output tokens/s")
        for r in rows:
            print(f"  {r['target']:42} {r['tok_s'] / bound['tok_s']:5.0%} of the matmul bound, "
                  f"{r['tok_s'] / bound['attn_tok_s']:5.0%} of the one with attention")
        if base:
            print(f"  5x transformers serve would be {5 * base / bound['tok_s']:.0%} of the matmul "
                  f"bound, {5 * base / bound['attn_tok_s']:.0%} of the one with attention")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lmstack.model.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp), args.preset, args.vocab_size)
        tokenizer = Tokenizer.load(model_dir)
        texts = prompts(args.requests, args.prompt_words)
        targets = {"engine": run_engine, "lmstack": run_lmstack, "transformers": run_transformers}
        if args.thread_engine:
            targets["lmstack-thread"] = functools.partial(run_lmstack, thread=True)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # in turns, so a burst of load elsewhere hits all alike
            for name, run in targets.items():
                if name not in args.skip:
                    row = run(model_dir, texts, args, tokenizer)
                    print(json.dumps(row), flush=True)
                    if name not in best or row["tok_s"] > best[name]["tok_s"]:
                        best[name] = row
        bound = matmul_bound(model_dir, texts, args, tokenizer)
        report(list(best.values()), args, bound)


if __name__ == "__main__":
    main()
