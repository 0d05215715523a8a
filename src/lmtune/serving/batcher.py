"""Batched generation for serving: concurrent requests share one forward pass per step.

One worker thread owns the model. It waits for a request, gathers whatever else arrives within
`wait_ms` (up to `max_batch`), left-pads the prompts into one batch and runs its own decode loop: one
forward pass per step for the whole batch, with a KV cache. A forward pass over 8 rows costs far less
than 8 passes over one row, which is where the throughput comes from. Batching is continuous: a row
leaves the batch as soon as it ends (end-of-sequence token, its max_tokens, or cancelled because its
client went away), and requests that arrive meanwhile are prefilled and join the running batch at the
next step instead of waiting for it to drain. Tokens go to each request's `emit` callback the moment
they are chosen, which is what streaming sends.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class GenRequest:
    ids: list[int]                      # prompt token ids
    max_tokens: int
    emit: Callable                      # emit(token_id, None) per token, emit(None, finish_reason) once
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    count: int = 0                      # tokens generated so far
    generator: object = None            # torch.Generator, made on first use (per request: reproducible)


class Batcher:
    def __init__(self, model, eos_ids, pad_id: int, max_batch: int = 16, wait_ms: float = 5.0, lock=None):
        self.model, self.eos, self.pad_id = model, set(eos_ids), pad_id
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.lock = lock or threading.Lock()  # shared with anything else that runs the model
        self.queue: queue.Queue = queue.Queue()
        self.active: list[GenRequest] = []
        self.stats = {"running": 0, "batches": 0, "joined": 0, "cancelled": 0, "generated_tokens": 0,
                      "largest_batch": 0}
        self.thread = threading.Thread(target=self._run, name="lmtune-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        self.queue.put(req)

    def _next_batch(self) -> list[GenRequest]:
        batch = [self.queue.get()]
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
            except queue.Empty:
                break
        return [r for r in batch if not r.cancelled.is_set()]

    def _run(self) -> None:
        import torch

        while True:
            batch = self._next_batch()
            if not batch:
                continue
            self.active = batch  # rows that join later are appended, so an error reaches them too
            self.stats["running"] = len(batch)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            try:
                with self.lock, torch.inference_mode():
                    self._generate(batch)
            except Exception as e:  # a failed batch must not take the server down: its requests end in error
                for r in self.active:
                    if not r.done:
                        self._finish(r, f"error: {type(e).__name__}: {e}")
            self.stats["running"] = 0

    def _finish(self, r: GenRequest, reason: str) -> None:
        r.done = True
        r.emit(None, reason)

    def _prefill(self, rows: list[GenRequest]):
        """Run the prompts of `rows` as one left-padded batch: (cache, mask, last positions, logits)."""
        import torch
        from transformers import DynamicCache

        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions count real tokens only, as without padding
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True).logits[:, -1].float().cpu()  # picked per row on the CPU
        return cache, mask, pos[:, -1:], logits

    def _join(self, cache, mask, new_cache, new_mask):
        """Continuous batching: append freshly prefilled rows to the running batch. The shorter of the
        two KV caches is left-padded with zeros that the attention mask hides, so every row keeps its
        own positions and the merged batch decodes as one."""
        import torch
        import torch.nn.functional as F

        width = max(mask.shape[1], new_mask.shape[1])
        for a, b in zip(cache.layers, new_cache.layers):
            a.keys = torch.cat([F.pad(a.keys, (0, 0, width - a.keys.shape[-2], 0)),
                                F.pad(b.keys, (0, 0, width - b.keys.shape[-2], 0))])
            a.values = torch.cat([F.pad(a.values, (0, 0, width - a.values.shape[-2], 0)),
                                  F.pad(b.values, (0, 0, width - b.values.shape[-2], 0))])
        return torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])

    def _waiting(self, room: int) -> list[GenRequest]:
        joiners = []
        while len(joiners) < room:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                break
            if not r.cancelled.is_set():
                joiners.append(r)
        return joiners

    def _generate(self, rows: list[GenRequest]) -> None:
        import torch
        from transformers.cache_utils import DynamicLayer

        cache, mask, pos, logits = self._prefill(rows)
        can_join = all(type(layer) is DynamicLayer for layer in cache.layers)  # plain KV tensors only
        while True:
            tokens, keep = [], []
            for i, r in enumerate(rows):
                if r.cancelled.is_set():  # client gone (or a stop string seen): stop spending steps on it
                    r.done = True
                    self.stats["cancelled"] += 1
                    continue
                t = self._pick(r, logits[i])
                if t in self.eos:
                    self._finish(r, "stop")
                    continue
                r.emit(t, None)
                r.count += 1
                self.stats["generated_tokens"] += 1
                if r.count >= r.max_tokens:
                    self._finish(r, "length")
                    continue
                tokens.append(t)
                keep.append(i)
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows from the batch and from the KV cache
                index = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(index)
                mask, pos, rows = mask[index], pos[index], [rows[i] for i in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=mask.device)], dim=1)
            pos = pos + 1
            logits = self.model(input_ids=torch.tensor(tokens, device=mask.device).unsqueeze(1), attention_mask=mask,
                                position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1].float().cpu()
            joiners = self._waiting(self.max_batch - len(rows)) if can_join else []
            if joiners:
                new_cache, new_mask, new_pos, new_logits = self._prefill(joiners)
                mask = self._join(cache, mask, new_cache, new_mask)
                pos, logits, rows = torch.cat([pos, new_pos]), torch.cat([logits, new_logits]), rows + joiners
                self.stats["joined"] += len(joiners)
                self.active += joiners
            self.stats["running"] = len(rows)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))

    @staticmethod
    def _pick(r: GenRequest, logits) -> int:
        """Greedy, or sampled with temperature, top-k and top-p, from this request's own generator."""
        import torch

        if r.temperature <= 0:
            return int(logits.argmax())
        if r.generator is None:
            r.generator = torch.Generator()
            r.generator.manual_seed(r.seed if r.seed is not None else torch.seed())
        probs = torch.softmax(logits / r.temperature, dim=-1)
        if r.top_k:
            kth = torch.topk(probs, min(r.top_k, probs.numel())).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)
        if r.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            outside = sorted_p.cumsum(0) - sorted_p > r.top_p  # keep the smallest set reaching top_p
            probs[order[outside]] = 0.0
        return int(torch.multinomial(probs, 1, generator=r.generator))
