"""Checkpoints: written atomically (a temporary folder, then a rename), the last K kept.

A checkpoint holds what a resumed run needs to continue exactly: the trainable weights (all of them for
a full fine-tune, the adapter for LoRA), the optimizer and scheduler states, every RNG state, and the
step. The data position follows from the step, because the data order is a pure function of the seed.

Weights and optimizer states go through `torch.distributed.checkpoint` (DCP) keyed by parameter name,
in every mode: one process, DDP or FSDP2. DCP writes each rank's shards and reshards on load, so a run
checkpointed with 2 processes resumes with 1 (and the reverse), with or without FSDP.

Each checkpoint ends with manifest.json (every file's size and CRC-32), written last. `--resume` checks
it and, when the newest checkpoint is damaged (a full disk, a copy cut short, a bad sector), falls back
to the newest intact one and says so. A resume whose settings would change the model's shapes or the data
(model, LoRA rank/targets, max length, data hashes...) is refused before anything is rewritten.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import random
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import torch

from lmtune import files
from lmtune.errors import LmtuneError
from lmtune.train import distributed

PREFIX = "step-"
META = "meta.pt"
MANIFEST = "manifest.json"
# settings a resumed run must share with the run it continues: they fix the shapes or the data
RESUME_KEYS = ("model", "model_size", "model_config", "tokenizer", "vocab_size", "task", "lora", "lora_r",
               "lora_targets", "max_length", "pack", "text_column", "label_column", "source_column",
               "target_column", "question_column", "context_column")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    d = checkpoint_dir(out)
    found = [p for p in d.glob(f"{PREFIX}*") if (p / META).is_file()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # frozen weights (a LoRA base) are not part of the run's state: they come from the base model.
    # ignore_frozen_params misses two kinds, so they are dropped here by name: a frozen weight's second
    # name (a tied output layer, "lm_head.weight": 113 MB of SmolLM2 in every LoRA checkpoint), and what a
    # 4-bit base (QLoRA) writes under a frozen weight's name ("....weight.absmax", ".quant_map", ...), which
    # loading refuses as unexpected
    model = distributed.unwrap(model)
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    under = tuple(f"{n}." for n in frozen)
    msd = {k: v for k, v in msd.items() if k not in frozen and not k.startswith(under)}
    return {"model": msd, "optim": osd}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, keep: int, extra: dict | None = None) -> Path:
    """Every rank calls this; rank 0 writes the small state and the manifest, and renames the folder into place.
    A failed write (a full disk, a read-only place) is one line, and leaves no temporary folder."""
    import torch.distributed.checkpoint as dcp

    w = distributed.world()
    d = checkpoint_dir(out)
    final, tmp = d / f"{PREFIX}{step:08d}", d / f".tmp-{PREFIX}{step:08d}"
    previous = list_checkpoints(out)
    resume_hint = (f"the previous checkpoint {previous[-1]} is intact: fix that, then run again with --resume"
                   if previous else "no earlier checkpoint: fix that, then run again with --overwrite")
    with files.writing(f"checkpoint {final}", tmp if w.is_main else None, hint=resume_hint):
        if w.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
            dcp.save(_states(model, optimizer), checkpoint_id=str(tmp / "dcp"))
        if w.is_main:
            meta = {"step": step, "scheduler": scheduler.state_dict(), "world_size": w.size, "extra": extra or {},
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            with open(tmp / META, "wb") as f:
                torch.save(meta, f)
                f.flush()
                os.fsync(f.fileno())
        distributed.barrier()  # every rank's shards are on disk
        if w.is_main:
            write_manifest(tmp)  # written last: a folder without an intact manifest is not a checkpoint
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _crc(path: Path) -> str:
    """CRC-32 of a file (about 1 GB/s: a full checkpoint of a 135M model is checked in a second or two)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> None:
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc(p)}
               for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


