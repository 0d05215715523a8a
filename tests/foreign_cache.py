"""Put another model's conversion into the user's lmtune cache, as a user of lmtune's GGUF loading would have.

CI runs this (`.ci/run`) before the suite, with a fresh HOME, so that every run checks that the tests
neither read nor depend on the user's cache: a random 2-layer Llama with its own small byte-level BPE
tokenizer and no chat template is exported with `lmtune export --format gguf` and then loaded by
`lmtune generate`, which converts it into `~/.cache/lmtune/gguf/<name>-<hash>/`.

    python tests/foreign_cache.py [WORK_DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEXT = "The quick brown fox jumps over the lazy dog. Hello there, how are you today? " * 20


def main(work: Path) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, gguf = work / "foreign", work / "foreign.gguf"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    env = {k: v for k, v in os.environ.items() if k != "LMTUNE_CACHE"}  # the user's default cache
    run = [sys.executable, "-m", "lmtune"]
    subprocess.run([*run, "export", "--model", model_dir, "--format", "gguf", "--out", gguf], check=True, env=env)
    subprocess.run([*run, "generate", "--model", gguf, "--prompt", "Hello", "--max-new-tokens", "4"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    cache = Path(os.path.expanduser("~")) / ".cache" / "lmtune" / "gguf"
    found = sorted(cache.glob("foreign-*/tokenizer.json"))
    assert found, f"no conversion of the foreign model appeared under {cache}"
    print(f"foreign conversion in the user's cache: {found[0].parent}")
    return found[0].parent


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lmtune-foreign-")))
