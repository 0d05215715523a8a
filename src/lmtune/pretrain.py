"""`lmtune pretrain`: train a tokenizer and a GPT-style causal LM from scratch on raw text.

The output folder is a standard Hugging Face folder (safetensors weights, config, tokenizer) that
`AutoModelForCausalLM` and `AutoTokenizer` load with no lmtune code.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from lmtune.config import PretrainConfig
from lmtune.config.options import to_dict
from lmtune.data.tokenizer import load_tokenizer_path
from lmtune.errors import LmtuneError

SHARD_MB = 16.0  # MB of text per shard of the prepare cache


def tokenizer_file(cfg: PretrainConfig) -> str:
    """--tokenizer when it names a file or folder, an input of the run ('' for bpe and char, trained here)."""
    return cfg.tokenizer if cfg.tokenizer not in ("bpe", "char") else ""


def prepared_data(cfg: PretrainConfig):
    """(folder, manifest, tokenizer) of the token shards to train on: --data itself when it is a prepared
    folder, else raw text prepared once into the lmtune cache (rank 0 tokenizes, the others wait)."""
    from lmtune.data import shards, sources
    from lmtune.prepare import cache_folder, make_tokenizer, prepare_corpus
    from lmtune.train import distributed

    saved = Path(cfg.out) / "tokenizer"  # the tokenizer is part of the run: --resume reuses the saved one
    if shards.read_manifest(Path(cfg.data)) is not None:
        folder = Path(cfg.data)
        spec = str(saved) if cfg.resume else cfg.tokenizer if cfg.tokenizer not in ("bpe", "char") \
            else str(folder / "tokenizer")
        tokenizer = load_tokenizer_path(spec)
        return folder, shards.load(folder, tokenizer), tokenizer
    inputs = sources.expand(cfg.data)
    tokenizer = load_tokenizer_path(str(saved)) if cfg.resume else \
        make_tokenizer(cfg.tokenizer, inputs, cfg.text_column, cfg.val_split, cfg.vocab_size, cfg.tokenizer_sample_mb)
    folder = cache_folder(inputs, tokenizer, cfg.text_column, cfg.val_split, SHARD_MB)
    if distributed.world().is_main:
        if shards.read_manifest(folder) is None or not shards.read_manifest(folder).get("complete"):
            print(f"preparing {cfg.data} into {folder}", file=sys.stderr)
        prepare_corpus(inputs, tokenizer, folder, text_column=cfg.text_column, val_split=cfg.val_split,
                       workers=cfg.workers, shard_mb=SHARD_MB)
    distributed.barrier()
    return folder, shards.load(folder, tokenizer), tokenizer


def pretrain(cfg: PretrainConfig, *, on_validation=None) -> Path:
    """Tokenizer, model from a preset, train/validation split, the training loop, a Hugging Face folder.
    `on_validation(step, metrics)` goes to the loop (a sweep reports each validation to Optuna through it)."""
    from lmtune.train import budget

    started = budget.run_start()  # a --budget counts from here
    import torch

    from lmtune import files, models
    from lmtune.data.batching import collate
    from lmtune.data.shards import TokenBlocks
    from lmtune.tasks import lm as task
    from lmtune.track import plot_loss, write_run_info
    from lmtune.train import distributed
    from lmtune.train.checkpoint import check_out_dir, create_out_dir, discard_if_failed_early
    from lmtune.train.loop import fit, mean_loss
    from lmtune.train.memory import save_activation_memory

    from lmtune import device

    distributed.setup(cfg.distributed)
    device.settle(cfg)  # --device checked and --bf16's default set before anything is read or built
    inputs = files.local_inputs(data=cfg.data, tokenizer=tokenizer_file(cfg), model_config=cfg.model_config,
                                config=getattr(cfg, "_config_file", ""))
    check_out_dir(cfg.out, cfg.resume, cfg.overwrite, inputs, settings=to_dict(cfg))
    seconds = budget.check(cfg)
    if cfg.model_config:  # a damaged or invalid architecture file is one line before any data is prepared
        models.check_model_config(cfg.model_config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_dir, manifest, tokenizer = prepared_data(cfg)
    examples = TokenBlocks(data_dir, manifest, "train", cfg.max_length)
    val_examples = TokenBlocks(data_dir, manifest, "val", cfg.max_length, cfg.val_max_blocks)
    if not len(examples):
        raise LmtuneError(f"{cfg.data}: too little text for one block of {cfg.max_length} tokens")
    if cfg.val_split and not len(val_examples) and distributed.world().is_main:  # else it trains unvalidated
        print(f"note: no validation: the documents --val-split {cfg.val_split:g} holds back (a document ends at a "
              f"blank line) make less than one block of {cfg.max_length} tokens; give more text, a larger "
              "--val-split or a smaller --max-length", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    model = models.build_from_preset(cfg.model_size, tokenizer, cfg.max_length, cfg.model_config)
    total, _ = models.count_parameters(model)
    n_tokens = examples.total
    save_activation_memory(model, cfg)

    coll = partial(collate, pad_id=tokenizer.pad_token_id)
    evaluate = (lambda m: {"val_loss": mean_loss(m, val_examples, coll, task.loss, cfg.batch_size)}) \
        if len(val_examples) else None
    # --budget: step and validation times measured, and a budget too short refused, before --out is touched
    plan = budget.plan_for(cfg, seconds, started, model, examples, coll, task.loss, evaluate) if seconds else None

    def prepare(folder: Path) -> None:  # the run's first files, before it is moved into place
        if not cfg.resume:
            tokenizer.save_pretrained(folder / "tokenizer")
        write_run_info(folder, "pretrain", to_dict(cfg), {"parameters": total, "train_tokens": n_tokens})

    out = create_out_dir(cfg.out, cfg.resume, cfg.overwrite, prepare=prepare)
    if distributed.world().is_main:
        print(f"model {cfg.model_config or cfg.model_size}: {total / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; "
              f"{n_tokens} training tokens in {len(examples)} blocks, {len(val_examples)} validation blocks",
              file=sys.stderr)
    with discard_if_failed_early(out, cfg.resume):
        last = fit(model, examples, cfg, out, collate=coll, loss_fn=task.loss, evaluate=evaluate,
                   resume_command="lmtune " + " ".join(a for a in sys.argv[1:] if a != "--resume"), plan=plan,
                   on_validation=on_validation)
        models.save_model(model, tokenizer, out, {"task": "lm", "model_size": cfg.model_size})
    plot_loss(out)
    if distributed.world().is_main:
        print(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"
              + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f"; model in {out}",
              file=sys.stderr)
    return out
