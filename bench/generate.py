"""Generation speed: `lmtune generate`'s decoder against Hugging Face `generate`, same model, prompts and lengths.

    python bench/generate.py --quick          # ~2 minutes: 3 prompts at batch 1, one batch of 8, 32 new tokens
    python bench/generate.py                  # 8 prompts at batch 1, 2 batches of 8, 64 new tokens
    python bench/generate.py --compile        # also lmtune with the one-token step torch.compiled
    python bench/generate.py --model runs/demo/adapter   # a LoRA adapter on SmolLM2 (after `make demo`)

SmolLM2-135M-Instruct; the first Alpaca instructions of ../shared/data/alpaca/alpaca_5000.json rendered
through the chat template; greedy, stop at EOS or max_new_tokens. Contenders run alternately (prompt by
prompt at batch 1, batch by batch at batch 8), in one process, one at a time. tokens/s = generated tokens
(up to and including EOS, per row) over wall time of the calls, prefill included; warm-up (and compile)
runs are timed separately and not counted. "ratio" is against HF at the same precision ("lmtune int8",
weight-only int8 made from the fp32 weights, against HF fp32). Agreement is
against HF fp32: rows whose token ids are all identical, and the share of identical token positions.

"lmtune fp32" reads the matrices that are exactly GGUF blocks (all of SmolLM2's: it comes from a Q4_1 GGUF)
in that form, with the same fp32 values and fp32 sums (lmtune/generation/gguf_weights.py), at the shapes and
row counts where the block kernel measured faster than the dense matmul on this machine (printed at the
end; lmtune/generation/kernels.py); "lmtune fp32 dense" reads the dense fp32 tensors, as it would for a
fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")


def prompts(tokenizer, n: int) -> list[list[int]]:
    from lmtune.tasks import instruct

    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    texts = [instruct.prompt_text(tokenizer, r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""))
             for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def trim(row: list[int], eos: int, pad: int) -> list[int]:
    """The generated ids up to and including the first EOS (HF pads finished rows after it)."""
    return row[:row.index(eos) + 1] if eos in row else row


class HF:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def __call__(self, batch, n):
        import torch

        width = max(map(len, batch))
        ids = torch.tensor([[self.tok.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return out[:, width:].tolist()


class Ours:
    def __init__(self, model, tok, compile=False, quantize="none", gguf_blocks=True):
        from lmtune.generation.decoder import Decoder

        self.dec, self.tok = Decoder(model, compile=compile, quantize=quantize, gguf_blocks=gguf_blocks), tok

    def __call__(self, batch, n):
        return self.dec.generate(batch, n, eos_ids=[self.tok.eos_token_id], pad_id=self.tok.pad_token_id).tolist()


def weight_read_floor(model) -> tuple[float, int]:
    """(seconds, bytes): what a decoded token needs at the least at batch 1, every weight matrix read once,
    as 1-row products with nothing else (the median of 5 passes). The weights (538 MB in fp32 for
    SmolLM2-135M) are more than the last-level cache holds, so this is the machine's memory bandwidth."""
    import torch
    import torch.nn.functional as F

    mats = [p.detach() for p in model.parameters() if p.dim() == 2]  # a tied embedding is the output layer
    xs = {k: torch.randn(1, k, dtype=mats[0].dtype) for k in {w.shape[1] for w in mats}}
    times = []
    with torch.no_grad():
        for _ in range(6):
            t = time.perf_counter()
            for w in mats:
                F.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t)
    return sorted(times[1:])[2], sum(w.numel() * w.element_size() for w in mats)


