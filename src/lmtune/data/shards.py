"""Prepared token shards: a corpus tokenized once into flat binary files that training memory-maps.

A prepared folder holds `train-NNNNN.bin` / `val-NNNNN.bin` (the token ids of one chunk of documents,
uint16 when the vocabulary fits, else uint32, flat as nanoGPT's prepare.py writes them; training reads a
block at a time with plain file reads),
`tokenizer/` and `manifest.json` (tokenizer hash, settings, per-shard documents, tokens and sha256).

Chunks are cut from the document stream at fixed text sizes, so chunk k is the same on every run: worker
processes tokenize chunks in parallel, each shard is written to a temporary name and renamed, and the
manifest (rewritten atomically after each shard) lists the shards done. A killed prepare, run again,
skips those and continues; `complete` is set only after the last one.

A document goes to validation by its index alone (`is_val`), so validation is held out by document, is
spread over the whole corpus, and never needs the text read twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmtune.errors import LmtuneError

MANIFEST = "manifest.json"
FORMAT = 1
GOLDEN = 0.6180339887498949


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's definition (its truncation/padding state, which encoding calls change, left out)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_val(doc_index: int, val_split: float) -> bool:
    """Document `doc_index` is held out for validation: the golden-ratio sequence puts a `val_split`
    share of any run of documents into validation, evenly spread."""
    return val_split > 0 and ((doc_index + 1) * GOLDEN) % 1.0 < val_split


def sample_text(docs: Iterable[tuple[str, bool]], val_split: float, megabytes: float) -> str:
    """The first `megabytes` of training documents (what a tokenizer is trained on)."""
    parts, size = [], 0
    for i, (text, _) in enumerate(docs):
        if is_val(i, val_split):
            continue
        parts.append(text)
        size += len(text)
        if size >= megabytes * 1e6:
            break
    return "".join(t if t.endswith("\n") else t + "\n" for t in parts)


def _chunks(docs: Iterable[tuple[str, bool]], val_split: float, chunk_chars: int) -> Iterator[tuple[int, list, list, int]]:
    """(index, train docs, val docs, characters) of consecutive chunks of about `chunk_chars` characters."""
    train, val, size, k = [], [], 0, 0
    for i, doc in enumerate(docs):
        (val if is_val(i, val_split) else train).append(doc)
        size += len(doc[0])
        if size >= chunk_chars:
            yield k, train, val, size
            train, val, size, k = [], [], 0, k + 1
    if train or val:
        yield k, train, val, size


# --- worker processes: they import only `tokenizers` and numpy -------------------------------------

_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _TOKENIZER
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _TOKENIZER.no_truncation()
    _TOKENIZER.no_padding()


def _encode(docs: list[tuple[str, bool]], eos_id: int | None, dtype: str) -> np.ndarray:
    """Token ids of `docs`, one after the other (a record's end-of-text token after it), encoded a
    megabyte at a time so that the tokenizer's per-token objects never hold a whole chunk."""
    parts, start, size = [], 0, 0
    for j, (text, _) in enumerate(docs):
        size += len(text)
        if size >= 1 << 20 or j == len(docs) - 1:
            for (_, eos), enc in zip(docs[start:j + 1], _TOKENIZER.encode_batch(
                    [t for t, _ in docs[start:j + 1]], add_special_tokens=False)):
                parts.append(np.asarray(enc.ids, dtype=dtype))
                if eos and eos_id is not None:
                    parts.append(np.asarray([eos_id], dtype=dtype))
            start, size = j + 1, 0
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _write(path: Path, ids: np.ndarray) -> str:
    """Write `ids` to `path` atomically (temporary name, fsync, rename); returns its sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(ids.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(ids.tobytes()).hexdigest()


def _encode_chunk(k: int, train: list, val: list, out: str, eos_id: int | None, dtype: str) -> dict:
    entry = {"index": k}
    for split, docs in (("train", train), ("val", val)):
        ids = _encode(docs, eos_id, dtype)
        name = f"{split}-{k:05d}.bin"
        sha = _write(Path(out) / name, ids) if len(ids) else ""
        entry[split] = {"file": name if len(ids) else "", "documents": len(docs), "tokens": int(len(ids)), "sha256": sha}
    return entry


# --- the main process ------------------------------------------------------------------------------

def _save_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmtuneError(f"{p}: unreadable manifest ({e}); prepare the data again into an empty folder") from None


def prepare(docs: Iterable[tuple[str, bool]], tokenizer, out: Path, settings: dict, *, workers: int = 2,
            shard_mb: float = 16.0, total_bytes: int = 0, command: str = "lmtune prepare") -> dict:
    """Tokenize `docs` into shards under `out` (resuming a prepare that stopped); returns the manifest.

    `settings` (inputs' fingerprint, val split, ...) must match those of an unfinished prepare found in
    `out` for it to be continued."""
    from tqdm import tqdm

    out = Path(out)
    tok_hash = tokenizer_hash(tokenizer)
    settings = {**settings, "format": FORMAT, "tokenizer_hash": tok_hash, "shard_mb": shard_mb}
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("settings") != settings:
        raise LmtuneError(f"{out} holds shards prepared from other data or another tokenizer: choose another "
                          "--out or delete the folder")
    if manifest is not None and manifest.get("complete"):
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").is_dir():
        tmp = out / ".tokenizer.tmp"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out / "tokenizer")
    dtype = token_dtype(len(tokenizer))
    if manifest is None:
        manifest = {"settings": settings, "dtype": dtype, "complete": False, "shards": []}
    done = {s["index"]: s for s in manifest["shards"]
            if all(not s[sp]["file"] or (out / s[sp]["file"]).is_file() for sp in ("train", "val"))}
    if done:
        print(f"prepare: resuming, {len(done)} shards already done in {out}", file=sys.stderr)
    manifest["shards"] = sorted(done.values(), key=lambda s: s["index"])
    _save_manifest(out, manifest)

    eos_id = tokenizer.eos_token_id
    bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10)
    t0, tokens = time.perf_counter(), 0

    def finished(entry: dict, chars: int) -> None:
        nonlocal tokens
        manifest["shards"].append(entry)
        manifest["shards"].sort(key=lambda s: s["index"])
        _save_manifest(out, manifest)
        tokens += entry["train"]["tokens"] + entry["val"]["tokens"]
        bar.update(chars)
        bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")

    chunks = _chunks(docs, settings.get("val_split", 0.0), int(shard_mb * 1e6))
    if workers <= 1:  # in this process (no start-up cost: small corpora, debugging)
        _init_worker(tokenizer.backend_tokenizer.to_str())
        for k, train, val, chars in chunks:
            if k in done:
                bar.update(chars)
                continue
            finished(_encode_chunk(k, train, val, str(out), eos_id, dtype), chars)
    else:
        import multiprocessing as mp

        # spawn, not fork: the parent may hold torch's threads; a worker needs only `tokenizers`
        with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer.backend_tokenizer.to_str(),)) as pool:
            pending: deque = deque()
            for k, train, val, chars in chunks:
                if k in done:
                    bar.update(chars)
                    continue
                pending.append((pool.apply_async(_encode_chunk, (k, train, val, str(out), eos_id, dtype)), chars))
                del train, val
                while len(pending) >= 2 * workers:  # at most two chunks a worker in flight: memory stays flat
                    result, c = pending.popleft()
                    finished(result.get(), c)
            while pending:
                result, c = pending.popleft()
                finished(result.get(), c)
    bar.close()
    for split in ("train", "val"):
        manifest[f"{split}_documents"] = sum(s[split]["documents"] for s in manifest["shards"])
        manifest[f"{split}_tokens"] = sum(s[split]["tokens"] for s in manifest["shards"])
    manifest["complete"] = True
    _save_manifest(out, manifest)
    return manifest


def load(folder: str | Path, tokenizer=None, verify: bool = True) -> dict:
    """The manifest of a complete prepared folder, every shard checked (size, and sha256 when `verify`);
    with `tokenizer`, also that it is the tokenizer the shards were made with."""
    folder = Path(folder)
    redo = f"prepare it again (lmtune prepare --data ... --out {folder}, after deleting the folder)"
    manifest = read_manifest(folder)
    if manifest is None:
        raise LmtuneError(f"{folder}: no {MANIFEST}: not a prepared token folder")
    if not manifest.get("complete"):
        raise LmtuneError(f"{folder}: the prepare did not finish ({len(manifest.get('shards', []))} shards done): "
                          "run the same lmtune prepare command again to complete it")
    if tokenizer is not None and tokenizer_hash(tokenizer) != manifest["settings"]["tokenizer_hash"]:
        raise LmtuneError(f"{folder}: the shards were made with another tokenizer (hash "
                          f"{manifest['settings']['tokenizer_hash']}, this one {tokenizer_hash(tokenizer)}): "
                          f"use --tokenizer {folder / 'tokenizer'} or {redo}")
    width = np.dtype(manifest["dtype"]).itemsize
    for s in manifest["shards"]:
        for split in ("train", "val"):
            e = s[split]
            if not e["file"]:
                continue
            p = folder / e["file"]
            try:
                size = p.stat().st_size
                ok = size == e["tokens"] * width and (not verify or _sha256(p) == e["sha256"])
            except OSError as err:
                raise LmtuneError(f"shard {p} cannot be read ({err.strerror}): {redo}") from None
            if not ok:
                raise LmtuneError(f"shard {p} does not match its checksum in {folder / MANIFEST}: {redo}")
    return manifest


def _sha256(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class TokenBlocks:
    """The blocks of one split as a read-only sequence: block i is tokens [i*L, i*L + L) of the split's
    shards taken as one stream (the last block may be shorter), read from the files on demand.
    Only the blocks a rank asks for are read; nothing grows with the corpus but the shard list.

    Blocks are read with plain reads at an offset (np.fromfile), not through np.memmap: a mapped page
    counts in the process's resident memory once touched, and the kernel maps a whole large folio of
    readahead per touch (about 1 MB on ext4 with 8 MB readahead), so random blocks from a memmap grew
    RSS with the corpus and the steps: 20 steps of 8 blocks held 4 MB of shard pages at 10 MB of text,
    37 MB at 100 MB, 180 MB at 1 GB. A read leaves the pages in the page cache, shared and reclaimable,
    and out of RSS; no file stays open between reads (a corpus of thousands of shards needs no fds)."""

    lengths = None  # equal blocks: nothing to group by length

    def __init__(self, folder: str | Path, manifest: dict, split: str, block: int, limit: int = 0):
        entries = [s[split] for s in manifest["shards"] if s[split]["tokens"]]
        self.paths = [Path(folder) / e["file"] for e in entries]
        self.dtype = np.dtype(manifest["dtype"])
        self.starts = np.cumsum([0] + [e["tokens"] for e in entries])
        self.total, self.block = int(self.starts[-1]), block
        self.n = -(-(self.total - 1) // block) if self.total > 1 else 0
        if self.n and self.total - (self.n - 1) * block < 2:
            self.n -= 1  # a last block of one token has no target
        self.index = np.linspace(0, self.n - 1, limit).astype(np.int64) if 0 < limit < self.n else None
        self.longest = min(block, self.total)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.n

    def _read(self, s: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of shard `s`."""
        p = self.paths[s]
        try:
            ids = np.fromfile(p, dtype=self.dtype, count=b - a, offset=a * self.dtype.itemsize)
        except OSError as err:
            raise LmtuneError(f"shard {p} cannot be read ({err.strerror or err}): prepare the data again") from None
        if len(ids) != b - a:
            raise LmtuneError(f"shard {p} is shorter than its manifest says (changed since it was checked): "
                              "prepare the data again")
        return ids

    def tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream, across shard boundaries."""
        parts, s = [], int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            base, end = int(self.starts[s]), int(self.starts[s + 1])
            take = min(b, end)
            parts.append(self._read(s, a - base, take - base).astype(np.int64))
            a, s = take, s + 1
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict:
        if i < 0 or i >= len(self):
            raise IndexError(i)
        i = int(self.index[i]) if self.index is not None else i
        ids = self.tokens(i * self.block, min((i + 1) * self.block, self.total)).tolist()
        return {"input_ids": ids, "labels": ids}
