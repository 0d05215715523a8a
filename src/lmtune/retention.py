"""Retention: what a fine-tune keeps of the base model's general behaviour, measured and kept.

Measured: a general set (instruction data or raw text; by default lmtune's built-in 50 short-answer prompts,
data/retain.jsonl) is scored on the base model before training and at every validation: the loss on its
responses (`retain_loss`) and, for instruction data, the share of greedy answers that equal the base model's
own greedy answers to the same prompts after normalisation (`retain_agreement`; the base answers are those of
the first scoring, so it is 1.0 before training by definition), and the mean word-overlap F1 with them
(`retain_f1`: exact equality of answers up to 32 tokens is strict; a LoRA with random weights and no task
already changes 5 of the 50).

Kept: `--mix-retain S` replays general prompts answered by the base model itself (self-replay; by default the
176 built-in prompts of data/replay.jsonl, none of them in the retain set, so retention is measured on prompts
the fine-tune never saw): S of each epoch's training examples are replayed ones. `--replay-loss kl` teaches
the base model's whole next-token distribution on them (`distilling`), not only its greedy tokens: on the demo
7/50 general answers kept with greedy tokens at S=0.2, 40/50 with KL at S=0.7 over 160 steps.
"""

from __future__ import annotations

import itertools
import json
import os
from functools import partial
from pathlib import Path

from lmtune.errors import LmtuneError

BUILTIN_RETAIN = Path(__file__).parent / "data" / "retain.jsonl"
BUILTIN_REPLAY = Path(__file__).parent / "data" / "replay.jsonl"
MAX_NEW_TOKENS = 32  # answers are compared up to this length (the built-in prompts ask for short answers)
REPLAY_NEW_TOKENS = 64  # replayed answers run past the compared length, so the fine-tune learns where they go on
TEXT_SUFFIXES = (".txt", ".text", ".md")


def agreement(answers: list[str], reference: list[str]) -> float:
    """Share of answers equal to the reference answers after SQuAD normalisation (case, punctuation,
    articles, spaces)."""
    from lmtune.metrics import normalize_answer

    same = sum(normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, reference, strict=True))
    return same / max(len(reference), 1)


def overlap(answers: list[str], reference: list[str]) -> float:
    """Mean word-overlap F1 (SQuAD's) of each answer with its reference answer: a graded agreement, which an
    answer reworded but kept on topic keeps in part (an answer turned into a date loses it all)."""
    from lmtune.metrics import normalize_answer, squad_f1

    def f1(a: str, r: str) -> float:  # two equal answers score 1, also two empty ones (SQuAD's F1 gives 0)
        return 1.0 if normalize_answer(a) == normalize_answer(r) else squad_f1(a, r)
    return sum(f1(a, r) for a, r in zip(answers, reference, strict=True)) / max(len(reference), 1)


def prompt_of(row: dict, path: str) -> str:
    """The user prompt of an instruct row; a row may hold a prompt alone ({"prompt": ...})."""
    from lmtune.tasks import instruct

    if "prompt" in row and "completion" not in row:
        return str(row["prompt"])
    if "instruction" in row and "output" not in row:
        return str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
    return instruct.user_prompt(row, path)


def retain_path(spec: str, task: str) -> str | None:
    """The retain file to score, from --retain-data: 'auto' (the built-in set for --task instruct), 'none', a file."""
    if spec == "none" or (spec == "auto" and task != "instruct"):
        return None
    if spec == "auto":
        return str(BUILTIN_RETAIN)
    if not Path(spec).is_file():
        raise LmtuneError(f"--retain-data {spec}: file not found; give an instruct file (.jsonl/.json/.csv/...), "
                          "a raw text file (.txt), 'auto' or 'none'")
    return spec


def is_text(path: str) -> bool:
    p = Path(path)
    return (Path(p.stem).suffix if p.suffix == ".gz" else p.suffix).lower() in TEXT_SUFFIXES


