"""torchrun with DDP and FSDP2 on the CPU (gloo): parity with one process, resume across world sizes,
signals, a kill during a checkpoint write, a full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_metrics, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env():
    """Built at each call, not at import: the session's LMTUNE_CACHE (conftest) is set after this module is
    imported, and a child without it writes into the user's cache."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _args(data, out, batch, steps=6, extra=()):
    return ["pretrain", "--data", data, "--out", str(out), "--tokenizer", "char", "--model-size", "1m",
            "--max-length", "32", "--max-steps", str(steps), "--val-split", "0", "--save-every", "3",
            "--warmup-steps", "0", "--batch-size", str(batch), "--keep-checkpoints", "3", *extra]


def _two(args, timeout=300):
    r = subprocess.run(TORCHRUN + ["-m", "lmtune", *args], capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _one(args):
    r = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out):
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def single(tmp_path_factory, shakespeare_small):
    out = tmp_path_factory.mktemp("single") / "run"
    _one(_args(shakespeare_small, out, batch=4))
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_double_batch(tmp_path, shakespeare_small, single, engine):
    out = tmp_path / engine
    _two(_args(shakespeare_small, out, batch=2, extra=["--distributed", engine]))
    a, b = _losses(single), _losses(out)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert (out / "model.safetensors").is_file()  # a plain HF folder in every mode


def _cut_at_step_3(src, dst):
    """A copy of a finished run as it stood after step 3 (as if it had been stopped there)."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").iterdir():
        if int(ck.name.split("-")[1]) > 3:
            shutil.rmtree(ck)
    for f in ("model.safetensors",):
        (dst / f).unlink()


def test_resume_across_world_sizes(tmp_path, shakespeare_small, single):
    fsdp = tmp_path / "fsdp2"
    _two(_args(shakespeare_small, fsdp, batch=2, extra=["--distributed", "fsdp"]))
    # checkpointed by 2 FSDP processes, resumed by 1 plain process with the same global batch
    _cut_at_step_3(fsdp, tmp_path / "to_one")
    _one(_args(shakespeare_small, tmp_path / "to_one", batch=4, extra=["--resume"]))
    # checkpointed by 1 process, resumed by 2 FSDP processes
    _cut_at_step_3(single, tmp_path / "to_two")
    _two(_args(shakespeare_small, tmp_path / "to_two", batch=2, extra=["--resume", "--distributed", "fsdp"]))
    ref = _losses(single)
    for run in ("to_one", "to_two"):
        got = _losses(tmp_path / run)
        assert len(got) == 6 and max(abs(x - y) for x, y in zip(ref[3:], got[3:])) < 1e-4, (run, ref, got)


def test_sigterm_to_torchrun_stops_all_ranks_with_one_checkpoint(tmp_path, shakespeare_small):
    out = tmp_path / "run"
    args = _args(shakespeare_small, out, batch=2, steps=2000, extra=["--distributed", "ddp", "--save-every", "1000"])
    proc = subprocess.Popen(TORCHRUN + ["-m", "lmtune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(read_metrics(out) if (out / "metrics.jsonl").exists() else []) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C would: torchrun and its workers
    _, err = proc.communicate(timeout=180)
    assert "stopped by SIGTERM after step" in err and "--resume" in err, err[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "meta.pt").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert step == len(_losses(out)) and 3 <= step < 2000


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, shakespeare_small):
    out = tmp_path / "run"
    # the CLI with a 3 s pause after each checkpoint's shards are written: the window a kill must hit
    slowed = Path(__file__).with_name("slow_checkpoints.py")
    args = [sys.executable, str(slowed), "3", *_args(shakespeare_small, out, batch=4, steps=9)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 180  # wait until the step-6 checkpoint is being written, then SIGKILL
    while time.time() < deadline and not (out / "checkpoints" / ".tmp-step-00000006").exists():
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step-00000006", "step-00000003"]
    r = _one(_args(shakespeare_small, out, batch=4, steps=9, extra=["--resume"]))
    assert "resuming from step 3" in r.stderr
    assert len(_losses(out)) == 9


def test_full_disk_while_saving_is_one_clear_error(tmp_path, tiny_chat_model, dates_jsonl, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    from lmtune.config import FinetuneConfig
    from lmtune.errors import LmtuneError
    from lmtune.finetune import finetune

    real, calls = dcp.save, []

    def full_disk(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(dcp, "save", full_disk)
    cfg = FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(tmp_path / "run"), max_steps=4,
                         save_every=2, batch_size=4)
    with pytest.raises(LmtuneError, match=r"cannot write checkpoint .*step-00000004: no space left on the device; "
                                          r".*the previous checkpoint .*step-00000002 is intact"):
        finetune(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
