"""Question answering: extractive with encoders, generative with decoders. Scored by SQuAD EM/F1.

Data: SQuAD v1.1 JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) or records (JSONL/CSV)
with context, question and answers ({"text": [...], "answer_start": [...]}, a list of {text,
answer_start}, or a plain string). A record whose first answer is not found at its answer_start in the
context is skipped and counted (`skipped` in the summary): it could not be trained on or trusted.

Extractive (AutoModelForQuestionAnswering): question + context windows of --max-length tokens that
overlap by --doc-stride; the model scores every start/end token; the answer is the best-scoring span of
at most MAX_ANSWER_TOKENS over all windows of the question. Generative: a decoder is asked the question
about the context and its first line of output is the answer.
"""

from __future__ import annotations

import sys

from lmtune import metrics
from lmtune.data.readers import read_records, where
from lmtune.errors import LmtuneError
from lmtune.tasks.common import (chat_examples, collate_inputs, generate_answers, limit_rows, require_columns,
                                 text_field)

METRIC = "f1"
METRICS = ("f1", "exact_match")
MAX_ANSWER_TOKENS = 30
TOP_K = 20  # start and end candidates per window


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    """Rows {id, context, question, answers: [text], starts: [int or None]}; bad answer offsets skipped."""
    records = read_records(path)
    if records and "paragraphs" in records[0]:  # SQuAD JSON: articles -> paragraphs -> questions
        try:
            records = [{"id": q.get("id", ""), "context": p["context"], "question": q["question"],
                        "answers": q.get("answers", []), "_line": f"article {a}"}
                       for a, art in enumerate(records) for p in art["paragraphs"] for q in p["qas"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise LmtuneError(f"{path}: not SQuAD JSON (articles of paragraphs of {{context, qas: [{{question, "
                              f"answers}}]}}): {type(e).__name__} {e}") from None
        ctx_col, q_col = "context", "question"
    else:
        ctx_col, q_col = cfg.context_column, cfg.question_column
        cols = {ctx_col: "--context-column", q_col: "--question-column"}
        require_columns(records, path, {**cols, "answers": "an 'answers' field"} if targets else cols)
    rows, skipped = [], 0
    for r in records:
        texts, starts = _answers(r.get("answers"), path, r)
        ctx, _ = text_field(r, ctx_col, path, empty_ok=True), text_field(r, q_col, path)
        if any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in starts) or \
                len(starts) != len(texts):
            raise LmtuneError(f"{where(path, r)}: answer_start must be a whole number >= 0, one per answer text")
        if texts and starts[0] is not None and ctx[starts[0]:starts[0] + len(texts[0])] != texts[0]:
            skipped += 1
            continue
        rows.append({"id": r.get("id", str(r["_line"])), "context": ctx, "question": str(r[q_col]),
                     "answers": texts, "starts": starts, "_line": r["_line"]})
    if skipped:
        print(f"warning: {path}: skipped {skipped} of {len(records)} records whose answer text is not at "
              "its answer_start in the context", file=sys.stderr)
    if targets and not any(r["answers"] for r in rows):
        raise LmtuneError(f"{path}: no record has an answer to learn from or score against")
    rows = Rows(limit_rows([r for r in rows if r["answers"] or not targets], getattr(cfg, "limit", 0)))
    rows.skipped = skipped  # reported in evaluate's summary
    return rows


class Rows(list):
    """The rows of a qa file, and how many records were skipped for a misplaced answer."""

    skipped = 0


def _answers(value, path: str, row: dict) -> tuple[list[str], list]:
    if value is None:
        return [], []
    if isinstance(value, str):
        return [value], [None]
    if isinstance(value, dict):  # Hugging Face datasets layout
        texts = [str(t) for t in value.get("text", [])]
        return texts, list(value.get("answer_start", [None] * len(texts)))
    if isinstance(value, list) and all(isinstance(a, dict) and "text" in a for a in value):
        return [str(a["text"]) for a in value], [a.get("answer_start") for a in value]
    raise LmtuneError(f"{where(path, row)}: 'answers' must be a string, a list of {{text, answer_start}} "
                      "or {text: [...], answer_start: [...]}")


def load(name: str, cfg, train_rows: list[dict] | None = None):
    from lmtune import models

    kind = models.model_kind(models.resolve(name))
    if kind == "seq2seq":
        raise LmtuneError(f"model {name} is an encoder-decoder: qa supports encoders (extractive) and "
                          "decoders (generative)")
    head = "qa_span" if kind == "encoder" else "causal"
    model, tok, _ = models.load_for_task(name, "qa", head, **models.load_options(cfg))
    if head == "qa_span" and not tok.is_fast:
        raise LmtuneError(f"model {name}: extractive qa needs a fast tokenizer (tokenizer.json) for offsets")
    return model, tok, {"task": "qa", "head": head, "kind": kind}


def check(rows, meta, path, cfg) -> None:
    pass


def prompt(row: dict) -> str:
    return ("Answer the question with a short phrase copied from the context.\n\n"
            f"Context: {row['context']}\n\nQuestion: {row['question']}")


def _windows(rows: list[dict], tokenizer, cfg):
    """Tokenized question + context windows; `overflow_to_sample_mapping` gives each window's row."""
    return tokenizer([r["question"] for r in rows], [r["context"] for r in rows], truncation="only_second",
                     max_length=cfg.max_length, stride=min(cfg.doc_stride, cfg.max_length // 2),
                     return_overflowing_tokens=True, return_offsets_mapping=True)


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    if meta["head"] == "causal":
        return chat_examples([(prompt(r), r["answers"][0]) for r in rows], tokenizer, cfg.max_length, path)
    enc, examples = _windows(rows, tokenizer, cfg), []
    for w, ids in enumerate(enc["input_ids"]):
        r = rows[enc["overflow_to_sample_mapping"][w]]
        start = r["starts"][0] if r["starts"][0] is not None else r["context"].find(r["answers"][0])
        end = start + len(r["answers"][0])
        seq, offsets = enc.sequence_ids(w), enc["offset_mapping"][w]
        ctx = [i for i, s in enumerate(seq) if s == 1]
        s_tok = e_tok = 0  # the answer is not in this window: point at [CLS], as BERT's SQuAD recipe does
        if start >= 0 and offsets[ctx[0]][0] <= start and offsets[ctx[-1]][1] >= end:
            s_tok = next(i for i in ctx if offsets[i][1] > start)
            e_tok = next(i for i in reversed(ctx) if offsets[i][0] < end)
        ex = {"input_ids": ids, "labels": [-100, s_tok, e_tok]}  # two targets per window
        if "token_type_ids" in enc:
            ex["token_type_ids"] = enc["token_type_ids"][w]
        examples.append(ex)
    return examples


def collate(tokenizer, meta: dict):
    from lmtune.data.batching import collate as causal_collate

    if meta["head"] == "causal":
        return lambda examples: causal_collate(examples, pad_id=tokenizer.pad_token_id)
    return lambda examples: {**collate_inputs(examples, tokenizer.pad_token_id), "span": True}


def loss(model, batch: dict):
    """Span heads: summed cross-entropy of start and end (two targets a window). Decoders: causal LM."""
    import torch.nn.functional as F

    from lmtune.train.loss import causal_lm_loss

    if not batch.get("span"):
        return causal_lm_loss(model, batch)
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "span")})
    s = F.cross_entropy(out.start_logits.float(), batch["labels"][:, 1], reduction="sum") + \
        F.cross_entropy(out.end_logits.float(), batch["labels"][:, 2], reduction="sum")
    return s, 2 * batch["labels"].shape[0]


