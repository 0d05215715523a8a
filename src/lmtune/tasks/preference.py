"""Preference pairs (prompt, chosen, rejected), shared by the preference tasks `dpo` and `orpo`.

Data is Hugging Face's preference format: `prompt` a string or a list of chat messages; `chosen` and
`rejected` a string (the assistant's reply) or a list of messages (the reply's turns); without `prompt`,
chosen and rejected are whole conversations and the prompt is the turns they share (TRL's "implicit
prompt"). A pair is rendered as instruct renders a chat: the prompt with the generation prompt, each
reply after it; labels only on the reply's tokens (its end of turn included).

A batch of B pairs is 2B rows, chosen 1..B then rejected 1..B, right-padded to the longest, so one
forward scores both sides; padding is masked by position (SmolLM2 pads with its end-of-turn token).
The loss of a step is normalised by its pairs (`n_items`); `target_tokens` still counts reply tokens.
"""

from __future__ import annotations

import sys
from functools import partial

from lmtune.data import batching
from lmtune.data.batching import IGNORE
from lmtune.data.readers import read_records, where
from lmtune.errors import LmtuneError
from lmtune.tasks import instruct

HEAD = "causal"
METRICS = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
FORMAT = "'prompt' (text or messages), 'chosen' and 'rejected' (text or messages)"


