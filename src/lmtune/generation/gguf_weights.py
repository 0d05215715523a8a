"""Weight matrices kept in the GGUF block form they came in (Q4_1, Q8_0) and multiplied in fp32: lossless.

A model converted from a GGUF file holds, in every run of 32 weights along a row, only values d*q + m, with
d and m fp16 numbers and q a 4-bit (Q4_1: 0..15) or 8-bit (Q8_0: -128..127, m = 0) integer. `factor` finds
d, q and m back from the fp32 matrix and checks that every weight is reproduced bit for bit (~0.5 s for
SmolLM2-135M); if one is not (a fine-tuned or merged model), the matrix stays dense. A decoded token then
reads 0.625 (4-bit) or 1.125 (8-bit) bytes a weight instead of 4. `linear` rebuilds each weight in fp32
(d*q is exact in fp32, so d*q + m is the very fp32 weight) and accumulates in fp32 like any fp32 matmul;
only the order of the sum differs.

    blk = factor(w)                 # a Block, or None when w is not exactly in block form
    y = linear(x, blk)              # == F.linear(x, w) up to fp32 summation order

The kernels (below, ~180 lines of C++) are compiled once per machine with the system compiler (`c++ -O3
-march=native -fopenmp`, 0.4 s here) into the lmtune cache and loaded with ctypes. Where the compiler has
AVX-512, the block product runs a vector version of the portable loops that gives the very same fp32
outputs (tests/test_kernels.py checks it against the portable build, `-DLMTUNE_PORTABLE`). They run on torch's own
OpenMP threads: torch has already loaded its libgomp.so.1, so the library binds to that one. No compiler,
or a failed build: `available()` is False and callers keep dense weights. Whether the kernel or the dense
fp32 matmul is faster depends on the machine and the rows: `choose` measures it (lmtune.generation.kernels).
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

from lmtune.generation import kernels


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

#if defined(__AVX512F__) && !defined(LMTUNE_PORTABLE)
#include <immintrin.h>
// The same arithmetic as `rows` (the portable code below), in AVX-512 registers: for every weight
// w = fma(d, q, m) (= d*q + m, d*q exact), acc[r][i] = fma(w, x, acc[r][i]) block after block with the 32
// lanes of a row in two zmm registers, then the lanes summed one after the other from lane 0, as `rows`
// does. Bit for bit the same output; only the bytes move faster (no w[32]/acc[R][32] round trips through
// the stack, and Q8_0 does not read m: its m is 0, and w*x + acc with w = d*q vs d*q + 0 differs only when
// d*q = -0, where the product is a signed zero that cannot change acc, which starts at +0 and, under
// round-to-nearest, never becomes -0).
// v[j][i] <- v[i][j]: a 16x16 fp32 transpose in registers
static inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 16; j += 8)
    for (int k = 0; k < 4; ++k) {
      t[j + k] = _mm512_shuffle_f32x4(r[j + k], r[j + k + 4], 0x88);
      t[j + k + 4] = _mm512_shuffle_f32x4(r[j + k], r[j + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
  }
}

template <int BITS, int R>
static void rows512(const float* x, const uint8_t* q, const float* d, const float* m, float* y,
                    long N, long K, long n0, long n1) {
  const long nb = K / 32, row_bytes = K * BITS / 8;
  alignas(64) float buf[R][16][32];  // the lane sums of (up to) 16 rows, n0..n1
  for (int r = 0; r < R; ++r)
    for (long n = n1; n < n0 + 16; ++n)
      for (int i = 0; i < 32; ++i) buf[r][n - n0][i] = 0.f;
  for (long n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const float* dn = d + n * nb;
    const float* mn = m + n * nb;
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (long b = 0; b < nb; ++b) {
      const __m512 db = _mm512_set1_ps(dn[b]);
      __m512 w0, w1;
      if (BITS == 4) {
        // the 16 values d*q + m a block can hold, looked up by q (vpermps reads the low 4 bits of each index)
        const __m512 table = _mm512_fmadd_ps(db, iota, _mm512_set1_ps(mn[b]));
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qn + b * 16)));
        w0 = _mm512_permutexvar_ps(idx, table);
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
      } else {
        const __m128i* p = (const __m128i*)(qn + b * 32);
        w0 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))));
        w1 = _mm512_mul_ps(db, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1))));
      }
      const float* xb = x + b * 32;
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + r * K), a0[r]);
        a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + r * K + 16), a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(buf[r][n - n0], a0[r]);
      _mm512_store_ps(buf[r][n - n0] + 16, a1[r]);
    }
  }
  // y[r, n] = ((0 + lane 0) + lane 1) + ... + lane 31, for the 16 rows at once: transposed, lane i of every
  // row is one register, added in lane order (16 chains side by side instead of one long one a row)
  const __mmask16 valid = (__mmask16)((1u << (n1 - n0)) - 1);
  for (int r = 0; r < R; ++r) {
    __m512 s = _mm512_setzero_ps();
    for (int h = 0; h < 32; h += 16) {
      __m512 v[16];
      for (int j = 0; j < 16; ++j) v[j] = _mm512_load_ps(buf[r][j] + h);
      transpose16(v);
      for (int i = 0; i < 16; ++i) s = _mm512_add_ps(s, v[i]);
    }
    _mm512_mask_storeu_ps(y + r * N + n0, valid, s);
  }
}

#define LMTUNE_ROWS rows512
#else
#define LMTUNE_ROWS rows
#endif

template <int BITS> static void dispatch(int R, const float* x, const uint8_t* q, const float* d,
                                         const float* m, float* y, long N, long K, long n0, long n1) {
  switch (R) {
    case 1: LMTUNE_ROWS<BITS, 1>(x, q, d, m, y, N, K, n0, n1); break;
    case 2: LMTUNE_ROWS<BITS, 2>(x, q, d, m, y, N, K, n0, n1); break;
    case 3: LMTUNE_ROWS<BITS, 3>(x, q, d, m, y, N, K, n0, n1); break;
    default: LMTUNE_ROWS<BITS, 4>(x, q, d, m, y, N, K, n0, n1); break;
  }
}

// Finds d, q, m for every block of w (N, K) and returns 1 if d*q + m reproduces every weight exactly.
// Q4_1 (bits 4): m is the block minimum (the weight quantized to 0), d the span over 15, both fp16.
// Q8_0 (bits 8): m = 0, d the largest magnitude over 127, fp16.
extern "C" int block_factor(int bits, long N, long K, const float* w, uint8_t* q, float* d, float* m,
                           int threads) {
  const long nblk = N * K / 32;
  int bad = 0;
  #pragma omp parallel for num_threads(threads) schedule(static) reduction(|: bad)
  for (long b = 0; b < nblk; ++b) {
    if (bad) continue;
    const float* x = w + b * 32;
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; ++i) { lo = std::min(lo, x[i]); hi = std::max(hi, x[i]); }
    float db, mb;
    if (bits == 4) { mb = (float)(_Float16)lo; db = (float)(_Float16)((hi - lo) / 15.f); }
    else { mb = 0.f; db = (float)(_Float16)(std::max(hi, -lo) / 127.f); }
    int qs[32];
    for (int i = 0; i < 32; ++i) {
      const float qf = db > 0.f ? __builtin_rintf((x[i] - mb) / db) : 0.f;
      const bool in = bits == 4 ? (qf >= 0.f && qf <= 15.f) : (qf >= -128.f && qf <= 127.f);
      qs[i] = (int)qf;
      if (!in || db * qf + mb != x[i]) bad = 1;
    }
    d[b] = db; m[b] = mb;
    if (bits == 4) for (int i = 0; i < 16; ++i) q[b * 16 + i] = (uint8_t)(qs[i] | (qs[i + 16] << 4));
    else for (int i = 0; i < 32; ++i) q[b * 32 + i] = (uint8_t)(int8_t)qs[i];
  }
  return !bad;
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


# Kernel times are cached under this id (with the machine key): a changed kernel is measured again, never
# judged by the times of the one it replaced.
KERNEL_ID = hashlib.sha256(SOURCE.encode()).hexdigest()[:8]


@dataclass
class Block:
    """A (N, K) fp32 matrix as block integers `q` (uint8: two 4-bit values a byte, or int8 bytes), and one
    fp32 step `d` and offset `m` per 32 weights of a row (N, K/32). `dense` is the fp32 matrix itself.
    `kernel[i]`: whether rows in kernels.BUCKETS[i] take the block kernel (else the dense matmul); `choose`
    measures it."""

    bits: int
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    dense: torch.Tensor
    kernel: tuple = (True,) * len(kernels.BUCKETS)

    @property
    def shape(self) -> torch.Size:
        return self.dense.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * (self.d.numel() + (self.m.numel() if self.bits == 4 else 0))


@torch.no_grad()
def factor(w: torch.Tensor) -> Block | None:
    """`w` (N, K) as a Block when every weight is exactly GGUF Q4_1 (d*q + m, q in 0..15) or Q8_0 (d*q,
    q in -128..127) with fp16 d and m over runs of 32; else None (also when there is no kernel)."""
    lib = _library()
    if lib is None or w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[1] % 32:
        return None  # the kernel is for CPU fp32 matrices of whole blocks
    w = w.detach().contiguous()
    N, K = w.shape
    d, m = torch.empty(N, K // 32), torch.empty(N, K // 32)
    for bits in (4, 8):
        q = torch.empty(N, K * bits // 8, dtype=torch.uint8)
        if lib.block_factor(bits, N, K, w.data_ptr(), q.data_ptr(), d.data_ptr(), m.data_ptr(),
                            torch.get_num_threads()):
            return Block(bits, q, d, m, w)
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
    _LIB.block_factor.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, P, P, P, P, ctypes.c_int]
    _LIB.block_factor.restype = ctypes.c_int
    return _LIB


def available() -> bool:
    return _library() is not None


def linear(x: torch.Tensor, w: Block, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.dense, b), reading the block form when x has few rows (decoding) and the block kernel
    was the faster one here for that many rows (`choose`)."""
    M = x.numel() // x.shape[-1]
    if x.dtype != torch.float32 or not kernels.takes(w.kernel, M):
        return F.linear(x, w.dense, b)
    y = _kernel(x.reshape(M, -1), w).view(*x.shape[:-1], -1)
    return y if b is None else y + b


