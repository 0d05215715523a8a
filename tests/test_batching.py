"""Packing: the same per-token loss as padded batches (attention stays inside each packed example)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmtune.data.batching import IGNORE, collate, count_targets, pack
from lmtune.train.loss import causal_lm_loss


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2)).eval()


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((5, 2), (9, 4), (7, 0), (12, 6), (4, 1)):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_packed_loss_equals_padded_loss():
    model, ex = _model(), _examples()
    padded = collate(ex, pad_id=0)
    blocks = pack(ex, max_length=16)
    assert len(blocks) == 3 and all(len(b["input_ids"]) <= 16 for b in blocks)
    packed = collate(blocks, pad_id=0)
    s1, n1 = causal_lm_loss(model, padded)
    s2, n2 = causal_lm_loss(model, packed)
    assert n1 == n2 == count_targets(padded) == count_targets(packed)
    assert abs(float(s1 / n1) - float(s2 / n2)) < 1e-4
    assert packed["n_tokens"] == padded["n_tokens"] == sum(len(e["input_ids"]) for e in ex)

    # the check can fail: without restarting position ids the examples attend across each other
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).repeat(3, 1))
    s3, _ = causal_lm_loss(model, leaky)
    assert abs(float(s3 / n2) - float(s1 / n1)) > 1e-3


def test_padding_is_masked_by_position_not_by_id():
    ex = [{"input_ids": [5, 7, 0], "labels": [5, 7, 0]}, {"input_ids": [9], "labels": [9]}]
    b = collate(ex, pad_id=0)  # token 0 is both a real token (row 0) and the pad id
    assert b["labels"].tolist() == [[5, 7, 0], [9, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouping_cuts_padding_and_keeps_every_row_once():
    """Grouped batches hold rows of similar length (far less padding than random batches), every row
    comes once per epoch, and the order is a pure function of the seed (so --resume finds its place)."""
    import random

    from lmtune.train.loop import micro_batch

    rng = random.Random(1)
    lengths = tuple(rng.randint(5, 500) for _ in range(1000))
    bs, per_epoch = 8, 125

    def padded(grouped):
        batches = [micro_batch(1000, bs, 0, i, lengths if grouped else None) for i in range(per_epoch)]
        return batches, sum(len(b) * max(lengths[j] for j in b) for b in batches)

    grouped, pad_grouped = padded(True)
    plain, pad_plain = padded(False)
    assert sorted(j for b in grouped for j in b) == list(range(1000))
    assert pad_grouped < 0.7 * pad_plain  # padded tokens: real tokens are ~ 0.5 x the random batches' cost
    assert pad_grouped < 1.1 * sum(lengths)
    assert grouped == [micro_batch(1000, bs, 0, i, lengths) for i in range(per_epoch)]
    assert grouped != [micro_batch(1000, bs, 1, i, lengths) for i in range(per_epoch)]  # the seed matters


def test_block_order_is_the_one_runs_were_started_with():
    """The ungrouped order (pretraining's blocks) is pinned to numpy's rng.permutation of the step's seed:
    a run resumed after an upgrade (or on another rank count) must find the same blocks at the same step."""
    import numpy as np

    from lmtune.train.loop import micro_batch

    for n, bs, seed in ((1000, 8, 0), (95_616, 8, 1), (7, 3, 5)):
        per_epoch = -(-n // bs)
        for index in (0, 1, per_epoch - 1, per_epoch, 3 * per_epoch + 2):
            epoch, i = divmod(index, per_epoch)
            expect = np.random.default_rng(seed * 1_000_003 + epoch).permutation(n)[i * bs:(i + 1) * bs].tolist()
            assert micro_batch(n, bs, seed, index) == expect, (n, seed, index)
