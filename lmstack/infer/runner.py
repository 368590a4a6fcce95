"""ModelRunner: one scheduled step -> tensors -> one forward pass -> sampled tokens.

The runner owns the paged KV pool and the per-request random generators; it knows nothing of
queues or blocks beyond the block tables the scheduler filled in. Each step does one host sync:
the sampled tokens (and logprobs, if asked) come back to Python together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.infer.compiled import CompiledDecode
from lmstack.infer.outputs import TokenLogprob
from lmstack.infer.sampling import BatchSampling, compute_logprobs, sample, token_counts
from lmstack.infer.scheduler import ScheduledBatch
from lmstack.infer.sequence import Sequence
from lmstack.model.paged import PagedKVCache, last_token_logits


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, seed: int = 0,
                 compile_decode: bool = False):
        self.model = model
        self.decode_model = CompiledDecode.for_model(model) if compile_decode else None
        self.kv = kv
        self.device = model.embed_tokens.weight.device
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator(self.device).manual_seed(seed)  # rows without a seed
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> the request's own

    def recompile(self) -> None:
        """Compile the decode steps again (at the next ones), from the model's weights as they
        are now; nothing without compiled steps."""
        if self.decode_model is not None:
            self.decode_model = CompiledDecode.for_model(self.model, renew=True)

    def add(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed)

    def remove(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def forward_last(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the model over the step's new tokens; logits (B, V) of each row's last one."""
        rows = [(seq.token_slice(seq.num_computed_tokens, seq.num_computed_tokens + n),
                 seq.block_table, seq.num_computed_tokens)
                for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        return last_token_logits(self.model, self.kv, rows, self.device, self.decode_model)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Forward the batch; sample a token for every row that finished computing its tokens."""
        logits = self.forward_last(batch)
        rows = [i for i in range(len(batch)) if batch.samples(i)]
        if not rows:
            return []
        last = logits if len(rows) == len(batch) else logits[torch.tensor(rows, device=self.device)]
        seqs = [batch.seqs[i] for i in rows]
        tokens = self.sample(last, seqs)
        ids = tokens.tolist()
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
        return sample(logits[:, :self.vocab_size], s, gens, self.generator, counts)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, ids: list[int],
                  seqs: list[Sequence]) -> list[TokenLogprob | None]:
        wanted = [q.params.logprobs for q in seqs]
        if all(n is None for n in wanted):
            return [None] * len(seqs)
        n = max(w for w in wanted if w is not None)
        chosen, top_vals, top_ids = compute_logprobs(logits, tokens, n)
        chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for i, w in enumerate(wanted):
            top = dict(zip(top_ids[i][:w], top_vals[i][:w], strict=True)) if w else {}
            out.append(None if w is None else TokenLogprob(ids[i], chosen[i], top))
        return out
