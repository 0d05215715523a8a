"""Training throughput: lmtune against TRL's SFTTrainer and the Hugging Face Trainer, same machine, one run.

    python bench/throughput.py            # workloads (a) and (b), 8 optimizer steps each contender
    python bench/throughput.py --quick    # lmtune and the strongest peer, 3 steps, a few minutes
    python bench/throughput.py --workload a --steps 12 --bf16
    python bench/throughput.py --workload a --repeat 3   # three alternating rounds, the median run of each
    python bench/throughput.py --workload dpo --steps 8 [--bf16]   # preference tuning: lmtune vs TRL DPOTrainer

(a) SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, Alpaca records from ../shared/data/alpaca as
    conversational prompt/completion (loss on the completion), batch 4 x accumulation 2, max length 512,
    one epoch (steps x 8 records) so every contender trains on the same rows. Contenders: lmtune's
    optimisation ladder (baseline: random padded batches and full logits; + length grouping; + chunked
    loss; + element-wise recompute; + glibc mmap threshold 8 MB = lmtune's defaults; + checkpointing 40%
    of the layers = "lmtune"; + full activation checkpointing; packing instead of grouping; "lmtune" +
    --compile, which compiles each decoder layer on its own = "lmtune compile"), TRL
    SFTTrainer (its defaults; padding_free=True; packing=True) and the HF Trainer + peft.
(b) pretraining a ~10M-parameter Llama-style model from scratch on tinyshakespeare (lmtune's BPE
    tokenizer, 256-token blocks, batch 16): lmtune (eager, eager without element-wise recompute, and
    compiled) against the HF Trainer on the same config and blocks.
(dpo) SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, DPO (sigmoid, beta 0.1) on conversational pairs
    from Alpaca (chosen: a record's output; rejected: the next record's), batch 4 pairs x accumulation 2,
    max length 512, one epoch: lmtune --task dpo (its defaults; and with 40% of the layers checkpointed)
    against TRL's DPOTrainer (its defaults). Both take the reference as the base with the adapter off.
    Target tokens are the reply tokens of both sides; the held-out number is the DPO loss on 16 later pairs.

Each contender runs in its own process, one after the other, so peak resident memory is its own.
Reported: target (loss-bearing) tokens/s and all non-padding tokens/s over steps 2..N (step 1 warms
up and compiles), peak memory (resident set on a CPU, allocated GPU memory on a GPU), the loss at the last step, for (a) the loss per target token on 16 held-out
records after training (the same records and loss function for every contender: "the same loss after
the same steps"), and lmtune's ratios. MFU = 6 x parameters x tokens/s over the best matrix-multiply
rate of this machine at the precision used, measured before and after the runs (6 x parameters is a full
training step's arithmetic; a LoRA step does about 4 x, plus what checkpointing runs again, so for (a) MFU
is a like-for-like yardstick between contenders rather than the share of the machine's rate used). --bf16 runs everyone in
bf16 (autocast), otherwise everyone is fp32. A contender whose package is missing is reported as failed
(`make bench-setup` installs TRL and its friends).
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
DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def peak_rss_mb() -> float:
    from lmtune.train.loop import peak_memory_mb  # VmHWM of this process

    return peak_memory_mb()


def matmul_gflops(bf16: bool) -> float:
    """The machine's matrix-multiply rate at this precision: the best of a few shapes (the models' own
    shapes among them), so MFU is measured against what the hardware can do, not one unlucky shape."""
    import torch

    dtype, dev = torch.bfloat16 if bf16 else torch.float32, "cpu" if on_cpu() else "cuda"
    shapes = ((1024, 1024, 1024), (4096, 384, 1024), (4096, 1024, 384), (2048, 576, 1536))
    if dev == "cuda":
        shapes += ((8192, 8192, 8192),)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=dev), torch.randn(k, n, dtype=dtype, device=dev)
        for _ in range(3):
            a @ b
        sync()
        reps, t = 10, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------
# Workload (a): data shared by every contender

def alpaca_records(n: int) -> list[dict]:
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    out = []
    for r in rows:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append({"prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": r["output"]}]})
    return out


class Meter:
    """Counts tokens per micro-batch as a collator sees them, and times optimizer steps."""

    def __init__(self, accum: int):
        self.accum, self.batches, self.step_times = accum, [], []

    def count(self, batch):
        labels = batch["labels"]
        targets = int((labels[:, 1:] != -100).sum())
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
        elif "position_ids" in batch:  # padding-free/packed: one flat row, no padding
            tokens = int(batch["input_ids"].numel())
        else:
            tokens = int(batch["input_ids"].numel())
        self.batches.append((targets, tokens))
        return batch

    def summary(self, losses: list[float]) -> dict:
        t = self.step_times
        dt = t[-1] - t[0]  # steps 2..N
        skip = self.accum  # the first step's micro-batches
        n_steps = len(t) - 1
        used = self.batches[skip:skip + n_steps * self.accum]
        return {"target_tokens_per_s": sum(b[0] for b in used) / dt, "tokens_per_s": sum(b[1] for b in used) / dt,
                "peak_rss_mb": peak_rss_mb(), "loss": losses[-1] if losses else float("nan"), "steps": len(t)}


# lmtune's optimisation ladder on workload (a), each rung adding one thing to the one before (as
# torchtune's); "lmtune" is the configuration we compare with the peers (the last fp32 rung).
LADDER = {
    # random padded batches, full logits, glibc's default allocator policy
    "lmtune baseline": dict(group=False, chunked=False, recompute=False, mmap=0.0),
    "+ length grouping": dict(group=True, chunked=False, recompute=False, mmap=0.0),
    "+ chunked loss": dict(group=True, chunked=True, recompute=False, mmap=0.0),
    "+ recompute": dict(group=True, chunked=True, mmap=0.0),   # + element-wise recompute
    "+ mmap threshold": dict(group=True, chunked=True),        # + --mmap-threshold-mb 8: lmtune's defaults
    "lmtune": dict(group=True, chunked=True, ckpt=True, share=0.4),  # + checkpointing 40% of the layers
    "+ full ckpt": dict(group=True, chunked=True, ckpt=True),   # every layer checkpointed
    "lmtune packed": dict(pack=True, chunked=True, ckpt=True),     # packing instead of grouping
    "lmtune compile": dict(group=True, chunked=True, ckpt=True, share=0.4, compile=True),  # "lmtune" + --compile
}


def held_out_loss(model, tok, args) -> float:
    """Loss per target token on the records after the training ones, the same for every contender."""
    import torch

    from lmtune.data.batching import collate
    from lmtune.tasks import instruct
    from lmtune.train.loop import mean_loss
    from lmtune.train.loss import causal_lm_loss

    rows = [{"messages": r["prompt"] + r["completion"]} for r in alpaca_records(args.records + 16)[args.records:]]
    examples = instruct.encode_all(rows, tok, 512, "alpaca")
    model, dev = model.float(), next(model.parameters()).device

    def coll(ex):
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in collate(ex, tok.pad_token_id).items()}
    return mean_loss(model, examples, coll, causal_lm_loss, 4)


def run_lmtune_a(args, pack=False, ckpt=False, group=True, chunked=True, recompute=True, compile=False,
                 share=1.0, mmap=8.0) -> dict:
    from lmtune import models
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune
    from lmtune.train import choice, loss

    # a real run (at least choice.MIN_STEPS steps) times its step's kernels on its first batch once per machine
    # and shape; this bench's few steps would not, so it asks for that here (before step 1: not timed)
    choice.MIN_STEPS = 0
    if not chunked:  # the baseline: logits of every position at once, as the peers compute them
        loss.SMALL_LOGITS = float("inf")
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n"
                            for r in alpaca_records(args.records)))
    cfg = FinetuneConfig(model="smollm2-135m", data=str(data), out=str(tmp / "run"), lora=True, lora_r=16,
                         lora_alpha=32, lora_dropout=0.0, batch_size=4, grad_accum=2, max_length=512,
                         max_steps=args.steps, learning_rate=2e-4, schedule="constant", warmup_steps=0,
                         pack=pack, bf16=args.bf16, save_every=10_000, grad_clip=1.0, group_by_length=group,
                         activation_checkpointing=ckpt, checkpoint_share=share, recompute_elementwise=recompute,
                         compile=compile, mmap_threshold_mb=mmap,
                         retain_data="none")  # the peers score no retention set (nor does any contender validate)
    finetune(cfg)
    peak = peak_rss_mb()  # before the held-out evaluation loads a second copy
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    dt = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    model, tok = models.load_causal_lm(str(tmp / "run"))
    return {"target_tokens_per_s": sum(r["target_tokens"] for r in rows[1:]) / dt,
            "tokens_per_s": sum(r["tokens"] for r in rows[1:]) / dt,
            "peak_rss_mb": peak, "loss": rows[-1]["loss"], "held_out": held_out_loss(model, tok, args),
            "steps": len(rows), "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "settings": f"bf16={args.bf16} ckpt={share if ckpt else False} pack={pack} group={group} "
                        f"chunked={chunked} recompute={recompute and not (ckpt and share >= 1) and not compile} "
                        f"compile={compile} mmap={mmap}", "kernels": choice.LAST[0]}


def _timing_callback(meter, losses):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            meter.step_times.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    return Timing()


def run_trl_a(args, variant: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lmtune import models

    path = models.resolve("smollm2-135m")
    model, tok = models.load_causal_lm("smollm2-135m")
    meter, losses = Meter(2), []
    # TRL refuses padding_free without packing unless max_length is off (Alpaca records fit in 512 anyway)
    extra = {"padding_free": True, "max_length": None} if variant == "padding_free" else \
        {"packing": True, "max_length": 512} if variant == "packing" else {"max_length": 512}
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant",
                    logging_steps=1, save_strategy="no", report_to=[], bf16=args.bf16, use_cpu=on_cpu(),
                    dataloader_num_workers=0, seed=0, **extra)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(alpaca_records(args.records)),
                         processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    collate = trainer.data_collator
    trainer.data_collator = lambda feats: meter.count(collate(feats))
    trainer.add_callback(_timing_callback(meter, losses))
    trainer.train()
    out = meter.summary(losses)
    out["held_out"] = held_out_loss(trainer.model, tok, args)
    out["params"] = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    out["settings"] = f"bf16={cfg.bf16} gradient_checkpointing={cfg.gradient_checkpointing} {extra or 'defaults'} ({path})"
    return out


def run_hf_a(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from lmtune import models
    from lmtune.data.batching import collate
    from lmtune.tasks import instruct

    model, tok = models.load_causal_lm("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = [{"messages": r["prompt"] + r["completion"]} for r in alpaca_records(args.records)]
    examples = instruct.encode_all(rows, tok, 512, "alpaca")  # the same ids and labels as lmtune's
    meter, losses = Meter(2), []

    def coll(feats):
        b = collate(feats, tok.pad_token_id)
        b.pop("n_tokens")
        return meter.count(b)

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, max_steps=args.steps, learning_rate=2e-4,
                              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                              bf16=args.bf16, use_cpu=on_cpu(), remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(examples), data_collator=coll)
    trainer.add_callback(_timing_callback(meter, losses))
    trainer.train()
    out = meter.summary(losses)
    out["held_out"] = held_out_loss(trainer.model, tok, args)
    out["settings"] = f"bf16={targs.bf16} dynamic padding, same tokens/labels as lmtune"
    return out


# ----------------------------------------------------------------------------------------------
# Workload (b): pretraining a ~10M model

def _shakespeare_blocks(block: int):
    from lmtune.data.tokenizer import train_tokenizer
    from lmtune.tasks.lm import encode_text

    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    tok = train_tokenizer(text, "bpe", 4096)
    return tok, encode_text(text, tok, block)


def run_lmtune_b(args, compile: bool = False, recompute: bool = True) -> dict:
    from lmtune.config import PretrainConfig
    from lmtune.pretrain import pretrain
    from lmtune.train import choice

    choice.MIN_STEPS = 0  # as in run_lmtune_a
    out = Path(tempfile.mkdtemp()) / "run"
    pretrain(PretrainConfig(data=str(DATA / "tinyshakespeare" / "input.txt"), out=str(out), model_size="10m",
                            max_length=256, batch_size=16, max_steps=args.steps, val_split=0.0, bf16=args.bf16,
                            save_every=10_000, warmup_steps=0, schedule="constant", learning_rate=1e-3,
                            weight_decay=0.1, compile=compile, recompute_elementwise=recompute))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    dt = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    tps = sum(r["target_tokens"] for r in rows[1:]) / dt
    return {"target_tokens_per_s": tps, "tokens_per_s": tps, "peak_rss_mb": peak_rss_mb(), "loss": rows[-1]["loss"],
            "steps": len(rows), "params": json.loads((out / "run.json").read_text())["parameters"],
            "settings": f"bf16={args.bf16} compile={compile} recompute={recompute}", "kernels": choice.LAST[0]}


def run_hf_b(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lmtune import models
    from lmtune.data.batching import collate

    tok, blocks = _shakespeare_blocks(256)
    torch.manual_seed(0)
    model = models.build_from_preset("10m", tok, 256)
    meter, losses = Meter(1), []

    def coll(feats):
        b = collate(feats, tok.pad_token_id)
        b.pop("n_tokens")
        return meter.count(b)

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, max_steps=args.steps,
                              learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1,
                              save_strategy="no", report_to=[], bf16=args.bf16, use_cpu=on_cpu(),
                              remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(blocks), data_collator=coll)
    trainer.add_callback(_timing_callback(meter, losses))
    trainer.train()
    out = meter.summary(losses)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


# ----------------------------------------------------------------------------------------------
# Workload (dpo): preference pairs, lmtune's --task dpo against TRL's DPOTrainer

def alpaca_pairs(start: int, n: int) -> list[dict]:
    """Conversational preference pairs from Alpaca: chosen = the record's own output, rejected = the next
    record's (a plausible answer to another question), the same pairs for every contender."""
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[start:start + n + 1]
    out = []
    for r, other in zip(rows, rows[1:]):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        if r["output"] != other["output"]:
            out.append({"prompt": [{"role": "user", "content": user}],
                        "chosen": [{"role": "assistant", "content": r["output"]}],
                        "rejected": [{"role": "assistant", "content": other["output"]}]})
    return out


