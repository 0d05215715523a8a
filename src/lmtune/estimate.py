"""`lmtune estimate`: predicted peak memory and time of a finetune/pretrain run, before training anything.

Memory is counted from the model's shapes (built on the meta device from its config, so a 1B model
costs no memory): weights, optimizer states, what each decoder layer saves for backward per token
(counted op by op: norms, SDPA's q/k/v/output, the MLP, trained linears' inputs, LoRA's dropout copies),
the loss's logits as lmtune.train.loss computes them, and the C allocator's fragmentation. Time is a
count of the step's operations times rates measured on this machine: every matmul at its own shape and
layout (forward, input gradient, weight gradient; the LM head over the rows the loss uses), attention
at its shape, element-wise floats, dropout's random numbers, a fixed cost per op, and the optimizer per
parameter. The rates are measured the first time a shape needs them and cached under ~/.cache/lmtune.
`--check` runs a few real steps through the training loop and prints predicted against measured.
"""

from __future__ import annotations

import json
import math
import os
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
    lora = getattr(run, "lora", False)
    if lora:
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
    from lmtune.data import shards, sources
    from lmtune.pretrain import load_tokenizer_path

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

def batch_sizes(run) -> list[tuple[int, int, int]]:
    """(rows, padded length, targets) of every micro-batch of the run, in the loop's order (grouped by
    length as the loop groups them)."""
    import inspect

    from lmtune.train import loop

    lengths = _example_lengths(run)
    steps = loop.total_steps(run, len(lengths))
    tokens = tuple(n for n, _ in lengths)
    group = None
    if getattr(run, "group_by_length", False) and not getattr(run, "pack", False) and min(tokens) != max(tokens) \
            and "lengths" in inspect.signature(loop.micro_batch).parameters:
        group = tokens
    out = []
    for i in range(steps * run.grad_accum):
        idx = loop.micro_batch(len(lengths), run.batch_size, run.seed, i, *([group] if group else []))
        out.append((len(idx), max(lengths[j][0] for j in idx), sum(lengths[j][1] for j in idx)))
    return out


