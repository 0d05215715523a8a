"""`lmtune sweep`: hyperparameter search with Optuna over the ordinary fine-tuning (or pretraining) path.

Each trial is a plain `finetune` (with `verb: pretrain`, a `pretrain`) run in OUT/trial-NNN whose validations
are reported to Optuna through the loop's `on_validation` hook, so a poor trial is pruned after its first bad
validation. The study lives in a database (SQLite in OUT by default): rerunning the command resumes it, and
any number of processes given the same --storage share it, each asking the database for its next trial.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import sys
import time
import warnings
from pathlib import Path

from lmtune import files, tasks
from lmtune.config import FinetuneConfig, PretrainConfig, SweepConfig, options
from lmtune.errors import LmtuneError

DONE_STATES = ("COMPLETE", "PRUNED", "FAIL")
PER_STEP_KEYS = {"batch_size", "grad_accum", "max_length", "pack"}  # searched, they make steps unlike
VERBS = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}  # what a trial runs -> its config


def sweep(cfg: SweepConfig):
    """Check everything, open the study, run trials until it holds `cfg.trials`, then write the results."""
    import optuna

    base, space, metric, direction = check_sweep(cfg)
    if cfg.pruner != "none" and PER_STEP_KEYS & set(space):
        print(f"note: the {cfg.pruner} pruner compares trials' validations at equal step numbers, and "
              f"{', '.join(sorted(PER_STEP_KEYS & set(space)))} in the space changes how much data a step holds; "
              "give pruner: none to compare only finished trials", file=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out = Path(cfg.out)
    check_sweep_out(cfg, base)
    study = open_study(cfg, direction)
    with files.writing(f"--out {out}"):
        out.mkdir(parents=True, exist_ok=True)
    for params in cfg.enqueue:  # skip_if_exists: a resumed sweep does not queue them twice
        study.enqueue_trial({k: params[k] for k in params}, skip_if_exists=True)
    left = cfg.trials - _count_done(study)
    print(f"sweep {cfg.study_name}: {_count_done(study)} trials done, {max(left, 0)} to go; "
          f"optimising {metric} ({direction})", file=sys.stderr)
    if left > 0:
        study.optimize(objective(cfg.verb, base, space, metric, out), n_trials=left, catch=(Exception,),
                       callbacks=[_stop_when_full(cfg.trials)], gc_after_trial=True)
    from lmtune.report import write_sweep_report

    write_sweep_report(study, cfg, base, metric, out)
    return study


def check_sweep_out(cfg: SweepConfig, base) -> None:
    """The sweep writes these files and trial-NNN folders into --out: none of them may be an input."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LmtuneError(f"--out {out} is a file: give a folder for the sweep")
    from lmtune.pretrain import tokenizer_file

    inputs = files.local_inputs(data=base.data, eval_data=getattr(base, "eval_data", ""),
                                model=getattr(base, "model", ""), model_config=getattr(base, "model_config", ""),
                                tokenizer=tokenizer_file(base) if cfg.verb == "pretrain" else "",
                                config=getattr(cfg, "_config_file", ""))
    names = ("study.db", "best.yaml", "trials.csv", "report.html", "history.png", "importance.png", "best")
    files.check_outputs([("--out", out / n) for n in names], inputs)
    for flag, path in inputs:
        if path.is_relative_to(out.resolve()) and path.relative_to(out.resolve()).parts[0].startswith("trial"):
            raise LmtuneError(f"{flag} {path} lies inside a trial folder of --out {out}, which trials replace: "
                              "move it out of the sweep folder")


def check_sweep(cfg: SweepConfig) -> tuple[FinetuneConfig | PretrainConfig, dict, str, str]:
    """(trial base config, search space, metric, direction); one-line errors for every mistake."""
    where = "sweep config"
    if not cfg.train:
        raise LmtuneError(f"{where}: no 'train:' mapping; give the {cfg.verb} settings every trial starts from")
    train = {k.replace("-", "_"): v for k, v in cfg.train.items()}
    train.update(out=str(Path(cfg.out) / "trial"), overwrite=True, resume=False)
    kind = VERBS[cfg.verb]
    base = options.build(kind, train, f"{where} 'train:'", {})
    space = check_space(cfg.space, kind, cfg.verb)
    if not (getattr(base, "eval_data", "") or base.val_split):
        raise LmtuneError(f"{where}: trials need validation data: give train: "
                          + ("eval_data (or val_split)" if cfg.verb == "finetune" else "val_split above 0"))
    task = base.task if cfg.verb == "finetune" else "lm"
    known = ["val_loss"] + ([f"val_{m}" for m in tasks.get(task).METRICS] if cfg.verb == "finetune" else [])
    metric = cfg.metric if cfg.metric.startswith("val_") else f"val_{cfg.metric}"
    if metric not in known:
        who = f"task {task}" if cfg.verb == "finetune" else "pretrain"
        raise LmtuneError(f"{where}: metric '{cfg.metric}' is not reported by {who}; "
                          f"choose one of {', '.join(known)}")
    direction = cfg.direction
    if direction == "auto":
        direction = "minimize" if "loss" in metric or "perplexity" in metric else "maximize"
    for i, params in enumerate(cfg.enqueue):
        if not isinstance(params, dict):
            raise LmtuneError(f"{where}: enqueue item {i + 1} must be a mapping of key: value")
        for k, v in params.items():
            options.coerce(kind, k, v, f"{where} enqueue item {i + 1}")
    return base, space, metric, direction