def token_bytes(name: str, contender, fp32_bytes: int) -> int:
    """Bytes of weights a decoded token reads at batch 1 on `name`'s path: HF's fp32/bf16 tensors, or the
    matrices of lmtune's runner as it holds them (GGUF blocks where the 1-row kernel is the block one, int8 +
    scales, dense fp32 or bf16)."""
    import torch

    from lmtune.generation import gguf_weights
    from lmtune.generation.decoder import Int8

    runner = getattr(getattr(contender, "dec", None), "runner", None)
    if runner is None or not hasattr(runner, "layers"):
        return fp32_bytes // 2 if "bf16" in name else fp32_bytes
    total = 0
    for w in [L[k] for L in runner.layers for k in ("wqkv", "wo", "wgu", "wd")] + [runner.head]:
        if isinstance(w, gguf_weights.Block):
            total += w.nbytes if w.kernel[0] else w.dense.numel() * 4
        elif isinstance(w, Int8):
            total += w.q.numel() + 2 * w.scale.numel() if w.kernel[0] else 2 * w.bf16.numel()
        elif isinstance(w, torch.Tensor):
            total += w.numel() * w.element_size()
    return total


def kernel_lines(name: str, runner) -> list[str]:
    """One line per matrix shape: the kernel lmtune.generation.kernels measured fastest (or was forced to)
    at each row bucket, with the times it measured."""
    return [f"{name} kernels for {shape} at 1 | 2-4 | 5-8 | 9-16 rows (us a matrix): " + " | ".join(
        t["pick"] + " (" + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "pick") + ")" for t in buckets)
        for shape, buckets in getattr(runner, "kernels", {}).items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 prompts at batch 1, 1 batch of 8, 32 new tokens")
    ap.add_argument("--max-new-tokens", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also lmtune fp32 with a compiled step (slow compile)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="a SmolLM2-135M-Instruct alias, folder or LoRA adapter folder (e.g. runs/demo/adapter)")
    args = ap.parse_args()
    n_new = args.max_new_tokens or (32 if args.quick else 64)
    n_b1, n_b8_batches = (3, 1) if args.quick else (8, 2)

    import torch
    import transformers

    from lmtune import models

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    def load(dtype=None):
        model, tok = models.load_causal_lm(args.model, dtype=dtype)
        return model.eval(), tok

    (fp32, tok), (bf16, _) = load(), load(torch.bfloat16)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ps = prompts(tok, max(n_b1, 8 * n_b8_batches))
    # a contender that merges a LoRA adapter into the weights (all but "lmtune fp32" on a block base) gets
    # its own copy of the model, so that HF runs the adapter unmerged, as peft does
    copy = (lambda dtype=None: load(dtype)[0]) if getattr(fp32, "peft_config", None) else \
        (lambda dtype=None: bf16 if dtype else fp32)
    contenders = {"HF fp32": HF(fp32, tok), "HF bf16": HF(bf16, tok),
                  "lmtune fp32": Ours(fp32, tok), "lmtune fp32 dense": Ours(copy(), tok, gguf_blocks=False),
                  "lmtune bf16": Ours(copy(torch.bfloat16), tok),
                  "lmtune int8": Ours(copy(), tok, quantize="int8")}  # int8 weights from the fp32 model
    if args.compile:
        contenders["lmtune fp32 compile"] = Ours(copy(), tok, compile=True)
    precision = {name: ("bf16" if "bf16" in name else "fp32") for name in contenders}
    print(f"{args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {n_new} new tokens max; load {time.perf_counter() - t0:.1f}s")

    workloads = {1: [[p] for p in ps[:n_b1]], 8: [ps[8 * i:8 * i + 8] for i in range(n_b8_batches)]}
    results = {}  # (batch, name) -> dict(tokens, seconds, warm, outputs)
    for bs, batches in workloads.items():
        for name, run in contenders.items():  # warm-up (and compile) at this batch size, not counted
            t = time.perf_counter()
            run(batches[0], 4 if "compile" not in name else n_new)
            results[bs, name] = dict(tokens=0, seconds=0.0, warm=time.perf_counter() - t, outputs=[])
        for batch in batches:  # alternate: every contender on this batch before the next batch
            for name, run in contenders.items():
                t = time.perf_counter()
                out = run(batch, n_new)
                r = results[bs, name]
                r["seconds"] += time.perf_counter() - t
                out = [trim(row, eos, pad) for row in out]
                r["tokens"] += sum(map(len, out))
                r["outputs"] += out

    print(f"\n{'batch':>5}  {'contender':<20} {'tokens':>6} {'tokens/s':>9} {'ratio':>6} {'warm-up s':>9}  "
          f"{'rows = HF fp32':>14} {'same tokens':>11}")
    for (bs, name), r in results.items():
        ref = results[bs, "HF fp32"]
        base = results[bs, f"HF {precision[name]}"]
        speed = r["tokens"] / r["seconds"]
        same_rows = sum(a == b for a, b in zip(r["outputs"], ref["outputs"]))
        pairs = [(a, b) for a, b in zip(r["outputs"], ref["outputs"])]
        same_tok = sum(x == y for a, b in pairs for x, y in zip(a, b))
        total = sum(max(len(a), len(b)) for a, b in pairs)
        print(f"{bs:>5}  {name:<20} {r['tokens']:>6} {speed:>9.1f} {speed / (base['tokens'] / base['seconds']):>5.2f}x"
              f" {r['warm']:>9.1f}  {same_rows:>7}/{len(pairs):<6} {100 * same_tok / total:>10.1f}%")
    print("\ntokens/s: generated tokens (to EOS) / wall time, prefill included, warm-up excluded; ratio: vs HF at the "
          "same precision; rows = HF fp32: token ids identical to HF fp32 greedy; same tokens: identical positions.")
    floor, nbytes = weight_read_floor(fp32)
    hf = results[1, "HF fp32"]
    print(f"fp32 weight reads alone (every matrix once, 1-row products, nothing else): {1000 * floor:.1f} ms a token "
          f"({nbytes / floor / 1e9:.1f} GB/s), so at most {1 / floor:.1f} tokens/s at batch 1 for any decoder that "
          f"reads dense fp32 weights: {1 / floor / (hf['tokens'] / hf['seconds']):.2f}x HF fp32's speed in this run.")
    from lmtune.generation import gguf_weights

    runner = contenders["lmtune fp32"].dec.runner
    mats = [L[k] for L in runner.layers for k in ("wqkv", "wo", "wgu", "wd")] + [runner.head]
    packed = [w for w in mats if isinstance(w, gguf_weights.Block)]
    print(f"lmtune fp32 reads {len(packed)} of its {len(mats)} matrices in their GGUF block form (the same fp32 "
          f"values): {sum(w.nbytes for w in packed) / 1e6:.0f} MB a token for them instead of "
          f"{sum(w.dense.numel() * 4 for w in packed) / 1e6:.0f} MB; 'lmtune fp32 dense' reads them all dense."
          + ("" if gguf_weights.available() else " (no C++ compiler here: no block kernel)"))
    rate = nbytes / floor  # bytes/s: the machine's memory bandwidth, measured above
    for name in [n for (bs, n) in results if bs == 1]:
        read = token_bytes(name, contenders[name], nbytes)
        speed = results[1, name]["tokens"] / results[1, name]["seconds"]
        print(f"floor for {name} at batch 1: reads {read / 1e6:.0f} MB a token, so at most {rate / read:.1f} "
              f"tokens/s at {rate / 1e9:.1f} GB/s; it reached {speed:.1f} ({100 * speed * read / rate:.0f}% of its floor)")
    for name in ("lmtune fp32", "lmtune int8"):
        for line in kernel_lines(name, contenders[name].dec.runner):
            print(line)
    if os.environ.get("LMTUNE_KERNELS"):
        print(f"LMTUNE_KERNELS={os.environ['LMTUNE_KERNELS']}: that kernel forced wherever it is a candidate")


if __name__ == "__main__":
    main()
