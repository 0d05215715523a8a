"""Turn encoded examples (lists of token ids and labels) into tensors: padded batches or packed blocks.

Padding is marked by position (attention_mask 0, label -100), never by token id: SmolLM2's pad token is
its end-of-turn token, and masking by id would hide every end of turn from the loss.

Packing puts several examples into one block of `max_length` tokens with position ids that restart at
each example. transformers reads the restarts as sequence boundaries (when no attention_mask is given
and the cache is off), so attention stays inside each example: a packed batch has the same per-token
loss as the padded one, without computing on padding.
"""

from __future__ import annotations

IGNORE = -100


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad `input_ids`/`labels` to the longest example; packed examples keep their position ids."""
    import torch

    if "position_ids" in examples[0]:
        return _collate_packed(examples, pad_id)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_tokens": int(mask.sum())}
    if "replay" in examples[0]:  # which rows replay the base model (retention's --replay-loss kl)
        batch["replay"] = torch.tensor([bool(e["replay"][0]) for e in examples])
    return batch


def _collate_packed(blocks: list[dict], pad_id: int) -> dict:
    """Packed blocks: the tail of a short block is one more 'sequence' of padding (its own position ids,
    no labels), so no attention mask is needed and no real token attends to it."""
    import torch

    width = max(len(b["input_ids"]) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(len(blocks), 1)
    for i, b in enumerate(blocks):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        pos[i, :n] = torch.tensor(b["position_ids"])
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "n_tokens": sum(len(b["input_ids"]) for b in blocks)}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples, in order, into blocks of at most `max_length` tokens. The first label of each
    example is dropped: it would be predicted from the previous example's last token."""
    blocks, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        n = len(e["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += e["input_ids"]
        cur["labels"] += [IGNORE] + e["labels"][1:]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def count_targets(batch: dict) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
