"""ModelRunner: one scheduled step -> tensors -> one forward pass -> sampled tokens.

The runner owns the paged KV pool and the per-request random generators; it knows nothing of
queues or blocks beyond the block tables the scheduler filled in. Each step does one host sync:
the sampled tokens (and logprobs, if asked) come back to Python together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.infer.compiled import CompileCache
from lmstack.infer.outputs import TokenLogprob
from lmstack.infer.sampling import BatchSampling, compute_logprobs, sample, token_counts
from lmstack.infer.scheduler import ScheduledBatch
from lmstack.infer.sequence import Sequence
from lmstack.infer.step import StepRow, prepare_step, split_decodes
from lmstack.infer.structured import Constraint
from lmstack.kernels import activation_like, drop_copies
from lmstack.model.paged import PagedKVCache


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None = None


class ModelRunner:
    """Runs one model over its paged KV pool: the engine's target, or a speculative draft."""

    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, seed: int = 0,
                 compile_cache: CompileCache | None = None, eos_id: int | None = None,
                 num_text_ids: int | None = None, **compile_options):
        self.model, self.kv = model, kv
        self.compile_cache, self.compile_options = compile_cache, compile_options
        self.decode = compile_cache.get(model, **compile_options) if compile_cache else None
        """The compiled decode steps; None: eager only."""
        self.device = activation_like(model).device
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator(self.device).manual_seed(seed)  # rows without a seed
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> the request's own
        self.constraints: dict[int, Constraint] = {}  # seq_id -> its structured-output state
        self.eos_id = eos_id
        """What min_tokens holds back, with the request's stop tokens."""
        self.num_text_ids = min(num_text_ids or self.vocab_size, self.vocab_size)
        """Ids the tokenizer can decode; the embedding's padding rows past them are never sampled."""

    def refresh(self) -> None:
        """After the model's weights changed in a way version counters cannot see (writes
        through `.data`): drop the kernels' packed copies and compile the decode steps again
        (at the next ones)."""
        drop_copies(self.model)
        if self.decode is not None:
            self.decode = self.compile_cache.get(self.model, renew=True, **self.compile_options)

    def add(self, seq: Sequence, constraint: Constraint | None = None) -> None:
        if seq.params.seed is not None:
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed)
        if constraint is not None:
            self.constraints[seq.seq_id] = constraint

    def remove(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.constraints.pop(seq.seq_id, None)

    def constraint_finished(self, seq: Sequence) -> bool:
        c = self.constraints.get(seq.seq_id)
        return c is not None and c.is_finished

    @torch.inference_mode()
    def forward(self, rows: list[StepRow], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model over the rows' new tokens: logits (R, V) at each row's last one.

        Single-token rows and longer ones run as separate passes (see split_decodes), the longer
        ones sharing lanes. With `tokens` (R, T) already on the device (every row T tokens,
        whose values in `rows` are then ignored), one pass of one lane per row, and the logits
        at every position, (R, T, V): a speculative step's draft and verify passes.
        """
        if tokens is not None:
            return self._pass(rows, tokens)
        groups = split_decodes(rows)
        if len(groups) == 1:
            return self._pass(rows, None)
        out = None
        for group in groups:
            logits = self._pass([rows[i] for i in group], None)
            if out is None:
                out = logits.new_empty(len(rows), logits.shape[-1])
            out[torch.tensor(group, device=self.device)] = logits
        return out

    def _pass(self, rows: list[StepRow], tokens: torch.Tensor | None) -> torch.Tensor:
        width = len(rows[0].tokens)
        decodes = (self.decode is not None and any(r.num_computed for r in rows)
                   and (width == 1 or tokens is not None))  # one token, or a fixed width
        run, compiled = self.decode.step_for(len(rows), width) if decodes else (self.model, False)
        step_tokens, positions, meta = prepare_step(self.kv, rows, self.device,
                                                    fill_lanes=tokens is None, compiled=compiled)
        if tokens is not None:
            return run(tokens, positions, cache=meta)
        logits = run(step_tokens, positions, cache=meta, logits_index=meta.logits_index)
        return logits.flatten(0, 1)[meta.logits_rows]  # (R, V)

    def batch_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the model over a scheduled step's new tokens; logits (B, V) of each row's last."""
        rows = [StepRow(seq.token_slice(seq.num_computed_tokens, seq.num_computed_tokens + n),
                        seq.block_table, seq.num_computed_tokens)
                for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        return self.forward(rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Forward the batch; sample a token for every row that finished computing its tokens."""
        logits = self.batch_logits(batch)
        rows = [i for i in range(len(batch)) if batch.samples(i)]
        if not rows:
            return []
        last = logits if len(rows) == len(batch) else logits[torch.tensor(rows, device=self.device)]
        seqs = [batch.seqs[i] for i in rows]
        tokens = self.sample(last, seqs)
        ids = tokens.tolist()
        for seq, t in zip(seqs, ids, strict=True):
            if seq.seq_id in self.constraints:
                self.constraints[seq.seq_id].accept(t)
        logprobs = self._logprobs(last, tokens, ids, seqs)
        return [SampledToken(s, t, lp) for s, t, lp in zip(seqs, ids, logprobs, strict=True)]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(R, V) last-token logits of these sequences -> (R,) token ids."""
        s = BatchSampling.from_params([q.params for q in seqs], self.device)
        counts = None
        if s.penalties is not None:
            counts = (token_counts([q.prompt_token_ids for q in seqs], self.vocab_size, self.device),
                      token_counts([q.output_token_ids for q in seqs], self.vocab_size, self.device))
        gens = [self.generators.get(q.seq_id) for q in seqs]
        logits = self._edit_logits(logits[:, :self.vocab_size], seqs)
        return sample(logits, s, gens, self.generator, counts)

    def _edit_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Changes before sampling: padding ids masked; per request logit_bias, min_tokens and
        grammar masks."""
        rows = [i for i, q in enumerate(seqs) if q.params.edits_logits or q.seq_id in self.constraints]
        if not rows and self.num_text_ids == self.vocab_size:
            return logits
        logits = logits.to(torch.float32, copy=True)  # the raw logits still give the logprobs
        logits[:, self.num_text_ids:] = float("-inf")
        for i in rows:
            self._edit_row(logits[i], seqs[i])
        return logits

    def _edit_row(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device)
        if len(seq.output_token_ids) < p.min_tokens:
            enders = p.stop_token_ids + ([self.eos_id] if self.eos_id is not None else [])
            row[torch.tensor(enders, dtype=torch.long, device=row.device)] = float("-inf")
        c = self.constraints.get(seq.seq_id)
        if c is not None and not c.is_finished:
            row.masked_fill_(~c.allowed(row.numel()).to(row.device), float("-inf"))

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, ids: list[int],
                  seqs: list[Sequence]) -> list[TokenLogprob | None]:
        wanted = [q.params.logprobs for q in seqs]
        if all(n is None for n in wanted):
            return [None] * len(seqs)
        n = max(w for w in wanted if w is not None)
        chosen, top_vals, top_ids = compute_logprobs(logits[:, :self.num_text_ids], tokens, n)
        chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for i, w in enumerate(wanted):
            top = dict(zip(top_ids[i][:w], top_vals[i][:w], strict=True)) if w else {}
            out.append(None if w is None else TokenLogprob(ids[i], chosen[i], top))
        return out
