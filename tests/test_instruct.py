"""Instruction data: formats, loss only on the response, the end of turn kept as a target."""

import pytest

from lmtune.data.batching import IGNORE
from lmtune.errors import LmtuneError
from lmtune.models import load_tokenizer
from lmtune.tasks import instruct


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def _targets(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


@pytest.mark.parametrize("row", [
    {"instruction": "Say hi", "input": "", "output": "Hello there"},
    {"prompt": "Say hi", "completion": "Hello there"},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"}]},
])
def test_labels_cover_exactly_the_response_and_end_of_turn(tok, row):
    ex, truncated = instruct.encode_row(row, tok, 512)
    assert not truncated
    assert _targets(tok, ex) == "Hello there<|im_end|>\n"
    # the pad token is <|im_end|>: masking by id would have hidden it; we mask by position
    assert tok.pad_token == "<|im_end|>"


def test_every_assistant_turn_is_learned_in_a_multi_turn_chat(tok):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]}
    ex, _ = instruct.encode_row(row, tok, 512)
    assert _targets(tok, ex) == "one<|im_end|>\ntwo<|im_end|>\n"


def test_truncation_is_counted_once(tok, capsys):
    rows = [{"prompt": "x " * 5, "completion": "y " * 200, "_line": i} for i in range(3)]
    out = instruct.encode_all(rows, tok, 64, "f.jsonl")
    assert all(len(e["input_ids"]) == 64 for e in out)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "3 of 3 records" in err


def test_record_without_known_fields(tok):
    with pytest.raises(LmtuneError, match=r"f.jsonl:4: record has fields \[text\]; instruct data needs"):
        instruct.encode_row({"text": "hi", "_line": 4}, tok, 64, "f.jsonl")
