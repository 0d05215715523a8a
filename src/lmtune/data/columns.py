"""Encoded fine-tuning examples as flat NumPy columns in memory-mapped files, not lists of Python dicts.

A list of encoded dicts costs about 36 bytes a token (a pointer and an int object); a column costs 4, in a
file the page cache holds rather than the heap: a million-row instruction set fits. Each field of the
examples (input_ids, labels, ...) is one int32 file of all rows' values, one after the other, with an
offsets array saying where each row starts. `pack` works on the columns: packed blocks are ranges of
whole rows of the same files, so packing copies nothing but the labels (each row's first label masked).

The training loop sees a sequence: `len`, `[i]` (a dict of lists, as the tasks' collate functions take),
`lengths` (token counts to group batches by, None when packed) and `longest`.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lmtune.data.batching import IGNORE

CHUNK = 8192  # rows encoded at a time: their Python lists are freed before the next chunk is encoded


class EncodedColumns:
    def __init__(self, folder: Path, values: dict[str, np.ndarray], offsets: dict[str, np.ndarray],
                 rows: np.ndarray | None = None):
        self.folder, self.values, self.offsets = folder, values, offsets
        # rows: for packed blocks, the first and last+1 example of each block (else None: one row each)
        self.rows = rows
        n = np.diff(offsets["input_ids"])
        if rows is None:
            self.lengths = tuple(int(x) for x in n) if len(n) and n.min() != n.max() else None
            self.longest = int(n.max()) if len(n) else 0
        else:
            sizes = offsets["input_ids"][rows[1:]] - offsets["input_ids"][rows[:-1]]
            self.lengths, self.longest = None, int(sizes.max()) if len(sizes) else 0

    @classmethod
    def encode(cls, encode: Callable[[list[dict]], list[dict]], rows: list[dict], folder: Path | None = None):
        """Columns of `encode(chunk)` over `rows`, CHUNK rows at a time."""
        return cls.write((ex for i in range(0, len(rows), CHUNK) for ex in encode(rows[i:i + CHUNK])), folder)

    @classmethod
    def write(cls, examples: Iterable[dict], folder: Path | None = None) -> "EncodedColumns":
        from lmtune import models

        if folder is None:
            base = models.cache_dir() / "encoded"
            base.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=base))
        files, offsets, kinds = {}, {}, {}
        try:
            for ex in examples:
                if not files:  # token columns are int32; a float column (dpo's reference log-probs) float32
                    kinds = {k: np.float32 if np.asarray(ex[k]).dtype.kind == "f" else np.int32 for k in ex}
                    files = {k: open(folder / f"{k}.{np.dtype(kinds[k]).str[1:]}", "wb") for k in ex}
                    offsets = {k: [0] for k in ex}
                for k, f in files.items():
                    v = np.asarray(ex[k], dtype=kinds[k])
                    f.write(v.tobytes())
                    offsets[k].append(offsets[k][-1] + len(v))
        finally:
            for f in files.values():
                f.close()
        if not files:
            from lmtune.errors import LmtuneError

            raise LmtuneError("no examples to train on after encoding the data")
        values = {k: (np.memmap(folder / f"{k}.{np.dtype(kinds[k]).str[1:]}", dtype=kinds[k], mode="r")
                      if offsets[k][-1] else np.zeros(0, kinds[k])) for k in files}
        out = cls(folder, values, {k: np.asarray(o, dtype=np.int64) for k, o in offsets.items()})
        weakref.finalize(out, shutil.rmtree, folder, True)  # the files go when the columns do
        return out

    def __len__(self) -> int:
        return len(self.offsets["input_ids"]) - 1 if self.rows is None else len(self.rows) - 1

    def _row(self, k: str, i: int) -> list[int]:
        o = self.offsets[k]
        return self.values[k][o[i]:o[i + 1]].tolist()

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.rows is None:
            return {k: self._row(k, i) for k in self.values}
        a, b = int(self.rows[i]), int(self.rows[i + 1])
        o = self.offsets["input_ids"]
        ids = self.values["input_ids"][o[a]:o[b]].tolist()
        labels = self.values["packed_labels"][o[a]:o[b]].tolist()
        positions = [p for j in range(a, b) for p in range(int(o[j + 1] - o[j]))]
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def __getstate__(self):
        raise TypeError("EncodedColumns is not picklable (it holds memory maps)")


def pack(cols: EncodedColumns, max_length: int) -> EncodedColumns:
    """batching.pack on columns: rows, in order, into blocks of at most `max_length` tokens; a block is a
    range of whole rows, and the first label of each row is masked (it would be predicted from the
    previous row's last token)."""
    o = cols.offsets["input_ids"]
    n = np.diff(o)
    starts, size = [0], 0
    for j, length in enumerate(n.tolist()):
        if size and size + length > max_length:
            starts.append(j)
            size = 0
        size += length
    starts.append(len(n))
    labels = np.array(cols.values["labels"], dtype=np.int32)
    labels[o[:-1][n > 0]] = IGNORE
    path = cols.folder / "packed_labels.i32"
    labels.tofile(path)
    values = {**cols.values, "packed_labels": np.memmap(path, dtype=np.int32, mode="r") if len(labels) else labels}
    packed = EncodedColumns(cols.folder, values, cols.offsets, np.asarray(starts, dtype=np.int64))
    packed._source = cols  # keeps the files (removed with the unpacked columns) alive
    return packed
