"""Preference tasks (dpo, orpo): the pair encoding, the loss and its gradients against TRL 1.16's trainers
on one batch, bad records as one line with file:line, and a fine-tune that lowers the DPO loss."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.nn.functional as F

from _tiny_models import run_cli
from conftest import read_metrics
from lmtune.data.batching import IGNORE
from lmtune.models import load_tokenizer
from lmtune.tasks import dpo, orpo, preference

PAIRS = [("What is 2+2?", "4", "five"), ("Say hi", "Hello there, friend", "Go away"),
         ("Capital of France?", "Paris", "It is Lyon, I think"), ("Colour of the sky?", "Blue", "Green")]


def _conversational(pairs):
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    return load_tokenizer(tiny_chat_model)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _reply(tok, labels):
    return tok.decode([t for t in labels if t != IGNORE])


@pytest.mark.parametrize("row", [
    {"prompt": "Say hi", "chosen": "Hello there", "rejected": "Go away"},
    _conversational([("Say hi", "Hello there", "Go away")])[0],
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Go away"}]},  # implicit prompt
])
def test_labels_are_the_reply_and_its_end_of_turn_and_a_batch_is_chosen_then_rejected(tok, row):
    ex, truncated = preference.encode_pair(row, tok, 128)
    assert not truncated
    assert _reply(tok, ex["chosen_labels"]) == "Hello there<|im_end|>\n"
    assert _reply(tok, ex["rejected_labels"]) == "Go away<|im_end|>\n"
    short = preference.encode_pair({"prompt": "Q", "chosen": "a", "rejected": "b"}, tok, 128)[0]
    b = dpo.collate(tok, {"beta": 0.1, "dpo_loss": "sigmoid", "label_smoothing": 0.0})([ex, short])
    assert b["input_ids"].shape[0] == 4 and b["n_items"] == 2  # rows: chosen 1, chosen 2, rejected 1, rejected 2
    assert _reply(tok, b["labels"][1].tolist()) == "a<|im_end|>\n" and _reply(tok, b["labels"][3].tolist()) == "b<|im_end|>\n"
    # padding is marked by position: SmolLM2 pads with <|im_end|>, which is also a target of every reply
    n = len(short["chosen_ids"])
    assert tok.pad_token == "<|im_end|>" and (b["labels"][1, n:] == IGNORE).all() and (b["attention_mask"][1, n:] == 0).all()


def _trl_dpo(model, tok, loss_type, beta):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, per_device_train_batch_size=4, max_length=128,
                     report_to=[], use_cpu=True, loss_type=[loss_type], save_strategy="no", disable_tqdm=True)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_conversational(PAIRS)),
                      processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules="all-linear", task_type="CAUSAL_LM"))


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(tiny_chat_model, tok, loss_type):
    """One batch of 4 conversational pairs through TRL's DPOTrainer.compute_loss (LoRA, the reference by
    disabling the adapter) and through lmtune's dpo.loss on the same peft model: the same token rows, the
    same loss and the same LoRA gradients within 1e-4. The adapter's B matrices are randomised first, so
    the policy differs from the reference and every LoRA weight gets a gradient."""
    trainer = _trl_dpo(_model(tiny_chat_model), tok, loss_type, beta=0.3)
    model = trainer.model
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    model.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    theirs = trainer.compute_loss(model, inputs)
    theirs.backward()
    g_theirs = _grads(model)

    rows = [{**r, "_line": i + 1} for i, r in enumerate(_conversational(PAIRS))]
    batch = dpo.collate(tok, {"beta": 0.3, "dpo_loss": loss_type, "label_smoothing": 0.0})(
        preference.encode_all(rows, tok, 128, "pairs.jsonl"))
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    assert torch.equal(batch["labels"][:, 1:] != IGNORE, inputs["completion_mask"][:, 1:].bool())
    s, n = dpo.loss(model, batch)
    ours = s / n
    ours.backward()
    g_ours = _grads(model)
    assert abs(float(ours) - float(theirs)) < 1e-4, (float(ours), float(theirs))
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 28  # A and B of 7 linears x 2 layers
    assert max(float((g_ours[k] - g_theirs[k]).abs().max()) for k in g_ours) < 1e-4
    assert max(float(g.abs().max()) for g in g_ours.values()) > 1e-3  # gradients that could differ


def test_label_smoothing_is_conservative_dpo():
    """TRL 1.16's 'sigmoid' ignores label_smoothing (it moved to 'robust'/'exo_pair'), so the cDPO form is
    checked against the formula written out: -(1-e) log s(b d) - e log s(-b d)."""
    c, r, rc, rr = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -2.0]), torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -3.0])
    one = torch.ones(2)
    losses, rew_c, rew_r = dpo.pair_losses({"settings": {"beta": 0.5, "dpo_loss": "sigmoid", "label_smoothing": 0.2}},
                                           c, r, one, one, (rc, rr))
    d = (c - rc) - (r - rr)
    expected = -0.8 * torch.log(torch.sigmoid(0.5 * d)) - 0.2 * torch.log(torch.sigmoid(-0.5 * d))
    assert torch.allclose(losses, expected, atol=1e-6)
    assert torch.allclose(rew_c - rew_r, 0.5 * d)


def test_orpo_loss_and_gradients_equal_trl_orpo_trainer(tiny_chat_model, tok):
    """TRL 1.16 ships ORPOTrainer under trl.experimental.orpo. On its own tokenized batch (full fine-tune),
    lmtune's orpo.loss equals TRL's odds-ratio term (its forward, its odds_ratio_loss) plus the reply's NLL
    written out from TRL's logits: TRL's own NLL also covers the prompt tokens, lmtune's (the paper's) only
    the reply. Loss and every weight's gradient within 1e-4."""
    import warnings

    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = ORPOConfig(output_dir=tempfile.mkdtemp(), beta=0.25, per_device_train_batch_size=4, max_length=128,
                      report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    data = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    trainer = ORPOTrainer(model=_model(tiny_chat_model), args=args, train_dataset=Dataset.from_list(data),
                          processing_class=tok)
    model = trainer.model
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    chosen_logps, rejected_logps, chosen_logits = trainer.concatenated_forward(model, batch)[:3]
    cat = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    labels = cat["concatenated_labels"]
    nll = F.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels[:4, 1:].reshape(-1),
                          ignore_index=IGNORE)
    theirs = nll - trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
    theirs.backward()
    g_theirs = _grads(model)

    ours_batch = {"input_ids": cat["concatenated_input_ids"], "attention_mask": cat["concatenated_attention_mask"],
                  "labels": labels, "pair_weight": torch.ones(4), "n_items": 4, "settings": {"orpo_lambda": 0.25}}
    s, n = orpo.loss(model, ours_batch)
    ours = s / n
    ours.backward()
    g_ours = _grads(model)
    assert abs(float(ours) - float(theirs)) < 1e-4, (float(ours), float(theirs))
    assert g_ours.keys() == g_theirs.keys()
    assert max(float((g_ours[k] - g_theirs[k]).abs().max()) for k in g_ours) < 1e-4


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case,record,extra,pattern", [
    ("missing rejected", {"prompt": "Q", "chosen": "a"}, [], r"bad.jsonl:2: no 'rejected' \(the record has: prompt, chosen\)"),
    ("missing chosen", {"prompt": "Q", "rejected": "b"}, [], r"bad.jsonl:2: no 'chosen'"),
    ("identical", {"prompt": "Q", "chosen": "same", "rejected": "same"}, [],
     r"bad.jsonl:2: 'chosen' and 'rejected' are the same"),
    ("prompt too long", {"prompt": "word " * 60, "chosen": "a", "rejected": "b"}, ["--max-length", "32"],
     r"bad.jsonl:2: the prompt is \d+ tokens, which leaves no room for a reply within --max-length 32"),
])
def test_bad_pair_is_one_line_with_file_and_line(tmp_path, tiny_chat_model, capsys, case, record, extra, pattern):
    import re

    data = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, record])
    out = tmp_path / "out"
    code = run_cli(["finetune", "--task", "dpo", "--model", tiny_chat_model, "--data", data, "--out", out, *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not out.exists()


def _learnable_pairs(n, seed=0):
    """The reply to 'Answer about X' is preferred when it is 'yes, X' over 'no'."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "glass", "candle", "forest"]
    return [{"prompt": f"Answer about {w} {rng.randrange(100)}", "chosen": f"yes, {w}", "rejected": "no"}
            for w in (rng.choice(words) for _ in range(n))]


def test_finetune_dpo_lora_lowers_the_loss_and_logs_preference_metrics(tmp_path, tiny_chat_model, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _learnable_pairs(32))
    val = _jsonl(tmp_path / "val.jsonl", _learnable_pairs(8, seed=1))
    out = tmp_path / "run"
    assert run_cli(["finetune", "--task", "dpo", "--model", tiny_chat_model, "--data", train, "--eval-data", val,
                    "--out", out, "--lora", "--lora-r", "8", "--lora-dropout", "0", "--learning-rate", "1e-2",
                    "--batch-size", "8", "--max-steps", "16", "--eval-every", "8", "--beta", "0.5",
                    "--schedule", "constant", "--max-length", "64"]) == 0
    steps = [m for m in read_metrics(out) if "loss" in m]
    vals = [m for m in read_metrics(out) if "val_loss" in m]
    assert abs(steps[0]["loss"] - 0.6931) < 0.02  # the adapter starts at zero: policy = reference, log 2
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"], [s["loss"] for s in steps]
    assert steps[0]["target_tokens"] > 8  # reply tokens of both sides, not pairs
    last = vals[-1]
    assert last["val_reward_accuracy"] > 90 and last["val_reward_margin"] > 0 and last["val_loss"] < 0.4
    assert last["val_chosen_logp"] < 0 and last["val_rejected_logp"] < 0
    # evaluate: the adapter against its base (the adapter switched off) on the same pairs
    capsys.readouterr()
    assert run_cli(["evaluate", "--task", "dpo", "--model", out, "--data", val, "--json", "--beta", "0.5",
                    "--max-length", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(result["loss"] - last["val_loss"]) < 1e-4 and result["reward_accuracy"] == last["val_reward_accuracy"]


def test_full_finetune_dpo_and_orpo_run_without_a_second_model(tmp_path, tiny_chat_model, capsys):
    """A full fine-tune scores the reference once, before training: its validation starts from the stored
    log-probs (the first step's loss is log 2 exactly) and the evaluate verb finds the reference again in
    the saved model's base. ORPO needs no reference at all."""
    train = _jsonl(tmp_path / "train.jsonl", _learnable_pairs(16))
    val = _jsonl(tmp_path / "val.jsonl", _learnable_pairs(8, seed=1))
    common = ["--model", tiny_chat_model, "--data", train, "--eval-data", val, "--learning-rate", "3e-3",
              "--batch-size", "8", "--max-steps", "6", "--max-length", "64", "--schedule", "constant"]
    out = tmp_path / "full"
    assert run_cli(["finetune", "--task", "dpo", "--out", out, *common]) == 0
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert abs(steps[0]["loss"] - 0.693147) < 1e-4 and steps[-1]["loss"] < steps[0]["loss"]
    val_loss = [m for m in read_metrics(out) if "val_loss" in m][-1]["val_loss"]
    capsys.readouterr()
    assert run_cli(["evaluate", "--task", "dpo", "--model", out, "--data", val, "--json", "--max-length", "64"]) == 0
    assert abs(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] - val_loss) < 1e-4

    out = tmp_path / "orpo"
    assert run_cli(["finetune", "--task", "orpo", "--out", out, "--orpo-lambda", "0.5", *common]) == 0
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "val_reward_accuracy" in read_metrics(out)[-1] or any("val_reward_accuracy" in m for m in read_metrics(out))


def test_settings_are_checked(tmp_path, tiny_chat_model, capsys):
    data = _jsonl(tmp_path / "d.jsonl", _learnable_pairs(2))
    base = ["finetune", "--task", "dpo", "--model", tiny_chat_model, "--data", data, "--out", tmp_path / "o"]
    for extra, pattern in ((["--beta", "0"], "--beta must be > 0"),
                           (["--dpo-loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to --dpo-loss sigmoid"),
                           (["--pack"], "--pack does not apply to --task dpo")):
        assert run_cli(base + extra) == 2
        assert pattern in capsys.readouterr().err


def test_sweep_over_beta_reports_the_preference_metrics(tmp_path, tiny_chat_model):
    import yaml

    train = {"task": "dpo", "model": tiny_chat_model, "data": _jsonl(tmp_path / "t.jsonl", _learnable_pairs(16)),
             "eval_data": _jsonl(tmp_path / "v.jsonl", _learnable_pairs(8, seed=1)), "lora": True, "lora_r": 4,
             "max_steps": 4, "batch_size": 8, "max_length": 64, "learning_rate": 1e-2, "save_every": 1000}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"train": train, "space": {"beta": [0.1, 1.0]}, "metric": "reward_margin",
                                     "trials": 2, "startup_trials": 2, "seed": 0}))
    assert run_cli(["sweep", "--config", sweep, "--out", tmp_path / "sw"]) == 0
    csv = (tmp_path / "sw" / "trials.csv").read_text()
    assert csv.count("COMPLETE") == 2, csv
