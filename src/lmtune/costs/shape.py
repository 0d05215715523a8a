"""What a run computes, counted without running it: the model's shapes (built on the meta device from its
config, so a 1B model costs no memory) and the (rows, padded length, targets) of every micro-batch, from the
data encoded as the run will encode it and batched in the loop's order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmtune.errors import LmtuneError


@dataclass


class Shape:
    """What the predictions need to know of a model, counted from its meta-device build."""

    params: int            # all parameters (with a LoRA adapter when --lora)
    trainable: int
    tensors: int           # trainable parameter tensors (the optimizer's per-tensor work)
    matmul_params: int     # weights applied once per token (2-D weights outside embeddings and the LM head)
    frozen_matmul: int     # of those, frozen (LoRA): no weight gradient to compute
    layers: int
    heads: int
    head_dim: int
    hidden: int
    kv: int                # width of keys/values (smaller than hidden with grouped-query attention)
    intermediate: int
    vocab: int             # outputs of the LM head (0: no LM head, e.g. a classifier)
    head_trainable: bool   # the output layer (often tied to the embedding) gets gradients
    norm_trainable: bool   # the layers' norm weights get gradients (full fine-tuning)
    # the linear layers of one decoder layer, LoRA's A and B included:
    # (module it belongs to, 'base'|'A'|'B', in, out, weight trained)
    linears: tuple = ()
    lora_dropout: float = 0.0


# ----------------------------------------------------------------------------------------------
# Counting the model.


def model_shape(run, verb: str) -> Shape:
    """Build the model of `run` (the config of `verb`: finetune or pretrain) on the meta device and count it;
    says what it could not count."""
    import torch

    from lmtune import models
    from lmtune.lora import attach_lora, attach_task_lora

    model = _meta_model(run, verb)
    cfg = model.config
    missing = [k for k in ("num_hidden_layers", "hidden_size") if getattr(cfg, k, None) is None]
    if missing:
        raise LmtuneError(f"estimate: could not count the layers of model {getattr(run, 'model', run)} "
                          f"({cfg.model_type}): its config has no {', '.join(missing)}")
    lora = verb == "finetune" and run.lora
    if lora:
        task = run.task if verb == "finetune" else "lm"
        head = {"instruct": "causal", "lm": "causal", "classify": "seq_cls"}.get(task, "causal")
        model = attach_task_lora(model, head, run.lora_r, run.lora_alpha, run.lora_dropout,
                                 run.lora_targets) if head != "causal" else \
            attach_lora(model, run.lora_r, run.lora_alpha, run.lora_dropout, run.lora_targets)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in (out_emb.parameters() if out_emb is not None else [])}
    mats = [p for p in model.parameters() if p.dim() == 2 and id(p) not in skip]
    total, trainable = models.count_parameters(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = head_dim * (getattr(cfg, "num_key_value_heads", None) or heads)
    layer = _first_layer(model, cfg.num_hidden_layers)
    linears = tuple((*_linear_role(name), m.in_features, m.out_features, m.weight.requires_grad)
                    for name, m in (layer.named_modules() if layer is not None else [])
                    if isinstance(m, torch.nn.Linear))
    norms = [p for n, p in (layer.named_parameters() if layer is not None else []) if "norm" in n]
    return Shape(params=total, trainable=trainable, tensors=sum(p.requires_grad for p in model.parameters()),
                 matmul_params=sum(p.numel() for p in mats),
                 frozen_matmul=sum(p.numel() for p in mats if not p.requires_grad), layers=cfg.num_hidden_layers,
                 heads=heads, head_dim=head_dim, hidden=cfg.hidden_size, kv=kv,
                 intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                 vocab=cfg.vocab_size if out_emb is not None else 0,
                 head_trainable=out_emb is not None and any(p.requires_grad for p in out_emb.parameters()),
                 norm_trainable=any(p.requires_grad for p in norms), linears=linears,
                 lora_dropout=run.lora_dropout if lora else 0.0)


def _linear_role(name: str) -> tuple[str, str]:
    """('q_proj', 'base') for q_proj or q_proj.base_layer; ('q_proj', 'A') for q_proj.lora_A.default."""
    parts = name.split(".")
    for kind in ("A", "B"):
        if f"lora_{kind}" in parts:
            return parts[parts.index(f"lora_{kind}") - 1], kind
    return (parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]), "base"


def _first_layer(model, n: int):
    """The first decoder layer: the first module list with one entry per layer."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m[0]
    return None


