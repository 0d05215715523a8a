"""`lmtune finetune`: fine-tune a pretrained model, fully or with LoRA, on a task.

Every task (instruct, classify, translate, qa, lm) takes the same path through the functions each module
in lmtune.tasks has: read, load, check, encode, collate, loss, evaluate; and the one training loop,
`train.loop.fit`.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from lmtune import tasks
from lmtune.config import FinetuneConfig
from lmtune.config.options import to_dict


def watched_metric(cfg: FinetuneConfig, task_metrics: tuple) -> tuple[str, str]:
    """(name in metrics.jsonl, 'max' or 'min') of the metric that picks DIR/best and stops early."""
    from lmtune.errors import LmtuneError

    known = ["val_loss"] + [f"val_{m}" for m in task_metrics]
    name = cfg.metric or tasks.get(cfg.task).METRIC
    name = name if name.startswith("val_") else f"val_{name}"
    if name not in known:
        raise LmtuneError(f"--metric {cfg.metric}: --task {cfg.task} reports {', '.join(known)}")
    if cfg.early_stopping_patience and not (cfg.eval_data or cfg.val_split):
        raise LmtuneError("--early-stopping-patience needs validation data: give --eval-data or --val-split")
    mode = cfg.metric_mode
    if mode == "auto":
        mode = "min" if "loss" in name or "perplexity" in name else "max"
    return name, mode


def best_saver(out: Path, tokenizer, meta: dict):
    """save_best for the loop: the model as it was at its best validation, in DIR/best."""
    from lmtune import models

    def save_best(model, step: int, metrics: dict) -> None:
        best = Path(out) / "best"
        best.mkdir(exist_ok=True)
        models.save_model(model, tokenizer, best, {**meta, "step": step, "metrics": metrics})
    return save_best


def gain_and_loss(out: Path, metric: str, history: list[dict], retain, kl_replay: bool = False) -> str:
    """What the run gained on its task (the watched metric from step 0, else the training loss from its
    first step) beside what it lost elsewhere (retention), for the end-of-run line. With KL replay the
    training loss also sums a KL term that starts at 0, so the line says so (it is not the task's gain)."""
    import json

    if metric in history[0] and metric in history[-1]:
        gain = f"{metric} {history[0][metric]:.4f} -> {history[-1][metric]:.4f}"
    else:
        losses = [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
        what = "training loss (task + replay KL)" if kl_replay else "training loss"
        gain = f"{what} {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    return "; ".join(p for p in (gain, retain.summary()) if p)


def finetune(cfg: FinetuneConfig, *, on_validation=None) -> Path:
    """Check the inputs, load the model, encode the data, train, save the model into `cfg.out`.

    Every task takes the same steps through the functions each module in lmtune.tasks has (read, load,
    check, encode, collate, loss, evaluate). `on_validation(step, metrics)` goes to the loop
    (`lmtune sweep` reports and prunes through it).
    """
    from lmtune.train import budget

    started = budget.run_start()  # a --budget counts from here: loading and encoding are part of the run
    import torch

    from lmtune import files, lora, models, retention
    from lmtune.data.columns import EncodedColumns, pack
    from lmtune.errors import LmtuneError
    from lmtune.track import plot_loss, write_run_info
    from lmtune.train import distributed
    from lmtune.train.checkpoint import check_out_dir, create_out_dir, discard_if_failed_early
    from lmtune.train.loop import fit, mean_loss
    from lmtune.train.memory import save_activation_memory

    from lmtune import device

    task = tasks.get(cfg.task)
    distributed.setup(cfg.distributed)
    dev = device.settle(cfg)  # --device checked and --bf16's default set before anything is read or loaded
    if cfg.quantize == "4bit":
        if not cfg.lora:
            raise LmtuneError("--quantize 4bit trains a LoRA adapter on a frozen 4-bit base: add --lora")
        lora.check_4bit(dev)
    inputs = files.local_inputs(data=cfg.data, eval_data=cfg.eval_data, model=cfg.model,
                                config=getattr(cfg, "_config_file", ""))
    check_out_dir(cfg.out, cfg.resume, cfg.overwrite, inputs, settings=to_dict(cfg))
    seconds = budget.check(cfg)
    metric, mode = watched_metric(cfg, task.METRICS)
    retention.check_options(cfg)
    retain_file = retention.retain_path(cfg.retain_data, cfg.task)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = task.read(cfg.data, cfg)
    eval_rows = task.read(cfg.eval_data, cfg) if cfg.eval_data else []
    if not eval_rows and cfg.val_split:  # the end of the data, as pretraining holds back the end of the text
        n_val = max(1, int(len(rows) * cfg.val_split))
        rows, eval_rows = rows[:-n_val], rows[-n_val:]
    model, tokenizer, meta = task.load(cfg.model, cfg, train_rows=rows)
    task.check(eval_rows, meta, cfg.eval_data or cfg.data, cfg)
    if not cfg.lora and hasattr(task, "add_reference"):  # dpo: the model as loaded is the reference, scored once
        task.add_reference(model, tokenizer, rows, cfg, meta, cfg.data)
        task.add_reference(model, tokenizer, eval_rows, cfg, meta, cfg.eval_data or cfg.data)
    # training examples as memory-mapped columns, encoded a chunk of rows at a time (data/columns.py)
    examples = EncodedColumns.encode(lambda chunk: task.encode(chunk, tokenizer, cfg, meta, cfg.data), rows)
    eval_examples = task.encode(eval_rows, tokenizer, cfg, meta, cfg.eval_data or cfg.data) if eval_rows else []
    models.check_max_length(model, itertools.chain((examples[i] for i in range(len(examples))), eval_examples),
                            cfg.max_length, cfg.model)
    if retain_file and meta["head"] != "causal":
        raise LmtuneError(f"--retain-data {cfg.retain_data}: retention is scored on causal LMs; --task {cfg.task} "
                          f"with {cfg.model} is not one (give --retain-data none)")
    retain = retention.RetainSet(retain_file, tokenizer, cfg.max_length, cfg.batch_size) if retain_file else None
    if retain and not retain.fits(model):  # the built-in prompts may be longer than a small model can see
        if cfg.retain_data != "auto":
            raise LmtuneError(f"--retain-data {cfg.retain_data}: a prompt and its answer do not fit the "
                              f"{model.config.max_position_embeddings} positions of {cfg.model}; shorten the prompts")
        print(f"note: retention is not scored: the built-in general prompts do not fit the "
              f"{model.config.max_position_embeddings} positions of {cfg.model}", file=sys.stderr)
        retain = None
    if cfg.pack:
        if (meta["head"], meta["kind"]) != ("causal", "decoder"):
            raise LmtuneError(f"--pack works for causal LMs; --task {cfg.task} with {cfg.model} is not one")
        n_rows, examples = len(examples), pack(examples, cfg.max_length)

    torch.manual_seed(cfg.seed)
    if cfg.lora:
        model = lora.attach_task_lora(model, meta["head"], cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                      cfg.lora_targets)
    save_activation_memory(model, cfg)
    total, trainable = models.count_parameters(model)

    meta = {"base_model": cfg.model, **meta, "lora": cfg.lora,
            **({"quantize": cfg.quantize} if cfg.quantize != "none" else {})}
    coll = task.collate(tokenizer, meta)

    history = []  # every validation's metrics; with a retain set the first is the base model's (step 0)

    def evaluate(m) -> dict:  # validation loss and the task's own metrics (numbers only), retention
        metrics = {}
        if eval_rows:
            result = task.evaluate(m, tokenizer, eval_rows, cfg, meta) if task.METRICS else {}
            # a task whose evaluation pass also gives the loss (classify) saves a second pass over the rows
            loss = result["loss"] if "loss" in result else mean_loss(m, eval_examples, coll, task.loss, cfg.batch_size)
            metrics = {"val_loss": float(loss), **{f"val_{k}": float(result[k]) for k in task.METRICS}}
        if retain:
            metrics.update({k: float(v) for k, v in retain.score(m).items()})
        history.append(metrics)
        return metrics

    validates = bool(eval_rows or retain)
    # --budget: step and validation times measured, and a budget too short refused, before --out is touched
    plan = budget.plan_for(cfg, seconds, started, model, examples, coll, task.loss,
                           evaluate if validates else None) if seconds else None

    out = create_out_dir(cfg.out, cfg.resume, cfg.overwrite, prepare=lambda d: write_run_info(
        d, "finetune", to_dict(cfg), {"parameters": total, "trainable_parameters": trainable}))
    if distributed.world().is_main:
        packed = f" packed into {len(examples)} blocks of {cfg.max_length}" if cfg.pack else ""
        print(f"model {cfg.model} ({meta['kind']}, --task {cfg.task}): {total / 1e6:.1f}M parameters, "
              f"{trainable / 1e6:.2f}M trainable; {n_rows if cfg.pack else len(examples)} training examples"
              f"{packed} from {len(rows)} rows, {len(eval_rows)} validation rows", file=sys.stderr)
    with discard_if_failed_early(out, cfg.resume):
        if retain:
            retain.out = out
        kl_replay = bool(cfg.mix_retain) and cfg.replay_loss == "kl"
        if cfg.mix_retain:  # replay: general prompts with the base model's answers, before any training
            replay = retention.replay_examples(cfg.replay_data, model, tokenizer, cfg.max_length, cfg.batch_size,
                                               out, cfg.resume, mark=kl_replay)
            n_task, examples = len(examples), retention.mix(examples, replay, cfg.mix_retain)
            if distributed.world().is_main:
                print(f"replay: {len(examples) - n_task} of {len(examples)} training examples ({cfg.mix_retain:.0%}) "
                      f"are {len(replay)} general prompts answered by the base model", file=sys.stderr)
        loss_fn = retention.distilling(task.loss) if kl_replay else task.loss
        last = fit(model, examples, cfg, out, collate=coll, loss_fn=loss_fn, evaluate=evaluate if validates else None,
                   resume_command="lmtune " + " ".join(a for a in sys.argv[1:] if a != "--resume"),
                   metric=metric, mode=mode, patience=cfg.early_stopping_patience,
                   save_best=best_saver(out, tokenizer, meta) if eval_rows else None, on_validation=on_validation,
                   plan=plan, evaluate_first=bool(retain))
        models.save_model(model, tokenizer, out, meta)
    plot_loss(out)
    if distributed.world().is_main:
        print(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}; "
              + (f"{gain_and_loss(out, metric, history, retain, kl_replay)}; " if retain and retain.history else "")
              + f"model in {out}" + (f", best ({metric}) in {out / 'best'}" if eval_rows else ""), file=sys.stderr)
    return out
