"""`lmtune evaluate`: score a model on a task's data and print the metrics (a table, or one JSON object).

The model is a base model, a full fine-tune, or a LoRA adapter folder (its base comes along). The data
is read and checked before the model is loaded, so a wrong column or label fails in a second.
"""

from __future__ import annotations

import json
import sys
import time

from lmtune import tasks
from lmtune.config import EvaluateConfig


def evaluate(cfg: EvaluateConfig) -> dict:
    """Read the data, load the model with the task's head, predict, score, print; returns the metrics."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.probe and cfg.task != "classify":
        from lmtune.errors import LmtuneError

        raise LmtuneError(f"--probe {cfg.probe} works with --task classify; for a causal LM use lmtune probe --model M")
    if cfg.reference and cfg.task != "instruct":
        from lmtune.errors import LmtuneError

        raise LmtuneError(f"--reference compares greedy answers: it works with --task instruct, not --task {cfg.task}")
    from lmtune import device

    dev = device.settle(cfg)
    task = tasks.get(cfg.task)
    rows = task.read(cfg.data, cfg)
    t0 = time.perf_counter()
    model, tokenizer, meta = task.load(cfg.model, cfg)
    model = model.to(dev)
    task.check(rows, meta, cfg.data, cfg)
    answers: list[str] = []
    result = task.evaluate(model, tokenizer, rows, cfg, meta, answers) if cfg.reference else \
        task.evaluate(model, tokenizer, rows, cfg, meta)
    if cfg.reference:  # the same prompts answered by a second model (e.g. the base of a fine-tune)
        from lmtune.retention import agreement

        del model
        ref, ref_tokenizer, ref_meta = task.load(cfg.reference, cfg)
        ref_answers = [p["response"] for p in task.predict(ref, ref_tokenizer, rows, cfg, ref_meta)]
        result.update({"reference": cfg.reference, "agreement": agreement(answers, ref_answers)})
    summary = {"task": cfg.task, "model": cfg.model, "data": cfg.data, "rows": len(rows), **result,
               "seconds": round(time.perf_counter() - t0, 2)}
    if cfg.probe:  # the built-in counterfactual templates (lmtune probe takes a file of your own)
        from lmtune.probes import bias

        summary["bias"] = bias.probe_bias(model, tokenizer, bias.classifier_proba(meta), bias.BUILTIN,
                                          labels=meta["labels"])
    if cfg.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary) + ("\n\n" + bias.format_report(summary["bias"]) if cfg.probe else ""))
    sys.stdout.flush()
    return summary


def format_table(summary: dict) -> str:
    """Scalars as 'name  value' lines; per-class scores and the confusion matrix as small tables."""
    lines = []
    for k, v in summary.items():
        if isinstance(v, float):
            lines.append(f"{k:<16} {v:.4f}" if abs(v) < 1e6 else f"{k:<16} {v:.6g}")
        elif not isinstance(v, dict):
            lines.append(f"{k:<16} {v}")
    if "per_class" in summary:
        lines += ["", f"{'label':<16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for lab, c in summary["per_class"].items():
            lines.append(f"{lab:<16} {c['precision']:>9.2f} {c['recall']:>9.2f} {c['f1']:>9.2f} {c['support']:>8}")
    if "confusion_matrix" in summary:
        labels, matrix = summary["confusion_matrix"]["labels"], summary["confusion_matrix"]["matrix"]
        width = max(8, *(len(lab) + 1 for lab in labels))
        lines += ["", "confusion matrix (rows: true label, columns: predicted)",
                  " " * 16 + "".join(f"{lab:>{width}}" for lab in labels)]
        lines += [f"{lab:<16}" + "".join(f"{n:>{width}}" for n in row) for lab, row in zip(labels, matrix)]
    return "\n".join(lines)
