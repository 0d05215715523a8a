"""Where lmtune meets the file system: inputs are never overwritten, writes fail in one line and leave no
temporary files, damaged model files and text that is not UTF-8 are named in one line.

The four boundaries every verb goes through:
- `check_outputs(outputs, inputs)`: before anything is written, an output that is, contains or lies inside
  an input (data, eval data, model or adapter folder, config file) is refused, `--overwrite` or not.
- `writing(what, *temporaries)`: a write that fails because the place is read-only, full, missing or not
  ours becomes one `LmtuneError` line; its temporary files are removed first.
- `loading(path, what)`: a model, adapter, tokenizer, GGUF or checkpoint that the libraries cannot read
  (safetensors, gguf, torch.distributed.checkpoint, zip/pickle, JSON, transformers' config checks) is
  one line naming the file and what to do.
- `not_utf8(path)`: the line and byte of the first byte that is not UTF-8.
This module imports nothing heavy.
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import gzip
import json
import os
import re
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path

from lmtune.errors import LmtuneError

RUN_FILE = "run.json"          # what marks a folder as an lmtune run (finetune, pretrain, merge, export)
MODEL_MARK = "lmtune.json"     # written next to every model lmtune saves


# ----------------------------------------------------------------------------------------------
# Inputs are never outputs.

def _real(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.realpath(os.path.expanduser(str(path)))))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and bind mounts too
    except OSError:
        return a == b


def local_inputs(**named) -> list[tuple[str, Path]]:
    """(flag, path) for each named input that exists on disk (a data value may be 'SRC,TGT'). Names that
    are not paths here (an alias, a hub id) are left out: they cannot be overwritten."""
    found = []
    for flag, value in named.items():
        for part in ([value] if isinstance(value, Path) else str(value or "").split(",")):
            if part and Path(str(part)).expanduser().exists():
                found.append((f"--{flag.replace('_', '-')}", _real(part)))
    return found


def check_outputs(outputs: list[tuple[str, str | Path]], inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (before anything is written)."""
    for oflag, out in outputs:
        o = _real(out)
        for iflag, i in inputs:
            if o == i or _same_file(o, i):
                relation = "is"
            elif i.is_relative_to(o):
                relation = "contains"
            elif o.is_relative_to(i):
                relation = "lies inside"
            else:
                continue
            raise LmtuneError(f"{oflag} {out} {relation} the input {iflag} {i}: lmtune never writes over its "
                              f"inputs; choose an {oflag} outside it")


def check_replaceable(out: str | Path, overwrite: bool, flag: str = "--out") -> bool:
    """Whether --out holds something (True) or can be made (False). What it holds may be replaced only with
    --overwrite, and only when it is an lmtune run or model folder (run.json or lmtune.json in it) or a
    file (a single output such as predictions.jsonl or model.gguf)."""
    p = Path(out)
    if not p.exists() and not p.is_symlink():
        return False
    if p.is_dir() and not any(p.iterdir()):
        return False
    if not overwrite:
        raise LmtuneError(f"{flag} {out} already exists: choose another {flag} or add --overwrite to replace it")
    if p.is_dir() and not ((p / RUN_FILE).is_file() or (p / MODEL_MARK).is_file()):
        raise LmtuneError(f"{flag} {out} is a folder that lmtune did not write (no {RUN_FILE}): --overwrite only "
                          "replaces lmtune's own runs; empty it yourself or choose another folder")
    return True


def new_sibling(out: Path, kind: str = "new") -> Path:
    """A fresh temporary folder next to `out` (the same file system, so a rename moves it into place)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"
    with writing(f"--out {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0
    return ok


def swap_in(tmp: Path, out: Path) -> Path:
    """Put the finished folder (or file) `tmp` at `out`, replacing what `out` held in one step where the
    system allows (a reader sees the old one or the new one, never a mix)."""
    tmp, out = Path(tmp), Path(out)
    with writing(str(out), tmp):
        if not out.exists() and not out.is_symlink():
            os.rename(tmp, out)
        elif out.is_dir() and os.path.ismount(out):  # a mount point cannot be renamed: replace what it holds
            for child in list(out.iterdir()):
                remove(child)
            for child in list(tmp.iterdir()):
                shutil.move(str(child), str(out / child.name))
            remove(tmp)
        elif out.is_dir() and tmp.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            remove(tmp)  # after the exchange it holds the old folder
        elif out.is_dir() and not out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            remove(old)
        else:
            os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# Writes: one line for a place that cannot be written, and no temporary files left.

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space and run again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and run again",
    errno.EROFS: "the file system is read-only; choose a writable place",
    errno.EACCES: "permission denied; choose a place you may write to",
    errno.EPERM: "operation not permitted; choose a place you may write to",
    errno.ENOENT: "a folder on the way does not exist (or was removed while writing)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EEXIST: "it already exists",
}


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError inside `e`: itself, one torch.distributed.checkpoint wrapped (CheckpointException holds
    each rank's exception), or one it was raised from."""
    seen = 0
    while e is not None and seen < 8:
        seen += 1
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                inner = value[0] if isinstance(value, tuple) else value
                found = os_error_of(inner) if isinstance(inner, BaseException) else None
                if found is not None:
                    return found
            return None
        found = re.search(r"os error (\d+)\)?", str(e))  # safetensors' and torch's C++ errors quote errno
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        if "No space left on device" in str(e):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        e = e.__cause__ or e.__context__
    return None


