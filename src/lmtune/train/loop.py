"""THE training loop, shared by pretraining and every fine-tuning task.

It reads top to bottom: take the step's micro-batches, forward, backward (the loss normalised by the
number of target tokens of the whole step), clip, step, log, validate, checkpoint. What differs
between tasks comes in as arguments: the encoded examples, how to collate them, and the loss.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmtune.config.options import to_dict
from lmtune.data.batching import count_targets
from lmtune.device import of as device_of
from lmtune.device import resolve as resolve_device
from lmtune.device import to as to_device
from lmtune.errors import LmtuneError
from lmtune.track import MetricsLog
from lmtune.train import distributed
from lmtune.train.checkpoint import list_checkpoints, resume_latest, save_checkpoint
from lmtune.train.choice import choose as choose_kernels
from lmtune.train.optim import build_optimizer, build_scheduler


class Interrupted(LmtuneError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint (or has an earlier one) and stopped. The exit code is
    the shell's for the signal: 130 for SIGINT (Ctrl-C), 143 for SIGTERM."""

    exit_code = 130

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


def micro_batch(n_examples: int, batch_size: int, seed: int, index: int,
                lengths: tuple[int, ...] | None = None) -> list[int]:
    """Example indices of global micro-batch `index`. A pure function of its arguments, so a resumed
    run picks up the data exactly where the checkpoint left it. With `lengths` (the examples' token
    counts) batches are grouped by length: rows of similar length share a batch, so little is padded."""
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, i = divmod(index, per_epoch)
    return [int(j) for j in _epoch_order(n_examples, seed, epoch, batch_size, lengths)[i * batch_size:(i + 1) * batch_size]]


GROUP = 50  # batches per length group: sorted inside a group, then the batches shuffled


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int, epoch: int, batch_size: int = 1,
                 lengths: tuple[int, ...] | None = None):
    if lengths is None:
        # a NumPy permutation (4 bytes an example), not a list of Python ints (~36): a pretraining corpus
        # of a million blocks keeps its order in 4 MB. Shuffled in place in its final dtype: the same
        # order as rng.permutation(n) (the same draws, whatever the dtype) without its int64 copy, 8 more
        # bytes a block at the first step
        rng = np.random.default_rng(seed * 1_000_003 + epoch)
        order = np.arange(n_examples, dtype=np.uint32 if n_examples < 2**32 else np.int64)
        rng.shuffle(order)
        return order
    order = list(range(n_examples))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    # as the HF Trainer's group_by_length: cut the shuffled order into groups of GROUP batches and sort
    # each group longest first; then shuffle the batches, so lengths do not rise and fall in a pattern
    size = GROUP * batch_size
    order = [j for g in range(0, n_examples, size) for j in sorted(order[g:g + size], key=lambda j: -lengths[j])]
    batches = [order[b:b + batch_size] for b in range(0, n_examples, batch_size)]
    rng.shuffle(batches)
    return tuple(j for b in batches for j in b)


def rank_batch(n_examples: int, cfg, index: int, w: distributed.World,
               lengths: tuple[int, ...] | None = None) -> list[int]:
    """This rank's part of global micro-batch `index`. The global micro-batch (batch_size x ranks rows)
    does not depend on the number of ranks that share it: 2 ranks x batch B see what 1 x 2B sees."""
    rows = micro_batch(n_examples, cfg.batch_size * w.size, cfg.seed, index, lengths)
    return rows[w.rank * cfg.batch_size:(w.rank + 1) * cfg.batch_size]


def example_lengths(examples, cfg) -> tuple[int, ...] | None:
    """Token counts to group batches by; None when grouping is off or pointless (packed or equal rows).
    A sequence that is not a list (TokenBlocks, EncodedColumns) gives its own in `.lengths`."""
    if not getattr(cfg, "group_by_length", False) or not len(examples):
        return None
    if not isinstance(examples, list):
        return examples.lengths
    if "position_ids" in examples[0]:
        return None
    lengths = tuple(len(e["input_ids"]) for e in examples)
    return None if min(lengths) == max(lengths) else lengths


