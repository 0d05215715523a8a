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


def _multi30k(tmp_path, n: int, split: str = "train") -> str:
    """The first n pairs of a Multi30k split (../shared/data), as two line-aligned files."""
    from _tiny_models import SHARED

    out = []
    for lang in ("en", "de"):
        with gzip.open(SHARED / "multi30k" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        p = tmp_path / f"{split}{n}.{lang}"
        p.write_text("".join(lines), encoding="utf-8")
        out.append(str(p))
    return ",".join(out)


def test_a_model_from_scratch_learns_the_pairs_and_reads_back_as_any_decoder(tmp_path, capsys):
    """--model scratch:1m: a tokenizer trained on both languages (German words come out whole, umlauts
    included), the plain layout saved as the chat template, the loss falling well below the untrained
    model's, and evaluate/predict on the saved folder without any language flags."""
    from transformers import AutoTokenizer

    data, val = _multi30k(tmp_path, 600), _multi30k(tmp_path, 40, "val")
    out = tmp_path / "scratch"
    assert run_cli(["finetune", "--task", "translate", "--model", "scratch:1m", "--data", data, "--eval-data", val,
                    "--out", out, "--max-steps", 60, "--batch-size", 16, "--learning-rate", 3e-3,
                    "--max-new-tokens", 24, "--eval-every", 60]) == 0
    meta = json.loads((out / "lmtune.json").read_text())
    assert (meta["layout"], meta["scratch"]) == ("plain", "1m")
    assert (meta["source_lang"], meta["target_lang"]) == ("English", "German")
    tok = AutoTokenizer.from_pretrained(out)
    assert 1000 < len(tok) <= 8000 and len(tok("Männer", add_special_tokens=False)["input_ids"]) <= 2
    pair = [{"role": "user", "content": "A dog."}, {"role": "assistant", "content": "Ein Hund."}]
    assert tok.apply_chat_template(pair, tokenize=False) == "A dog.\nEin Hund.<|endoftext|>"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses  # ln(8000) = 9.0 untrained
    assert any("val_bleu" in r for r in rows)
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "translate", "--data", val, "--max-new-tokens", 24,
                    "--json"]) == 0
    assert {"bleu", "chrf"} <= set(json.loads(capsys.readouterr().out))
    pred = tmp_path / "p.jsonl"
    assert run_cli(["predict", "--model", out, "--task", "translate", "--data", val, "--out", pred]) == 0
    got = [json.loads(line)["translation"] for line in pred.read_text().splitlines()]
    assert len(got) == 40 and sum(bool(t) for t in got) >= 30


@pytest.mark.parametrize("model, extra, message", [
    ("scratch:5m", [], "no size '5m'; use scratch:1m|10m|30m"),
    ("scratch:1m", ["--lora"], "trains a new model in full: drop --lora"),
])
def test_scratch_models_refused_in_one_line(tmp_path, capsys, model, extra, message, parallel):
    assert run_cli(["finetune", "--task", "translate", "--model", model, "--data", f"{parallel[0]},{parallel[1]}",
                    "--out", tmp_path / "o", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o").exists()
