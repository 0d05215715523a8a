"""Runs the studio starts: each is `python -m lmtune VERB ARGV` in a child process (an argv list, never a
shell string), so it runs the same verb function as the command line, and the studio can stop (SIGTERM:
the loop finishes its step, checkpoints and exits 130), resume (the same argv + --resume) and outlive it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmtune.config.options import to_dict
from lmtune.errors import LmtuneError
from lmtune.studio import runs as R

_LOCK = threading.Lock()  # launching is check-then-start: two clicks must not both pass the check


def run_id_of(workspace: Path, out: str) -> str:
    return Path(out).resolve().relative_to(workspace).as_posix()


def launch(workspace: Path, verb: str, argv: list[str], cfg, parallel: bool = False) -> str:
    """Start the run in a child process; returns its id. One run per model at a time unless `parallel`."""
    run_id = run_id_of(workspace, cfg.out)
    with _LOCK:
        model = getattr(cfg, "model", None)
        for other in R.find_runs(workspace):
            s = R.summary(workspace, other)
            if s["state"] != "running":
                continue
            if other == run_id:
                raise LmtuneError(f"run {run_id} is already running: stop it first")
            if model and s["model"] == model and not parallel:
                raise LmtuneError(f"model {model} is already training in run {other}: wait for it, stop it, "
                                  "or tick 'run in parallel'")
        log = R.log_path(workspace, run_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"$ {shlex.join(['lmtune', verb, *argv])}\n".encode())
            f.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            child = subprocess.Popen([sys.executable, "-m", "lmtune", verb, *argv], stdout=f,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)  # a Ctrl-C to the studio does not stop it
        record = {"pid": child.pid, "verb": verb, "argv": argv, "config": to_dict(cfg), "exit": None,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        R.write_record(workspace, run_id, record)
    threading.Thread(target=_wait, args=(workspace, run_id, child), daemon=True).start()
    return run_id


def _wait(workspace: Path, run_id: str, child: subprocess.Popen) -> None:
    code = child.wait()
    record = R.read_record(workspace, run_id)
    if record.get("pid") == child.pid:
        record["exit"] = code
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        R.write_record(workspace, run_id, record)


def stop(workspace: Path, run_id: str) -> None:
    """SIGTERM to the run's process: it saves a checkpoint after the current step and exits."""
    record = R.read_record(workspace, run_id)
    if not record or record.get("exit") is not None or not R.pid_alive(record.get("pid")):
        raise LmtuneError(f"run {run_id} is not running (only runs this studio started can be stopped here)")
    record["stop_requested"] = True
    R.write_record(workspace, run_id, record)
    os.kill(record["pid"], signal.SIGTERM)


def resume_argv(workspace: Path, run_id: str) -> tuple[str, list[str]]:
    """(verb, argv) that continues the run from its last checkpoint: its own settings, plus --resume."""
    record = R.read_record(workspace, run_id)
    info = R.read_info(workspace / run_id)
    verb = info.get("verb") or record.get("verb")
    if verb not in R.TRAINING_VERBS:
        raise LmtuneError(f"run {run_id} is not a training run: nothing to resume")
    argv = record.get("argv") or R.argv_of(verb, info.get("config", {}))
    argv = [a for a in argv if a not in ("--overwrite", "--resume", "--no-resume")]
    return verb, argv + ["--resume"]
