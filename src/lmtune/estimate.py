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

The counting is in lmtune.costs: shape.py (the model and the micro-batches), machine.py (the measured
rates), formulas.py (memory and time); this module is the verb: the variants, the table, --check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lmtune.config import EstimateConfig
from lmtune.costs.formulas import predict_memory, predict_time
from lmtune.costs.machine import Machine
from lmtune.costs.shape import Shape, batch_sizes, model_shape
from lmtune.errors import LmtuneError


def estimate(cfg: EstimateConfig) -> dict:
    """Print the predicted peak memory and time of `cfg.run` (and its variants); with --check, measure."""
    import torch

    from lmtune import device

    run = cfg.run
    if getattr(run, "quantize", "none") != "none":  # every row would be another run's, marked as this one
        raise LmtuneError(f"estimate does not model --quantize {run.quantize} (bitsandbytes' 4-bit weights and "
                          "kernels): leave --quantize out for the same run on a full-precision base (more memory), "
                          "or measure a few steps with finetune --max-steps 5 (peak_mb in metrics.jsonl)")
    device.settle(run)  # --bf16 not given: the device's default, as the run itself would take it
    if run.threads:
        torch.set_num_threads(run.threads)
    finetune = cfg.verb == "finetune"  # pretrain has no LoRA, no task, no padding: a preset on full blocks
    lora = finetune and run.lora
    # the model is counted first: a model it cannot count fails before the data is read
    variants = [(v, replace(run, lora=v)) for v in (False, True)] if finetune else [(False, run)]
    shapes = [(v, r, model_shape(r, cfg.verb)) for v, r in variants]
    batches = batch_sizes(run, cfg.verb)
    rows = []
    for v_lora, v_run, shape in shapes:
        for ckpt in (False, True):
            for bf16 in (False, True):
                rows.append(_predict(shape, v_run, batches, v_lora, ckpt, bf16, padded=finetune))
    asked = next(r for r in rows if (r["lora"], r["ckpt"], r["bf16"]) == (lora, run.activation_checkpointing, run.bf16))
    asked["asked"] = True
    result = {"model": run.model if finetune else run.model_size, "steps": asked["steps"], "variants": rows}
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


def _predict(shape: Shape, run, batches, lora: bool, ckpt: bool, bf16: bool, *, padded: bool) -> dict:
    m = Machine()
    mem = predict_memory(shape, run, batches, lora, ckpt, bf16, m.base_mb())
    timing = predict_time(shape, run, batches, lora, ckpt, bf16, m, padded=padded)
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
    # finetune: no validation file, and no retention scoring (its generation would be measured as the run's
    # peak memory)
    finetune_only = {"eval_data": "", "retain_data": "none"} if cfg.verb == "finetune" else {}
    with tempfile.TemporaryDirectory(prefix="lmtune-estimate-") as tmp:
        short = replace(run, out=str(Path(tmp) / "run"), max_steps=cfg.check_steps, overwrite=True, resume=False,
                        eval_every=0, save_every=10**6, val_split=0.0, **finetune_only)
        spec = Path(tmp) / "run.yaml"
        import yaml

        from lmtune.config.options import to_dict
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
    shape = model_shape(run, cfg.verb)
    batches = batch_sizes(short, cfg.verb)
    m = Machine()
    lora = cfg.verb == "finetune" and run.lora
    mem = predict_memory(shape, run, batches, lora, run.activation_checkpointing, run.bf16, m.base_mb())
    pt = predict_time(shape, run, batches[run.grad_accum:], lora, run.activation_checkpointing, run.bf16, m,
                      padded=cfg.verb == "finetune")
    m.save()
    return {"steps": len(steps), "predicted_mb": mem["peak"], "measured_mb": measured_mb,
            "memory_error": mem["peak"] / measured_mb - 1, "predicted_s": pt["step_s"], "measured_s": measured_s,
            "time_error": pt["step_s"] / measured_s - 1}