_VERIFIED: dict[str, str | None] = {}  # a checkpoint checked once per process is not hashed again


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when its manifest matches every file.
    A checkpoint without a manifest (an older lmtune wrote it) is trusted if its files are there."""
    path = Path(path)
    key = str(path.resolve())
    if key in _VERIFIED:
        return _VERIFIED[key]
    why = None
    manifest = path / MANIFEST
    if not (path / META).is_file():
        why = f"no {META}"
    elif not manifest.is_file():
        why = None if (path / "dcp" / ".metadata").is_file() else "no manifest and no dcp/.metadata"
    else:
        try:
            listed = json.loads(manifest.read_text())["files"]
            for name, want in listed.items():
                f = path / name
                if not f.is_file():
                    why = f"{name} is missing"
                elif f.stat().st_size != want["bytes"]:
                    why = f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
                elif _crc(f) != want["crc32"]:
                    why = f"{name} does not match its checksum"
                if why:
                    break
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{MANIFEST} is unreadable ({type(e).__name__})"
    _VERIFIED[key] = why
    return why


def intact_checkpoints(out: Path, say: bool = True) -> list[Path]:
    """The checkpoints whose manifest matches, oldest first; each damaged one is named once on stderr."""
    good = []
    for p in list_checkpoints(out):
        why = damage(p)
        if why is None:
            good.append(p)
        elif say and distributed.world().is_main and key_once(p):
            print(f"warning: checkpoint {p} is damaged ({why}); it is skipped", file=sys.stderr)
    return good


_SAID: set[str] = set()


def key_once(p: Path) -> bool:
    k = str(Path(p).resolve())
    if k in _SAID:
        return False
    _SAID.add(k)
    return True


def resume_latest(out: Path, model, optimizer, scheduler) -> tuple[dict, Path]:
    """Restore the newest intact checkpoint; one that passes its manifest but still fails to load (an
    older checkpoint without a manifest) is skipped the same way. Returns (meta, its path)."""
    tried = []
    for path in reversed(list_checkpoints(out)):
        why = damage(path)
        if why is None:
            try:
                with files.loading(path, "checkpoint", "it is skipped"):
                    meta = load_checkpoint(path, model, optimizer, scheduler)
            except LmtuneError as e:
                if "does not fit this model" in str(e):
                    raise
                why = str(e)
            else:
                if tried and distributed.world().is_main:
                    print(f"warning: resuming from {path.name}, the newest intact checkpoint "
                          f"({'; '.join(tried)})", file=sys.stderr)
                return meta, path
        tried.append(f"{path.name} is damaged: {why}")
    raise LmtuneError(f"--resume: no intact checkpoint in {checkpoint_dir(out)} ({'; '.join(tried) or 'none'}); "
                      "start afresh with --overwrite")


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
    meta = torch.load(Path(path) / META, weights_only=True)  # no pickled code from a folder someone handed over
    scheduler.load_state_dict(meta["scheduler"])
    random.setstate(meta["rng"]["python"])
    torch.set_rng_state(meta["rng"]["torch"])
    if meta["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(meta["rng"]["cuda"])
    return meta


def check_out_dir(out: str, resume: bool, overwrite: bool, inputs: list | None = None,
                  settings: dict | None = None) -> None:
    """Refuse an --out that holds another run, that is or holds one of the `inputs` (files.local_inputs),
    or (with --resume) whose run has other `settings` or no intact checkpoint; before anything is written."""
    p = Path(out)
    files.check_outputs([("--out", out)], inputs or [])
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise LmtuneError(f"--out {out} is a file: give a folder")
    busy = p.is_dir() and any(p.iterdir())
    if resume:
        if not list_checkpoints(p):
            raise LmtuneError(f"--resume: {out} holds no checkpoint to resume from (checkpoints/step-*)")
        if not intact_checkpoints(p, say=False):
            newest = list_checkpoints(p)[-1]
            raise LmtuneError(f"--resume: every checkpoint in {checkpoint_dir(p)} is damaged (the newest, "
                              f"{newest.name}: {damage(newest)}); start afresh with --overwrite")
        if settings is not None:
            check_resume_settings(p, settings)
    elif busy and not overwrite:
        raise LmtuneError(f"--out {out} already holds a run: add --resume to continue it, "
                          "--overwrite to replace it, or choose another folder")
    elif busy and not (p / files.RUN_FILE).is_file():
        raise LmtuneError(f"--out {out} is not an lmtune run (no {files.RUN_FILE}): --overwrite only replaces "
                          "lmtune's own runs; empty it yourself or choose another folder")
    if distributed.world().is_main:
        probe_writable(p)
    distributed.barrier()  # every rank has looked before rank 0 creates anything


def probe_writable(out: Path) -> None:
    """A read-only or missing place for --out is one line now, not after the data is prepared or encoded."""
    import tempfile

    parent = next((a for a in [out, *out.parents] if a.is_dir()), Path("."))
    try:
        fd, name = tempfile.mkstemp(prefix=".lmtune-probe-", dir=parent)
    except OSError as e:
        raise files.write_error(f"--out {out}", e, "choose a writable place") or LmtuneError(
            f"cannot write --out {out}: {e}") from None
    os.close(fd)
    os.unlink(name)


def check_resume_settings(out: Path, settings: dict) -> None:
    """A resumed run must have the shapes and data of the run it continues (its run.json)."""
    from lmtune.track import data_hashes

    info = Path(out) / files.RUN_FILE
    if not info.is_file():
        return
    try:
        before = json.loads(info.read_text())
        old = before["config"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {info} is unreadable: the settings of the run being resumed cannot be compared",
              file=sys.stderr)
        return
    differ = []
    for key in RESUME_KEYS:
        if key in old and key in settings and not _same_setting(old[key], settings[key]):
            differ.append(f"{key} {old[key]!r} -> {settings[key]!r}")
    old_hashes = sorted((before.get("data_sha256") or {}).values())
    new_hashes = sorted(data_hashes(settings).values())
    if old_hashes and new_hashes and old_hashes != new_hashes:
        differ.append(f"data sha256 {','.join(h[:12] for h in old_hashes)} -> {','.join(h[:12] for h in new_hashes)}")
    if differ:
        raise LmtuneError(f"--resume: these settings differ from the run in {out} ({'; '.join(differ)}): resume "
                          "with the run's own settings, or start afresh with --overwrite or another --out")


def _same_setting(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and Path(a).exists() and Path(b).exists():
        return files._same_file(Path(a).resolve(), Path(b).resolve())
    return False


@contextmanager
def discard_if_failed_early(out: str | Path, resume: bool):
    """A new run that fails before its first checkpoint (a full disk, a NaN loss at step 1) leaves nothing to
    resume: its folder is removed, so the corrected command runs without --overwrite."""
    try:
        yield
    except LmtuneError:
        if not resume and distributed.world().is_main and not list_checkpoints(Path(out)):
            shutil.rmtree(out, ignore_errors=True)
        raise


def create_out_dir(out: str, resume: bool, overwrite: bool, prepare=None) -> Path:
    """The output folder, once the inputs have been checked. A new run is made in a temporary folder beside
    --out, `prepare(folder)` writes its first files (run.json), and it is then moved into place in one step
    (replacing the old run with --overwrite), so --out always holds one whole run or none. On --resume
    `prepare` runs on --out itself."""
    p = Path(out)
    if distributed.world().is_main:
        if resume:
            with files.writing(f"--out {out}"):
                p.mkdir(parents=True, exist_ok=True)
            if prepare:
                prepare(p)
        elif p.is_dir() and (not any(p.iterdir()) or os.path.ismount(p)):
            # an empty folder has nothing to replace, and a mount point (a container's volume) cannot be
            # renamed: the run is made in place (what a mount point held, an lmtune run, was checked)
            with files.writing(f"--out {out}"):
                for child in list(p.iterdir()):
                    files.remove(child)
                if prepare:
                    prepare(p)
        else:
            tmp = files.new_sibling(p)
            with files.writing(f"--out {out}", tmp):
                if prepare:
                    prepare(tmp)
            files.swap_in(tmp, p)
    distributed.barrier()
    return p
