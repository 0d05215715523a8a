"""Typed configuration: dataclasses whose field docs are the `--help` text and the YAML reference.

Every training verb takes `--config FILE.yaml`; every key can also be given on the command line
(`--learning-rate 1e-4` or `learning_rate=1e-4`), which wins over the file. Loading checks each key's
name, type and range and raises `LmtuneError` with one line (and a close-match suggestion for a
misspelt key). This module imports nothing heavy: `lmtune --help` must stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import LmtuneError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, required: bool = False):
    """A config field: its default, its documentation, and the values it accepts."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "required": required}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# The configs. Training verbs share TrainConfig's fields (data only: no behaviour is inherited).

@dataclass
class TrainConfig:
    """Settings of the training loop, shared by `pretrain` and `finetune`."""

    data: str = opt("", "Training data file (see README for formats).", required=True)
    out: str = opt("", "Output folder: model, checkpoints/, metrics.jsonl, run.json.", required=True)
    resume: bool = opt(False, "Continue from the latest checkpoint in --out.")
    overwrite: bool = opt(False, "Delete whatever --out holds and start afresh.")
    max_length: int = opt(512, "Context length in tokens; longer records are truncated (counted once).", min=8)
    batch_size: int = opt(8, "Sequences per micro-batch.", min=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step (loss normalised by target tokens).", min=1)
    max_steps: int = opt(0, "Optimizer steps to take; 0 means use --epochs.", min=0)
    epochs: float = opt(1.0, "Passes over the training data when --max-steps is 0.", min=0.0)
    optimizer: str = opt("adamw", "Optimizer.", choices=("sgd", "adam", "adamw", "rmsprop"))
    learning_rate: float = opt(3e-4, "Peak learning rate.", min=0.0)
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", min=0.0)
    momentum: float = opt(0.9, "Momentum for sgd and rmsprop.", min=0.0, max=1.0)
    schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to --learning-rate.", min=0)
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value; 0 turns clipping off.", min=0.0)
    seed: int = opt(0, "Seed for initialisation, data order and dropout.")
    bf16: bool = opt(False, "Run forward and backward under bf16 autocast.")
    val_split: float = opt(0.0, "Fraction of the training data held back for validation.", min=0.0, max=0.5)
    eval_every: int = opt(0, "Validate every N steps (0: only at the end, when there is validation data).", min=0)
    save_every: int = opt(100, "Write a checkpoint every N steps (and always at the end).", min=1)
    keep_checkpoints: int = opt(2, "How many of the latest checkpoints to keep.", min=1)
    log_every: int = opt(1, "Write a metrics.jsonl line every N steps.", min=1)
    threads: int = opt(0, "CPU threads for torch; 0 keeps torch's default.", min=0)


@dataclass
class FinetuneConfig(TrainConfig):
    """`lmtune finetune`: fine-tune a pretrained causal LM on instruction or prompt/completion data."""

    model: str = opt("smollm2-135m", "Model: alias, local folder, .gguf file or hub id.")
    task: str = opt("instruct", "Task type.", choices=("instruct",))
    eval_data: str = opt("", "Validation data file (same format as --data).")
    learning_rate: float = opt(2e-4, "Peak learning rate.", min=0.0)
    max_length: int = opt(512, "Context length in tokens; longer records are truncated (counted once).", min=8)
    lora: bool = opt(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling = alpha / r).", min=0.0)
    lora_dropout: float = opt(0.05, "LoRA dropout.", min=0.0, max=1.0)
    lora_targets: str = opt("all-linear", "Modules to adapt: 'all-linear' or comma-separated names (q_proj,v_proj).")


@dataclass
class PretrainConfig(TrainConfig):
    """`lmtune pretrain`: train a tokenizer and a GPT-style causal LM from scratch on raw text."""

    model_size: str = opt("1m", "Size preset of the model.", choices=("1m", "10m", "30m"))
    model_config: str = opt("", "JSON file with an explicit transformers LlamaConfig (overrides --model-size).")
    tokenizer: str = opt("bpe", "'bpe' (train byte-level BPE), 'char', or a path to an existing tokenizer.")
    vocab_size: int = opt(4096, "Vocabulary size when training a BPE tokenizer.", min=260)
    max_length: int = opt(256, "Block length in tokens.", min=8)
    learning_rate: float = opt(1e-3, "Peak learning rate.", min=0.0)
    val_split: float = opt(0.1, "Fraction of the text (its end) held back for validation.", min=0.0, max=0.5)
    warmup_steps: int = opt(20, "Steps of linear warmup from 0 to --learning-rate.", min=0)
    weight_decay: float = opt(0.1, "Weight decay (decoupled for adamw).", min=0.0)


@dataclass
class GenerateConfig:
    """`lmtune generate`: continue a prompt with a trained model."""

    model: str = opt("smollm2-135m", "Model: alias, folder (full model or LoRA adapter), .gguf file or hub id.")
    prompt: str = opt("", "The prompt.", required=True)
    max_new_tokens: int = opt(64, "Most tokens to generate.", min=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.", min=0.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0: all).", min=0)
    top_p: float = opt(1.0, "Nucleus sampling probability mass.", min=0.0, max=1.0)
    template: str = opt("auto", "Prompt format: 'auto' (chat template if the tokenizer has one), 'chat' or 'raw'.",
                        choices=("auto", "chat", "raw"))
    seed: int = opt(0, "Seed for sampling.")
    bf16: bool = opt(False, "Generate in bf16.")


@dataclass
class DemoConfig:
    """`lmtune demo`: measure SmolLM2-135M on a built-in date task, fine-tune it with LoRA, measure again."""

    model: str = opt("smollm2-135m", "Model to fine-tune.")
    out: str = opt("runs/demo", "Run folder (adapter, metrics.jsonl, loss curve).")
    train_examples: int = opt(512, "Generated training examples.", min=8)
    eval_examples: int = opt(60, "Held-back examples scored before and after.", min=4)
    max_steps: int = opt(80, "LoRA optimizer steps.", min=1)
    batch_size: int = opt(8, "Sequences per step.", min=1)
    learning_rate: float = opt(2e-3, "Peak learning rate.", min=0.0)
    seed: int = opt(0, "Seed for data generation and training.")
    overwrite: bool = opt(True, "Replace an earlier demo run in --out.")


# ----------------------------------------------------------------------------------------------
# Loading and checking.

def fields_of(cls) -> dict[str, dataclasses.Field]:
    """The config's fields by name; a later (subclass) definition of a name wins."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_of(cls, name: str) -> type:
    hints = typing.get_type_hints(cls)
    return hints[name]


def coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check (and for command-line strings, convert) one value; raise a one-line error if it is wrong."""
    fields = fields_of(cls)
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
        raise LmtuneError(f"{where}: unknown key '{key}'{hint}")
    f, typ = fields[key], _type_of(cls, key)
    if isinstance(value, str) and typ is not str:
        value = _parse_string(value, typ, key, where)
    ok = (typ is bool and isinstance(value, bool)) or \
         (typ is int and isinstance(value, int) and not isinstance(value, bool)) or \
         (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
         (typ is str and isinstance(value, str))
    if not ok:
        raise LmtuneError(f"{where}: key '{key}' must be {typ.__name__}, got {value!r}")
    if typ is float:
        value = float(value)
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise LmtuneError(f"{where}: key '{key}' must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise LmtuneError(f"{where}: key '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise LmtuneError(f"{where}: key '{key}' must be <= {meta['max']}, got {value!r}")
    return value


def _parse_string(text: str, typ: type, key: str, where: str) -> Any:
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise LmtuneError(f"{where}: key '{key}' must be {typ.__name__}, got {text!r}") from None


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LmtuneError(f"config file {path} not found: check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f":{line + 1}" if line is not None else ""
        raise LmtuneError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LmtuneError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def build(cls, file_values: dict, file_name: str, cli_values: dict):
    """Defaults, then the YAML file, then the command line; every value checked."""
    values = {}
    for key, value in file_values.items():
        values[key] = coerce(cls, key.replace("-", "_"), value, file_name)
    for key, value in cli_values.items():
        values[key] = coerce(cls, key, value, "command line")
    missing = [k for k, f in fields_of(cls).items() if f.metadata.get("required") and not values.get(k)]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')} ..." for k in missing)
        raise LmtuneError(f"missing required setting {', '.join(missing)}: give {flags} (or put it in --config)")
    return cls(**{k.replace("-", "_"): v for k, v in values.items()})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
