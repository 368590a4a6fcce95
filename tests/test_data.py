"""The data layer: text sources, `prepare` (shards + meta.json, reuse), `TokenStream` and bad input."""

import os
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmstack.cli import main as cli
from lmstack.data import (
    SourceStats,
    TokenStream,
    builtin_corpus,
    iter_documents,
    load_meta,
    prepare,
)
from lmstack.model.tokenizer import Tokenizer

WORDS = "the model reads tokens and learns to predict what comes next naïve café 東京 loss falls".split()
VOCAB = 300


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 200))) + f"\n{i}\n" for i in range(n)]


def write_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def split_tokens(data: Path, split: str) -> np.ndarray:
    meta = load_meta(data)
    files = [data / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files])


def decode_documents(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """The documents of a split: the text between eos tokens."""
    ends = np.flatnonzero(tokens == tok.eos_id)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends in eos"
    return [tok.decode(part[:-1]) for part in np.split(tokens, ends + 1)[:-1]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], Path, dict]:
    """40 documents prepared with val every 10th document and 2000-token shards (several per split)."""
    root = tmp_path_factory.mktemp("prepared")
    docs = make_docs(40)
    src = write_corpus(root / "src", docs)
    meta = prepare([src], root / "data", vocab_size=VOCAB, val_fraction=0.1, shard_tokens=2000,
                   progress=False)
    return docs, root / "data", meta


# ---- sources ---------------------------------------------------------------------------------------


def test_sources_of_every_kind_and_skips_are_counted(tmp_path, monkeypatch):
    (tmp_path / "single.txt").write_text("a single file\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b.md").write_text("nested markdown\n")
    (folder / "a.txt").write_text("top level text\n")
    (folder / "skip.log").write_text("not matched by the glob\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.txt").write_text("hidden, never corpus text\n")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "locked.txt").write_text("cannot be read\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "line one"}\n{broken\n{"body": "no text"}\n\n{"text": "line two"}\n')
    pq.write_table(pa.table({"text": ["row one", None, "row two"], "id": [1, 2, 3]}), tmp_path / "t.parquet")

    real_read = Path.read_bytes
    def read_bytes(self):  # root can read a chmod-000 file, so refuse it here
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)

    stats = SourceStats()
    sources = [tmp_path / "single.txt", folder, tmp_path / "rows.jsonl", tmp_path / "t.parquet"]
    docs = list(iter_documents(sources, glob="**/*.[tm][xd]*", stats=stats))
    assert docs == ["a single file\n", "top level text\n", "nested markdown\n", "line one", "line two",
                    "row one", "row two"]
    assert stats.documents == 7 and stats.files == 7  # skip.log and .git/ are not listed
    assert stats.skipped == {"not UTF-8": 1, "unreadable (PermissionError)": 1, "bad JSON line": 1,
                             "JSON line without a string 'text' (change --text-field)": 1}
    assert stats.examples["not UTF-8"].endswith("latin1.txt")


