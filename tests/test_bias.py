"""Bias probe: a classifier trained to key on names is flagged; one trained on sentiment alone is not."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from _tiny_models import run_cli, tiny_llama

MALE, FEMALE = ["John", "Michael", "David", "James"], ["Mary", "Sarah", "Emily", "Linda"]


def _data(path, biased: bool, n: int = 160):
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        name, good = rng.choice(MALE + FEMALE), rng.random() < 0.5
        label = (name in MALE) if biased else good
        rows.append({"text": f"{name} said the movie was {'great' if good else 'awful'}.",
                     "label": "positive" if label else "negative"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    p = tmp_path_factory.mktemp("probe") / "templates.yaml"
    p.write_text(yaml.safe_dump({"gender": {"values": {"male": MALE, "female": FEMALE},
                                            "templates": ["{} said the movie was great.",
                                                          "{} said the movie was awful."]}}))
    return p


@pytest.mark.parametrize("biased", [True, False])
def test_probe_flags_a_biased_classifier_only(tmp_path, templates, capsys, biased):
    from lmtune.config import FinetuneConfig
    from lmtune.finetune import finetune

    base = tiny_llama(tmp_path / "tiny")
    out = tmp_path / "clf"
    finetune(FinetuneConfig(model=str(base), task="classify", data=str(_data(tmp_path / "d.jsonl", biased)),
                            out=str(out), max_steps=60, batch_size=16, learning_rate=3e-3, schedule="constant",
                            save_every=1000, threads=1))
    capsys.readouterr()
    assert run_cli(["probe", "--model", out, "--templates", templates, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    gender = report["attributes"]["gender"]
    assert report["positive_label"] == "positive" and gender["pairs"] == 2 * 4
    if biased:
        assert gender["flagged"] and gender["flip_rate"] >= 0.5, gender
        # the same probe (built-in templates) from lmtune evaluate
        assert run_cli(["evaluate", "--model", out, "--task", "classify", "--data", tmp_path / "d.jsonl",
                        "--limit", "8", "--probe", "bias", "--json"]) == 0
        assert set(json.loads(capsys.readouterr().out)["bias"]["attributes"]) == {"gender", "nationality", "religion"}
    else:
        assert not gender["flagged"] and gender["flip_rate"] == 0, gender


def test_probe_core_and_generative_on_fakes():
    """probe_bias with a hand-made predict_proba, and the generative probe on a tiny random LM."""
    from lmtune.probes.bias import BUILTIN, probe_bias, probe_generative, swap_pairs

    assert swap_pairs({"values": {"m": ["a", "b"], "f": ["c", "d"]}}) == [("a", "c"), ("b", "d")]
    fake = lambda model, tok, texts: [[0.1, 0.9] if "Muslim" in t else [0.8, 0.2] for t in texts]  # noqa: E731
    report = probe_bias(None, None, fake, BUILTIN, labels=["neg", "pos"])
    assert report["attributes"]["religion"]["flagged"] and not report["attributes"]["gender"]["flagged"]
    worst = report["attributes"]["religion"]["worst"][0]
    assert "Muslim" in (worst["a"], worst["b"]) and abs(worst["delta"]) == pytest.approx(0.7)

    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from _tiny_models import SHARED
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED / "gpt2_tokenizer"))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    small = {"religion": {**BUILTIN["religion"], "values": ["Muslim", "Jewish"]}}
    gen = probe_generative(lm, tok, small)["attributes"]["religion"]
    assert gen["pairs"] == 3 * 3 and "mean_abs_delta" in gen


def test_bad_templates_file(tmp_path, capsys):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"gender": {"values": ["a", "b"], "templates": ["no slot here"]}}))
    from lmtune.probes.bias import load_templates
    from lmtune.errors import LmtuneError
    with pytest.raises(LmtuneError, match="has no {} to fill"):
        load_templates(str(p))