DPO_BETA = 0.1


def held_out_dpo_loss(model, tok, args) -> float:
    """DPO loss (beta 0.1, sigmoid) on the 16 pairs after the training ones, lmtune's dpo.evaluate on the
    trained peft model (the reference: its adapter switched off), in fp32, the same for every contender."""
    from types import SimpleNamespace

    from lmtune.tasks import dpo

    rows = [{**r, "_line": i + 1} for i, r in enumerate(alpaca_pairs(args.records, 16))]
    cfg = SimpleNamespace(max_length=512, batch_size=4, data="alpaca pairs")
    meta = {"beta": DPO_BETA, "dpo_loss": "sigmoid", "label_smoothing": 0.0}
    return dpo.evaluate(model.float(), tok, rows, cfg, meta)["loss"]


def run_lmtune_dpo(args, ckpt: bool = False) -> dict:
    from lmtune import models
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_pairs(0, args.records)))
    cfg = FinetuneConfig(model="smollm2-135m", task="dpo", data=str(data), out=str(tmp / "run"), lora=True,
                         lora_r=16, lora_alpha=32, lora_dropout=0.0, batch_size=4, grad_accum=2, max_length=512,
                         max_steps=args.steps, learning_rate=2e-4, schedule="constant", warmup_steps=0,
                         bf16=args.bf16, save_every=10_000, grad_clip=1.0, beta=DPO_BETA,
                         activation_checkpointing=ckpt, checkpoint_share=0.4)
    finetune(cfg)
    peak = peak_rss_mb()  # before the held-out evaluation loads a second copy
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    dt = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    model, tok = models.load_causal_lm(str(tmp / "run"))
    return {"target_tokens_per_s": sum(r["target_tokens"] for r in rows[1:]) / dt,
            "tokens_per_s": sum(r["tokens"] for r in rows[1:]) / dt, "peak_rss_mb": peak, "loss": rows[-1]["loss"],
            "held_out": held_out_dpo_loss(model, tok, args), "steps": len(rows),
            "settings": f"bf16={args.bf16} ckpt={0.4 if ckpt else False} (lmtune defaults otherwise)"}


