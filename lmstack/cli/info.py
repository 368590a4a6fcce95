"""`lmstack info`: what a model config amounts to (parameters, FLOPs, KV cache bytes).

    lmstack info llama-10m
    lmstack info runs/demo/checkpoints/step_00001000/config.json --seq-len 1024
"""

from __future__ import annotations

import torch

from lmstack.cli import flags
from lmstack.model import PRESETS, ModelConfig, Transformer


def main(argv: list[str]) -> int:
    p = flags.make_parser("lmstack info", __doc__)
    p.add_argument("config", metavar="CONFIG",
                   help=f"a preset ({', '.join(PRESETS)}) or a ModelConfig JSON file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for FLOPs (default: the model's max_seq_len)")
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