def write_error(what: str, e: BaseException, hint: str = "") -> LmtuneError | None:
    """The one-line error for a failed write of `what`, or None when `e` is not a file-system fault."""
    os_err = os_error_of(e)
    if os_err is None:
        return None
    reason = WRITE_ERRNOS.get(os_err.errno) or f"{os_err.strerror or os_err}"
    if "No space left" in str(os_err):
        reason = WRITE_ERRNOS[errno.ENOSPC]
    name = str(os_err.filename or "")
    place = f" ({name})" if name and name not in what and "/." not in name else ""  # not our temporary names
    return LmtuneError(f"cannot write {what}{place}: {reason}{'; ' + hint if hint else ''}")


def remove(*paths) -> None:
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


@contextmanager
def writing(what: str, *temporaries, hint: str = ""):
    """Run a write of `what`; on any failure remove `temporaries`, and turn a file-system fault (also one
    that torch.distributed.checkpoint wrapped in a CheckpointException) into one LmtuneError line."""
    try:
        yield
    except LmtuneError:
        remove(*temporaries)
        raise
    except BaseException as e:
        remove(*temporaries)
        err = write_error(what, e, hint)
        if err is None:
            raise
        raise err from None


def write_text(path: str | Path, text: str, what: str | None = None) -> Path:
    """Write a small text file atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    with writing(what or str(path), tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Reading text: the first byte that is not UTF-8, by line and byte.

def _raw_open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def not_utf8(path: str | Path, what: str = "") -> LmtuneError:
    """The error for a file that is not UTF-8: '{path}: not UTF-8 (line N, byte B)', found by streaming."""
    p = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, where = 1, 0, ""
    try:
        with _raw_open(p) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    pending = len(e.object) - len(chunk)
                    line += e.object[:e.start].count(b"\n")
                    where = f" (line {line}, byte {offset - pending + e.start})"
                    break
                line += chunk.count(b"\n")
                offset += len(chunk)
            else:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    where = f" (line {line}, byte {offset - 1}: the file ends inside a character)"
    except (OSError, EOFError):
        pass
    label = f"{what} {path}" if what else f"{path}"
    return LmtuneError(f"{label}: not UTF-8{where}; save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def read_text(path: str | Path, what: str = "") -> str:
    """A small text file (a config, a JSON file of a model) as str; one line if it is missing or not UTF-8."""
    p = Path(path)
    label = f"{what} {path}" if what else f"{path}"
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(p, what) from None
    except IsADirectoryError:
        raise LmtuneError(f"{label} is a folder: give a file") from None
    except FileNotFoundError:
        raise LmtuneError(f"{label} not found: check the path") from None
    except OSError as e:
        raise LmtuneError(f"{label}: cannot read it ({e.strerror})") from None


def read_json(path: str | Path, what: str = "", kind: type = dict):
    """A JSON file that must hold a `kind` (an object by default); one line for anything else."""
    text = read_text(path, what)
    label = f"{what} {path}" if what else f"{path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmtuneError(f"{label}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged or cut short") \
            from None
    except RecursionError:
        raise LmtuneError(f"{label}: JSON nested too deeply") from None
    if not isinstance(data, kind):
        raise LmtuneError(f"{label}: expected a JSON {kind.__name__ if kind is not dict else 'object'}, "
                          f"got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Loading models: damaged files named in one line.

JSON_FILES = ("config.json", "adapter_config.json", MODEL_MARK, "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json", "model.safetensors.index.json")


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file: a length, a JSON table, and tensors that end where the file does."""
    size = path.stat().st_size
    fix = "the file is damaged or cut short: copy or download it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LmtuneError(f"{path}: not a safetensors file ({size} bytes); {fix}")
        n = struct.unpack("<Q", head)[0]
        if n == 0 or n > size - 8 or n > 100_000_000:
            raise LmtuneError(f"{path}: not a safetensors file (its header length {n} does not fit the "
                              f"{size}-byte file); {fix}")
        raw = f.read(n)
    try:
        table = json.loads(raw.decode("utf-8"))
        assert isinstance(table, dict)
        end = max((int(v["data_offsets"][1]) for k, v in table.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError, KeyError, TypeError, ValueError,
            IndexError):
        raise LmtuneError(f"{path}: not a safetensors file (unreadable header); {fix}") from None
    if 8 + n + end != size:
        raise LmtuneError(f"{path}: the file is {size} bytes but its tensors need {8 + n + end}; {fix}")


def check_model_folder(folder: str | Path) -> None:
    """The small files of a model or adapter folder are what they claim to be (read before any library
    sees them, so that a damaged one is named exactly)."""
    d = Path(folder)
    if not d.is_dir():
        return
    for name in JSON_FILES:
        if (d / name).exists():
            read_json(d / name, "model file")
    for f in sorted(d.glob("*.safetensors")):
        check_safetensors(f)


def check_gguf(path: str | Path) -> None:
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise LmtuneError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                          "give a .gguf model file (llama.cpp format)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise LmtuneError(f"{path}: GGUF version {version} is not one lmtune reads (2 or 3); the file is damaged "
                          "or from a newer llama.cpp")


def _reason(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # a CheckpointException: the first rank's own error
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Validation error for field 'x':" ...
    text = text.replace("Error while deserializing header: ", "")
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


@contextmanager
def loading(path: str | Path, what: str = "model", fix: str = "check that it is complete, or save it again"):
    """Load a model file (folder, adapter, tokenizer, GGUF, checkpoint): any error the libraries raise
    becomes one line naming it. (tokenizers raises plain Exception, DCP a CheckpointException that is a
    BaseException, transformers' config checks their own types: hence the broad catch, with the type named.)"""
    try:
        yield
    except (LmtuneError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:
        if type(e).__name__ not in ("CheckpointException",) and not isinstance(e, Exception):
            raise
        err = write_error(str(path), e) if isinstance(os_error_of(e), OSError) and \
            os_error_of(e).errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else None
        if err is not None:
            raise err from None
        raise LmtuneError(f"{what} {path} cannot be read ({_reason(e)}): {fix}") from None
