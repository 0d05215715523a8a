"""Translation: decoder-only models with a chat prompt, or encoder-decoder (seq2seq) models.

Data: JSONL/CSV/... records with source and target fields (--source-column, --target-column), or two
line-aligned text files given as `--data SRC_FILE,TGT_FILE` (plain or .gz, one sentence a line).
A decoder is asked "Translate this English sentence into German: ..." (languages from --source-lang/
--target-lang, else from file names such as train.en.gz, else from the model's lmtune.json) and learns
the answer only; a seq2seq model reads the source and learns the target. Metrics: sacrebleu BLEU, chrF.

`--model scratch:SIZE` (a size preset: 1m, 10m, 30m) trains a new decoder on the task's own pairs: a byte-level
BPE of SCRATCH_VOCAB tokens trained on both sides of the training pairs, a Llama-style model of that size,
and a plain layout instead of a chat prompt ("source\ntarget<|endoftext|>", the loss on the target), saved
with its tokenizer and that layout as a chat template, so evaluate, predict and generate read it as they
read any decoder. A small model that sees only the task's pairs can out-translate a pretrained English model
fine-tuned for the same minutes (tests/test_translate.py; README: quality per CPU-minute).
"""

from __future__ import annotations

import re
from lmtune import metrics
from lmtune.data.readers import read_records, read_text
from lmtune.errors import LmtuneError
from lmtune.tasks.common import (chat_examples, collate_inputs, generate_answers, limit_rows, pad_field,
                                 require_columns, text_field)

METRIC = "bleu"
METRICS = ("bleu", "chrf")
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese"}


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    """Rows {source, target}. Two comma-separated files are read line by line and must align."""
    files = [f for f in path.split(",") if f]
    if len(files) == 2:
        src, tgt = (read_text(f).rstrip("\n").split("\n") for f in files)
        if len(src) != len(tgt):
            raise LmtuneError(f"translation files differ in length: {files[0]} has {len(src)} lines, "
                              f"{files[1]} has {len(tgt)}; they must be line-aligned")
        rows = [{"source": s, "target": t, "_line": i + 1} for i, (s, t) in enumerate(zip(src, tgt))]
        for r in rows:
            text_field(r, "source", files[0])
            if targets:
                text_field(r, "target", files[1])
    elif len(files) == 1:
        rows = read_records(path)
        cols = {cfg.source_column: "--source-column"}
        if targets:
            cols[cfg.target_column] = "--target-column"
        require_columns(rows, path, cols)
        rows = [{"source": text_field(r, cfg.source_column, path),
                 "target": text_field(r, cfg.target_column, path) if targets else str(r.get(cfg.target_column, "")),
                 "_line": r["_line"]} for r in rows]
    else:
        raise LmtuneError(f"--data {path}: give one data file, or SRC_FILE,TGT_FILE (two line-aligned files)")
    return limit_rows(rows, getattr(cfg, "limit", 0))


def languages(cfg, meta: dict) -> tuple[str, str]:
    """Source and target language names: flags, then file names (train.en.gz), then lmtune.json."""
    from_files = [LANGUAGES.get(m.group(1), m.group(1)) if (m := re.search(r"\.([a-z]{2})(\.gz)?$", f)) else ""
                  for f in (cfg.data.split(",") + ["", ""])[:2]]
    src = cfg.source_lang or (from_files[0] if "," in cfg.data else "") or meta.get("source_lang", "")
    tgt = cfg.target_lang or (from_files[1] if "," in cfg.data else "") or meta.get("target_lang", "")
    return src, tgt


SCRATCH_VOCAB = 8000  # joint BPE for a corpus of Multi30k's size (29k pairs)
# the plain layout: the source, a newline, the target and end of text; the loss falls on the target's part
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<|endoftext|>"
                  "{% else %}{{ '\\n' }}{% endif %}{% endfor %}")  # a newline block-trimming keeps


def prompt(source: str, src_lang: str, tgt_lang: str, layout: str = "chat") -> str:
    if layout == "plain":
        return source.replace("\n", " ")
    return f"Translate this {src_lang} sentence into {tgt_lang}. Answer with the translation only.\n\n{source}"


