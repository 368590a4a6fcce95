"""Token shards: `prepare` turns text sources into token-id shards plus meta.json; `load_meta` checks them.

A prepared directory holds:

    tokenizer/          the tokenizer that made the shards (trained here, or copied from tokenizer_dir)
    train_000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32 token ids; each document's
    val_000.bin ...     tokens are followed by eos
    meta.json           written last: tokenizer hash, vocab size, dtype, token counts per shard, the
                        sources and a fingerprint of everything that produced the shards

Documents are cut into pieces of at most PIECE_CHARS (at a line break where there is one) so one
huge file still tokenizes in parallel and still gives a validation split. Piece j goes to val when
`j % k == seed % k` with `k = round(1 / val_fraction)`, so val text is never trained on, the
tokenizer included. Everything is written under temporary names and renamed, meta.json last: a
run that fails leaves an earlier prepared dir as it was, and one killed while renaming leaves no
meta.json, so the next run starts over instead of trusting half-replaced shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmstack.data.sources import SourceStats, builtin_corpus, iter_file_documents, list_files
from lmstack.model.tokenizer import Tokenizer

FORMAT = 1
META = "meta.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
PIECE_CHARS = 64 * 1024
BATCH_CHARS = 1 << 20  # text per encode_batch call: large enough to keep every tokenizer thread busy

Piece = tuple[int, str, bool]  # (index in the corpus, text, last piece of its document)


def dtype_name(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def prepare(sources: Sequence[str | Path] | None, out_dir: str | Path, vocab_size: int = 8192,
            tokenizer_dir: str | Path | None = None, val_fraction: float = 0.005,
            shard_tokens: int = 100_000_000, num_workers: int = 2, seed: int = 0,
            glob: str = "**/*", text_field: str = "text", max_mb: float | None = None,
            progress: bool = True) -> dict:
    """Tokenize `sources` (None or empty: the built-in corpus) into shards under `out_dir`.

    Trains a `vocab_size` BPE tokenizer on the train pieces unless `tokenizer_dir` is given.
    `max_mb` keeps a seeded random subset of the files totalling at most that many MB.
    `num_workers` batches are tokenized at once (each over tokenizers' own thread pool).
    Returns the meta dict plus `reused` (True when unchanged input let the old shards stand) and
    `seconds`.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    _check_settings(vocab_size, val_fraction, shard_tokens, num_workers, seed, max_mb)
    if isinstance(sources, str | Path):
        sources = [sources]
    roots = [Path(s) for s in sources] if sources else None
    files = _source_files(roots, glob, out, max_mb, seed)
    ref = Tokenizer.load(tokenizer_dir) if tokenizer_dir is not None else None
    settings = {"format": FORMAT, "glob": glob, "text_field": text_field, "val_fraction": val_fraction,
                "shard_tokens": shard_tokens, "seed": seed, "max_mb": max_mb, "piece_chars": PIECE_CHARS,
                "tokenizer": ref.fingerprint() if ref else {"train_vocab_size": vocab_size}}
    fingerprint = input_fingerprint(files, settings)
    meta = _reusable_meta(out, fingerprint)
    reused = meta is not None
    if not reused:
        meta = _build(files, out, ref, vocab_size, settings, num_workers, progress)
        meta.update(sources=[str(r) for r in roots] if roots else ["<built-in corpus>"],
                    input_fingerprint=fingerprint, settings=settings)
        _publish(out, meta)
    return {**meta, "reused": reused, "seconds": round(time.perf_counter() - start, 2)}


def _check_settings(vocab_size: int, val_fraction: float, shard_tokens: int, num_workers: int,
                    seed: int, max_mb: float | None) -> None:
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint32 token ids; use at most 2**32")
    if not 0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 0.5); e.g. --val-fraction 0.005")
    if shard_tokens < 1 or num_workers < 1 or seed < 0:
        raise ValueError(f"shard_tokens={shard_tokens} and num_workers={num_workers} must be >= 1, "
                         f"seed={seed} >= 0")
    if max_mb is not None and max_mb <= 0:
        raise ValueError(f"max_mb={max_mb} must be > 0 (or None for the whole corpus)")


