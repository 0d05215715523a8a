"""lm: sliding-window perplexity against independent computations, evaluate/finetune through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from _tiny_models import run_cli, tiny_llama
from lmtune.tasks import lm

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction "
        "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _token_by_token(model, ids: list[int], max_length: int, stride: int) -> float:
    """Each token's log-probability from full logits, in the windows of the Hugging Face guide."""
    nll, n, prev = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            logp = model(torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
        for t in range(max(prev, begin + 1), end):
            nll -= float(logp[t - 1 - begin, ids[t]])
            n += 1
        prev = end
        if end == len(ids):
            break
    return math.exp(nll / n)


def test_one_window_equals_the_models_own_loss(tiny):
    _, model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = math.exp(float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    got = lm.perplexity(model, tok, TEXT, max_length=256, stride=256)
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("max_length,stride", [(16, 8), (16, 16), (20, 7)])
def test_sliding_window_equals_token_by_token(tiny, max_length, stride):
    _, model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    got = lm.perplexity(model, tok, TEXT, max_length=max_length, stride=stride)
    if stride < max_length:  # every token but the first is scored exactly once
        assert got["tokens"] == len(ids) - 1
    else:  # disjoint windows: a window's first token has no context and is not scored
        assert got["tokens"] == len(ids) - math.ceil(len(ids) / max_length)
    assert got["perplexity"] == pytest.approx(_token_by_token(model, ids, max_length, stride), rel=1e-4)


def test_evaluate_cli_and_predict_per_line(tiny, tmp_path, capsys):
    folder, model, tok = tiny
    f = tmp_path / "wiki.txt"
    f.write_text(TEXT.replace(". ", ".\n"))
    assert run_cli(["evaluate", "--model", folder, "--task", "lm", "--data", f, "--max-length", 16, "--stride", 8,
                    "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = _token_by_token(model, tok(f.read_text().rstrip("\n"), add_special_tokens=False)["input_ids"], 16, 8)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    out = tmp_path / "p.jsonl"
    assert run_cli(["predict", "--model", folder, "--task", "lm", "--data", f, "--out", out]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_finetune_lm_logs_validation_perplexity_and_keeps_best(tiny, tmp_path):
    folder, _, _ = tiny
    f = tmp_path / "text.txt"
    f.write_text("\n".join([TEXT] * 8))
    out = tmp_path / "run"
    assert run_cli(["finetune", "--task", "lm", "--model", folder, "--data", f, "--val-split", 0.25, "--out", out,
                    "--max-steps", 3, "--eval-every", 1, "--max-length", 32, "--batch-size", 4,
                    "--learning-rate", 1e-3]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_perplexity" in r]
    assert len(vals) == 3 and all(abs(math.exp(r["val_loss"]) - r["val_perplexity"]) / r["val_perplexity"] < 0.5
                                  for r in vals)
    best = json.loads((out / "best" / "lmtune.json").read_text())
    assert best["metrics"]["val_loss"] == min(r["val_loss"] for r in vals)


def test_lm_on_an_encoder_is_refused(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    assert run_cli(["evaluate", "--model", "minilm-l6", "--task", "lm", "--data", f]) == 2
    assert "needs a causal LM" in capsys.readouterr().err