def total_steps(cfg, n_examples: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / (cfg.batch_size * distributed.world().size)) / cfg.grad_accum)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@torch.no_grad()
def mean_loss(model, examples, collate: Callable, loss_fn: Callable, batch_size: int) -> float:
    """Loss per target token over `examples` (validation)."""
    was_training = model.training
    model.eval()
    total, count, dev = 0.0, 0, device_of(model)
    for i in range(0, len(examples), batch_size):
        s, n = loss_fn(model, to_device(collate([examples[j] for j in range(i, min(i + batch_size, len(examples)))]), dev))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def _step_loss(model, loss_fn, autocast, batch) -> torch.Tensor:
    """One micro-batch's loss per target, in the run's precision (what train.choice times)."""
    with autocast:
        s, n = loss_fn(model, batch)
    return s / max(int(n), 1)


def peak_memory_mb(dev=None) -> float:
    """Peak memory of this process so far on `dev` (default: the GPU when there is one): GPU memory
    allocated on CUDA, the resident set on the CPU (lmtune.device.peak_memory_mb)."""
    from lmtune import device

    if dev is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return device.peak_memory_mb(dev)


def _rows(examples: list[dict], idx: list[int]) -> list[dict]:
    """The examples at `idx`; an empty share (the last, short batch of an epoch split over ranks) becomes
    one example without targets, so every rank still runs forward and backward together."""
    if idx:
        return [examples[i] for i in idx]
    e = examples[0]
    return [{**e, "labels": [-100] * len(e["labels"]) if isinstance(e["labels"], list) else -100}]


