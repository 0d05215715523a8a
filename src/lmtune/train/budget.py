"""`--budget 30m`: a run sized by wall-clock time instead of steps.

Before training, one timed forward pass over a real micro-batch predicts the step time (forward +
backward is about three forwards), and one validation is run and timed (what validating costs is
measured, not guessed: a generating metric such as BLEU costs far more than a forward pass), so a budget
that cannot hold one step and one validation is refused in one line, before the output folder is touched. The loop then asks `Plan`
after every step how many steps the run should have: the step time measured so far (the mean of the
last 200 steps, which is what predicts their sum when batches differ in length; the first step, which
warms up, is left out once others exist), the measured time of a
validation and a checkpoint, and what is left of the budget, which counts from the start of the verb,
loading and encoding included (from the start of `lmtune` itself when run from the command line). The learning-rate schedule reads that total at every step, so cosine
or warmup-stable-decay decays to the run's real end. The planned total is stored in each checkpoint:
`--resume` continues to that same end.
"""

from __future__ import annotations

import collections
import math
import re
import statistics
import sys
import time

from lmtune.errors import LmtuneError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MARGIN, MARGIN_S = 0.03, 3.0  # kept free for what is not measured (the final plot, printing): 3%, >= 3 s
# The interpreter's exit (tearing down torch and transformers) is not measurable from inside the run; it
# took 0.31x the time of importing them (5.5 s against 17.6 s on a loaded 2-core machine), so 0.3x of
# the time before the first step is kept for it.
EXIT_SHARE = 0.3
STEP_WINDOW = 200  # steps whose mean time predicts the ones to come
_cli_start: list[float] = []


def mark_start() -> None:
    """Called by `cli.main` before any heavy import: the budget of the verb it runs counts from here."""
    _cli_start[:] = [time.monotonic()]


def run_start() -> float:
    """When this run's budget started: the command line's start, once; else now (a sweep's next trial)."""
    return _cli_start.pop() if _cli_start else time.monotonic()


