"""The memory and time formulas: peak resident memory counted op by op from a model's shape and a run's
micro-batches, and step time as the step's operations times the machine's measured rates."""

from __future__ import annotations

import math

from lmtune.costs.machine import MB, Machine, last_level_cache
from lmtune.costs.shape import Shape


def _loss_path(s: Shape, n: int, length: int, targets: int) -> tuple[int, bool]:
    """(rows the LM head runs on, chunked?) as lmtune.train.loss computes the loss of a micro-batch: over
    every position in one piece when the logits are small, else over the target positions in chunks
    that are recomputed in backward."""
    from lmtune.train import loss

    positions = n * (length - 1)
    if positions * s.vocab <= loss.SMALL_LOGITS:
        return positions, False
    return targets, True


FRAGMENTATION = 0.5  # see predict_memory


def layer_floats(s: Shape, length: int, lora: bool, bf16: bool, recompute: bool = False,
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
    train.memory.enable_activation_checkpointing picks them."""
    return int(s.layers * getattr(run, "checkpoint_share", 1.0) + 1e-9) if ckpt else 0


def predict_memory(s: Shape, run, batches: list[tuple[int, int, int]], lora: bool, ckpt: bool, bf16: bool,
                   base_mb: list[float]) -> dict:
    """Peak resident memory (MB) by part, for the largest micro-batch of `batches`.

    In use at the peak (the start of backward, from the second step on): the weights, the optimizer's
    states, what forward saved for backward (per layer and token, `layer_floats`; the loss's logits) and
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
        saved, _, small = layer_floats(s, length, lora, bf16, recompute, threshold / tokens)
        full = layer_floats(s, length, lora, bf16)[0] if recompute else saved
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
                 m: Machine, *, padded: bool) -> dict:
    """Seconds per optimizer step (mean over the run's steps) and for the whole run: every matmul at its
    shape (measured), attention (measured at its shape), element-wise work (floats moved, at the measured
    rate), dropout's random numbers, a fixed cost per op, and the optimizer. `padded`: the rows are padded
    (fine-tuning), so attention runs with a mask."""
    rate = m.rates()
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv
    masked = padded  # fine-tuning rows are padded: transformers passes a mask
    # the step's working set (weights and what forward keeps) against the last-level cache
    n0, l0, _ = max(batches, key=lambda b: b[0] * b[1])
    working = 4 * s.params + n0 * l0 * s.layers * layer_floats(s, l0, lora, bf16)[0]
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
