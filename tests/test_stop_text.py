"""lmtune.generation.sampling.StopText: streamed deltas add up to the whole decode, stop strings cut where the
text is cut, and each token decodes a short window, not the whole answer again."""

from __future__ import annotations

import random

import pytest

from lmtune.generation.sampling import StopText

TEXT = ("Grüße aus Köln 🙂🚀 日本語のテキスト, مرحبا. The model writes plain English too,\n\nand a list:\n- one\n- two\n"
        * 40)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from lmtune import models

    return models.load_tokenizer(smollm2_dir)


def stream(st: StopText, ids: list[int]) -> str:
    out = []
    for t in ids:
        out.append(st.add(t))
        if st.stopped:
            break
    return "".join(out) + st.flush()


def test_deltas_add_up_to_the_whole_decode(tok):
    ids = tok.encode(TEXT)
    noisy = ids[:300] + [random.Random(0).randrange(len(tok)) for _ in range(300)]  # broken bytes, special ids
    for seq in (ids, noisy, ids[:11]):  # 11 ids end inside the rocket's 4 bytes
        assert stream(StopText(tok, []), seq) == tok.decode(seq, skip_special_tokens=True)


def test_stop_strings_cut_at_their_first_occurrence(tok):
    ids = tok.encode(TEXT)
    whole = tok.decode(ids, skip_special_tokens=True)
    for stop in (["🚀"], ["English", "\n\n"], ["- two\nGr"], ["never in the text"]):
        st = StopText(tok, stop)
        cut = min((i for i in (whole.find(s) for s in stop) if i >= 0), default=len(whole))
        assert stream(st, ids) == whole[:cut], stop
        assert st.stopped == (cut < len(whole))


def test_a_long_answer_decodes_short_windows(tok):
    """Decoding the whole answer again at every token grows with its length (0.39 ms a token at 2,048 here)."""
    widest = []
    real = tok.decode

    class Counting:
        def decode(self, ids, **kw):
            widest.append(len(ids))
            return real(ids, **kw)

    ids = tok.encode(TEXT)
    assert len(ids) > 1000
    assert stream(StopText(Counting(), ["\x00"]), ids) == tok.decode(ids, skip_special_tokens=True)
    assert max(widest) <= 8, max(widest)
