"""Memory and speed savers of the training step: element-wise recomputation (bit-identical gradients, fewer
saved tensors) and the fused LoRA forward (same outputs and gradients as peft's)."""

from __future__ import annotations

import pytest
import torch


def _model(tiny_chat_model, lora: bool):
    from lmtune import models
    from lmtune.lora import attach_lora

    model, tok = models.load_causal_lm(tiny_chat_model)
    if lora:
        model = attach_lora(model, 8, 16, 0.0, "all-linear")
        torch.manual_seed(1)
        for n, p in model.named_parameters():  # B starts at zero; make the adapter's path non-trivial
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    return model.train(), tok


def _grads(model, batch, bf16=False):
    from lmtune.train.loss import causal_lm_loss

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        total, n = causal_lm_loss(model, batch)
    (total / n).backward()
    return float(total.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora,bf16", [(True, False), (False, False), (True, True)])
def test_recompute_elementwise_gives_identical_gradients(tiny_chat_model, lora, bf16):
    from lmtune.train import memory

    model, tok = _model(tiny_chat_model, lora)
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (3, 24))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "labels": labels}
    loss_a, plain = _grads(model, batch, bf16)

    used = []
    pack = memory._Tags.pack
    memory._Tags.pack = lambda self, t: used.append(pack(self, t)) or used[-1]
    try:
        assert memory.recompute_elementwise(model) > 0
        loss_b, recomputed = _grads(model, batch, bf16)
    finally:
        memory._Tags.pack = pack
    recipes = [u for u in used if isinstance(u, memory._Recipe)]
    # per block: the two norm outputs (kept by q/k/v and gate/up, or their LoRA A), act(gate) and act*up;
    # under bf16 autocast the norm outputs are cast to bf16 once, and that copy is the recipe's
    assert len(recipes) >= 3 * model.config.num_hidden_layers
    assert loss_a == loss_b
    assert plain.keys() == recomputed.keys() and plain
    if not bf16:
        for k in plain:
            assert torch.equal(plain[k], recomputed[k]), k
        return
    # bf16: the same forward values, but the gradients of the one bf16 copy of a norm's output are summed
    # in bf16 (autocast's own copies sum theirs in fp32): within bf16's rounding of the fp32 gradients
    _, exact = _grads(model, batch)  # fp32
    for k in plain:
        rounding = (plain[k] - exact[k]).norm()
        assert (recomputed[k] - exact[k]).norm() <= 1.5 * rounding + 1e-6, k


def test_recompute_elementwise_saves_fewer_bytes(tiny_chat_model):
    """The bytes autograd keeps for backward (counted by an outer hook that sees what the model saves)."""
    from lmtune.train import memory
    from lmtune.train.loss import causal_lm_loss

    model, tok = _model(tiny_chat_model, lora=True)
    batch = {"input_ids": torch.randint(0, len(tok), (4, 64))}
    batch["labels"] = batch["input_ids"].clone()

    def saved_bytes():
        seen = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        decoder = model.get_base_model().get_decoder()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            decoder(input_ids=batch["input_ids"], use_cache=False)
        return sum(seen.values())

    before = saved_bytes()
    memory.recompute_elementwise(model)
    # the patched decoder installs its own hook (the innermost one wins), so count through its pack
    inner_pack = memory._Tags.pack
    kept = {}

    def counting(self, t):
        out = inner_pack(self, t)
        if isinstance(out, torch.Tensor) and not isinstance(out, torch.nn.Parameter):
            kept[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
        return out
    memory._Tags.pack = counting
    try:
        model.get_base_model().get_decoder()(input_ids=batch["input_ids"], use_cache=False)
    finally:
        memory._Tags.pack = inner_pack
    after = sum(kept.values())
    assert after < 0.8 * before, (before, after)


def test_fused_lora_matches_peft(tiny_chat_model):
    from peft.tuners.lora.layer import Linear

    model, tok = _model(tiny_chat_model, lora=True)
    ids = torch.randint(0, len(tok), (2, 16))
    layers = [m for m in model.modules() if type(m) is Linear]
    assert layers and all("forward" in m.__dict__ for m in layers)  # attach_lora fused them
    fused = model(input_ids=ids).logits
    g_fused = torch.autograd.grad(fused.square().mean(), [p for p in model.parameters() if p.requires_grad])
    for m in layers:
        del m.forward  # back to peft's own forward
    plain = model(input_ids=ids).logits
    g_plain = torch.autograd.grad(plain.square().mean(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("share,expect", [(1.0, 4), (0.5, 2), (0.4, 1), (0.25, 1), (0.0, 0)])
def test_checkpoint_share_picks_layers_evenly(tmp_path, share, expect):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.train.memory import enable_activation_checkpointing

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2))
    assert enable_activation_checkpointing(model, share) == expect


def test_partial_checkpointing_with_recompute_gives_identical_gradients(tiny_chat_model):
    """Half the layers checkpointed, the other half with element-wise recompute: the same gradients as
    keeping everything."""
    from types import SimpleNamespace

    from lmtune.train.memory import save_activation_memory

    model, tok = _model(tiny_chat_model, lora=True)
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (2, 20))
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss_a, plain = _grads(model, batch)
    save_activation_memory(model, SimpleNamespace(activation_checkpointing=True, checkpoint_share=0.5,
                                                  recompute_elementwise=True, compile=False,
                                                  mmap_threshold_mb=0.0, bf16=False))
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [False, True]
    loss_b, mixed = _grads(model, batch)
    assert loss_a == loss_b
    for k in plain:
        assert torch.equal(plain[k], mixed[k]), k


def test_frozen_weights_in_bf16_give_identical_gradients_under_autocast(tiny_chat_model):
    """A LoRA base stored in bf16 gives the bf16 values autocast would cast at every use: same loss, same
    gradients, bit for bit; the tied embedding/head and the norms stay fp32."""
    from lmtune.train import memory

    model, tok = _model(tiny_chat_model, lora=True)
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (3, 24))
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss_a, plain = _grads(model, batch, bf16=True)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "base_layer" in n)
    assert memory.frozen_weights_bf16(model) == 2 * frozen > 0
    loss_b, cast = _grads(model, batch, bf16=True)
    assert loss_a == loss_b
    assert plain.keys() == cast.keys() and plain
    for k in plain:
        assert torch.equal(plain[k], cast[k]), k
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or "embed" in n or "lora_" in n)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # generation runs under autocast too
        assert model.eval().generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


_GROWING_HOLES = """
import sys, torch
from lmtune.train.memory import set_mmap_threshold
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS")) / 1024
print(set_mmap_threshold(float(sys.argv[1])))
first = torch.ones(24 * 2**18)  # 24 MB, freed: glibc's default threshold rises to 24 MB
del first
start, pins = rss(), []
for mb in range(10, 20):  # ever larger blocks, each freed after a small one was allocated
    x = torch.ones(mb * 2**18)
    pins.append(torch.ones(1000))
    del x
print(rss() - start)
"""


@pytest.mark.parametrize("mb", [0, 8])
def test_mmap_threshold_keeps_freed_blocks_from_staying_resident(mb):
    """Blocks of 10-19 MB, allocated and freed one after the other: from the heap (glibc's default once a
    24 MB block was freed) the freed space stays resident (~19 MB measured); mapped (threshold 8 MB) it goes
    back to the system."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _GROWING_HOLES, str(mb)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(bool(mb))
    grew = float(out[1])
    assert (grew < 5) if mb else (grew > 15), grew
