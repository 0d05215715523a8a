"""Read data files into rows (dicts). Every problem names the file and, where there is one, the line.

Formats by extension: .json (a list of records, or {"data": [...]}), .jsonl, .csv, .tsv, .parquet,
and .txt / anything else as raw text for pretraining. Gzipped files (.gz) are read transparently.
A folder of such files, a `datasets.save_to_disk` folder or `hf:ORG/NAME` is read into rows as well;
`data.sources` streams the same places as text for pretraining and builds on the helpers here.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

from lmtune.errors import LmtuneError
from lmtune.files import not_utf8

RECORD_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv"}


def _check_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise LmtuneError(f"data file {path} not found: check the path")
    if p.is_dir():
        raise LmtuneError(f"data path {path} is a folder: give a file")
    if p.stat().st_size == 0:
        raise LmtuneError(f"data file {path} is empty")
    return p


def _open_text(p: Path):
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first field
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8-sig", newline="")
    return open(p, encoding="utf-8-sig", newline="")


def _suffix(p: Path) -> str:
    return Path(p.stem).suffix.lower() if p.suffix == ".gz" else p.suffix.lower()


def read_text(path: str) -> str:
    """The whole file as text (for pretraining and perplexity)."""
    p = _check_file(path)
    try:
        with _open_text(p) as f:
            text = f.read()
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (OSError, EOFError) as e:  # a damaged .gz
        raise LmtuneError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise LmtuneError(f"data file {path} holds only whitespace")
    return text


def read_records(path: str) -> list[dict]:
    """Rows of a JSON/JSONL/CSV/TSV/Parquet file, each a dict; `_line` holds its line (or index)."""
    if path.startswith("hf:") or Path(path).is_dir():  # a save_to_disk folder, a folder of files, a hub dataset
        return read_rows(path)
    p = _check_file(path)
    kind = _suffix(p)
    try:  # the decoding boundary of every text format
        if kind == ".jsonl":
            rows = _read_jsonl(p, path)
        elif kind == ".json":
            rows = _read_json(p, path)
        elif kind in (".csv", ".tsv"):
            rows = _read_delimited(p, path, "\t" if kind == ".tsv" else ",")
        elif kind == ".parquet":
            rows = _read_parquet(p, path)
        else:
            raise LmtuneError(f"{path}: unknown data format '{kind}': use .json, .jsonl, .csv, .tsv or .parquet")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (OSError, EOFError) as e:  # a damaged .gz
        raise LmtuneError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not rows:
        raise LmtuneError(f"data file {path} holds no records")
    return rows


def _read_jsonl(p: Path, path: str) -> list[dict]:
    rows = []
    with _open_text(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmtuneError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                                  "each line must be one JSON object") from None
            except RecursionError:
                raise LmtuneError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise LmtuneError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = n
            rows.append(row)
    return rows


def _read_json(p: Path, path: str) -> list[dict]:
    with _open_text(p) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise LmtuneError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise LmtuneError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise LmtuneError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise LmtuneError(f"{path}: record {i} is a {type(row).__name__}, expected an object")
        row["_line"] = i
    return data


def _read_delimited(p: Path, path: str, delimiter: str) -> list[dict]:
    with _open_text(p) as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise LmtuneError(f"{path}:{reader.line_num}: more fields than the header has "
                                      f"({len(reader.fieldnames)})")
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    raise LmtuneError(f"{path}:{reader.line_num}: fewer fields than the header has (no "
                                      f"{', '.join(repr(k) for k in missing[:3])})")
                row = dict(row)
                row["_line"] = reader.line_num
                rows.append(row)
        except csv.Error as e:  # a NUL byte, a field over the csv module's size limit, a stray quote
            raise LmtuneError(f"{path}:{reader.line_num}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} "
                              f"({e})") from None
    return rows


def _read_parquet(p: Path, path: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise LmtuneError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["_line"] = i
    return rows


def where(path: str, row: dict) -> str:
    """'file:line' for messages about one row."""
    return f"{path}:{row.get('_line', '?')}"


# --- rows of a folder or a Hugging Face dataset ---------------------------------------------------

def is_saved_dataset(p: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def hub_offline() -> bool:
    return any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_online(item: str) -> None:
    """One line before anything is read when a hub dataset is asked for offline."""
    if hub_offline():
        raise LmtuneError(f"--data {item}: a Hugging Face hub dataset needs the network and HF_HUB_OFFLINE "
                          "is set; while online, save it with datasets.load_dataset(...).save_to_disk(DIR) "
                          "and pass --data DIR")


def parse_hub(item: str) -> tuple[str, str | None, str]:
    """'hf:ORG/NAME[:CONFIG][@SPLIT]' -> (name, config, split)."""
    rest = item[3:]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or "train"


def load_saved(p: Path, split: str = "train"):
    """The Dataset of a save_to_disk folder (a DatasetDict's `split`), memory-mapped."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001  (datasets raises several types for a damaged folder)
        raise LmtuneError(f"{p}: not a readable datasets folder ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LmtuneError(f"{p}: a DatasetDict without a '{split}' split (has: {', '.join(ds)})")
        ds = ds[split]
    return ds


def read_rows(data: str) -> list[dict]:
    """Records of a save_to_disk folder, a folder of JSONL/JSON/CSV/TSV/Parquet files (in name order) or
    `hf:ORG/NAME[:CONFIG][@SPLIT]`; `_line` is the row's index, or 'FILE:LINE' inside a folder of files."""
    p = Path(data)
    if data.startswith("hf:") or is_saved_dataset(p):
        if data.startswith("hf:"):
            check_online(data)
            import datasets

            name, config, split = parse_hub(data)
            try:
                ds = datasets.load_dataset(name, config, split=split)
            except Exception as e:  # noqa: BLE001
                raise LmtuneError(f"--data {data}: cannot load it from the hub ({str(e).splitlines()[0]})") from None
        else:
            ds = load_saved(p)
        rows = ds.to_list()
        for i, r in enumerate(rows):
            r["_line"] = i
        if not rows:
            raise LmtuneError(f"{data} holds no records")
        return rows
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and _suffix(f) in RECORD_SUFFIXES)
    if not files:
        raise LmtuneError(f"data folder {data} holds no .jsonl, .json, .csv, .tsv or .parquet file (nor a "
                          "datasets.save_to_disk folder)")
    rows = []
    for f in files:
        for r in read_records(str(f)):
            r["_line"] = f"{f.relative_to(p)}:{r.get('_line', '?')}"
            rows.append(r)
    return rows