def parse_duration(text: str) -> float:
    """Seconds in '90s', '30m', '2h', '1h30m' or a plain number of seconds; LmtuneError if malformed."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    elif re.fullmatch(r"(\d+(\.\d+)?[smhd])+", t):
        seconds = sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", t))
    else:
        raise LmtuneError(f"--budget {text!r} is not a duration: give e.g. 90s, 30m, 2h or 1h30m")
    if not math.isfinite(seconds) or seconds <= 0:
        raise LmtuneError(f"--budget {text!r} must be a positive duration")
    return seconds


def check(cfg) -> float | None:
    """The budget in seconds, or None; refuses it beside --max-steps or --epochs (run before --out is touched)."""
    if not getattr(cfg, "budget", ""):
        return None
    seconds = parse_duration(cfg.budget)
    if cfg.max_steps or cfg.epochs != 1.0:
        given = "--max-steps" if cfg.max_steps else "--epochs"
        raise LmtuneError(f"--budget sets the number of steps itself: give either --budget or {given}, not both")
    return seconds


class Plan:
    """How many steps fit in the budget; re-planned after every step from measured times."""

    def __init__(self, seconds: float, started: float, step_s: float, eval_s: float, save_s: float,
                 eval_every: int, save_every: int, validates: bool, exit_s: float = 0.0):
        self.seconds, self.deadline = seconds, started + seconds - exit_s
        self.step_s, self.eval_s, self.save_s = step_s, eval_s, save_s  # predictions until measured
        self.eval_every, self.save_every, self.validates = eval_every, save_every, validates
        self.warmup_s: float | None = None  # the first step's time, used only until others exist
        self.step_times: collections.deque = collections.deque(maxlen=STEP_WINDOW)
        self.save_times = [save_s]  # the prediction counts as one sample: one outlier never decides alone
        self.fixed: int | None = None  # a resumed run keeps the end its checkpoint planned
        self.first: dict | None = None  # the validation timed before training (of the untouched model)
        self.total = self._fit(0)

    def _overhead(self, done: int, total: int) -> float:
        """Time of the validations and checkpoints between step `done` and the end at `total`."""
        evals = (total // self.eval_every - done // self.eval_every) if self.eval_every and self.validates else 0
        saves = total // self.save_every - done // self.save_every
        final = (self.eval_s if self.validates else 0.0) + 2 * self.save_s  # last checkpoint + the saved model
        return evals * self.eval_s + saves * self.save_s + final

    def _fit(self, done: int) -> int:
        left = self.deadline - time.monotonic() - max(MARGIN * self.seconds, MARGIN_S)
        # validations and saves cost a share of each step: solve for k with them spread over the steps, then
        # step back while the whole ones that fall inside do not fit (iterating k = (left - overhead(k)) /
        # step_s instead swung between too many and none, and refused a resumed run as 'cannot hold')
        per_step = self.step_s + self.save_s / self.save_every
        if self.eval_every and self.validates:
            per_step += self.eval_s / self.eval_every
        k = max(0, int((left - self._overhead(done, done)) / per_step))
        while k > 0 and k * self.step_s + self._overhead(done, done + k) > left:
            k -= 1
        return done + k

    def saw_step(self, done: int, seconds: float) -> int:
        """Record a step's time; returns the run's total steps (== done: stop now)."""
        if self.warmup_s is None:
            self.warmup_s = seconds
        else:
            self.step_times.append(seconds)
        # a mean, not a median: with batches of unequal lengths the median of 20 steps swung the plan
        # (and the progress bar's total) between 13k and 24k steps from one step to the next
        self.step_s = statistics.fmean(self.step_times) if self.step_times else seconds
        self.total = self.fixed if self.fixed is not None else max(done, self._fit(done))
        return self.total

    def saw_eval(self, seconds: float) -> None:
        self.eval_s = seconds

    def saw_save(self, seconds: float) -> None:
        # the median of the saves so far (and the prediction): one slow save (a busy disk) once counted for
        # every save still to come and ended a 60 s run at 26 s of training, its plan falling from 518 to 301
        self.save_times.append(seconds)
        self.save_s = statistics.median(self.save_times)


def plan_for(cfg, seconds: float, started: float, model, examples, collate, loss_fn, evaluate=None) -> Plan:
    """Predict step, validation and save times (one timed forward pass over a first micro-batch of
    `examples`, one timed `evaluate(model)`), and refuse in one line a budget that cannot hold one step,
    a save and, with validation, one validation."""
    import torch

    params = list(model.parameters())
    batch = collate([examples[i] for i in range(min(len(examples), cfg.batch_size))])
    batch = {k: v.to(params[0].device) if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad(), autocast:
        for _ in range(2):  # the first call also warms up: keep the second
            t0 = time.perf_counter()
            loss_fn(model, batch)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first = evaluate(model) if evaluate else None
        eval_s = time.perf_counter() - t0
    model.train(was_training)
    step_s = 3 * times[-1] * cfg.grad_accum
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)  # + Adam's moments
    save_s = state_bytes / 200e6 + 0.2  # ~200 MB/s to disk until a save is measured
    spent = time.monotonic() - started
    p = Plan(seconds, started, step_s, eval_s, save_s, cfg.eval_every, cfg.save_every, evaluate is not None,
             EXIT_SHARE * spent)
    p.first = first  # the untouched model's validation: the loop's step-0 row need not run it again
    print(f"--budget {cfg.budget}: {spent:.1f} s spent before training; one step ~{step_s:.2f} s"
          + (f", one validation {eval_s:.1f} s" if evaluate else "") + f": planning {p.total} steps "
          "(re-planned as the run goes)", file=sys.stderr)
    if p.total < 1:
        need = step_s + p._overhead(0, 1) + max(MARGIN * seconds, MARGIN_S) + EXIT_SHARE * spent
        what = "one step, one validation and a save" if evaluate else "one step and a save"
        raise LmtuneError(f"--budget {cfg.budget} cannot hold {what}: {spent:.1f} s went to loading and encoding, "
                          f"and about {need:.1f} s more are needed (one step ~{step_s:.2f} s"
                          + (f", validation {eval_s:.1f} s" if evaluate else "") + "); give a longer --budget")
    return p
