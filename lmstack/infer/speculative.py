"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

The accept/reject rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023) keeps the output distributed exactly as the target's: draft token
x_i ~ q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the
token is redrawn from normalize(max(p_i - q_i, 0)); if all k are accepted a bonus token comes from
p_k. Greedy decoding accepts while the draft equals the target's argmax.

The functions are batched and never sync with the host: they return fixed-size tensors
`tokens (B, k + 1)` and `num_accepted (B,)`; row b emits tokens[b, :num_accepted[b] + 1].
Shapes: B rows, k draft tokens, V vocabulary.
"""

from __future__ import annotations

import torch

from lmstack.infer.compiled import CompileCache
from lmstack.infer.runner import ModelRunner
from lmstack.infer.sampling import BatchSampling, exponential_noise, sampling_probs
from lmstack.infer.scheduler import ScheduledBatch
from lmstack.infer.sequence import Sequence
from lmstack.infer.step import StepRow
from lmstack.kernels import activation_like
from lmstack.model.paged import PagedKVCache


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities -> (...) indices, by the exponential race argmax(p / E), E ~ Exp(1)."""
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    return (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(-1)


def _batched(*tensors: torch.Tensor, unbatched_dim: int) -> tuple[bool, list[torch.Tensor]]:
    """Add a leading batch dim when the first tensor has `unbatched_dim` dims."""
    single = tensors[0].dim() == unbatched_dim
    return single, [t.unsqueeze(0) if single else t for t in tensors]


def accept_greedy(target: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target: (B, k + 1, V) logits or probs; draft_tokens: (B, k). (Unbatched shapes work too.)

    Returns tokens (B, k + 1), the target's argmax at every position (equal to the draft up to the
    first mismatch), and num_accepted (B,): the length of the matching prefix.
    """
    single, (target, draft_tokens) = _batched(target, draft_tokens, unbatched_dim=2)
    best = target.argmax(-1)  # (B, k + 1)
    k = draft_tokens.shape[1]
    num_accepted = (draft_tokens == best[:, :k]).long().cumprod(-1).sum(-1)
    return (best[0], num_accepted[0]) if single else (best, num_accepted)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p: (B, k + 1, V) target probs; q: (B, k, V) draft probs; draft_tokens: (B, k) drawn from q.

    Returns tokens (B, k + 1) (the draft with position num_accepted replaced by the resampled or
    bonus token) and num_accepted (B,). Unbatched shapes (k + 1, V), (k, V), (k,) work too.
    """
    single, (p, q, draft_tokens) = _batched(p, q, draft_tokens, unbatched_dim=2)
    B, k = draft_tokens.shape
    p, q = p.float(), q.float()
    p_draft = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k)
    q_draft = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand(B, k, device=p.device, generator=generator)
    accepted = u * q_draft < p_draft  # u < p / q without dividing by q
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # (B,)
    extra = sample_from(_residual(p, q, num_accepted), generator)
    tokens = torch.cat([draft_tokens, extra[:, None]], dim=1)
    tokens.scatter_(1, num_accepted[:, None], extra[:, None])
    return (tokens[0], num_accepted[0]) if single else (tokens, num_accepted)


def _residual(p: torch.Tensor, q: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, V): normalize(max(p_n - q_n, 0)) where a draft was rejected at n; p_k after k accepts."""
    rows = torch.arange(p.shape[0], device=p.device)
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # q_k = 0 makes the bonus p_k
    p_n, res = p[rows, n], (p[rows, n] - q_pad[rows, n]).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    # rounding can leave no mass where p and q agree; p_n is then the exact answer
    return torch.where(mass > 0, res / mass.clamp_min(torch.finfo(p.dtype).tiny), p_n)


# ----------------------------------------------------------------------------- in the engine

def repeat_rows(s: BatchSampling, n: int) -> BatchSampling:
    """Each row's parameters n times in a row, for (B * n, V) logits of (B, n, V)."""
    rep = lambda t: None if t is None else t.repeat_interleave(n)
    return BatchSampling(rep(s.temperature), rep(s.top_k), rep(s.top_p), rep(s.min_p), None,
                         s.all_greedy)


