"""lmtune.generation.decoder: greedy output token for token as HF's generate (fp32), left padding, per-row EOS stop."""

from __future__ import annotations

import pytest
import torch

from lmtune.generation.decoder import Decoder, HFRunner, LlamaRunner

PROMPTS = ["Rewrite this date in ISO format: March 5, 2024", "Hi", "Name three colours of the rainbow, please."]


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    from lmtune import models

    model, tok = models.load_causal_lm(tiny_chat_model)
    model.eval()
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return model, tok, ids


def hf_generate(model, tok, prompts, n, eos):
    """HF's greedy generate on left-padded prompts; the ids after the prompt."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out[:, width:]


@pytest.mark.parametrize("rows", [[0], [1], [0, 1], [1, 2, 0]])
def test_greedy_matches_hf(tiny, rows):
    model, tok, ids = tiny
    prompts = [ids[i] for i in rows]
    dec = Decoder(model)
    assert isinstance(dec.runner, LlamaRunner)
    ours = dec.generate(prompts, 24, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, hf_generate(model, tok, prompts, 24, tok.eos_token_id))


def test_eos_stops_each_row(tiny):
    """With the 5th token of row 0 as EOS, row 0 stops there (then pads) while row 1 goes on, as in HF."""
    model, tok, ids = tiny
    prompts = [ids[0], ids[1]]
    free = Decoder(model).generate(prompts, 16, eos_ids=[], pad_id=tok.pad_token_id)
    eos = int(free[0, 4])
    ours = Decoder(model).generate(prompts, 16, eos_ids=[eos], pad_id=tok.pad_token_id)
    ref = hf_generate(model, tok, prompts, 16, eos)
    assert torch.equal(ours, ref)
    first = int((ours[0] == eos).nonzero()[0])
    assert first <= 4 and (ours[0, first + 1:] == tok.pad_token_id).all()


def test_generic_runner_matches_hf(tiny):
    """Architectures without the fast path run through the model's own forward: same output."""
    model, tok, ids = tiny
    dec = Decoder(model)
    dec.runner, dec.fast = HFRunner(model), False
    prompts = [ids[1], ids[0]]
    ours = dec.generate(prompts, 12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, hf_generate(model, tok, prompts, 12, tok.eos_token_id))


