"""Text classification (sentiment, topic, ...) with a sequence-classification head.

Encoders (BERT family) classify from their [CLS] vector, decoders (SmolLM2, Llama) from their last
non-padding token; both through AutoModelForSequenceClassification. The label set is read from the
training data (sorted, numbers numerically) and saved with the model: config id2label and lmtune.json.
Metrics: accuracy, macro-F1, per-class precision/recall, confusion matrix.
"""

from __future__ import annotations

from lmtune import metrics
from lmtune.data.readers import read_records, where
from lmtune.errors import LmtuneError
from lmtune.tasks.common import collate_inputs, limit_rows, require_columns, text_field

HEAD = "seq_cls"
METRIC = "accuracy"
METRICS = ("accuracy", "macro_f1")


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    rows = limit_rows(read_records(path), getattr(cfg, "limit", 0))
    cols = {cfg.text_column: "--text-column"}
    if targets:
        cols[cfg.label_column] = "--label-column"
    require_columns(rows, path, cols)
    for r in rows:
        text_field(r, cfg.text_column, path)
        if targets:
            r[cfg.label_column] = text_field(r, cfg.label_column, path, label=True).strip()
    return rows


def label_set(rows: list[dict], column: str) -> list[str]:
    """Labels in a stable order: numbers by value (so '10' follows '9'), then the rest alphabetically."""
    values = {r[column] for r in rows}
    return sorted(values, key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def load(name: str, cfg, train_rows: list[dict] | None = None):
    """(model, tokenizer, meta). For training the labels come from the data; otherwise from the model."""
    from lmtune import models

    path = models.check_task_fit(name, "classify", HEAD)
    labels = label_set(train_rows, cfg.label_column) if train_rows else models.read_lmtune_file(path).get("labels")
    if not labels:
        raise LmtuneError(f"model {name} has no label set (lmtune.json 'labels'): fine-tune it first with "
                          "lmtune finetune --task classify")
    if train_rows and len(labels) < 2:
        raise LmtuneError(f"--data: column '{cfg.label_column}' has one label only ({labels[0]}); "
                          "classification needs at least two")
    model, tok, path = models.load_for_task(name, "classify", HEAD, labels=labels, **models.load_options(cfg))
    return model, tok, {"task": "classify", "head": HEAD, "kind": models.model_kind(path), "labels": labels}


def check(rows: list[dict], meta: dict, path: str, cfg) -> None:
    """Every label of evaluation data must be one the model was trained on."""
    known = set(meta["labels"])
    for r in rows:
        if r[cfg.label_column] not in known:
            raise LmtuneError(f"{where(path, r)}: label '{r[cfg.label_column]}' is not one the model was trained "
                              f"on ({', '.join(meta['labels'])})")


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    index = {lab: i for i, lab in enumerate(meta["labels"])}
    enc = tokenizer([str(r[cfg.text_column]) for r in rows], truncation=True, max_length=cfg.max_length)
    examples = []
    for i, r in enumerate(rows):
        ex = {"input_ids": enc["input_ids"][i]}
        if cfg.label_column in r:
            ex["labels"] = [-100, index[r[cfg.label_column]]]  # see collate_inputs: one target per row
        examples.append(ex)
    return examples


def collate(tokenizer, meta: dict):
    return lambda examples: collate_inputs(examples, tokenizer.pad_token_id)


def loss(model, batch: dict):
    """(sum of cross-entropy over the rows, number of rows)."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    targets = batch["labels"][:, 1]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def _log_probs(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list:
    """Log-probabilities over the label set, one row of floats per input row, in input order."""
    import torch

    from lmtune.device import of, to

    examples = encode([{cfg.text_column: r[cfg.text_column]} for r in rows], tokenizer, cfg, meta, "")
    # batches of rows of similar length (shortest first), so little is computed on padding; each row's
    # result does not depend on its batch-mates (padding is masked), and results go back in input order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    coll, out = collate(tokenizer, meta), [None] * len(examples)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logp = model(**to(coll([examples[j] for j in idx]), of(model))).logits.float().log_softmax(-1)
            for j, row in zip(idx, logp.tolist()):
                out[j] = row
    return out


def _label(meta: dict, logp: list) -> str:
    return meta["labels"][max(range(len(logp)), key=logp.__getitem__)]


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    """{label, probabilities} per row."""
    import math

    return [{"label": _label(meta, lp),
             "probabilities": {lab: round(math.exp(q), 6) for lab, q in zip(meta["labels"], lp)}}
            for lp in _log_probs(model, tokenizer, rows, cfg, meta)]


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    """The classification metrics and `loss` (cross-entropy per row), from one pass over `rows`."""
    logps, index = _log_probs(model, tokenizer, rows, cfg, meta), {lab: i for i, lab in enumerate(meta["labels"])}
    gold = [r[cfg.label_column] for r in rows]
    result = metrics.classification([_label(meta, lp) for lp in logps], gold, meta["labels"])
    result["loss"] = -sum(lp[index[g]] for lp, g in zip(logps, gold)) / max(len(rows), 1)
    return result
