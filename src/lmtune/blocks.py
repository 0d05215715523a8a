"""Weight matrices kept in the GGUF block form they came in (Q4_1, Q8_0) and multiplied in fp32: lossless.

A model converted from a GGUF file holds, in every run of 32 weights along a row, only values d*q + m, with
d and m fp16 numbers and q a 4-bit (Q4_1: 0..15) or 8-bit (Q8_0: -128..127, m = 0) integer. `factor` finds
d, q and m back from the fp32 matrix and checks that every weight is reproduced bit for bit; if one is not
(a fine-tuned or merged model), the matrix stays dense. A decoded token then reads 0.625 (4-bit) or 1.125
(8-bit) bytes a weight instead of 4. `linear` rebuilds each weight in fp32 (d*q is exact in fp32, so d*q + m
is the very fp32 weight) and accumulates in fp32 like any fp32 matmul; only the order of the sum differs.

    blk = factor(w)                 # a Block, or None when w is not exactly in block form
    y = linear(x, blk)              # == F.linear(x, w) up to fp32 summation order

The kernel (below, ~40 lines of C++) is compiled once per machine with the system compiler (`c++ -O3
-march=native -fopenmp`, about 2 s) into the lmtune cache and loaded with ctypes. It runs on torch's own
OpenMP threads: torch has already loaded its libgomp.so.1, so the library binds to that one. No compiler,
or a failed build: `available()` is False and callers keep dense weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 8  # more rows than this (a prefill) go through the dense fp32 matmul, which is faster there

SOURCE = r"""
#include <stdint.h>
#include <algorithm>

// 32 weights of one block, rebuilt in fp32: d*q + m (q: 4-bit pairs, low nibble = weight i, high = i + 16)
template <int BITS> static inline void unpack(const uint8_t* p, float d, float m, float* w) {
  if (BITS == 4) {
    for (int i = 0; i < 16; ++i) { w[i] = d * (float)(p[i] & 15) + m; w[i + 16] = d * (float)(p[i] >> 4) + m; }
  } else {
    const int8_t* s = (const int8_t*)p;
    for (int i = 0; i < 32; ++i) w[i] = d * (float)s[i] + m;
  }
}

// y[r, n] = sum_k x[r, k] w[n, k] for R rows of x and output columns n0..n1: each block is rebuilt once
// and used for all R rows; 32 partial sums per row, added up at the end of the row.
template <int BITS, int R>
static void rows(const float* x, const uint8_t* q, const float* d, const float* m, float* y,
                 long N, long K, long n0, long n1) {
  const long nb = K / 32, row_bytes = K * BITS / 8;
  for (long n = n0; n < n1; ++n) {
    float acc[R][32] = {};
    for (long b = 0; b < nb; ++b) {
      float w[32];
      unpack<BITS>(q + n * row_bytes + b * 4 * BITS, d[n * nb + b], m[n * nb + b], w);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 32; ++i) acc[r][i] += w[i] * x[r * K + b * 32 + i];
    }
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int i = 0; i < 32; ++i) s += acc[r][i];
      y[r * N + n] = s;
    }
  }
}

template <int BITS> static void dispatch(int R, const float* x, const uint8_t* q, const float* d,
                                         const float* m, float* y, long N, long K, long n0, long n1) {
  switch (R) {
    case 1: rows<BITS, 1>(x, q, d, m, y, N, K, n0, n1); break;
    case 2: rows<BITS, 2>(x, q, d, m, y, N, K, n0, n1); break;
    case 3: rows<BITS, 3>(x, q, d, m, y, N, K, n0, n1); break;
    default: rows<BITS, 4>(x, q, d, m, y, N, K, n0, n1); break;
  }
}

