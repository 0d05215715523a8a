"""`lmtune serve`: the official openai client against a server started here, on a tiny random Llama."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmtune.config import ServeConfig

KEY = "test-key"
NAME = "tiny"


def tiny_model_dir(out: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (and chat template). Weights are drawn wide
    (initializer_range) so greedy decoding wanders over many tokens instead of repeating one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune import models

    src = Path(models.resolve("smollm2-135m"))  # the package's GGUF, converted into the session's cache
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, out / f)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                      initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from lmtune import models
    from lmtune.serving.api import create_app, make_state

    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    model, tok = models.load_causal_lm(str(path))
    cfg = ServeConfig(model=str(path), model_name=NAME, max_tokens=64, max_prompt_tokens=100, max_n=4,
                      max_body_bytes=20_000, max_batch=16, batch_wait_ms=20)
    state = make_state(model, tok, cfg, {"task": "instruct"})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(state, KEY), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", state=state, model=model, tok=tok)
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(server, ids: list[int], n: int) -> str:
    """What the model says without the server: transformers' own generate, one prompt, no padding."""
    with torch.no_grad():
        out = server.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=2)
    return server.tok.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(server, messages) -> list[int]:
    text = server.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return server.tok(text, add_special_tokens=False)["input_ids"]


def test_models_health_and_schema(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert h["status"] == "ok" and h["model"] == NAME
    paths = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/classify", "/v1/answer"):
        assert p in paths


def test_completion_equals_greedy_generate(client, server):
    r = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=12, temperature=0)
    ids = server.tok("The quick brown fox")["input_ids"]
    assert r.choices[0].text == greedy(server, ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12


def test_chat_and_stream_agree_with_generate(client, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = greedy(server, chat_ids(server, msgs), 10)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several chunks"
    assert "".join(pieces) == expected and finish == "length"


def test_stop_string_and_n(client, server):
    full = client.completions.create(model=NAME, prompt="Once upon", max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)], (full, stop)
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=1.0, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_limits_answer_400(client, server):
    for kwargs, param in [(dict(max_tokens=65), "max_tokens"), (dict(n=5), "n"),
                          (dict(prompt="word " * 150), "prompt")]:
        args = dict(model=NAME, prompt="hi", max_tokens=4) | kwargs
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        err = e.value.body
        assert e.value.status_code == 400 and err["param"] == param and err["message"], err
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "hi", ', None),                                   # malformed JSON
    (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),          # wrong type
    (b'{"prompt": 5}', "prompt"),
    (b'{"messages": "hello"}', "messages"),
    (b'{"prompt": "' + b"x" * 30_000 + b'"}', None),                 # body above max_body_bytes
])
def test_bad_input_is_a_400_in_openai_format(server, body, param):
    route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(server.url + route, content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"].split(".")[0] == param


def test_concurrent_requests_are_batched_and_all_answered(client, server):
    prompts = [f"Story number {i}: once" + " and" * (i % 5) for i in range(16)]
    before = server.state.batcher.stats["batches"]

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=6 + len(p) % 7, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert server.state.batcher.stats["largest_batch"] > 1
    assert server.state.batcher.stats["batches"] - before < 16
    for p, a in zip(prompts, answers):  # left padding in a batch must not change any answer
        assert a.choices[0].text == greedy(server, server.tok(p)["input_ids"], 6 + len(p) % 7)


def test_requests_join_a_running_batch(client, server):
    """Continuous batching: requests sent while a long one is generating join its batch."""
    stats = server.state.batcher.stats
    joined, batches = stats["joined"], stats["batches"]
    prompts = [f"Late request {i}" for i in range(3)]
    stream = client.completions.create(model=NAME, prompt="A long one", max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))  # the long request is now in the batcher's decode loop
    with ThreadPoolExecutor(3) as pool:
        late = list(pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0),
                             prompts))
    rest = "".join(c.choices[0].text for c in stream)
    assert stats["joined"] - joined >= 1 and stats["batches"] - batches < 4
    assert first.choices[0].text + rest == greedy(server, server.tok("A long one")["input_ids"], 60)
    for p, a in zip(prompts, late):
        assert a.choices[0].text == greedy(server, server.tok(p)["input_ids"], 5)


