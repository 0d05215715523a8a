"""Fine-tuning examples as memory-mapped columns: the same rows, lengths and packed blocks as the lists."""

import random

from lmtune.config import FinetuneConfig
from lmtune.data import batching
from lmtune.data.columns import EncodedColumns, pack
from lmtune.train.loop import example_lengths


def _examples(n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        ids = [rng.randrange(50_000) for _ in range(k)]
        out.append({"input_ids": ids, "labels": [-100] * (k // 2) + ids[k // 2:]})
    return out


def test_columns_read_back_the_examples_and_their_lengths(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    examples = _examples()
    cols = EncodedColumns.encode(lambda chunk: chunk, examples)
    assert len(cols) == len(examples) and all(cols[i] == examples[i] for i in range(len(examples)))
    cfg = FinetuneConfig(data="", out="")
    assert example_lengths(cols, cfg) == example_lengths(examples, cfg) is not None
    assert cols.longest == max(len(e["input_ids"]) for e in examples)
    folder = cols.folder
    assert folder.is_dir() and folder.parent == tmp_path / "encoded"
    del cols
    assert not folder.exists()  # the files go with the columns


def test_packing_columns_gives_the_blocks_of_batching_pack(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    examples = _examples(seed=1)
    packed = pack(EncodedColumns.write(examples), 64)
    reference = batching.pack(examples, 64)
    assert len(packed) == len(reference) > 100
    assert all(packed[i] == reference[i] for i in range(len(reference)))
    assert example_lengths(packed, FinetuneConfig(data="", out="")) is None and packed.longest <= 64
