"""Which exact way to run a training step is the fastest here: measured on the run's own first batch, not assumed.

Two choices give the same loss and gradients up to rounding, and which one is faster depends on the machine:
- attention: "sdpa" (torch's fused kernel; on a CPU its flash attention) or "matmul" (HF's eager attention:
  two matmuls and a softmax, which inductor fuses under --compile). On this project's 2-core EPYC, compiled bf16
  pretraining at 256 tokens ran 9-14% faster with matmul, and compiled fp32 4% slower.
- with --compile: the decoder blocks "compiled" (train.regional) or "uncompiled". Compiling costs tens of
  seconds once; a machine (or a precision, or a shape) where the compiled step is not faster keeps eager.

`choose` times a forward and backward of the run's first batch with every candidate (one untimed run each,
which also compiles, then the fastest of REPS), from the same random state, with the peak memory of its
steps, and takes the fastest that needs no more memory than the candidate the run would take without measuring
(SDPA, compiled as asked), give or take MEMORY_SLACK: matmul attention without --compile keeps its score
matrices, 0.8 GB more for bench (a). That the
candidates give the same loss and gradients is what tests/test_choice.py and tests/test_regional.py check
(here a candidate's loss could differ by its dropout masks alone: inductor draws its own); a candidate whose
loss is not finite is not taken.
The times go into the lmtune cache's machine.json beside estimate's rates, under the same machine key (CPU,
threads, torch, boot) and a key of the model, the batch's shape and the precision, so a later run of that
shape on this machine chooses at once. A run of fewer than MIN_STEPS steps measures nothing (it would spend a
large share of its time measuring) and keeps SDPA and the --compile it was given, unless the cache knows. Only
a single process measures (ranks would have to agree). The random state is restored and the gradients
cleared afterwards, so the run trains as if nothing had been measured.

`LMTUNE_KERNELS=sdpa|matmul|compiled|uncompiled` (comma-separated, beside the decode kernels) forces a choice.
Matmul attention keeps a score matrix per head (fp32 scores and probabilities), rows x heads x length^2 floats
a layer that keeps its activations: it is a candidate only when that fits in a quarter of the memory
available, and never for packed rows (their position-id masks are SDPA's).
"""

from __future__ import annotations

import gc
import math
import sys
import time

import torch

LAST: list[str] = [""]  # the last run's choice, as `choose` returned it (bench/throughput.py reports it)
MIN_STEPS = 50  # the measurement costs about 2 x (1 + REPS) steps, and two compiles under --compile
REPS = 2
MEMORY_SLACK = 0.05  # a candidate may peak this much above the default's (a peak's own noise), not more


def _available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shape(batch: dict) -> tuple[int, int]:
    """(rows, length) of a batch: its input_ids, or its first token matrix (a preference batch's)."""
    ids = batch.get("input_ids")
    if ids is None:
        ids = next(v for v in batch.values() if torch.is_tensor(v) and v.dim() == 2)
    return tuple(ids.shape)


def _matmul_fits(model, batch: dict, cfg, device) -> bool:
    """Whether matmul attention's score matrices (fp32 scores and probabilities, and a copy in the compute
    dtype, for every layer that keeps its activations) take at most a quarter of the memory available."""
    config = getattr(model, "config", None)
    heads, layers = getattr(config, "num_attention_heads", 0), getattr(config, "num_hidden_layers", 0)
    if not heads or not layers:
        return False
    rows, length = _shape(batch)
    share = cfg.checkpoint_share if getattr(cfg, "activation_checkpointing", False) else 0.0
    kept = max(1, layers - int(layers * share + 1e-9))
    return rows * heads * length * length * 10 * kept <= _available_bytes(device) / 4


def candidates(model, batch: dict, cfg, device) -> tuple[list[str], list[bool]]:
    """The attention implementations and compile settings this run can take (forced ones only, if any)."""
    from lmtune.device import forced_kernels
    from lmtune.train.regional import blocks

    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    attention = [current]  # a model without SDPA, or one loaded with another implementation, keeps it
    if current == "sdpa" and hasattr(model, "set_attn_implementation") and "position_ids" not in batch \
            and _matmul_fits(model, batch, cfg, device):
        attention.append("eager")
    compiled = [False, True] if cfg.compile and blocks(model) is not None else [False]
    force = forced_kernels()
    attention = [a for a in attention if _shown(a) in force] or attention
    compiled = [c for c in compiled if ("compiled" if c else "uncompiled") in force] or compiled
    return attention, compiled


def _shown(attention: str | None) -> str:
    return {"eager": "matmul", None: "default"}.get(attention, attention)


def name(attention: str | None, compiled: bool) -> str:
    return f"{_shown(attention)} {'compiled' if compiled else 'uncompiled'}"


