"""Checkpoints: written atomically (a temporary folder, then a rename), the last K kept.

A checkpoint holds what a resumed run needs to continue exactly: the trainable weights (all of them for
a full fine-tune, the adapter for LoRA), the optimizer and scheduler states, every RNG state, and the
step. The data position follows from the step, because the data order is a pure function of the seed.

Weights and optimizer states go through `torch.distributed.checkpoint` (DCP) keyed by parameter name,
in every mode: one process, DDP or FSDP2. DCP writes each rank's shards and reshards on load, so a run
checkpointed with 2 processes resumes with 1 (and the reverse), with or without FSDP.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch

from lmtune.errors import LmtuneError
from lmtune.train import distributed

PREFIX = "step-"
META = "meta.pt"


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    d = checkpoint_dir(out)
    found = [p for p in d.glob(f"{PREFIX}*") if (p / META).is_file()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # frozen weights (a LoRA base) are not part of the run's state: they come from the base model
    opts = StateDictOptions(ignore_frozen_params=True)
    msd, osd = get_state_dict(distributed.unwrap(model), optimizer, options=opts)
    return {"model": msd, "optim": osd}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int, extra: dict | None = None) -> Path:
    """Every rank calls this; rank 0 writes the small state and renames the folder into place."""
    import torch.distributed.checkpoint as dcp

    w = distributed.world()
    d = checkpoint_dir(out)
    final, tmp = d / f"{PREFIX}{step:08d}", d / f".tmp-{PREFIX}{step:08d}"
    if w.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
            dcp.save(_states(model, optimizer), checkpoint_id=str(tmp / "dcp"))
        # fault injection for tests: widen the window in which a kill finds a half-written checkpoint
        time.sleep(float(os.environ.get("LMTUNE_TEST_CHECKPOINT_DELAY_S", "0")))
        if w.is_main:
            meta = {"step": step, "scheduler": scheduler.state_dict(), "world_size": w.size, "extra": extra or {},
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            with open(tmp / META, "wb") as f:  # written last: a folder without it is incomplete
                torch.save(meta, f)
                f.flush()
                os.fsync(f.fileno())
        distributed.barrier()
        if w.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        raise LmtuneError(f"no space left on the device while writing checkpoint {final}; "
                          f"{'the previous checkpoint ' + str(previous[-1]) + ' is intact' if previous else 'no earlier checkpoint'}: "
                          "free some space, then run again with --resume") from None
    distributed.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint in place (whatever world size wrote it); returns its meta (step, extra)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    states = _states(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(states, checkpoint_id=str(Path(path) / "dcp"))
    # strict=False: the frozen weights are missing on purpose; anything unexpected is still an error
    result = set_state_dict(distributed.unwrap(model), optimizer, model_state_dict=states["model"],
                            optim_state_dict=states["optim"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if result is not None and result.unexpected_keys:
        raise LmtuneError(f"checkpoint {path} does not fit this model: unexpected {result.unexpected_keys[:3]}")
    meta = torch.load(Path(path) / META, weights_only=False)
    scheduler.load_state_dict(meta["scheduler"])
    random.setstate(meta["rng"]["python"])
    torch.set_rng_state(meta["rng"]["torch"])
    if meta["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(meta["rng"]["cuda"])
    return meta


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
    distributed.barrier()  # every rank has looked before rank 0 creates anything


def create_out_dir(out: str, resume: bool, overwrite: bool) -> Path:
    """Make the output folder (emptied with --overwrite), once the inputs have been checked."""
    p = Path(out)
    if distributed.world().is_main:
        if overwrite and not resume and p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return p
