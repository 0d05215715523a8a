"""`lmtune finetune`: fine-tune a pretrained causal LM, fully or with LoRA, on instruction data."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from lmtune.config import FinetuneConfig, to_dict


def finetune(cfg: FinetuneConfig) -> Path:
    """Check the inputs, load the model, encode the data, train, save the model into `cfg.out`."""
    import torch

    from lmtune import models
    from lmtune.data.batching import collate
    from lmtune.data.readers import read_records
    from lmtune.tasks import instruct as task
    from lmtune.track import plot_loss, write_run_info
    from lmtune.train.checkpoint import check_out_dir, create_out_dir
    from lmtune.train.loop import fit, mean_loss

    # Everything the user can get wrong is checked before the output folder is touched.
    check_out_dir(cfg.out, cfg.resume, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = read_records(cfg.data)
    eval_rows = read_records(cfg.eval_data) if cfg.eval_data else []
    model, tokenizer = models.load_causal_lm(cfg.model)
    examples = task.encode_all(rows, tokenizer, cfg.max_length, cfg.data)
    eval_examples = task.encode_all(eval_rows, tokenizer, cfg.max_length, cfg.eval_data) if eval_rows else []
    if not eval_examples and cfg.val_split:
        n_val = max(1, int(len(examples) * cfg.val_split))
        examples, eval_examples = examples[:-n_val], examples[-n_val:]

    torch.manual_seed(cfg.seed)
    if cfg.lora:
        model = models.attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    total, trainable = models.count_parameters(model)
    print(f"model {cfg.model}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; "
          f"{len(examples)} training examples, {len(eval_examples)} validation", file=sys.stderr)

    out = create_out_dir(cfg.out, cfg.resume, cfg.overwrite)
    write_run_info(out, "finetune", to_dict(cfg), {"parameters": total, "trainable_parameters": trainable})
    coll = partial(collate, pad_id=tokenizer.pad_token_id)
    evaluate = (lambda m: {"val_loss": mean_loss(m, eval_examples, coll, task.loss, cfg.batch_size)}) \
        if eval_examples else None
    last = fit(model, examples, cfg, out, collate=coll, loss_fn=task.loss, evaluate=evaluate,
               resume_command="lmtune " + " ".join(a for a in sys.argv[1:] if a != "--resume"))
    models.save_model(model, tokenizer, out, {"base_model": cfg.model, "task": cfg.task, "lora": cfg.lora})
    plot_loss(out)
    print(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}; model in {out}",
          file=sys.stderr)
    return out
