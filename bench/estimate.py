"""How good is `lmtune estimate`? Predicted against measured peak memory and step time over a grid:
two model sizes x full/LoRA x two sequence lengths (8 configurations), each measured by `estimate --check`
(a few real steps through the training loop in a fresh process).

    python bench/estimate.py [--models /path/to/small,smollm2-135m] [--lengths 128,256] [--threads 2]

Instruct data is generated (lmtune's dates task, padded with a filler so rows reach the sequence length).
Run it on an idle machine: step times measured under load are not this machine's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_data(folder: Path, model: str, length: int) -> Path:
    """Dates records with a filler before each input, sized in the model's tokens so that every encoded
    row (prompt, filler and response) fits `length` and comes close to it: no row loses its response."""
    from lmtune import models
    from lmtune.data.synthetic import date_records
    from lmtune.tasks import instruct

    rows = date_records(64, seed=0)
    path = folder / f"data-{Path(model).name}-{length}.jsonl"
    tok = models.load_tokenizer(models.resolve(model))

    def longest(n: int) -> int:
        filler = " ".join(["please"] * n)
        return max(len(instruct.encode_row({**r, "input": f"{filler} {r['input']}".strip()}, tok, 10**6, "")[0]
                       ["input_ids"]) for r in rows)

    lo, hi = 0, length  # the most filler words that keep the longest row within `length`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if longest(mid) <= length else (lo, mid - 1)
    filler = " ".join(["please"] * lo)
    path.write_text("".join(json.dumps({**r, "input": f"{filler} {r['input']}".strip()}) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    print(f"{'model':<28} {'lora':<5} {'len':>4} {'pred MB':>8} {'meas MB':>8} {'err':>6} "
          f"{'pred s':>7} {'meas s':>7} {'err':>6}")
    worst = [0.0, 0.0]
    for model in args.models.split(","):
        for lora in ("--no-lora", "--lora"):
            for length in map(int, args.lengths.split(",")):
                cmd = [sys.executable, "-m", "lmtune", "estimate", "finetune", "--model", model,
                       "--data", str(make_data(tmp, model, length)), "--max-length", str(length), "--batch-size",
                       str(args.batch_size), "--threads", str(args.threads), lora, "--check", "--check-steps",
                       str(args.steps), "--json"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{model:<28} {lora:<5} {length:>4} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                c = json.loads(proc.stdout.strip().splitlines()[-1])["check"]
                worst = [max(worst[0], abs(c["memory_error"])), max(worst[1], abs(c["time_error"]))]
                print(f"{Path(model).name[:28]:<28} {'yes' if lora == '--lora' else 'no':<5} {length:>4} "
                      f"{c['predicted_mb']:>8.0f} {c['measured_mb']:>8.0f} {c['memory_error']:>+6.0%} "
                      f"{c['predicted_s']:>7.3f} {c['measured_s']:>7.3f} {c['time_error']:>+6.0%}", flush=True)
    print(f"worst error: memory {worst[0]:.0%} (goal 15%), step time {worst[1]:.0%} (goal 25%); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
