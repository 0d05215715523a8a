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
