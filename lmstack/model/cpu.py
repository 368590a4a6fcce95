"""What this CPU can do, read once at import: constants the model and the training code branch on.

Constants (never reassigned), so that torch.compile reads them without a graph break. They come
from the CPU's own feature flags (Linux's /proc/cpuinfo), not from any torch internals.
"""

from pathlib import Path

# x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension (FEAT_BF16)
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in /proc/cpuinfo's text ("flags" on x86, "Features" on Arm)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no native bf16, which is never wrong, only slower
        return ""


NATIVE_CPU_BF16: bool = bool(cpu_flags(_read_cpuinfo()) & _BF16_FLAGS)
"""The CPU has native bf16 matmul instructions; without them PyTorch's bf16 kernels emulate bf16
and run several times slower than fp32."""
