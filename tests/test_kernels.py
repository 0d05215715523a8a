"""lmtune.generation.kernels: the kernel each matrix shape and row count takes is measured once per machine
(cached in the session cache's machine.json), LMTUNE_KERNELS forces one, and the choice never changes what
greedy decoding says."""

from __future__ import annotations

import json

import pytest
import torch

from lmtune.errors import LmtuneError
from lmtune.generation import gguf_weights, kernels
from lmtune.generation.decoder import Decoder, Int8
from test_decode import hf_generate, snap, snapped

pytestmark = pytest.mark.skipif(not gguf_weights.available(), reason="no block kernel on this machine")


@pytest.fixture
def cpu(monkeypatch):
    """Sets the CPU name the machine key is made of (a fresh one per test, so nothing is cached yet)."""
    import lmtune.track

    def use(name):
        monkeypatch.setattr(lmtune.track, "hardware", lambda: {"cpu": name})
    return use


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements (each call of kernels._measure), which still run for real."""
    calls = []
    real = kernels._measure

    def count(mats, *args):
        calls.append(len(mats))
        return real(mats, *args)
    monkeypatch.setattr(kernels, "_measure", count)
    monkeypatch.delenv("LMTUNE_KERNELS", raising=False)
    return calls


def blocks(*shapes):
    torch.manual_seed(0)
    return [gguf_weights.factor(snap(torch.randn(shape) * 0.05, 4)) for shape in shapes]


def test_choice_is_measured_once_per_machine_and_shape(cpu, measured, session_cache):
    cpu("test CPU A")
    mats = blocks((64, 64), (64, 64), (96, 64))
    _, table = gguf_weights.choose(mats)
    assert measured == [3] and set(table) == {"64x64 q4", "96x64 q4"} and len(table["64x64 q4"]) == 4
    assert all(set(t) == {"dense", "blocks", "pick"} for ts in table.values() for t in ts)
    gguf_weights.choose(blocks((64, 64)))
    assert measured == [3]  # cached: not measured again
    saved = json.loads((session_cache / "machine.json").read_text())
    entry = next(v for k, v in saved.items() if k.startswith("test CPU A|"))
    assert f"kernel blocks/{gguf_weights.KERNEL_ID} 96x64 q4 rows<=16" in entry
    cpu("test CPU B")  # another machine: its own measurement
    gguf_weights.choose(blocks((64, 64)))
    assert measured == [3, 1]
    cpu("test CPU A")
    gguf_weights.choose(mats)
    assert measured == [3, 1]


def test_the_measured_winner_decides(cpu, monkeypatch):
    """Block kernel where it measured faster, dense matmul elsewhere; a Block never faster is dropped."""
    cpu("test CPU C")
    monkeypatch.delenv("LMTUNE_KERNELS", raising=False)

    def fake(mats, candidates, shape, run):  # blocks faster at 1 and 2-4 rows for 64x64, never for 96x64
        return {(s, i): {"dense": 1.0, "blocks": 0.5 if s == "64x64 q4" and i < 2 else 2.0}
                for s in {shape(w) for w in mats} for i in range(4)}
    monkeypatch.setattr(kernels, "_measure", fake)
    a, b = blocks((64, 64), (96, 64))
    (a2, b2), table = gguf_weights.choose([a, b])
    assert a2 is a and a.kernel == (True, True, False, False) and b2 is b.dense
    assert [t["pick"] for t in table["64x64 q4"]] == ["blocks", "blocks", "dense", "dense"]
    used = []
    monkeypatch.setattr(gguf_weights, "_kernel", lambda x, w: used.append(len(x)) or x @ w.dense.t())
    for rows in (1, 3, 6, 20):
        x = torch.randn(rows, 64)
        assert torch.allclose(gguf_weights.linear(x, a), x @ a.dense.t(), atol=1e-6)
    assert used == [1, 3]


@pytest.mark.parametrize("force", ["", "dense", "blocks"])
def test_forced_kernels_decode_as_hf(tiny_chat_model, monkeypatch, measured, cpu, force):
    """Whatever kernel is taken (measured, or forced with LMTUNE_KERNELS), greedy output is HF's; forced,
    nothing is measured."""
    cpu("test CPU D")
    monkeypatch.setenv("LMTUNE_KERNELS", force)
    model = snapped(tiny_chat_model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    prompts = [tok("Hello there, how are you?")["input_ids"], tok("Hi")["input_ids"]]
    dec = Decoder(model)
    mats = [L[k] for L in dec.runner.layers for k in ("wqkv", "wo", "wgu", "wd")] + [dec.runner.head]
    if force == "dense":
        assert all(isinstance(w, torch.Tensor) for w in mats) and dec.runner.kernels == {}
    if force == "blocks":
        assert all(isinstance(w, gguf_weights.Block) and all(w.kernel) for w in mats)
    assert measured == ([] if force else [len(mats)])
    ours = dec.generate(prompts, 12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, hf_generate(model, tok, prompts, 12, tok.eos_token_id))


def test_int8_crossover_is_measured_or_forced(tiny_chat_model, monkeypatch, measured, cpu):
    from lmtune import models

    cpu("test CPU E")
    model, _ = models.load_causal_lm(tiny_chat_model)
    dec = Decoder(model, quantize="int8")
    assert measured == [9] and set(dec.runner.kernels) == {"96x32", "32x32", "128x32", "32x64", f"{len(dec.runner.emb)}x32"}
    for force, flag in (("int8", True), ("dense", False)):
        monkeypatch.setenv("LMTUNE_KERNELS", force)
        dec = Decoder(model, quantize="int8")
        assert all(w.kernel == (flag,) * 4 for w in [dec.runner.head] + [L["wd"] for L in dec.runner.layers])
        assert isinstance(dec.runner.head, Int8) and dec.generate([[1, 2, 3]], 4).shape == (1, 4)
    assert measured == [9]


def test_a_bad_kernels_value_is_one_line(tiny_chat_model, monkeypatch):
    from lmtune import models

    monkeypatch.setenv("LMTUNE_KERNELS", "fastest")
    model, _ = models.load_causal_lm(tiny_chat_model)
    with pytest.raises(LmtuneError) as e:
        Decoder(model, gguf_blocks=False)
    assert "\n" not in str(e.value) and "dense, blocks, int8" in str(e.value)


def test_vector_kernel_is_bit_identical_to_the_portable_one(tmp_path):
    """Where the compiler has AVX-512, the block kernel runs its own code for speed (#25); it must give the
    very fp32 outputs of the portable loops (same weights, fused products, lane order), at any row count."""
    import ctypes
    import os
    import subprocess

    src, so = tmp_path / "blocks.cpp", tmp_path / "portable.so"
    src.write_text(gguf_weights.SOURCE)
    cmd = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
           "-DLMTUNE_PORTABLE", str(src), "-o", str(so)]
    subprocess.run(cmd, check=True, capture_output=True)
    portable = ctypes.CDLL(str(so))
    portable.block_linear.argtypes = gguf_weights._library().block_linear.argtypes
    torch.manual_seed(0)
    for bits in (4, 8):
        for N, K in ((37, 64), (100, 576), (49, 1536)):
            w = snap(torch.randn(N, K) * 0.05, bits)
            w[3] = 0  # a zero row: d = 0
            blk = gguf_weights.factor(w)
            assert blk is not None and blk.bits == bits
            for M in range(1, 17):
                x = torch.randn(M, K) * torch.logspace(-3, 3, K)[torch.randperm(K)]
                x[0, :5] = -0.0
                y = torch.empty(M, N)
                portable.block_linear(bits, M, N, K, x.data_ptr(), blk.q.data_ptr(), blk.d.data_ptr(), blk.m.data_ptr(),
                                      y.data_ptr(), torch.get_num_threads())
                assert torch.equal(gguf_weights._kernel(x, blk).view(torch.int32), y.view(torch.int32)), (bits, N, K, M)
