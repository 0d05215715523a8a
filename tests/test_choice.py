"""train.choice: a run of enough steps times its step's candidates (SDPA or matmul attention; with --compile,
compiled blocks or not) on its first batch once per machine and shape, takes the fastest, caches the times in
the session cache's machine.json, leaves no trace in what the run trains, and LMTUNE_KERNELS forces a choice."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.config import TrainConfig
from lmtune.costs.machine import Machine
from lmtune.data.batching import collate
from lmtune.errors import LmtuneError
from lmtune.train import choice
from lmtune.train import loss as L
from lmtune.train.loop import fit


def _model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, attention_dropout=0.1))


def _examples(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 300, (6 + 3 * (i % 4),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _cfg(**kw):
    return TrainConfig(data="-", out="-", batch_size=4, max_steps=kw.pop("max_steps", choice.MIN_STEPS),
                       learning_rate=1e-3, **kw)


def _entries():
    return {k: v for k, v in Machine().entry.items() if k.startswith("train step LlamaForCausalLM")}


@pytest.fixture
def fresh(monkeypatch):
    """No cached choice for the test model, nothing forced."""
    monkeypatch.delenv("LMTUNE_KERNELS", raising=False)
    m = Machine()
    for k in [k for k in m.entry if k.startswith("train step LlamaForCausalLM")]:
        del m.entry[k]
    m.dirty = True
    m.save()


def test_matmul_attention_gives_sdpas_loss_and_gradients_in_fp32():
    batch, results = collate(_examples(), pad_id=0), []
    for impl in ("sdpa", "eager"):
        model = _model()
        model.config.attention_dropout = 0.0
        model.set_attn_implementation(impl)
        s, n = L.causal_lm_loss(model, batch)
        (s / n).backward()
        results.append((s / n, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb))


def test_a_long_run_measures_once_takes_the_fastest_and_trains_as_without_measuring(fresh, tmp_path, monkeypatch):
    model = _model()
    fit(model, _examples(), _cfg(), tmp_path / "a", collate=partial(collate, pad_id=0), loss_fn=L.causal_lm_loss)
    (key, times), = _entries().items()
    assert set(times) == {"sdpa uncompiled", "matmul uncompiled"}
    assert all(t > 0 and mb > 100 for t, mb in times.values())  # seconds, and the process's peak in MB
    best = choice.pick(list(map(_option, times)), times, ("sdpa", False))
    pick = {"eager": "matmul"}.get(best[0], best[0])
    assert model.config._attn_implementation == best[0]

    # the same shape again: the cache answers, nothing is timed
    monkeypatch.setattr(choice, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = _model()
    fit(again, _examples(), _cfg(), tmp_path / "b", collate=partial(collate, pad_id=0), loss_fn=L.causal_lm_loss)
    assert again.config._attn_implementation == model.config._attn_implementation
    # ... and measuring left no trace (random state restored, gradients cleared): the weights are those of a
    # run told the pick (attention dropout draws random numbers, so a moved random state would show)
    monkeypatch.setenv("LMTUNE_KERNELS", pick)
    forced = _model()
    fit(forced, _examples(), _cfg(), tmp_path / "c", collate=partial(collate, pad_id=0), loss_fn=L.causal_lm_loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), forced.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_a_short_run_measures_nothing_and_keeps_sdpa(fresh, tmp_path):
    model = _model()
    fit(model, _examples(), _cfg(max_steps=choice.MIN_STEPS - 1), tmp_path, collate=partial(collate, pad_id=0),
        loss_fn=L.causal_lm_loss)
    assert _entries() == {} and model.config._attn_implementation == "sdpa"


def test_packed_rows_and_forced_kernels_have_no_choice(fresh, tmp_path, monkeypatch):
    cfg, model = _cfg(), _model()
    packed = collate(_examples(), pad_id=0)
    packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    assert choice.candidates(model, packed, cfg, torch.device("cpu")) == (["sdpa"], [False])
    monkeypatch.setenv("LMTUNE_KERNELS", "matmul")
    batch = collate(_examples(), pad_id=0)
    assert choice.candidates(model, batch, cfg, torch.device("cpu")) == (["eager"], [False])
    assert choice.choose(model, None, batch, cfg, 1000, torch.device("cpu")) == ""  # nothing timed
    assert model.config._attn_implementation == "eager" and _entries() == {}
    monkeypatch.setenv("LMTUNE_KERNELS", "blocks,sdpa,fastest")
    with pytest.raises(LmtuneError, match="'fastest' is not a kernel"):
        choice.candidates(model, batch, cfg, torch.device("cpu"))


def test_with_compile_the_blocks_are_compiled_only_when_that_was_faster(fresh, tmp_path, capsys):
    model = _model()
    cfg = _cfg(compile=True)
    batch = collate(_examples(), pad_id=0)
    line = choice.choose(model, partial(_loss, model), batch, cfg, choice.MIN_STEPS, torch.device("cpu"))
    (key, times), = _entries().items()
    assert set(times) == {"sdpa uncompiled", "sdpa compiled", "matmul uncompiled", "matmul compiled"}
    best = choice.name(*choice.pick(list(map(_option, times)), times, ("sdpa", True)))
    assert line.startswith(f"step: {best} (measured on this machine")
    compiled = "forward" in vars(model.model.layers[0])
    assert compiled == best.endswith(" compiled")
    # the machine file holds the times, under this machine's key
    cached = json.loads(Machine().path.read_text())
    assert any(key in entry for entry in cached.values())


def _loss(model, batch):
    s, n = L.causal_lm_loss(model, batch)
    return s / n


def _option(shown: str) -> tuple:
    attention, compiled = shown.split()
    return {"matmul": "eager"}.get(attention, attention), compiled == "compiled"


def test_the_fastest_is_taken_only_if_it_needs_no_more_memory_than_the_default():
    times = {"sdpa uncompiled": [2.9, 2400], "matmul uncompiled": [2.5, 3200], "sdpa compiled": [2.2, 1930],
             "matmul compiled": [1.6, 1950]}
    options = [_option(k) for k in times]
    assert choice.pick(options, times, ("sdpa", True)) == ("eager", True)      # 1950 MB: within 5% of 1930
    assert choice.pick(options[:2], times, ("sdpa", False)) == ("sdpa", False)  # matmul's +800 MB: not taken
    times["matmul uncompiled"] = [2.5, 2450]
    assert choice.pick(options[:2], times, ("sdpa", False)) == ("eager", False)
    times["matmul uncompiled"] = "failed"
    assert choice.pick(options[:2], times, ("sdpa", False)) == ("sdpa", False)


def test_a_new_peak_is_measured_without_losing_the_processs_own():
    from lmtune import device

    cpu = torch.device("cpu")
    x = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
    del x
    before = device.peak_memory_mb(cpu)
    assert device.restart_peak(cpu)
    assert device.new_peak_mb(cpu) < before - 200  # the 300 MB are not in the new window
    assert device.peak_memory_mb(cpu) >= before    # ... but still in the process's peak