def _best_span(start, end, offsets, seq) -> tuple[float, int, int]:
    """(score, first char, end char) of the best context span in one window."""
    best = (float("-inf"), 0, 0)
    starts = sorted(range(len(seq)), key=lambda i: -start[i])[:TOP_K]
    ends = sorted(range(len(seq)), key=lambda i: -end[i])[:TOP_K]
    for s in starts:
        for e in ends:
            if seq[s] != 1 or seq[e] != 1 or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                continue
            if start[s] + end[e] > best[0]:
                best = (start[s] + end[e], offsets[s][0], offsets[e][1])
    return best


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    """{answer} per row: the best span over the row's windows, or the generated answer."""
    import torch

    if meta["head"] == "causal":
        answers = generate_answers(model, tokenizer, [prompt(r) for r in rows], cfg.max_new_tokens, cfg.batch_size)
        return [{"answer": a} for a in answers]
    model.eval()
    best = [(float("-inf"), 0, 0)] * len(rows)
    for i in range(0, len(rows), cfg.batch_size):
        part = rows[i:i + cfg.batch_size]
        enc = _windows(part, tokenizer, cfg)
        feats = [{"input_ids": ids, **({"token_type_ids": enc["token_type_ids"][w]} if "token_type_ids" in enc
                                       else {})} for w, ids in enumerate(enc["input_ids"])]
        with torch.no_grad():
            out = model(**{k: v.to(model.device) for k, v in collate_inputs(feats, tokenizer.pad_token_id).items()})
        for w in range(len(feats)):
            row = i + enc["overflow_to_sample_mapping"][w]
            n = len(feats[w]["input_ids"])
            cand = _best_span(out.start_logits[w, :n].tolist(), out.end_logits[w, :n].tolist(),
                              enc["offset_mapping"][w], enc.sequence_ids(w))
            best[row] = max(best[row], cand, key=lambda c: c[0])
    return [{"answer": r["context"][b[1]:b[2]]} for r, b in zip(rows, best)]


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    preds = [p["answer"] for p in predict(model, tokenizer, rows, cfg, meta)]
    return {**metrics.squad(preds, [r["answers"] for r in rows]), "questions": len(rows),
            "skipped": getattr(rows, "skipped", 0)}
