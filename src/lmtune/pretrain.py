"""`lmtune pretrain`: train a tokenizer and a GPT-style causal LM from scratch on raw text.

The output folder is a standard Hugging Face folder (safetensors weights, config, tokenizer) that
`AutoModelForCausalLM` and `AutoTokenizer` load with no lmtune code.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from lmtune.config import PretrainConfig, to_dict
from lmtune.errors import LmtuneError

SPECIAL = "<|endoftext|>"


def train_tokenizer(text: str, kind: str, vocab_size: int):
    """A PreTrainedTokenizerFast: byte-level BPE trained on `text`, characters, or loaded from a path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    elif kind == "char":
        chars = sorted(set(text))
        vocab = {SPECIAL: 0, **{c: i + 1 for i, c in enumerate(chars)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        return load_tokenizer_path(kind)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=SPECIAL)


def load_tokenizer_path(path: str):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    p = Path(path)
    try:
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file() and not (p / "tokenizer.json").is_file():
            tok = GPT2TokenizerFast(vocab_file=str(p / "vocab.json"), merges_file=str(p / "merges.txt"))
        elif p.exists():
            tok = AutoTokenizer.from_pretrained(str(p))
        else:
            raise OSError("not found")
    except (OSError, ValueError) as e:
        raise LmtuneError(f"--tokenizer {path}: not 'bpe', 'char' or a tokenizer folder ({str(e).splitlines()[0]})") \
            from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pretrain(cfg: PretrainConfig) -> Path:
    """Tokenizer, model from a preset, train/validation split, the training loop, a Hugging Face folder."""
    import torch

    from lmtune import models
    from lmtune.data.batching import collate
    from lmtune.data.readers import read_text
    from lmtune.tasks import lm as task
    from lmtune.track import plot_loss, write_run_info
    from lmtune.train import distributed
    from lmtune.train.checkpoint import check_out_dir, create_out_dir
    from lmtune.train.loop import fit, mean_loss

    from lmtune import device

    distributed.setup(cfg.distributed)
    device.settle(cfg)  # --device checked and --bf16's default set before anything is read or built
    check_out_dir(cfg.out, cfg.resume, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    text = read_text(cfg.data)
    train_text, val_text = task.split_text(text, cfg.val_split)
    if cfg.resume:  # the tokenizer is part of the run: reuse the one saved at the start
        tokenizer = load_tokenizer_path(str(Path(cfg.out) / "tokenizer"))
    else:
        tokenizer = train_tokenizer(train_text, cfg.tokenizer, cfg.vocab_size)
    examples = task.encode_text(train_text, tokenizer, cfg.max_length)
    val_examples = task.encode_text(val_text, tokenizer, cfg.max_length) if val_text else []
    if not examples:
        raise LmtuneError(f"{cfg.data}: too little text for one block of {cfg.max_length} tokens")

    torch.manual_seed(cfg.seed)
    model = models.build_from_preset(cfg.model_size, tokenizer, cfg.max_length, cfg.model_config)
    total, _ = models.count_parameters(model)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    models.save_activation_memory(model, cfg)
    if distributed.world().is_main:
        print(f"model {cfg.model_config or cfg.model_size}: {total / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; "
              f"{n_tokens} training tokens in {len(examples)} blocks, {len(val_examples)} validation blocks",
              file=sys.stderr)

    out = create_out_dir(cfg.out, cfg.resume, cfg.overwrite)
    if not cfg.resume and distributed.world().is_main:
        tokenizer.save_pretrained(out / "tokenizer")
    write_run_info(out, "pretrain", to_dict(cfg), {"parameters": total, "train_tokens": n_tokens})
    coll = partial(collate, pad_id=tokenizer.pad_token_id)
    evaluate = (lambda m: {"val_loss": mean_loss(m, val_examples, coll, task.loss, cfg.batch_size)}) \
        if val_examples else None
    last = fit(model, examples, cfg, out, collate=coll, loss_fn=task.loss, evaluate=evaluate,
               resume_command="lmtune " + " ".join(a for a in sys.argv[1:] if a != "--resume"))
    models.save_model(model, tokenizer, out, {"task": "lm", "model_size": cfg.model_size})
    plot_loss(out)
    if distributed.world().is_main:
        print(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"
              + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f"; model in {out}",
              file=sys.stderr)
    return out
