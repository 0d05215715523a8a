"""Fine-tuning: full and LoRA on instruction data, outputs that plain transformers/peft load."""

import json

import pytest
import torch

from conftest import SHARED, read_metrics
from lmtune.config import FinetuneConfig, GenerateConfig
from lmtune.finetune import finetune
from lmtune.generate import generate


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_full_finetune_learns_from_every_format(tmp_path, tiny_chat_model, dates_jsonl, fmt):
    rows = [json.loads(line) for line in open(dates_jsonl)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path = dates_jsonl
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "completion"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            for r in rows:
                w.writerow({"prompt": f"{r['instruction']} {r['input']}", "completion": r["output"]})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        msgs = [[{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}] for r in rows]
        pq.write_table(pa.table({"messages": msgs}), path)
    out = tmp_path / "run"
    finetune(FinetuneConfig(model=tiny_chat_model, data=str(path), out=str(out), max_steps=30, batch_size=8,
                            learning_rate=3e-3, warmup_steps=0, schedule="constant"))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, (losses[0], losses[-5:])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_lora_on_smollm2_learns_and_reloads_with_peft(tmp_path, smollm2_dir, dates_jsonl):
    """The real 135M model, a few LoRA steps: loss falls, the adapter folder loads with plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lora"
    finetune(FinetuneConfig(model="smollm2-135m", data=dates_jsonl, out=str(out), lora=True, max_steps=8,
                            batch_size=4, learning_rate=2e-3, lora_dropout=0.0, max_length=96,
                            retain_data="none"))  # retention is tested in test_retention, on the tiny model
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] * 0.7, losses
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert not (out / "model.safetensors").exists()  # an adapter, not a copy of the base

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Rewrite this date", return_tensors="pt").input_ids
    from lmtune.models import load_causal_lm
    ours, _ = load_causal_lm(str(out))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours.eval()(ids).logits)


def test_generate_greedy_from_a_finetuned_folder(tmp_path, tiny_chat_model, dates_jsonl, capsys):
    out = tmp_path / "run"
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), max_steps=60, batch_size=8,
                            learning_rate=5e-3, schedule="constant"))
    text = generate(GenerateConfig(model=str(out), prompt="Rewrite this date in ISO 8601 format (YYYY-MM-DD). "
                                   "Answer with the date only.\n\nMarch 5, 2024", max_new_tokens=12))
    # a 2-layer model learns the answer's alphabet (digits and dashes) in 60 steps, not the date itself;
    # the untrained model answers with arbitrary tokens of its 49k vocabulary
    assert text and set(text) <= set("0123456789-"), text
    untrained = generate(GenerateConfig(model=tiny_chat_model, prompt="March 5, 2024", max_new_tokens=12))
    assert not set(untrained) <= set("0123456789-"), untrained
    sampled = generate(GenerateConfig(model=str(out), prompt="March 5, 2024", temperature=1.0, top_k=50,
                                      top_p=0.9, max_new_tokens=12, seed=1))
    assert isinstance(sampled, str)


def test_alpaca_file_from_shared_data_is_read(tmp_path, tiny_chat_model):
    """The real Alpaca records (list JSON) encode with targets only on the output."""
    from lmtune.data.readers import read_records
    from lmtune.models import load_tokenizer
    from lmtune.tasks import instruct

    rows = read_records(str(SHARED / "alpaca" / "alpaca_5000.json"))[:50]
    tok = load_tokenizer(tiny_chat_model)
    examples = instruct.encode_all(rows, tok, 512, "alpaca_5000.json")
    assert len(examples) == 50
    first = tok.decode([t for t in examples[0]["labels"] if t != -100])
    assert first.startswith(rows[0]["output"][:20])


def test_evaluate_and_predict_instruct(tmp_path, tiny_chat_model, dates_jsonl, capsys):
    """The instruct task through the evaluate/predict verbs: exact match against the expected response."""
    import json as _json

    from lmtune.config import EvaluateConfig, PredictConfig
    from lmtune.evaluate import evaluate
    from lmtune.predict import predict

    result = evaluate(EvaluateConfig(model=tiny_chat_model, task="instruct", data=dates_jsonl, limit=4,
                                     max_new_tokens=4, json=True))
    assert result["rows"] == 4 and result["exact_match"] == 0.0 and result["loss"] > 5  # an untrained model
    out = tmp_path / "pred.jsonl"
    predict(PredictConfig(model=tiny_chat_model, task="instruct", data=dates_jsonl, out=str(out), limit=3,
                          max_new_tokens=4))
    rows = [_json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)


def test_lora_in_bf16_learns_and_validates(tmp_path, tiny_chat_model, dates_jsonl):
    """--bf16 with LoRA stores the frozen base in bf16: training and validation (under the same autocast)
    run through, the loss falls, and only the adapter is saved."""
    out = tmp_path / "lora-bf16"
    finetune(FinetuneConfig(model=tiny_chat_model, data=dates_jsonl, out=str(out), lora=True, bf16=True,
                            max_steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=0, schedule="constant",
                            lora_dropout=0.0, val_split=0.2))
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    val = [r for r in rows if "val_loss" in r][-1]
    assert abs(val["val_loss"] - losses[-1]) < 1.0  # validated under the training's autocast, on held-out rows
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
