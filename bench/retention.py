"""What each option does to the demo: task exact match against retention (general answers kept).

Each point is one `lmtune demo` run (dates task, SmolLM2-135M-Instruct, LoRA) in its own folder; the table
gives exact match after fine-tuning and how many of the 50 built-in general prompts (never trained on) are
still answered as the base model answers them. About 5 minutes a point on an idle 2-core CPU.

    python bench/retention.py                       # the full grid (replay share, rank, steps, learning rate)
    python bench/retention.py --points mix=0 mix=0.2  # chosen points; key=value[,key=value] per point
    python bench/retention.py --table runs/retention  # only print the table of the runs already there

Keys: mix (--mix-retain), r (--lora-r), steps (--max-steps), lr (--learning-rate), loss (--replay-loss: tokens
or kl); the others stay at the
demo's defaults. A point whose folder already holds demo.json is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FLAGS = {"mix": "--mix-retain", "r": "--lora-r", "steps": "--max-steps", "lr": "--learning-rate",
         "loss": "--replay-loss"}
GRID = ["mix=0", "mix=0.2,loss=tokens", "mix=0.2",          # no replay; greedy-token replay; KL replay
        "mix=0.5", "mix=0.7",                                 # replay share (KL)
        "mix=0.5,steps=45", "mix=0.5,steps=160",              # steps: KL pulls back what the task moved
        "mix=0.6,steps=120", "mix=0.7,steps=160", "mix=0.5,lr=2e-4"]


def parse_point(text: str) -> dict:
    point = dict(kv.split("=", 1) for kv in text.split(","))
    unknown = set(point) - set(FLAGS)
    if unknown:
        raise SystemExit(f"unknown key {', '.join(sorted(unknown))} in point '{text}': use {', '.join(FLAGS)}")
    return point


def run_point(point: dict, root: Path) -> dict:
    name = "_".join(f"{k}{v}" for k, v in point.items())
    out = root / name
    if not (out / "demo.json").is_file():
        args = [sys.executable, "-m", "lmtune", "demo", "--out", str(out)]
        for k, v in point.items():
            args += [FLAGS[k], v]
        print("running:", " ".join(args[1:]), flush=True)
        subprocess.run(args, check=True)
    return {"point": name, **json.loads((out / "demo.json").read_text())}


def table(results: list[dict]) -> str:
    lines = ["| --mix-retain | --replay-loss | --lora-r | --max-steps | --learning-rate | exact match before -> after | "
             "general answers kept | word F1 with the base answers | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["general_prompts"]
        lines.append(f"| {r['mix_retain']} | {r.get('replay_loss', 'tokens')} | {r['lora_r']} | {r['max_steps']} | {r['learning_rate']:g} | "
                     f"{r['exact_match_before']:.1f}% -> {r['exact_match_after']:.1f}% | "
                     f"{r['general_kept_after']}/{n} ({100 * r['general_kept_after'] / n:.0f}%) | "
                     f"{r.get('general_f1_after', float('nan')):.2f} | {r['minutes']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="*", default=GRID, help="points to run (default: the full grid)")
    ap.add_argument("--root", default="runs/retention", help="folder for the runs (one subfolder a point)")
    ap.add_argument("--table", metavar="ROOT", help="print the table of the runs in ROOT and stop")
    a = ap.parse_args()
    if a.table:
        results = [{"point": d.name, **json.loads((d / "demo.json").read_text())}
                   for d in sorted(Path(a.table).iterdir()) if (d / "demo.json").is_file()]
    else:
        results = [run_point(parse_point(p), Path(a.root)) for p in a.points]
    print(table(results))


if __name__ == "__main__":
    main()