def scratch(name: str, cfg, train_rows: list[dict] | None):
    """A new decoder of the size `name` names ("scratch:10m") with a tokenizer trained on both sides of the pairs."""
    import torch

    from lmtune import models
    from lmtune.data.tokenizer import train_tokenizer

    size = name.split(":", 1)[1]
    if train_rows is None:  # evaluate, predict: there is nothing to build a model from
        raise LmtuneError(f"--model {name} is a model finetune trains from scratch: give the folder its --out wrote")
    if size not in models.PRESETS:
        raise LmtuneError(f"--model {name}: no size {size!r}; use scratch:{'|'.join(models.PRESETS)}")
    if getattr(cfg, "lora", False):
        raise LmtuneError(f"--model {name} trains a new model in full: drop --lora")
    lines = (line for r in train_rows for line in (r["source"] + "\n", r["target"] + "\n"))
    tok = train_tokenizer(lines, "bpe", SCRATCH_VOCAB)
    tok.chat_template = PLAIN_TEMPLATE
    src, tgt = languages(cfg, {})
    torch.manual_seed(getattr(cfg, "seed", 0))  # the same weights for the same --seed
    model = models.build_from_preset(size, tok, cfg.max_length)
    return model, tok, {"task": "translate", "head": "causal", "kind": "decoder", "layout": "plain",
                        "scratch": size, "source_lang": src, "target_lang": tgt}


def load(name: str, cfg, train_rows: list[dict] | None = None):
    from lmtune import models

    if name.startswith("scratch:"):
        return scratch(name, cfg, train_rows)
    path = models.resolve(name)
    kind = models.model_kind(path)
    if kind == "encoder":
        raise LmtuneError(f"model {name} is an encoder: translation needs a decoder (causal LM) or an "
                          "encoder-decoder (seq2seq) model")
    saved = models.read_lmtune_file(path)
    meta = {"task": "translate", "head": "seq2seq" if kind == "seq2seq" else "causal", "kind": kind,
            "layout": saved.get("layout", "chat")}
    src, tgt = languages(cfg, saved)
    if kind == "decoder" and meta["layout"] == "chat" and not (src and tgt):
        raise LmtuneError("translate with a decoder model needs the language names for its prompt: "
                          "give --source-lang and --target-lang (e.g. English, German)")
    meta.update(source_lang=src, target_lang=tgt)
    model, tok, _ = models.load_for_task(name, "translate", meta["head"], **models.load_options(cfg))
    return model, tok, meta


def check(rows, meta, path, cfg) -> None:
    pass


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    if meta["kind"] == "decoder":
        pairs = [(prompt(r["source"], meta["source_lang"], meta["target_lang"], meta.get("layout", "chat")),
                  r["target"]) for r in rows]
        return chat_examples(pairs, tokenizer, cfg.max_length, path)
    enc = tokenizer([r["source"] for r in rows], text_target=[r["target"] for r in rows], truncation=True,
                    max_length=cfg.max_length)
    # labels lead with -100: the loop counts targets from column 1 (see common.collate_inputs)
    return [{"input_ids": ids, "labels": [-100] + lab}
            for ids, lab in zip(enc["input_ids"], enc["labels"])]


def collate(tokenizer, meta: dict):
    from lmtune.data.batching import collate as causal_collate

    if meta["kind"] == "decoder":
        return lambda examples: causal_collate(examples, pad_id=tokenizer.pad_token_id)

    def seq2seq_collate(examples):
        batch = collate_inputs([{"input_ids": e["input_ids"]} for e in examples], tokenizer.pad_token_id)
        batch["labels"] = pad_field(examples, "labels", -100)
        return batch
    return seq2seq_collate


def loss(model, batch: dict):
    """Decoder: the causal-LM loss on the answer. Seq2seq: summed cross-entropy of the target tokens."""
    import torch.nn.functional as F

    from lmtune.train.loss import causal_lm_loss

    if not model.config.is_encoder_decoder:
        return causal_lm_loss(model, batch)
    labels = batch["labels"][:, 1:].contiguous()  # column 0 only marks the layout (see encode)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    s = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return s, int((labels != -100).sum())


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    """{translation} per row, greedy decoding."""
    import torch

    if meta["kind"] == "decoder":
        prompts = [prompt(r["source"], meta["source_lang"], meta["target_lang"], meta.get("layout", "chat"))
                   for r in rows]
        return [{"translation": t} for t in generate_answers(model, tokenizer, prompts, cfg.max_new_tokens,
                                                              cfg.batch_size)]
    out = []
    model.eval()
    for i in range(0, len(rows), cfg.batch_size):
        enc = tokenizer([r["source"] for r in rows[i:i + cfg.batch_size]], return_tensors="pt", padding=True,
                        truncation=True, max_length=cfg.max_length).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1)
        out += [{"translation": t.strip()} for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return out


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    hyps = [p["translation"] for p in predict(model, tokenizer, rows, cfg, meta)]
    return metrics.translation(hyps, [r["target"] for r in rows])