def test_disconnect_mid_stream_stops_generation(server):
    stats = server.state.batcher.stats
    cancelled, made = stats["cancelled"], stats["generated_tokens"]
    body = {"model": NAME, "prompt": "Go on forever", "max_tokens": 64, "stream": True, "temperature": 0}
    # a slow client: each token waits for the batcher's turn; read two events, then hang up
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for _, line in zip(range(3), r.iter_lines())]
    assert any(line.startswith("data: ") for line in lines)
    deadline = time.time() + 10
    while stats["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert stats["cancelled"] == cancelled + 1
    assert stats["generated_tokens"] - made < 64


def test_task_routes(server, monkeypatch):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/classify", json={"input": "great film"}, headers=h)
    assert r.status_code == 400 and "--task classify" in r.json()["error"]["message"]
    fake = types.ModuleType("lmtune.tasks.qa")
    fake.predict = lambda model, tok, rows, cfg, meta: [{"answer": r["context"].split()[0]} for r in rows]
    monkeypatch.setitem(sys.modules, "lmtune.tasks.qa", fake)
    monkeypatch.setitem(server.state.meta, "task", "qa")
    r = httpx.post(server.url + "/v1/answer", json={"input": [{"question": "who?", "context": "Ada wrote it"}]},
                   headers=h)
    assert r.status_code == 200 and r.json()["data"] == [{"index": 0, "answer": "Ada"}]
    r = httpx.post(server.url + "/v1/answer", json={"input": "no context"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_serve_cli_takes_key_from_env_and_refuses_a_busy_port(tmp_path):
    path = tiny_model_dir(tmp_path / "model")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", LMTUNE_API_KEY="env-key")
    cmd = [sys.executable, "-m", "lmtune", "serve", "--model", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", headers={"Authorization": "Bearer env-key"}).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()
        assert httpx.get(url + "/health").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        r = client.chat.completions.create(model=str(path), messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.model == str(path)
        busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"serving '{path}' at http://127.0.0.1:{port}/v1 (API key required)" in proc.stderr.read()


def test_classify_model_serves_its_task_route_only(tmp_path):
    """A real classify fine-tune layout (sequence-classification head, labels in lmtune.json), loaded by
    the task's own loader; requests go through the app in-process."""
    from fastapi.testclient import TestClient
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lmtune.serve import load_model
    from lmtune.serving.api import create_app, make_state

    path = tiny_model_dir(tmp_path / "lm")
    cls_dir = tmp_path / "cls"
    labels = dict(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    cfg = LlamaConfig.from_pretrained(path, **labels)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(cls_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / f, cls_dir / f)
    (cls_dir / "lmtune.json").write_text(json.dumps({"task": "classify", "head": "seq_cls", "labels": ["neg", "pos"]}))
    serve_cfg = ServeConfig(model=str(cls_dir), model_name="cls")
    model, tok, meta = load_model(serve_cfg)
    state = make_state(model, tok, serve_cfg, meta)
    assert state.batcher is None
    http = TestClient(create_app(state))
    r = http.post("/v1/classify", json={"input": ["a fine film", "dull"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and all(d["label"] in ("neg", "pos") for d in data)
    assert abs(sum(data[0]["probabilities"].values()) - 1) < 1e-4
    r = http.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_generative"
    r = http.post("/v1/translate", json={"input": "hi"})
    assert r.status_code == 400 and "--task translate" in r.json()["error"]["message"]


@pytest.mark.parametrize("generic", [False, True], ids=["static-cache", "model-forward"])
def test_slots_decode_every_row_as_alone(server, generic):
    """Rows join the slot cache at different steps and leave when done (the last row moving into a freed
    slot); each row's greedy tokens are the decoder's for that prompt alone."""
    from lmtune.generation.decoder import Decoder, HFRunner
    from lmtune.generation.slots import slots

    dec = Decoder(server.model)
    if generic:
        dec.runner, dec.fast = HFRunner(server.model), False
    prompts = [server.tok(p)["input_ids"] for p in ("The quick brown fox", "Hi", "Once upon a time there was")]
    wants = [12, 5, 9]
    with torch.inference_mode():
        alone = [dec.generate([p], n, pad_id=2)[0].tolist() for p, n in zip(prompts, wants)]
        s = slots(dec, 3, 256)
        joins = {0: [0], 3: [1, 2]}  # step -> prompts that join before it
        rows, made, logits = [], {i: [] for i in range(3)}, None
        for step in range(40):
            if step in joins:
                new = s.add([prompts[i] for i in joins[step]], [wants[i] for i in joins[step]])
                logits = new if logits is None else torch.cat([logits, new])
                rows += joins[step]
            tokens = logits.argmax(-1).tolist()
            for i in reversed(range(len(rows))):
                made[rows[i]].append(tokens[i])
                if len(made[rows[i]]) == wants[rows[i]]:
                    s.remove(i)
                    rows[i], tokens[i] = rows[-1], tokens[-1]
                    rows.pop(), tokens.pop()
            if not rows:
                break
            logits = s.step(tokens)
    assert [made[i] for i in range(3)] == alone and s.n == 0


def slowed(monkeypatch, batcher, seconds: float) -> list[int]:
    """Make each decode step of the batcher take `seconds` longer; the list of rows per step, as they run."""
    sizes, step = [], batcher.slots.step

    def slow_step(tokens):
        sizes.append(len(tokens))
        time.sleep(seconds)
        return step(tokens)

    monkeypatch.setattr(batcher.slots, "step", slow_step)
    return sizes


def test_a_request_joins_mid_batch_while_the_others_go_on(client, server, monkeypatch):
    """Two streams are decoding; a third request joins at the next step, is answered as if alone, and
    leaves when it stops while the two go on to their own ends, also answered as if alone."""
    sizes = slowed(monkeypatch, server.state.batcher, 0.01)
    long = ["A long one", "Another long story"]
    streams = [client.completions.create(model=NAME, prompt=p, max_tokens=48, temperature=0, stream=True)
               for p in long]
    firsts = [next(iter(s)).choices[0].text for s in streams]
    late = client.completions.create(model=NAME, prompt="Late request", max_tokens=5, temperature=0)
    rests = ["".join(c.choices[0].text for c in s) for s in streams]
    assert late.choices[0].text == greedy(server, server.tok("Late request")["input_ids"], 5)
    for p, first, rest in zip(long, firsts, rests):
        assert first + rest == greedy(server, server.tok(p)["input_ids"], 48)
    three = [i for i, n in enumerate(sizes) if n == 3]  # the steps the late request shared with both
    assert 1 <= len(three) <= 5, sizes
    assert three == list(range(three[0], three[-1] + 1)) and 2 in sizes[three[-1] + 1:], sizes


def test_a_cancelled_stream_frees_its_slot(client, server, monkeypatch):
    """A client hanging up mid-stream frees its slot at the next step while another stream goes on (moved
    into the freed slot, its answer unchanged); then every slot is free again."""
    batcher = server.state.batcher
    slowed(monkeypatch, batcher, 0.02)
    cancelled = batcher.stats["cancelled"]
    body = {"model": NAME, "prompt": "Go on forever", "max_tokens": 64, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # admitted first: slot 0
        lines = [line for _, line in zip(range(3), r.iter_lines())]
        keep = client.completions.create(model=NAME, prompt="A long one", max_tokens=60, temperature=0, stream=True)
        first = next(iter(keep)).choices[0].text  # slot 1
    assert any(line.startswith("data: ") for line in lines)
    deadline = time.time() + 10
    while batcher.stats["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.005)
    assert batcher.stats["cancelled"] == cancelled + 1
    assert batcher.slots.n == 1 and [r.ids for r in batcher.active] == [server.tok("A long one")["input_ids"]]
    rest = "".join(c.choices[0].text for c in keep)
    assert first + rest == greedy(server, server.tok("A long one")["input_ids"], 60)
    while batcher.active and time.time() < deadline:
        time.sleep(0.005)
    assert batcher.slots.n == 0 and batcher.stats["free_slots"] == server.state.cfg.max_batch


def test_sampled_answer_is_generates_with_the_same_seed(client, server):
    """One sampler: a sampled request (temperature, top-p, seed) draws what `lmtune generate`'s decoder
    draws with the same settings and seed; its draws do not depend on the other rows of the batch."""
    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import Sampling, logprobs, pick_each

    ids = server.tok("Once upon")["input_ids"]
    out = Decoder(server.model).generate([ids], 10, eos_ids=[2], pad_id=2, temperature=0.9, top_p=0.9, seed=5)
    r = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    assert r.choices[0].text == server.tok.decode(out[0], skip_special_tokens=True)
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    s = Sampling(0.9, 5, 0.9, seed=7)
    alone = pick_each(logits[1:2], [s], [s.generator()])
    other = Sampling(1.0, seed=1)
    mixed = pick_each(logits, [Sampling(), s, other], [None, s.generator(), other.generator()])
    assert mixed[1] == alone[0] and mixed[0] == logits[0].argmax()
    assert torch.allclose(logprobs(logits, mixed), logits.log_softmax(-1)[torch.arange(3), mixed])


def test_the_thread_that_hands_the_model_over_gives_back_its_openmp_threads():
    """OpenMP keeps a team of worker threads for each thread that ran a parallel region, and stops spinning at
    its barriers once it manages more threads than there are cores: a server whose loading thread kept its
    team decoded at half speed on the batcher's thread (63 vs 142 tok/s, SmolLM2 on 2 cores). The batcher
    releases its creator's team (lmtune.device.release_cpu_threads); here, the team's thread is gone."""
    code = """
import os, torch
from lmtune.device import release_cpu_threads
torch.set_num_threads(2)
x = torch.randn(4_000_000)
before = len(os.listdir('/proc/self/task'))
for _ in range(3):
    (x * 2).sum()  # a parallel region: the runtime starts a worker thread for this thread
during = len(os.listdir('/proc/self/task'))
release_cpu_threads()
print(before, during, len(os.listdir('/proc/self/task')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, during, after = map(int, out)
    assert during > before and after < during, out