def check_space(space: dict, kind: type, verb: str) -> dict:
    """Normalise the space (keys of `kind`, the trials' config) to {key: ('float'|'int', low, high, log, step)
    or ('categorical', choices)}."""
    where = "sweep config 'space:'"
    if not space:
        raise LmtuneError(f"{where} is empty: give at least one key to search, e.g. "
                          "learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}")
    fields, out = options.fields_of(kind), {}
    for key, spec in space.items():
        name = key.removeprefix("train.").replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f", did you mean '{close[0]}'?" if close else "; see `lmtune {verb} --help` for the keys"
            raise LmtuneError(f"{where}: unknown parameter '{key}'{hint}")
        if name in ("out", "data", "eval_data", "resume", "overwrite", "task", "distributed"):
            raise LmtuneError(f"{where}: '{key}' cannot be searched; set it under train:")
        typ = options.type_of(kind, name)
        if isinstance(spec, list):
            if not spec:
                raise LmtuneError(f"{where}: '{key}' has an empty list of choices")
            out[name] = ("categorical", [options.coerce(kind, name, v, f"{where} '{key}'") for v in spec])
            continue
        if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
            raise LmtuneError(f"{where}: '{key}' must be a list of choices or {{low: ..., high: ..., log: bool}}")
        if typ not in (int, float):
            raise LmtuneError(f"{where}: '{key}' is {typ.__name__}, not a number: give a list of choices")
        low, high = (options.coerce(kind, name, spec[b], f"{where} '{key}' {b}") for b in ("low", "high"))
        if low > high:
            raise LmtuneError(f"{where}: '{key}' has low {low} > high {high}; swap them")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise LmtuneError(f"{where}: '{key}' is on a log scale, so low must be > 0 (got {low})")
        out[name] = ("int" if typ is int else "float", low, high, log, spec.get("step"))
    return out


def open_study(cfg: SweepConfig, direction: str):
    import optuna

    url = cfg.storage
    if not url:  # the default: a SQLite file in the sweep folder (a given URL must open before OUT is made)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(cfg.out).resolve() / 'study.db'}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(4):
        try:  # heartbeats let a resumed sweep mark the trials of a killed process as failed
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=90)
            break
        except Exception as e:  # noqa: BLE001 - a bad URL surfaces as many kinds of error
            # two processes starting on a new database race to create its tables: the loser tries again
            if any(w in str(e) for w in ("already exists", "UNIQUE constraint", "locked")) and attempt < 3:
                time.sleep(0.5 + random.random())
                continue
            raise LmtuneError(f"--storage {url}: cannot open it ({str(e).splitlines()[0][:200]}); "
                              "give a database URL such as sqlite:///sweep.db") from None
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner}[cfg.pruner]()
    sampler = optuna.samplers.TPESampler(n_startup_trials=max(cfg.startup_trials, 1),
                                         seed=None if cfg.seed < 0 else cfg.seed)
    try:
        return optuna.create_study(storage=storage, study_name=cfg.study_name, direction=direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    except ValueError as e:  # e.g. the stored study optimises in the other direction
        raise LmtuneError(f"study {cfg.study_name} in {url}: {e}") from None


def suggest(trial, space: dict) -> dict:
    params = {}
    for name, spec in space.items():
        if spec[0] == "categorical":
            params[name] = trial.suggest_categorical(name, spec[1])
        elif spec[0] == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2], log=spec[3], step=spec[4] or 1)
        else:
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=spec[3], step=spec[4])
    return params


def objective(verb: str, base, space: dict, metric: str, out: Path):
    """One trial: a finetune (or pretrain) run in OUT/trial-NNN; returns the best validation value it reached."""
    import optuna

    from lmtune.train.loop import Interrupted

    if verb == "pretrain":
        from lmtune.pretrain import pretrain as train
    else:
        from lmtune.finetune import finetune as train

    def run(trial) -> float:
        params = suggest(trial, space)
        cfg = dataclasses.replace(base, **params, out=str(out / f"trial-{trial.number:03d}"))
        trial.set_user_attr("run_dir", cfg.out)
        print(f"trial {trial.number}: {params}", file=sys.stderr)
        seen: list[float] = []
        minimize = trial.study.direction == optuna.study.StudyDirection.MINIMIZE

        def on_validation(step: int, metrics: dict) -> None:
            if metric not in metrics:
                return
            seen.append(float(metrics[metric]))
            trial.report(seen[-1], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {metric} {seen[-1]:.4f}")

        try:
            train(cfg, on_validation=on_validation)
        except optuna.TrialPruned:
            raise
        except Interrupted:  # Ctrl-C: stop the sweep; this trial does not count (see _count_done)
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt from None
        except Exception as e:  # out of memory, NaN loss, ...: recorded as failed, the sweep goes on
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            trial.set_user_attr("fail_reason", reason)
            print(f"trial {trial.number} failed: {reason}", file=sys.stderr)
            raise
        if not seen:
            raise RuntimeError(f"the run reported no {metric}")
        return min(seen) if minimize else max(seen)
    return run


def _count_done(study) -> int:
    """Trials that count towards --trials: finished, pruned or failed, but not ones stopped by Ctrl-C."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in DONE_STATES and not t.user_attrs.get("interrupted"))


def _stop_when_full(n: int):
    """Stops this process once the shared study holds `n` trials, whichever process ran them."""
    def callback(study, trial) -> None:
        if _count_done(study) >= n:
            study.stop()
    return callback
