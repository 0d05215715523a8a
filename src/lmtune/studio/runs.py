"""Reading a workspace of run folders: what each run is, how far it got, how it ended.

A run folder is what `lmtune finetune/pretrain` leaves (run.json, metrics.jsonl, checkpoints/, the model
and its lmtune.json). Runs the studio launched also have a record in WORKSPACE/.studio/ (the child's pid,
argv and exit code, and its log), which tells running, stopped (exit 130: SIGTERM, checkpoint saved) and
failed apart; for runs started from a terminal the state is read from the files alone.
Nothing here imports torch: the Runs page must paint in well under a second with hundreds of runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import time
from pathlib import Path

from lmtune import config as C
from lmtune.config import options

RECORDS = ".studio"  # WORKSPACE/.studio/<id>.json and <id>.log: the studio's own notes on the runs it launched
TRAINING_VERBS = ("finetune", "pretrain")
CONFIGS = {"finetune": C.FinetuneConfig, "pretrain": C.PretrainConfig}
# the validation metric each task watches by default (finetune.watched_metric reads it from the task
# module, which imports torch; tests/test_studio.py checks that the two agree)
TASK_METRIC = {"classify": "accuracy", "translate": "bleu", "qa": "f1"}
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "train:  40%|####  | 40/100 [00:03<00:04, ...]"
_CACHE: dict[str, tuple[tuple, object]] = {}  # file -> ((mtime, size), what was read from it)


def record_name(run_id: str) -> str:
    return run_id.replace("/", "__")


def read_record(root: Path, run_id: str) -> dict:
    p = root / RECORDS / f"{record_name(run_id)}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_record(root: Path, run_id: str, record: dict) -> None:
    folder = root / RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{record_name(run_id)}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / f"{record_name(run_id)}.json")  # a reader never sees half a record


def log_path(root: Path, run_id: str) -> Path:
    return root / RECORDS / f"{record_name(run_id)}.log"


def find_runs(root: Path, depth: int = 3) -> list[str]:
    """Ids (paths relative to the workspace) of every run folder, newest first; a sweep's trials too."""
    found: dict[str, float] = {}

    def walk(folder: Path, level: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        names = {e.name for e in entries}
        if "run.json" in names or "metrics.jsonl" in names:
            found[folder.relative_to(root).as_posix()] = _mtime(folder)
        if level < depth:
            for e in entries:
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in (
                        "checkpoints", "best", "runs-tb"):
                    walk(Path(e.path), level + 1)

    walk(root, 0)
    for rec in (root / RECORDS).glob("*.json") if (root / RECORDS).is_dir() else []:
        run_id = rec.stem.replace("__", "/")  # launched, but no run.json yet (still loading the model)
        found.setdefault(run_id, rec.stat().st_mtime)
    return sorted(found, key=lambda r: -found[r])


def _mtime(folder: Path) -> float:
    times = []
    for name in ("metrics.jsonl", "run.json"):
        try:
            times.append((folder / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def read_metrics(folder: Path) -> list[dict]:
    """metrics.jsonl's rows, re-read only when the file changed (a half-written last line is skipped)."""
    p = folder / "metrics.jsonl"
    try:
        st = p.stat()
    except OSError:
        return []
    key = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(p))
    if hit and hit[0] == key:
        return hit[1]
    rows = []
    with open(p) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    _CACHE[str(p)] = (key, rows)
    return rows


def read_info(folder: Path) -> dict:
    """run.json (verb, resolved config, versions), re-read only when it changed."""
    p = folder / "run.json"
    try:
        st = p.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = _CACHE.get(str(p))
        if hit and hit[0] == key:
            return hit[1]
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    _CACHE[str(p)] = (key, info)
    return info


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child that exited but was not yet reaped is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def watched(config: dict) -> tuple[str, str]:
    """(metric name in metrics.jsonl, 'max'/'min') that picks the run's best, as finetune chooses it."""
    name = config.get("metric") or TASK_METRIC.get(config.get("task", ""), "val_loss")
    name = name if name.startswith("val_") else f"val_{name}"
    mode = config.get("metric_mode", "auto")
    if mode == "auto":
        mode = "min" if "loss" in name or "perplexity" in name else "max"
    return name, mode


def state_of(root: Path, run_id: str, folder: Path, rows: list[dict], record: dict) -> tuple[str, str]:
    """(running | finished | stopped | failed, the error line if it failed)."""
    if record:
        if record.get("exit") is None and pid_alive(record.get("pid")):
            return "running", ""
        code = record.get("exit")
        if code == 0:
            return "finished", ""
        if code in (130, -15, -2) or record.get("stop_requested"):
            return "stopped", ""
        return "failed", last_error(log_path(root, run_id))
    if (folder / "lmtune.json").is_file():
        return "finished", ""
    if rows and time.time() - _mtime(folder) < 120:
        return "running", ""  # started from a terminal: still writing metrics
    if (folder / "checkpoints").is_dir():
        return "stopped", ""
    return "failed", ""


def last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def total_steps(root: Path, run_id: str, config: dict) -> int | None:
    """The run's step count: from the child's progress bar (it knows the data size), else --max-steps."""
    log = log_path(root, run_id)
    if log.is_file():
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            found = _PROGRESS.findall(f.read().decode(errors="replace"))
        if found:
            return int(found[-1][1])
    return config.get("max_steps") or None


def summary(root: Path, run_id: str) -> dict:
    """One row of the Runs page."""
    folder = root / run_id
    info, rows, record = read_info(folder), read_metrics(folder), read_record(root, run_id)
    config = info.get("config") or record.get("config") or {}
    verb = info.get("verb") or record.get("verb", "")
    state, error = state_of(root, run_id, folder, rows, record)
    train = [r for r in rows if "loss" in r]
    metric, mode = watched(config)
    vals = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
    best = (max(vals) if mode == "max" else min(vals)) if vals else None
    step = train[-1]["step"] if train else 0
    total = total_steps(root, run_id, config)
    wall = wall_time(train)
    eta = None
    if state == "running" and total and train:
        seg = current_segment(train)
        done = seg[-1]["step"] - seg[0]["step"] + 1
        eta = seg[-1]["elapsed_s"] / done * (total - step) if done else None
    return {"id": run_id, "verb": verb, "model": config.get("model") or config.get("model_size", ""),
            "task": config.get("task", "lm" if verb == "pretrain" else ""), "state": state, "error": error,
            "step": step, "total": total, "metric": metric, "best": best,
            "loss": train[-1]["loss"] if train else None, "wall_s": wall, "eta_s": eta,
            "started": info.get("started") or record.get("started", ""),
            "has_model": (folder / "lmtune.json").is_file()}


def current_segment(train: list[dict]) -> list[dict]:
    """The rows since the last resume (elapsed_s restarts at each start)."""
    start = 0
    for i in range(1, len(train)):
        if train[i].get("elapsed_s", 0) < train[i - 1].get("elapsed_s", 0):
            start = i
    return train[start:]


def wall_time(train: list[dict]) -> float:
    """Training time over all starts of the run (each start's last elapsed_s)."""
    total, prev = 0.0, 0.0
    for r in train:
        e = r.get("elapsed_s", 0.0)
        if e < prev:
            total += prev
        prev = e
    return total + prev


_SUMMARIES: dict[tuple, dict] = {}  # (workspace, id, stats of its files) -> summary of a run that has ended


def _stats(root: Path, run_id: str) -> tuple:
    out = []
    for p in (root / run_id / "metrics.jsonl", root / run_id / "run.json", root / run_id / "lmtune.json",
              root / RECORDS / f"{record_name(run_id)}.json", log_path(root, run_id)):
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return (str(root), run_id, *out)


def list_runs(root: Path) -> list[dict]:
    """Every run's summary; those of ended runs are kept while their files stay unchanged."""
    result = []
    for run_id in find_runs(root):
        key = _stats(root, run_id)
        s = _SUMMARIES.get(key) or summary(root, run_id)
        if s["state"] != "running":  # a running run changes by the second; one that ended, with its files
            _SUMMARIES[key] = s
        result.append(s)
    return result


def argv_of(verb: str, config: dict) -> list[str]:
    """The verb's options that reproduce `config`: every value that differs from the default."""
    cls = CONFIGS.get(verb)
    if cls is None:
        return []
    argv = []
    for name, f in options.fields_of(cls).items():
        if name not in config or name in ("resume", "overwrite"):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = config[name]
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [f"{flag}={value}"]
    return argv


def command_of(verb: str, config: dict) -> str:
    return shlex.join(["lmtune", verb, *argv_of(verb, config)])


def list_sweeps(root: Path) -> list[str]:
    """Folders whose run folders are a sweep's trials (DIR/trial-NNN, as `lmtune sweep` writes them)."""
    return sorted({r.rsplit("/", 1)[0] for r in find_runs(root) if "/" in r and r.rsplit("/", 1)[1].startswith("trial-")})


def sweep_table(root: Path, sweep_id: str) -> dict:
    """The sweep's trials as they stand (live, from their run folders): the settings that differ between
    trials, state and best validation value of each; and the report's importance plot once written."""
    trials = sorted(r for r in find_runs(root) if r.startswith(sweep_id + "/trial-") and r.count("/") == sweep_id.count("/") + 1)
    configs = {t: read_info(root / t).get("config") or read_record(root, t).get("config") or {} for t in trials}
    keys = sorted({k for c in configs.values() for k in c})
    varied = [k for k in keys if k != "out" and len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
    rows = []
    for t in trials:
        s = summary(root, t)
        rows.append({**s, "params": {k: configs[t].get(k) for k in varied}})
    folder = root / sweep_id
    return {"id": sweep_id, "varied": varied, "trials": rows,
            "metric": rows[0]["metric"] if rows else "", "mode": watched(next(iter(configs.values()), {}))[1],
            "importance": f"{sweep_id}/importance.png" if (folder / "importance.png").is_file() else "",
            "done": (folder / "trials.csv").is_file()}
