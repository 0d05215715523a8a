"""What a run leaves behind to read: metrics.jsonl (one JSON object a step), TensorBoard event files
beside it, run.json (config, data hashes, versions, hardware), a loss curve PNG. With --report-to wandb
or mlflow (when installed) every metrics line goes there too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

from lmtune import files

_NOTED: set[str] = set()  # one-time notes (a missing optional package) already printed


def _note_once(key: str, text: str) -> None:
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"note: {text}", file=sys.stderr)


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the checkpoint's step are dropped first.
    `report_to` ('wandb', 'mlflow' or both, comma-separated) adds those trackers, given `config` (the run's
    settings, as run.json records them) to show beside the curves."""

    def __init__(self, out: Path, resume_step: int | None = None, report_to: str = "", config: dict | None = None):
        self.path = Path(out) / "metrics.jsonl"
        with files.writing(str(self.path)):
            Path(out).mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                kept = [r for r in read_metrics(out) if r.get("step", 0) <= resume_step]
                files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            elif self.path.exists():
                self.path.unlink()
        trackers = _trackers(Path(out), report_to, config or {})
        self.sinks = [s for s in (_tensorboard(Path(out), resume_step), *trackers) if s]

    def write(self, record: dict) -> None:
        with files.writing(str(self.path)), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink(record.get("step", 0), scalars)


def _tensorboard(out: Path, resume_step: int | None):
    """A sink writing TensorBoard scalars (train/loss, val/val_loss, ...) into the run folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _note_once("tensorboard", "tensorboard is not installed: no event files (pip install 'lmtune[track]')")
        return None
    writer = SummaryWriter(str(out), purge_step=resume_step)

    def sink(step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            writer.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, step)
        writer.flush()  # a few small records: cheap, and nothing is lost if the run is killed
    return sink


def _trackers(out: Path, report_to: str, cfg: dict) -> list:
    """Sinks for the trackers --report-to names (wandb, mlflow); `cfg` is logged with the run."""
    sinks = []
    for name in [t.strip() for t in report_to.split(",") if t.strip()]:
        try:
            tracker = __import__(name)
        except ImportError:
            _note_once(name, f"--report-to {name}: {name} is not installed, skipped (pip install {name})")
            continue
        if name == "wandb":
            run = tracker.init(project=os.environ.get("WANDB_PROJECT", "lmtune"), name=out.name, config=cfg,
                               dir=str(out), resume="allow")
            sinks.append(lambda step, scalars: run.log(scalars, step=step))
        elif name == "mlflow":
            if tracker.active_run() is None:
                tracker.start_run(run_name=out.name)
                tracker.log_params({k: str(v)[:250] for k, v in cfg.items()})
            sinks.append(lambda step, scalars: tracker.log_metrics(scalars, step=step))
    return sinks


def read_metrics(out: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn final line (a run killed while writing it) is dropped with a
    warning, as is any other line that is not a JSON object (named by its number)."""
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return []
    lines = files.read_text(p).splitlines()
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), (int, float)):
            rows.append(row)
        else:
            bad.append(n)
    if bad:
        what = "its torn final line" if bad == [len(lines)] else f"line(s) {', '.join(map(str, bad[:5]))}"
        print(f"warning: {p}: {what} is not a JSON record and was dropped", file=sys.stderr)
    return rows


def write_run_info(out: Path, verb: str, cfg: dict, extra: dict) -> None:
    import torch
    import transformers

    from lmtune.train import distributed

    if not distributed.world().is_main:
        return
    info = {"verb": verb, "config": cfg, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "data_sha256": data_hashes(cfg), "packages": package_versions(), "hardware": hardware(), **extra}
    files.write_text(Path(out) / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def data_hashes(cfg: dict) -> dict:
    """sha256 of every data file the config names (translate's SRC,TGT pair counts as two files)."""
    hashes = {}
    for key in ("data", "eval_data"):
        for name in str(cfg.get(key) or "").split(","):
            if name and Path(name).is_file():
                h = hashlib.sha256()
                with open(name, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                hashes[name] = h.hexdigest()
    return hashes


def package_versions() -> dict:
    versions = {}
    for name in ("lmtune", "torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "optuna"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def hardware() -> dict:
    """CPU model and count, memory, GPU: enough to compare speeds across machines."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "gpus": gpus}


def plot_loss(out: Path) -> Path | None:
    """loss.png next to metrics.jsonl: training loss per step, validation loss where measured."""
    from lmtune.train import distributed

    if not distributed.world().is_main:
        return None
    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "loss.png"
    tmp = path.with_name(".loss.tmp.png")
    try:
        with files.writing(str(path), tmp):
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