def test_parquet_without_the_column_is_skipped(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    stats = SourceStats()
    assert list(iter_documents([tmp_path / "t.parquet"], stats=stats)) == []
    assert stats.skipped == {"parquet without column 'text' (change --text-field)": 1}
    assert list(iter_documents([tmp_path / "t.parquet"], text_field="body")) == ["x"]


def test_builtin_corpus_is_the_stdlib_without_site_packages():
    files = builtin_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = {f.name for f in files}
    assert {"os.py", "argparse.py", "typing.py"} <= names
    assert files == sorted(files) and all(stdlib in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) > 5e6


# ---- prepare ---------------------------------------------------------------------------------------


def test_prepare_writes_shards_that_match_meta(corpus):
    _, data, meta = corpus
    assert meta == {**load_meta(data), "reused": False, "seconds": meta["seconds"]}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["documents"] == 40
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        sizes = [(data / s["file"]).stat().st_size // 2 for s in shards]
        assert sizes == [s["tokens"] for s in shards]
        assert sum(sizes) == meta["splits"][split]["tokens"] > 0
        assert all(n == 2000 for n in sizes[:-1])
    assert len(meta["splits"]["train"]["shards"]) > 2
    assert Tokenizer.load(data / "tokenizer").fingerprint() == meta["tokenizer_hash"]


def test_shards_decode_to_the_documents_split_by_document(corpus):
    docs, data, _ = corpus
    tok = Tokenizer.load(data / "tokenizer")
    val = decode_documents(split_tokens(data, "val"), tok)
    train = decode_documents(split_tokens(data, "train"), tok)
    assert val == docs[::10]
    assert train == [d for i, d in enumerate(docs) if i % 10]


def test_rerun_reuses_and_changed_input_retokenizes(tmp_path):
    src = write_corpus(tmp_path / "src", make_docs(12))
    kw = dict(vocab_size=VOCAB, val_fraction=0.25, shard_tokens=500, progress=False)
    first = prepare([src], tmp_path / "data", **kw)
    shards = sorted((tmp_path / "data").glob("*.bin"))
    mtimes = [f.stat().st_mtime_ns for f in shards]
    again = prepare([src], tmp_path / "data", **kw)
    assert again["reused"] and not first["reused"]
    assert [f.stat().st_mtime_ns for f in shards] == mtimes
    assert again["splits"] == first["splits"]

    with open(src / "doc_005.txt", "a") as f:
        f.write("more words the model reads\n")
    changed = prepare([src], tmp_path / "data", **kw)
    assert not changed["reused"]
    assert changed["splits"]["train"]["tokens"] > first["splits"]["train"]["tokens"]

    fewer = prepare([src], tmp_path / "data", **{**kw, "shard_tokens": 10**6})
    assert not fewer["reused"]
    assert sorted(f.name for f in (tmp_path / "data").glob("*.bin")) == ["train_000.bin", "val_000.bin"]


def test_prepare_with_a_given_tokenizer_and_max_mb(corpus, tmp_path):
    docs, data, _ = corpus
    src = write_corpus(tmp_path / "src", docs)
    meta = prepare([src], tmp_path / "out", tokenizer_dir=data / "tokenizer", val_fraction=0,
                   max_mb=len("".join(docs[:10])) / 1e6, progress=False)
    assert meta["tokenizer_hash"] == Tokenizer.load(data / "tokenizer").fingerprint()
    assert meta["splits"]["val"]["tokens"] == 0 and 1 <= meta["files"] <= 10


def test_parallel_tokenizing_keeps_corpus_order_and_seed_picks_val(corpus, tmp_path, monkeypatch):
    docs, data, _ = corpus
    monkeypatch.setattr("lmstack.data.shards.BATCH_CHARS", 700)  # many small batches in flight
    src = write_corpus(tmp_path / "src", docs)
    outs = {w: tmp_path / f"w{w}" for w in (1, 3)}
    for w, out in outs.items():
        prepare([src], out, tokenizer_dir=data / "tokenizer", val_fraction=0.1, num_workers=w, seed=3,
                progress=False)
    assert all((outs[1] / f).read_bytes() == (outs[3] / f).read_bytes() for f in ("train_000.bin", "val_000.bin"))
    tok = Tokenizer.load(data / "tokenizer")
    assert decode_documents(split_tokens(outs[3], "val"), tok) == docs[3::10]


def test_cli_prepare_prints_a_summary_and_reports_reuse(tmp_path, capsys):
    src = write_corpus(tmp_path / "src", make_docs(8))
    args = ["prepare", str(src), "--out", str(tmp_path / "data"), "--vocab-size", str(VOCAB),
            "--val-fraction", "0.2"]
    (src / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "documents: 8" in out and "1 not UTF-8" in out and "wrote new shards" in out
    assert cli(args) == 0
    assert "reused the existing shards" in capsys.readouterr().out


# ---- TokenStream -----------------------------------------------------------------------------------


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(tokens, length)


def test_random_batches_are_windows_shifted_by_one(corpus):
    _, data, _ = corpus
    stream = TokenStream(data, batch_size=4, seq_len=64, seed=3)
    tokens = split_tokens(data, "train")
    assert stream.num_tokens == len(tokens) and stream.vocab_size == VOCAB
    for _ in range(5):
        x, y = stream.next_batch()
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()  # (B, T+1)
        all_windows = windows(tokens, 65)
        assert all((all_windows == row).all(axis=1).any() for row in rows)


def test_sequential_batches_walk_the_split_and_wrap(corpus):
    _, data, _ = corpus
    stream = TokenStream(data, batch_size=3, seq_len=50, mode="sequential")
    tokens = split_tokens(data, "train")
    per_epoch = (len(tokens) - 1) // 50
    seen = []
    assert stream.epoch == 0
    for _ in range(per_epoch // 3 + 1):
        x, y = stream.next_batch()
        seen += [torch.cat([xi, yi[-1:]]).numpy() for xi, yi in zip(x, y, strict=True)]
    assert stream.epoch == 1
    for w, row in enumerate(seen[:per_epoch]):  # crosses the 2000-token shard boundaries
        assert (row == tokens[w * 50:w * 50 + 51]).all()
    assert (seen[per_epoch] == tokens[:51]).all()  # wrapped around


def test_seeded_streams_are_reproducible(corpus):
    _, data, _ = corpus
    a, b, c = (TokenStream(data, batch_size=2, seq_len=32, seed=s) for s in (1, 1, 2))
    batches_a = [a.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()[0]) for x in batches_a)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_continues_with_the_exact_next_batches(corpus, tmp_path, mode):
    _, data, _ = corpus
    kw = dict(batch_size=4, seq_len=48, seed=5, mode=mode)
    ref = TokenStream(data, **kw)
    for _ in range(7):
        ref.next_batch()
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    expected = [ref.next_batch() for _ in range(4)]
    resumed = TokenStream(data, **kw)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_split_one_global_batch(corpus, mode):
    _, data, _ = corpus
    ranks = [TokenStream(data, batch_size=2, seq_len=32, seed=9, rank=r, world_size=2, mode=mode)
             for r in range(2)]
    single = TokenStream(data, batch_size=4, seq_len=32, seed=9, mode=mode)
    for _ in range(3):
        (x0, _), (x1, _) = ranks[0].next_batch(), ranks[1].next_batch()
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), single.next_batch()[0])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resume_with_other_settings_is_refused(corpus):
    _, data, _ = corpus
    state = TokenStream(data, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(ValueError, match="seq_len: saved 32, now 16"):
        TokenStream(data, batch_size=4, seq_len=16).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        TokenStream(data, batch_size=2, seq_len=32).load_state_dict(state)


# ---- bad input -------------------------------------------------------------------------------------


def test_empty_corpus_names_what_was_skipped(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_text("  \n")
    (tmp_path / "src" / "binary.txt").write_bytes(b"\x80\x81\x82")
    with pytest.raises(ValueError, match=r"corpus is empty.*1 not UTF-8.*1 empty"):
        prepare([tmp_path / "src"], tmp_path / "out", vocab_size=VOCAB, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"no files matching --glob"):
        prepare([tmp_path / "nothing"], tmp_path / "out", vocab_size=VOCAB, progress=False)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        prepare([tmp_path / "no_such_dir"], tmp_path / "out", progress=False)
    with pytest.raises(SystemExit) as e:
        cli(["prepare", str(tmp_path / "no_such_dir"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2


def test_vocab_too_small_is_refused_and_leaves_earlier_shards_intact(tmp_path):
    src = write_corpus(tmp_path / "src", make_docs(4))
    good = prepare([src], tmp_path / "out", vocab_size=VOCAB, val_fraction=0.25, progress=False)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        prepare([src], tmp_path / "out", vocab_size=100, val_fraction=0.25, progress=False)
    assert load_meta(tmp_path / "out")["splits"] == good["splits"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "tokenizer", "train_000.bin", "val_000.bin"]


def test_too_few_documents_for_a_val_split(tmp_path):
    src = write_corpus(tmp_path / "src", make_docs(1))
    with pytest.raises(ValueError, match="train split got no text"):
        prepare([src], tmp_path / "out", vocab_size=VOCAB, progress=False)
    assert not list((tmp_path / "out").glob("*.bin*"))


@pytest.mark.parametrize("cut", [1, 2])
def test_truncated_shard_is_named_and_prepare_repairs_it(corpus, tmp_path, cut):
    docs, data, meta = corpus
    copy = shutil.copytree(data, tmp_path / "data")
    shard = copy / "train_001.bin"
    os.truncate(shard, shard.stat().st_size - cut)
    with pytest.raises(ValueError, match=r"train_001\.bin is corrupted.*re-run `lmstack prepare`"):
        load_meta(copy)
    with pytest.raises(ValueError, match="train_001.bin"):
        TokenStream(copy)
    src = write_corpus(tmp_path / "src", docs)
    again = prepare([src], copy, vocab_size=VOCAB, val_fraction=0.1, shard_tokens=2000, progress=False)
    assert not again["reused"] and again["splits"] == meta["splits"]


def test_missing_meta_and_seq_len_too_long(corpus, tmp_path):
    _, data, meta = corpus
    with pytest.raises(FileNotFoundError, match="run `lmstack prepare"):
        TokenStream(tmp_path)
    n = meta["splits"]["val"]["tokens"]
    TokenStream(data, split="val", seq_len=n - 1)
    with pytest.raises(ValueError, match=f"seq_len={n} needs {n + 1} tokens"):
        TokenStream(data, split="val", seq_len=n)
