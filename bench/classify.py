"""Classification fine-tune speed: lmtune against the Hugging Face Trainer, same machine, one run.

    python bench/classify.py            # 300 optimizer steps of batch 32 per contender (about 10 minutes here)
    python bench/classify.py --quick    # 60 steps, about 3 minutes
    python bench/classify.py --steps 200 --bf16 --only lmtune,"HF Trainer"

Workload: full fine-tune of minilm-l6 (all-MiniLM-L6-v2, a 22.7M-parameter BERT) with a 2-way
sequence-classification head on SST-2: the first steps x batch rows of ../shared/data/sst2/train.tsv
(so every contender sees each of those rows exactly once), then accuracy on the 872 GLUE dev sentences.

Contenders, each in its own process, one after the other (so peak resident memory is its own):
  lmtune                  lmtune.finetune.finetune(FinetuneConfig(task="classify", ...)); its defaults
                          group batches by length (group_by_length)
  HF Trainer              AutoModelForSequenceClassification + DataCollatorWithPadding (dynamic padding to the
                          longest row of each random batch): the target peer
  HF Trainer grouped      the same with train_sampling_strategy="group_by_length" (LengthGroupedSampler):
                          the strongest plain-Trainer peer

Same for all: rows, tokenizer, max length, batch size, optimizer steps, AdamW (betas 0.9/0.999, eps 1e-8),
peak learning rate, linear decay after linear warmup, weight decay, gradient clipping at 1.0, precision
(fp32, or bf16 autocast with --bf16), seed (--seed) and torch threads. What differs: warmup step s has
lr x (s+1)/(W+1) in lmtune and x s/W in the Trainer; the Trainer exempts biases and LayerNorms from weight
decay (no difference at the default 0); the random head, data order and dropout masks differ, so dev
accuracy moves by about a point from run to run (872 sentences: 1 row = 0.11 points). Reported: training examples/s and non-padding
tokens/s after the first WARMUP optimizer steps (from the end of step WARMUP to the end of the last), the
share of padded positions in the batches, peak RSS (VmHWM of the contender's process, dev evaluation
included) and dev accuracy after training: lmtune's from its own evaluate (tasks.classify.evaluate, the
final validation in metrics.jsonl), the Trainer's from trainer.predict (argmax of the logits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data") / "sst2"
MODEL = "minilm-l6"
WARMUP = 3  # optimizer steps not timed
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_mb() -> float:
    from lmtune.train.loop import peak_memory_mb  # VmHWM of this process

    return peak_memory_mb()


def _cfg_view(args):
    """The options every contender reads (and the classify task's reader needs)."""
    from lmtune.config import FinetuneConfig

    return FinetuneConfig(task="classify", model=MODEL, data="-", out="-", text_column="sentence")


def train_rows(args) -> list[dict]:
    """The first steps x batch_size rows of train.tsv, read by lmtune's reader (the same rows for all)."""
    from lmtune.tasks import classify

    rows = classify.read(str(DATA / "train.tsv"), _cfg_view(args))[:args.steps * args.batch_size]
    return [{"sentence": r["sentence"], "label": r["label"]} for r in rows]


def dev_rows(args) -> list[dict]:
    from lmtune.tasks import classify

    return [{"sentence": r["sentence"], "label": r["label"]}
            for r in classify.read(str(DATA / "dev.tsv"), _cfg_view(args))]


def _speed(batches: list[tuple[int, int, int]], times: list[float]) -> dict:
    """batches: (rows, non-padding tokens, padded positions) per optimizer step; times: end of each step."""
    used, dt = batches[WARMUP:len(times)], times[-1] - times[WARMUP - 1]
    return {"examples_per_s": sum(b[0] for b in used) / dt, "tokens_per_s": sum(b[1] for b in used) / dt,
            "padding": 1 - sum(b[1] for b in used) / sum(b[2] for b in used), "timed_steps": len(used)}


# ----------------------------------------------------------------------------------------------

def run_lmtune(args) -> dict:
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune
    from lmtune.tasks import classify
    from lmtune.train import loop

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows(args)))
    seen: list[tuple[int, int, int]] = []  # what the task's collate hands the loop, step by step
    make_collate = classify.collate

    def counting_collate(tokenizer, meta):
        coll = make_collate(tokenizer, meta)

        def wrapped(examples):
            b = coll(examples)
            if len(seen) < args.steps:  # training batches (validation comes after the last step)
                ids = b["input_ids"]
                seen.append((ids.shape[0], sum(len(e["input_ids"]) for e in examples), ids.numel()))
            return b
        return wrapped

    classify.collate = counting_collate
    built, loaded = [], []  # the optimizer the loop builds and the model the task loads, to state them
    build, load = loop.build_optimizer, classify.load
    loop.build_optimizer = lambda cfg, params: built.append(build(cfg, params)) or built[-1]
    classify.load = lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]
    cfg = FinetuneConfig(task="classify", model=MODEL, data=str(data), eval_data=str(DATA / "dev.tsv"),
                         text_column="sentence", out=str(tmp / "run"), batch_size=args.batch_size,
                         max_steps=args.steps, learning_rate=args.lr, schedule="linear", warmup_steps=args.warmup,
                         weight_decay=args.weight_decay, grad_clip=1.0, max_length=args.max_length, bf16=args.bf16,
                         threads=args.threads, seed=args.seed, save_every=10**6, eval_every=0)
    finetune(cfg)
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    final = [r for r in records if "val_accuracy" in r][-1]
    out = _speed(seen, [r["elapsed_s"] for r in steps])
    return {**out, "peak_rss_mb": peak_rss_mb(), "accuracy": final["val_accuracy"], "loss": steps[-1]["loss"],
            "steps": len(steps), "examples_seen": sum(b[0] for b in seen),
            "settings": f"optim={type(built[0]).__name__}(fused={built[0].defaults.get('fused')}) "
                        f"group_by_length={cfg.group_by_length} attn={loaded[0][0].config._attn_implementation}"}


