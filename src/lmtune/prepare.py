"""`lmtune prepare`: tokenize a corpus once into token shards (see data/shards.py) that pretrain memory-maps.

`pretrain --data TEXT` calls `prepare_corpus` itself into the lmtune cache, keyed by the corpus and the
tokenizer, so that a second run (or a resumed one) on the same text tokenizes nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from lmtune.config import PrepareConfig
from lmtune.errors import LmtuneError


def make_tokenizer(spec: str, inputs: list[str], text_column: str, val_split: float, vocab_size: int,
                   sample_mb: float):
    """'bpe'/'char': trained on the first `sample_mb` MB of training documents; else a folder or model alias."""
    from lmtune.data import shards, sources
    from lmtune.data.tokenizer import check_encodes, load_tokenizer_path, train_tokenizer

    sample = shards.sample_text(sources.documents(inputs, text_column), val_split, sample_mb) \
        if spec in ("bpe", "char") else None
    if sample is not None and not sample.strip():
        raise LmtuneError(f"--data {','.join(inputs)[:200]}: no text to train a tokenizer on")
    if spec in ("bpe", "char") or Path(spec).exists():
        tok = train_tokenizer(sample or "", spec, vocab_size)
    else:  # a model alias or hub id: its tokenizer
        from lmtune import models

        tok = load_tokenizer_path(models.resolve(spec))
    if sample is not None:
        check_encodes(tok, sample, f"--tokenizer {spec}")
    return tok


def prepare_corpus(inputs: list[str], tokenizer, out: Path, *, text_column: str, val_split: float,
                   workers: int, shard_mb: float = 16.0) -> dict:
    """Shards of `inputs` under `out` (continued if a prepare stopped there); returns the manifest."""
    from lmtune.data import shards, sources

    settings = {"inputs": inputs, "fingerprint": sources.fingerprint(inputs, text_column),
                "text_column": text_column, "val_split": val_split}
    manifest = shards.prepare(sources.documents(inputs, text_column), tokenizer, out, settings, workers=workers,
                              shard_mb=shard_mb, total_bytes=sources.total_bytes(inputs))
    if not manifest["train_tokens"]:
        raise LmtuneError(f"--data {','.join(inputs)[:200]}: no training tokens (every document is empty or "
                          "held out for validation)")
    return manifest


def cache_folder(inputs: list[str], tokenizer, text_column: str, val_split: float, shard_mb: float) -> Path:
    """Where pretrain keeps the shards of raw text: one folder per (corpus, tokenizer, split)."""
    from lmtune import models
    from lmtune.data import shards, sources

    key = json.dumps([sources.fingerprint(inputs, text_column), shards.tokenizer_hash(tokenizer), val_split,
                      shard_mb])
    return models.cache_dir() / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:20]


def prepare(cfg: PrepareConfig) -> Path:
    from lmtune.data import shards, sources

    from lmtune import files

    inputs = sources.expand(cfg.data)
    out = Path(cfg.out)
    # the shards go next to the corpus, never into it (a folder of text, a data set folder, a tokenizer)
    files.check_outputs([("--out", out)], files.local_inputs(data=cfg.data, tokenizer=cfg.tokenizer,
                                                             config=getattr(cfg, "_config_file", ""))
                        + [x for i in inputs for x in files.local_inputs(data=Path(i))])
    if out.exists() and not out.is_dir():
        raise LmtuneError(f"--out {cfg.out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and shards.read_manifest(out) is None:
        raise LmtuneError(f"--out {cfg.out} holds other files: choose an empty or new folder")
    tok = make_tokenizer(cfg.tokenizer, inputs, cfg.text_column, cfg.val_split, cfg.vocab_size,
                         cfg.tokenizer_sample_mb) if not (out / "tokenizer").is_dir() else None
    if tok is None:  # an unfinished prepare: continue with the tokenizer it started with
        from lmtune.data.tokenizer import load_tokenizer_path

        tok = load_tokenizer_path(str(out / "tokenizer"))
    m = prepare_corpus(inputs, tok, out, text_column=cfg.text_column, val_split=cfg.val_split,
                       workers=cfg.workers, shard_mb=cfg.shard_mb)
    print(f"prepared {m['train_documents']} + {m['val_documents']} documents: {m['train_tokens']} training and "
          f"{m['val_tokens']} validation tokens ({m['dtype']}) in {len(m['shards'])} shards; "
          f"pretrain with --data {out}", file=sys.stderr)
    return out
