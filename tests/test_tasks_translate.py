"""translate: BLEU/chrF against known values, parallel files, decoder and seq2seq round trips, bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from _tiny_models import run_cli, tiny_bart, tiny_llama
from lmtune import metrics


def test_bleu_matches_a_hand_computation():
    # 13a tokens: precisions 5/6, 3/5, 2/4, 1/3, same length (BP 1): BLEU = (1/12) ** (1/4)
    m = metrics.translation(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert m["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert m["chrf"] == pytest.approx(72.0848, abs=1e-3)
    assert "tok:13a" in m["bleu_signature"]


def test_corpus_bleu_and_chrf_known_values():
    m = metrics.translation(["The dog bit the man.", "It was not unexpected."],
                            ["The dog bit the man.", "It was not surprising."])
    assert m["bleu"] == pytest.approx(74.1945, abs=1e-3)
    assert m["chrf"] == pytest.approx(64.7518, abs=1e-3)
    assert metrics.translation(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return tiny_llama(d / "llama"), tiny_bart(d / "bart")


@pytest.fixture()
def parallel(tmp_path):
    src, tgt = tmp_path / "train.en.gz", tmp_path / "train.de"
    with gzip.open(src, "wt") as f:
        f.write("a dog runs\nthe cat sleeps\ntwo men walk\nhello\n")
    tgt.write_text("ein hund rennt\ndie katze schläft\nzwei männer gehen\nhallo\n")
    return src, tgt


def test_decoder_lora_round_trip_with_parallel_files(models, parallel, tmp_path, capsys):
    llama, _ = models
    data = f"{parallel[0]},{parallel[1]}"
    out = tmp_path / "adapter"
    assert run_cli(["finetune", "--task", "translate", "--model", llama, "--data", data, "--eval-data", data,
                    "--out", out, "--lora", "--max-steps", 2, "--batch-size", 2, "--max-new-tokens", 4]) == 0
    meta = json.loads((out / "lmtune.json").read_text())
    assert (meta["source_lang"], meta["target_lang"]) == ("English", "German")  # from train.en.gz / train.de
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bleu" in r and "val_chrf" in r for r in rows)
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "translate", "--data", data, "--max-new-tokens", 4,
                    "--json"]) == 0
    assert {"bleu", "chrf"} <= set(json.loads(capsys.readouterr().out))
    pred = tmp_path / "p.jsonl"
    assert run_cli(["predict", "--model", out / "best", "--task", "translate", "--data", data, "--out", pred,
                    "--max-new-tokens", 4]) == 0
    preds = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [p["row"] for p in preds] == [1, 2, 3, 4] and all(isinstance(p["translation"], str) for p in preds)


def test_seq2seq_full_finetune_round_trip(models, tmp_path, capsys):
    _, bart = models
    data = tmp_path / "pairs.csv"
    data.write_text("source,target\nhello world,hallo welt\na dog runs,ein hund rennt\n")
    out = tmp_path / "bart-ft"
    assert run_cli(["finetune", "--task", "translate", "--model", bart, "--data", data, "--out", out,
                    "--max-steps", 2, "--batch-size", 2, "--learning-rate", 1e-3]) == 0
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "translate", "--data", data, "--max-new-tokens", 4,
                    "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2


def test_line_counts_differ(models, parallel, tmp_path, capsys):
    short = tmp_path / "short.de"
    short.write_text("eins\nzwei\n")
    out = tmp_path / "never"
    assert run_cli(["finetune", "--task", "translate", "--model", models[0], "--data", f"{parallel[0]},{short}",
                    "--out", out]) == 2
    err = capsys.readouterr().err
    assert "train.en.gz has 4 lines" in err and "short.de has 2" in err and not out.exists()


def test_missing_source_column_lists_the_columns(models, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"en": "hello", "de": "hallo"}\n')
    assert run_cli(["evaluate", "--model", models[1], "--task", "translate", "--data", data]) == 2
    err = capsys.readouterr().err
    assert "no column 'source'" in err and "en, de" in err and "--source-column" in err
