"""LLM: the inference engine. Requests in, tokens and text out, one batched step at a time.

    llm = LLM("path/to/model")                       # or LLM(model, tokenizer)
    outs = llm.generate(["Hello", "The sky"], SamplingParams(max_tokens=32, temperature=0))
    for out in llm.stream("Once upon", SamplingParams(max_tokens=64)): print(out.delta_text, end="")

An outer loop (the server) drives it with `add_request` / `step` / `abort`. Each step:
the Scheduler picks sequences and token counts, the ModelRunner runs one forward pass over the
paged KV cache and samples, then the engine appends tokens, checks stop conditions and frees
finished sequences' blocks. A bad request raises ValueError in add_request before anything is
allocated, so it never disturbs the requests already running.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.compiled import SHARED, CompileCache
from lmstack.infer.loading import load_model, load_tokenizer, parse_dtype
from lmstack.infer.outputs import IncrementalText, RequestMetrics, RequestOutput, TokenLogprob
from lmstack.infer.runner import ModelRunner, SampledToken
from lmstack.infer.sampling import SamplingParams, compute_logprobs
from lmstack.infer.scheduler import ScheduledBatch, Scheduler
from lmstack.infer.sequence import FinishReason, Sequence
from lmstack.infer.speculative import SpeculativeDecoder
from lmstack.infer.structured import Constraint
from lmstack.kernels import CPU_PACKED, activation_like, swap_linears
from lmstack.kernels.packed import PackedWeight
from lmstack.model.paged import PagedKVCache

Prompt = str | list[int]


@dataclass
class EngineConfig:
    """Engine options (the `LLM` keyword arguments and `lmstack generate` flags)."""

    block_size: int = 32
    """Token slots per KV-cache block. Larger blocks mean fewer, longer runs for attention to
    read (compiled CPU decode visits the pool block by block) and coarser prefix sharing (only
    whole blocks are shared); docs/performance.md has 16 against 32."""
    num_blocks: int | None = None
    """KV pool size in blocks; None sizes it from kv_budget_bytes."""
    kv_budget_bytes: int | None = None
    """Bytes for keys/values; None: room for max_num_seqs full contexts, capped at half the free
    GPU memory (CUDA) or 2 GiB (CPU)."""
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    max_prefill_chunk: int | None = None
    """Most prompt tokens one sequence computes per step; None: the step's token budget."""
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's max_seq_len."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None keeps the model's (or the checkpoint's) dtype."""
    device: str | None = None
    """None: the given model's device, else cuda when available."""
    pack_weights: bool = True
    """CPU: swap lmstack.kernels' oneDNN-packed linears into the model (in place, the same
    Parameters): faster products for a second copy of those weights in memory."""
    compile: bool = False
    """torch.compile the decode steps (one new token per sequence; prefill stays eager), after
    tens of seconds of compilation at the first decode steps (per kind of step and variant).
    Each kind of step's frozen-weight graphs keep another copy of the weights until the process
    ends (engines over the same model share them). The first steps of each kind are timed on
    every variant and on the eager model, and the fastest runs from then on (see
    compile_probe_steps). Speculative steps (draft and verify) compile too. If the weights
    change later, decode falls back to eager (see CompiledDecode; `LLM.weights_changed()`
    compiles again)."""
    compile_probe_steps: int = 3
    """With compile: how many timed steps of each kind each candidate (frozen-weight graphs,
    packed-weight graphs on CPU, the eager model) runs, in turns, before the fastest is kept;
    0 times nothing and follows the rows rule (compile_frozen_rows)."""
    compile_frozen_rows: int | None = None
    """With compile on CPU: the rows rule that sorts decode steps into kinds, and picks their
    variant when nothing is timed: steps of at most this many rows run on weights frozen into
    the graph, longer ones on oneDNN's packed copies; None: 2 per byte of a weight element
    (see lmstack.infer.compiled.frozen_max_rows)."""
    compile_cache: CompileCache | None = None
    """Where compiled decode steps are kept, per model, for engines to share; None: the
    process-wide lmstack.infer.compiled.SHARED."""
    seed: int = 0
    """Seeds the sampling of requests that bring no seed of their own."""
    speculative_model: str | Path | torch.nn.Module | None = None
    """Draft model (directory or Transformer) for speculative decoding; None: off."""
    num_speculative_tokens: int = 4
    """Tokens the draft proposes per decode step (k); only with speculative_model."""


@dataclass
class _Request:
    seq: Sequence
    text: IncrementalText
    logprobs: list[TokenLogprob] | None
    emitted_tokens: int = 0
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(self.seq.arrival_time)


class LLM:
    def __init__(self, model: str | Path | torch.nn.Module, tokenizer=None, **options):
        self.config = cfg = EngineConfig(**options)
        self.model, self.tokenizer = _resolve_model(model, tokenizer, cfg)
        self.max_model_len = min(cfg.max_model_len or 10**12, self.model.config.max_seq_len)
        self.kv = _make_kv_cache(self.model, cfg, self.max_model_len)
        self.blocks = BlockManager(self.kv.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        k = cfg.num_speculative_tokens if cfg.speculative_model is not None else 0
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_prefill_chunk, num_lookahead_slots=k)
        cache = (cfg.compile_cache or SHARED) if cfg.compile else None
        options = dict(probe_steps=cfg.compile_probe_steps, max_frozen_rows=cfg.compile_frozen_rows)
        self.eos_id = getattr(self.tokenizer, "eos_id", None)
        self.runner = ModelRunner(self.model, self.kv, cfg.seed, cache, self.eos_id,
                                  getattr(self.tokenizer, "vocab_size", None), **options)
        self.speculator = _make_speculator(self.runner, cfg, self.max_model_len, cache, options)
        self.runners = [self.runner] + ([self.speculator.draft_runner] if self.speculator else [])
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------------- requests

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, constraint: Constraint | None = None) -> str:
        """Queue one request; return its id. Raises ValueError (and changes nothing) if invalid.
        A constraint (lmstack.infer.structured) decides which tokens the output may take."""
        ids, params = self._validate(prompt, params or SamplingParams(), request_id)
        if self.speculator is not None and (constraint is not None or params.edits_logits):
            raise ValueError("structured outputs, logit_bias and min_tokens need plain decoding; "
                             "serve without a speculative model")
        return self._enqueue(ids, params, request_id, constraint)

    def _validate(self, prompt: Prompt, params: SamplingParams,
                  request_id: str | None) -> tuple[list[int], SamplingParams]:
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already running; use a new id")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass tokenizer= or use stop_token_ids")
        ids = self._encode(prompt)
        V = self.model.config.vocab_size
        if params.logit_bias and not all(t < V for t in params.logit_bias):
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {V})")
        if not all(t < V for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in the vocabulary [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds "
                             f"{self.max_model_len} (prompt + at least one new token); shorten it")
        need = self.blocks.blocks_for(min(len(ids) + params.max_tokens, self.max_model_len))
        if need > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks but the pool has "
                             f"{self.blocks.num_blocks}; lower max_tokens or raise num_blocks")
        return ids, params

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass tokenizer= or token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        V = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {V}); got {ids[:8]}...")
        return ids

    def _enqueue(self, ids: list[int], params: SamplingParams, request_id: str | None,
                 constraint: Constraint | None = None) -> str:
        n = next(self._ids)
        request_id = str(n) if request_id is None else request_id
        seq = Sequence(n, ids, params, arrival_time=time.time(), request_id=request_id)
        logprobs = [] if params.logprobs is not None else None
        text = IncrementalText(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        self.requests[request_id] = _Request(seq, text, logprobs)
        self.runner.add(seq, constraint)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; return its final output (None if unknown)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT, time.time())
        return self._output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------- stepping

    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return an output per request that got a new token."""
        return self._step(finished_only=False)

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        """step(); with finished_only, outputs of finished requests only (generate's case: an
        output copies all of a request's tokens so far, which costs O(n^2) over a long one)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not place any request; this is a bug")
            return []
        self._mark_scheduled(batch)
        if self.speculator is not None and self.speculator.applies(batch):
            return self._speculative_step(batch, finished_only)
        sampled = self.runner.execute(batch)
        self.scheduler.advance(batch)
        now = time.time()
        reqs = [self._add_token(s, now) for s in sampled]
        return [self._output(r) for r in reqs if not finished_only or r.seq.is_finished]

    def _mark_scheduled(self, batch: ScheduledBatch) -> None:
        now = None
        for seq in batch.seqs:
            m = self.requests[seq.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now = now or time.time()

    def _speculative_step(self, batch: ScheduledBatch, finished_only: bool) -> list[RequestOutput]:
        """The draft proposes k tokens per row, the target verifies; each row gains 1 to k + 1."""
        rows = self.speculator.execute(batch)
        self.scheduler.advance(batch)  # each row's last token now has keys/values
        now, outs = time.time(), []
        for seq, tokens in zip(batch.seqs, rows, strict=True):
            for t in tokens:
                req = self._add_token(SampledToken(seq, t), now)
                if seq.is_finished:
                    break
            else:  # the accepted drafts' keys/values are cached too; the last token's come next
                self.scheduler.accept_drafts(seq, len(tokens) - 1)
            req.metrics.num_draft_tokens += self.speculator.k
            req.metrics.num_accepted_draft_tokens += len(tokens) - 1
            if not finished_only or seq.is_finished:
                outs.append(self._output(req))
        return outs

    def _add_token(self, s: SampledToken, now: float) -> _Request:
        req = self.requests[s.seq.request_id]
        seq = req.seq
        seq.output_token_ids.append(s.token_id)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if req.logprobs is not None:
            req.logprobs.append(s.logprob)
        reason = self._stop_reason(req, s.token_id)
        if reason is not None:
            req.text.flush()
            self._finish(req, reason, now)
        return req

    def _stop_reason(self, req: _Request, token: int) -> FinishReason | None:
        seq, p = req.seq, req.seq.params
        if token in p.stop_token_ids or (token == self.eos_id and not p.ignore_eos):
            req.stop_reason = token  # a stop token ends the text without appearing in it
            return FinishReason.STOP
        req.stop_reason = req.text.add(token)
        if req.stop_reason is not None or self.runner.constraint_finished(seq):
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: _Request, reason: FinishReason, now: float) -> None:
        self.scheduler.finish(req.seq, reason)
        self.runner.remove(req.seq)
        if self.speculator is not None:
            self.speculator.remove(req.seq)
        req.metrics.finish_time = now

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        finished = seq.is_finished
        if finished:
            self.requests.pop(seq.request_id, None)
        new_tokens = seq.output_token_ids[req.emitted_tokens:]
        req.emitted_tokens = len(seq.output_token_ids)
        req.metrics.num_cached_tokens = seq.num_cached_tokens
        req.metrics.num_preemptions = seq.num_preemptions
        return RequestOutput(
            seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), req.text.text,
            new_tokens, req.text.delta(finished), finished,
            seq.finish_reason.value if finished else None, replace(req.metrics),
            list(req.logprobs) if req.logprobs is not None else None, req.stop_reason)

    # ------------------------------------------------------------------------- convenience

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. Drives every queued request, so
        do not mix with an outer add_request/step loop."""
        ids = self._add_all(prompts, params)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            final.update((o.request_id, o) for o in self._step(finished_only=True))
        return [final[i] for i in ids]

    def stream(self, prompts: Prompt | list[Prompt],
               params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield incremental outputs (delta_text / delta_token_ids) as steps run. Closing the
        iterator early aborts the requests that are still running."""
        live = set(self._add_all(prompts, params))
        try:
            while live:
                for out in self.step():
                    if out.request_id in live:
                        yield out
                        if out.finished:
                            live.discard(out.request_id)
        finally:
            for request_id in live:
                self.abort(request_id)

    def _add_all(self, prompts, params) -> list[str]:
        """Validate every prompt first, so a bad one leaves the engine untouched."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        checked = [self._validate(p, sp, None) for p, sp in zip(prompts, params, strict=True)]
        return [self._enqueue(ids, sp, None) for ids, sp in checked]

    def reset_prefix_cache(self) -> int:
        """Stop reusing cached prompt blocks (call it after changing the model's weights in
        place: cached keys/values were computed with the old ones); returns how many there were."""
        return self.blocks.reset_prefix_cache()

    def weights_changed(self) -> int:
        """Call after changing the model's (or the draft's) weights in place in a way version
        counters cannot see (writes through `.data`; in-place ops and `load_state_dict` are
        seen): the kernels pack those weights again and the decode steps compile again at the
        next ones (if compiled). Also drops the cached prompt blocks (their keys/values came
        from the old weights); returns how many were dropped. Requests in flight keep the
        keys/values they have computed so far."""
        for runner in self.runners:
            runner.refresh()
        return self.reset_prefix_cache()

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Prompt, n: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the tokens before it, with the top-n alternatives
        (the raw distribution over the tokenizer's ids); None for the first token, which nothing
        precedes. One full causal pass over the prompt outside the paged cache and the
        scheduler (its (T, V) logits at once), so call it between steps."""
        ids = self._encode(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, over the context of "
                             f"{self.max_model_len}; shorten it")
        tokens = torch.tensor(ids, device=self.runner.device)
        logits = self.model(tokens[None])[0, :-1, :self.runner.num_text_ids]  # (T-1, V)
        chosen, top_vals, top_ids = (t.tolist() for t in compute_logprobs(logits, tokens[1:], n))
        return [None] + [TokenLogprob(t, c, dict(zip(i, v, strict=True)))
                         for t, c, i, v in zip(ids[1:], chosen, top_ids, top_vals, strict=True)]

    def stats(self) -> dict[str, float]:
        b = self.blocks
        return {"free_blocks": b.num_free_blocks, "num_blocks": b.num_blocks,
                "prefix_hit_tokens": b.hit_tokens, "prefix_queried_tokens": b.queried_tokens,
                "num_preemptions": self.scheduler.num_preemptions,
                "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                **(self.speculator.stats() if self.speculator is not None else {})}


# ----------------------------------------------------------------------------- construction

def _resolve_model(model, tokenizer, cfg: EngineConfig):
    """(model, tokenizer) from a model object or a directory; moved to cfg's device/dtype."""
    dtype = parse_dtype(cfg.dtype)
    if isinstance(model, str | Path):
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model, device, dtype)
    elif cfg.device is not None or dtype is not None:
        model = model.to(device=cfg.device, dtype=dtype)
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    return _with_kernels(model, cfg).eval(), tokenizer


