"""`lmstack prepare`: tokenize text sources into token shards + meta.json for `lmstack pretrain`.

Sources are files or folders (searched with --glob): plain UTF-8 text (one document per file),
.jsonl (one document per line, from --text-field) or .parquet (that column). With no sources it
uses the built-in corpus: the running Python's standard library sources (about 30 MB, offline).
Re-running on unchanged input reuses the shards.

    lmstack prepare --out data/stdlib --vocab-size 8192
    lmstack prepare docs/ notes.jsonl table.parquet --out data/mine --text-field body --max-mb 100
"""

from __future__ import annotations

import inspect

from lmstack.cli import flags
from lmstack.data import prepare


def main(argv: list[str]) -> int:
    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    p = flags.make_parser("lmstack prepare", __doc__)
    p.add_argument("sources", nargs="*", help="files or folders (default: the built-in corpus)")
    p.add_argument("--out", required=True, help="output dir for tokenizer/, *.bin shards and meta.json")
    p.add_argument("--vocab-size", type=int, default=defaults["vocab_size"],
                   help="size of the BPE tokenizer trained on the corpus; ignored with --tokenizer")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer dir instead of training one")
    p.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                   help="share of documents held out for validation; 0 = none")
    p.add_argument("--workers", type=int, default=defaults["num_workers"],
                   help="batches tokenized at once, each over tokenizers' threads")
    p.add_argument("--glob", default=defaults["glob"], help="files to take from folders")
    p.add_argument("--text-field", default=defaults["text_field"],
                   help=".jsonl key / .parquet column holding the text")
    p.add_argument("--max-mb", type=float, default=defaults["max_mb"],
                   help="use a seeded random subset of the files of at most this many MB (default: all)")
    p.add_argument("--shard-tokens", type=int, default=defaults["shard_tokens"],
                   help="tokens per shard file")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help="picks the val documents and the --max-mb subset")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.sources, args.out, vocab_size=args.vocab_size, tokenizer_dir=args.tokenizer,
                       val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                       num_workers=args.workers, seed=args.seed, glob=args.glob,
                       text_field=args.text_field, max_mb=args.max_mb)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(summary(meta, args.out))
    return 0


def summary(meta: dict, out: str) -> str:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in meta["skipped"].items()) or "none"
    action = "reused the existing shards (input unchanged)" if meta["reused"] else "wrote new shards"
    return "\n".join([
        f"sources:   {', '.join(meta['sources'])} ({meta['files']:,} files)",
        f"documents: {meta['documents']:,}; skipped files/lines: {skipped}",
        f"tokens:    train {train['tokens']:,}, val {val['tokens']:,} ({meta['dtype']}, "
        f"vocab {meta['vocab_size']:,}, {len(train['shards']) + len(val['shards'])} shard files)",
        f"output:    {out} - {action}",
        f"seconds:   {meta['seconds']:.1f}",
    ])