def _example_lengths(run) -> list[tuple[int, int]]:
    """(tokens, targets) per training example, from the data encoded as the run will encode it."""
    from lmtune import models

    if not hasattr(run, "model"):  # pretrain: full blocks
        from lmtune.data import shards, sources

        m = shards.read_manifest(Path(run.data))
        n = max(1, m["train_tokens"] // run.max_length) if m and m.get("complete") else \
            max(1, sources.total_bytes(sources.expand(run.data)) // (run.max_length * 3))  # ~3 bytes a token
        return [(run.max_length, run.max_length - 1)] * n
    path = models.resolve(run.model)
    adapter = (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file()
    tok = models.load_tokenizer(models._adapter_base(path) if adapter else path)
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


def _loss_path(s: Shape, n: int, length: int, targets: int) -> tuple[int, bool]:
    """(rows the LM head runs on, chunked?) as lmtune.train.loss computes the loss of a micro-batch: over
    every position in one piece when the logits are small, else over the target positions in chunks
    that are recomputed in backward."""
    from lmtune.train import loss

    positions = n * (length - 1)
    if positions * s.vocab <= getattr(loss, "SMALL_LOGITS", -1):
        return positions, False
    return targets, True


# ----------------------------------------------------------------------------------------------
# The machine: rates measured once per shape and cached (matmuls at the model's shapes, attention,
# element-wise traffic, dropout's random numbers, the optimizer, one op's fixed cost, baseline memory).

class Machine:
    """Measured rates of this machine (threads, torch version), cached in ~/.cache/lmtune/machine.json.
    A rate is measured the first time a prediction needs it (a few milliseconds to a second each), and
    again after a reboot: a cloud VM keeps its CPU name across hosts whose rates may differ (this machine's
    bf16 matmuls measured 2.5x slower than the rates cached on an earlier day), and a stale rate misleads
    every later estimate."""

    def __init__(self):
        import torch

        from lmtune.models import cache_dir
        from lmtune.track import hardware

        self.path = cache_dir() / "machine.json"
        try:
            self.all = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):  # unreadable or cut short: a cache, so measure again
            self.all = {}
        machine = f"{hardware()['cpu']}|{torch.get_num_threads()} threads|torch {torch.__version__}"
        boot = Path("/proc/sys/kernel/random/boot_id")
        self.host = machine + (f"|boot {boot.read_text().strip()[:8]}" if boot.is_file() else "")
        for key in [k for k in self.all if k != self.host and k.split("|boot")[0] == machine]:
            del self.all[key]  # an earlier boot's rates
        self.entry = self.all.setdefault(self.host, {})
        self.dirty = False

    def _get(self, key: str, measure):
        if key not in self.entry:
            self.entry[key], self.dirty = measure(), True
        return self.entry[key]

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.all, indent=1))
            os.replace(tmp, self.path)  # whole or not at all, also when two estimates save at once
            self.dirty = False

    # seconds of one (m x k) @ (k x n) product as the step computes it: "nt" forward (x @ W^T), "nn" input
    # gradient (dy @ W), "tn" weight gradient (dy^T @ x, k the tokens); m (or k for "tn") is the number
    # of tokens, measured at the nearest power of two and scaled. `cold`: the step's working set is larger
    # than the last-level cache, so the operands come from memory (measured so)
    def gemm(self, m: int, k: int, n: int, layout: str, bf16: bool, cold: bool = True) -> float:
        tokens = k if layout == "tn" else m
        if tokens <= 0:
            return 0.0
        b = 2 ** max(4, round(math.log2(tokens)))
        dims = (m, b, n) if layout == "tn" else (b, k, n)
        key = f"gemm {dims[0]}x{dims[1]}x{dims[2]} {layout} {'bf16' if bf16 else 'fp32'}{'' if cold else ' cached'}"
        return self._get(key, lambda: _time_gemm(*dims, layout, bf16, cold)) * tokens / b

    def sdpa(self, n: int, heads: int, length: int, head_dim: int, masked: bool, bf16: bool) -> list[float]:
        """[forward, backward] seconds of scaled_dot_product_attention at this shape (a padding mask or
        causal), measured at the nearest power-of-two length and scaled by length squared."""
        b = 2 ** max(4, round(math.log2(max(length, 1))))
        key = f"sdpa {n}x{heads}x{b}x{head_dim} {'mask' if masked else 'causal'} {'bf16' if bf16 else 'fp32'}"
        f, bw = self._get(key, lambda: _time_sdpa(n, heads, b, head_dim, masked, bf16))
        return [f * (length / b) ** 2, bw * (length / b) ** 2]

    def rates(self) -> dict:
        """{'elem_s': seconds per float of an element-wise op (read and written, with a fresh output),
        'bernoulli_s': per random number, 'op_s': one small op's fixed cost, 'fresh_s': per float of a
        tensor above the allocator's mmap threshold, written for the first time (page faults)}"""
        return {"elem_s": self._get("elementwise s/float", _time_elementwise),
                "bernoulli_s": self._get("bernoulli s/float", _time_bernoulli),
                "op_s": self._get("op s", _time_op),
                "fresh_s": self._get("fresh page s/float", _time_fresh)}

    def optimizer(self, run) -> list[float]:
        """[seconds per trained parameter, per parameter tensor] of clip + optimizer step + zero_grad."""
        key = f"optimizer {run.optimizer} {'momentum' if getattr(run, 'momentum', 0) else ''}".strip()
        return self._get(key, lambda: _time_optimizer(run))

    def base_mb(self) -> list[float]:
        return self._get("base_mb", _baseline_mb)  # [resident, peak]


