"""Small helpers the task modules share: column checks, padding of extra fields, generation by chat prompt."""

from __future__ import annotations

from lmtune.data.batching import IGNORE
from lmtune.data.readers import where
from lmtune.errors import LmtuneError


def require_columns(rows: list[dict], path: str, columns: dict[str, str]) -> None:
    """Every row has every column; `columns` maps a column name to the flag that sets it."""
    for row in rows:
        for col, flag in columns.items():
            if col not in row or row[col] is None:
                have = ", ".join(k for k in row if not k.startswith("_")) or "none"
                raise LmtuneError(f"{where(path, row)}: no column '{col}' (the data has: {have}); "
                                  f"name the right one with {flag}")


def text_field(row: dict, col: str, path: str, *, empty_ok: bool = False, label: bool = False) -> str:
    """Field `col` of a record as text: a string or a number (a label may also be true/false), never a
    list, a mapping or null, and not empty unless `empty_ok` (an empty label would be a class of its own)."""
    import math

    value = row.get(col)
    scalar = isinstance(value, (str, int, float)) and (label or not isinstance(value, bool))
    if not scalar or (isinstance(value, float) and not math.isfinite(value)):
        raise LmtuneError(f"{where(path, row)}: field '{col}' must be {'a label' if label else 'text'} (a string"
                          f"{' or number' if label else ''}), got {value!r:.60}")
    text = str(value)
    if not empty_ok and not text.strip():
        raise LmtuneError(f"{where(path, row)}: field '{col}' is empty: give every record "
                          f"{'a label' if label else 'some text'} (or remove the record)")
    return text


def limit_rows(rows: list[dict], limit: int) -> list[dict]:
    return rows[:limit] if limit else rows


def pad_field(examples: list[dict], key: str, value: int):
    """A right-padded LongTensor of field `key` of every example."""
    import torch

    rows = [e[key] for e in examples]
    width = max(len(r) for r in rows)
    # one tensor from padded lists: a single conversion instead of one small tensor and a copy per row
    return torch.tensor([[*r, *[value] * (width - len(r))] for r in rows], dtype=torch.long)


def collate_inputs(examples: list[dict], pad_id: int) -> dict:
    """input_ids (+ token_type_ids) and attention mask, right-padded; `labels` are stacked as they are.

    The loop counts a batch's targets as `labels[:, 1:] != -100` (a causal LM's shifted labels), so a task
    with per-row targets lays its labels out as [-100, target, ...]: column 0 is never a target."""
    import torch

    batch = {"input_ids": pad_field(examples, "input_ids", pad_id)}
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = pad_field(examples, "token_type_ids", 0)
    if "labels" in examples[0]:
        batch["labels"] = pad_field(examples, "labels", IGNORE) if len({len(e["labels"]) for e in examples}) > 1 \
            else torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return batch


def chat_examples(pairs: list[tuple[str, str]], tokenizer, max_length: int, path: str) -> list[dict]:
    """(prompt, answer) pairs as causal-LM examples, the loss on the answer only (as instruct does)."""
    from lmtune.tasks import instruct

    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}], "_line": i + 1}
            for i, (p, a) in enumerate(pairs)]
    return instruct.encode_all(rows, tokenizer, max_length, path)


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to chat prompts; only the first line is kept (a sentence, a short answer)."""
    from lmtune.tasks import instruct

    answers = instruct.respond(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [a.strip().split("\n")[0].strip() for a in answers]