class RetainSet:
    """The general set of one run, encoded once; `score(model)` gives retain_loss (and retain_agreement)."""

    def fits(self, model) -> bool:
        """Whether every prompt and its answer fit the positions the model has (a tiny model's 128 may not)."""
        from lmtune.tasks import instruct

        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not self.prompts or not isinstance(limit, int):
            return True
        longest = max(len(self.tokenizer(instruct.prompt_text(self.tokenizer, p), add_special_tokens=False)
                          ["input_ids"]) for p in self.prompts)
        return longest + MAX_NEW_TOKENS <= limit

    def __init__(self, path: str, tokenizer, max_length: int, batch_size: int, out: Path | None = None):
        from lmtune.data.batching import collate
        from lmtune.data.readers import read_records, read_text
        from lmtune.tasks import instruct, lm

        self.path, self.tokenizer, self.batch_size, self.out = path, tokenizer, batch_size, out
        self.prompts: list[str] = []
        if is_text(path):
            self.examples = lm.encode_text(read_text(path), tokenizer, max_length)
            if not self.examples:
                raise LmtuneError(f"--retain-data {path}: the text has fewer than two tokens")
        else:
            rows = read_records(path)
            self.prompts = [prompt_of(r, path) for r in rows]
            self.examples = instruct.encode_all(rows, tokenizer, max_length, path)
        self.collate = partial(collate, pad_id=tokenizer.pad_token_id)
        self.base_answers: list[str] | None = None
        self.answers: list[str] = []
        self.history: list[dict] = []  # every score, the base model's first

    def score(self, model) -> dict:
        """retain_loss, and retain_agreement with the first scoring's answers (the base model's)."""
        from lmtune.tasks import instruct
        from lmtune.train.loop import mean_loss

        metrics = {"retain_loss": mean_loss(model, self.examples, self.collate, instruct.loss, self.batch_size)}
        if self.prompts:
            self.answers = instruct.respond(model, self.tokenizer, self.prompts, MAX_NEW_TOKENS, self.batch_size)
            if self.base_answers is None:
                self.base_answers = list(self.answers)
            metrics["retain_agreement"] = agreement(self.answers, self.base_answers)
            metrics["retain_f1"] = overlap(self.answers, self.base_answers)
            self._write_answers()
        self.history.append(metrics)
        return metrics

    def _write_answers(self) -> None:
        """OUT/retain_answers.jsonl: each prompt with the base model's answer and the latest one."""
        if self.out is None:
            return
        path = Path(self.out) / "retain_answers.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"prompt": p, "base": b, "answer": a}) + "\n"
                               for p, b, a in zip(self.prompts, self.base_answers, self.answers)))
        os.replace(tmp, path)

    def summary(self) -> str:
        """'retention: 50/50 -> 43/50 general answers as the base model's, retain_loss 1.23 -> 1.40'."""
        first, last = self.history[0], self.history[-1]
        parts = []
        if self.prompts:
            n = len(self.prompts)
            parts.append(f"{round(first['retain_agreement'] * n)}/{n} -> {round(last['retain_agreement'] * n)}/{n} "
                         f"general answers as the base model's (word F1 {first['retain_f1']:.2f} -> "
                         f"{last['retain_f1']:.2f})")
        parts.append(f"retain_loss {first['retain_loss']:.3f} -> {last['retain_loss']:.3f}")
        return "retention: " + ", ".join(parts)


