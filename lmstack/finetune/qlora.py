"""QLoRA (Dettmers et al., 2023): LoRA over a base whose linear weights are stored as NF4.

NF4 comes from torchao's `NF4Tensor`: each block of 64 weights is scaled by its absmax to
[-1, 1] and each weight stored as the nearest of 16 NormalFloat levels (4 bits); the block
scales are quantized again to int8 in groups (double quantization: torchao always applies it).
Products dequantize the weight to bf16 and compute in bf16 (`linear_nf4`, with its own backward
to the input; the weight takes no gradient). torchao is chosen over bitsandbytes because its
tensor is a plain torch subclass that FSDP2's `fully_shard` shards; bitsandbytes' Params4bit is not.

    apply_lora(model, targets, r, alpha)   # wrap first
    quantize_nf4(model)                    # then every plain linear, adapters' bases too, -> NF4

Merging an adapter into an NF4 base merges into the dequantized weight, which is what the
adapter was trained against (merging into the original float weights instead is the mismatch
reported in artidoro/qlora#28 and huggingface/peft#2105).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.kernels import swap_linears

BLOCK_SIZE = 64
"""Weights per absmax block (the QLoRA paper's)."""
MAX_SCALER_BLOCK = 256
"""Block scales per double-quantization group; torchao needs it to divide the block count, so
a weight of n blocks uses gcd(n, 256)."""
COMPUTE_DTYPE = torch.bfloat16


def require_nf4() -> None:
    """ValueError naming the fix when no NF4 implementation can be imported."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--method qlora needs an NF4 kernel, and torchao cannot be imported "
                         f"({e}); install it: pip install 'lmstack[finetune]' (torchao>=0.10), "
                         "or fine-tune with --method lora") from e


class NF4Linear(nn.Module):
    """A frozen linear whose weight is an NF4Tensor Parameter (named `weight`, like the
    nn.Linear it replaces); computes in bf16 and returns x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE) -> NF4Linear:
        require_nf4()
        from torchao.quantization import to_nf4
        w = linear.weight.detach().to(COMPUTE_DTYPE).contiguous()
        if w.numel() % block_size:
            raise ValueError(f"a {tuple(w.shape)} weight does not split into NF4 blocks of "
                             f"{block_size}; leave this linear out of QLoRA")
        scaler_block = math.gcd(w.numel() // block_size, MAX_SCALER_BLOCK)
        return cls(to_nf4(w, block_size, scaler_block), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
        y = linear_nf4(x.to(COMPUTE_DTYPE), self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight the products use, (out, in) in bf16."""
        return self.weight.get_original_weight()

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """An nn.Linear over the dequantized weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize().to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def nbytes(self) -> int:
        """Bytes the NF4 weight occupies: codes, quantized scales and their factors."""
        names, _ = self.weight.__tensor_flatten__()
        return sum(getattr(self.weight, n).nbytes for n in names)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, NF4"


def quantize_nf4(model: nn.Module, block_size: int = BLOCK_SIZE) -> int:
    """Replace every plain nn.Linear (LoRA bases included, adapters are not linears) by an
    NF4Linear, in place; return how many. Apply LoRA first: its targets are found by name."""
    require_nf4()
    return swap_linears(model, {nn.Linear: lambda m: NF4Linear.from_linear(m, block_size)})


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the NF4 weights, bytes the same weights take in bf16)."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.nbytes() for m in nf4), sum(2 * m.weight.numel() for m in nf4)


def dequantize_nf4(model: nn.Module) -> int:
    """Replace every NF4Linear by an nn.Linear over its dequantized weight (fp32), in place."""
    return swap_linears(model, {NF4Linear: lambda m: m.to_linear()})
