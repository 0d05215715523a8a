"""What a run leaves behind to read: metrics.jsonl (one JSON object a step), run.json, a loss curve PNG."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, out: Path, resume_step: int | None = None):
        Path(out).mkdir(parents=True, exist_ok=True)
        self.path = Path(out) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def write_run_info(out: Path, verb: str, cfg: dict, extra: dict) -> None:
    import torch
    import transformers

    info = {"verb": verb, "config": cfg, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **extra}
    (Path(out) / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def plot_loss(out: Path) -> Path | None:
    """loss.png next to metrics.jsonl: training loss per step, validation loss where measured."""
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
