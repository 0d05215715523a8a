"""`lmtune estimate`: predicted peak memory and time of a finetune/pretrain run, before training anything.

Memory is counted from the model's shapes (built on the meta device from its config, so a 1B model
costs no memory): weights, gradients and optimizer states of the trainable parameters, and the
activations a decoder layer saves for backward per token. Time is the step's matrix-multiply work
(forward 2 flops per weight per token, backward twice that, less for frozen weights under LoRA) divided
by this machine's measured matmul speed, plus the memory traffic of the rest. The machine is measured
once (matmul speed, memory bandwidth, the process's baseline memory) and cached under ~/.cache/lmtune.
`--check` runs a few real steps through the training loop and prints predicted against measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lmtune.config import EstimateConfig
from lmtune.errors import LmtuneError

MB = 2**20


@dataclass
class Shape:
    """What the predictions need to know of a model, counted from its meta-device build."""

    params: int            # all parameters (with a LoRA adapter when --lora)
    trainable: int
    matmul_params: int     # weights applied once per token (2-D weights outside embeddings and the LM head)
    frozen_matmul: int     # of those, frozen (LoRA): no weight gradient to compute
    layers: int
    heads: int
    hidden: int
    kv: int                # width of keys/values (smaller than hidden with grouped-query attention)
    intermediate: int
    vocab: int
    head_trainable: bool   # the output layer (often tied to the embedding) gets gradients


# ----------------------------------------------------------------------------------------------
# Counting the model.

def model_shape(run) -> Shape:
    """Build the run's model on the meta device and count it; says what it could not count."""
    import torch

    from lmtune import models

    model = _meta_model(run)
    cfg = model.config
    missing = [k for k in ("num_hidden_layers", "hidden_size") if getattr(cfg, k, None) is None]
    if missing:
        raise LmtuneError(f"estimate: could not count the layers of model {getattr(run, 'model', run)} "
                          f"({cfg.model_type}): its config has no {', '.join(missing)}")
    if getattr(run, "lora", False):
        head = {"instruct": "causal", "lm": "causal", "classify": "seq_cls"}.get(getattr(run, "task", "lm"), "causal")
        model = models.attach_task_lora(model, head, run.lora_r, run.lora_alpha, run.lora_dropout,
                                        run.lora_targets) if head != "causal" else \
            models.attach_lora(model, run.lora_r, run.lora_alpha, run.lora_dropout, run.lora_targets)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in (out_emb.parameters() if out_emb is not None else [])}
    mats = [p for p in model.parameters() if p.dim() == 2 and id(p) not in skip]
    total, trainable = models.count_parameters(model)
    heads = cfg.num_attention_heads
    kv = cfg.hidden_size * getattr(cfg, "num_key_value_heads", heads) // heads
    return Shape(params=total, trainable=trainable, matmul_params=sum(p.numel() for p in mats),
                 frozen_matmul=sum(p.numel() for p in mats if not p.requires_grad), layers=cfg.num_hidden_layers, heads=heads,
                 hidden=cfg.hidden_size, kv=kv, intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                 vocab=cfg.vocab_size,
                 head_trainable=out_emb is not None and any(p.requires_grad for p in out_emb.parameters()))


def _meta_model(run):
    """The run's model with no weights in memory: from a preset (pretrain) or the model's config."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmtune import models

    transformers.logging.set_verbosity_error()
    if not hasattr(run, "model"):  # pretrain: the preset, with the vocabulary its tokenizer will have
        tok = _pretrain_tokenizer(run)
        with torch.device("meta"):
            return models.build_from_preset(run.model_size, tok, run.max_length, run.model_config)
    path = models.resolve(run.model)
    if (Path(path) / "adapter_config.json").is_file():
        path = models._adapter_base(path)
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
    from lmtune.data.readers import read_text
    from lmtune.pretrain import load_tokenizer_path

    if run.tokenizer == "char":
        return _CharVocab(len(set(read_text(run.data))) + 1)
    if run.tokenizer == "bpe":
        return _CharVocab(run.vocab_size)
    return load_tokenizer_path(run.tokenizer)


# ----------------------------------------------------------------------------------------------
# The batches: how many tokens (padded) and targets each step computes.

def batch_sizes(run) -> list[tuple[int, int, int]]:
    """(rows, padded length, targets) of every micro-batch of the run, in the loop's order."""
    from lmtune.train.loop import micro_batch, total_steps

    lengths = _example_lengths(run)
    steps = total_steps(run, len(lengths))
    out = []
    for i in range(steps * run.grad_accum):
        idx = micro_batch(len(lengths), run.batch_size, run.seed, i)
        out.append((len(idx), max(lengths[j][0] for j in idx), sum(lengths[j][1] for j in idx)))
    return out