class _NoLog:
    """Ranks other than 0 write nothing."""

    def write(self, record: dict) -> None:
        pass


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second Ctrl-C
    stops at once, and leaves as `on_abort()` (an Interrupted naming the last checkpoint)."""

    def __init__(self, on_abort: Callable | None = None, on_error: Callable | None = None):
        self.signal, self.on_abort, self.on_error = None, on_abort, on_error

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            # a second Ctrl-C: stop now. A repeated SIGTERM is the same request (torchrun forwards the one
            # its process group got to every worker, so a rank can see two): keep finishing the step
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name
        if distributed.world().is_main:  # torchrun signals every rank: say it once
            print(f"\n{self.signal}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def __exit__(self, exc_type, exc, tb):
        for s, h in self.previous.items():
            signal.signal(s, h)
        if exc_type is KeyboardInterrupt and self.on_abort:
            raise self.on_abort() from None
        if exc_type is not None and self.on_error:
            self.on_error()  # e.g. end the progress bar's line, so an error message starts a line of its own


def fit(model, examples, cfg, out: Path, *, collate: Callable, loss_fn: Callable,
        evaluate: Callable | None = None, resume_command: str = "", metric: str = "val_loss",
        mode: str = "min", patience: int = 0, save_best: Callable | None = None,
        on_validation: Callable | None = None, plan=None, evaluate_first: bool = False) -> dict:
    """Train `model` in place on `examples` (a list of encoded dicts, or any sequence with __len__,
    __getitem__ and `lengths`, such as pretraining's TokenBlocks, read from token shards); returns the last metrics.

    `evaluate(model) -> metrics` runs every `cfg.eval_every` steps and at the end. When `metrics[metric]`
    improves (`mode` 'max' or 'min') `save_best(model, step, metrics)` is called; after `patience`
    validations without improvement (0: never) training stops early, with a final checkpoint.
    `on_validation(step, metrics)` is called after each validation; it may raise to stop the run (a sweep
    prunes a poor trial this way). `plan` (a `train.budget.Plan`, for --budget) sets the number of steps
    from the time measured as the run goes, instead of --max-steps/--epochs.
    With `evaluate_first`, `evaluate` also runs once before training, on the model as it was given (also on
    --resume: before the checkpoint is loaded), logged as step 0 on a fresh run: the base model's numbers.
    """
    from tqdm import tqdm

    out, w = Path(out), distributed.world()
    steps = plan.total if plan else total_steps(cfg, len(examples))
    # DDP needs the forward to run through its wrapper: the wrapper's forward is the task's loss
    model = distributed.place(model, resolve_device(getattr(cfg, "device", "auto")))
    device = next(model.parameters()).device
    lengths = example_lengths(examples, cfg)
    autocast = torch.autocast("cuda" if next(model.parameters()).is_cuda else "cpu", dtype=torch.bfloat16) \
        if cfg.bf16 else nullcontext()
    # the fastest exact way to run a step here (SDPA or matmul attention; with --compile, compiled blocks or
    # not): measured on the run's first batch once per machine and shape, or as cached (train.choice)
    if len(examples):  # the run's first micro-batch (this rank's share; all of it when the share is empty)
        first_rows = rank_batch(len(examples), cfg, 0, w, lengths) or micro_batch(len(examples), cfg.batch_size,
                                                                                 cfg.seed, 0, lengths)
        chosen = choose_kernels(model, functools.partial(_step_loss, model, loss_fn, autocast),
                                to_device(collate([examples[i] for i in first_rows]), device),
                                cfg, steps, device, single_process=w.size == 1)
        if chosen and w.is_main:
            print(chosen, file=sys.stderr)
    engine = distributed.wrap(model, w, loss_fn)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(optimizer, cfg, (lambda: plan.total) if plan else steps)

    first = None
    if evaluate and evaluate_first and plan and plan.first is not None:
        first = plan.first  # --budget already validated the untouched model (to time it): not twice
    elif evaluate and evaluate_first:  # the base model, placed and in the training precision like every validation
        with distributed.gathered(engine), autocast:
            first = evaluate(model)
    start = 0
    if cfg.resume and list_checkpoints(out):
        state, path = resume_latest(out, model, optimizer, scheduler)
        start = state["step"]
        if plan and "planned_steps" in state.get("extra", {}):  # --budget: continue to the end it planned
            plan.fixed = steps = plan.total = state["extra"]["planned_steps"]
        if w.is_main:
            print(f"resuming from step {start} ({path})", file=sys.stderr)
    log = MetricsLog(out, resume_step=start if cfg.resume else None, report_to=cfg.report_to,
                     config=to_dict(cfg) if cfg.report_to else None) if w.is_main else _NoLog()
    if first is not None and start == 0:
        log.write({"step": 0, **first})
        if w.is_main:
            print("step 0 (before training): " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()), file=sys.stderr)

    model.train()
    last: dict = {}
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10, disable=not w.is_main)
    t_start, tokens_seen, bad_in_a_row = time.perf_counter(), 0, 0
    best, evals_since_best = None, 0  # not restored on --resume: the first validation sets it again
    resume_with = f"{resume_command or 'the same command'} --resume"

    def aborted() -> Interrupted:
        bar.close()
        good = list_checkpoints(out)
        return Interrupted(f"stopped by a second Ctrl-C; the last checkpoint is {good[-1].name}. Resume with: "
                           f"{resume_with}" if good else "stopped by a second Ctrl-C; no checkpoint was written yet")

    with _StopFlag(aborted, bar.close) as stop:
        for step in itertools.count(start):  # to `steps`, which a --budget plan may move as it learns
            if step >= steps:
                break
            t0 = time.perf_counter()
            # 1. this step's micro-batches; the loss is normalised by the target tokens of all of them,
            #    so every token weighs the same whatever micro-batch it fell into
            #    (with several ranks: each its share, and the counts summed over all of them)
            batches = [collate(_rows(examples, rank_batch(len(examples), cfg, step * cfg.grad_accum + k, w, lengths)))
                       for k in range(cfg.grad_accum)]
            batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
            n_targets = sum(b["n_targets"] if "n_targets" in b else count_targets(b) for b in batches)
            n_tokens = sum(b["n_tokens"] if "n_tokens" in b else int(b["attention_mask"].sum()) for b in batches)
            # the loss's unit: target tokens, or what a task's batches count as `n_items` (preference pairs)
            n_items = sum(b["n_items"] for b in batches) if "n_items" in batches[0] else n_targets
            n_targets, n_tokens, n_items = distributed.all_sum([n_targets, n_tokens, n_items])
            # 2. forward and backward, accumulating gradients. DDP and FSDP average gradients over the
            #    ranks, so each rank's share is scaled by the world size to get the sum over all tokens;
            #    DDP skips its gradient all-reduce on all but the last micro-batch (no_sync).
            loss_sum = 0.0
            for k, b in enumerate(batches):
                with nullcontext() if w.mode != "ddp" or k == len(batches) - 1 else engine.no_sync():
                    with autocast:
                        s, _ = engine(b)
                    (s * w.size / max(n_items, 1)).backward()
                loss_sum += float(s.detach())
            loss_sum = distributed.all_sum([loss_sum])[0]
            # 3. clip, step, schedule
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None],
                cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
            lr = scheduler.get_last_lr()[0]
            # a non-finite loss or gradient would poison the weights: skip that update and count it
            if math.isfinite(loss_sum) and math.isfinite(float(grad_norm)):
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                log.write({"step": step + 1, "skipped_nonfinite": True, "in_a_row": bad_in_a_row})
                if bad_in_a_row >= cfg.max_nonfinite_steps:
                    good = list_checkpoints(out)
                    raise LmtuneError(f"the loss or gradient was not finite for {bad_in_a_row} steps in a row "
                                      f"(up to step {step + 1}); lower --learning-rate or check the data. Last "
                                      f"good checkpoint: {good[-1] if good else 'none'}")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # 4. log
            dt = time.perf_counter() - t0
            tokens_seen += n_tokens
            last = {"step": step + 1, "loss": loss_sum / max(n_items, 1), "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": n_tokens / dt,
                    "target_tokens_per_s": n_targets / dt, "target_tokens": n_targets, "tokens": n_tokens,
                    "elapsed_s": time.perf_counter() - t_start, "peak_mem_mb": peak_memory_mb(device)}
            if plan:  # --budget: the run's length from the step time measured so far and the time left
                steps = plan.saw_step(step + 1, dt)
                if w.size > 1:  # every rank must stop at the same step: all take the mean of their plans
                    steps = plan.total = round(distributed.all_sum([steps])[0] / w.size)
                bar.total = steps
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:  # planned_steps: the plan after this step
                log.write({**last, "planned_steps": plan.total} if plan else last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_seen / last['elapsed_s']:.0f}")
            bar.update(1)
            # 5. validate
            done = step + 1 == steps
            if evaluate and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                t_eval = time.perf_counter()
                with distributed.gathered(engine), autocast:  # validation in the training precision
                    metrics = evaluate(model)
                model.train()
                log.write({"step": step + 1, **metrics})
                last.update(metrics)
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if on_validation:
                    on_validation(step + 1, metrics)
                value = metrics.get(metric)
                if value is not None and (best is None or (value > best if mode == "max" else value < best)):
                    best, evals_since_best = value, 0
                    if save_best:
                        save_best(model, step + 1, metrics)
                else:
                    evals_since_best += 1
                if plan:  # a validation's cost includes saving the best model
                    plan.saw_eval(time.perf_counter() - t_eval)
                if patience and evals_since_best >= patience and not done:
                    bar.write(f"early stopping at step {step + 1}: {metric} has not improved on {best:.4f} "
                              f"for {patience} validations")
                    log.write({"step": step + 1, "early_stopped": True, f"best_{metric}": best})
                    done = True
            # 6. checkpoint (also when asked to stop: a signal to any rank stops them all)
            #    Every rank decides on the same value: a signal that lands after the all_sum waits for the
            #    next step (read directly, it could send one rank into the checkpoint's collectives while
            #    the others go on to the next step, and they would wait on each other)
            stopping = bool(distributed.all_sum([bool(stop.signal)])[0]) if w.size > 1 else bool(stop.signal)
            if (step + 1) % cfg.save_every == 0 or done or stopping:
                t_save = time.perf_counter()
                save_checkpoint(out, step + 1, model, optimizer, scheduler, cfg.keep_checkpoints,
                                {"planned_steps": steps} if plan else None)
                if plan:
                    plan.saw_save(time.perf_counter() - t_save)
            if stopping and not done:
                bar.close()
                raise Interrupted(f"stopped by {stop.signal or 'SIGTERM'} after step {step + 1} of {steps}; "
                                  f"checkpoint saved. Resume with: {resume_with}", stop.signal or "SIGTERM")
            if done:  # the last step, or stopped early
                break
    bar.close()
    return last
