"""Prepared token shards: where text comes from, resumable parallel prepare, training on blocks read from them,
and the one-line errors of a damaged prepared folder."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _tiny_models import SHARED
from conftest import read_metrics, run_cli
from lmtune.config import PrepareConfig, PretrainConfig
from lmtune.data import readers, shards, sources
from lmtune.data.tokenizer import load_tokenizer_path
from lmtune.errors import LmtuneError
from lmtune.prepare import prepare
from lmtune.pretrain import pretrain

GPT2 = str(SHARED / "gpt2_tokenizer")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))  # pretrain's prepare cache, per test


def _tokens(folder, split="train"):
    m = shards.load(folder)
    return np.concatenate([np.fromfile(Path(folder) / s[split]["file"], dtype=m["dtype"])
                           for s in m["shards"] if s[split]["file"]])


def test_gpt2_vocab_merges_folder_encodes_like_gpt2():
    tok = load_tokenizer_path(GPT2)
    assert len(tok) == 50257
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]  # GPT-2's ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == 50256


def test_a_tokenizer_that_encodes_text_to_nothing_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"<|endoftext|>": 0}, merges=[])),
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    with pytest.raises(LmtuneError, match="encodes the text .* to no tokens"):
        load_tokenizer_path(str(tmp_path / "tok"))


def test_pretrain_with_the_gpt2_folder_trains_on_its_ids(tmp_path, shakespeare_small):
    out = tmp_path / "run"
    pretrain(PretrainConfig(data=shakespeare_small, out=str(out), tokenizer=GPT2, model_size="1m", max_length=32,
                            batch_size=2, max_steps=1, workers=1, val_max_blocks=1))
    info = json.loads((out / "run.json").read_text())
    assert info["train_tokens"] > 10_000  # about 15k GPT-2 tokens in 60k characters, not 0
    assert len(load_tokenizer_path(str(out / "tokenizer"))) == 50257


def test_parquet_folder_saved_dataset_and_gz_glob_prepare_like_their_concatenation(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    paragraphs = re.split(r"(?<=\n\n)(?=[^\n])", text)  # each with the blank lines after it
    # a glob of .txt.gz files cut after blank lines vs the one file
    (tmp_path / "parts").mkdir()
    q = len(paragraphs) // 4
    for i in range(4):
        with gzip.open(tmp_path / "parts" / f"p{i}.txt.gz", "wt") as f:
            f.write("".join(paragraphs[i * q:(i + 1) * q if i < 3 else None]))
    (tmp_path / "all.txt").write_text("".join(gzip.open(p, "rt").read() for p in sorted((tmp_path / "parts").glob("*.gz"))))
    # a folder of Parquet files vs one JSONL file of the same records
    (tmp_path / "pq").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"body": paragraphs[i::3], "n": list(range(len(paragraphs[i::3])))}),
                       tmp_path / "pq" / f"part-{i}.parquet")
    import datasets

    datasets.Dataset.from_list([{"body": p} for i in range(3) for p in paragraphs[i::3]]).save_to_disk(
        str(tmp_path / "saved"))
    with open(tmp_path / "all.jsonl", "w") as f:
        for i in range(3):
            for p in paragraphs[i::3]:
                f.write(json.dumps({"body": p}) + "\n")

    def prep(data, name, column="text"):
        prepare(PrepareConfig(data=data, out=str(tmp_path / name), tokenizer=GPT2, text_column=column,
                              workers=1, shard_mb=0.01, val_split=0.1))
        m = shards.load(tmp_path / name)
        return m, _tokens(tmp_path / name), _tokens(tmp_path / name, "val")

    cases = [(str(tmp_path / "parts" / "*.txt.gz"), str(tmp_path / "all.txt"), "text"),
             (str(tmp_path / "pq"), str(tmp_path / "all.jsonl"), "body"),
             (str(tmp_path / "saved"), str(tmp_path / "all.jsonl"), "body")]
    for k, (a, b, column) in enumerate(cases):
        (ma, ta, va), (mb, tb, vb) = prep(a, f"a{k}", column), prep(b, f"b{k}", column)
        assert ma["train_tokens"] == mb["train_tokens"] > 5000 and ma["val_documents"] == mb["val_documents"] > 0
        assert np.array_equal(ta, tb) and np.array_equal(va, vb)
    # records end with the end-of-text token; the same text read as text has none
    assert (tb == 50256).sum() == mb["train_documents"]


def test_a_killed_prepare_continues_to_the_same_shards(tmp_path):
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    (tmp_path / "big.txt").write_text(text * 4)  # 4.5 MB: long enough to be killed part-way
    args = ["prepare", "--data", tmp_path / "big.txt", "--out", tmp_path / "prep", "--tokenizer", GPT2,
            "--shard-mb", "0.1", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", *map(str, args)], stderr=subprocess.PIPE,
                            start_new_session=True)
    manifest = tmp_path / "prep" / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        m = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if len(m.get("shards", ())) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its workers, as the OOM killer or a power cut would
    proc.wait()
    m = json.loads(manifest.read_text())
    assert not m["complete"] and 3 <= len(m["shards"]) < 40
    with pytest.raises(LmtuneError, match="did not finish"):
        shards.load(tmp_path / "prep")

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr
    # the same shards as one uninterrupted prepare (in one process: the worker count changes nothing)
    prepare(PrepareConfig(data=str(tmp_path / "big.txt"), out=str(tmp_path / "straight"), tokenizer=GPT2,
                          shard_mb=0.1, workers=1))
    a, b = shards.load(tmp_path / "prep"), shards.load(tmp_path / "straight")
    assert a["shards"] == b["shards"] and len(a["shards"]) > 40
    assert not list((tmp_path / "prep").glob(".*.tmp"))


def _prepared(tmp_path, shakespeare_small):
    prepare(PrepareConfig(data=shakespeare_small, out=str(tmp_path / "prep"), tokenizer="char", workers=1,
                          shard_mb=0.02))
    return tmp_path / "prep"


def test_pretrain_on_shards_killed_and_resumed_gives_the_same_losses(tmp_path, shakespeare_small):
    prep = _prepared(tmp_path, shakespeare_small)

    def cfg(out, resume=False):
        return PretrainConfig(data=str(prep), out=str(out), model_size="1m", max_length=64, batch_size=8,
                              max_steps=40, save_every=5, eval_every=20, resume=resume)

    pretrain(cfg(tmp_path / "full"))
    args = ["pretrain", "--data", prep, "--out", tmp_path / "killed", "--model-size", "1m", "--max-length", "64",
            "--batch-size", "8", "--max-steps", "40", "--save-every", "5", "--eval-every", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", *map(str, args)], stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    while proc.poll() is None and not list(ckpts.glob("step-*/meta.pt")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    pretrain(cfg(tmp_path / "killed", resume=True))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    loss = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    val = lambda rows: [r["val_loss"] for r in rows if "val_loss" in r]  # noqa: E731
    assert sorted(loss(resumed)) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(loss(full)[step] - loss(resumed)[step]) < 1e-5, step
    assert np.allclose(val(full), val(resumed), atol=1e-5) and len(val(full)) == 2


def test_training_blocks_are_the_shards_tokens_in_order(tmp_path, shakespeare_small):
    prep = _prepared(tmp_path, shakespeare_small)
    m = shards.load(prep)
    blocks = shards.TokenBlocks(prep, m, "train", 64)
    stream = _tokens(prep)
    assert len(m["shards"]) > 2 and blocks.total == len(stream) == m["train_tokens"]
    assert len(blocks) == -(-(len(stream) - 1) // 64)
    joined = [t for i in range(len(blocks)) for t in blocks[i]["input_ids"]]
    assert joined == stream.tolist()  # across shard boundaries, nothing lost or repeated
    every, some = shards.TokenBlocks(prep, m, "val", 64), shards.TokenBlocks(prep, m, "val", 64, limit=3)
    assert len(every) > 3 and len(some) == 3  # --val-max-blocks: evenly spread, first and last included
    assert some[0] == every[0] and some[2] == every[len(every) - 1]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc")
def test_blocks_are_read_not_mapped(tmp_path, shakespeare_small):
    """Reading blocks maps no shard into the process (a mapped page counts in its resident memory, so
    memmapped blocks grew pretraining's RSS with the corpus), and a shard cut short after `load` checked
    it is one line naming the shard, not a SIGBUS."""
    prep = _prepared(tmp_path, shakespeare_small)
    m = shards.load(prep)
    blocks = shards.TokenBlocks(prep, m, "train", 64)
    for i in range(0, len(blocks), 7):
        blocks[i]
    assert ".bin" not in Path("/proc/self/maps").read_text()
    last = prep / m["shards"][-1]["train"]["file"]
    os.truncate(last, last.stat().st_size // 2)
    with pytest.raises(LmtuneError, match=f"shard {re.escape(str(last))} is shorter than its manifest"):
        blocks[len(blocks) - 1]


def test_damaged_prepared_folders_are_one_line_errors(tmp_path, shakespeare_small):
    prep = _prepared(tmp_path, shakespeare_small)
    shard = prep / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    r = run_cli("pretrain", "--data", prep, "--out", tmp_path / "run", "--max-steps", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "train-00001.bin does not match its checksum" in r.stderr and "prepare it again" in r.stderr
    assert not (tmp_path / "run").exists()
    shard.unlink()
    with pytest.raises(LmtuneError, match="train-00001.bin cannot be read"):
        shards.load(prep)
    prep2 = _prepared(tmp_path / "b", shakespeare_small)
    with pytest.raises(LmtuneError, match="made with another tokenizer"):
        shards.load(prep2, load_tokenizer_path(GPT2))


def test_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmtuneError, match="needs the network") as e:
        sources.expand("hf:karpathy/tinyshakespeare@train")
    assert "\n" not in str(e.value)
    assert readers.parse_hub("hf:org/name:cfg@validation") == ("org/name", "cfg", "validation")
