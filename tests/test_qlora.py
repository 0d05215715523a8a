"""QLoRA: `finetune --lora --quantize 4bit` on the CPU (bitsandbytes' CPU backend; tests/gpu/ repeats it on CUDA).

Skipped, with the reason, where bitsandbytes is not installed or cannot quantize on the CPU; the one-line
errors around it are tested everywhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_metrics, run_cli

from lmtune.config import FinetuneConfig
from lmtune.errors import LmtuneError
from lmtune.finetune import finetune


def _bnb_cpu_reason() -> str:
    from lmtune import lora

    try:
        lora.check_4bit(torch.device("cpu"))
    except LmtuneError as e:
        return str(e)
    return ""


def test_4bit_needs_lora(tmp_path, tiny_chat_model, dates_jsonl):
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", dates_jsonl, "--out", tmp_path / "x",
                "--quantize", "4bit", "--max-steps", 1)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "add --lora" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_an_eval_forward_leaves_qlora_gradients_as_they_were(smollm2_dir):
    """Retention scoring and validation run the 4-bit model in eval mode without gradients. bitsandbytes'
    CPU backend (0.50, where the CPU has AVX512-BF16, as this machine does) then repacked each 4-bit weight
    for inference, after which its matmul had no backward: layer 0's LoRA-B gradients fell from 0.007-0.45 to
    exactly 0 for the rest of training. Real SmolLM2 in NF4, one backward before and one after."""
    reason = _bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    from lmtune import lora, models

    model, tok, _ = models.load_for_task(smollm2_dir, "instruct", "causal", quantize="4bit",
                                         device=torch.device("cpu"))
    model = lora.attach_lora(model, 8, 16, 0.0, "all-linear")
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt")["input_ids"]

    def layer0_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n}

    before = layer0_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = layer0_grads()
    assert len(before) == 7 and all(float(g.norm()) > 1e-3 for g in before.values())
    for n in before:
        assert torch.allclose(after[n], before[n], rtol=1e-3, atol=1e-6), (n, float(after[n].norm()))


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory, smollm2_dir) -> str:
    """tiny_chat_model with larger initial weights: its frozen (tied) output layer gives logits far from
    uniform, so a LoRA on the blocks moves the loss within a few steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.models import load_tokenizer

    out = tmp_path_factory.mktemp("sharp_tiny")
    tok = load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_qlora_on_cpu_learns_saves_adapter_and_merges_dequantized(tmp_path, sharp_tiny, dates_jsonl):
    """About 1-2 min here (bitsandbytes' CPU kernels are slow): 12 steps, the loss falls by more than 1
    (measured: 12.6 -> 8.5 in 16 steps), the adapter alone is saved, and merge writes a plain fp32 model."""
    reason = _bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    from transformers import AutoModelForCausalLM

    tiny_chat_model = sharp_tiny

    out = tmp_path / "qlora"
    # retention is scored (the default) on the base before the first step: an eval forward, then training
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, quantize="4bit",
                            max_steps=12, batch_size=8, learning_rate=3e-2, warmup_steps=0, schedule="constant",
                            lora_dropout=0.0, max_length=128, device="cpu"))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "lmtune.json").read_text())["quantize"] == "4bit"
    # resume: the checkpoint holds the adapter alone, not the 4-bit base's quantization state (which
    # loading had refused as unexpected keys)
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, quantize="4bit",
                            max_steps=14, batch_size=8, learning_rate=3e-2, warmup_steps=0, schedule="constant",
                            lora_dropout=0.0, max_length=128, device="cpu", resume=True))
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-2:] == [13, 14]

    merged = tmp_path / "merged"
    r = run_cli("merge", "--adapter", out, "--out", merged)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    m = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    # merged = NF4-de-quantized base + the learnt update B @ A * alpha / r, not the fp32 base + update
    import bitsandbytes.functional as bnb_f
    from safetensors.torch import load_file

    w, w0 = m.model.layers[0].mlp.down_proj.weight.detach(), base.model.layers[0].mlp.down_proj.weight.detach()
    lora = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_{}.weight"
    update = (lora[key.format("B")] @ lora[key.format("A")]) * (32 / 16)
    q, state = bnb_f.quantize_4bit(w0, quant_type="nf4", compress_statistics=True)
    w_nf4 = bnb_f.dequantize_4bit(q, state).float()
    assert float(update.abs().max()) > 0.01
    assert torch.allclose(w, w_nf4 + update, atol=1e-4), float((w - w_nf4 - update).abs().max())
    assert float((w - w_nf4 - update).abs().max()) < float((w - w0 - update).abs().max()) / 2
    r = run_cli("generate", "--model", merged, "--prompt", "Rewrite 3 May 2021", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr[-2000:]
