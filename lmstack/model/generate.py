"""Reference generation for one batch with a StaticCache, and the sampling functions it uses.

This is the simple, obviously-correct decoder the serving engine is checked against:
left-pad the prompts, prefill once, then decode one token per step for every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmstack.model.cache import StaticCache


def top_k_mask(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the boundary are kept), -inf elsewhere.

    k: one int for every row, or a (B,) long tensor with one k per row of (B, V) logits;
    k <= 0 or k >= V keeps the whole row.
    """
    V = logits.shape[-1]
    if isinstance(k, int):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    else:
        k = torch.where((k <= 0) | (k > V), V, k)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches p (nucleus sampling).

    p: one float for every row, or a (B,) tensor with one p per row of (B, V) logits.
    """
    if isinstance(p, torch.Tensor):
        p = p[:, None]  # (B, 1)
    elif p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # drop a token when the mass strictly before it already reaches p; the top token always stays
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = top_p_mask(top_k_mask(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) tokens and (B, T) bool mask of real tokens, padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = True
    return tokens, mask


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), seed: int | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt; return the new tokens per prompt (a stop token ends and is kept)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    device = next(model.parameters()).device
    tokens, pad_mask = left_pad(prompts, pad_id, device)
    B, T = tokens.shape
    if T + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = StaticCache.for_model(model, B, T + max_new_tokens)
    positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads sit at 0
    logits = model(tokens, positions, cache, pad_mask)[:, -1]
    next_pos = positions[:, -1:] + 1
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        tok = tok.masked_fill(done, pad_id)
        out.append(tok)
        done |= torch.isin(tok, stop)
        if bool(done.all()):
            break
        logits = model(tok[:, None], next_pos, cache)[:, -1]
        next_pos = next_pos + 1
    steps = torch.stack(out, dim=1).tolist()  # (B, steps)
    return [_until_stop(row, set(stop_tokens)) for row in steps]


def _until_stop(row: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stop:
            return row[: i + 1]
    return row
