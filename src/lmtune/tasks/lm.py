"""Plain language modelling on raw text (pretraining): the token stream cut into fixed-length blocks."""

from __future__ import annotations

from lmtune.train.loss import causal_lm_loss as loss  # noqa: F401  (the task's loss)


def encode_text(text: str, tokenizer, block: int) -> list[dict]:
    """Non-overlapping blocks of `block` tokens; every token after the first of a block is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - 1, block)]
    blocks = [b for b in blocks if len(b) > 1]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Train and validation text: the validation part is the end of the text, cut at a line break."""
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > len(text) // 2 else cut
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------------------------
# As a task of finetune/evaluate/predict: raw text in, perplexity out.

METRIC = "val_loss"
METRICS = ("perplexity",)


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    """The text's lines as rows (blank lines kept, so joining them gives the file back)."""
    from lmtune.data.readers import read_text

    lines = read_text(path).rstrip("\n").split("\n")
    rows = [{"text": line, "_line": i + 1} for i, line in enumerate(lines)]
    return rows[:cfg.limit] if getattr(cfg, "limit", 0) else rows


def load(name: str, cfg, train_rows: list[dict] | None = None):
    from lmtune import models
    from lmtune.errors import LmtuneError

    kind = models.model_kind(models.resolve(name))
    if kind != "decoder":
        raise LmtuneError(f"model {name} is an {kind} model: perplexity (--task lm) needs a causal LM")
    model, tok, _ = models.load_for_task(name, "lm", "causal", **models.load_options(cfg))
    return model, tok, {"task": "lm", "head": "causal", "kind": kind}


def check(rows, meta, path, cfg) -> None:
    pass


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    return encode_text("\n".join(r["text"] for r in rows), tokenizer, cfg.max_length)


def collate(tokenizer, meta: dict):
    from lmtune.data.batching import collate as causal_collate

    return lambda examples: causal_collate(examples, pad_id=tokenizer.pad_token_id)


def perplexity(model, tokenizer, text: str, max_length: int, stride: int) -> dict:
    """Perplexity with a sliding window, as in the Hugging Face perplexity guide: each window of
    `max_length` tokens moves by `stride`, and only the tokens not scored by the previous window are
    targets, each seeing up to max_length - stride tokens of context. Token 0 has no context: not scored."""
    import math

    import torch

    from lmtune.data.batching import IGNORE

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = min(stride or max(1, max_length // 2), max_length)
    nll, count, prev_end = 0.0, 0, 0
    model.eval()
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([ids[begin:end]], device=model.device)
        labels = window.clone()
        labels[:, :-(end - prev_end)] = IGNORE  # already scored by the previous window
        with torch.no_grad():
            s, n = loss(model, {"input_ids": window, "attention_mask": torch.ones_like(window), "labels": labels})
        nll, count, prev_end = nll + float(s), count + n, end
        if end == len(ids):
            break
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": count}


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    """{perplexity, tokens} of each line on its own (null for a line with fewer than two tokens)."""
    out = []
    for r in rows:
        if len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) < 2:
            out.append({"perplexity": None, "tokens": 0})
            continue
        p = perplexity(model, tokenizer, r["text"], cfg.max_length, cfg.stride)
        out.append({"perplexity": p["perplexity"], "tokens": p["tokens"]})
    return out


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    text = "\n".join(r["text"] for r in rows)
    return perplexity(model, tokenizer, text, cfg.max_length, cfg.stride)
