"""`lmtune demo`: the whole idea of fine-tuning in a few minutes on a laptop CPU.

1. Generate a built-in task with exactly checkable answers (dates -> ISO 8601), train and held-back parts.
2. Score SmolLM2-135M-Instruct on the held-back part (exact match).
3. Fine-tune it with LoRA through the ordinary `finetune` verb, which also scores 50 general prompts on the
   base model and at the end (retention: answers that are still the base model's), with a share of the
   training examples replaying other general prompts answered by the base model (--mix-retain).
4. Score the base model + adapter on the same held-back part, and show a few generations of both kinds.
The run folder keeps the data, the adapter, metrics.jsonl, loss.png and demo.json with the scores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmtune.config import DemoConfig, FinetuneConfig


def _score(model_name: str, rows: list[dict], dev) -> tuple[float, list[str]]:
    from lmtune import models
    from lmtune.tasks import instruct

    model, tokenizer = models.load_causal_lm(model_name, device=dev)
    prompts = [f"{r['instruction']}\n\n{r['input']}" for r in rows]
    preds = instruct.respond(model, tokenizer, prompts, max_new_tokens=16)
    return instruct.score(preds, [r["output"] for r in rows])["exact_match"], preds


def _retention(run: Path) -> tuple[int, int, int, list[dict], float]:
    """(general answers kept before training, after, prompts, answers, word F1 after) from the fine-tune's own scoring of
    the built-in general prompts: metrics.jsonl's step-0 and last retain_agreement, retain_answers.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scored = [r for r in rows if "retain_agreement" in r]
    general = [json.loads(line) for line in (run / "retain_answers.jsonl").read_text().splitlines()]
    n = len(general)
    return (round(scored[0]["retain_agreement"] * n), round(scored[-1]["retain_agreement"] * n), n, general,
            scored[-1].get("retain_f1", 1.0))


def demo(cfg: DemoConfig) -> dict:
    from lmtune import files
    from lmtune.config.options import to_dict
    from lmtune.data.synthetic import date_records
    from lmtune.finetune import finetune
    from lmtune.track import write_run_info
    from lmtune.train.checkpoint import check_out_dir, create_out_dir

    from lmtune import device
    from lmtune.errors import LmtuneError

    dev = device.settle(cfg)
    t0 = time.perf_counter()
    if not 0 <= cfg.mix_retain < 1:
        raise LmtuneError(f"--mix-retain {cfg.mix_retain}: the share of replayed examples must be in [0, 1)")
    check_out_dir(cfg.out, False, cfg.overwrite, files.local_inputs(model=cfg.model,
                                                                    config=getattr(cfg, "_config_file", "")))
    eval_rows = date_records(cfg.eval_examples, seed=cfg.seed + 1)
    train_rows = date_records(cfg.train_examples, seed=cfg.seed, exclude={r["input"] for r in eval_rows})

    print(f"[1/3] scoring {cfg.model} on {len(eval_rows)} held-back examples of the built-in 'dates' task "
          f"(rewrite a date as YYYY-MM-DD), before fine-tuning...", flush=True)
    before, preds_before = _score(cfg.model, eval_rows, dev)
    print(f"      exact match before: {before:.1f}%", flush=True)

    def prepare(folder) -> None:  # run.json marks the folder as an lmtune run (a later demo may replace it)
        write_run_info(folder, "demo", to_dict(cfg), {})
        (folder / "data").mkdir()
        for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
            files.write_text(folder / "data" / name, "".join(json.dumps(r) + "\n" for r in rows))

    out = create_out_dir(cfg.out, False, cfg.overwrite, prepare=prepare)
    data = out / "data"

    print(f"[2/3] LoRA fine-tuning for {cfg.max_steps} steps on {len(train_rows)} generated examples...", flush=True)
    ft = FinetuneConfig(model=cfg.model, data=str(data / "train.jsonl"), out=str(out / "adapter"), lora=True,
                        lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, max_steps=cfg.max_steps,
                        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=5,
                        schedule="cosine", max_length=128, seed=cfg.seed, save_every=cfg.max_steps,
                        mix_retain=cfg.mix_retain, replay_loss=cfg.replay_loss, device=cfg.device)
    finetune(ft)
    kept_before, kept_after, n_general, general, f1_after = _retention(out / "adapter")

    print("[3/3] scoring the fine-tuned model on the same held-back examples...", flush=True)
    after, preds_after = _score(str(out / "adapter"), eval_rows, dev)
    minutes = (time.perf_counter() - t0) / 60
    result = {"task": "dates", "model": cfg.model, "eval_examples": len(eval_rows),
              "exact_match_before": before, "exact_match_after": after, "general_prompts": n_general,
              "general_kept_before": kept_before, "general_kept_after": kept_after, "general_f1_after": f1_after,
              "mix_retain": cfg.mix_retain, "replay_loss": cfg.replay_loss,
              "lora_r": cfg.lora_r, "max_steps": cfg.max_steps, "learning_rate": cfg.learning_rate,
              "minutes": round(minutes, 2), "adapter": str(out / "adapter")}
    files.write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")

    print(f"\n{'input':<34} {'expected':<11} {'before':<22} after")
    for r, b, a in list(zip(eval_rows, preds_before, preds_after))[:6]:
        print(f"{r['input']:<34} {r['output']:<11} {b[:21]:<22} {a[:21]}")
    print(f"\n{'general prompt':<34} {'base model':<22} after")
    for g in general[:4]:
        print(f"{g['prompt'][:33]:<34} {g['base'][:21]:<22} {g['answer'][:40]}")
    print(f"\nexact match on {len(eval_rows)} held-back examples: before {before:.1f}%  ->  after {after:.1f}%"
          f"   ({minutes:.1f} min)")
    print(f"general answers kept (the same as the base model's, on {n_general} built-in prompts the fine-tune "
          f"never saw): before {kept_before}/{n_general}  ->  after {kept_after}/{n_general} "
          f"({100 * kept_after / max(n_general, 1):.0f}%), word overlap with them (F1) {f1_after:.2f}"
          + (f"; {cfg.mix_retain:.0%} of the training examples replayed general prompts" if cfg.mix_retain else
             "; no replay (--mix-retain 0)"))
    print(f"run folder: {out}  (adapter/, adapter/metrics.jsonl, adapter/loss.png, demo.json)")
    print(f"try it:     lmtune generate --model {out / 'adapter'} --prompt \"{eval_rows[0]['instruction']} "
          f"{eval_rows[0]['input']}\"")
    return result
