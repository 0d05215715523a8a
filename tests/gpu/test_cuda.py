"""tests/gpu/: every verb on a CUDA device with the small models. Skipped, with the reason, without CUDA.

Run on a GPU machine: `python -m pytest -q tests/gpu` (or bench/gpu.sh, which also runs the benchmarks);
the fixtures of tests/conftest.py (tiny_chat_model, dates_jsonl, ...) are shared. Parity: LoRA training on CUDA against the CPU (fp32 within 1e-3, bf16 within bf16's tolerance), lmtune's
decoder against Hugging Face's generate on the same device, QLoRA's loss falling, serve answering, and
generate/chat/evaluate/predict/probe/pretrain running there with the device's own peak memory reported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli

from lmtune.config import FinetuneConfig
from lmtune.finetune import finetune


def _no_cuda_reason() -> str:
    if torch.cuda.is_available():
        return ""
    build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
    return f"needs a CUDA GPU ({build}, torch {torch.__version__})"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason())]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def _lora(model, data, out, **kw) -> list[float]:
    finetune(FinetuneConfig(model=model, data=data, out=str(out), lora=True, max_steps=6, batch_size=8,
                            learning_rate=1e-2, warmup_steps=0, schedule="constant", lora_dropout=0.0,
                            max_length=128, **kw))
    return _losses(out)


def test_training_parity_with_cpu(tmp_path, tiny_chat_model, dates_jsonl):
    cpu = _lora(tiny_chat_model, dates_jsonl, tmp_path / "cpu", device="cpu", bf16=False)
    fp32 = _lora(tiny_chat_model, dates_jsonl, tmp_path / "cuda32", device="cuda", bf16=False)
    bf16 = _lora(tiny_chat_model, dates_jsonl, tmp_path / "cuda16", device="cuda")  # bf16 by default on CUDA
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(cpu, fp32)), (cpu, fp32)
    assert all(abs(a - b) <= 3e-2 * abs(a) for a, b in zip(cpu, bf16)), (cpu, bf16)
    run = json.loads((tmp_path / "cuda16" / "run.json").read_text())
    assert run["config"]["bf16"] is True and run["config"]["device"] == "cuda"
    peak = [r["peak_mem_mb"] for r in read_metrics(tmp_path / "cuda16") if "peak_mem_mb" in r]
    assert peak and 0 < peak[-1] < 1000  # GPU memory of a tiny model, not the process's resident set


@pytest.mark.parametrize("bf16", [False, True])
def test_greedy_generation_equals_hf_on_cuda(smollm2_dir, bf16):
    from lmtune import models
    from lmtune.generation.decoder import Decoder
    from lmtune.tasks import instruct

    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tok = models.load_causal_lm(smollm2_dir, dtype=dtype, device=torch.device("cuda"))
    prompts = [tok(instruct.prompt_text(tok, p), add_special_tokens=False)["input_ids"]
               for p in ("What is the capital of France?", "Name three colours.", "2 + 2 =")]
    ours = Decoder(model).generate(prompts, 24, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert ours.device.type == "cuda"
    for p, row in zip(prompts, ours.tolist()):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert row[:len(hf)] == hf


def test_compiled_decoding_on_cuda_equals_eager(tiny_chat_model):
    from lmtune import models
    from lmtune.generation.decoder import Decoder

    model, _ = models.load_causal_lm(tiny_chat_model, device=torch.device("cuda"))
    prompts = [[1, 2, 3, 4], [5, 6]]
    eager = Decoder(model).generate(prompts, 16, pad_id=0)
    compiled = Decoder(model, compile=True).generate(prompts, 16, pad_id=0)
    assert torch.equal(eager, compiled)


def test_qlora_loss_falls_on_cuda(tmp_path, smollm2_dir, dates_jsonl):
    pytest.importorskip("bitsandbytes", reason="lmtune[gpu] (bitsandbytes) is not installed")
    out = tmp_path / "qlora"
    finetune(FinetuneConfig(model=smollm2_dir, data=dates_jsonl, out=str(out), lora=True, quantize="4bit",
                            max_steps=20, batch_size=8, learning_rate=2e-3, warmup_steps=0, schedule="constant",
                            lora_dropout=0.0, max_length=128, device="cuda"))
    losses = _losses(out)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert (out / "adapter_model.safetensors").is_file()
    # resume continues from the last checkpoint (it holds the adapter, not the 4-bit base's quantization state)
    finetune(FinetuneConfig(model=smollm2_dir, data=dates_jsonl, out=str(out), lora=True, quantize="4bit",
                            max_steps=22, batch_size=8, learning_rate=2e-3, warmup_steps=0, schedule="constant",
                            lora_dropout=0.0, max_length=128, device="cuda", resume=True))
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-2:] == [21, 22]
    merged = tmp_path / "merged"
    r = run_cli("merge", "--adapter", out, "--out", merged)
    assert r.returncode == 0 and "quantization_config" not in (merged / "config.json").read_text(), r.stderr


def test_inference_verbs_run_on_cuda(tmp_path, tiny_chat_model, dates_jsonl):
    for args in (["generate", "--model", tiny_chat_model, "--prompt", "Hello", "--max-new-tokens", 4],
                 ["evaluate", "--model", tiny_chat_model, "--task", "instruct", "--data", dates_jsonl,
                  "--limit", 4, "--max-new-tokens", 4, "--json"],
                 ["predict", "--model", tiny_chat_model, "--task", "instruct", "--data", dates_jsonl, "--limit", 4,
                  "--max-new-tokens", 4,
                  "--out", tmp_path / "p.jsonl"],
                 ["probe", "--model", tiny_chat_model, "--json"]):
        r = run_cli(*args, "--device", "cuda")
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
    chat = subprocess.run([sys.executable, "-m", "lmtune", "chat", "--model", tiny_chat_model, "--device", "cuda",
                           "--max-new-tokens", "4"], input=b"hello\n/exit\n", capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]


def test_pretrain_on_cuda_reports_gpu_memory(tmp_path, shakespeare_small):
    out = tmp_path / "pre"
    r = run_cli("pretrain", "--data", shakespeare_small, "--out", out, "--model-size", "1m", "--max-steps", 5,
                "--tokenizer", "char", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-2000:]
    peak = [m["peak_mem_mb"] for m in read_metrics(out) if "peak_mem_mb" in m]
    assert peak and 0 < peak[-1] < 500


def test_serve_answers_on_cuda(tiny_chat_model):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", "serve", "--model", tiny_chat_model, "--port", str(port),
                             "--device", "cuda"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LMTUNE_API_KEY": ""})
    try:
        deadline, reply = time.time() + 180, None
        while time.time() < deadline and reply is None:
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                   json={"model": tiny_chat_model, "prompt": "Hello", "max_tokens": 4})
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(1)
        assert reply is not None and reply.status_code == 200, reply and reply.text
        assert reply.json()["choices"][0]["text"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
