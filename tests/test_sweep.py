"""lmtune sweep: a real Optuna study over tiny fine-tunes: it prunes, resumes, is shared, and rejects bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _tiny_models import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def char_setup(tmp_path_factory) -> dict:
    """A 1m-parameter Llama with a character tokenizer (pretrained 5 steps) and date instruct data."""
    from lmtune.config import PretrainConfig
    from lmtune.data.synthetic import date_records
    from lmtune.pretrain import pretrain

    d = tmp_path_factory.mktemp("sweep")
    rows = date_records(112, seed=1)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:96]))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[96:]))
    text = "### User:\n### Response:\n" + "\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows)
    (d / "text.txt").write_text(text * 2)
    pretrain(PretrainConfig(data=str(d / "text.txt"), out=str(d / "char"), tokenizer="char", model_size="1m",
                            max_steps=5, max_length=128, batch_size=4, threads=1))
    train = {"model": str(d / "char"), "data": str(d / "train.jsonl"), "eval_data": str(d / "val.jsonl"),
             "max_steps": 9, "eval_every": 3, "batch_size": 8, "max_length": 256, "schedule": "constant",
             "save_every": 1000, "threads": 1}
    return {"dir": d, "train": train}


def write_sweep(path: Path, train: dict, **extra) -> Path:
    spec = {"train": train, "space": {"learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}},
            "metric": "val_loss", "trials": 4, "startup_trials": 1, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_prunes_a_bad_learning_rate_and_resumes(char_setup, tmp_path):
    import optuna

    from lmtune.cli import parse
    from lmtune.sweep import sweep

    out = tmp_path / "sw"
    # a good rate first, then a hopeless one: the median pruner stops it at its first validation
    spec = write_sweep(tmp_path / "sweep.yaml", char_setup["train"], out=str(out), seed=0,
                       enqueue=[{"learning_rate": 1e-2}, {"learning_rate": 1e-6}])
    study = sweep(parse("sweep", ["--config", str(spec), "--trials", "3"]))
    states = {t.number: t.state.name for t in study.trials}
    assert states[1] == "PRUNED", states
    bad = study.trials[1]
    assert study.best_trial.params["learning_rate"] > 1e-4
    assert study.best_value < min(bad.intermediate_values.values()) - 0.1
    for name in ("best.yaml", "trials.csv", "history.png", "report.html", "study.db"):
        assert (out / name).is_file(), name
    assert "history.png" in (out / "report.html").read_text()
    best = parse("finetune", ["--config", str(out / "best.yaml")])  # ready to run as it is
    assert best.learning_rate == study.best_trial.params["learning_rate"]
    assert (out / "trial-000" / "metrics.jsonl").is_file()

    # resuming with a larger --trials adds trials to the same study (and does not re-queue the enqueued ones)
    again = sweep(parse("sweep", ["--config", str(spec), "--trials", "4"]))
    assert len(again.trials) == 4
    assert [t.number for t in again.trials] == [0, 1, 2, 3]
    assert len(optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")) == 1


def test_two_processes_share_one_study_without_duplicates(char_setup, tmp_path):
    out = tmp_path / "shared"
    spec = write_sweep(tmp_path / "sweep.yaml", char_setup["train"], out=str(out), pruner="none")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = [sys.executable, "-m", "lmtune", "sweep", "--config", str(spec), "--storage", storage]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]

    assert all(p.returncode == 0 for p in procs), [(p.returncode, r[1][-600:]) for p, r in zip(procs, results)]
    import optuna

    study = optuna.load_study(study_name="lmtune-sweep", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 4 <= len(numbers) <= 5  # a race may add one, never repeat one
    ran = [{int(line.split()[1].rstrip(":")) for line in err.splitlines() if line.startswith("trial ")}
           for _, err in results]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(numbers), ran
    assert all((out / f"trial-{n:03d}" / "run.json").is_file() for n in numbers)


@pytest.mark.parametrize("change, expect", [
    ({"space": {}}, "space:' is empty"),
    ({"space": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, "low 0.01 > high 0.0001"),
    ({"space": {"learnin_rate": [1e-3]}}, "unknown parameter 'learnin_rate', did you mean 'learning_rate'"),
    ({"metric": "accuracy"}, "metric 'accuracy' is not reported by task instruct"),
    ({"storage": "sqlite:////no/such/folder/x.db"}, "--storage sqlite:////no/such/folder/x.db: cannot open"),
    ({"train": {"data": "x.jsonl"}}, "trials need validation data"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(char_setup, tmp_path, capsys, change, expect):
    spec = {"train": char_setup["train"], "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
            "out": str(tmp_path / "never"), **change}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert run_cli(["sweep", "--config", tmp_path / "s.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expect in err and "\n" not in err, err
    assert not (tmp_path / "never").exists()


def test_pruning_across_batch_sizes_is_flagged(char_setup, tmp_path, capsys):
    """Searching batch_size makes equal step numbers hold unequal data: the median pruner would compare unlike
    validations, so the sweep says so (and says nothing with pruner: none)."""
    from lmtune.cli import parse
    from lmtune.sweep import sweep

    train = {**char_setup["train"], "max_steps": 3}
    for pruner, flagged in (("median", True), ("none", False)):
        spec = write_sweep(tmp_path / f"{pruner}.yaml", train, out=str(tmp_path / pruner), seed=0, pruner=pruner,
                           trials=1)
        spec_dict = yaml.safe_load(spec.read_text())
        spec_dict["space"]["batch_size"] = [4, 8]
        spec.write_text(yaml.safe_dump(spec_dict))
        study = sweep(parse("sweep", ["--config", str(spec)]))
        assert study.trials[0].state.name == "COMPLETE"
        err = capsys.readouterr().err
        assert ("compares trials' validations at equal step numbers" in err) is flagged, err


def test_a_pretraining_sweep_runs_pretrain_trials(tmp_path, capsys):
    """verb: pretrain searches a model from scratch on raw text: each trial is a pretrain run reporting its
    val_loss, best.yaml runs with `lmtune pretrain`, and a finetune-only metric or key is one line."""
    from lmtune.cli import parse
    from lmtune.data.synthetic import date_records
    from lmtune.sweep import sweep

    text = "\n\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in date_records(200, seed=3))
    (tmp_path / "corpus.txt").write_text(text)
    train = {"data": str(tmp_path / "corpus.txt"), "tokenizer": "char", "model_size": "1m", "max_length": 64,
             "batch_size": 4, "max_steps": 4, "eval_every": 2, "val_split": 0.1, "threads": 1, "save_every": 1000}
    spec = {"verb": "pretrain", "train": train, "out": str(tmp_path / "sw"), "trials": 2, "pruner": "none",
            "seed": 0, "space": {"learning_rate": [1e-3, 3e-3]}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    study = sweep(parse("sweep", ["--config", str(tmp_path / "p.yaml")]))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:  # each trial is a pretrained model folder whose best val_loss is the trial's value
        run = Path(t.user_attrs["run_dir"])
        assert (run / "model.safetensors").is_file() and (run / "tokenizer").is_dir()
        losses = [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "val_loss" in line]
        assert losses and t.value == min(losses)
    best = tmp_path / "sw" / "best.yaml"
    assert "lmtune pretrain --config" in best.read_text()
    assert parse("pretrain", ["--config", str(best)]).learning_rate == study.best_trial.params["learning_rate"]

    capsys.readouterr()
    for change, expect in (({"metric": "accuracy"}, "metric 'accuracy' is not reported by pretrain"),
                           ({"space": {"lora_r": [8]}}, "unknown parameter 'lora_r'"),
                           ({"train": {**train, "val_split": 0.0}}, "give train: val_split above 0")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "out": str(tmp_path / "never"), **change}))
        assert run_cli(["sweep", "--config", tmp_path / "bad.yaml"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and expect in err and "\n" not in err, err
    assert not (tmp_path / "never").exists()
