"""Retention: the general set is scored on the base model before training, replay changes the batches by
the share asked for, `evaluate --reference` compares two models' answers, and mistakes are one line."""

import json

import pytest

from conftest import read_metrics, run_cli
from lmtune import retention
from lmtune.config import EvaluateConfig, FinetuneConfig
from lmtune.evaluate import evaluate
from lmtune.finetune import finetune
from lmtune.data.batching import collate
from lmtune.train import loop


def _base_scores(model_dir):
    """The built-in retain set scored on the untouched model, independently of any training run."""
    from lmtune.models import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    rs = retention.RetainSet(str(retention.BUILTIN_RETAIN), tok, 128, 8)
    return rs.score(model), rs.answers


def test_retention_is_scored_on_the_base_model_before_training(tmp_path, tiny_chat_model, dates_jsonl, capsys):
    out = tmp_path / "run"
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, lora_dropout=0.0,
                            max_steps=6, batch_size=8, learning_rate=3e-2, warmup_steps=0, max_length=128))
    rows = read_metrics(out)
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and "loss" not in first  # logged before the first training step
    assert set(first) == {"step", "retain_loss", "retain_agreement", "retain_f1"}
    assert first["retain_agreement"] == 1.0 and first["retain_f1"] == 1.0
    base, base_answers = _base_scores(tiny_chat_model)
    assert abs(first["retain_loss"] - base["retain_loss"]) < 1e-4, (first, base)
    saved = [json.loads(line) for line in (out / "retain_answers.jsonl").read_text().splitlines()]
    assert len(saved) == 50 and [s["base"] for s in saved] == base_answers
    # the end of the run is scored too, and training moved it away from the base model
    assert last["step"] == 6 and "retain_loss" in last and last["retain_loss"] != first["retain_loss"]
    assert [s["answer"] for s in saved] != base_answers and last["retain_agreement"] < 1.0
    assert last["retain_f1"] == pytest.approx(retention.overlap([s["answer"] for s in saved], base_answers))
    err = capsys.readouterr().err
    done = [line for line in err.splitlines() if line.startswith("done:")][-1]
    assert "training loss" in done and "retention: 50/50 -> " in done and "retain_loss" in done


def test_replay_loss_kl_marks_the_replayed_rows_of_every_batch(tmp_path, tiny_chat_model, dates_jsonl, monkeypatch,
                                                               capsys):
    """--replay-loss kl: every batch says which of its rows replay the base model (the loss below then takes
    the KL divergence on those), and those are the replayed examples: 16 of one epoch's 80 at 20%."""
    flags, real = [], retention.distilling

    def recording(task_loss):
        inner = real(task_loss)

        def loss(model, batch):
            flags.append(batch["replay"].tolist())
            return inner(model, batch)
        return loss
    monkeypatch.setattr(retention, "distilling", recording)
    out = tmp_path / "kl"
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, max_steps=10,
                            batch_size=8, max_length=128, mix_retain=0.2, replay_loss="kl"))
    assert len(flags) == 10 and sum(map(sum, flags)) == 16  # one epoch: every replayed example once
    done = [line for line in capsys.readouterr().err.splitlines() if line.startswith("done:")][-1]
    assert "training loss (task + replay KL)" in done  # not the task's gain: the KL term starts at 0
    replay = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
    assert len(replay) == 176 and all(r["ids"] for r in replay)  # the base model's own tokens, kept for --resume
    # validation rows carry no flag: their loss is the task's alone
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], pad_id=0)
    assert "replay" not in batch


def test_replay_kl_of_the_untrained_adapter_is_zero(tiny_chat_model):
    import torch

    from lmtune import lora, models
    from lmtune.tasks import instruct

    model, tok = models.load_causal_lm(tiny_chat_model)
    model = lora.attach_task_lora(model, "causal", 8, 16, 0.0, "all-linear")
    rows = [{"prompt": "Say hi.", "completion": "Hi there, friend."}, {"prompt": "2+2?", "completion": "4"}]
    ex = [dict(e, replay=[i]) for i, e in enumerate(instruct.encode_all(rows, tok, 64, "x"))]
    batch = collate(ex, pad_id=tok.pad_token_id)
    loss = retention.distilling(instruct.loss)
    total, count = loss(model, batch)
    task_only, n_task = instruct.loss(model, {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()
                                              if k != "replay"})
    assert count == n_task + int(batch["attention_mask"][1, 1:].sum())  # every position of the replayed row
    assert float(total) == pytest.approx(float(task_only), abs=1e-5)  # the replayed row adds KL 0
    # once the adapter moves, the replayed row's KL is positive and has a gradient into the adapter
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    total, _ = loss(model, batch)
    assert float(total) > float(task_only) + 1e-4
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
               if "lora_B" in n)


