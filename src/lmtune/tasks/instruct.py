"""Instruction tuning of causal LMs: Alpaca records, prompt/completion pairs, chat `messages`.

encode: a row becomes token ids with labels only on the response (every assistant turn), found by
character position in the rendered text, so special tokens inside the response (the end of turn)
are learned too. predict: greedy generation of the response. score: exact match.
The task interface every module in lmtune.tasks has (read, load, check, encode, collate, loss,
predict, evaluate) is at the end.
"""

from __future__ import annotations

import sys
from functools import partial

from lmtune.data import batching
from lmtune.data.batching import IGNORE
from lmtune.data.readers import read_records, where
from lmtune.errors import LmtuneError
from lmtune.train.loss import causal_lm_loss as loss  # noqa: F401  (the task's loss)

HEAD = "causal"
METRIC = "val_loss"
METRICS = ()  # validation during training: the loss only (generating every response would dominate)

FORMATS = "'instruction'+'output' (Alpaca), 'prompt'+'completion', or 'messages'"


def to_messages(row: dict, path: str) -> list[dict]:
    """The row as a chat: a list of {role, content}, ending with the assistant's answer."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise LmtuneError(f"{where(path, row)}: 'messages' must be a non-empty list of {{role, content}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise LmtuneError(f"{where(path, row)}: 'messages' has no assistant turn to learn from")
        return [{"role": m["role"], "content": str(m["content"])} for m in msgs]
    if "instruction" in row and "output" in row:
        user = str(row["instruction"])
        if row.get("input"):
            user = f"{user}\n\n{row['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["completion"])}]
    fields = ", ".join(k for k in row if k != "_line") or "none"
    raise LmtuneError(f"{where(path, row)}: record has fields [{fields}]; instruct data needs {FORMATS}")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages as text: the tokenizer's chat template, or a plain Alpaca-style layout without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}{tokenizer.eos_token or ''}\n\n")
        else:
            parts.append(f"### {m['role'].capitalize()}:\n{m['content']}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


def prompt_text(tokenizer, user_text: str) -> str:
    """The text the model continues when asked `user_text` (as in training)."""
    return render(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)


def encode_row(row: dict, tokenizer, max_length: int, path: str = "") -> tuple[dict | None, bool]:
    """(example with input_ids/labels, was it truncated); the example is None if no target is left."""
    msgs = to_messages(row, path)
    text = render(tokenizer, msgs)
    spans = []  # character spans of the assistant turns
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, msgs[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, msgs[:i + 1]))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):
        return None, truncated
    return {"input_ids": ids, "labels": labels}, truncated


def encode_all(rows: list[dict], tokenizer, max_length: int, path: str) -> list[dict]:
    """Encode every row; truncation is warned about once, with counts (records are kept, cut at the end)."""
    examples, n_trunc, n_dropped = [], 0, 0
    for row in rows:
        ex, truncated = encode_row(row, tokenizer, max_length, path)
        n_trunc += truncated
        if ex is None:
            n_dropped += 1
        else:
            examples.append(ex)
    if n_trunc:
        print(f"warning: {n_trunc} of {len(rows)} records in {path} are longer than max_length={max_length} "
              f"tokens and were truncated; {n_dropped} had no response left and were skipped", file=sys.stderr)
    if not examples:
        raise LmtuneError(f"{path}: no record has a response within max_length={max_length}: raise --max-length")
    return examples


def respond(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers to user prompts, batched with left padding: through `lmtune.decode` when it can run
    the model as it is (fp32 or one dtype throughout, no autocast, no adapter it would have to merge),
    else through HF's generate. Both give the same greedy tokens in fp32."""
    import torch

    from lmtune.decode import Decoder
    from lmtune.generate import stop_ids

    model.eval()
    out = []
    if Decoder.runs_unchanged(model):
        decoder, eos = Decoder(model), stop_ids(model, tokenizer)
        for i in range(0, len(prompts), batch_size):
            ids = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                   for p in prompts[i:i + batch_size]]
            gen = decoder.generate(ids, max_new_tokens, eos_ids=eos, pad_id=tokenizer.pad_token_id)
            out += [s.strip() for s in tokenizer.batch_decode(gen, skip_special_tokens=True)]
        return out
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out += [s.strip() for s in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact match (after stripping surrounding whitespace), in percent."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": 100.0 * hits / max(len(references), 1)}


# ----------------------------------------------------------------------------------------------
# The task interface (as in classify, translate, qa, lm).

def read(path: str, cfg, targets: bool = True) -> list[dict]:
    limit = getattr(cfg, "limit", 0)
    rows = read_records(path)
    return rows[:limit] if limit else rows


def load(name: str, cfg, train_rows: list[dict] | None = None):
    from lmtune import models

    model, tokenizer, _ = models.load_for_task(name, "instruct", HEAD, **models.load_options(cfg))
    return model, tokenizer, {"task": "instruct", "head": HEAD, "kind": "decoder"}


def check(rows: list[dict], meta: dict, path: str, cfg) -> None:
    for row in rows:
        to_messages(row, path)


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    return encode_all(rows, tokenizer, cfg.max_length, path)


def collate(tokenizer, meta: dict):
    return partial(batching.collate, pad_id=tokenizer.pad_token_id)


def _ask_and_expect(row: dict, path: str) -> tuple[str, str]:
    """The last user turn and the answer expected after it (for scoring)."""
    msgs = to_messages(row, path)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    user = [m["content"] for m in msgs[:last] if m["role"] == "user"]
    return (user[-1] if user else ""), msgs[last]["content"]


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    prompts = [_ask_and_expect(r, getattr(cfg, "data", ""))[0] for r in rows]
    answers = respond(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    return [{"response": a} for a in answers]


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    """Exact match of greedy responses, and the loss per response token."""
    from lmtune.train.loop import mean_loss

    expected = [_ask_and_expect(r, cfg.data)[1] for r in rows]
    answers = [p["response"] for p in predict(model, tokenizer, rows, cfg, meta)]
    examples = encode_all(rows, tokenizer, cfg.max_length, cfg.data)
    result = score(answers, expected)
    result["loss"] = mean_loss(model, examples, collate(tokenizer, meta), loss, cfg.batch_size)
    return result
