"""`lmtune merge` and `lmtune export`: round trips compared token by token on a tiny Llama + LoRA adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmtune import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,"]
TEXT = ("The quick brown fox jumps over the lazy dog. Hello there, how are you today? The capital of France is "
        "Paris, of Italy Rome. Count: 1, 2, 3, 4, 5. What's up? I'm fine, thanks! ") * 20
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_model_dir(out: Path) -> Path:
    """A random 2-layer Llama with a 400-token byte-level BPE tokenizer trained here (small, so that
    reading the GGUF back, which parses every token and merge in Python, takes a second, not fifteen)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def greedy_ids(model, tok, n: int = 12) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p)["input_ids"]])
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist())
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("merge") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny) -> Path:
    """A LoRA adapter on every linear layer with random (not zero) B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    out = tiny.parent / "adapter"
    model.save_pretrained(out)
    (out / "lmtune.json").write_text(json.dumps({"base_model": str(tiny), "task": "instruct", "lora": True}))
    return out


def test_merge_equals_base_plus_adapter(tiny, adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune import models

    out = tmp_path / "merged"
    code, err = run_cli(["merge", "--adapter", str(adapter), "--out", str(out)], capsys)
    assert code == 0, err
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "lmtune.json"):
        assert (out / f).is_file(), f
    assert not (out / "adapter_config.json").exists()
    peft_model, tok = models.load_causal_lm(str(adapter))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    base, _ = models.load_causal_lm(str(tiny))
    expected = greedy_ids(peft_model, tok)
    assert greedy_ids(merged, tok) == expected
    assert greedy_ids(base, tok) != expected, "the adapter should change the outputs"
    assert json.loads((out / "lmtune.json").read_text())["task"] == "instruct"
    code, err = run_cli(["merge", "--adapter", str(adapter), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err


def test_merge_into_wrong_base_is_one_line(adapter, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (other / f).write_bytes((adapter.parent / "tiny" / f).read_bytes())
    code, err = run_cli(["merge", "--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "does not fit base model" in err, err
    assert not (tmp_path / "m").exists()


def test_export_gguf_f32_round_trip_of_adapter(adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune import models

    out = tmp_path / "gguf" / "tiny.gguf"
    code, err = run_cli(["export", "--model", str(adapter), "--out", str(out), "--dtype", "f32"], capsys)
    assert code == 0, err
    source, tok = models.load_causal_lm(str(adapter))
    reloaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
    gtok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "Hi! 2024-01-05 <|im_start|>user\nwhat's up?<|im_end|>"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    assert gtok.chat_template == tok.chat_template
    assert greedy_ids(reloaded, tok) == greedy_ids(source, tok)


def test_export_gguf_f16_and_safetensors(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune import models

    source, tok = models.load_causal_lm(str(tiny))
    out = tmp_path / "tiny-f16.gguf"
    code, err = run_cli(["export", "--model", str(tiny), "--out", str(out)], capsys)
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    ids = torch.tensor([tok("Hello there, how are you")["input_ids"]])
    with torch.no_grad():
        a, b = source(ids).logits, reloaded(ids).logits
    assert torch.allclose(a, b, atol=0.05, rtol=0.01), (a - b).abs().max()
    folder = tmp_path / "hf"
    code, err = run_cli(["export", "--model", str(tiny), "--format", "safetensors", "--out", str(folder)], capsys)
    assert code == 0, err
    assert greedy_ids(AutoModelForCausalLM.from_pretrained(folder), tok) == greedy_ids(source, tok)


def test_export_unsupported_architecture_is_one_line(tmp_path, tiny, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / f).write_bytes((tiny / f).read_bytes())
    code, err = run_cli(["export", "--model", str(gpt2), "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and err.count("\n") == 1 and "architecture 'gpt2' is not supported" in err, err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(os.environ.get("LMTUNE_SKIP_SLOW") == "1", reason="LMTUNE_SKIP_SLOW=1")
def test_export_smollm2_gguf_same_greedy_output(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune import models
    from lmtune.tasks import instruct

    try:
        models.resolve("smollm2-135m")
    except Exception as e:
        pytest.skip(f"smollm2-135m not available: {e}")
    out = tmp_path / "smollm2.gguf"
    code, err = run_cli(["export", "--model", "smollm2-135m", "--out", str(out), "--dtype", "f32"], capsys)
    assert code == 0, err
    source, tok = models.load_causal_lm("smollm2-135m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    ids = torch.tensor([tok(instruct.prompt_text(tok, "What is the capital of France?"),
                            add_special_tokens=False)["input_ids"]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert reloaded.generate(ids, **kwargs).tolist() == source.generate(ids, **kwargs).tolist()


@pytest.mark.parametrize("qtype, step", [("q8_0", 1 / 127), ("q4_0", 1 / 8)])
def test_export_gguf_quantized(tiny, tmp_path, capsys, qtype, step):
    """--quantize writes the 2-D weights in that GGUF type (q4_0: the tied embedding in q8_0), norms in f32;
    every weight read back is within one quantization step (block max x step) of the source's, and
    transformers' GGUF reader loads the file."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    from lmtune import models
    from lmtune.export import permute_rotary

    out = tmp_path / f"tiny-{qtype}.gguf"
    code, err = run_cli(["export", "--model", str(tiny), "--out", str(out), "--quantize", qtype], capsys)
    assert code == 0, err
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["blk.0.attn_q.weight"] == qtype.upper() and types["blk.1.ffn_down.weight"] == qtype.upper()
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    source, tok = models.load_causal_lm(str(tiny))
    state, cfg = source.state_dict(), source.config
    pairs = {"blk.0.attn_q.weight": permute_rotary(state["model.layers.0.self_attn.q_proj.weight"].numpy(),
                                                   cfg.num_attention_heads),
             "blk.1.ffn_down.weight": state["model.layers.1.mlp.down_proj.weight"].numpy()}
    for name, w in pairs.items():
        back = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(w.shape)
        block_max = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)
        error = np.abs(back - w).reshape(w.shape[0], -1, 32)
        assert (error <= block_max * step + 1e-6).all() and error.max() > 0, (name, error.max())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.tensor([tok("Hello there")["input_ids"]])).logits).all()


def test_export_gguf_type_it_cannot_write_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    code, err = run_cli(["export", "--model", str(tiny), "--out", str(out), "--quantize", "q4_k"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--quantize q4_k" in err and "q8_0" in err, err
    assert not out.exists()
