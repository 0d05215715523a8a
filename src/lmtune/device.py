"""Where a verb runs its model: the one function that turns `--device` into a torch device, and what
follows from it (bf16 by default on CUDA that has it, the device's peak memory).

    dev = resolve("auto")          # cuda (cuda:LOCAL_RANK under torchrun), else mps, else cpu
    bf16 = use_bf16(None, dev)     # --bf16 not given: on for a CUDA device with bf16, off elsewhere
"""

from __future__ import annotations

import os

from lmtune.errors import LmtuneError

CHOICES_HELP = ("Where to run the model: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps "
                "(under torchrun, cuda means each process's own GPU).")


def resolve(name: str = "auto"):
    """The torch.device for a --device value; a one-line error for one this machine does not have."""
    import torch

    name = (name or "auto").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise LmtuneError("--device mps: no Apple MPS device here; use --device auto or cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LmtuneError(f"--device {name}: no CUDA device here (torch {torch.__version__}, "
                              f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                              "use --device auto or cpu")
        index = local if name == "cuda" else name.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise LmtuneError(f"--device {name}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        return torch.device("cuda", int(index))
    raise LmtuneError(f"--device {name!r}: give auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def use_bf16(flag: bool | None, device) -> bool:
    """--bf16 as given, or when not given: on for a CUDA device that supports bf16, off elsewhere."""
    import torch

    if flag is not None:
        return bool(flag)
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def peak_memory_mb(device=None) -> float:
    """Peak memory of this process on `device`: allocated GPU memory on CUDA, resident set elsewhere."""
    import torch

    if device is not None and device.type == "cuda":
        return max(_PEAK_FLOOR.get("cuda", 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    if device is not None and device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return host_peak_rss_mb()


def host_peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: a process started by fork+exec inherits its parent's ru_maxrss (a test
    # runner's), while VmHWM is this process's own peak (since the last `restart_peak`: the floor keeps
    # what came before)
    try:
        return max(_PEAK_FLOOR.get("cpu", 0.0), _vm_hwm_mb())
    except (OSError, StopIteration):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vm_hwm_mb() -> float:
    """VmHWM of this process (its peak resident set since start, or since the last `restart_peak`), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


_PEAK_FLOOR: dict = {}  # {"cpu" or "cuda": the peak before the last restart_peak, MB}


def restart_peak(device) -> bool:
    """Start measuring a new peak (what one piece of work takes); returns False where that cannot be done
    (no /proc). The process's own peak, `peak_memory_mb`, still counts what came before: its value so far
    is kept as a floor."""
    import torch

    if device.type == "cuda":
        _PEAK_FLOOR["cuda"] = peak_memory_mb(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    before = host_peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux)
    except OSError:
        return False
    _PEAK_FLOOR["cpu"] = before
    return True


def new_peak_mb(device) -> float:
    """The peak since `restart_peak` (GPU memory allocated on CUDA, the resident set on a CPU)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _vm_hwm_mb()


def synchronize(device) -> None:
    """Wait for the device's queued work (timings of GPU work are meaningless without it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


DECODE_KERNELS = ("dense", "blocks", "int8")  # generation.kernels
STEP_KERNELS = ("sdpa", "matmul", "compiled", "uncompiled")  # train.choice


def forced_kernels() -> tuple[str, ...]:
    """The kernels `LMTUNE_KERNELS` names (comma-separated; empty when unset: every choice is measured)."""
    from lmtune.errors import LmtuneError

    names = tuple(n.strip() for n in os.environ.get("LMTUNE_KERNELS", "").split(",") if n.strip())
    bad = [n for n in names if n not in DECODE_KERNELS + STEP_KERNELS]
    if bad:
        raise LmtuneError(f"LMTUNE_KERNELS={os.environ['LMTUNE_KERNELS']!r}: {bad[0]!r} is not a kernel: use "
                          f"{', '.join(DECODE_KERNELS + STEP_KERNELS)}, comma-separated (unset: measured)")
    return names


def settle(cfg):
    """The torch.device of `cfg.device`, with `cfg.bf16` (None: not given) set to that device's default,
    in place and before anything is loaded. Every verb that runs a model starts with it; a bad
    LMTUNE_KERNELS is refused here too, before anything is read or written."""
    forced_kernels()
    dev = resolve(getattr(cfg, "device", "auto"))
    if hasattr(cfg, "bf16"):
        cfg.bf16 = use_bf16(cfg.bf16, dev)
    return dev


def of(model):
    """The device a model's (first) parameter lives on."""
    return next(model.parameters()).device


def to(batch, dev):
    """A batch (dict of tensors, or a BatchEncoding) with its tensors on `dev`."""
    return {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}


def release_cpu_threads() -> None:
    """Hand back the calling thread's OpenMP worker threads (`omp_pause_resource_all` of the OpenMP runtime
    torch loaded); the next parallel region on this thread starts new ones (microseconds).

    The runtime keeps a team of workers for every thread that ran a parallel region, and once it manages more
    threads than there are cores it stops spinning at its barriers and puts waiting threads to sleep instead.
    A server whose worker thread decodes while the thread that loaded the model still holds its own team
    paid that at every one of the ~200 barriers of a token: SmolLM2 on 2 cores decoded at 63 tok/s on the
    server's thread instead of 142. So a thread that hands the model to another calls this. No OpenMP
    runtime found (another platform, or a build without OpenMP): nothing to do."""
    global _PAUSE
    if not _PAUSE:  # found once (a server's task route calls this after every request): loaded libraries stay
        _PAUSE = _omp_pause_functions()
    for pause in _PAUSE:
        pause(1)  # omp_pause_soft: the threads go, the runtime's settings stay


_PAUSE: tuple = ()


def _omp_pause_functions() -> tuple:
    """`omp_pause_resource_all` of each OpenMP runtime loaded in this process (none yet: looked for again
    at the next call)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    except OSError:
        return ()
    found = []
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        found.append(pause)
    return tuple(found)