def _meta_model(run, verb: str):
    """The run's model with no weights in memory: from a preset (pretrain) or the model's config."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmtune import models

    transformers.logging.set_verbosity_error()
    if verb == "pretrain":  # the preset, with the vocabulary its tokenizer will have
        tok = _pretrain_tokenizer(run)
        with torch.device("meta"):
            return models.build_from_preset(run.model_size, tok, run.max_length, run.model_config)
    path = models.resolve(run.model)
    if (Path(path) / "adapter_config.json").is_file():
        path = models.adapter_base(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
        cls = AutoModelForSequenceClassification if run.task == "classify" else AutoModelForCausalLM
        if run.task not in ("instruct", "lm", "classify"):
            raise ValueError(f"estimate covers --task instruct, lm and classify, not {run.task}")
        with torch.device("meta"):
            return cls.from_config(cfg)
    except (OSError, ValueError, KeyError) as e:
        raise LmtuneError(f"estimate: could not count model {run.model}: {str(e).splitlines()[0]}") from None


class _CharVocab:  # stands in for a char tokenizer: build_from_preset only needs its size and ids
    def __init__(self, n):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 0, 0

    def __len__(self):
        return self.n


def _pretrain_tokenizer(run):
    from lmtune.data import shards, sources
    from lmtune.data.tokenizer import load_tokenizer_path

    if shards.read_manifest(Path(run.data)) is not None:  # a prepared folder brings its tokenizer
        return load_tokenizer_path(str(Path(run.data) / "tokenizer"))
    if run.tokenizer == "char":  # the characters of the sample the tokenizer is trained on
        docs = sources.documents(sources.expand(run.data), run.text_column)
        return _CharVocab(len(set(shards.sample_text(docs, run.val_split, run.tokenizer_sample_mb))) + 1)
    if run.tokenizer == "bpe":
        return _CharVocab(run.vocab_size)
    return load_tokenizer_path(run.tokenizer)


# ----------------------------------------------------------------------------------------------
# The batches: how many tokens (padded) and targets each step computes.


def batch_sizes(run, verb: str) -> list[tuple[int, int, int]]:
    """(rows, padded length, targets) of every micro-batch of `run` (the config of `verb`), in the loop's
    order (grouped by length as the loop groups them)."""
    from lmtune.train import loop

    lengths = _example_lengths(run, verb)
    steps = loop.total_steps(run, len(lengths))
    tokens = tuple(n for n, _ in lengths)
    group = None
    if getattr(run, "group_by_length", False) and not getattr(run, "pack", False) and min(tokens) != max(tokens):
        group = tokens
    out = []
    for i in range(steps * run.grad_accum):
        idx = loop.micro_batch(len(lengths), run.batch_size, run.seed, i, *([group] if group else []))
        out.append((len(idx), max(lengths[j][0] for j in idx), sum(lengths[j][1] for j in idx)))
    return out


def _example_lengths(run, verb: str) -> list[tuple[int, int]]:
    """(tokens, targets) per training example, from the data encoded as the run will encode it."""
    from lmtune import models

    if verb == "pretrain":  # full blocks
        from lmtune.data import shards, sources

        m = shards.read_manifest(Path(run.data))
        n = max(1, m["train_tokens"] // run.max_length) if m and m.get("complete") else \
            max(1, sources.total_bytes(sources.expand(run.data)) // (run.max_length * 3))  # ~3 bytes a token
        return [(run.max_length, run.max_length - 1)] * n
    path = models.resolve(run.model)
    adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file()
    tok = models.load_tokenizer(models.adapter_base(path) if adapter else path)
    if run.task == "instruct":
        from lmtune.data.readers import read_records
        from lmtune.tasks import instruct

        examples = instruct.encode_all(read_records(run.data), tok, run.max_length, run.data)
        return [(len(e["input_ids"]), sum(t != -100 for t in e["labels"][1:])) for e in examples]
    from lmtune import tasks

    task = tasks.get(run.task)
    rows = task.read(run.data, run)
    if run.task == "classify":
        meta = {"labels": task.label_set(rows, run.label_column)}
        return [(len(e["input_ids"]), 1) for e in task.encode(rows, tok, run, meta, run.data)]
    return [(run.max_length, run.max_length - 1)] * len(rows)  # lm and the rest: full blocks (an upper bound)