def test_sampling_is_seeded_and_respects_top_k(tiny):
    model, tok, ids = tiny
    dec = Decoder(model)
    kw = dict(eos_ids=[], pad_id=tok.pad_token_id, temperature=0.8, top_k=5, top_p=0.9)
    a = dec.generate([ids[0]], 10, seed=1, **kw)
    assert torch.equal(a, dec.generate([ids[0]], 10, seed=1, **kw))
    top1 = dec.generate([ids[0]], 10, eos_ids=[], pad_id=tok.pad_token_id, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(top1, dec.generate([ids[0]], 10, eos_ids=[], pad_id=tok.pad_token_id))  # top-1 = greedy


def test_lora_model_is_merged(tiny, tiny_chat_model):
    from peft import LoraConfig, get_peft_model

    from lmtune import models

    _, tok, ids = tiny
    base, _ = models.load_causal_lm(tiny_chat_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    ref = hf_generate(peft_model, tok, [ids[0]], 12, tok.eos_token_id)
    ours = Decoder(peft_model).generate([ids[0]], 12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, ref)


def test_cli_generate(tiny, tiny_chat_model, capsys):
    """`lmtune generate` prints what HF's greedy generate gives for the same chat-rendered prompt."""
    from lmtune.config import GenerateConfig
    from lmtune.generate import generate

    model, tok, ids = tiny
    text = generate(GenerateConfig(model=tiny_chat_model, prompt=PROMPTS[0], max_new_tokens=8))
    ref = tok.decode(hf_generate(model, tok, [ids[0]], 8, tok.eos_token_id)[0], skip_special_tokens=True)
    assert text == ref and capsys.readouterr().out == text + "\n"


def test_int8_weights_stay_close_to_fp32(tiny):
    """Weight-only int8: the next-token logits stay close to fp32's, for one row (int8 kernel) and for a
    prefill of many rows (the bf16 copy); the first greedy token agrees."""
    model, tok, ids = tiny
    fp32, int8 = Decoder(model), Decoder(model, quantize="int8")
    with torch.inference_mode():
        for prompt in ids:
            for dec in (fp32, int8):
                dec.runner.reset(1, len(prompt) + 1)
            args = (torch.tensor([prompt]), torch.arange(len(prompt))[None], None, torch.arange(len(prompt)),
                    len(prompt))
            full, quant = fp32.runner.forward(*args), int8.runner.forward(*args)
            assert torch.nn.functional.cosine_similarity(full, quant).item() > 0.999
            # one token at a time (the int8 kernel path)
            step = (torch.tensor([[prompt[-1]]]), torch.tensor([[len(prompt)]]), None, torch.tensor([len(prompt)]),
                    len(prompt) + 1)
            assert torch.nn.functional.cosine_similarity(fp32.runner.forward(*step),
                                                         int8.runner.forward(*step)).item() > 0.999
    a = fp32.generate(ids, 1, pad_id=tok.pad_token_id)
    b = int8.generate(ids, 1, pad_id=tok.pad_token_id)
    assert torch.equal(a, b)


def test_int8_needs_a_llama(tiny):
    from lmtune.errors import LmtuneError

    model, _, _ = tiny
    with pytest.raises(LmtuneError, match="--quantize int8"):
        Decoder(type("NotALlama", (torch.nn.Module,), {"config": model.config})(), quantize="int8")


def snap(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` rounded onto GGUF's Q4_1 (bits=4) or Q8_0 (bits=8) grid, as llama.cpp quantizes and gguf dequantizes."""
    blk = w.detach().float().reshape(w.shape[0], -1, 32)
    lo, hi = blk.amin(-1, keepdim=True), blk.amax(-1, keepdim=True)
    if bits == 4:
        d, m = ((hi - lo) / 15).half().float(), lo.half().float()
        q = torch.round((blk - lo) / d.clamp(min=1e-30)).clamp(0, 15)  # an all-zero row (padding) has d = 0
    else:
        d, m = (torch.maximum(hi, -lo) / 127).half().float(), torch.zeros_like(lo)
        q = torch.round(blk / d.clamp(min=1e-30)).clamp(-127, 127)
    return (d * q + m).reshape(w.shape)


def test_block_kernel_equals_the_dense_matmul():
    """gguf_weights.linear on a factored matrix gives F.linear's values (fp32, up to summation order) for 1 to 9
    rows and both block widths; a matrix off the grid by one ulp is not factored."""
    import shutil

    from lmtune.generation import gguf_weights

    if not shutil.which("c++"):
        pytest.skip("no C++ compiler: the block kernel is not built (dense weights are used)")
    assert gguf_weights.available()
    torch.manual_seed(0)
    for bits, shape in ((4, (96, 64)), (8, (40, 96))):
        w = snap(torch.randn(shape) * 0.05, bits)
        blk = gguf_weights.factor(w)
        assert blk is not None and blk.bits == bits and blk.nbytes < w.numel() * 4 / 3
        n, k = shape
        if bits == 4:  # two weights a byte: i in the low nibble, i + 16 in the high one
            q = blk.q.view(n, k // 32, 16)
            q = torch.cat((q & 15, q >> 4), -1).float()
        else:
            q = blk.q.view(torch.int8).view(n, k // 32, 32).float()
        assert torch.equal((blk.d[..., None] * q + blk.m[..., None]).view(shape), w)  # bit for bit
        for rows in range(1, 10):
            x = torch.randn(rows, shape[1])
            assert torch.allclose(gguf_weights.linear(x, blk), torch.nn.functional.linear(x, w), atol=1e-6, rtol=1e-5)
        off = w.clone()
        off[3, 7] = torch.nextafter(off[3, 7], torch.tensor(1.0))
        assert gguf_weights.factor(off) is None


def snapped(folder):
    """The tiny model with every layer on the Q4_1 grid and the embedding on Q8_0's, like a converted GGUF."""
    from lmtune import models

    model, _ = models.load_causal_lm(folder)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(snap(p, 8 if "embed" in name else 4))
    return model


def test_gguf_block_weights_decode_exactly_as_hf(tiny, tiny_chat_model, monkeypatch):
    """A model whose weights are GGUF blocks (as a converted GGUF's are) is decoded through the block kernel
    (forced: at the tiny model's shapes the dense matmul is measured faster), and greedy output is token for
    token HF's fp32 generate; one matrix moved off the grid stays dense."""
    from lmtune import models
    from lmtune.generation import gguf_weights

    if not gguf_weights.available():
        pytest.skip("no block kernel on this machine")
    monkeypatch.setenv("LMTUNE_KERNELS", "blocks")
    _, tok, ids = tiny
    model = snapped(tiny_chat_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # not on the grid any more
    dec = Decoder(model)
    kinds = [type(L[k]).__name__ for L in dec.runner.layers for k in ("wqkv", "wo", "wgu", "wd")]
    assert kinds == ["Block"] * 7 + ["Tensor"] and dec.runner.head.bits == 8
    prompts = [ids[0], ids[2], ids[1]]
    ours = dec.generate(prompts, 24, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, hf_generate(model, tok, prompts, 24, tok.eos_token_id))
    assert torch.equal(ours, Decoder(model, gguf_blocks=False).generate(prompts, 24, eos_ids=[tok.eos_token_id],
                                                                       pad_id=tok.pad_token_id))


def test_lora_on_a_block_base_stays_unmerged(tiny, tiny_chat_model, monkeypatch):
    """A LoRA adapter on a GGUF-block base is added beside the block kernel instead of merged (merging would
    leave the block form): greedy output is peft's unmerged generate, token for token."""
    from peft import LoraConfig, get_peft_model

    from lmtune.generation import gguf_weights

    if not gguf_weights.available():
        pytest.skip("no block kernel on this machine")
    monkeypatch.setenv("LMTUNE_KERNELS", "blocks")
    _, tok, ids = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(snapped(tiny_chat_model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():  # adapters big enough to change what the model says
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(20)
    peft_model.eval()
    prompts = [ids[0], ids[2]]
    ref = hf_generate(peft_model, tok, prompts, 16, tok.eos_token_id)
    base = Decoder(snapped(tiny_chat_model)).generate(prompts, 16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert not torch.equal(ref, base)  # the adapter matters
    dec = Decoder(peft_model)
    L = dec.runner.layers[0]
    assert isinstance(L["wqkv"], gguf_weights.Block) and L["lqkv"][0].shape == (8, 32) and L["lo"] is None
    assert L["lqkv"][1][32:64].abs().sum() == 0 and L["lqkv"][1][64:].abs().sum() > 0  # q, v adapted; k not
    ours = dec.generate(prompts, 16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, ref)


def test_smollm2_decodes_from_its_gguf_blocks_as_hf(smollm2_dir, monkeypatch):
    """The default model's every matrix is exactly a GGUF block (Q4_1 layers, Q8_0 embedding): all of them
    are read in block form (forced), and greedy output equals HF's fp32 generate; so does the output with
    the kernels this machine measured faster."""
    from lmtune import models
    from lmtune.generation import gguf_weights
    from lmtune.tasks import instruct

    if not gguf_weights.available():
        pytest.skip("no block kernel on this machine")
    model, tok = models.load_causal_lm(smollm2_dir)
    model.eval()
    monkeypatch.setenv("LMTUNE_KERNELS", "blocks")
    dec = Decoder(model)
    assert all(isinstance(L[k], gguf_weights.Block) for L in dec.runner.layers for k in ("wqkv", "wo", "wgu", "wd"))
    assert [L["wgu"].bits for L in dec.runner.layers] == [4] * 30 and dec.runner.head.bits == 8
    prompts = [tok(instruct.prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    ours = dec.generate(prompts, 16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    ref = hf_generate(model, tok, prompts, 16, tok.eos_token_id)
    assert torch.equal(ours, ref)
    monkeypatch.delenv("LMTUNE_KERNELS")
    dec = Decoder(model)
    assert set(dec.runner.kernels) == {"960x576 q4", "576x576 q4", "3072x576 q4", "576x1536 q4", "49152x576 q8"}
    assert torch.equal(dec.generate(prompts, 16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id), ref)


def test_no_compiler_means_dense_weights(tiny, monkeypatch):
    """Without a C++ compiler (or with LMTUNE_NO_KERNELS set) nothing is factored and decoding is unchanged."""
    from lmtune.generation import gguf_weights

    monkeypatch.setattr(gguf_weights, "_LIB", False)
    monkeypatch.setenv("LMTUNE_NO_KERNELS", "1")
    assert not gguf_weights.available()
    model, tok, ids = tiny
    dec = Decoder(model)
    assert all(isinstance(L["wqkv"], torch.Tensor) for L in dec.runner.layers)
    assert torch.equal(dec.generate([ids[0]], 8, eos_ids=[], pad_id=tok.pad_token_id),
                       hf_generate(model, tok, [ids[0]], 8, None))
