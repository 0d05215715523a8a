"""Where text for pretraining comes from, streamed one document at a time (never the whole corpus).

`--data` is one or more comma-separated items, each a text file (plain or .gz), a glob, a folder (of such
files, or one written by `datasets.save_to_disk`), a JSONL/JSON/CSV/TSV/Parquet file whose `--text-column`
holds the text, or `hf:ORG/NAME[:CONFIG][@SPLIT]` (a hub dataset, online only).

A record (a JSONL line, a Parquet row) is one document and ends with the end-of-text token. A text file is
cut into documents after its blank lines (and at a line end once a document passes MAX_DOC characters),
so a file split at blank lines reads as the same documents as the whole file.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

from lmtune.data.readers import (RECORD_SUFFIXES, check_online, is_saved_dataset, load_saved, parse_hub,
                                  read_records, where)
from lmtune.errors import LmtuneError

MAX_DOC = 1 << 20  # characters: a text without blank lines is still read a bounded piece at a time
TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ".tokens"}


def _suffix(p: Path) -> str:
    return Path(p.stem).suffix.lower() if p.suffix == ".gz" else p.suffix.lower()


def expand(data: str) -> list[str]:
    """The inputs of --data in reading order: files (folders and globs expanded, sorted), dataset folders,
    hub ids. Every missing path is an error here, before anything is read."""
    items = [s.strip() for s in data.split(",") if s.strip()]
    if not items:
        raise LmtuneError("--data is empty: give a text file, folder, glob or hf:ORG/NAME")
    out: list[str] = []
    for item in items:
        if item.startswith("hf:"):
            check_online(item)
            out.append(item)
            continue
        if any(c in item for c in "*?["):
            matches = sorted(m for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise LmtuneError(f"--data {item}: the pattern matches no file")
            out += matches
            continue
        p = Path(item)
        if not p.exists():
            raise LmtuneError(f"data file {item} not found: check the path")
        if is_saved_dataset(p) or p.is_file():
            out.append(str(p))
            continue
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and _suffix(f) in TEXT_SUFFIXES | RECORD_SUFFIXES)
        if not files:
            raise LmtuneError(f"--data {item}: the folder holds no .txt, .jsonl, .json, .parquet, .csv or .tsv file")
        out += files
    return out


def fingerprint(inputs: list[str], text_column: str) -> str:
    """What identifies the corpus for the prepare cache: each file's path, size and modification time."""
    h = hashlib.sha256(text_column.encode())
    for item in inputs:
        h.update(item.encode())
        p = Path(item)
        for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []):
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def total_bytes(inputs: list[str]) -> int:
    return sum(Path(i).stat().st_size for i in inputs if Path(i).is_file())


def documents(inputs: list[str], text_column: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, ends_with_eos) for every document of every input, in order."""
    for item in inputs:
        p = Path(item)
        if item.startswith("hf:"):
            yield from _hub_documents(item, text_column)
        elif is_saved_dataset(p):
            yield from _saved_documents(p, text_column)
        elif _suffix(p) in RECORD_SUFFIXES:
            yield from ((t, True) for t in _record_texts(p, text_column))
        else:
            yield from ((t, False) for t in _text_documents(p))


def _open(p: Path):
    return gzip.open(p, "rt", encoding="utf-8", newline="") if p.suffix == ".gz" else \
        open(p, encoding="utf-8", newline="")


def _text_documents(p: Path) -> Iterator[str]:
    buf: list[str] = []
    size, after_blank, n = 0, False, 0
    try:
        with _open(p) as f:
            for n, line in enumerate(f, 1):
                blank = not line.strip()
                if buf and ((after_blank and not blank) or size >= MAX_DOC):
                    yield "".join(buf)
                    buf, size = [], 0
                buf.append(line)
                size += len(line)
                after_blank = blank
    except UnicodeDecodeError:  # the one decoding boundary: the line and byte, found by streaming the file
        from lmtune.files import not_utf8

        raise not_utf8(p) from None
    except (OSError, EOFError) as e:
        raise LmtuneError(f"{p}: cannot be read ({e})") from None
    if buf:
        yield "".join(buf)


def _text_of(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise LmtuneError(f"{where}: --text-column '{column}' holds a {type(value).__name__}, expected text")
    return value


def _record_texts(p: Path, column: str) -> Iterator[str]:
    kind = _suffix(p)
    if kind == ".jsonl":
        with _open(p) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmtuneError(f"{p}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict) or column not in row:
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise LmtuneError(f"{p}:{n}: no field '{column}' (has: {keys}); set --text-column")
                yield _text_of(row[column], f"{p}:{n}", column)
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise LmtuneError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        if column not in f.schema_arrow.names:
            raise LmtuneError(f"{p}: no column '{column}' (has: {', '.join(f.schema_arrow.names)}); set --text-column")
        row = 0
        for batch in f.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield _text_of(value, f"{p}: row {row}", column)
                row += 1
    else:  # .json, .csv, .tsv: whole-file formats, read as records
        for r in read_records(str(p)):
            if column not in r:
                raise LmtuneError(f"{where(str(p), r)}: no field '{column}'; set --text-column")
            yield _text_of(r[column], where(str(p), r), column)


def _dataset_texts(ds, where: str, column: str) -> Iterator[tuple[str, bool]]:
    if column not in ds.column_names:
        raise LmtuneError(f"{where}: no column '{column}' (has: {', '.join(ds.column_names)}); set --text-column")
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=1024):
        for value in batch[column]:
            yield _text_of(value, f"{where}: row {row}", column), True
            row += 1


def _saved_documents(p: Path, column: str) -> Iterator[tuple[str, bool]]:
    yield from _dataset_texts(load_saved(p), str(p), column)


def _hub_documents(item: str, column: str) -> Iterator[tuple[str, bool]]:
    import datasets

    name, config, split = parse_hub(item)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise LmtuneError(f"--data {item}: cannot load it from the hub ({str(e).splitlines()[0]})") from None
    for row_n, row in enumerate(ds):
        if column not in row:
            raise LmtuneError(f"{item}: row {row_n}: no column '{column}' (has: {', '.join(row)}); set --text-column")
        yield _text_of(row[column], f"{item}: row {row_n}", column), True


