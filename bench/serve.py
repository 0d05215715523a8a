"""Throughput and latency of `lmtune serve` under 1, 4 and 16 concurrent clients, over real HTTP.

Starts `lmtune serve` in a subprocess on a free local port, then for each concurrency level runs that
many client threads (each with its own httpx connection) sending chat completions back to back, and
prints requests/s, generated tokens/s and p50/p99 latency. Because the server batches concurrent
requests into one forward pass per step, tokens/s should grow with the number of clients.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --quick            # ~2 min on a 2-core CPU
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py --model runs/demo/adapter --clients 1,8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three uses of copper.", "Why is the sky blue?", "Give me a tip for learning Python.",
             "What is 17 times 3?", "Describe a cat in one sentence."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    cmd = [sys.executable, "-m", "lmtune", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--model-name", "bench"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server did not start within 300 s")


def run_level(url: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests_each` requests one after the other."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests_each):
                body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": QUESTIONS[(c + r) % len(QUESTIONS)]}]}
                t0 = time.perf_counter()
                resp = http.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if resp.status_code != 200:
                        errors.append(resp.text)
                        continue
                    latencies.append(dt)
                    tokens.append(resp.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies) or [float("nan")]
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(latencies) / wall, "tok_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (a smoke run)")
    ap.add_argument("--max-tokens", type=int, default=0, help="tokens per request (default 32, 16 with --quick)")
    ap.add_argument("--url", default="", help="use this running server instead of starting one")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    levels = [int(c) for c in args.clients.split(",")]
    port = free_port()
    proc = None if args.url else start_server(args.model, port, max(levels))
    url = (args.url or f"http://127.0.0.1:{port}").rstrip("/")
    try:
        run_level(url, 1, 1, 4)  # warm-up: first-call costs are not throughput
        print(f"model {args.model}, {max_tokens} tokens per request, greedy, chat completions over HTTP")
        print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7}")
        for c in levels:
            each = max(1, 8 // c) if args.quick else max(2, 32 // c)
            r = run_level(url, c, each, max_tokens)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['req_per_s']:>7.2f} "
                  f"{r['tok_per_s']:>7.1f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
