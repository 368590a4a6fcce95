"""What this CPU can do, read once at import: constants the model and the training code branch on.

Constants (never reassigned), so that torch.compile reads them without a graph break.
"""

import torch

NATIVE_CPU_BF16: bool = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
"""The CPU has native bf16 matmul instructions (AVX512-BF16 or AMX); without them PyTorch's bf16
kernels emulate bf16 and run several times slower than fp32."""