def _kernel(x: torch.Tensor, w: Block) -> torch.Tensor:
    """x (M, K) fp32 times the block matrix, by the C++ kernel."""
    x = x.contiguous()
    M, (N, K) = x.shape[0], w.dense.shape
    y = torch.empty(M, N)
    _library().block_linear(w.bits, M, N, K, x.data_ptr(), w.q.data_ptr(), w.d.data_ptr(), w.m.data_ptr(),
                            y.data_ptr(), torch.get_num_threads())
    return y


def choose(mats: list) -> tuple[list, dict]:
    """Sets each Block's `kernel` to what was measured faster here for its shape (N, K, bits) and rows
    (lmtune.generation.kernels); returns `mats` with a Block that the dense matmul beats at every row
    count replaced by its dense tensor (its d, q, m freed), and the table of times by shape."""
    blocks = [w for w in mats if isinstance(w, Block)]
    picks, table = kernels.choose(
        f"blocks/{KERNEL_ID}", ("dense", "blocks"), blocks, lambda w: f"{w.shape[0]}x{w.shape[1]} q{w.bits}",
        lambda name, w, x: _kernel(x, w) if name == "blocks" else F.linear(x, w.dense),
        lambda w: w.dense.numel() * 4)
    for w, pick in zip(blocks, picks):
        w.kernel = tuple(p == "blocks" for p in pick)
    return [w.dense if isinstance(w, Block) and not any(w.kernel) else w for w in mats], table
