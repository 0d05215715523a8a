"""qa: SQuAD EM/F1 as the official script computes them, reading SQuAD/JSONL, span labels, round trips."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from _tiny_models import SHARED, run_cli, tiny_llama
from lmtune import metrics
from lmtune.tasks import qa


def test_official_normalisation_and_scores():
    # SQuAD v1.1 dev, Super Bowl 50: "Which NFL team represented the AFC at Super Bowl 50?"
    golds = ["Denver Broncos", "Denver Broncos", "Denver Broncos"]
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.squad(["the Denver Broncos."], [golds]) == {"exact_match": 100.0, "f1": 100.0}
    # 2 of 3 predicted tokens are right: P 2/3, R 1 -> F1 0.8
    assert metrics.squad(["Denver Broncos defense"], [golds])["f1"] == pytest.approx(80.0)
    # best over the gold answers, averaged over questions
    s = metrics.squad(["Santa Clara", "Carolina"], [["Santa Clara, California", "Levi's Stadium"], ["Panthers"]])
    assert s["exact_match"] == 0.0
    assert s["f1"] == pytest.approx(100 * (0.8 + 0.0) / 2)
    assert metrics.squad_f1("", "x") == 0.0


def _cfg(**kw):
    base = dict(context_column="context", question_column="question", max_length=64, doc_stride=16,
                batch_size=4, max_new_tokens=4, limit=0)
    return SimpleNamespace(**{**base, **kw})


def test_reads_squad_json_and_skips_misplaced_answers(tmp_path, capsys):
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "q2", "question": "What is in France?", "answers": [{"text": "Paris", "answer_start": 3}]}]}]}]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(squad))
    rows = qa.read(str(f), _cfg())
    assert [r["id"] for r in rows] == ["q1"] and rows.skipped == 1
    assert "skipped 1 of 2 records" in capsys.readouterr().err
    jl = tmp_path / "s.jsonl"
    jl.write_text(json.dumps({"context": "Paris is in France.", "question": "Where?",
                              "answers": {"text": ["France"], "answer_start": [12]}}) + "\n")
    assert qa.read(str(jl), _cfg())[0]["answers"] == ["France"]


def test_span_labels_point_at_the_answer_in_every_window():
    from lmtune.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("minilm-l6"))
    context = " ".join(f"word{i}" for i in range(60)) + " the answer is Marie Curie today " + \
        " ".join(f"w{i}" for i in range(20))
    start = context.index("Marie Curie")
    row = {"context": context, "question": "who?", "answers": ["Marie Curie"], "starts": [start]}
    examples = qa.encode([row], tok, _cfg(), {"head": "qa_span"}, "")
    assert len(examples) > 1  # the long context is split into windows
    found = [tok.decode(e["input_ids"][e["labels"][1]:e["labels"][2] + 1]) for e in examples if e["labels"][1]]
    assert found and all(f == "marie curie" for f in found)


def test_extractive_round_trip_on_xquad_slice(tmp_path, capsys):
    data = json.loads((SHARED / "xquad" / "xquad.en.train.json").read_text())
    small = {"version": "1.1", "data": [{"title": "x", "paragraphs": data["data"][0]["paragraphs"][:1]}]}
    f = tmp_path / "x.json"
    f.write_text(json.dumps(small))
    out = tmp_path / "qa"
    assert run_cli(["finetune", "--task", "qa", "--model", "minilm-l6", "--data", f, "--eval-data", f, "--out", out,
                    "--lora", "--max-steps", 2, "--batch-size", 8, "--max-length", 128, "--doc-stride", 32]) == 0
    assert json.loads((out / "lmtune.json").read_text())["head"] == "qa_span"
    capsys.readouterr()
    assert run_cli(["evaluate", "--model", out, "--task", "qa", "--data", f, "--max-length", 128, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"exact_match", "f1"} <= set(result) and result["skipped"] == 0
    pred = tmp_path / "p.jsonl"
    assert run_cli(["predict", "--model", out, "--task", "qa", "--data", f, "--out", pred, "--max-length", 128]) == 0
    preds = [json.loads(line) for line in pred.read_text().splitlines()]
    context = small["data"][0]["paragraphs"][0]["context"]
    assert len(preds) == result["rows"] and all(p["answer"] in context for p in preds)


def test_generative_qa_with_a_decoder(tmp_path, capsys):
    llama = tiny_llama(tmp_path / "llama")
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"context": "Paris is in France.", "question": "Where is Paris?", "answers": "France"})
                 + "\n")
    assert run_cli(["evaluate", "--model", llama, "--task", "qa", "--data", f, "--max-new-tokens", 3, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 1


def test_missing_question_column(tmp_path, capsys):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"context": "c", "query": "q", "answers": "c"}) + "\n")
    assert run_cli(["evaluate", "--model", "minilm-l6", "--task", "qa", "--data", f]) == 2
    err = capsys.readouterr().err
    assert "no column 'question'" in err and "context, query, answers" in err
