"""Every bad input: one line on stderr naming what, where and how to fix; exit 2; no traceback;
no output folder left behind."""

import pytest

from conftest import run_cli


def _data(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


CASES = {
    "missing data file": (lambda t: ["--data", str(t / "nope.jsonl")], "data file .*nope.jsonl not found"),
    "empty data file": (lambda t: ["--data", _data(t, "e.jsonl", "")], "data file .*e.jsonl is empty"),
    "malformed JSONL line": (
        lambda t: ["--data", _data(t, "m.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')],
        r"m.jsonl:2: malformed JSON"),
    "record missing fields": (
        lambda t: ["--data", _data(t, "f.jsonl", '{"prompt": "a", "completion": "b"}\n{"question": "a"}\n')],
        r"f.jsonl:2: record has fields \[question\]; instruct data needs"),
    "unknown model": (lambda t: ["--data", _data(t, "ok.jsonl", '{"prompt": "a", "completion": "b"}\n'),
                                 "--model", "no-such-model"], "model 'no-such-model' not found; tried: alias"),
    "unknown hub id offline": (lambda t: ["--data", _data(t, "ok.jsonl", '{"prompt": "a", "completion": "b"}\n'),
                                          "--model", "someorg/somemodel"], "offline \\(HF_HUB_OFFLINE=1\\)"),
    "mistyped config key": (lambda t: ["--data", "x", "--config", _data(t, "c.yaml", "learning_rat: 3e-4\n")],
                            "unknown key 'learning_rat', did you mean 'learning_rate'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(tmp_path, case, tiny_chat_model):
    make_args, pattern = CASES[case]
    out = tmp_path / "out"
    args = ["finetune", "--out", out, *make_args(tmp_path)]
    if "--model" not in args:
        args += ["--model", tiny_chat_model]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-1500:]
    import re
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()


def test_out_holding_another_run_needs_resume_or_overwrite(tmp_path, tiny_chat_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    data = _data(tmp_path, "ok.jsonl", '{"prompt": "a", "completion": "b"}\n')
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", data, "--out", out, "--max-steps", "1")
    assert r.returncode == 2 and "already holds a run: add --resume to continue it, --overwrite" in r.stderr
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", data, "--out", out, "--max-steps", "1", "--resume")
    assert r.returncode == 2 and "holds no checkpoint to resume from" in r.stderr
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", data, "--out", out, "--max-steps", "1",
                "--overwrite")  # not a run lmtune wrote (no run.json): --overwrite does not delete it
    assert r.returncode == 2 and "is not an lmtune run (no run.json)" in r.stderr, r.stderr[-1500:]
    (out / "run.json").write_text("{}\n")
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", data, "--out", out, "--max-steps", "1",
                "--overwrite")
    assert r.returncode == 0, r.stderr[-1500:]
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").read_text() != "{}\n"


def test_bad_pretrain_inputs(tmp_path):
    r = run_cli("pretrain", "--data", tmp_path / "none.txt", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip() == f"error: data file {tmp_path / 'none.txt'} not found: check the path"
    r = run_cli("pretrain", "--data", "x", "--out", tmp_path / "o", "--model-size", "7b")
    assert r.returncode == 2 and "key 'model_size' must be one of 1m, 10m, 30m, got '7b'" in r.stderr
    assert not (tmp_path / "o").exists()