def _source_files(roots: list[Path] | None, glob: str, out: Path, max_mb: float | None,
                  seed: int) -> list[Path]:
    if roots is None:
        files = builtin_corpus()
    else:  # our own output must never become input when --out sits inside a source folder
        files, inside = list_files(roots, glob), out.resolve()
        if any(inside == r.resolve() or r.resolve() in inside.parents for r in roots):
            files = [f for f in files if inside not in f.resolve().parents]
    if not files:
        raise ValueError(f"the sources {[str(r) for r in roots or []]} hold only the output dir {out}; "
                         "choose an --out outside the sources")
    return files if max_mb is None else _cap(files, max_mb, seed)


def _cap(files: list[Path], max_mb: float, seed: int) -> list[Path]:
    """A seeded random subset of `files` of at most `max_mb` MB (at least one file), in list order."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    budget, kept = max_mb * 1e6, set()
    for i in order:
        budget -= files[i].stat().st_size
        if budget < 0 and kept:
            break
        kept.add(i)
    return [f for i, f in enumerate(files) if i in kept]


def input_fingerprint(files: Iterable[Path], settings: dict) -> str:
    """sha256 over every input file's path, size and mtime plus the settings that shape the shards."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _reusable_meta(out: Path, fingerprint: str) -> dict | None:
    """The existing meta when it was made from this exact input and its shards and tokenizer are intact."""
    try:
        meta = load_meta(out)
        same = meta.get("input_fingerprint") == fingerprint
        return meta if same and Tokenizer.load(out / "tokenizer").fingerprint() == meta["tokenizer_hash"] else None
    except (OSError, ValueError, KeyError):  # missing, stale or damaged: prepare again
        return None


# ---- tokenizing ------------------------------------------------------------------------------------


def _build(files: list[Path], out: Path, ref: Tokenizer | None, vocab_size: int, settings: dict,
           num_workers: int, progress: bool) -> dict:
    k = round(1 / settings["val_fraction"]) if settings["val_fraction"] else 0
    in_val = lambda j: k > 0 and j % k == settings["seed"] % k
    tokenizer = ref or _train_tokenizer(files, settings["text_field"], in_val, vocab_size)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token, which lmstack puts between documents; "
                         "give a --tokenizer with an eos_token")
    out.mkdir(parents=True, exist_ok=True)
    _remove_tmp(out)  # left by a run that was killed
    tokenizer.save(out / "tokenizer.tmp")
    stats = SourceStats()
    pieces = _pieces(iter_file_documents(files, settings["text_field"], stats))
    try:
        splits = _write_shards(pieces, tokenizer, out, in_val, settings["shard_tokens"], num_workers,
                               _progress_bar(files, progress), stats)
        _check_splits(splits, k, stats)
    except BaseException:
        _remove_tmp(out)
        raise
    return {"format": FORMAT, "tokenizer_hash": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
            "dtype": dtype_name(tokenizer.vocab_size), "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
            "files": stats.files, "documents": stats.documents, "skipped": dict(stats.skipped),
            "skipped_examples": stats.examples, "splits": splits}


def _remove_tmp(out: Path) -> None:
    shutil.rmtree(out / "tokenizer.tmp", ignore_errors=True)
    for tmp in out.glob("*.bin.tmp"):
        tmp.unlink()


def _train_tokenizer(files: list[Path], text_field: str, in_val, vocab_size: int) -> Tokenizer:
    stats = SourceStats()
    pieces = _pieces(iter_file_documents(files, text_field, stats))
    first = next(pieces, None)
    if first is None:
        raise _empty_corpus(stats, text_field)
    texts = (text for j, text, _ in itertools.chain([first], pieces) if not in_val(j))
    return Tokenizer.train(texts, vocab_size)


def _empty_corpus(stats: SourceStats, text_field: str) -> ValueError:
    return ValueError(f"the corpus is empty: {stats.files} files gave no text (skipped: {stats.summary()}); "
                      f"give UTF-8 text files, .jsonl with a {text_field!r} field or .parquet with that column")


def _pieces(docs: Iterable[str]) -> Iterator[Piece]:
    index = itertools.count()
    for doc in docs:
        parts = split_pieces(doc)
        for i, part in enumerate(parts):
            yield next(index), part, i == len(parts) - 1


