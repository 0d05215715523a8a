"""The loss: chunked cross-entropy on target positions equals the plain one; accumulation is normalised."""

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.data.batching import collate
from lmtune.train import loss as L


def _model(vocab=300):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2))


def _examples(n=6, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist()
        labels = [-100] * (2 + i % 3) + ids[2 + i % 3:]  # a prompt part without targets
        out.append({"input_ids": ids, "labels": labels})
    return out


import pytest


@pytest.mark.parametrize("small_logits", [0, 10**9], ids=["chunked", "one-piece"])
def test_chunked_loss_equals_plain_cross_entropy(monkeypatch, small_logits):
    monkeypatch.setattr(L, "CHUNK", 7)  # several chunks on this small batch
    monkeypatch.setattr(L, "SMALL_LOGITS", small_logits)  # 0: always chunked; 10**9: always one piece
    model, batch = _model(), collate(_examples(), pad_id=0)
    s, n = L.causal_lm_loss(model, batch)
    (s / n).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100)
    ref.backward()
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(s / n, ref, atol=1e-6)
    for k, p in model.named_parameters():
        assert torch.allclose(ours[k], p.grad, atol=1e-6), k


def test_frozen_output_layer_is_cast_once_per_batch_under_autocast(monkeypatch):
    """A frozen output layer (LoRA) is cast to bf16 once per batch, not per chunk: the same loss and
    gradients to the bit as autocast's own per-chunk casts, and one cast of the matrix instead of 2 x chunks."""
    monkeypatch.setattr(L, "CHUNK", 7)
    monkeypatch.setattr(L, "SMALL_LOGITS", 0)
    model, batch = _model(), collate(_examples(), pad_id=0)
    for n_, p in model.named_parameters():
        p.requires_grad_("layers.1" in n_)  # the output layer frozen, as in a LoRA run

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountHeadCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == model.lm_head.weight.shape:
                self.n += 1
            return func(*args, **(kwargs or {}))

    def run():
        model.zero_grad()
        with CountHeadCasts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = L.causal_lm_loss(model, batch)
            (s / n).backward()
        return s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, casts.n

    with monkeypatch.context() as m:
        m.setattr(L, "_frozen_head_cast", lambda head: head)  # autocast's own casts
        s_auto, g_auto, casts_auto = run()
    s_once, g_once, casts_once = run()
    n_chunks = -(-int((batch["labels"][:, 1:] != -100).sum()) // 7)
    assert casts_auto == 2 * n_chunks and casts_once == 1
    assert torch.equal(s_auto, s_once)
    assert g_auto.keys() == g_once.keys() and g_auto
    for k in g_auto:
        assert torch.equal(g_auto[k], g_once[k]), k


def test_one_piece_loss_under_autocast_makes_no_per_row_copy_of_the_output_layer(monkeypatch):
    """The one-piece loss under autocast runs the output layer as one 2-d matmul: a linear over the 3-d bf16
    slice hidden[:, :-1] ran as a batched matmul that copied the weight once per row (batch x hidden x vocab)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(L, "SMALL_LOGITS", 10**9)
    model, batch = _model(vocab=3000), collate(_examples(), pad_id=0)
    for n_, p in model.named_parameters():
        p.requires_grad_("layers.1" in n_)  # the output layer frozen, as in a LoRA run
    from lmtune.train.memory import recompute_elementwise
    recompute_elementwise(model)  # the final norm then hands on a bf16 hidden state: no cast (and copy) in the linear
    per_row_copies = model.lm_head.weight.numel() * batch["input_ids"].shape[0]

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    with Largest(), torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = L.causal_lm_loss(model, batch)
        (s / n).backward()
    assert 0 < Largest.largest < per_row_copies
    with torch.no_grad():
        s32, _ = L.causal_lm_loss(model, batch)
    assert abs(float(s) - float(s32)) / float(s32) < 0.02  # bf16 against fp32


def test_accumulation_normalised_by_target_tokens(tmp_path):
    """One step of 2 micro-batches x 3 rows (different target counts) moves the weights exactly as
    one step of 1 x 6 rows: every target token weighs the same."""
    from functools import partial

    from lmtune.config import TrainConfig
    from lmtune.train.loop import fit

    ex, weights = _examples(6), []
    for bs, accum in ((6, 1), (3, 2)):
        model = _model()
        cfg = TrainConfig(data="-", out="-", batch_size=bs, grad_accum=accum, max_steps=1, optimizer="sgd",
                          momentum=0.0, learning_rate=1.0, schedule="constant", grad_clip=0.0)
        fit(model, ex, cfg, tmp_path / f"{bs}", collate=partial(collate, pad_id=0), loss_fn=L.causal_lm_loss)
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], [p for p in _model().parameters()]))


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path):
    """A loss that becomes NaN skips the update (weights unchanged); N in a row stop the run clearly."""
    import json
    from functools import partial

    import pytest

    from lmtune.config import TrainConfig
    from lmtune.errors import LmtuneError
    from lmtune.train.loop import fit

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(m, b):
        s, n = L.causal_lm_loss(m, b)
        return s * float("nan"), n

    cfg = TrainConfig(data="-", out="-", batch_size=2, max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(LmtuneError, match="not finite for 3 steps in a row"):
        fit(model, _examples(), cfg, tmp_path, collate=partial(collate, pad_id=0), loss_fn=nan_loss)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["in_a_row"] for r in rows if r.get("skipped_nonfinite")] == [1, 2, 3]


def test_matmul_attention_gives_sdpas_loss_and_gradients_under_bf16():
    """HF's eager (matmul) attention, one of train.choice's candidates, gives SDPA's loss and gradients under
    bf16 autocast (in fp32: tests/test_choice.py)."""
    batch, results = collate(_examples(), pad_id=0), []
    for impl in ("sdpa", "eager"):
        model = _model()
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = L.causal_lm_loss(model, batch)
        (s / n).backward()
        results.append((s / n, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-2)
    assert all(torch.allclose(x, y, rtol=0.05, atol=1e-3) for x, y in zip(ga, gb))