def _messages(value, row: dict, path: str, name: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise LmtuneError(f"{where(path, row)}: '{name}' must be text or a non-empty list of {{role, content}}")
    return [{"role": m["role"], "content": str(m["content"])} for m in value]


def to_pair(row: dict, path: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) as lists of chat messages; one-line errors for a broken record."""
    for side in ("chosen", "rejected"):
        if row.get(side) is None:
            have = ", ".join(k for k in row if not k.startswith("_")) or "none"
            raise LmtuneError(f"{where(path, row)}: no '{side}' (the record has: {have}); preference data needs "
                              f"{FORMAT}")
    chosen = _messages(row["chosen"], row, path, "chosen", "assistant")
    rejected = _messages(row["rejected"], row, path, "rejected", "assistant")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], row, path, "prompt", "user")
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        n = 0  # implicit prompt: the turns both conversations share
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        raise LmtuneError(f"{where(path, row)}: no 'prompt'; preference data needs {FORMAT}")
    if chosen == rejected:
        raise LmtuneError(f"{where(path, row)}: 'chosen' and 'rejected' are the same; a pair must differ to "
                          "teach a preference (drop or fix the record)")
    return prompt, chosen, rejected


def _encode_side(tokenizer, prompt: list[dict], reply: list[dict]) -> tuple[list[int], list[int], int]:
    """(ids, labels, prompt tokens): the labels are the tokens from where the rendered prompt ends."""
    head = instruct.render(tokenizer, prompt, add_generation_prompt=True) if prompt else ""
    text = instruct.render(tokenizer, prompt + reply)
    start = next((i for i, (a, b) in enumerate(zip(head, text)) if a != b), min(len(head), len(text)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if a >= start else IGNORE for tok, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels, sum(lab == IGNORE for lab in labels)


def encode_pair(row: dict, tokenizer, max_length: int, path: str = "") -> tuple[dict, bool]:
    """(example, was a reply cut at max_length). A prompt that leaves no room for a reply is an error."""
    prompt, chosen, rejected = to_pair(row, path)
    ex, truncated = {}, False
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        ids, labels, n_prompt = _encode_side(tokenizer, prompt, reply)
        if n_prompt >= max_length:
            raise LmtuneError(f"{where(path, row)}: the prompt is {n_prompt} tokens, which leaves no room for a "
                              f"reply within --max-length {max_length}: raise --max-length or shorten the prompt")
        truncated |= len(ids) > max_length
        ex[f"{side}_ids"], ex[f"{side}_labels"] = ids[:max_length], labels[:max_length]
    # the loop groups batches by len(input_ids) and blanks `labels` for a rank's empty share: the longer side
    side = "chosen" if len(ex["chosen_ids"]) >= len(ex["rejected_ids"]) else "rejected"
    ex["input_ids"], ex["labels"] = ex[f"{side}_ids"], ex[f"{side}_labels"]
    if "_ref" in row:  # the reference model's log-probs, computed once before a full fine-tune
        ex["ref"] = row["_ref"]
    return ex, truncated


def encode_all(rows: list[dict], tokenizer, max_length: int, path: str) -> list[dict]:
    examples, n_trunc = [], 0
    for row in rows:
        ex, truncated = encode_pair(row, tokenizer, max_length, path)
        examples.append(ex)
        n_trunc += truncated
    if n_trunc:
        print(f"warning: {n_trunc} of {len(rows)} pairs in {path} have a reply longer than max_length={max_length} "
              "tokens; the replies were cut at the end", file=sys.stderr)
    return examples


def collate_pairs(examples: list[dict], pad_id: int, settings: dict) -> dict:
    """2B right-padded rows, chosen then rejected; `n_items` the pairs with targets (the loss's unit)."""
    import torch

    rows = [{"input_ids": e[f"{s}_ids"], "labels": e[f"{s}_labels"]} for s in ("chosen", "rejected") for e in examples]
    batch = batching.collate(rows, pad_id)
    # a rank's empty share is one example with its (chosen) labels blanked by the loop: it weighs nothing
    real = [any(t != IGNORE for t in e["labels"]) for e in examples]
    batch["pair_weight"] = torch.tensor(real, dtype=torch.float32)
    batch["n_items"] = sum(real)
    batch["settings"] = settings
    if all("ref" in e for e in examples):
        batch["ref"] = torch.tensor([e["ref"] for e in examples], dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------------------------
# Scoring: sequence log-probs of both sides, the reference, the task's pair losses

def pair_log_probs(model, batch: dict):
    """(chosen log-probs, rejected log-probs, chosen tokens, rejected tokens), per pair, from one forward."""
    from lmtune.train.loss import sequence_log_probs

    logp, n = sequence_log_probs(model, batch)
    (c, r), (nc, nr) = logp.chunk(2), n.chunk(2)
    return c, r, nc, nr


def reference_log_probs(model, batch: dict):
    """(chosen, rejected) log-probs under the reference: stored with the data (a full fine-tune), else
    the base model with the LoRA adapter switched off (peft's disable_adapter: no second copy)."""
    import torch

    if "ref" in batch:
        return batch["ref"][:, 0], batch["ref"][:, 1]
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError("no reference log-probs in the batch and no adapter to disable")
    with torch.no_grad(), model.disable_adapter():
        c, r, _, _ = pair_log_probs(model, batch)
    return c, r


def add_reference(model, tokenizer, rows: list[dict], cfg, path: str) -> None:
    """row['_ref'] = [chosen, rejected] log-probs under `model` as it is now (the reference of a full
    fine-tune, computed once before training; the encoded examples carry them)."""
    import torch

    if not rows:
        return
    examples = encode_all(rows, tokenizer, cfg.max_length, path)
    from lmtune.train import distributed

    coll = partial(collate_pairs, pad_id=tokenizer.pad_token_id, settings={})
    device = next(distributed.place(model).parameters()).device  # where training will run (in place)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(getattr(cfg, "bf16", False)))
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast:
        for idx in _batches(examples, cfg.batch_size):
            b = _to(coll([examples[j] for j in idx]), device)
            c, r, _, _ = pair_log_probs(model, b)
            for j, cj, rj in zip(idx, c.tolist(), r.tolist()):
                rows[j]["_ref"] = [cj, rj]
    model.train(was_training)


def _batches(examples: list[dict], batch_size: int):
    """Indices of batches of examples of similar length, longest first (results go back by index)."""
    order = sorted(range(len(examples)), key=lambda j: -len(examples[j]["input_ids"]))
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _to(batch: dict, device) -> dict:
    import torch

    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_settings(cfg) -> None:
    if getattr(cfg, "pack", False):
        raise LmtuneError(f"--pack does not apply to --task {cfg.task}: a preference pair is scored as a whole "
                          "(rows of similar length are grouped instead)")


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    """The records, every one checked (fields, chosen != rejected) before a model is loaded; for
    predictions (`targets` False) only the prompt is needed."""
    check_settings(cfg)
    limit = getattr(cfg, "limit", 0)
    rows = read_records(path)
    rows = rows[:limit] if limit else rows
    for row in rows:
        _prompt(row, path) if not targets else to_pair(row, path)
    return rows


def _prompt(row: dict, path: str) -> list[dict]:
    if row.get("prompt") is None and not (row.get("chosen") and row.get("rejected")):
        raise LmtuneError(f"{where(path, row)}: no 'prompt' to answer; preference data needs {FORMAT}")
    return _messages(row["prompt"], row, path, "prompt", "user") if row.get("prompt") is not None \
        else to_pair(row, path)[0]


def load(task: str, name: str, extra: dict, evaluating: bool):
    """(model, tokenizer, meta); meta carries the loss settings (collate puts them into each batch).
    Evaluating a full fine-tune, meta['reference'] names its base model (the reference)."""
    from lmtune import models

    model, tokenizer, path = models.load_for_task(name, task, HEAD)
    meta = {"task": task, "head": HEAD, "kind": "decoder", **extra}
    saved = models.read_lmtune_file(path)
    if evaluating and saved.get("task") == task and not saved.get("lora") and saved.get("base_model"):
        meta["reference"] = saved["base_model"]
    return model, tokenizer, meta


def collate(tokenizer, meta: dict, keys: tuple):
    return partial(collate_pairs, pad_id=tokenizer.pad_token_id, settings={k: meta[k] for k in keys})


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict, pair_losses, needs_reference: bool) -> dict:
    """Mean pair loss, reward accuracy (% of pairs whose chosen reward beats the rejected one), mean reward
    margin, mean chosen/rejected sequence log-probs. `pair_losses(batch, c, r, nc, nr, ref) -> (losses,
    chosen rewards, rejected rewards)` is the task's."""
    import torch

    if needs_reference and rows and "_ref" not in rows[0] and not hasattr(model, "disable_adapter"):
        _reference_for_evaluation(model, tokenizer, rows, cfg, meta)
    examples = encode_all(rows, tokenizer, cfg.max_length, cfg.data)
    coll, device = collate(tokenizer, meta, tuple(k for k in meta if k in SETTINGS)), next(model.parameters()).device
    totals = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "chosen_logp": 0.0, "rejected_logp": 0.0}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in _batches(examples, cfg.batch_size):
            b = _to(coll([examples[j] for j in idx]), device)
            c, r, nc, nr = pair_log_probs(model, b)
            ref = reference_log_probs(model, b) if needs_reference else None
            losses, rc, rr = pair_losses(b, c, r, nc, nr, ref)
            totals["loss"] += float(losses.sum())
            totals["reward_accuracy"] += 100.0 * float((rc > rr).float().sum())
            totals["reward_margin"] += float((rc - rr).sum())
            totals["chosen_logp"] += float(c.sum())
            totals["rejected_logp"] += float(r.sum())
    model.train(was_training)
    return {k: v / max(len(examples), 1) for k, v in totals.items()}


SETTINGS = ("beta", "dpo_loss", "label_smoothing", "orpo_lambda")


def _reference_for_evaluation(model, tokenizer, rows: list[dict], cfg, meta: dict) -> None:
    """The reference of a fully fine-tuned model is its base (loaded for the evaluation only); a model with
    no record of a base is its own reference (rewards 0: the starting point of preference tuning)."""
    if not meta.get("reference"):
        add_reference(model, tokenizer, rows, cfg, cfg.data)
        return
    from lmtune import models

    base, _, _ = models.load_for_task(meta["reference"], "", HEAD)
    base.to(next(model.parameters()).device)
    add_reference(base, tokenizer, rows, cfg, cfg.data)
    del base


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    """Greedy replies to each record's prompt (its last user turn), as instruct answers."""
    prompts = []
    for r in rows:
        prompt = _prompt(r, getattr(cfg, "data", ""))
        user = [m["content"] for m in prompt if m["role"] == "user"]
        prompts.append(user[-1] if user else "")
    answers = instruct.respond(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    return [{"response": a} for a in answers]
