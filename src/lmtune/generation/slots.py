"""Slots: a preallocated KV cache of `size` rows, each row one sequence at its own length (continuous batching).

    s = slots(decoder, size=16, max_len=2048)
    logits = s.add([[1, 2, 3], [4, 5]], budgets=[64, 8])   # prefill into rows n, n+1 -> (2, vocab)
    logits = s.step(tokens)                                 # one token for each of the s.n rows -> (n, vocab)
    s.remove(row)                                           # the row's slot is free; the last row moves into it

Rows 0..n-1 are the running sequences, so a decode step runs over one contiguous view of the cache and never
gathers. A sequence joins by a prefill of its own (right-padded with the others that join at the same step:
each row's prompt starts at position 0, and causal attention never sees the padding behind it) and leaves
by `remove`, which copies the last row's filled positions into the freed slot. Each row writes its next
key/value at its own position (its length), is masked to its own filled positions and rotated by its own
position, so a row decodes exactly as it would alone. The cache grows in length on demand (doubling, up to
the model's context), never in rows.

On a Llama-family model this is the decoder's own static cache (`lmtune.generation.decoder.LlamaRunner`); any other
causal LM runs its own forward with a `DynamicCache`, rows sharing columns: a joining prefill is left-padded
to the running batch's width, and the attention mask and position ids keep every row's own positions.
"""

from __future__ import annotations

import torch


def slots(decoder, size: int, max_len: int):
    """The slot cache for `decoder` (a generation.decoder.Decoder): static on the fast path, dynamic otherwise."""
    return StaticSlots(decoder.runner, size, max_len) if decoder.fast else DynamicSlots(decoder.runner, size)


class StaticSlots:
    def __init__(self, runner, size: int, max_len: int):
        self.runner, self.size, self.max_len = runner, size, max_len
        # tokens in the cache, per running row: row i holds positions 0..lens[i]-1 and nothing else (a prompt
        # starts at 0 and `remove` copies a row whole), so its mask is just `position < length`
        self.lens: list[int] = []
        self.length = 0  # allocated positions

    @property
    def n(self) -> int:
        return len(self.lens)

    def room(self) -> int:
        return self.size - self.n

    def _ensure(self, need: int) -> None:
        if need <= self.length:
            return
        if need > self.max_len:
            raise ValueError(f"{need} positions asked for; the model has {self.max_len}")
        new = min(max(need, 2 * self.length, 64), self.max_len)
        if self.length:
            self.runner.grow(new)
        else:
            self.runner.reset(self.size, new)
        self.length = new

    def add(self, prompts: list[list[int]], budgets: list[int]):
        """Prefill `prompts` into the next free rows, each with room for its `budgets` more tokens; their
        next-token logits (len(prompts), vocab)."""
        if len(prompts) > self.room():
            raise ValueError(f"{len(prompts)} sequences for {self.room()} free slots")
        self._ensure(max(len(p) + b for p, b in zip(prompts, budgets)))
        n, k, S = self.n, len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((k, S), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
        last = torch.tensor([len(p) - 1 for p in prompts])
        logits = self.runner.forward(ids, torch.arange(S).expand(k, S), causal, torch.arange(S), S,
                                     rows=slice(n, n + k), last=last)
        self.lens += [len(p) for p in prompts]
        return logits

    def step(self, tokens):
        """Feed each running row its next token (n,); the logits after it (n, vocab)."""
        n = self.n
        at = torch.tensor(self.lens)[:, None]  # each row's next slot, which is also its position
        kv_len = max(self.lens) + 1
        mask = torch.arange(kv_len) <= at  # (n, kv_len): its filled positions and the new one
        logits = self.runner.forward(torch.as_tensor(tokens)[:, None], at, mask[:, None, None], at, kv_len,
                                     rows=slice(0, n))
        self.lens = [x + 1 for x in self.lens]
        return logits

    def remove(self, row: int) -> None:
        """Free `row`'s slot: the last running row moves into it (its filled positions only)."""
        last = self.n - 1
        if row != last:
            m, r = self.lens[last], self.runner
            r.k[:, row, :, :m], r.v[:, row, :, :m] = r.k[:, last, :, :m], r.v[:, last, :, :m]
            self.lens[row] = m
        self.lens.pop()


class DynamicSlots:
    def __init__(self, runner, size: int):
        self.model, self.size = runner.model, size
        self.n, self.cache, self.mask, self.pos, self.joinable = 0, None, None, None, True

    def room(self) -> int:
        return self.size - self.n if self.joinable or not self.n else 0

    def _prefill(self, prompts):
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only, as without padding
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()
        return cache, mask, pos[:, -1:], logits

    def add(self, prompts: list[list[int]], budgets: list[int]):
        import torch.nn.functional as F
        from transformers.cache_utils import DynamicLayer

        if len(prompts) > self.room():
            raise ValueError(f"{len(prompts)} sequences for {self.room()} free slots")
        cache, mask, pos, logits = self._prefill(prompts)
        if not self.n:
            self.cache, self.mask, self.pos = cache, mask, pos
        else:  # join: the shorter cache is left-padded with zeros that the attention mask hides
            width = max(self.mask.shape[1], mask.shape[1])
            pad = lambda t: F.pad(t, (0, 0, width - t.shape[-2], 0))  # noqa: E731
            for a, b in zip(self.cache.layers, cache.layers):
                a.keys, a.values = torch.cat([pad(a.keys), pad(b.keys)]), torch.cat([pad(a.values), pad(b.values)])
            self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                                   F.pad(mask, (width - mask.shape[1], 0))])
            self.pos = torch.cat([self.pos, pos])
        self.joinable = all(type(layer) is DynamicLayer for layer in self.cache.layers)  # plain KV tensors only
        self.n += len(prompts)
        return logits

    def step(self, tokens):
        self.mask = torch.cat([self.mask, torch.ones((self.n, 1), dtype=torch.long)], dim=1)
        self.pos = self.pos + 1
        return self.model(input_ids=torch.as_tensor(tokens)[:, None], attention_mask=self.mask, position_ids=self.pos,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()

    def remove(self, row: int) -> None:
        self.n -= 1
        if not self.n:
            self.cache = self.mask = self.pos = None
            return
        index = list(range(self.n + 1))
        index[row] = self.n
        index = torch.tensor(index[:-1])
        self.cache.batch_select_indices(index)
        self.mask, self.pos = self.mask[index], self.pos[index]
