"""Preference tuning that means something: steer SmolLM2-135M-Instruct with `--task dpo`, measure before and after.

    python bench/steer.py dates                 # exact match of ISO dates before/after (a few minutes)
    python bench/steer.py sentiment             # share of positive completions before/after (tens of minutes)
    python bench/steer.py dates --steps 40 --train 256 --eval 60

dates: lmtune's built-in date task (data/synthetic.py). chosen = the ISO date (1999-03-05), rejected = the
    same date in a wrong format (05/03/1999). DPO with LoRA, then exact match of greedy answers on held-back
    dates, scored as `lmtune evaluate --task instruct` scores them (the demo's numbers, by preference alone).
sentiment: the classic "steer sentiment" experiment on SST-2 (../shared/data/sst2). prompt = "Continue this
    movie review: <first words of a review>"; chosen = the rest of a positive review, rejected = the rest of
    a negative one. DPO with LoRA; greedy completions of held-back prompts (first words of SST-2 dev reviews)
    before and after, judged by a MiniLM-L6 sentiment classifier fine-tuned with `lmtune finetune --task
    classify` on SST-2 train sentences (its own accuracy on SST-2 dev is reported with the result).
Everything runs through lmtune's verbs (finetune, evaluate) and task functions; the results go to
OUT/steer-<experiment>.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _dpo(model: str, data: str, out: Path, args, max_length: int) -> str:
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune

    finetune(FinetuneConfig(model=model, task="dpo", data=data, out=str(out), overwrite=True, lora=True, lora_r=16,
                            lora_alpha=32, lora_dropout=0.0, max_steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, warmup_steps=5, schedule="cosine", beta=args.beta,
                            max_length=max_length, seed=args.seed, save_every=args.steps, threads=args.threads))
    return str(out)


# ----------------------------------------------------------------------------------------------

def wrong_format(iso: str) -> str:
    d = dt.date.fromisoformat(iso)
    return f"{d.day:02d}/{d.month:02d}/{d.year}"


def dates(args) -> dict:
    from lmtune.config import EvaluateConfig
    from lmtune.data.synthetic import date_records
    from lmtune.evaluate import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_rows = date_records(args.eval, seed=args.seed + 1)
    train_rows = date_records(args.train, seed=args.seed, exclude={r["input"] for r in eval_rows})
    pairs = [{"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": wrong_format(r["output"])}
             for r in train_rows]
    train, held = _write(out / "dates-pairs.jsonl", pairs), _write(out / "dates-eval.jsonl", eval_rows)

    def exact_match(model: str) -> float:
        cfg = EvaluateConfig(model=model, task="instruct", data=held, json=True, max_new_tokens=16,
                             threads=args.threads)
        return evaluate(cfg)["exact_match"]

    t0 = time.perf_counter()
    before = exact_match(args.model)
    adapter = _dpo(args.model, train, out / "dates-dpo", args, max_length=128)
    after = exact_match(adapter)
    return {"experiment": "dates", "model": args.model, "train_pairs": len(pairs), "eval_examples": len(eval_rows),
            "steps": args.steps, "batch_size": args.batch_size, "beta": args.beta,
            "learning_rate": args.learning_rate, "exact_match_before": before, "exact_match_after": after,
            "minutes": round((time.perf_counter() - t0) / 60, 1), "adapter": adapter}


# ----------------------------------------------------------------------------------------------

PROMPT = "Continue this movie review: {}"


def sst2(split: str) -> list[tuple[str, str]]:
    with open(DATA / "sst2" / f"{split}.tsv", newline="") as f:
        return [(r["sentence"].strip(), r["label"]) for r in csv.DictReader(f, delimiter="\t")]


def sentiment_pairs(rows, n: int, k: int, rng) -> list[dict]:
    """prompt = the first k words of a review; chosen/rejected = the rest of a positive/negative review."""
    long = [(s.split(), lab) for s, lab in rows if len(s.split()) >= k + 4]
    pos, neg = [w for w, lab in long if lab == "1"], [w for w, lab in long if lab == "0"]
    out = []
    for _ in range(n):
        start, p, q = rng.choice(long)[0], rng.choice(pos), rng.choice(neg)
        out.append({"prompt": PROMPT.format(" ".join(start[:k])), "chosen": " ".join(p[k:]), "rejected": " ".join(q[k:])})
    return out


def train_judge(args, out: Path) -> tuple[str, float]:
    """MiniLM-L6 fine-tuned on SST-2 train sentences with lmtune's classify task; (folder, dev accuracy)."""
    from lmtune.config import EvaluateConfig, FinetuneConfig
    from lmtune.evaluate import evaluate
    from lmtune.finetune import finetune

    rng = random.Random(args.seed)
    train = rng.sample(sst2("train"), args.judge_train)
    data = _write(out / "sst2-train.jsonl", [{"text": s, "label": lab} for s, lab in train])
    dev = _write(out / "sst2-dev.jsonl", [{"text": s, "label": lab} for s, lab in sst2("dev")])
    judge = out / "judge"
    if not (judge / "lmtune.json").is_file():
        finetune(FinetuneConfig(model="minilm-l6", task="classify", data=data, out=str(judge), overwrite=True,
                                epochs=1.0, batch_size=32, learning_rate=5e-5, max_length=64, warmup_steps=10,
                                save_every=100_000, threads=args.threads))
    acc = evaluate(EvaluateConfig(model=str(judge), task="classify", data=dev, json=True, threads=args.threads))
    return str(judge), acc["accuracy"]


