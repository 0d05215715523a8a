"""classify: metrics by hand, SST-2 above chance after a short fine-tune, LoRA round trip, bad input."""

from __future__ import annotations

import json

import pytest

from _tiny_models import SHARED, run_cli, tiny_llama
from lmtune import metrics


def test_classification_metrics_by_hand():
    m = metrics.classification(["a", "a", "b", "b", "a"], ["a", "b", "b", "b", "a"], ["a", "b"])
    assert m["accuracy"] == pytest.approx(80.0)
    assert m["confusion_matrix"]["matrix"] == [[2, 0], [1, 2]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(200 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(200 / 3)
    assert m["macro_f1"] == pytest.approx(80.0)  # a: P 66.7 R 100 -> F1 80; b: P 100 R 66.7 -> 80


def test_sst2_above_chance_after_short_finetune(tmp_path, capsys):
    """minilm-l6, 480 SST-2 rows, 30 steps (about a minute here); 200 dev rows must beat chance clearly."""
    train = tmp_path / "train.tsv"
    train.write_text("".join((SHARED / "sst2" / "train.tsv").read_text().splitlines(True)[:481]))
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join((SHARED / "sst2" / "dev.tsv").read_text().splitlines(True)[:201]))
    out = tmp_path / "sst"
    assert run_cli(["finetune", "--task", "classify", "--model", "minilm-l6", "--data", train, "--text-column",
                    "sentence", "--out", out, "--max-steps", 30, "--batch-size", 16, "--learning-rate", 3e-4,
                    "--warmup-steps", 3, "--max-length", 48, "--save-every", 1000]) == 0
    meta = json.loads((out / "lmtune.json").read_text())
    assert meta["labels"] == ["0", "1"] and meta["task"] == "classify"
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", dev, "--text-column", "sentence",
                    "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 200
    assert result["accuracy"] > 60.0, result  # chance is 50.5 (101 of 200 are negative)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def labelled(tmp_path):
    rows = [{"text": f"good movie {i}", "label": "pos"} for i in range(6)] + \
           [{"text": f"bad film {i}", "label": "neg"} for i in range(6)]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_decoder_lora_classifier_round_trip(tiny, labelled, tmp_path, capsys):
    """A decoder with a sequence-classification head, LoRA; the head is saved with the adapter."""
    out = tmp_path / "adapter"
    assert run_cli(["finetune", "--task", "classify", "--model", tiny, "--data", labelled, "--out", out, "--lora",
                    "--max-steps", 2, "--batch-size", 4, "--val-split", 0.25, "--eval-every", 1]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "best" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r and "val_macro_f1" in r for r in rows)
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", labelled, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first["confusion_matrix"]["labels"]) == {"neg", "pos"}
    pred = tmp_path / "pred.jsonl"
    assert run_cli(["predict", "--model", out, "--task", "classify", "--data", labelled, "--out", pred]) == 0
    preds = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(preds) == 12 and all(p["label"] in ("neg", "pos") for p in preds)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    # the same adapter, loaded again, gives the same scores
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", labelled, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == first["accuracy"]


def test_unknown_label_and_missing_column(tiny, labelled, tmp_path, capsys):
    out = tmp_path / "full"
    assert run_cli(["finetune", "--task", "classify", "--model", tiny, "--data", labelled, "--out", out,
                    "--max-steps", 1, "--batch-size", 4]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", bad]) == 2
    err = capsys.readouterr().err
    assert "label 'neutral'" in err and "bad.jsonl:2" in err and err.count("\n") == 1
    assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", bad, "--text-column", "review"]) == 2
    err = capsys.readouterr().err
    assert "no column 'review'" in err and "text, label" in err
    # an eval file with an unknown label is refused before the training run's folder is made
    assert run_cli(["finetune", "--task", "classify", "--model", tiny, "--data", labelled, "--eval-data", bad,
                    "--out", tmp_path / "never"]) == 2
    assert not (tmp_path / "never").exists()


def test_classify_refuses_a_model_trained_for_another_task(tmp_path, capsys):
    folder = tmp_path / "instruct-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "lmtune.json").write_text(json.dumps({"base_model": "smollm2-135m", "task": "instruct"}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x", "label": "a"}\n')
    assert run_cli(["evaluate", "--model", folder, "--task", "classify", "--data", data]) == 2
    assert "fine-tuned for task 'instruct'" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["minilm-l6", "tiny"])
def test_predict_in_length_sorted_batches_keeps_input_order(which, tiny):
    """predict batches rows by length (less padding); every row gets the result it gets alone, in input order."""
    import torch

    from lmtune.config import FinetuneConfig
    from lmtune.tasks import classify

    model_name = "minilm-l6" if which == "minilm-l6" else str(tiny)
    cfg = FinetuneConfig(task="classify", model=model_name, data="-", out="-", batch_size=3)
    words = ["great", "dull", "a", "moving", "film", "plot", "the", "acting", "is", "not"]
    rows = [{"text": " ".join(words[(n + k) % len(words)] for k in range(n)), "label": "neg" if n % 2 else "pos"}
            for n in (7, 1, 12, 3, 9, 2, 5, 11)]
    torch.manual_seed(0)
    model, tok, meta = classify.load(model_name, cfg, train_rows=rows)
    batched = classify.predict(model, tok, rows, cfg, meta)
    alone = [classify.predict(model, tok, [r], cfg, meta)[0] for r in rows]
    assert len(batched) == len(rows)
    for b, a in zip(batched, alone):
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)
        if abs(a["probabilities"]["neg"] - a["probabilities"]["pos"]) > 1e-4:
            assert b["label"] == a["label"]
    # the rows really differ, so a result in the wrong place would show
    assert len({round(a["probabilities"]["pos"], 4) for a in alone}) > len(rows) // 2


def test_evaluation_loss_equals_the_training_loss_on_the_same_rows(tiny):
    """evaluate() gives the validation loss from its own pass (no second pass over the dev rows): the
    cross-entropy per row that the training loss gives on the same rows."""
    import torch

    from lmtune.config import FinetuneConfig
    from lmtune.tasks import classify
    from lmtune.train.loop import mean_loss

    cfg = FinetuneConfig(task="classify", model=str(tiny), data="-", out="-", batch_size=3)
    rows = [{"text": " ".join(["good", "bad", "film"][k % 3] for k in range(n)), "label": "neg" if n % 3 else "pos"}
            for n in (4, 1, 9, 3, 6, 2, 8)]
    torch.manual_seed(0)
    model, tok, meta = classify.load(str(tiny), cfg, train_rows=rows)
    result = classify.evaluate(model, tok, rows, cfg, meta)
    examples = classify.encode(rows, tok, cfg, meta, "")
    expected = mean_loss(model, examples, classify.collate(tok, meta), classify.loss, cfg.batch_size)
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["loss"] > 0 and 0 <= result["accuracy"] <= 100
