"""`lmtune chat` driven through its standard input, its replies checked against transformers' generate."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_serve import tiny_model_dir

LMTUNE = [sys.executable, "-m", "lmtune"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8")


def run_chat(model: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    # bytes, not text mode: a reply may hold a '\r', which universal newlines would rewrite
    r = subprocess.run(LMTUNE + ["chat", "--model", model, "--max-new-tokens", "8", *args],
                       input=stdin.encode(), capture_output=True, env=ENV, timeout=120)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


@functools.lru_cache(maxsize=4)
def load(model_name: str):
    from lmtune import models

    return models.load_causal_lm(model_name)


def expected_reply(model_name: str, messages: list[dict]) -> str:
    from lmtune.tasks import instruct

    model, tok = load(model_name)
    ids = tok(instruct.render(tok, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain-layout"])
def test_chat_keeps_history_and_obeys_commands(tiny, tmp_path, template):
    model = tiny
    if not template:  # a model whose tokenizer has no chat template: lmtune's plain layout
        model = tmp_path / "plain"
        model.mkdir()
        for f in tiny.iterdir():
            if f.name != "chat_template.jinja":
                (model / f.name).write_bytes(f.read_bytes())
    r = run_chat(str(model), "Hello\n/system Be short.\nWhat?\n/reset\nHello\n/bogus\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    first = expected_reply(str(model), [{"role": "user", "content": "Hello"}])
    second = expected_reply(str(model), [{"role": "system", "content": "Be short."},
                                         {"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": first.strip()},
                                         {"role": "user", "content": "What?"}])
    third = expected_reply(str(model), [{"role": "system", "content": "Be short."},
                                        {"role": "user", "content": "Hello"}])
    assert second != third, "the history should change the second answer"
    assert r.stdout == f"{first}\n{second}\n{third}\n"
    assert "unknown command /bogus" in r.stderr


def test_chat_with_lora_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "lmtune.json").write_text(json.dumps({"base_model": str(tiny), "task": "instruct", "lora": True}))
    r = run_chat(str(adapter), "Hello\n")
    assert r.returncode == 0, r.stderr
    with_adapter = expected_reply(str(adapter), [{"role": "user", "content": "Hello"}])
    assert r.stdout == f"{with_adapter}\n"
    assert with_adapter != expected_reply(str(tiny), [{"role": "user", "content": "Hello"}])


def test_chat_bad_model_is_one_line(tmp_path):
    r = run_chat(str(tmp_path / "missing"), "Hello\n")
    assert r.returncode == 2 and r.stderr.startswith("error: model") and r.stderr.count("\n") == 1


def test_reply_decodes_without_the_callers_openmp_team(tiny, monkeypatch):
    """The reply decodes on a worker thread; the thread that loaded the model gives back its OpenMP team first
    (with two teams the runtime stops spinning at its barriers: the reply ran at 64 instead of 142 tok/s,
    SmolLM2 on 2 cores). That the release frees the team is tested in test_serve; here, that the reply
    releases the caller's team before its worker starts decoding."""
    import io
    import threading

    from lmtune import chat, device
    from lmtune.config import ChatConfig
    from lmtune.generation.decoder import Decoder

    model, tok = load(str(tiny))
    dec, events = Decoder(model), []
    monkeypatch.setattr(device, "release_cpu_threads", lambda: events.append(("release", threading.current_thread())))
    generate = dec.generate
    monkeypatch.setattr(dec, "generate", lambda *a, **k: events.append(("decode", threading.current_thread()))
                        or generate(*a, **k))
    chat.reply(dec, tok, tok("hello")["input_ids"], ChatConfig(model="x", max_new_tokens=4), io.StringIO(), 0, [])
    (what1, thread1), (what2, thread2) = events
    assert (what1, what2) == ("release", "decode")
    assert thread1 is threading.current_thread() and thread2 is not thread1
