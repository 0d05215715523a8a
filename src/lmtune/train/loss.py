"""The causal-LM loss, computed only where there is a target and in chunks.

The full logits tensor (batch x length x vocabulary: 49,152 entries per position for SmolLM2) is the
largest activation of a small model. We run the decoder, keep the hidden states of the positions that
have a target, and apply the output layer and cross-entropy a chunk at a time; each chunk is recomputed
in backward (activation checkpointing), so at most one chunk of logits is alive at once.

When the whole logits tensor is small (a small vocabulary, as in pretraining with our 4,096-token BPE)
the chunks only cost time: the output layer and cross-entropy then run once over every position, with
no gather of target positions, which also lets torch.compile (--compile) see one static graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmtune.data.batching import IGNORE

CHUNK = 256  # target positions per chunk of logits
SMALL_LOGITS = 2**25  # logits entries (128 MB in fp32) below which the loss is computed in one piece


def _parts(model):
    """(decoder, output layer) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _chunk_loss(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _frozen_head_cast(head):
    """Under autocast, a frozen output layer as the autocast-dtype layer autocast would make at each chunk.

    Autocast caches the casts of trainable weights only: a frozen one (the output layer of a LoRA run,
    tied to the embeddings, 49,152 x 576 for SmolLM2) would be cast again for every chunk, in forward and
    in backward's recompute, each time a fresh 56 MB copy. Cast once per batch here, to the same values."""
    kind = head.weight.device.type
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad
            or not torch.is_autocast_enabled(kind) or head.weight.dtype != torch.float32):
        return head
    return functools.partial(F.linear, weight=head.weight.to(torch.get_autocast_dtype(kind)))


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens) for one batch."""
    decoder, head = _parts(model)
    extra = {k: batch[k] for k in ("position_ids",) if k in batch}
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # right padding: a causal token only sees earlier positions, which are all real, so the mask
        # changes nothing a loss reads (padding rows' outputs carry no target). Without it attention
        # takes SDPA's causal kernel, ~10% faster on the CPU for SmolLM2, with bit-identical outputs.
        mask = None
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **extra).last_hidden_state
    targets = batch["labels"][:, 1:]
    if targets.numel() * head.weight.shape[0] <= SMALL_LOGITS:  # one piece: no gather, no recompute
        h = hidden[:, :-1]
        if torch.is_autocast_enabled(h.device.type):
            # as one (rows x hidden) matrix: this 3-d slice is not contiguous, and when it is bf16 already
            # (the final norm's output, cast once by train.memory) no cast makes it so; the linear then runs
            # as a batched matmul against the weight copied per row, a (batch x hidden x vocabulary) tensor:
            # 350 ms a batch for SmolLM2 at batch 4. (In fp32 the 3-d call measured a little faster.)
            h = h.reshape(-1, h.shape[-1])
        logits = _frozen_head_cast(head)(h).float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.flatten(), ignore_index=IGNORE,
                                reduction="sum")
        return total, int((targets != IGNORE).sum())
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = _frozen_head_cast(head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), CHUNK):
        h, t = hidden[i:i + CHUNK], targets[i:i + CHUNK]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total, int(targets.numel())


def _token_log_probs(head, hidden, targets):
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each row's target-token log-probabilities, number of its target tokens), from one forward of
    all rows (a preference batch: chosen and rejected rows together). As in `causal_lm_loss` only target
    positions meet the output layer, a chunk at a time, recomputed in backward; padding is masked by
    position (its labels are -100), so right padding needs no attention mask."""
    decoder, head = _parts(model)
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        mask = None  # right padding: see causal_lm_loss
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]  # the row of each target position, in the order [keep] lists them
    small = int(keep.sum()) * head.weight.shape[0] <= SMALL_LOGITS  # one piece: no recompute
    hidden, targets, head = hidden[:, :-1][keep], targets[keep], _frozen_head_cast(head)
    step, parts = (targets.numel() if small else CHUNK), []
    for i in range(0, targets.numel(), max(step, 1)):
        h, t = hidden[i:i + step], targets[i:i + step]
        parts.append(checkpoint(_token_log_probs, head, h, t, use_reentrant=False)
                     if torch.is_grad_enabled() and not small else _token_log_probs(head, h, t))
    logp = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=logp.device).index_add(0, rows, logp)
    return sums, keep.sum(1)
