"""`lmtune demo`: the whole idea of fine-tuning in a few minutes on a laptop CPU.

1. Generate a built-in task with exactly checkable answers (dates -> ISO 8601), train and held-back parts.
2. Score SmolLM2-135M-Instruct on the held-back part (exact match).
3. Fine-tune it with LoRA through the ordinary `finetune` verb.
4. Score the base model + adapter on the same held-back part, and show a few generations.
The run folder keeps the data, the adapter, metrics.jsonl, loss.png and demo.json with the scores.
"""

from __future__ import annotations

import json
import time

from lmtune.config import DemoConfig, FinetuneConfig


def _score(model_name: str, rows: list[dict], dev) -> tuple[float, list[str]]:
    from lmtune import models
    from lmtune.tasks import instruct

    model, tokenizer = models.load_causal_lm(model_name, device=dev)
    prompts = [f"{r['instruction']}\n\n{r['input']}" for r in rows]
    preds = instruct.respond(model, tokenizer, prompts, max_new_tokens=16)
    return instruct.score(preds, [r["output"] for r in rows])["exact_match"], preds


def demo(cfg: DemoConfig) -> dict:
    from lmtune.data.synthetic import date_records
    from lmtune.finetune import finetune
    from lmtune.train.checkpoint import check_out_dir, create_out_dir

    from lmtune import device

    dev = device.settle(cfg)
    t0 = time.perf_counter()
    check_out_dir(cfg.out, False, cfg.overwrite)
    eval_rows = date_records(cfg.eval_examples, seed=cfg.seed + 1)
    train_rows = date_records(cfg.train_examples, seed=cfg.seed, exclude={r["input"] for r in eval_rows})

    print(f"[1/3] scoring {cfg.model} on {len(eval_rows)} held-back examples of the built-in 'dates' task "
          f"(rewrite a date as YYYY-MM-DD), before fine-tuning...", flush=True)
    before, preds_before = _score(cfg.model, eval_rows, dev)
    print(f"      exact match before: {before:.1f}%", flush=True)

    out = create_out_dir(cfg.out, False, cfg.overwrite)
    data = out / "data"
    data.mkdir()
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"[2/3] LoRA fine-tuning for {cfg.max_steps} steps on {len(train_rows)} generated examples...", flush=True)
    ft = FinetuneConfig(model=cfg.model, data=str(data / "train.jsonl"), out=str(out / "adapter"), lora=True,
                        lora_r=16, lora_alpha=32, lora_dropout=0.0, max_steps=cfg.max_steps,
                        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=5,
                        schedule="cosine", max_length=128, seed=cfg.seed, save_every=cfg.max_steps,
                        device=cfg.device)
    finetune(ft)

    print("[3/3] scoring the fine-tuned model on the same held-back examples...", flush=True)
    after, preds_after = _score(str(out / "adapter"), eval_rows, dev)
    minutes = (time.perf_counter() - t0) / 60
    result = {"task": "dates", "model": cfg.model, "eval_examples": len(eval_rows),
              "exact_match_before": before, "exact_match_after": after, "minutes": round(minutes, 2),
              "adapter": str(out / "adapter")}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'input':<34} {'expected':<11} {'before':<22} after")
    for r, b, a in list(zip(eval_rows, preds_before, preds_after))[:6]:
        print(f"{r['input']:<34} {r['output']:<11} {b[:21]:<22} {a[:21]}")
    print(f"\nexact match on {len(eval_rows)} held-back examples: before {before:.1f}%  ->  after {after:.1f}%"
          f"   ({minutes:.1f} min)")
    print(f"run folder: {out}  (adapter/, adapter/metrics.jsonl, adapter/loss.png, demo.json)")
    print(f"try it:     lmtune generate --model {out / 'adapter'} --prompt \"{eval_rows[0]['instruction']} "
          f"{eval_rows[0]['input']}\"")
    return result
