"""Data at scale: preparing and pretraining on 10 MB, 100 MB and 1 GB of text, and what it costs in memory.

    python bench/data_scale.py                       # 10 MB, 100 MB and 1 GB (about an hour on 2 cores)
    python bench/data_scale.py --sizes 10            # one small corpus, a few minutes
    python bench/data_scale.py --sizes 10,100 --tokenizer ../shared/data/gpt2_tokenizer

Corpora: tinyshakespeare and wikitext2 (../shared/data) repeated into a temporary folder (never the repo)
until the size is reached. For each corpus, each contender runs in its own process, one after the other, so
its peak resident memory (VmHWM, "peak MB") is its own; "tree MB" is the peak of the summed resident memory
of the contender and its worker processes (sampled every 0.1 s):

  lmtune prepare         lmtune.prepare (2 worker processes, 16 MB shards, uint16/uint32 .bin + manifest)
  datasets.map           HF datasets: load_dataset("text") + map(tokenize, batched=True, num_proc=2) +
                         save_to_disk, the same tokenizer (the peer LLaMA-Factory and TRL build on)
  nanoGPT style          one process: tokenize the lines a megabyte at a time, then write one np.memmap of
                         all the ids (nanoGPT's prepare.py); it holds every id in memory before writing
  pretrain (shards)      lmtune pretrain --data PREPARED --max-steps STEPS (model 1m, block 256, batch 8,
                         validation on 8 blocks): peak RSS over the run and training tokens/s
  pretrain (in memory)   the same loop on the same blocks held as a Python list of dicts (the former path's
                         layout): tokens/s to compare with, at the smallest size only

Reported per contender: wall seconds, MB/s of text and tokens/s (prepare), peak RSS in MB, tokens.
Numbers depend on the machine and its load: run it on an idle machine for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONTENDERS = ("lmtune prepare", "datasets.map", "nanoGPT style", "pretrain (shards)", "pretrain (in memory)")


def build_corpus(folder: Path, megabytes: int) -> Path:
    """tinyshakespeare + wikitext2, repeated to `megabytes` MB, in one text file."""
    path = folder / f"corpus-{megabytes}mb.txt"
    if path.is_file():
        return path
    piece = (SHARED / "tinyshakespeare" / "input.txt").read_text() + "\n\n" + \
        (SHARED / "wikitext2" / "wiki.valid.tokens").read_text() + "\n\n"
    target, written = megabytes * 1_000_000, 0
    with open(path.with_suffix(".tmp"), "w") as f:
        while written < target:
            chunk = piece[:target - written]
            f.write(chunk)
            written += len(chunk.encode())
    path.with_suffix(".tmp").rename(path)
    return path


def peaks() -> dict:
    from lmtune.train.loop import peak_memory_mb

    return {"peak_mb": peak_memory_mb()}


def run_watched(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; also the peak of the summed resident memory of it and all its children (worker
    processes), sampled every 0.1 s. (RUSAGE_CHILDREN would count, for a child started by fork+exec, the
    parent's pages at the fork.)"""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    root, peak = psutil.Process(proc.pid), 0.0
    import threading

    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())))
    reader.start()
    while reader.is_alive():
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        reader.join(0.1)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", "")), peak


def tokenizer_folder(spec: str) -> str:
    from lmtune import models

    return spec if Path(spec).exists() else models.resolve(spec)