extern "C" void block_linear(int bits, long M, long N, long K, const float* x, const uint8_t* q,
                             const float* d, const float* m, float* y, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < (N + 15) / 16; ++c) {
    const long n0 = c * 16, n1 = std::min(N, n0 + 16);
    for (long r = 0; r < M; r += 4) {
      const int R = (int)std::min(4L, M - r);
      if (bits == 4) dispatch<4>(R, x + r * K, q, d, m, y + r * N, N, K, n0, n1);
      else dispatch<8>(R, x + r * K, q, d, m, y + r * N, N, K, n0, n1);
    }
  }
}
"""


@dataclass
class Block:
    """A (N, K) fp32 matrix as block integers `q` (uint8: two 4-bit values a byte, or int8 bytes), and one
    fp32 step `d` and offset `m` per 32 weights of a row (N, K/32). `dense` is the fp32 matrix itself."""

    bits: int
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    dense: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * (self.d.numel() + (self.m.numel() if self.bits == 4 else 0))


def _exact(blk, d, m, lo: int, hi: int):
    """q for blocks `blk` (.., 32) under steps d and offsets m (.., 1), or None unless d*q + m == blk exactly."""
    q = torch.where(d > 0, torch.round((blk - m) / torch.where(d > 0, d, 1.0)), 0.0)
    if bool(((q < lo) | (q > hi)).any()) or not torch.equal(d * q + m, blk):
        return None
    return q


@torch.no_grad()
def factor(w: torch.Tensor) -> Block | None:
    """`w` (N, K) as a Block when every weight is exactly GGUF Q4_1 (d*q + m, q in 0..15) or Q8_0 (d*q,
    q in -128..127) with fp16 d and m over runs of 32; else None."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % 32:
        return None
    w = w.detach().contiguous()
    N, K = w.shape
    blk = w.view(N, K // 32, 32)
    lo, hi = blk.amin(-1, keepdim=True), blk.amax(-1, keepdim=True)
    # Q4_1: the block minimum is the offset (its weight quantized to 0), the step is the span over 15
    m = lo.half().float()
    if torch.equal(m, lo):
        d = ((hi - lo) / 15).half().float()
        q = _exact(blk, d, m, 0, 15)
        if q is not None:
            q = q.to(torch.uint8)
            packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2)
            return Block(4, packed.contiguous(), d.view(N, -1).contiguous(), m.view(N, -1).contiguous(), w)
    # Q8_0: no offset, the step is the largest magnitude over 127
    d = (torch.maximum(hi, -lo) / 127).half().float()
    q = _exact(blk, d, torch.zeros_like(d), -128, 127)
    if q is not None:
        q = q.to(torch.int8).view(torch.uint8).reshape(N, K)
        return Block(8, q.contiguous(), d.view(N, -1).contiguous(), torch.zeros_like(d.view(N, -1)), w)
    return None


_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet; None: no kernel on this machine


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the CPU's model and features (-march=native)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() + platform.machine()


def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built into the lmtune cache the first time on this machine; None if it can't be."""
    global _LIB
    if _LIB is not False:
        return _LIB
    _LIB = None
    cxx = os.environ.get("CXX", "c++")
    if os.environ.get("LMTUNE_NO_KERNELS") or not shutil.which(cxx):
        return None
    from lmtune.models import cache_dir

    key = hashlib.sha256((SOURCE + _cpu_key() + cxx).encode()).hexdigest()[:16]
    lib = cache_dir() / "kernels" / f"blocks-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "blocks.cpp", Path(tmp) / "blocks.so"
            src.write_text(SOURCE)
            cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", str(src), "-o", str(out)]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                return None
            os.replace(out, lib)  # whole or not at all: a build cut short leaves nothing behind
    try:
        _LIB = ctypes.CDLL(str(lib))
    except OSError:
        return None
    P = ctypes.c_void_p
    _LIB.block_linear.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long, P, P, P, P, P,
                                  ctypes.c_int]
    _LIB.block_linear.restype = None
    return _LIB


def available() -> bool:
    return _library() is not None


def linear(x: torch.Tensor, w: Block, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.dense, b), reading the block form when x has few rows (decoding)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > MAX_ROWS or x.dtype != torch.float32:
        return F.linear(x, w.dense, b)
    x2 = x2.contiguous()
    M, (N, K) = x2.shape[0], w.dense.shape
    y = torch.empty(M, N)
    _library().block_linear(w.bits, M, N, K, x2.data_ptr(), w.q.data_ptr(), w.d.data_ptr(), w.m.data_ptr(),
                            y.data_ptr(), torch.get_num_threads())
    y = y.view(*x.shape[:-1], N)
    return y if b is None else y + b
