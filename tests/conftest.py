"""Shared test fixtures: small real models and data, built once per session, no network.

The whole session runs with its own lmtune cache (`LMTUNE_CACHE`, a temporary folder made in
`pytest_configure`, before any test module is imported, and inherited by every `python -m lmtune` subprocess,
also those started with an environment a module copied at import time; removed at the end), so a user's converted models,
kernels and machine rates never reach the tests, and the tests never write into the user's cache. The
real `~/.cache/lmtune` is compared before and after the session: anything new there fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _tiny_models import SHARED  # the one place that finds ../shared/data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

# The user's real cache, as lmtune would find it without LMTUNE_CACHE (read only by the guard below).
USER_CACHE = Path(os.path.expanduser("~")) / ".cache" / "lmtune"


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def pytest_configure(config):
    """Before any test module is imported (some copy os.environ at import time for their subprocesses), the
    session gets its own lmtune cache, and the user's real one is listed for the check at the end."""
    config.stash[_USER_CACHE_BEFORE] = _listing(USER_CACHE)
    cache = Path(tempfile.mkdtemp(prefix="lmtune-test-cache-"))
    config.stash[_SESSION_CACHE] = cache
    os.environ["LMTUNE_CACHE"] = str(cache)


def pytest_sessionfinish(session, exitstatus):
    cache = session.config.stash.get(_SESSION_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    new = sorted(_listing(USER_CACHE) - session.config.stash.get(_USER_CACHE_BEFORE, set()))
    if new:
        print(f"\nerror: the test session wrote into the user's lmtune cache {USER_CACHE}: "
              f"{', '.join(new[:5])}{' ...' if len(new) > 5 else ''}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_USER_CACHE_BEFORE = pytest.StashKey[set]()
_SESSION_CACHE = pytest.StashKey[Path]()


@pytest.fixture(autouse=True)
def torch_threads():
    """A verb run in-process with --threads N sets torch's thread count for the whole process: give it back
    after each test, so one test's --threads 1 does not make every later test single-threaded."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def session_cache(pytestconfig) -> Path:
    """This session's own lmtune cache (made in pytest_configure); the tests share it (SmolLM2's GGUF is
    converted once into it)."""
    return pytestconfig.stash[_SESSION_CACHE]


def run_cli(*args, timeout=600, env=None):
    """Run `python -m lmtune ARGS` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "lmtune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a cached safetensors folder (converted from its GGUF once)."""
    from lmtune import models

    return models.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: fast, and as real as the big one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_chat")
    tok = load_tokenizer(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def dates_jsonl(tmp_path_factory) -> str:
    """64 records of lmtune's built-in dates task as Alpaca JSONL."""
    from lmtune.data.synthetic import date_records

    p = tmp_path_factory.mktemp("data") / "dates.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in date_records(64, seed=0)))
    return str(p)


@pytest.fixture(scope="session")
def shakespeare_small(tmp_path_factory) -> str:
    """The first 60,000 characters of tinyshakespeare (a learnable toy corpus)."""
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    p = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    p.write_text(text)
    return str(p)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