def _with_kernels(model: torch.nn.Module, cfg: EngineConfig) -> torch.nn.Module:
    """The model with the CPU kernels swapped in (in place; the same Parameters), if asked and
    oneDNN can pack its weights (CPU fp32, or bf16 with native bf16 instructions): otherwise the
    kernels would only add their checks to every call."""
    if cfg.pack_weights and PackedWeight.supports(activation_like(model)):
        swap_linears(model, CPU_PACKED)
    return model


def _make_speculator(runner: ModelRunner, cfg: EngineConfig, max_model_len: int,
                     cache: CompileCache | None, options: dict) -> SpeculativeDecoder | None:
    if cfg.speculative_model is None:
        return None
    draft = cfg.speculative_model
    if isinstance(draft, str | Path):
        draft = load_model(draft, runner.device)
    return SpeculativeDecoder(runner, _with_kernels(draft, cfg), cfg.num_speculative_tokens,
                              max_model_len, cache, **options)


def _make_kv_cache(model, cfg: EngineConfig, max_model_len: int) -> PagedKVCache:
    emb = activation_like(model)
    num_blocks = cfg.num_blocks
    if num_blocks is None:
        budget = cfg.kv_budget_bytes or _default_kv_budget(model, cfg, max_model_len, emb)
        num_blocks = PagedKVCache.blocks_for_budget(model, budget, cfg.block_size, emb.dtype)
    c = model.config
    return PagedKVCache(c.n_layers, num_blocks, cfg.block_size, c.n_kv_heads, c.head_dim,
                        emb.device, emb.dtype, c.sliding_window)


def _default_kv_budget(model, cfg: EngineConfig, max_model_len: int, emb: torch.Tensor) -> int:
    wanted = cfg.max_num_seqs * (max_model_len + cfg.block_size) * model.kv_bytes_per_token(emb.dtype)
    if emb.device.type == "cuda":
        return min(wanted, torch.cuda.mem_get_info(emb.device)[0] // 2)
    return min(wanted, 2 << 30)