def positive_share(model_name: str, judge: str, prompts: list[str], args) -> tuple[float, list[str]]:
    from types import SimpleNamespace

    from lmtune import models
    from lmtune.tasks import classify, instruct

    model, tok = models.load_causal_lm(model_name)
    completions = instruct.respond(model, tok, prompts, max_new_tokens=args.max_new_tokens)
    del model
    jmodel, jtok, meta = classify.load(judge, SimpleNamespace(label_column="label"))
    cfg = SimpleNamespace(text_column="text", label_column="label", batch_size=32, max_length=64)
    labels = [p["label"] for p in classify.predict(jmodel, jtok, [{"text": c} for c in completions], cfg, meta)]
    return 100.0 * sum(lab == "1" for lab in labels) / max(len(labels), 1), completions


def sentiment(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    judge, judge_acc = train_judge(args, out)
    print(f"judge: MiniLM-L6 on {args.judge_train} SST-2 train sentences, dev accuracy {judge_acc:.1f}%", flush=True)
    pairs = sentiment_pairs(sst2("train"), args.train, args.words, rng)
    train = _write(out / "sentiment-pairs.jsonl", pairs)
    held = [PROMPT.format(" ".join(s.split()[:args.words])) for s, _ in rng.sample(sst2("dev"), args.eval)]
    before, c_before = positive_share(args.model, judge, held, args)
    adapter = _dpo(args.model, train, out / "sentiment-dpo", args, max_length=96)
    after, c_after = positive_share(adapter, judge, held, args)
    for p, b, a in list(zip(held, c_before, c_after))[:4]:
        print(f"{p[len(PROMPT) - 2:]!r}\n  before: {b[:90]!r}\n  after:  {a[:90]!r}")
    return {"experiment": "sentiment", "model": args.model, "train_pairs": len(pairs), "held_back_prompts": len(held),
            "words": args.words, "steps": args.steps, "batch_size": args.batch_size, "beta": args.beta,
            "learning_rate": args.learning_rate, "judge_train_sentences": args.judge_train,
            "judge_dev_accuracy": judge_acc, "positive_before": before, "positive_after": after,
            "minutes": round((time.perf_counter() - t0) / 60, 1), "adapter": adapter}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["dates", "sentiment"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/steer")
    p.add_argument("--steps", type=int, default=0, help="DPO steps (default: 60 dates, 100 sentiment)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--learning-rate", type=float, default=0.0, help="default: 2e-4 dates (2e-3 collapsed the model), 5e-4 sentiment")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--train", type=int, default=0, help="training pairs (default: 480 dates, 800 sentiment)")
    p.add_argument("--eval", type=int, default=0, help="held-back examples (default: 60 dates, 100 sentiment)")
    p.add_argument("--words", type=int, default=4, help="sentiment: words of a review in the prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="sentiment: completion length")
    p.add_argument("--judge-train", type=int, default=8000, help="sentiment: SST-2 train sentences for the judge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    dates_exp = args.experiment == "dates"
    args.steps = args.steps or (60 if dates_exp else 100)
    args.learning_rate = args.learning_rate or (2e-4 if dates_exp else 5e-4)
    args.train = args.train or (480 if dates_exp else 800)
    args.eval = args.eval or (60 if dates_exp else 100)
    result = dates(args) if dates_exp else sentiment(args)
    Path(args.out, f"steer-{args.experiment}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
