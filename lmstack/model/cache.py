"""StaticCache: preallocated keys and values per layer, for incremental decoding of one batch.

Rows may be left-padded prompts of different lengths: `key_valid` remembers which cache slots
hold real tokens, and the attention mask hides the others. Slots are filled left to right;
`length` is how many are filled. The model reads the cache; `Transformer.forward` advances it.
"""

from __future__ import annotations

import torch


def causal_mask(start: int, key_valid: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(B, 1, T, S) boolean mask: queries in slots [start, S) over keys in slots [0, S).

    A query sees earlier-or-equal slots that are valid (and within the window, if any).
    Every query may see itself, so a padding query never gets an empty softmax row.
    """
    S = key_valid.shape[1]
    q = torch.arange(start, S, device=key_valid.device)[:, None]  # (T, 1)
    k = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    allowed = k <= q
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    return (allowed & (key_valid[:, None, :] | (k == q)))[:, None]


class StaticCache:
    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int,
                 head_dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sliding_window: int | None = None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)  # (B, Hkv, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.sliding_window = sliding_window
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> StaticCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim,
                   p.device, p.dtype, cfg.sliding_window)

    def mask(self, T: int, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Record which of the next T slots are real and return the (B, 1, T, S) boolean mask
        for queries in those slots over keys in slots [0, length + T)."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {end} requested. "
                             "Allocate a larger StaticCache (max_len).")
        if pad_mask is not None:
            self.key_valid[:, start:end] = pad_mask
        return causal_mask(start, self.key_valid[:, :end], self.sliding_window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, D) keys/values at the current slots; return all filled slots."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor, attention) -> torch.Tensor:
        """Write the new keys/values; `attention(q, keys, values, mask)` over all filled slots."""
        return attention(q, *self.update(layer, k, v), mask)

    def advance(self, T: int) -> None:
        self.length += T