class SpeculativeDecoder:
    """Decode steps where a draft model proposes k tokens per sequence and the target verifies.

    The draft runs through a ModelRunner of its own, over its own PagedKVCache indexed by the
    target's block tables (the scheduler reserves k slots past each decoding sequence).
    `draft_done[seq_id]` counts the tokens whose draft keys/values are cached; whatever lies
    beyond (the prompt, tokens of non-speculative steps, the last accepted tokens) is fed to
    the draft first. One host sync per step.
    """

    def __init__(self, runner: ModelRunner, draft: torch.nn.Module, k: int, max_model_len: int,
                 compile_cache: CompileCache | None = None, **compile_options):
        target = runner.model
        if k <= 0:
            raise ValueError(f"num_speculative_tokens={k} must be >= 1 with a speculative_model")
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) "
                             f"differs from the target's ({target.config.vocab_size}); use a "
                             "draft trained with the same tokenizer")
        self.runner, self.k = runner, k
        emb = activation_like(target)
        draft = draft.to(device=emb.device, dtype=emb.dtype).eval()
        c, kv = draft.config, runner.kv
        draft_kv = PagedKVCache(c.n_layers, kv.num_blocks, kv.block_size, c.n_kv_heads,
                                c.head_dim, emb.device, emb.dtype, c.sliding_window)
        # compiled: the draft's one-token steps, and the target's verify pass (k + 1 tokens
        # per lane: other graphs of the target's CompiledDecode)
        self.draft_runner = ModelRunner(draft, draft_kv, compile_cache=compile_cache,
                                        **compile_options)
        self.max_len = min(max_model_len, c.max_seq_len)
        self.draft_done: dict[int, tuple[int, int]] = {}  # seq_id -> (tokens, num_preemptions)
        self.num_proposed = self.num_accepted = 0

    def applies(self, batch: ScheduledBatch) -> bool:
        """Only pure decode steps whose rows have k more slots (and context) and need no
        penalties or logprobs (both would have to see the draft tokens)."""
        bs = self.runner.kv.block_size
        return all(n == 1 and batch.samples(i) and seq.num_tokens + self.k <= self.max_len
                   and len(seq.block_table) * bs >= seq.num_tokens + self.k  # slots reserved
                   and not seq.params.needs_penalties and seq.params.logprobs is None
                   for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)))

    def remove(self, seq: Sequence) -> None:
        self.draft_done.pop(seq.seq_id, None)

    def stats(self) -> dict[str, float]:
        return {"spec_draft_tokens": self.num_proposed, "spec_accepted_tokens": self.num_accepted,
                "spec_acceptance_rate": self.num_accepted / max(self.num_proposed, 1)}

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[list[int]]:
        """Run one speculative step; per row the accepted draft tokens plus one target token."""
        seqs = batch.seqs
        s = BatchSampling.from_params([q.params for q in seqs], self.runner.device)
        draft_tokens, q = self._propose(seqs, s)
        p_logits = self._verify(seqs, draft_tokens)
        tokens, n = self._accept(p_logits, q, draft_tokens, s, seqs)
        tokens, n = tokens.tolist(), n.tolist()
        for seq, m in zip(seqs, n, strict=True):  # drafts d_1..d_{k-1} went into the draft cache
            self.draft_done[seq.seq_id] = (seq.num_tokens + min(m, self.k - 1), seq.num_preemptions)
        self.num_proposed += self.k * len(seqs)
        self.num_accepted += sum(n)
        return [row[:m + 1] for row, m in zip(tokens, n, strict=True)]

    def _draft_start(self, seq: Sequence) -> int:
        done, preemptions = self.draft_done.get(seq.seq_id, (0, seq.num_preemptions))
        return done if preemptions == seq.num_preemptions else 0  # preempted: blocks are new

    def _propose(self, seqs: list[Sequence], s: BatchSampling) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft steps: draft tokens (B, k) and the draft's distributions q (B, k, V)."""
        starts = [self._draft_start(seq) for seq in seqs]
        rows = [StepRow(seq.token_slice(a, seq.num_tokens), seq.block_table, a)
                for seq, a in zip(seqs, starts, strict=True)]
        last = self.draft_runner.forward(rows)
        gens = [self.runner.generators.get(q.seq_id) for q in seqs]
        drafted, probs = [], []
        for j in range(self.k):
            if j > 0:  # feed each row its previous draft token (known only on the device)
                rows = [StepRow([0], seq.block_table, seq.num_tokens + j - 1) for seq in seqs]
                last = self.draft_runner.forward(rows, drafted[-1][:, None])[:, 0]
            probs.append(last if s.all_greedy else sampling_probs(last, s))  # greedy: unused
            drafted.append(self._draw(last, probs[-1], s, gens))
        return torch.stack(drafted, 1), torch.stack(probs, 1)

    def _draw(self, logits, probs, s: BatchSampling, gens) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if s.all_greedy:
            return greedy
        noise = exponential_noise(probs.shape, gens, self.runner.generator, probs.device)
        return torch.where(s.temperature > 0, (probs / noise).argmax(-1), greedy)

    def _verify(self, seqs: list[Sequence], draft_tokens: torch.Tensor) -> torch.Tensor:
        """Target logits (B, k + 1, V) at the last token and the k draft tokens, in one pass."""
        rows = [StepRow([0] * (self.k + 1), seq.block_table, seq.num_tokens - 1) for seq in seqs]
        last = torch.tensor([seq.token_slice(seq.num_tokens - 1, seq.num_tokens)[0] for seq in seqs],
                            device=self.runner.device)
        tokens = torch.cat([last[:, None], draft_tokens], dim=1)  # (B, k + 1)
        return self.runner.forward(rows, tokens)

    def _accept(self, p_logits, q, draft_tokens, s: BatchSampling, seqs):
        tokens, n = accept_greedy(p_logits, draft_tokens)
        if s.all_greedy:
            return tokens, n
        B, K1, V = p_logits.shape
        p = sampling_probs(p_logits.flatten(0, 1), repeat_rows(s, K1)).view(B, K1, V)
        sampled, sampled_n = accept_sampled(p, q, draft_tokens, self.runner.generator)
        for i, seq in enumerate(seqs):  # a seeded request draws from its own generator
            g = self.runner.generators.get(seq.seq_id)
            if g is not None:
                sampled[i], sampled_n[i] = accept_sampled(p[i], q[i], draft_tokens[i], g)
        hot = s.temperature > 0
        return torch.where(hot[:, None], sampled, tokens), torch.where(hot, sampled_n, n)
