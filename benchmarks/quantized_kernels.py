"""The weight-only kernels alone, one row of bf16 activations, weights read from memory.

Per (N, K) shape: bf16 `F.linear`, `torch._weight_int8pack_mm` (int8 per output channel) and
`torch._weight_int4pack_mm_for_cpu` (int4, group 128), each on as many distinct weights as fill
`--working-set-mib` (default: more than server CPUs' last-level caches), taken in turn, so that
every product reads its weight from memory, as a decode step does (a weight set that fits in
the cache flatters the smaller formats most). Microseconds per
product, the ratio to bf16, and the share of the bandwidth bound each reaches (its weight's
bytes over the bandwidth measured in the same run, divided by its time): how far a decode step
on that kernel can come to the bound at all.

    .venv/bin/python benchmarks/quantized_kernels.py --threads 2

Timings on shared cores are noisy: compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import functools
import timeit

import torch
import torch.nn.functional as F
from decode_shapes import measured_bandwidth

SHAPES = [(2048, 2048), (2816, 1024), (1024, 2816)]  # (N outputs, K inputs): square, up, down
GROUP = 128


def per_product_us(products: list, rounds: int = 4) -> float:
    """Best time of one pass over every product, per product."""
    def one_pass():
        for run in products:
            run()
    one_pass()
    return min(timeit.repeat(one_pass, number=rounds, repeat=5)) / rounds / len(products) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--working-set-mib", type=int, default=1536,
                   help="bytes of distinct weights per format and shape; make it larger than the L3")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = measured_bandwidth()
    print(f"{args.threads} threads, {args.working_set_mib} MiB of weights per format and shape, bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s measured; microseconds per product (x bf16, share of the "
          "bandwidth bound)\n")
    print("| N x K | bf16 F.linear | int8 _weight_int8pack_mm | int4 _weight_int4pack_mm_for_cpu, group 128 |")
    print("|---|---:|---:|---:|")
    for N, K in SHAPES:
        count = {bits: -(-args.working_set_mib * 2**20 * 8 // (N * K * bits)) for bits in (16, 8, 4)}
        x = torch.randn(1, K, dtype=torch.bfloat16)
        scales = torch.rand(N, dtype=torch.bfloat16)
        scales_zeros = torch.rand(K // GROUP, N, 2, dtype=torch.bfloat16)
        with torch.inference_mode():
            bf16 = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(count[16])]
            base = per_product_us([functools.partial(F.linear, x, w) for w in bf16])
            del bf16
            int8 = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(count[8])]
            q8 = per_product_us([functools.partial(torch._weight_int8pack_mm, x, q, scales) for q in int8])
            del int8
            codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
            int4 = [torch._convert_weight_to_int4pack_for_cpu(codes, 1) for _ in range(count[4])]
            q4 = per_product_us([functools.partial(torch._weight_int4pack_mm_for_cpu, x, q, GROUP, scales_zeros)
                                 for q in int4])
            del int4
        shares = [f"{nbytes / bandwidth / (us * 1e-6):.0%}" for nbytes, us in
                  ((2 * N * K, base), (N * K + scales.nbytes, q8), (N * K // 2 + scales_zeros.nbytes, q4))]
        print(f"| {N} x {K} | {base:.1f} ({shares[0]}) | {q8:.1f} ({base / q8:.2f}x, {shares[1]}) "
              f"| {q4:.1f} ({base / q4:.2f}x, {shares[2]}) |")


if __name__ == "__main__":
    main()
