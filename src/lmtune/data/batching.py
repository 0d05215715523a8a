"""Turn encoded examples (lists of token ids and labels) into padded tensors.

Padding is marked by position (attention_mask 0, label -100), never by token id: SmolLM2's pad token is
its end-of-turn token, and masking by id would hide every end of turn from the loss.
"""

from __future__ import annotations

IGNORE = -100


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad `input_ids`/`labels` to the longest example of the batch."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_targets(batch: dict) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
