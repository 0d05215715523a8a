"""`lmtune predict`: run a model over a data file and write one JSONL row per input row.

Each output row holds the input's line (`row`) and the prediction: `label` and `probabilities`
(classify), `translation` (translate), `answer` (qa), `perplexity` (lm, per line). The file is written
to a temporary file next to --out and renamed at the end, so --out is either complete or untouched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from lmtune import files, tasks
from lmtune.config import PredictConfig
from lmtune.errors import LmtuneError


def predict(cfg: PredictConfig) -> Path:
    import torch

    out = Path(cfg.out)
    if out.is_dir():
        raise LmtuneError(f"--out {cfg.out} is a folder: give a file name such as predictions.jsonl")
    files.check_outputs([("--out", out)], files.local_inputs(data=cfg.data, model=cfg.model,
                                                             config=getattr(cfg, "_config_file", "")))
    files.check_replaceable(out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from lmtune import device

    dev = device.settle(cfg)
    task = tasks.get(cfg.task)
    rows = task.read(cfg.data, cfg, targets=False)
    model, tokenizer, meta = task.load(cfg.model, cfg)
    model = model.to(dev)
    preds = task.predict(model, tokenizer, rows, cfg, meta)
    tmp = None
    with files.writing(f"--out {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    with files.writing(f"--out {out}", tmp):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row, pred in zip(rows, preds):
                ids = {"row": row.get("_line"), **({"id": row["id"]} if "id" in row else {})}
                f.write(json.dumps({**ids, **pred}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    print(f"{len(preds)} predictions written to {out}", file=sys.stderr)
    return out