def split_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, after a newline where the piece has one."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars) + 1 or max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(pieces: Iterable[Piece], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[list[Piece], list[list[int]]]]:
    """(batch, token ids) in corpus order; `workers` batches are in flight while the next is read."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for batch in _batches(pieces):
            pending.append((batch, pool.submit(tokenizer.encode_batch, [text for _, text, _ in batch])))
            if len(pending) > workers:
                batch, future = pending.popleft()
                yield batch, future.result()
        for batch, future in pending:
            yield batch, future.result()


def _progress_bar(files: list[Path], enabled: bool):
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled)


def _write_shards(pieces: Iterable[Piece], tokenizer: Tokenizer, out: Path, in_val, shard_tokens: int,
                  workers: int, bar, stats: SourceStats) -> dict:
    dtype = DTYPES[dtype_name(tokenizer.vocab_size)]
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    try:
        with bar:
            for batch, ids in _encoded(pieces, tokenizer, workers):
                for (j, _, last), tokens in zip(batch, ids, strict=True):
                    writers["val" if in_val(j) else "train"].write(tokens + [tokenizer.eos_id] * last)
                bar.update(stats.bytes - bar.n)
    finally:
        splits = {split: w.close() for split, w in writers.items()}
    return splits


def _check_splits(splits: dict, k: int, stats: SourceStats) -> None:
    empty = [s for s in SPLITS if splits[s]["tokens"] == 0 and (s == "train" or k)]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} split got no text: {stats.documents} documents "
                         f"({splits['train']['pieces'] + splits['val']['pieces']} pieces) are too few for a "
                         "train/val split; add text or change --val-fraction (0 for no val split)")


class _ShardWriter:
    """Appends token ids to `{split}_NNN.bin.tmp` files, starting a new file every `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file": name, "tokens": count}
        self.pieces = 0
        self._file = None

    def write(self, ids: list[int]) -> None:
        self.pieces += 1
        tokens = np.asarray(ids, dtype=self.dtype)
        while len(tokens):
            if self._file is None:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]
            if self.shards[-1]["tokens"] == self.shard_tokens:
                self._file.close()
                self._file = None

    def _open_next(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.out / f"{name}.tmp", "wb")  # noqa: SIM115 - closed when the shard is full

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
            self._file = None
        return {"tokens": sum(s["tokens"] for s in self.shards), "pieces": self.pieces, "shards": self.shards}


def _publish(out: Path, meta: dict) -> None:
    """Swap the new tokenizer and shards in, delete shards of an older run, then write meta.json.

    Until here a failed run leaves an earlier prepared dir as it was; from the unlink on, a crash
    leaves no meta.json, which the next run (or a TokenStream) will not trust.
    """
    (out / META).unlink(missing_ok=True)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(out / "tokenizer.tmp", out / "tokenizer")
    keep = set()
    for split in meta["splits"].values():
        for s in split["shards"]:
            os.replace(out / f"{s['file']}.tmp", out / s["file"])
            keep.add(s["file"])
    for split in SPLITS:
        for old in out.glob(f"{split}_*.bin"):
            if old.name not in keep and old.stem[len(split) + 1:].isdigit():
                old.unlink()
    tmp = out / f"{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / META)


# ---- reading ----------------------------------------------------------------------------------------


def load_meta(data_dir: str | Path) -> dict:
    """Read meta.json and check every shard it lists exists with exactly its recorded token count."""
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lmstack prepare ... --out {data_dir}` first")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged ({e}); re-run `lmstack prepare`") from e
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise ValueError(f"{path} has format {meta.get('format')!r}, dtype {meta.get('dtype')!r}; this "
                         f"lmstack reads format {FORMAT} ({'/'.join(DTYPES)}): re-run `lmstack prepare`")
    itemsize = DTYPES[meta["dtype"]].itemsize
    for split in meta["splits"].values():
        for shard in split["shards"]:
            check_shard(Path(data_dir) / shard["file"], shard["tokens"], itemsize)
    return meta


def check_shard(path: Path, tokens: int, itemsize: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in meta.json is missing; re-run `lmstack prepare`")
    size = path.stat().st_size
    if size % itemsize or size // itemsize != tokens:
        raise ValueError(f"shard {path} is corrupted: {size} bytes, but meta.json records {tokens} tokens "
                         f"of {itemsize} bytes ({tokens * itemsize} bytes); re-run `lmstack prepare`")