def replay_examples(spec: str, model, tokenizer, max_length: int, batch_size: int, out: Path,
                    resume: bool, mark: bool = False) -> list[dict]:
    """The replay pool: general prompts (--replay-data, else the built-in ones) with the base model's greedy
    answers as targets, token for token as it generated them: an answer it ended carries its stop token, one
    cut at REPLAY_NEW_TOKENS carries none (a forced end of turn there taught the fine-tune to stop early, and
    its answers to general prompts came out cut at their first sentence). The answers go to OUT/replay.jsonl;
    a resumed run reads them back from there, so it trains on exactly the examples the first part did.
    `mark`: each example carries replay=[1] (for `distilling`)."""
    from lmtune.data.batching import IGNORE
    from lmtune.data.readers import read_records
    from lmtune.tasks import instruct

    path = spec or str(BUILTIN_REPLAY)
    saved = Path(out) / "replay.jsonl"
    if resume and saved.is_file():
        pairs = [json.loads(line) for line in saved.read_text().splitlines() if line.strip()]
    else:
        prompts = [prompt_of(r, path) for r in read_records(path)]
        answers = instruct.respond_ids(model, tokenizer, prompts, REPLAY_NEW_TOKENS, batch_size)
        pairs = [{"prompt": p, "completion": tokenizer.decode(a, skip_special_tokens=True).strip(), "ids": a}
                 for p, a in zip(prompts, answers)]
        tmp = saved.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        os.replace(tmp, saved)
    examples = []
    for p in pairs:
        ask = tokenizer(instruct.prompt_text(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
        ids = (ask + p["ids"])[:max_length]
        labels = ([IGNORE] * len(ask) + p["ids"])[:max_length]
        if any(t != IGNORE for t in labels[1:]):  # an answer of no token (or cut off entirely) teaches nothing
            examples.append({"input_ids": ids, "labels": labels, **({"replay": [1]} if mark else {})})
    if not examples:
        raise LmtuneError(f"{path}: no replay prompt leaves room for an answer within max_length={max_length}: "
                          "raise --max-length")
    return examples


def mix(examples: list[dict], replay: list[dict], share: float) -> list[dict]:
    """The task examples followed by replayed ones (cycling through the pool) so that `share` of the whole
    list is replayed. The loop shuffles the list by (seed, epoch), so every epoch holds exactly that share and
    the order stays a pure function of the seed and the step."""
    if share <= 0 or not replay:
        return examples
    n = round(share / (1 - share) * len(examples))
    extra = [replay[i % len(replay)] for i in range(n)]
    tag = {"replay": [0]} if "replay" in replay[0] else {}  # every row says whether it replays (see `distilling`)
    if isinstance(examples, list):
        return [{**e, **tag} for e in examples] + extra if tag else examples + extra
    from lmtune.data.columns import EncodedColumns  # the task's columns, then the replayed rows, as new columns

    return EncodedColumns.write(itertools.chain(({**examples[i], **tag} for i in range(len(examples))), extra))


def distilling(task_loss):
    """The loss of `--replay-loss kl`: on the task's rows of a batch the task's loss; on the replayed rows
    (batch["replay"]) the KL divergence from the base model's next-token distribution to the fine-tune's, at
    every position of the replayed conversation (its prompt's tokens as well as the answer's). The base model
    is the same model with its adapter switched off (no second copy in memory, one forward without
    gradients). The greedy token alone (--replay-loss tokens) says nothing of how sure the base model was;
    the whole distribution keeps its margins, so a small change of the weights is less likely to flip a
    later greedy token (on the demo: 7/50 general answers kept with tokens, 18/50 with KL on the answers,
    and more with every position and a larger pool: README, Forgetting). Both sums are per token, so the
    loop's division by the step's total count weighs a replayed position as a task token."""
    def loss(model, batch: dict):
        import torch
        import torch.nn.functional as F

        replay = batch.get("replay")
        if replay is None or not bool(replay.any()):
            return task_loss(model, batch)

        def rows(sel):
            return {k: v[sel] if torch.is_tensor(v) and v.dim() and v.shape[0] == len(sel) else v
                    for k, v in batch.items() if k != "replay"}
        total, count = task_loss(model, rows(~replay)) if bool((~replay).any()) else (0.0, 0)
        r = rows(replay)
        keep = r["attention_mask"][:, 1:].bool()  # every real position: the prompt's as well as the answer's
        inputs = {"input_ids": r["input_ids"], "attention_mask": r.get("attention_mask"), "use_cache": False}
        with torch.no_grad(), model.disable_adapter():
            base = model(**inputs).logits[:, :-1][keep].float().log_softmax(-1)
        mine = model(**inputs).logits[:, :-1][keep].float().log_softmax(-1)
        kl = F.kl_div(mine, base, log_target=True, reduction="sum")
        return total + kl, count + int(keep.sum())
    return loss


def check_options(cfg, head: str | None = None) -> None:
    """One-line errors for --mix-retain / --replay-data before anything is loaded or written."""
    share = getattr(cfg, "mix_retain", 0.0)
    if not 0 <= share < 1:
        raise LmtuneError(f"--mix-retain {share}: the share of replayed examples must be in [0, 1) "
                          "(0.2 replays one example in five)")
    if share and getattr(cfg, "pack", False):
        raise LmtuneError("--mix-retain with --pack is not supported yet: replayed rows are not packed; drop one")
    if share and cfg.task not in ("instruct",):
        raise LmtuneError(f"--mix-retain replays general chat prompts: it works with --task instruct, "
                          f"not --task {cfg.task}")
    if share and getattr(cfg, "replay_loss", "tokens") == "kl" and not getattr(cfg, "lora", False):
        raise LmtuneError("--replay-loss kl compares with the base model as the model with its adapter switched off: "
                          "it needs --lora (or use --replay-loss tokens)")
    replay = getattr(cfg, "replay_data", "")
    if replay and not Path(replay).is_file():
        raise LmtuneError(f"--replay-data {replay}: file not found; give an instruct file of general prompts")
    if replay and not share:
        raise LmtuneError("--replay-data is used only with --mix-retain: give a share, e.g. --mix-retain 0.2")
