"""Which of several exact ways to multiply by a weight matrix is the fastest here: measured, not assumed.

A decoded token can read a matrix in more than one form with the same result: a matrix that is exactly GGUF
blocks through the block kernel or as the dense fp32 tensor (gguf_weights: same fp32 products, only the
order of the sums differs), an int8 matrix through torch's int8 kernel or its bf16 copy (decoder.Int8).
Which is faster depends on the machine (memory bandwidth against matmul units: the block kernel was 3.5x
the dense matmul's speed on a 10 GB/s AVX-512 EPYC and slower on a 26 GB/s AMX Xeon) and on the rows, so
no constant decides. The first time a matrix shape is met on a machine, each candidate is timed on the
model's own matrices, run as a decoded token runs them (layer after layer, so that each matrix comes from
memory and not from a cache the benchmark warmed), at 1, 4, 8 and 16 rows (the buckets 1, 2-4, 5-8, 9-16);
the times (microseconds a matrix) go into the lmtune cache's machine.json beside estimate's rates, under
the same machine key (CPU, torch threads, torch version, boot). The fastest wins its bucket. More than 16
rows (a prefill) take the dense matmul.

    picks, table = choose("blocks", ("dense", "blocks"), mats, shape, run)   # picks[i]: a name per bucket

`LMTUNE_KERNELS=dense|blocks|int8` forces that kernel wherever it is a candidate (unset: measured);
`LMTUNE_NO_KERNELS=1` builds no block kernel at all, so there is nothing to choose between.
"""

from __future__ import annotations

import time

import torch

from lmtune.device import DECODE_KERNELS as NAMES
BUCKETS = (1, 4, 8, 16)  # rows measured; a bucket holds the row counts above the previous one, up to its own
REPS = 3                 # sweeps per candidate and bucket, alternating candidates; the fastest counts


def bucket(rows: int) -> int:
    """The index in BUCKETS of `rows` (1 to 16)."""
    return (rows > 1) + (rows > 4) + (rows > 8)


def takes(kernel: tuple, rows: int) -> bool:
    """Whether a matrix whose per-bucket picks are `kernel` reads `rows` rows through its special kernel
    (more than 16 rows, a prefill, always take the dense matmul)."""
    return rows <= BUCKETS[-1] and kernel[bucket(rows)]


def forced() -> str | None:
    """The decode kernel LMTUNE_KERNELS names (it may also name training's, lmtune.train.choice), None when unset."""
    from lmtune.device import forced_kernels

    return next((n for n in forced_kernels() if n in NAMES), None)


def choose(family: str, candidates: tuple[str, ...], mats: list, shape, run, nbytes=None):
    """For each matrix of `mats` (in the order a token reads them), the candidate each row bucket takes, and
    {shape: [{candidate: microseconds, ..., "pick": name} per bucket]} for the shapes measured (empty when
    forced). `w.shape`: (N, K); `shape(w)`: its cache key; `run(name, w, x)`: x (rows, K) times w by that
    kernel; `nbytes(w)`: bytes of w's dense form (limits the sweep, see `_sweep`)."""
    force = forced()
    if force in candidates:
        return [(force,) * len(BUCKETS) for _ in mats], {}
    from lmtune.costs.machine import Machine

    machine = Machine()
    keys = {s: [f"kernel {family} {s} rows<={r}" for r in BUCKETS] for s in dict.fromkeys(map(shape, mats))}
    todo = [w for w in mats if any(k not in machine.entry for k in keys[shape(w)])]
    if todo:
        for (s, i), times in _measure(_sweep(todo, shape, nbytes), candidates, shape, run).items():
            machine.entry[keys[s][i]] = {c: round(t * 1e6, 2) for c, t in times.items()}
        machine.dirty = True
        machine.save()
    table = {}
    for s, ks in keys.items():
        table[s] = [dict(machine.entry[k]) for k in ks]
        for times in table[s]:
            times["pick"] = min(candidates, key=lambda c: times.get(c, float("inf")))
    return [tuple(t["pick"] for t in table[shape(w)]) for w in mats], table


def _sweep(mats: list, shape, nbytes) -> list:
    """The matrices timed: the first ones in reading order up to 4x the last-level cache in dense bytes
    (so that none is still cached when its turn comes again, as in a decoded token; a big model's few
    first layers), plus the first matrix of every shape not among them."""
    from lmtune.costs.machine import last_level_cache

    cap, total, out, seen = 4 * last_level_cache(), 0, [], set()
    for w in mats:
        if total < cap or shape(w) not in seen:
            out.append(w)
            seen.add(shape(w))
            total += nbytes(w) if nbytes else 0
    return out


@torch.inference_mode()
def _measure(mats: list, candidates, shape, run) -> dict:
    """{(shape, bucket index): {candidate: seconds a matrix}}: per bucket, REPS sweeps over `mats` with each
    candidate in turn, every product timed alone and summed per shape; the fastest sweep counts."""
    count: dict = {}
    for w in mats:
        count[shape(w)] = count.get(shape(w), 0) + 1
    xs: dict = {}
    out: dict = {}
    for i, rows in enumerate(BUCKETS):
        best = {(s, c): float("inf") for s in count for c in candidates}
        for _ in range(REPS):
            for c in candidates:
                spent = dict.fromkeys(count, 0.0)
                for w in mats:
                    k = w.shape[1]
                    x = xs.setdefault((k, rows), torch.randn(rows, k))
                    t0 = time.perf_counter()
                    run(c, w, x)
                    spent[shape(w)] += time.perf_counter() - t0
                for s, t in spent.items():
                    best[s, c] = min(best[s, c], t)
        for s, n in count.items():
            out[s, i] = {c: best[s, c] / n for c in candidates}
    return out

