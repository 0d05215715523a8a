"""Tokenizers for pretraining: byte-level BPE or characters trained on a text sample, or a tokenizer folder
loaded as a fast tokenizer, and the check that a tokenizer turns text into tokens at all."""

from __future__ import annotations

from pathlib import Path

from lmtune.errors import LmtuneError

SPECIAL = "<|endoftext|>"


def train_tokenizer(text, kind: str, vocab_size: int):
    """A PreTrainedTokenizerFast: byte-level BPE trained on `text` (a string, or for BPE an iterable of lines),
    characters, or loaded from a path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text.splitlines(keepends=True) if isinstance(text, str) else text, trainer=trainer)
    elif kind == "char":
        chars = sorted(set(text))
        vocab = {SPECIAL: 0, **{c: i + 1 for i, c in enumerate(chars)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        return load_tokenizer_path(kind)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=SPECIAL)


def load_tokenizer_path(path: str):
    """A tokenizer folder (tokenizer.json, or a GPT-2 style vocab.json + merges.txt) as a fast tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    try:
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file() and not (p / "tokenizer.json").is_file():
            # GPT2TokenizerFast(vocab_file=...) gives a tokenizer of length 1 under transformers 5 that
            # encodes everything to nothing; the tokenizers library reads the pair as what it is
            from tokenizers import ByteLevelBPETokenizer

            bpe = ByteLevelBPETokenizer(str(p / "vocab.json"), str(p / "merges.txt"))
            special = SPECIAL if bpe.token_to_id(SPECIAL) is not None else None
            tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=special, eos_token=special,
                                          unk_token=special, pad_token=special)
        elif p.exists():
            tok = AutoTokenizer.from_pretrained(str(p))
        else:
            raise OSError("not found")
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a damaged tokenizer.json
        raise LmtuneError(f"--tokenizer {path}: not 'bpe', 'char' or a tokenizer folder "
                          f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_encodes(tok, "The quick brown fox jumps over the lazy dog.", f"--tokenizer {path}")
    return tok


def check_encodes(tokenizer, sample: str, what: str) -> None:
    """A tokenizer that turns non-empty text into no tokens at all is broken, not a short corpus."""
    sample = sample[:2000]
    if sample.strip() and not tokenizer(sample, add_special_tokens=False)["input_ids"]:
        raise LmtuneError(f"{what}: the tokenizer (vocabulary {len(tokenizer)}) encodes the text {sample[:30]!r} to "
                          "no tokens at all: give a folder with tokenizer.json, or vocab.json + merges.txt")