def run_one(name: str, corpus: Path, work: Path, tok: str, steps: int) -> dict:
    """One contender, in this (fresh) process; returns its measurements."""
    t0 = time.perf_counter()
    prepared = work / "prepared"
    if name == "lmtune prepare":
        from lmtune.config import PrepareConfig
        from lmtune.data.shards import load
        from lmtune.prepare import prepare

        import shutil

        shutil.rmtree(prepared, ignore_errors=True)  # a finished prepare would be reused, not measured
        t0 = time.perf_counter()
        prepare(PrepareConfig(data=str(corpus), out=str(prepared), tokenizer=tok, workers=2))
        m = load(prepared, verify=False)
        tokens = m["train_tokens"] + m["val_tokens"]
    elif name == "datasets.map":
        import datasets
        import pyarrow.compute as pc
        from transformers import AutoTokenizer

        from lmtune.data.tokenizer import load_tokenizer_path

        t = load_tokenizer_path(tokenizer_folder(tok))
        ds = datasets.load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(work / "hf-cache"),
                                   keep_in_memory=False)
        ds = ds.map(lambda b: {"input_ids": t(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                    num_proc=2, remove_columns=["text"])
        ds.save_to_disk(str(work / "hf-saved"))
        tokens = int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
        del AutoTokenizer
    elif name == "nanoGPT style":
        import numpy as np

        from lmtune.data.tokenizer import load_tokenizer_path

        t = load_tokenizer_path(tokenizer_folder(tok))
        dtype = np.uint16 if len(t) <= 1 << 16 else np.uint32
        parts, lines, size = [], [], 0
        with open(corpus) as f:
            for line in f:
                lines.append(line)
                size += len(line)
                if size >= 1 << 20:
                    parts += [np.asarray(x, dtype) for x in t(lines, add_special_tokens=False)["input_ids"]]
                    lines, size = [], 0
        parts += [np.asarray(x, dtype) for x in t(lines, add_special_tokens=False)["input_ids"]] if lines else []
        tokens = sum(len(p) for p in parts)
        arr = np.memmap(work / "nanogpt.bin", dtype=dtype, mode="w+", shape=(tokens,))
        i = 0
        for p in parts:
            arr[i:i + len(p)] = p
            i += len(p)
        arr.flush()
    elif name.startswith("pretrain"):
        from lmtune.config import PretrainConfig

        cfg = PretrainConfig(data=str(prepared), out=str(work / name.replace(" ", "_")), model_size="1m",
                             max_length=256, batch_size=8, max_steps=steps, val_max_blocks=8, warmup_steps=2,
                             save_every=10_000, overwrite=True, threads=int(os.environ.get("BENCH_THREADS", "0")))
        if name == "pretrain (shards)":
            from lmtune.pretrain import pretrain

            pretrain(cfg)
        else:
            _pretrain_in_memory(cfg, prepared)
        rows = [json.loads(x) for x in open(Path(cfg.out) / "metrics.jsonl") if '"loss"' in x]
        timed = rows[3:] or rows
        tokens = sum(r["tokens"] for r in timed)
        return {"wall_s": time.perf_counter() - t0, "tokens": tokens,
                "tokens_per_s": tokens / sum(r["tokens"] / r["tokens_per_s"] for r in timed), **peaks()}
    else:
        raise SystemExit(f"unknown contender {name}")
    wall = time.perf_counter() - t0
    mb = corpus.stat().st_size / 1e6
    return {"wall_s": wall, "tokens": tokens, "mb_per_s": mb / wall, "tokens_per_s": tokens / wall, **peaks()}


def _pretrain_in_memory(cfg, prepared: Path) -> None:
    """The training loop on the same blocks as a list of dicts: what pretraining held before the shards."""
    from functools import partial

    import torch

    from lmtune import models
    from lmtune.data.batching import collate
    from lmtune.data.shards import TokenBlocks, load
    from lmtune.data.tokenizer import load_tokenizer_path
    from lmtune.tasks import lm
    from lmtune.train.loop import fit
    from lmtune.train.memory import save_activation_memory

    tok = load_tokenizer_path(str(prepared / "tokenizer"))
    blocks = TokenBlocks(prepared, load(prepared), "train", cfg.max_length)
    examples = [blocks[i] for i in range(len(blocks))]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = models.build_from_preset(cfg.model_size, tok, cfg.max_length, "")
    save_activation_memory(model, cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    fit(model, examples, cfg, Path(cfg.out), collate=partial(collate, pad_id=tok.pad_token_id), loss_fn=lm.loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer folder or model alias (all contenders)")
    ap.add_argument("--steps", type=int, default=20, help="pretraining steps")
    ap.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    ap.add_argument("--workdir", default="", help="folder for corpora and outputs (default: a temporary one)")
    ap.add_argument("--run", nargs=3, metavar=("CONTENDER", "CORPUS", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:  # a contender in its own process
        name, corpus, work = args.run
        print("RESULT " + json.dumps(run_one(name, Path(corpus), Path(work), args.tokenizer, args.steps)))
        return
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmtune-data-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    only = [c.strip() for c in args.only.split(",") if c.strip()] or list(CONTENDERS)
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {**os.environ, "LMTUNE_CACHE": os.environ.get("LMTUNE_CACHE", str(Path.home() / ".cache" / "lmtune")),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"# workdir {base}; tokenizer {args.tokenizer}; {args.steps} pretraining steps", flush=True)
    print(f"{'MB':>5} {'contender':<22} {'wall s':>8} {'MB/s':>7} {'tokens/s':>10} {'peak MB':>8} "
          f"{'tree MB':>8} {'tokens':>11}", flush=True)
    for mb in sizes:
        corpus = build_corpus(base, mb)
        for name in only:
            if name == "pretrain (in memory)" and mb != min(sizes):
                continue
            work = base / f"{mb}mb"
            work.mkdir(exist_ok=True)
            proc, tree_mb = run_watched([sys.executable, __file__, "--tokenizer", args.tokenizer, "--steps",
                                         str(args.steps), "--run", name, str(corpus), str(work)], env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{mb:>5} {name:<22} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:150]}", flush=True)
                continue
            r = json.loads(line[7:])
            print(f"{mb:>5} {name:<22} {r['wall_s']:>8.1f} {r.get('mb_per_s', float('nan')):>7.2f} "
                  f"{r['tokens_per_s']:>10.0f} {r['peak_mb']:>8.0f} {tree_mb:>8.0f} {r['tokens']:>11}",
                  flush=True)


if __name__ == "__main__":
    main()
