"""evaluate/predict verbs: table and JSON output, atomic predictions, early stopping and DIR/best."""

from __future__ import annotations

import json

import pytest

from _tiny_models import run_cli, tiny_llama


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ep")
    llama = tiny_llama(d / "llama")
    data = d / "train.csv"
    data.write_text("text,label\n" + "".join(f"nice {i},pos\nawful {i},neg\n" for i in range(6)))
    out = d / "model"
    assert run_cli(["finetune", "--task", "classify", "--model", llama, "--data", data, "--out", out,
                    "--max-steps", 1, "--batch-size", 4]) == 0
    return llama, data, out


def test_table_output(trained, capsys):
    _, data, out = trained
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", data]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro_f1" in text and "confusion matrix" in text and "precision" in text


def test_json_output_is_one_object(trained, capsys):
    _, data, out = trained
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", data, "--json", "--limit", 4]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["rows"] == 4


def test_predict_writes_atomically_one_row_per_input(trained, tmp_path, capsys):
    _, data, out = trained
    target = tmp_path / "sub" / "pred.jsonl"
    assert run_cli(["predict", "--model", out, "--task", "classify", "--data", data, "--out", target]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 12 and [r["row"] for r in rows] == list(range(2, 14))
    assert [p.name for p in target.parent.iterdir()] == ["pred.jsonl"]  # no temporary file left
    # a failure (here: a missing column) leaves the earlier file untouched
    bad = tmp_path / "bad.csv"
    bad.write_text("review\nfine\n")
    before = target.read_text()
    assert run_cli(["predict", "--model", out, "--task", "classify", "--data", data, "--out", target]) == 2
    assert "already exists" in capsys.readouterr().err  # an existing --out is replaced only with --overwrite
    assert run_cli(["predict", "--model", out, "--task", "classify", "--data", bad, "--out", target,
                    "--overwrite"]) == 2
    assert target.read_text() == before and "no column 'text'" in capsys.readouterr().err
    assert run_cli(["predict", "--model", out, "--task", "classify", "--data", data, "--out", tmp_path]) == 2


def test_early_stopping_keeps_best_next_to_last(trained, tmp_path):
    llama, data, _ = trained
    out = tmp_path / "es"
    # learning rate 0: the metric never improves after the first validation, so patience 2 stops at step 3
    assert run_cli(["finetune", "--task", "classify", "--model", llama, "--data", data, "--eval-data", data,
                    "--out", out, "--max-steps", 20, "--eval-every", 1, "--learning-rate", 0,
                    "--early-stopping-patience", 2, "--metric", "macro_f1", "--batch-size", 4]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["early_stopped"] and rows[-1]["step"] == 3
    best = json.loads((out / "best" / "lmtune.json").read_text())
    assert best["step"] == 1 and "val_macro_f1" in best["metrics"]
    assert (out / "checkpoints" / "step-00000003").is_dir() and (out / "config.json").is_file()


def test_bad_metric_and_patience_without_validation(trained, tmp_path, capsys):
    llama, data, _ = trained
    assert run_cli(["finetune", "--task", "classify", "--model", llama, "--data", data, "--out", tmp_path / "a",
                    "--metric", "bleu", "--eval-data", data]) == 2
    assert "val_accuracy" in capsys.readouterr().err
    assert run_cli(["finetune", "--task", "classify", "--model", llama, "--data", data, "--out", tmp_path / "b",
                    "--early-stopping-patience", 2]) == 2
    assert "--eval-data or --val-split" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