def test_mix_retain_replays_that_share_of_each_epoch(tmp_path, tiny_chat_model, dates_jsonl, monkeypatch):
    seen, real_rows = [], loop._rows

    def recording_rows(examples, idx):  # every micro-batch the loop takes: (list size, example indices)
        seen.append((len(examples), list(idx)))
        return real_rows(examples, idx)
    monkeypatch.setattr(loop, "_rows", recording_rows)
    out = tmp_path / "mix"
    # 64 dates rows + 16 replayed = 80 examples, 20% replayed: 10 steps of 8 are exactly one epoch
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, max_steps=10,
                            batch_size=8, max_length=128, mix_retain=0.2, retain_data="none"))
    assert {n for n, _ in seen} == {80}
    picked = [i for _, idx in seen for i in idx]
    assert sorted(picked) == list(range(80))  # one epoch: every example once
    assert sum(i >= 64 for i in picked) == 16  # of them 16 replayed: 20% of the batches' rows
    replay = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
    assert len(replay) == 176 and replay[0]["prompt"] == "What is the capital of Germany?"
    assert "retain_loss" not in json.dumps(read_metrics(out))  # --retain-data none: nothing scored

    # the order is a pure function of (seed, step): the same seed picks the same rows, another seed others
    seen.clear()
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(tmp_path / "again"), lora=True,
                            max_steps=10, batch_size=8, max_length=128, mix_retain=0.2, retain_data="none"))
    assert [i for _, idx in seen for i in idx] == picked
    other = [i for b in range(10) for i in loop.micro_batch(80, 8, 1, b)]
    assert other != picked and sum(i >= 64 for i in other) == 16


def test_overlap_grades_what_agreement_counts_exactly():
    base = ["The capital of France is Paris.", "Mars."]
    assert retention.agreement(["the capital of France is Paris", "1999-03-19"], base) == 0.5
    assert retention.overlap(["The capital of France is Paris, France.", "1999-03-19"], base) == pytest.approx(
        (2 * (5 / 6 * 1) / (5 / 6 + 1)) / 2)
    assert retention.overlap(["", "Mars"], ["", "mars."]) == 1.0  # equal answers, the empty one too


def test_mix_counts_the_share_of_the_whole_list():
    task, pool = [{"t": i} for i in range(512)], [{"r": i} for i in range(80)]
    mixed = retention.mix(task, pool, 0.2)
    assert len(mixed) == 640 and sum("r" in e for e in mixed) == 128  # 128 / 640 = 0.2
    assert retention.mix(task, pool, 0.0) is task


def test_reference_agreement_is_one_against_itself_and_lower_against_another(tmp_path, tiny_chat_model, capsys):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from lmtune.models import load_tokenizer

    other = tmp_path / "other"  # untied output layer: its greedy answers are not the tied model's
    torch.manual_seed(1)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_chat_model, tie_word_embeddings=False)).save_pretrained(other)
    load_tokenizer(tiny_chat_model).save_pretrained(other)

    def agreement(reference):
        cfg = EvaluateConfig(model=tiny_chat_model, task="instruct", data=str(retention.BUILTIN_RETAIN),
                             reference=reference, limit=12, max_new_tokens=16, json=True)
        return evaluate(cfg)["agreement"]

    assert agreement(tiny_chat_model) == 1.0
    assert agreement(str(other)) < 1.0
    assert '"reference"' in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--retain-data", "no/such/file.jsonl"], "--retain-data no/such/file.jsonl: file not found"),
    (["--mix-retain", "1.0"], "--mix-retain 1.0: the share of replayed examples must be in [0, 1)"),
    (["--mix-retain", "0.2", "--replay-loss", "kl"], "--replay-loss kl compares with the base model as the model "
                                                     "with its adapter switched off: it needs --lora"),
    (["--lora", "--mix-retain", "0.2", "--replay-loss", "logits"],
     "key 'replay_loss' must be one of tokens, kl, got 'logits'"),
])
def test_bad_retention_options_are_one_line(tmp_path, tiny_chat_model, dates_jsonl, args, message):
    out = tmp_path / "bad"
    r = run_cli("finetune", "--model", tiny_chat_model, "--data", dates_jsonl, "--out", out, *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert message in r.stderr, r.stderr
    assert not out.exists()


def test_negative_mix_and_reference_outside_instruct_are_one_line(tmp_path, tiny_chat_model, dates_jsonl):
    from lmtune.config.options import build
    from lmtune.errors import LmtuneError

    with pytest.raises(LmtuneError, match="key 'mix_retain' must be >= 0.0"):
        build(FinetuneConfig, {}, "", {"data": dates_jsonl, "out": str(tmp_path), "mix_retain": "-0.1"})
    with pytest.raises(LmtuneError, match="--reference compares greedy answers: it works with --task instruct"):
        evaluate(EvaluateConfig(model=tiny_chat_model, task="lm", data=dates_jsonl, reference=tiny_chat_model))
