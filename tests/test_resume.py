"""Checkpoints and resume: a resumed run continues exactly; SIGTERM saves and says how to resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_metrics
from lmtune.config import FinetuneConfig, PretrainConfig
from lmtune.finetune import finetune
from lmtune.pretrain import pretrain


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.mark.parametrize("verb", ["finetune-lora", "pretrain"])
def test_resume_gives_the_same_losses(tmp_path, verb, tiny_chat_model, dates_jsonl, shakespeare_small):
    def run(out, steps, resume=False):
        if verb == "pretrain":
            cfg = PretrainConfig(data=shakespeare_small, out=str(out), tokenizer="char", model_size="1m",
                                 max_length=64, batch_size=8, max_steps=steps, save_every=5, resume=resume)
            # the schedule depends on the total number of steps, as it should: give the full run's
            return pretrain(cfg)
        cfg = FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, lora_r=4,
                             lora_dropout=0.1, batch_size=4, grad_accum=2, max_steps=steps, save_every=5,
                             learning_rate=1e-2, resume=resume)
        return finetune(cfg)

    run(tmp_path / "full", 20)
    run_half = tmp_path / "half"
    _run_until(run, run_half, stop_at=10)  # the 20-step job, crashed right after its step-10 checkpoint
    run(run_half, 20, resume=True)
    full, half = _losses(tmp_path / "full"), _losses(run_half)
    assert sorted(half) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(full[step] - half[step]) < 1e-5, (step, full[step], half[step])
    if verb == "finetune-lora":  # the run's state only: the adapter, not the frozen base or its tied output layer
        import torch.distributed.checkpoint as dcp

        last = sorted((run_half / "checkpoints").iterdir())[-1] / "dcp"
        keys = [k for k in dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata if k.startswith("model.")]
        assert keys and all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k][:3]


def _run_until(run, out, stop_at):
    """Run the 20-step job but stop it after `stop_at` steps, the way Ctrl-C would."""
    import lmtune.train.loop as loop

    real = loop.save_checkpoint

    def save_then_stop(out_dir, step, *a, **k):
        path = real(out_dir, step, *a, **k)
        if step == stop_at:
            raise KeyboardInterrupt
        return path

    loop.save_checkpoint = save_then_stop
    try:  # a second Ctrl-C leaves the loop as Interrupted, naming the last checkpoint
        with pytest.raises(loop.Interrupted, match="the last checkpoint is step-00000010"):
            run(out, 20)
    finally:
        loop.save_checkpoint = real


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_chat_model, dates_jsonl):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lmtune", "finetune", "--model", tiny_chat_model, "--data", dates_jsonl,
            "--out", str(out), "--max-steps", "400", "--batch-size", "2", "--save-every", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # the shell's code for SIGTERM (128 + 15)
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: stopped by SIGTERM after step") and "--resume" in last_line
    ckpts = sorted((out / "checkpoints").iterdir())
    stopped_at = int(ckpts[-1].name.split("-")[1])
    assert 3 <= stopped_at < 400 and len([m for m in read_metrics(out) if "loss" in m]) == stopped_at

    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from step {stopped_at}" in r.stderr
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 401))
    assert json.loads((out / "lmtune.json").read_text())["task"] == "instruct"
