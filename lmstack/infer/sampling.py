"""SamplingParams and the batched tensor functions that turn logits into next tokens.

Every function works on a whole step at once: (B, V) logits with one row per sequence and
per-row parameters as (B,) tensors, so the vocabulary is never looped over in Python.
Order (as in vLLM): penalties -> greedy argmax for temperature-0 rows -> temperature ->
top-k -> top-p -> min-p -> sample. Returned logprobs are those of the raw model distribution.

Sampling uses the exponential race (gpt-fast's `multinomial_sample_one_no_sync`):
argmax(p / E) with E ~ Exp(1) draws index i with probability p_i, without a host sync.
A request with a seed owns a torch.Generator that draws its row's noise, so its samples do
not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmstack.model.generate import top_k_mask, top_p_mask


@dataclass
class SamplingParams:
    """How to continue one prompt. Invalid values raise ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    """Generation ends when the text contains one of these; it is cut from the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    """Return the sampled token's logprob and the top-n alternatives per token (0: sampled only)."""
    ignore_eos: bool = False
    min_tokens: int = 0
    """Tokens to generate before end-of-text or a stop token may end the output."""
    logit_bias: dict | None = None
    """{token id: bias in [-100, 100]} added to those logits before sampling (OpenAI's
    logit_bias); JSON on the command line."""
    skip_special_tokens: bool = True
    """Leave special tokens (e.g. <|im_end|>) out of the text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = _parse_bias(self.logit_bias)
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 keeps all tokens)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 is off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative ints"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be None or >= 0"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def edits_logits(self) -> bool:
        """Whether the runner changes this request's logits row before sampling (bias, min_tokens)."""
        return bool(self.logit_bias) or self.min_tokens > 0


def _parse_bias(bias: dict) -> dict[int, float]:
    """{token id: bias} with int keys (JSON object keys are strings), biases in [-100, 100]."""
    try:
        parsed = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"SamplingParams.logit_bias={bias!r} must map token ids to numbers") from None
    bad = {k: v for k, v in parsed.items() if k < 0 or not -100 <= v <= 100}
    if bad:
        raise ValueError(f"SamplingParams.logit_bias has {bad}: ids must be >= 0 and biases in "
                         "[-100, 100]")
    return parsed


# ----------------------------------------------------------------------------- tensor functions

def token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, V) int counts of each token id in each row."""
    L = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), L + 1), vocab_size, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.long)
    counts.scatter_add_(1, ids, torch.ones_like(ids))  # column V collects the padding
    return counts[:, :vocab_size].to(device)


def apply_penalties(logits: torch.Tensor, prompt_counts: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty (CTRL) over prompt + output tokens; presence/frequency (OpenAI) over
    output tokens only. Counts are (B, V); the penalties (B,)."""
    seen = (prompt_counts > 0) | (output_counts > 0)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    out = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * out - presence[:, None] * (out > 0).to(logits.dtype)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p (B,) times the row's top probability."""
    probs = logits.softmax(-1)
    floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator | None],
                      default: torch.Generator | None, device) -> torch.Tensor:
    """(B, V) Exp(1) noise; row i comes from generators[i] when it has one."""
    q = torch.empty(shape, device=device).exponential_(generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)  # 0 / 0 would be NaN, which argmax picks


@dataclass
class BatchSampling:
    """One step's per-row sampling parameters as tensors (built by `from_params`)."""

    temperature: torch.Tensor  # (B,) 0 for greedy rows
    top_k: torch.Tensor | None  # (B,) long, None when no row uses it
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # repetition, presence, freq
    all_greedy: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device) -> BatchSampling:
        def col(name, dtype=torch.float32, off=None):
            vals = [getattr(p, name) for p in params]
            if off is not None and all(v == off for v in vals):
                return None
            return torch.tensor(vals, dtype=dtype, device=device)

        penalties = None
        if any(p.needs_penalties for p in params):
            penalties = (col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"))
        return cls(col("temperature"), col("top_k", torch.long, 0), col("top_p", off=1.0),
                   col("min_p", off=0.0), penalties, all(p.greedy for p in params))


def sampling_probs(logits: torch.Tensor, s: BatchSampling) -> torch.Tensor:
    """(R, V) logits -> the (R, V) distribution `sample` draws from: temperature, then the
    top-k / top-p / min-p filters (penalties are applied before, by the caller)."""
    logits = logits.float() / torch.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    if s.top_k is not None:
        logits = top_k_mask(logits, s.top_k)
    if s.top_p is not None:
        logits = top_p_mask(logits, s.top_p)
    if s.min_p is not None:
        logits = min_p_mask(logits, s.min_p)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, s: BatchSampling, generators: list[torch.Generator | None],
           default: torch.Generator | None = None,
           counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. counts: (prompt, output) token counts for penalties."""
    logits = logits.float()
    if s.penalties is not None:
        logits = apply_penalties(logits, *counts, *s.penalties)
    greedy = logits.argmax(-1)
    if s.all_greedy:
        return greedy
    probs = sampling_probs(logits, s)
    sampled = (probs / exponential_noise(probs.shape, generators, default, probs.device)).argmax(-1)
    return torch.where(s.temperature > 0, sampled, greedy)


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution logprobs: of the chosen tokens (B,), and the top-n (B, n) values and ids."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    top = logp.topk(n, dim=-1) if n > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, top[0], top[1]
