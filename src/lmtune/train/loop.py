"""THE training loop, shared by pretraining and every fine-tuning task.

It reads top to bottom: take the step's micro-batches, forward, backward (the loss normalised by the
number of target tokens of the whole step), clip, step, log, validate, checkpoint. What differs
between tasks comes in as arguments: the encoded examples, how to collate them, and the loss.
"""

from __future__ import annotations

import functools
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from lmtune.errors import LmtuneError
from lmtune.track import MetricsLog
from lmtune.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lmtune.train.optim import build_optimizer, build_scheduler


class Interrupted(LmtuneError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped."""

    exit_code = 130


def micro_batch(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of global micro-batch `index`. A pure function of its arguments, so a resumed
    run picks up the data exactly where the checkpoint left it."""
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, i = divmod(index, per_epoch)
    return list(_epoch_order(n_examples, seed, epoch)[i * batch_size:(i + 1) * batch_size])


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def total_steps(cfg, n_examples: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@torch.no_grad()
def mean_loss(model, examples: list[dict], collate: Callable, loss_fn: Callable, batch_size: int) -> float:
    """Loss per target token over `examples` (validation)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = loss_fn(model, collate(examples[i:i + batch_size]))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def fit(model, examples: list[dict], cfg, out: Path, *, collate: Callable, loss_fn: Callable,
        evaluate: Callable | None = None, resume_command: str = "") -> dict:
    """Train `model` in place on `examples`; returns the last logged metrics."""
    from tqdm import tqdm

    out = Path(out)
    steps = total_steps(cfg, len(examples))
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(optimizer, cfg, steps)
    autocast = torch.autocast("cuda" if next(model.parameters()).is_cuda else "cpu", dtype=torch.bfloat16) \
        if cfg.bf16 else nullcontext()

    start = 0
    if cfg.resume and list_checkpoints(out):
        state = load_checkpoint(list_checkpoints(out)[-1], model, optimizer, scheduler)
        start = state["step"]
        print(f"resuming from step {start} ({list_checkpoints(out)[-1]})", file=sys.stderr)
    log = MetricsLog(out, resume_step=start if cfg.resume else None)

    model.train()
    last: dict = {}
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t_start, tokens_seen = time.perf_counter(), 0
    with _StopFlag() as stop:
        for step in range(start, steps):
            t0 = time.perf_counter()
            # 1. this step's micro-batches; the loss is normalised by the target tokens of all of them,
            #    so every token weighs the same whatever micro-batch it fell into
            batches = [collate([examples[i] for i in micro_batch(len(examples), cfg.batch_size, cfg.seed,
                                                                  step * cfg.grad_accum + k)])
                       for k in range(cfg.grad_accum)]
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            # 2. forward and backward, accumulating gradients
            loss_sum = 0.0
            for b in batches:
                with autocast:
                    s, _ = loss_fn(model, b)
                (s / max(n_targets, 1)).backward()
                loss_sum += float(s.detach())
            # 3. clip, step, schedule
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None],
                cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # 4. log
            dt = time.perf_counter() - t0
            tokens_seen += n_tokens
            last = {"step": step + 1, "loss": loss_sum / max(n_targets, 1), "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": n_tokens / dt,
                    "target_tokens_per_s": n_targets / dt, "target_tokens": n_targets,
                    "elapsed_s": time.perf_counter() - t_start}
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_seen / last['elapsed_s']:.0f}")
            bar.update(1)
            # 5. validate
            done = step + 1 == steps
            if evaluate and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                metrics = evaluate(model)
                model.train()
                log.write({"step": step + 1, **metrics})
                last.update(metrics)
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            # 6. checkpoint (also when asked to stop)
            if (step + 1) % cfg.save_every == 0 or done or stop.signal:
                save_checkpoint(out, step + 1, model, optimizer, scheduler, cfg.keep_checkpoints)
            if stop.signal and not done:
                bar.close()
                raise Interrupted(f"stopped by {stop.signal} after step {step + 1} of {steps}; checkpoint saved. "
                                  f"Resume with: {resume_command or 'the same command'} --resume")
    bar.close()
    return last