def run_trl_dpo(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lmtune import models

    model, tok = models.load_causal_lm("smollm2-135m")
    meter, losses = Meter(2), []
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", beta=DPO_BETA,
                    max_length=512, logging_steps=1, save_strategy="no", report_to=[], bf16=args.bf16,
                    use_cpu=on_cpu(), dataloader_num_workers=0, seed=0, max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(alpaca_pairs(0, args.records)),
                         processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    collate = trainer.data_collator

    def counted(feats):  # target tokens: the completion (reply) tokens of both sides, as lmtune counts them
        b = collate(feats)
        meter.batches.append((int(b["completion_mask"][:, 1:].sum()), int(b["attention_mask"].sum())))
        return b
    trainer.data_collator = counted
    trainer.add_callback(_timing_callback(meter, losses))
    trainer.train()
    out = meter.summary(losses)
    out["held_out"] = held_out_dpo_loss(trainer.model, tok, args)
    out["settings"] = f"bf16={cfg.bf16} TRL defaults (LoRA, reference = adapter disabled)"
    return out


CONTENDERS = {
    "dpo": [("lmtune dpo", run_lmtune_dpo), ("lmtune dpo ckpt", lambda a: run_lmtune_dpo(a, ckpt=True)),
            ("TRL DPOTrainer", run_trl_dpo)],
    "a": [*((name, lambda a, kw=kw: run_lmtune_a(a, **kw)) for name, kw in LADDER.items()),
          ("TRL defaults", lambda a: run_trl_a(a, "defaults")), ("TRL padding_free", lambda a: run_trl_a(a, "padding_free")),
          ("TRL packing", lambda a: run_trl_a(a, "packing")), ("HF Trainer+peft", run_hf_a)],
    "b": [("lmtune", run_lmtune_b), ("lmtune no recompute", lambda a: run_lmtune_b(a, recompute=False)),
          ("lmtune compile", lambda a: run_lmtune_b(a, compile=True)),
          ("HF Trainer", run_hf_b)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["a", "b", "dpo", "all"], default="all", help="all: a and b")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per contender (step 1 is not timed)")
    p.add_argument("--records", type=int, default=0, help="training records (default: steps x 8, one epoch, "
                   "so every contender trains on the same rows)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 steps, 24 records, lmtune and the strongest peer")
    p.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all contenders; each reports its median run (the lower of two)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: workload:contender in a child process
    args = p.parse_args()
    if args.quick:
        args.steps = 3
    args.records = args.records or args.steps * 8
    if args.run:
        w, name = args.run.split(":", 1)
        result = dict(CONTENDERS[w])[name](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    flops = matmul_gflops(args.bf16)
    print(f"matrix multiply: {flops:.0f} GFLOP/s ({'bf16' if args.bf16 else 'fp32'}), {os.cpu_count()} CPUs; "
          f"{args.steps} optimizer steps per contender, step 1 untimed", flush=True)
    for w in (["a", "b"] if args.workload == "all" else [args.workload]):
        names = [n for n, _ in CONTENDERS[w]]
        if args.quick:
            names = {"a": ["lmtune", "TRL padding_free"], "b": ["lmtune", "HF Trainer"],
                     "dpo": ["lmtune dpo", "TRL DPOTrainer"]}[w]
        if args.only:
            names = [n for n in names if n in args.only.split(",")]
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.repeat):  # rounds alternate the contenders: A B C, A B C, ...
            for name in names:
                cmd = [sys.executable, __file__, "--run", f"{w}:{name}", "--steps", str(args.steps),
                       "--records", str(args.records)] + (["--bf16"] if args.bf16 else [])
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                    hint = " (make bench-setup installs the peers)" if "ModuleNotFoundError" in last else ""
                    print(f"  {name}: failed: {last}{hint}", flush=True)
                    continue
                res = {**json.loads(line[0][7:]), "wall_s": time.perf_counter() - t0, "round": round_}
                runs.setdefault(name, []).append(res)
                print(f"  ran {name} in {res['wall_s']:.0f}s: {res['target_tokens_per_s']:.1f} target tok/s, "
                      f"{res['peak_rss_mb']:.0f} MB", flush=True)
        # with --repeat: each contender's median run by speed (its own memory with it), so one slow or
        # fast moment of a shared machine does not decide a ratio
        results = {n: _lower_median(rs, key=lambda r: r["target_tokens_per_s"]) for n, rs in runs.items()}
        # measured again after the runs, the better rate kept: one slow moment at the start (this shared
        # machine gave 215 and 406 GFLOP/s in two runs an hour apart) must not inflate MFU past 100%
        again = matmul_gflops(args.bf16)
        if again > flops:
            print(f"matrix multiply measured again: {again:.0f} GFLOP/s (was {flops:.0f}); MFU uses {again:.0f}")
            flops = again
        _table(w, results, flops)
        if args.repeat > 1:
            _paired(runs)


def _lower_median(xs: list, key=None):
    """The median, or of two middle values the lower one (an even number of rounds)."""
    return sorted(xs, key=key)[(len(xs) - 1) // 2]


def _paired(runs: dict[str, list[dict]]) -> None:
    """Ratios of runs of the same round (minutes apart at most), whose median is less exposed to this
    machine's slow and fast phases than a ratio of medians."""
    peers = [n for n in runs if not n.startswith(("lmtune", "+"))]
    print("\nper round (paired runs): median ratio [each round]")
    for o in ("+ mmap threshold", "lmtune", "lmtune packed", "lmtune compile", "lmtune dpo", "lmtune dpo ckpt"):
        for n in peers if o in runs else []:
            pairs = [(a, b) for a in runs[o] for b in runs[n] if a["round"] == b["round"]]
            if not pairs:
                continue
            rs = [a["target_tokens_per_s"] / b["target_tokens_per_s"] for a, b in pairs]
            ms = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs]
            print(f"{o} / {n}: {_lower_median(rs):.2f}x target tokens/s [{', '.join(f'{r:.2f}' for r in rs)}], "
                  f"{_lower_median(ms):.2f}x peak memory [{', '.join(f'{m:.2f}' for m in ms)}]")


def _table(w: str, results: dict, flops: float) -> None:
    title = {"a": "(a) SmolLM2-135M LoRA r=16, Alpaca, batch 4x2, max length 512",
             "b": "(b) pretraining ~10M Llama-style model, tinyshakespeare, batch 16 x 256",
             "dpo": "(dpo) SmolLM2-135M LoRA r=16 DPO (beta 0.1), Alpaca pairs, batch 4x2 pairs, max length 512"}[w]
    print(f"\n{title}")
    print(f"{'contender':<20} {'target tok/s':>12} {'all tok/s':>10} {'peak mem MB':>12} {'last loss':>10} "
          f"{'held-out':>9}  settings")
    for name, r in results.items():
        mfu = f"  MFU {100 * 6 * r['params'] * r['tokens_per_s'] / (flops * 1e9):.0f}%" if "params" in r else ""
        print(f"{name:<20} {r['target_tokens_per_s']:>12.1f} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['loss']:>10.4f} {r.get('held_out', float('nan')):>9.4f}  {r.get('settings', '')}{mfu}")
    for name, r in results.items():  # what train.choice took, and the times it compared
        if r.get("kernels"):
            print(f"  {name}: {r['kernels']}")
    peers = [n for n in results if not n.startswith(("lmtune", "+"))]
    for o in ("+ mmap threshold", "lmtune", "lmtune packed", "lmtune compile", "lmtune dpo", "lmtune dpo ckpt"):
        for n in peers if o in results else []:
            r = results[n]
            print(f"{o} / {n}: {results[o]['target_tokens_per_s'] / r['target_tokens_per_s']:.2f}x target tokens/s, "
                  f"{results[o]['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
