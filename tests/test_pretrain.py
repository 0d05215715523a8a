"""Pretraining from scratch: the loss goes down, the folder is plain Hugging Face."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_metrics
from lmtune.config import PretrainConfig
from lmtune.pretrain import pretrain


def test_pretrain_learns_and_saves_a_plain_hf_folder(tmp_path, shakespeare_small):
    out = tmp_path / "run"
    cfg = PretrainConfig(data=shakespeare_small, out=str(out), tokenizer="bpe", vocab_size=512,
                         model_size="1m", max_length=64, batch_size=16, max_steps=60, eval_every=30,
                         learning_rate=3e-3, warmup_steps=5, save_every=30)
    pretrain(cfg)
    rows = read_metrics(out)
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(train) == 60 and {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert sum(train[-5:]) / 5 < train[0] - 1.0, (train[0], train[-5:])  # from ~6.2 (ln 512) to well below
    assert len(val) == 2 and val[1] < val[0]
    assert (out / "loss.png").stat().st_size > 1000

    # plain transformers, no lmtune code: loads and gives the logits of the last checkpoint's weights
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("ROMEO: I will", return_tensors="pt").input_ids
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(out / "checkpoints" / "step-00000060" / "dcp", tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert tok.decode(ids[0]) == "ROMEO: I will"


def test_char_tokenizer_round_trips(tmp_path, shakespeare_small):
    from lmtune.data.tokenizer import train_tokenizer

    text = open(shakespeare_small).read()
    tok = train_tokenizer(text, "char", 0)
    ids = tok("First Citizen:\nBefore we proceed")["input_ids"]
    assert len(ids) == len("First Citizen:\nBefore we proceed")
    assert tok.decode(ids) == "First Citizen:\nBefore we proceed"


def test_a_held_back_share_too_small_to_validate_says_so(tmp_path, capsys):
    """One paragraph is one document, and --val-split holds back whole documents: nothing is left to
    validate on. The run says so instead of training silently unvalidated (a sweep scoring val_loss would
    otherwise only learn that no trial reported one)."""
    text = tmp_path / "one.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    cfg = PretrainConfig(data=str(text), out=str(tmp_path / "run"), tokenizer="char", model_size="1m",
                         max_length=32, batch_size=4, max_steps=2, val_split=0.1, save_every=10)
    pretrain(cfg)
    err = capsys.readouterr().err
    assert "note: no validation" in err and "--val-split 0.1" in err, err[-500:]
    assert not [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
