"""Text sources for pretraining: plain files, folders, `.jsonl`, `.parquet`, and the built-in corpus.

A source path is a file or a folder (searched recursively by a glob). Each file yields documents:
a plain text file is one document, a `.jsonl` file one per line (its `text_field`), a `.parquet`
file one per row of that column. A file that cannot be read or is not UTF-8 is skipped and counted
in `SourceStats`: one bad file in a large folder should not stop a run. A missing path or a folder
with nothing to read is a user error and raises.

The built-in corpus is the running interpreter's own standard library (`*.py`, about 30 MB), so
the demo needs no download.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SourceStats:
    """What reading the sources found; filled in while documents are iterated."""

    files: int = 0
    documents: int = 0
    bytes: int = 0  # on-disk size of the files opened so far (drives the progress bar)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first path skipped for it

    def skip(self, reason: str, path: Path) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, str(path))

    def summary(self) -> str:
        """e.g. `3 not UTF-8 (first: a/b.txt), 1 empty (first: c.txt)`, or `none`."""
        parts = [f"{n} {reason} (first: {self.examples[reason]})" for reason, n in self.skipped.items()]
        return ", ".join(parts) or "none"


def builtin_corpus() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"this interpreter has no standard library folder ({root}); "
                                "give text sources to `lmstack prepare` instead")
    files = []
    for folder, subdirs, names in os.walk(root):
        # Pruned, not filtered: site-packages can be far bigger than the standard library.
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def list_files(paths: Sequence[str | Path], glob: str = "**/*") -> list[Path]:
    """Expand files and folders into a file list (folder contents sorted; hidden entries skipped)."""
    files: list[Path] = []
    for raw in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(raw)
        if path.is_dir():
            files += _folder_files(path, glob)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"source {str(raw)!r} does not exist; give existing files or "
                                    "folders (or no sources for the built-in corpus)")
    return list(dict.fromkeys(files))  # a file named twice is read once


def _folder_files(folder: Path, glob: str) -> list[Path]:
    # Hidden entries (.git, .venv, editor swap files) are never corpus text.
    found = sorted(p for p in folder.glob(glob)
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise ValueError(f"folder {str(folder)!r} has no files matching --glob {glob!r}; "
                         "check the folder or change the glob (e.g. '**/*.txt')")
    return found


def iter_documents(paths: Sequence[str | Path], glob: str = "**/*", text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Yield every document of the sources; skips and counts go into `stats` if one is given."""
    stats = SourceStats() if stats is None else stats
    yield from iter_file_documents(list_files(paths, glob), text_field, stats)


def iter_file_documents(files: Iterable[Path], text_field: str, stats: SourceStats) -> Iterator[str]:
    """Yield the non-empty documents of already listed files, counting into `stats`."""
    for path in files:
        stats.files += 1
        stats.bytes += _size(path)
        for doc in _read(path, text_field, stats):
            stats.documents += 1
            yield doc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field, stats)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, stats)
    return _read_text(path, stats)


def _read_text(path: Path, stats: SourceStats) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.skip("not UTF-8", path)
        return
    except OSError as e:
        stats.skip(f"unreadable ({type(e).__name__})", path)
        return
    if "\x00" in text:
        stats.skip("binary (NUL bytes)", path)
    elif not text.strip():
        stats.skip("empty", path)
    else:
        yield text


def _read_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield from _jsonl_text(line, path, text_field, stats)
    except UnicodeDecodeError:  # the lines before the bad bytes have been yielded
        stats.skip("not UTF-8", path)
    except OSError as e:
        stats.skip(f"unreadable ({type(e).__name__})", path)


def _jsonl_text(line: str, path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        stats.skip("bad JSON line", path)
        return
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        stats.skip(f"JSON line without a string {text_field!r} (change --text-field)", path)
    elif text.strip():
        yield text


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    try:
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            stats.skip(f"parquet without column {text_field!r} (change --text-field)", path)
            return
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
    except (OSError, pa.ArrowException) as e:
        stats.skip(f"unreadable parquet ({type(e).__name__})", path)
