"""Instruct data from where users keep it: ShareGPT JSON, a datasets.save_to_disk folder, a folder of files;
each encodes to the same ids as the equivalent JSONL and trains the same."""

import json

import pytest

from conftest import read_metrics
from lmtune.config import FinetuneConfig
from lmtune.errors import LmtuneError
from lmtune.finetune import finetune
from lmtune.tasks import instruct


def _chats(n=24):
    out = []
    for i in range(n):
        out.append([{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                    {"role": "user", "content": "And times two?"},
                    {"role": "assistant", "content": str(4 * i)}])
    return out


@pytest.fixture
def files(tmp_path):
    import datasets

    chats = _chats()
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"id": str(i), "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
             for i, c in enumerate(chats)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(share, indent=1))
    datasets.Dataset.from_list([{"messages": c} for c in chats]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    for k in range(2):
        (tmp_path / "folder" / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"messages": c}) + "\n" for c in chats[k * 12:(k + 1) * 12]))
    return {"jsonl": str(jsonl), "sharegpt": str(tmp_path / "sharegpt.json"), "saved": str(tmp_path / "saved"),
            "folder": str(tmp_path / "folder")}


def test_sharegpt_saved_folder_and_a_folder_of_files_encode_like_jsonl(files, tiny_chat_model):
    from lmtune.models import load_tokenizer

    tok, cfg = load_tokenizer(tiny_chat_model), FinetuneConfig(data="", out="")
    encoded = {k: instruct.encode(instruct.read(p, cfg), tok, cfg, {}, p) for k, p in files.items()}
    assert len(encoded["jsonl"]) == 24
    for k in ("sharegpt", "saved", "folder"):
        assert encoded[k] == encoded["jsonl"], k


def test_sharegpt_and_saved_folder_train_like_jsonl(tmp_path, files, tiny_chat_model):
    def losses(data):
        out = tmp_path / ("run-" + data.replace("/", "_")[-20:])
        finetune(FinetuneConfig(model=tiny_chat_model, data=data, out=str(out), batch_size=4, max_steps=3,
                                learning_rate=1e-3))
        return [r["loss"] for r in read_metrics(out) if "loss" in r]

    reference = losses(files["jsonl"])
    assert losses(files["sharegpt"]) == reference
    assert losses(files["saved"]) == reference


def test_sharegpt_unknown_role_names_file_record_and_role(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(data="", out="")
    with pytest.raises(LmtuneError) as e:
        instruct.read(str(tmp_path / "s.jsonl"), cfg)
    assert f"{tmp_path / 's.jsonl'}:2: turn 1 has the unknown role 'bot'" in str(e.value)
    assert "--role-map bot=" in str(e.value) and "\n" not in str(e.value)
    cfg.role_map = "bot=assistant"
    assert instruct.read(str(tmp_path / "s.jsonl"), cfg)[1]["messages"][1] == {"role": "assistant", "content": "hello"}


def test_messages_column_and_chat_template_file(tmp_path, tiny_chat_model):
    row = {"chat": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    cfg = FinetuneConfig(data="", out="", messages_column="chat")
    assert instruct.read(str(tmp_path / "c.jsonl"), cfg)[0]["messages"][0] == {"role": "user", "content": "hi"}
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    cfg.chat_template = str(template)
    _, tok, _ = instruct.load(tiny_chat_model, cfg)
    assert instruct.render(tok, [{"role": "user", "content": "hi"}]) == "<user>hi\n"
    cfg.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(LmtuneError, match="--chat-template .* not found"):
        instruct.load(tiny_chat_model, cfg)