def _best_of(fn, reps: int = 3, budget_s: float = 0.5) -> float:
    fn()  # warm-up (thread pool, caches, allocator)
    best, spent, i = float("inf"), 0.0, 0
    while i < reps or (spent < 0.05 and i < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, i = min(best, dt), spent + dt, i + 1
        if spent > budget_s:
            break
    return best


_POOL: dict = {}


def last_level_cache() -> int:
    """Bytes of the CPU's last-level cache (32 MB when the system does not say)."""
    try:
        index = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))[-1]
        size = (index / "size").read_text().strip()
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}.get(size[-1], 1) if size[-1] in "KM" else int(size)
    except (OSError, ValueError, IndexError):
        return 32 * MB


def _operands(shapes, dtype, cold: bool = True):
    """Tensors of these shapes taken from a 384 MB pool at a new place on every call: a step's matmuls
    read weights and activations that are not in the cache (each layer its own, gigabytes in all), so
    the benchmark must not keep reading the same few megabytes from the last-level cache."""
    import torch

    need = sum(math.prod(shape) for shape in shapes)  # a large operand (a wide vocabulary) may not fit the pool
    if (dtype, cold) not in _POOL or _POOL[dtype, cold][0].numel() < need:
        size = 384 * MB if cold else min(64 * MB, last_level_cache() // 4)  # warm: a quarter of the cache
        _POOL[dtype, cold] = [torch.empty(max(size // dtype.itemsize, need), dtype=dtype).uniform_(-1, 1), 0]
    pool, at = _POOL[dtype, cold]
    out = []
    for shape in shapes:
        size = math.prod(shape)
        if at + size > pool.numel():
            at = 0
        out.append(pool[at:at + size].view(shape))
        at += size
    _POOL[dtype, cold][1] = at
    return out


def _time_gemm(m: int, k: int, n: int, layout: str, bf16: bool, cold: bool = True) -> float:
    import torch

    dt = torch.bfloat16 if bf16 else torch.float32
    if layout == "nt":    # x (m, k) @ W^T, W stored (n, k)
        def run():
            a, w = _operands([(m, k), (n, k)], dt, cold)
            return a @ w.t()
    elif layout == "nn":  # dy (m, k) @ W, W stored (k, n)
        def run():
            a, w = _operands([(m, k), (k, n)], dt, cold)
            return a @ w
    else:                 # "tn": dy^T (m, k) @ x (k, n), dy stored (k, m)
        def run():
            g, x = _operands([(k, m), (k, n)], dt, cold)
            return g.t() @ x
    return _median_of(run)


def _median_of(fn, reps: int = 5) -> float:
    """The median of a few runs after a warm-up: a training step runs for seconds, at the machine's
    sustained speed, not at the best of a few lucky milliseconds."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _time_sdpa(n: int, heads: int, length: int, head_dim: int, masked: bool, bf16: bool) -> list[float]:
    import torch
    import torch.nn.functional as F

    dt = torch.bfloat16 if bf16 else torch.float32
    q, k, v = (torch.randn(n, heads, length, head_dim, dtype=dt, requires_grad=True) for _ in range(3))
    mask = None
    if masked:  # as transformers passes a padding mask: additive, one per row
        mask = torch.zeros(n, 1, length, length, dtype=dt)
        mask.masked_fill_(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    grad = torch.randn(n, heads, length, head_dim, dtype=dt)
    fwd = _best_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked))

    def both():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked).backward(grad)
    return [fwd, max(_best_of(both) - fwd, 0.0)]


def _time_elementwise() -> float:
    import torch

    a, b = torch.randn(2 * MB), torch.randn(2 * MB)  # 8 MB each, the size of a layer's activations
    return _best_of(lambda: torch.mul(a, b), reps=10) / (3 * a.numel())


def _time_fresh() -> float:
    import torch

    return _best_of(lambda: torch.empty(16 * MB).fill_(1.0), reps=3) / (16 * MB)


def _time_bernoulli() -> float:
    import torch

    a = torch.empty(2 * MB)
    return _best_of(lambda: a.bernoulli_(0.95), reps=5) / a.numel()


def _time_op() -> float:
    import torch

    a = torch.ones(8, requires_grad=True)
    return _best_of(lambda: [a * 2 for _ in range(100)], reps=5) / 100


def _time_optimizer(run) -> list[float]:
    import torch

    from lmtune.train.optim import build_optimizer

    def cost(sizes):
        ps = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
        grads = [torch.full_like(p, 1e-3) for p in ps]
        opt = build_optimizer(run, ps)

        def step():
            for p, g in zip(ps, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _best_of(step, reps=3)
    big, many = cost([4 * MB]), cost([64] * 200)
    per_tensor = max(many / 200, 0.0)
    return [max(big - per_tensor, 1e-12) / (4 * MB), per_tensor]


def _baseline_mb() -> list[float]:
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

FRAGMENTATION = 0.5  # see predict_memory


def _layer_floats(s: Shape, length: int, lora: bool, bf16: bool, recompute: bool = False,
                  small_below: float = 0.0) -> tuple[float, float, float]:
    """(bytes a decoder layer saves for backward per token, bytes per token of the activations it
    creates in forward and frees again, and of the saved bytes those in tensors narrower than
    `small_below` bytes a token), counted op by op for a Llama-style layer with SDPA attention.
    `recompute`: train.memory rebuilds silu(gate), the MLP product and the norm outputs (under bf16, the
    one bf16 copy the projections share) in backward."""
    h, i, q = s.hidden, s.intermediate, s.heads * s.head_dim
    kv = q if s.kv != q else s.kv  # repeat_kv materialises keys and values at full width for SDPA
    lo = 2 if bf16 else 4          # bytes of what runs in bf16 under autocast (norms stay in fp32)
    saved = small = 0.0

    def keep(width_bytes: float, count: int = 1) -> None:  # `count` saved tensors of this width
        nonlocal saved, small
        saved += count * width_bytes
        small += count * width_bytes if width_bytes < small_below else 0.0

    # each RMSNorm keeps its input and 1/rms (and its normalised output when its weight is trained)
    keep(4 * h, 2 * (2 if s.norm_trainable else 1))
    keep(4, 2)
    # SDPA keeps q, k, v, its output and logsumexp; the additive padding mask (one row per position)
    keep(lo * q, 2), keep(lo * kv, 2), keep(4 * s.heads), keep(4 * length)
    keep(lo * i, 2 if recompute else 3)  # MLP: gate (for silu), silu(gate) and up (for the product)
    rebuilt = {"mlp_mid", "attn_in", "mlp_in"} if recompute else set()
    base = [(t, fin, trained) for t, kind, fin, _, trained in s.linears if kind == "base"]
    inputs = {}                             # distinct inputs of the linears (q/k/v share one, gate/up one)
    for t, fin, trained in base:
        inputs.setdefault(_input_of(t), [fin, False])[1] |= trained
    adapted = [(t, fin, fout) for t, kind, fin, fout, _ in s.linears if kind == "A"]
    for t, fin, _ in adapted:
        inputs.setdefault(_input_of(t), [fin, False])
        if not s.lora_dropout:
            inputs[_input_of(t)][1] = True  # lora_A keeps the (shared) input itself
    # a trained weight needs its input kept (the attention output is kept by SDPA already)
    for name, (fin, kept) in inputs.items():
        if kept and name != "attn_out" and name not in rebuilt:
            keep(lo * fin)
    for _, fin, fout in adapted:
        if s.lora_dropout:  # each adapter's dropout: its own mask and masked copy of the input
            keep(4 * fin), keep(lo * fin)
        keep(lo * fout)  # lora_A's output, kept for lora_B's weight gradient
    # freed again in forward: norm temporaries, q/k before rotary embedding and the rotation's
    # products, the projections' outputs, residual sums; LoRA's B outputs, scaled and added
    temps = 4 * (6 * h) + lo * (4 * q + 4 * s.kv + 2 * h + i)
    temps += sum(lo * 3 * fout for t, kind, _, fout, _ in s.linears if kind == "B")
    return saved, temps, small


def _input_of(target: str) -> str:
    return {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}.get(target, target)


def checkpointed_layers(s: Shape, run, ckpt: bool) -> int:
    """How many layers activation checkpointing recomputes (--checkpoint-share of them), counted as
    models.enable_activation_checkpointing picks them."""
    return int(s.layers * getattr(run, "checkpoint_share", 1.0) + 1e-9) if ckpt else 0


def predict_memory(s: Shape, run, batches: list[tuple[int, int, int]], lora: bool, ckpt: bool, bf16: bool,
                   base_mb: list[float]) -> dict:
    """Peak resident memory (MB) by part, for the largest micro-batch of `batches`.

    In use at the peak (the start of backward, from the second step on): the weights, the optimizer's
    states, what forward saved for backward (per layer and token, `_layer_floats`; the loss's logits) and
    backward's first transients (the output layer's gradients). Gradients take the place of the
    activations that backward frees. On top of that the C allocator keeps what it cannot give back:
    tensors below its mmap threshold (--mmap-threshold-mb; glibc's own grows to 32 MB) come from the
    heap, where the activations freed in forward and backward leave holes that later tensors only partly
    fill. On this machine glibc kept about half the size of the saved activations below the threshold
    again (measured over small and 135M models, full and LoRA). SmolLM2-135M LoRA on Alpaca rows at 8 MB:
    the hidden-wide tensors (3 MB in fp32) stay on the heap and the MLP's (9 MB) are mapped; in bf16 all
    stay. Measured there: -3%, -8% and -9..-15% (fp32, bf16, checkpoint share 0.4)."""
    from lmtune.train.loss import CHUNK

    weights = 4 * s.params
    per_param = {"adamw": 8, "adam": 8, "sgd": 4 if run.momentum else 0, "rmsprop": 8 if run.momentum else 4}
    optim = per_param[run.optimizer] * s.trainable
    grads = 4 * s.trainable
    best = None
    n_ckpt = checkpointed_layers(s, run, ckpt)
    recompute = (getattr(run, "recompute_elementwise", False) and n_ckpt < s.layers
                 and not getattr(run, "compile", False))
    # with --mmap-threshold-mb, tensors at least that big are mapped and unmapped, leaving no holes
    # (SmolLM2-135M LoRA: peak 2400 MB against 2410 MB of live tensors); smaller ones still fragment
    threshold = getattr(run, "mmap_threshold_mb", 0.0) * MB or math.inf
    for n, length, targets in batches:
        tokens = n * length
        saved, _, small = _layer_floats(s, length, lora, bf16, recompute, threshold / tokens)
        full = _layer_floats(s, length, lora, bf16)[0] if recompute else saved
        # a checkpointed layer keeps only its input, and backward recomputes one layer at a time
        layers = (n_ckpt * tokens * (4 * s.hidden + 4 * length) + (full * tokens if n_ckpt else 0)
                  + (s.layers - n_ckpt) * tokens * saved)
        layers += tokens * 4 * (2 * s.hidden + 1)  # the final norm
        heap = (s.layers - n_ckpt) * tokens * small + (n_ckpt * tokens * 4 * s.hidden
                                                        if 4 * s.hidden * tokens < threshold else 0)
        rows, chunked = _loss_path(s, n, length, targets)
        if chunked:  # target positions' hidden states; one chunk's logits, log-softmax and their gradients
            logits, transient = 4 * rows * s.hidden, 4 * 4 * min(rows, CHUNK) * s.vocab
        else:       # log-softmax over every position, kept; in backward its gradient and the logits'
            logits, transient = (4 + (2 if bf16 else 0)) * rows * s.vocab, 2 * 4 * rows * s.vocab
        head_grad = (2 if s.head_trainable else 0) * 4 * s.vocab * s.hidden  # embedding's and the head's
        act = layers + logits
        if best is None or act + transient + FRAGMENTATION * heap > best[0] + best[1] + best[2]:
            best = (act, transient + head_grad, FRAGMENTATION * heap)
    act, transient, fragmentation = best
    # autocast's bf16 copies of the weights, kept for backward; a LoRA base is stored in bf16 instead (finetune)
    frozen_bf16 = s.frozen_matmul if bf16 and lora and getattr(run, "distributed", "none") != "fsdp" else 0
    weights -= 2 * frozen_bf16
    cast = 2 * (s.matmul_params - frozen_bf16) if bf16 else 0
    resident, import_peak = base_mb
    # the tokenizer (about 1 KB per vocabulary entry for fast tokenizers) and the first steps' one-off
    # allocations (thread pools, autograd engine)
    runtime = s.vocab * 1024 + 25 * MB
    in_use = weights + optim + act + cast + transient + runtime
    parts = {"baseline": resident, "weights": weights / MB, "optimizer": optim / MB,
             "activations": act / MB, "gradients": grads / MB}
    parts["peak"] = max(import_peak, resident + (in_use + fragmentation) / MB)
    return parts


def predict_time(s: Shape, run, batches: list[tuple[int, int, int]], lora: bool, ckpt: bool, bf16: bool,
                 m: Machine) -> dict:
    """Seconds per optimizer step (mean over the run's steps) and for the whole run: every matmul at its
    shape (measured), attention (measured at its shape), element-wise work (floats moved, at the measured
    rate), dropout's random numbers, a fixed cost per op, and the optimizer."""
    rate = m.rates()
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv
    masked = hasattr(run, "model")  # fine-tuning rows are padded: transformers passes a mask
    # the step's working set (weights and what forward keeps) against the last-level cache
    n0, l0, _ = max(batches, key=lambda b: b[0] * b[1])
    working = 4 * s.params + n0 * l0 * s.layers * _layer_floats(s, l0, lora, bf16)[0]
    cold = working > last_level_cache()
    total, flops = 0.0, 0.0
    fwd_passes = 1 + checkpointed_layers(s, run, ckpt) / s.layers  # checkpointed layers run forward twice
    for n, length, targets in batches:
        tokens = n * length
        t = 0.0
        for _, kind, fin, fout, trained in s.linears:
            t += fwd_passes * m.gemm(tokens, fin, fout, "nt", bf16, cold) + m.gemm(tokens, fout, fin, "nn", bf16, cold)
            t += m.gemm(fout, tokens, fin, "tn", bf16, cold) if trained else 0.0
            flops += 2 * tokens * fin * fout * (fwd_passes + 1 + trained) * s.layers
        t *= s.layers
        af, ab = m.sdpa(n, s.heads, length, s.head_dim, masked, bf16)
        t += s.layers * (fwd_passes * af + ab)
        # element-wise floats per token and layer in forward (norms, rotary embedding, residual sums,
        # silu and product; LoRA's dropout, scaling and sum); backward moves about twice as many
        elem = 14 * h + 10 * (q + kv) + (2 * (kv + q) if kv != q else 0) + 6 * h + 5 * i
        drop = sum(fin for _, kind, fin, _, _ in s.linears if kind == "A") if s.lora_dropout else 0
        elem += 5 * drop + sum(5 * fout for _, kind, _, fout, _ in s.linears if kind == "B")
        t += s.layers * tokens * ((fwd_passes + 2) * elem * rate["elem_s"] + fwd_passes * drop * rate["bernoulli_s"])
        # ops: about 40 per layer in forward and 12 per adapter, each with a backward of about two
        n_ops = 40 + 12 * sum(kind == "A" for _, kind, _, _, _ in s.linears)
        t += s.layers * (fwd_passes + 2) * n_ops * rate["op_s"]
        # the LM head and the loss over its rows; chunks are computed again in backward
        rows, chunked = _loss_path(s, n, length, targets)
        if s.vocab:
            head_fwd = (2 if chunked else 1) * m.gemm(rows, h, s.vocab, "nt", bf16, cold)
            t += head_fwd + m.gemm(rows, s.vocab, h, "nn", bf16, cold)
            t += m.gemm(s.vocab, rows, h, "tn", bf16, cold) if s.head_trainable else 0.0
            # log-softmax and its gradient (and the recomputed chunk's): tensors of rows x vocabulary,
            # above the allocator's mmap threshold for a real vocabulary: fresh pages, written first
            big = lambda floats: rate["fresh_s"] if floats >= 8 * MB else rate["elem_s"]  # noqa: E731
            t += rows * s.vocab * ((4 if chunked else 3) * big(rows * s.vocab) + 6 * rate["elem_s"])
            if s.head_trainable:  # the embedding's dense gradient, added to the tied head's
                t += s.vocab * h * (2 * big(s.vocab * h) + 3 * rate["elem_s"])
            flops += 2 * rows * h * s.vocab * ((2 if chunked else 1) + 1 + s.head_trainable)
        total += t
    steps = len(batches) / run.grad_accum
    per_param, per_tensor = m.optimizer(run)
    step = total / steps + s.trainable * per_param + s.tensors * per_tensor + 0.005  # + collate, logging
    return {"step_s": step, "run_s": step * steps, "steps": int(steps), "gflop_per_step": flops / steps / 1e9}


# ----------------------------------------------------------------------------------------------
# The verb.

def estimate(cfg: EstimateConfig) -> dict:
    """Print the predicted peak memory and time of `cfg.run` (and its variants); with --check, measure."""
    import torch

    from lmtune import device

    run = cfg.run
    device.settle(run)  # --bf16 not given: the device's default, as the run itself would take it
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
    if run.budget:  # the inverse question: what the budget buys at the predicted step time
        result["budget"] = bought(run, asked["step_s"], sum(rows for rows, _, _ in batches))
    if cfg.check:
        result["check"] = check(cfg, asked)
    print(json.dumps(result) if cfg.json else format_estimate(result))
    return result


def bought(run, step_s: float, n_examples: int) -> dict:
    """Steps, examples and epochs that `run.budget` buys at `step_s` seconds a step (training time only:
    loading, validation and saving come out of the budget too)."""
    from lmtune.train.budget import check as check_budget

    seconds = check_budget(run)
    steps = int(seconds / step_s) if step_s > 0 else 0
    examples = steps * run.batch_size * run.grad_accum
    epochs = round(examples / n_examples, 2) if n_examples else None
    return {"seconds": seconds, "steps": steps, "examples": examples, "epochs": epochs}


def _predict(shape: Shape, run, batches, lora: bool, ckpt: bool, bf16: bool) -> dict:
    m = Machine()
    mem = predict_memory(shape, run, batches, lora, ckpt, bf16, m.base_mb())
    timing = predict_time(shape, run, batches, lora, ckpt, bf16, m)
    m.save()
    return {"lora": lora, "ckpt": ckpt, "bf16": bf16, "params": shape.params, "trainable": shape.trainable,
            **{f"{k}_mb": round(v, 1) for k, v in mem.items()}, **timing}


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
    if "budget" in result:
        b = result["budget"]
        lines.append(f"budget {_duration(b['seconds'])} buys about {b['steps']} steps, {b['examples']} examples"
                     + (f" ({b['epochs']} epochs)" if b["epochs"] is not None else "")
                     + " at this run's predicted step time (before loading, validation and saving)")
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
        short = replace(run, out=str(Path(tmp) / "run"), max_steps=cfg.check_steps, overwrite=True, resume=False,
                        eval_every=0, save_every=10**6, val_split=0.0,
                        **({"eval_data": ""} if hasattr(run, "eval_data") else {}),
                        # no retention scoring: its generation would be measured as the run's peak memory
                        **({"retain_data": "none"} if hasattr(run, "retain_data") else {}))
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
    m = Machine()
    lora = getattr(run, "lora", False)
    mem = predict_memory(shape, run, batches, lora, run.activation_checkpointing, run.bf16, m.base_mb())
    pt = predict_time(shape, run, batches[run.grad_accum:], lora, run.activation_checkpointing, run.bf16, m)
    m.save()
    return {"steps": len(steps), "predicted_mb": mem["peak"], "measured_mb": measured_mb,
            "memory_error": mem["peak"] / measured_mb - 1, "predicted_s": pt["step_s"], "measured_s": measured_s,
            "time_error": pt["step_s"] / measured_s - 1}
