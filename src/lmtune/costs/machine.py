"""This machine's rates, measured once per shape and cached in ~/.cache/lmtune/machine.json: matmuls at the
model's shapes, attention, element-wise traffic, dropout's random numbers, the optimizer, one op's fixed cost,
and the memory of a process that has imported what a training run imports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20


class Machine:
    """Measured rates of this machine (threads, torch version), cached in ~/.cache/lmtune/machine.json.
    A rate is measured the first time a prediction needs it (a few milliseconds to a second each), and
    again after a reboot: a cloud VM keeps its CPU name across hosts whose rates may differ (this machine's
    bf16 matmuls measured 2.5x slower than the rates cached on an earlier day), and a stale rate misleads
    every later estimate."""

    def __init__(self):
        import torch

        from lmtune.models import cache_dir
        from lmtune.track import hardware

        self.path = cache_dir() / "machine.json"
        try:
            self.all = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):  # unreadable or cut short: a cache, so measure again
            self.all = {}
        machine = f"{hardware()['cpu']}|{torch.get_num_threads()} threads|torch {torch.__version__}"
        boot = Path("/proc/sys/kernel/random/boot_id")
        self.host = machine + (f"|boot {boot.read_text().strip()[:8]}" if boot.is_file() else "")
        for key in [k for k in self.all if k != self.host and k.split("|boot")[0] == machine]:
            del self.all[key]  # an earlier boot's rates
        self.entry = self.all.setdefault(self.host, {})
        self.dirty = False

    def _get(self, key: str, measure):
        if key not in self.entry:
            self.entry[key], self.dirty = measure(), True
        return self.entry[key]

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.all, indent=1))
            os.replace(tmp, self.path)  # whole or not at all, also when two estimates save at once
            self.dirty = False

    # seconds of one (m x k) @ (k x n) product as the step computes it: "nt" forward (x @ W^T), "nn" input
    # gradient (dy @ W), "tn" weight gradient (dy^T @ x, k the tokens); m (or k for "tn") is the number
    # of tokens, measured at the nearest power of two and scaled. `cold`: the step's working set is larger
    # than the last-level cache, so the operands come from memory (measured so)
    def gemm(self, m: int, k: int, n: int, layout: str, bf16: bool, cold: bool = True) -> float:
        tokens = k if layout == "tn" else m
        if tokens <= 0:
            return 0.0
        b = 2 ** max(4, round(math.log2(tokens)))
        dims = (m, b, n) if layout == "tn" else (b, k, n)
        key = f"gemm {dims[0]}x{dims[1]}x{dims[2]} {layout} {'bf16' if bf16 else 'fp32'}{'' if cold else ' cached'}"
        return self._get(key, lambda: _time_gemm(*dims, layout, bf16, cold)) * tokens / b

    def sdpa(self, n: int, heads: int, length: int, head_dim: int, masked: bool, bf16: bool) -> list[float]:
        """[forward, backward] seconds of scaled_dot_product_attention at this shape (a padding mask or
        causal), measured at the nearest power-of-two length and scaled by length squared."""
        b = 2 ** max(4, round(math.log2(max(length, 1))))
        key = f"sdpa {n}x{heads}x{b}x{head_dim} {'mask' if masked else 'causal'} {'bf16' if bf16 else 'fp32'}"
        f, bw = self._get(key, lambda: _time_sdpa(n, heads, b, head_dim, masked, bf16))
        return [f * (length / b) ** 2, bw * (length / b) ** 2]

    def rates(self) -> dict:
        """{'elem_s': seconds per float of an element-wise op (read and written, with a fresh output),
        'bernoulli_s': per random number, 'op_s': one small op's fixed cost, 'fresh_s': per float of a
        tensor above the allocator's mmap threshold, written for the first time (page faults)}"""
        return {"elem_s": self._get("elementwise s/float", _time_elementwise),
                "bernoulli_s": self._get("bernoulli s/float", _time_bernoulli),
                "op_s": self._get("op s", _time_op),
                "fresh_s": self._get("fresh page s/float", _time_fresh)}

    def optimizer(self, run) -> list[float]:
        """[seconds per trained parameter, per parameter tensor] of clip + optimizer step + zero_grad."""
        key = f"optimizer {run.optimizer} {'momentum' if getattr(run, 'momentum', 0) else ''}".strip()
        return self._get(key, lambda: _time_optimizer(run))

    def base_mb(self) -> list[float]:
        return self._get("base_mb", _baseline_mb)  # [resident, peak]


def _best_of(fn, reps: int = 3, budget_s: float = 0.5) -> float:
    fn()  # warm-up (thread pool, caches, allocator)
    best, spent, i = float("inf"), 0.0, 0
    while i < reps or (spent < 0.05 and i < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, i = min(best, dt), spent + dt, i + 1
        if spent > budget_s:
            break
    return best


_POOL: dict = {}


def last_level_cache() -> int:
    """Bytes of the CPU's last-level cache (32 MB when the system does not say)."""
    try:
        index = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))[-1]
        size = (index / "size").read_text().strip()
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}.get(size[-1], 1) if size[-1] in "KM" else int(size)
    except (OSError, ValueError, IndexError):
        return 32 * MB


