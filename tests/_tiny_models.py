"""Tiny, randomly initialised models saved to a folder, for fast round trips of the task tests.

A 2-layer Llama (decoder) and a 1-layer BART (encoder-decoder), both with the GPT-2 tokenizer from
../shared/data; seeded, so the same folder holds the same weights on every run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data() -> Path:
    """The data sets: $LMTUNE_SHARED_DATA, else ../shared/data next to this checkout, else, for a clone of a
    local checkout (`git clone . /tmp/fresh`), ../shared/data next to the checkout it was cloned from."""
    root = Path(__file__).resolve().parents[1]
    here = root.parent / "shared" / "data"
    candidates = [os.environ.get("LMTUNE_SHARED_DATA"), here]
    try:
        origin = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        origin = ""
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), here)


SHARED = shared_data()


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(SHARED / "gpt2_tokenizer"))
    tok.pad_token = tok.eos_token
    return tok


def tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_bart(folder: Path) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_cli(argv: list[str]) -> int:
    """lmtune's main() in this process; the exit code (0 when it returns)."""
    from lmtune.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0