def _example_lengths(run) -> list[tuple[int, int]]:
    """(tokens, targets) per training example, from the data encoded as the run will encode it."""
    from lmtune import models

    if not hasattr(run, "model"):  # pretrain: full blocks
        from lmtune.data.readers import read_text

        n = max(1, len(read_text(run.data)) // (run.max_length * 3))  # ~3 characters a token; only for the count
        return [(run.max_length, run.max_length - 1)] * n
    path = models.resolve(run.model)
    adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file()
    tok = models.load_tokenizer(models._adapter_base(path) if adapter else path)
    if run.task == "instruct":
        from lmtune.data.readers import read_records
        from lmtune.tasks import instruct

        examples = instruct.encode_all(read_records(run.data), tok, run.max_length, run.data)
        return [(len(e["input_ids"]), sum(t != -100 for t in e["labels"][1:])) for e in examples]
    import importlib

    task = importlib.import_module(f"lmtune.tasks.{run.task}")
    rows = task.read(run.data, run)
    if run.task == "classify":
        meta = {"labels": task.label_set(rows, run.label_column)}
        return [(len(e["input_ids"]), 1) for e in task.encode(rows, tok, run, meta, run.data)]
    return [(run.max_length, run.max_length - 1)] * len(rows)  # lm and the rest: full blocks (an upper bound)


# ----------------------------------------------------------------------------------------------
# The machine: matmul speed at the model's shapes, memory bandwidth, baseline memory (cached).

def machine(shape: Shape, tokens: int, bf16: bool) -> dict:
    """{'gflops', 'gbps', 'base_mb'} for this machine and thread count, measured once and cached."""
    import torch

    from lmtune.models import cache_dir
    from lmtune.track import hardware

    path = cache_dir() / "machine.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    host = f"{hardware()['cpu']}|{torch.get_num_threads()} threads|torch {torch.__version__}"
    t = 2 ** round(math.log2(max(tokens, 64)))  # nearby shapes run at the same speed: fewer benchmarks
    key = f"matmul {t}x{shape.hidden}x{shape.intermediate} {'bf16' if bf16 else 'fp32'}"
    entry = cache.setdefault(host, {})
    if key not in entry:
        entry[key] = _matmul_gflops(t, shape.hidden, shape.intermediate, torch.bfloat16 if bf16 else torch.float32)
    if "gbps" not in entry:
        entry["gbps"] = _bandwidth_gbps()
    if "base_mb" not in entry:
        entry["base_mb"] = _baseline_mb()  # [resident, peak]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=1))
    return {"gflops": entry[key], "gbps": entry["gbps"], "base_mb": entry["base_mb"]}


def _best_time(fn, min_s: float = 0.3) -> float:
    fn()  # warm-up (thread pool, caches)
    best, spent = float("inf"), 0.0
    while spent < min_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def _matmul_gflops(t: int, h: int, i: int, dtype) -> float:
    """Speed of a decoder layer's MLP matmuls, (t x h) @ (h x i) and back, the bulk of a step's work."""
    import torch

    x, w1, w2 = torch.randn(t, h, dtype=dtype), torch.randn(h, i, dtype=dtype), torch.randn(i, h, dtype=dtype)
    return 4 * t * h * i / _best_time(lambda: (x @ w1) @ w2) / 1e9


def _bandwidth_gbps() -> float:
    """Memory traffic of an element-wise op on 64 MB tensors (two reads, one write)."""
    import torch

    a, b = torch.randn(16 * MB // 4 * 4), torch.randn(16 * MB // 4 * 4)
    return 3 * a.numel() * 4 / _best_time(lambda: a.add_(b)) / 1e9


def _baseline_mb() -> float:
    """[resident now, peak so far] (MB) of a fresh process that has imported what a training run imports:
    importing passes through a transient peak that a small model's whole run may stay under."""
    code = ("import resource, torch, transformers, peft, lmtune.finetune, lmtune.train.loop\n"
            "try:\n import torch.utils.tensorboard\nexcept ImportError:\n pass\n"
            "now = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(now / 1024, peak / 1024)")  # VmHWM: ru_maxrss would include a forking parent's peak
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return [400.0, 400.0]
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]


# ----------------------------------------------------------------------------------------------
# The predictions.

def predict_memory(s: Shape, run, batches: list[tuple[int, int, int]], lora: bool, ckpt: bool, bf16: bool,
                   base_mb: list[float]) -> dict:
    """Peak resident memory (MB) by part, for the largest micro-batch of `batches`."""
    weights = 4 * s.params
    grads = 4 * s.trainable
    per_param = {"adamw": 8, "adam": 8, "sgd": 4 if run.momentum else 0, "rmsprop": 8 if run.momentum else 4}
    optim = per_param[run.optimizer] * s.trainable
    tokens = max(n * length for n, length, _ in batches)
    targets = max(t for _, _, t in batches)
    # floats a decoder layer saves per token for backward (norm inputs, q/k/v, attention output, MLP
    # gate/up/product); checkpointing keeps only each layer's input and recomputes the rest
    floats = s.hidden if ckpt else 7 * s.hidden + 2 * s.kv + 4 * s.intermediate
    if lora and run.lora_dropout > 0 and not ckpt:  # peft's dropout keeps its own copy of each adapted input
        floats += 7 * s.hidden + s.intermediate
    act_bytes = (2.5 if bf16 else 4) * floats * s.layers * tokens
    if not ckpt:  # with a padding mask, CPU attention materialises scores, softmax and its dropout per head
        act_bytes += 3 * 4 * s.heads * s.layers * max(n * length * length for n, length, _ in batches)
    if ckpt:  # one layer's full activations are alive again while it is recomputed
        act_bytes += 4 * (7 * s.hidden + 2 * s.kv + 4 * s.intermediate) * tokens
    # the loss's chunk of logits (at most 1024 target positions): logits, log-softmax and its gradient
    head = 3 * 4 * min(targets, 1024) * s.vocab
    head_grad = 4 * s.vocab * s.hidden if s.head_trainable else 0
    cast = 2 * s.matmul_params if bf16 else 0  # autocast's bf16 copies of the weights
    # the peak is at the start of backward (activations alive, optimizer state kept from the step before)
    # or at its end (all gradients alive, activations freed), whichever is larger
    train = max(act_bytes + head + head_grad + cast, grads)
    resident, import_peak = base_mb
    parts = {"baseline": resident, "weights": weights / MB, "optimizer": optim / MB,
             "activations": (act_bytes + head) / MB, "gradients": max(grads, head_grad) / MB}
    # the tokenizer (about 1 KB per vocabulary entry for fast tokenizers) and the first steps' one-off
    # allocations (thread pools, autograd engine) come on top of what the imports left resident
    runtime = s.vocab * 1024 + 25 * MB
    parts["peak"] = max(import_peak, resident + (weights + optim + train + runtime) / MB)
    return parts


def predict_time(s: Shape, run, batches: list[tuple[int, int, int]], lora: bool, ckpt: bool, bf16: bool,
                 m: dict) -> dict:
    """Seconds per optimizer step (mean over the run's steps) and for the whole run."""
    tokens = sum(n * length for n, length, _ in batches)
    targets = sum(t for _, _, t in batches)
    attn = sum(n * length * length for n, length, _ in batches) * s.hidden * s.layers * 4  # QK^T, AV, full square
    trained = s.matmul_params - s.frozen_matmul
    # forward 2 flops per weight per token; backward 2 for the input gradient, 2 more for a trained weight
    flops = tokens * (2 * s.matmul_params * (2 if ckpt else 1) + 2 * s.matmul_params + 2 * trained)
    flops += attn * (4 if ckpt else 3)
    flops += targets * 2 * s.vocab * s.hidden * (4 if s.head_trainable else 3)  # head: fwd, recompute, bwd
    compute = flops / (m["gflops"] * 1e9)
    # the rest is memory traffic: activations written and read back a few times, the optimizer's arrays
    floats = 7 * s.hidden + 2 * s.kv + 4 * s.intermediate
    traffic = 4 * floats * s.layers * tokens * 6 + 4 * s.trainable * 12 * len(batches) / run.grad_accum
    steps = len(batches) / run.grad_accum
    # plus a fixed cost per step (collate, clip, logging) and per layer and micro-batch (op dispatch),
    # measured on small models where it dominates
    per_step = (compute + traffic / (m["gbps"] * 1e9)) / steps + 0.02 + 0.005 * s.layers * run.grad_accum
    return {"step_s": per_step, "run_s": per_step * steps, "steps": int(steps), "gflop_per_step": flops / steps / 1e9}


# ----------------------------------------------------------------------------------------------
# The verb.

def estimate(cfg: EstimateConfig) -> dict:
    """Print the predicted peak memory and time of `cfg.run` (and its variants); with --check, measure."""
    import torch

    run = cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    lora = getattr(run, "lora", False)
    # the model is counted first: a model it cannot count fails before the data is read
    runs = [replace(run, lora=v) for v in (False, True)] if hasattr(run, "lora") else [run]
    shapes = [(r, model_shape(r)) for r in runs]
    batches = batch_sizes(run)
    rows = []
    for v_run, shape in shapes:
        v_lora = getattr(v_run, "lora", False)
        for ckpt in (False, True):
            for bf16 in (False, True):
                rows.append(_predict(shape, v_run, batches, v_lora, ckpt, bf16))
    asked = next(r for r in rows if (r["lora"], r["ckpt"], r["bf16"]) == (lora, run.activation_checkpointing, run.bf16))
    asked["asked"] = True
    result = {"model": getattr(run, "model", None) or run.model_size, "steps": asked["steps"], "variants": rows}
    if cfg.check:
        result["check"] = check(cfg, asked)
    print(json.dumps(result) if cfg.json else format_estimate(result))
    return result


def _predict(shape: Shape, run, batches, lora: bool, ckpt: bool, bf16: bool) -> dict:
    tokens = max(n * length for n, length, _ in batches)
    m = machine(shape, tokens, bf16)
    mem = predict_memory(shape, run, batches, lora, ckpt, bf16, m["base_mb"])
    return {"lora": lora, "ckpt": ckpt, "bf16": bf16, "params": shape.params, "trainable": shape.trainable,
            **{f"{k}_mb": round(v, 1) for k, v in mem.items()}, **predict_time(shape, run, batches, lora, ckpt, bf16, m)}


def format_estimate(result: dict) -> str:
    head = (f"{'lora':<5} {'ckpt':<5} {'bf16':<5} {'trainable':>10} {'weights':>8} {'optim':>8} {'activ':>8} "
            f"{'grads':>8} {'base':>6} {'PEAK MB':>8} {'s/step':>7} {'run':>9}")
    lines = [f"model {result['model']}: {result['steps']} steps; predicted (MB, seconds on this machine):", head]
    for r in result["variants"]:
        yn = lambda b: "yes" if b else "no"  # noqa: E731
        lines.append(f"{yn(r['lora']):<5} {yn(r['ckpt']):<5} {yn(r['bf16']):<5} {r['trainable'] / 1e6:>9.2f}M "
                     f"{r['weights_mb']:>8.0f} {r['optimizer_mb']:>8.0f} {r['activations_mb']:>8.0f} "
                     f"{r['gradients_mb']:>8.0f} {r['baseline_mb']:>6.0f} {r['peak_mb']:>8.0f} {r['step_s']:>7.3f} "
                     f"{_duration(r['run_s']):>9}" + ("  <- this run" if r.get("asked") else ""))
    if "check" in result:
        c = result["check"]
        lines.append(f"check ({c['steps']} real steps): peak memory predicted {c['predicted_mb']:.0f} MB, measured "
                     f"{c['measured_mb']:.0f} MB ({c['memory_error']:+.0%}); step time predicted "
                     f"{c['predicted_s']:.3f} s, measured {c['measured_s']:.3f} s ({c['time_error']:+.0%})")
    return "\n".join(lines)


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else (f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h")


def check(cfg: EstimateConfig, asked: dict) -> dict:
    """Run `check_steps` real steps of the run (a fresh process, so its peak memory is the run's own) and
    compare with the prediction for those same steps."""
    run = cfg.run
    with tempfile.TemporaryDirectory(prefix="lmtune-estimate-") as tmp:
        short = replace(run, out=str(Path(tmp) / "run"), max_steps=cfg.check_steps, overwrite=True, resume=False, eval_every=0,
                        save_every=10**6, val_split=0.0, **({"eval_data": ""} if hasattr(run, "eval_data") else {}))
        spec = Path(tmp) / "run.yaml"
        import yaml

        from lmtune.config import to_dict
        spec.write_text(yaml.safe_dump({k: v for k, v in to_dict(short).items()}))
        proc = subprocess.run([sys.executable, "-m", "lmtune", cfg.verb, "--config", str(spec), "--overwrite"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise LmtuneError(f"estimate --check: the {cfg.verb} run failed: "
                              f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        from lmtune.track import read_metrics

        steps = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r]
    measured_mb = max(r["peak_mem_mb"] for r in steps)
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]  # the first step is warm-up
    measured_s = sorted(times)[len(times) // 2]
    shape = model_shape(run)
    batches = batch_sizes(short)
    m = machine(shape, max(n * length for n, length, _ in batches), run.bf16)
    lora = getattr(run, "lora", False)
    mem = predict_memory(shape, run, batches, lora, run.activation_checkpointing, run.bf16, m["base_mb"])
    pt = predict_time(shape, run, batches[run.grad_accum:], lora, run.activation_checkpointing, run.bf16, m)
    return {"steps": len(steps), "predicted_mb": mem["peak"], "measured_mb": measured_mb,
            "memory_error": mem["peak"] / measured_mb - 1, "predicted_s": pt["step_s"], "measured_s": measured_s,
            "time_error": pt["step_s"] / measured_s - 1}
