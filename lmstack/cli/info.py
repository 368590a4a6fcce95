"""`lmstack info`: what a model config amounts to (parameters, FLOPs, KV cache bytes)."""

from __future__ import annotations

import argparse

import torch

from lmstack.model import PRESETS, ModelConfig, Transformer


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lmstack info", description=__doc__)
    p.add_argument("config", help=f"a preset ({', '.join(PRESETS)}) or a config.json path")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_preset(args.config) if args.config in PRESETS else ModelConfig.load(args.config)
    with torch.device("meta"):
        model = Transformer(cfg)
    seq = args.seq_len or cfg.max_seq_len
    print(f"parameters:          {model.num_params():,}")
    print(f"  without embeddings {model.num_params(exclude_embeddings=True):,}")
    print(f"train FLOPs/token:   {model.flops_per_token(seq):.3e} at seq_len={seq}")
    print(f"KV bytes/token:      {model.kv_bytes_per_token(torch.bfloat16):,} (bf16)")
    return 0