def run_hf(args, grouped: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from lmtune import models

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = models.resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)

    def dataset(rows):
        enc = tok([r["sentence"] for r in rows], truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**enc, "labels": [int(r["label"]) for r in rows]})

    train, dev = dataset(train_rows(args)), dataset(dev_rows(args))
    seen: list[tuple[int, int, int]] = []
    times: list[float] = []
    pad, training = DataCollatorWithPadding(tok), [True]

    def collate(features):
        b = pad(features)
        if training[0]:  # in order, one batch per step (the dataloader may fetch one ahead)
            seen.append((b["input_ids"].shape[0], int(b["attention_mask"].sum()), b["input_ids"].numel()))
        return b

    class Timing(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=args.warmup, weight_decay=args.weight_decay, max_grad_norm=1.0,
        bf16=args.bf16, use_cpu=True, seed=args.seed, dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, train_sampling_strategy="group_by_length" if grouped else "random")
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, processing_class=tok)
    trainer.add_callback(Timing())
    result = trainer.train()
    training[0] = False
    # with train_sampling_strategy="group_by_length" the Trainer also length-groups the evaluation set, so
    # predictions come back shuffled: compare them with the label_ids predict returns, in the same order
    pred = trainer.predict(dev)
    accuracy = 100.0 * float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    out = _speed(seen, times)
    return {**out, "peak_rss_mb": peak_rss_mb(), "accuracy": accuracy,
            "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1], "steps": result.global_step,
            "examples_seen": sum(b[0] for b in seen[:result.global_step]),
            "settings": f"optim={targs.optim.value if hasattr(targs.optim, 'value') else targs.optim} "
                        f"train_sampling_strategy={targs.train_sampling_strategy} "
                        f"attn={model.config._attn_implementation}"}


CONTENDERS = {"lmtune": run_lmtune, "HF Trainer": lambda a: run_hf(a, grouped=False),
              "HF Trainer grouped": lambda a: run_hf(a, grouped=True)}
TARGET = "HF Trainer"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per contender")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (default: 6%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, every contender")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every contender")
    p.add_argument("--seed", type=int, default=0, help="seed of every contender (head init, data order, dropout)")
    p.add_argument("--quick", action="store_true", help="60 steps")
    p.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one contender in a child process
    args = p.parse_args()
    if args.quick:
        args.steps = 60
    args.warmup = args.warmup or round(0.06 * args.steps)
    if args.run:
        result = CONTENDERS[args.run](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch
    import transformers

    print(f"SST-2, {MODEL} full fine-tune: {args.steps} steps x batch {args.batch_size} "
          f"({args.steps * args.batch_size} train rows, each seen once), dev 872 sentences; "
          f"{os.cpu_count()} CPUs, {args.threads} torch threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    print(f"every contender: lr {args.lr:g} peak, linear warmup {args.warmup} steps then linear decay to 0, "
          f"AdamW (0.9, 0.999, 1e-8), weight decay {args.weight_decay:g}, grad clip 1.0, max length "
          f"{args.max_length}, {'bf16 autocast' if args.bf16 else 'fp32'}, seed {args.seed}; first {WARMUP} steps untimed",
          flush=True)
    names = [n for n in CONTENDERS if not args.only or n in args.only.split(",")]
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--run", name, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup), "--weight-decay",
               str(args.weight_decay), "--max-length", str(args.max_length), "--threads", str(args.threads), "--seed", str(args.seed)] \
            + (["--bf16"] if args.bf16 else [])
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"  {name}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        results[name] = {**json.loads(line[0][7:]), "wall_s": time.perf_counter() - t0}
        print(f"  ran {name} in {results[name]['wall_s']:.0f}s", flush=True)
    table(results)


def table(results: dict) -> None:
    print(f"\n{'contender':<19} {'examples/s':>10} {'tokens/s':>9} {'padding':>8} {'peak RSS MB':>12} "
          f"{'dev acc %':>9} {'seen':>6} {'last loss':>9} {'wall s':>7}  settings")
    for name, r in results.items():
        print(f"{name:<19} {r['examples_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} {100 * r['padding']:>7.1f}% "
              f"{r['peak_rss_mb']:>12.0f} {r['accuracy']:>9.2f} {r['examples_seen']:>6} {r['loss']:>9.4f} "
              f"{r['wall_s']:>7.0f}  {r['settings']}")
    if "lmtune" in results:
        ours = results["lmtune"]
        for name, r in results.items():
            if name != "lmtune":
                target = " (target: >= 1.5x at accuracy within 0.5)" if name == TARGET else ""
                print(f"lmtune / {name}: {ours['examples_per_s'] / r['examples_per_s']:.2f}x examples/s, "
                      f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                      f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak memory, "
                      f"dev accuracy {ours['accuracy'] - r['accuracy']:+.2f} points{target}")


if __name__ == "__main__":
    main()