def apply(model, attention: str | None, compiled: bool) -> None:
    """Run `model`'s training steps with this attention implementation (HF's name), compiled or not (for this
    run only: a saved config does not keep the attention implementation)."""
    from lmtune.train.regional import compile_blocks, uncompile_blocks

    if attention and model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    (compile_blocks if compiled else uncompile_blocks)(model)


def _time_one(model, step_loss, batch, device, rng) -> tuple[float, float]:
    """Seconds of one forward and backward of `batch`, from random state `rng`, and its loss."""
    from lmtune.device import synchronize

    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    t0 = time.perf_counter()
    loss = step_loss(batch)
    loss.backward()
    synchronize(device)
    dt = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return dt, float(loss.detach())


def measure(model, step_loss, batch, device, options: list[tuple[str | None, bool]]) -> dict:
    """{candidate name: [seconds a step, peak memory MB during its steps (None where it cannot be read)],
    or "failed" when its loss was not finite}."""
    from lmtune.device import new_peak_mb, restart_peak

    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    out, was_training = {}, model.training
    model.train()  # as the steps will run (a compiled graph is specific to it)
    try:
        for attention, compiled in options:
            apply(model, attention, compiled)
            runs = [_time_one(model, step_loss, batch, device, rng)]  # warms up (and compiles): not counted
            gc.collect()
            peaks = restart_peak(device)
            runs += [_time_one(model, step_loss, batch, device, rng) for _ in range(REPS)]
            peak = round(new_peak_mb(device)) if peaks else None
            ok = all(math.isfinite(loss) for _, loss in runs)
            out[name(attention, compiled)] = [round(min(t for t, _ in runs[1:]), 4), peak] if ok else "failed"
    finally:
        model.train(was_training)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    return out


def pick(options: list, times: dict, default) -> tuple:
    """The fastest option whose peak memory is at most the default's (the candidate the run takes without
    measuring) plus MEMORY_SLACK; the default when none was timed."""
    def of(o):  # (seconds, MB); (None, None) for a candidate that failed
        t = times.get(name(*o))
        return tuple(t) if isinstance(t, list) else (None, None)

    limit = of(default)[1]
    timed = [o for o in options if of(o)[0] is not None
             and (limit is None or of(o)[1] is None or of(o)[1] <= limit * (1 + MEMORY_SLACK))]
    return min(timed, key=lambda o: of(o)[0]) if timed else default


def choose(model, step_loss, batch: dict, cfg, steps: int, device, single_process: bool = True) -> str:
    """Apply the fastest exact way to run this run's steps (see the module's docstring); returns a line saying
    what was chosen and why ("" when there was no choice to make). `step_loss(batch)` is the step's loss tensor
    (forward, in the run's precision)."""
    from lmtune.costs.machine import Machine

    attention, compiled = candidates(model, batch, cfg, device)
    # uncompiled ones first: their peaks are then not those of a process that has compiled
    options = [(a, c) for c in compiled for a in attention]
    LAST[0] = ""
    if len(options) == 1:
        apply(model, *options[0])
        return ""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = cfg.checkpoint_share if getattr(cfg, "activation_checkpointing", False) else 0.0
    rows, length = _shape(batch)
    bucket = 2 ** math.ceil(math.log2(max(length, 1)))  # nearby lengths share a choice
    key = (f"train step {type(base).__name__} {n_all}/{n_trained} params rows {rows}x<={bucket} "
           f"{'bf16' if cfg.bf16 else 'fp32'} ckpt {share:g} {device.type}{' compile' if True in compiled else ''}")
    machine = Machine()
    known = machine.entry.get(key, {})
    todo = [o for o in options if name(*o) not in known]
    how = "cached for this machine and shape"
    default = (attention[0], True in compiled)  # what the run takes without measuring: as asked
    if todo and (steps < MIN_STEPS or not single_process):
        apply(model, *default)
        return ""
    if todo:
        print(f"timing {len(options)} ways to run a step on this batch ({rows}x{length}: "
              f"{', '.join(name(*o) for o in options)}; once for this machine and shape)...", file=sys.stderr)
        # known ones are measured again beside the new: times from another run are not comparable
        machine.entry[key] = {**known, **measure(model, step_loss, batch, device, options)}
        machine.dirty = True
        machine.save()
        how = "measured on this machine"
    times = machine.entry[key]
    best = pick(options, times, default)
    apply(model, *best)

    def shown(o):
        t = times.get(name(*o))
        return f"{name(*o)} {t[0]:.3g} s" + (f" {t[1]} MB" if t[1] is not None else "") if isinstance(t, list) \
            else f"{name(*o)} {t}"
    LAST[0] = f"step: {name(*best)} ({how}, one step of {rows}x{length}: {', '.join(map(shown, options))})"
    return LAST[0]
