"""Checkpoints: written atomically (a temporary folder, then a rename), the last K kept.

A checkpoint holds what a resumed run needs to continue exactly: the trainable weights (all of them for
a full fine-tune, the adapter for LoRA), the optimizer and scheduler states, every RNG state, and the
step. The data position follows from the step, because the data order is a pure function of the seed.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from lmtune.errors import LmtuneError

PREFIX = "step-"


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    d = checkpoint_dir(out)
    found = [p for p in d.glob(f"{PREFIX}*") if (p / "state.pt").is_file()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int, extra: dict | None = None) -> Path:
    d = checkpoint_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{PREFIX}{step:08d}"
    tmp = d / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        "step": step,
        "model": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "extra": extra or {},
    }
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint in place; returns its state (step, extra)."""
    state = torch.load(Path(path) / "state.pt", weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n in state["model"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in state["model"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that holds another run, before anything is loaded or written."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise LmtuneError(f"--out {out} is a file: give a folder")
    busy = p.is_dir() and any(p.iterdir())
    if resume:
        if not list_checkpoints(p):
            raise LmtuneError(f"--resume: {out} holds no checkpoint to resume from (checkpoints/step-*)")
    elif busy and not overwrite:
        raise LmtuneError(f"--out {out} already holds a run: add --resume to continue it, "
                     "--overwrite to replace it, or choose another folder")


def create_out_dir(out: str, resume: bool, overwrite: bool) -> Path:
    """Make the output folder (emptied with --overwrite), once the inputs have been checked."""
    p = Path(out)
    if overwrite and not resume and p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p