def _operands(shapes, dtype, cold: bool = True):
    """Tensors of these shapes taken from a 384 MB pool at a new place on every call: a step's matmuls
    read weights and activations that are not in the cache (each layer its own, gigabytes in all), so
    the benchmark must not keep reading the same few megabytes from the last-level cache."""
    import torch

    need = sum(math.prod(shape) for shape in shapes)  # a large operand (a wide vocabulary) may not fit the pool
    if (dtype, cold) not in _POOL or _POOL[dtype, cold][0].numel() < need:
        size = 384 * MB if cold else min(64 * MB, last_level_cache() // 4)  # warm: a quarter of the cache
        _POOL[dtype, cold] = [torch.empty(max(size // dtype.itemsize, need), dtype=dtype).uniform_(-1, 1), 0]
    pool, at = _POOL[dtype, cold]
    out = []
    for shape in shapes:
        size = math.prod(shape)
        if at + size > pool.numel():
            at = 0
        out.append(pool[at:at + size].view(shape))
        at += size
    _POOL[dtype, cold][1] = at
    return out


def _time_gemm(m: int, k: int, n: int, layout: str, bf16: bool, cold: bool = True) -> float:
    import torch

    dt = torch.bfloat16 if bf16 else torch.float32
    if layout == "nt":    # x (m, k) @ W^T, W stored (n, k)
        def run():
            a, w = _operands([(m, k), (n, k)], dt, cold)
            return a @ w.t()
    elif layout == "nn":  # dy (m, k) @ W, W stored (k, n)
        def run():
            a, w = _operands([(m, k), (k, n)], dt, cold)
            return a @ w
    else:                 # "tn": dy^T (m, k) @ x (k, n), dy stored (k, m)
        def run():
            g, x = _operands([(k, m), (k, n)], dt, cold)
            return g.t() @ x
    return _median_of(run)


def _median_of(fn, reps: int = 5) -> float:
    """The median of a few runs after a warm-up: a training step runs for seconds, at the machine's
    sustained speed, not at the best of a few lucky milliseconds."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _time_sdpa(n: int, heads: int, length: int, head_dim: int, masked: bool, bf16: bool) -> list[float]:
    import torch
    import torch.nn.functional as F

    dt = torch.bfloat16 if bf16 else torch.float32
    q, k, v = (torch.randn(n, heads, length, head_dim, dtype=dt, requires_grad=True) for _ in range(3))
    mask = None
    if masked:  # as transformers passes a padding mask: additive, one per row
        mask = torch.zeros(n, 1, length, length, dtype=dt)
        mask.masked_fill_(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    grad = torch.randn(n, heads, length, head_dim, dtype=dt)
    fwd = _best_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked))

    def both():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked).backward(grad)
    return [fwd, max(_best_of(both) - fwd, 0.0)]


def _time_elementwise() -> float:
    import torch

    a, b = torch.randn(2 * MB), torch.randn(2 * MB)  # 8 MB each, the size of a layer's activations
    return _best_of(lambda: torch.mul(a, b), reps=10) / (3 * a.numel())


def _time_fresh() -> float:
    import torch

    return _best_of(lambda: torch.empty(16 * MB).fill_(1.0), reps=3) / (16 * MB)


def _time_bernoulli() -> float:
    import torch

    a = torch.empty(2 * MB)
    return _best_of(lambda: a.bernoulli_(0.95), reps=5) / a.numel()


def _time_op() -> float:
    import torch

    a = torch.ones(8, requires_grad=True)
    return _best_of(lambda: [a * 2 for _ in range(100)], reps=5) / 100


def _time_optimizer(run) -> list[float]:
    import torch

    from lmtune.train.optim import build_optimizer

    def cost(sizes):
        ps = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
        grads = [torch.full_like(p, 1e-3) for p in ps]
        opt = build_optimizer(run, ps)

        def step():
            for p, g in zip(ps, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _best_of(step, reps=3)
    big, many = cost([4 * MB]), cost([64] * 200)
    per_tensor = max(many / 200, 0.0)
    return [max(big - per_tensor, 1e-12) / (4 * MB), per_tensor]


def _baseline_mb() -> list[float]:
    """[resident now, peak so far] (MB) of a fresh process that has imported what a training run imports:
    importing passes through a transient peak that a small model's whole run may stay under."""
    code = ("import resource, torch, transformers, peft, lmtune.finetune, lmtune.train.loop\n"
            "try:\n import torch.utils.tensorboard\nexcept ImportError:\n pass\n"
            "now = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
            "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print(now / 1024, peak / 1024)")  # VmHWM: ru_maxrss would include a forking parent's peak
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return [400.0, 400.0]
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]
