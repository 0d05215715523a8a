"""Run reports: TensorBoard events and run.json facts from every run; report.html with plots, one run or several."""

from __future__ import annotations

import json

from _tiny_models import run_cli, tiny_llama


def test_run_files_and_report(tmp_path, capsys):
    from lmtune.config import FinetuneConfig
    from lmtune.data.synthetic import date_records
    from lmtune.finetune import finetune

    base = tiny_llama(tmp_path / "tiny")
    data, val = tmp_path / "d.jsonl", tmp_path / "v.jsonl"
    rows = date_records(40, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    runs = []
    for lr in (3e-3, 3e-4):
        out = tmp_path / f"run-{lr}"
        finetune(FinetuneConfig(model=str(base), data=str(data), eval_data=str(val), out=str(out), max_steps=6,
                                eval_every=3, batch_size=8, learning_rate=lr, threads=1, report_to="wandb",
                                retain_data="none"))
        runs.append(out)
    info = json.loads((runs[0] / "run.json").read_text())
    import hashlib
    assert info["data_sha256"][str(data)] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert info["packages"]["torch"] and info["hardware"]["cpu_count"] >= 1
    assert list(runs[0].glob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(runs[0]))
    ev.Reload()
    assert {"train/loss", "val/val_loss", "train/lr"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("val/val_loss")] == [3, 6]

    capsys.readouterr()
    assert run_cli(["report", runs[0]]) == 0
    page = (runs[0] / "report.html").read_text()
    for png in ("loss.png", "lr.png", "speed.png"):
        assert (runs[0] / png).stat().st_size > 1000 and png in page
    assert run_cli(["report", runs[0], runs[1], "--out", tmp_path / "cmp"]) == 0
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "run-0.003" in page and "run-0.0003" in page and "loss.png" in page

    assert run_cli(["report", tmp_path / "nothing"]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
