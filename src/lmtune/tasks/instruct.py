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


ROLES = ("system", "user", "assistant")


def _content(value, where_: str, i: int) -> str:
    """A message's content: a string, or a list of {type: text, text} parts (as the chat API sends)."""
    if isinstance(value, str):
        return value
    parts_ok = all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in value) if isinstance(value, list) else False
    if parts_ok:
        return "".join(p["text"] for p in value)
    raise LmtuneError(f"{where_}: message {i + 1}: 'content' must be a string or a list of "
                      f"{{type: text, text}} parts, got {value!r:.60}")


class EmptyAnswer(LmtuneError):
    """A record whose answer is empty: skipped by `read` when other records have one (Alpaca itself holds a
    few), refused when none does. `at` is where the record is (path:line), for `read`'s note."""

    def __init__(self, at: str, why: str):
        super().__init__(f"{at}: {why}")
        self.at = at


def _text(row: dict, key: str, where_: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LmtuneError(f"{where_}: field '{key}' must be text, got {value!r:.60}")
    return str(value)


def to_messages(row: dict, path: str, targets: bool = True) -> list[dict]:
    """The row as a chat: a list of {role, content}, ending with the assistant's answer (with `targets`
    False, for prediction, the answer may be missing: the chat then ends with the user's turn)."""
    at = where(path, row)
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise LmtuneError(f"{at}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            if m.get("role") not in ROLES or "content" not in m:
                raise LmtuneError(f"{at}: message {i + 1} must have a role ({', '.join(ROLES)}) and a content; "
                                  f"got role {m.get('role')!r}")
            out.append({"role": m["role"], "content": _content(m["content"], at, i)})
        if targets and not any(m["role"] == "assistant" for m in out):
            raise LmtuneError(f"{at}: 'messages' has no assistant turn to learn from")
        if targets and any(m["role"] == "assistant" and not m["content"].strip() for m in out):
            raise EmptyAnswer(at, "'messages' has an empty assistant turn: nothing to learn from it")
        return out
    pairs = (("instruction", "output"), ("prompt", "completion"))
    for ask, answer in pairs:
        if ask in row and (answer in row or not targets):
            user = _text(row, ask, at)
            if ask == "instruction" and row.get("input") not in (None, ""):
                user = f"{user}\n\n{_text(row, 'input', at)}"
            if not user.strip():
                raise LmtuneError(f"{at}: field '{ask}' is empty")
            msgs = [{"role": "user", "content": user}]
            if answer in row:
                reply = _text(row, answer, at)
                if targets and not reply.strip():
                    raise EmptyAnswer(at, f"field '{answer}' is empty: nothing to learn from this record")
                msgs.append({"role": "assistant", "content": reply})
            return msgs
    fields = ", ".join(k for k in row if k != "_line") or "none"
    raise LmtuneError(f"{at}: record has fields [{fields}]; instruct data needs {FORMATS}")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages as text: the tokenizer's chat template, or a plain Alpaca-style layout without one."""
    if tokenizer.chat_template:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, or the template's own raise_exception
            roles = ", ".join(m["role"] for m in messages)
            raise LmtuneError(f"the model's chat template refuses this conversation (roles {roles}): "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
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
    """Greedy answers to user prompts, as text (see `respond_ids`)."""
    return [s.strip() for s in tokenizer.batch_decode(
        respond_ids(model, tokenizer, prompts, max_new_tokens, batch_size), skip_special_tokens=True)]


def respond_ids(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                batch_size: int = 16) -> list[list[int]]:
    """Greedy answers to user prompts as token ids, each up to and including its first stop token (an answer
    cut at `max_new_tokens` has none). Batched with left padding: through `lmtune.generation.decoder` when it
    can run the model as it is (fp32 or one dtype throughout, no autocast, no adapter it would have to merge),
    else through HF's generate. Both give the same greedy tokens in fp32."""
    import torch

    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import stop_ids

    model.eval()
    eos, rows = set(stop_ids(model, tokenizer)), []
    if Decoder.runs_unchanged(model):
        decoder = Decoder(model)
        for i in range(0, len(prompts), batch_size):
            ids = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                   for p in prompts[i:i + batch_size]]
            rows += decoder.generate(ids, max_new_tokens, eos_ids=sorted(eos), pad_id=tokenizer.pad_token_id).tolist()
    else:
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            for i in range(0, len(prompts), batch_size):
                texts = [prompt_text(tokenizer, p) for p in prompts[i:i + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                rows += gen[:, enc["input_ids"].shape[1]:].tolist()
        finally:
            tokenizer.padding_side = side
    # cut each row after its first stop token (what follows is padding)
    return [row[:next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in rows]


def score(predictions: list[str], references: list[str]) -> dict:
    """Exact match (after stripping surrounding whitespace), in percent."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": 100.0 * hits / max(len(references), 1)}


# ----------------------------------------------------------------------------------------------
# The task interface (as in classify, translate, qa, lm).

def read(path: str, cfg, targets: bool = True) -> list[dict]:
    limit = getattr(cfg, "limit", 0)
    rows = read_records(path)
    rows = rows[:limit] if limit else rows
    rows = [from_sharegpt(r, path, cfg) for r in rows]
    kept, empty = [], []
    for row in rows:  # every record checked now, before a model is loaded or a folder made
        try:
            to_messages(row, path, targets)
            kept.append(row)
        except EmptyAnswer as e:
            empty.append(e)
    if empty and not kept:
        raise empty[0]
    if empty:  # a few empty answers in a real data set (Alpaca has them): left out, and said so
        where_ = ", ".join(e.at for e in empty[:3]) + (", ..." if len(empty) > 3 else "")
        print(f"note: {len(empty)} of {len(rows)} records in {path} have an empty answer and are left out "
              f"({where_})", file=sys.stderr)
    return kept


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def role_map(spec: str) -> dict:
    """--role-map 'human=user,gpt=assistant' on top of ShareGPT's usual names."""
    roles = dict(ROLES)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, role = item.partition("=")
        if not sep or role.strip() not in ("user", "assistant", "system"):
            raise LmtuneError(f"--role-map {spec}: '{item}' is not NAME=user|assistant|system")
        roles[name.strip()] = role.strip()
    return roles


def from_sharegpt(row: dict, path: str, cfg) -> dict:
    """A ShareGPT record ({conversations: [{from, value}]}, or the --messages-column) as a `messages`
    record; other records are returned as they are."""
    column = getattr(cfg, "messages_column", "") or ("conversations" if "conversations" in row else "")
    if not column:
        return row
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise LmtuneError(f"{where(path, row)}: '{column}' must be a non-empty list of {{from, value}} turns")
    roles, msgs = role_map(getattr(cfg, "role_map", "")), []
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or not ({"from", "value"} <= set(t) or {"role", "content"} <= set(t)):
            raise LmtuneError(f"{where(path, row)}: turn {k} of '{column}' is not {{from, value}}")
        name = t.get("from", t.get("role"))
        if name not in roles:
            raise LmtuneError(f"{where(path, row)}: turn {k} has the unknown role '{name}'; map it with --role-map "
                              f"{name}=user|assistant|system")
        msgs.append({"role": roles[name], "content": str(t.get("value", t.get("content")))})
    return {"messages": msgs, "_line": row.get("_line")}


def load(name: str, cfg, train_rows: list[dict] | None = None):
    from lmtune import models

    model, tokenizer, _ = models.load_for_task(name, "instruct", HEAD, **models.load_options(cfg))
    if getattr(cfg, "chat_template", ""):  # saved with the model's tokenizer, so generate and chat use it too
        from pathlib import Path

        p = Path(cfg.chat_template)
        if not p.is_file():
            raise LmtuneError(f"--chat-template {cfg.chat_template} not found: give a Jinja template file")
        tokenizer.chat_template = p.read_text(encoding="utf-8")
    return model, tokenizer, {"task": "instruct", "head": HEAD, "kind": "decoder"}


def check(rows: list[dict], meta: dict, path: str, cfg) -> None:
    for row in rows:
        to_messages(row, path)


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    return encode_all(rows, tokenizer, cfg.max_length, path)


def collate(tokenizer, meta: dict):
    return partial(batching.collate, pad_id=tokenizer.pad_token_id)


def _ask_and_expect(row: dict, path: str, targets: bool = True) -> tuple[str, str]:
    """The last user turn and the answer expected after it (for scoring; '' when predicting without one)."""
    msgs = to_messages(row, path, targets)
    if not any(m["role"] == "assistant" for m in msgs):
        user = [m["content"] for m in msgs if m["role"] == "user"]
        return (user[-1] if user else ""), ""
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    user = [m["content"] for m in msgs[:last] if m["role"] == "user"]
    return (user[-1] if user else ""), msgs[last]["content"]


def user_prompt(row: dict, path: str) -> str:
    """The last user turn of a row: what the model is asked."""
    return _ask_and_expect(row, path)[0]


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    prompts = [_ask_and_expect(r, getattr(cfg, "data", ""), targets=False)[0] for r in rows]
    answers = respond(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    return [{"response": a} for a in answers]


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict, answers_out: list | None = None) -> dict:
    """Exact match of greedy responses, and the loss per response token. The responses are appended to
    `answers_out` when one is given (`evaluate --reference` compares them with another model's)."""
    from lmtune.train.loop import mean_loss

    expected = [_ask_and_expect(r, cfg.data)[1] for r in rows]
    answers = [p["response"] for p in predict(model, tokenizer, rows, cfg, meta)]
    if answers_out is not None:
        answers_out.extend(answers)
    examples = encode_all(rows, tokenizer, cfg.max_length, cfg.data)
    result = score(answers, expected)
    result["loss"] = mean_loss(model, examples, collate(tokenizer, meta), loss, cfg.batch_size)
    return result
