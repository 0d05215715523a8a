"""Continuous batching for serving: concurrent requests share one decoder step, each in its own cache slot.

One worker thread owns the decoder (`lmtune.generation.decoder.Decoder`, the one `lmtune generate` uses) and a
preallocated slot cache (`lmtune.generation.slots`) of `max_batch` rows. Each step it admits the requests
that arrived since the last one (a prefill of their own into free slots), picks every running row's next
token with that request's own sampling settings (`lmtune.generation.sampling.pick_each`), hands it to the
request's `emit` callback at once (streaming), frees the slot of every row that ended (a stop token, its
max_tokens, or cancelled because its client went away or a stop string was seen), and runs one forward
step for the rows left. Nothing waits for a batch to drain and nothing restarts: a row joins at the next
step and leaves when it stops. A forward step over 16 rows costs far less than 16 steps over one row,
which is where the throughput comes from.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lmtune.generation.sampling import Sampling, logprobs, pick_each


@dataclass
class GenRequest:
    ids: list[int]                      # prompt token ids
    max_tokens: int
    emit: Callable                      # emit(token_id, None[, logprob]) per token, emit(None, finish_reason) once
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False              # emit each token's log-probability as a third argument
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    count: int = 0                      # tokens generated so far
    generator: object = None            # torch.Generator, made on admission (per request: reproducible)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


class Batcher:
    def __init__(self, decoder, eos_ids, max_batch: int = 16, wait_ms: float = 0.0, lock=None, max_len: int = 2048):
        from lmtune.generation.slots import slots

        self.decoder, self.eos = decoder, set(eos_ids)
        self.max_batch, self.wait, self.max_len = max_batch, wait_ms / 1000, max_len
        self.lock = lock or threading.Lock()  # shared with anything else that runs the model
        self.queue: queue.Queue = queue.Queue()
        self.new_slots = lambda: slots(decoder, max_batch, max_len)  # noqa: E731
        self.slots = self.new_slots()
        self.active: list[GenRequest] = []  # the running rows, row i in slot i
        self.stats = {"running": 0, "batches": 0, "joined": 0, "cancelled": 0, "generated_tokens": 0,
                      "largest_batch": 0, "free_slots": max_batch}
        # From here on the worker thread runs the model: the caller's own OpenMP team (it loaded the model
        # and measured the kernels) would otherwise keep the runtime over its thread count, which halves
        # the decoder's speed (lmtune.device.release_cpu_threads)
        from lmtune.device import release_cpu_threads

        release_cpu_threads()
        self.thread = threading.Thread(target=self._run, name="lmtune-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        self.queue.put(req)

    def _arrivals(self, room: int, wait: bool) -> list[GenRequest]:
        """Requests waiting now (up to `room`); with `wait`, block for one and take what else arrives within
        `wait_ms`, so that a burst of requests starts in one step."""
        got = []
        if wait:
            got.append(self.queue.get())
            deadline = time.monotonic() + self.wait
            while len(got) < room:
                try:
                    got.append(self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
                except queue.Empty:
                    break
        while len(got) < room:
            try:
                got.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return [r for r in got if not r.cancelled.is_set()]

    def _run(self) -> None:
        import torch

        logits = None
        while True:
            idle = not self.active
            room = self.slots.room()
            new = self._arrivals(room, wait=idle) if room else []
            if idle and not new:
                continue
            self.stats["batches"] += idle
            self.stats["joined"] += 0 if idle else len(new)
            try:
                with self.lock, torch.inference_mode():
                    logits = self._step(logits, new)
            except Exception as e:  # a failed step must not take the server down: its requests end in error
                for r in self.active + new:
                    if not r.done:
                        self._finish(r, f"error: {type(e).__name__}: {e}")
                self.active, self.slots, logits = [], self.new_slots(), None
            self.stats["running"] = len(self.active)
            self.stats["free_slots"] = self.max_batch - len(self.active)

    def _step(self, logits, new: list[GenRequest]):
        """Admit `new`, pick every row's token from `logits`, drop the rows that ended, and run one step;
        the next logits (None when no row is left)."""
        import torch

        if new:
            for r in new:
                r.generator = r.sampling.generator() if r.temperature > 0 else None
            first = self.slots.add([r.ids for r in new], [r.max_tokens for r in new])
            logits = first if logits is None else torch.cat([logits, first])
            self.active += new
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.active))
        rows = self.active
        tokens = pick_each(logits, [r.sampling for r in rows], [r.generator for r in rows])
        lps = logprobs(logits, tokens).tolist() if any(r.logprobs for r in rows) else None
        tokens = tokens.tolist()
        for i in reversed(range(len(rows))):  # backwards: a freed slot takes the last row, already handled
            r, t = rows[i], tokens[i]
            cancelled = r.cancelled.is_set()
            if cancelled:  # client gone (or a stop string seen): stop spending steps on it
                r.done = True
            elif t in self.eos:
                self._finish(r, "stop")
            else:
                r.emit(t, None, lps[i]) if r.logprobs else r.emit(t, None)
                r.count += 1
                self.stats["generated_tokens"] += 1
                if r.count >= r.max_tokens:
                    self._finish(r, "length")
            if r.done:
                self.slots.remove(i)
                rows[i], tokens[i] = rows[-1], tokens[-1]
                rows.pop()
                tokens.pop()
                self.stats["cancelled"] += cancelled  # counted once its slot is free (what /health shows)
        return self.slots.step(tokens) if rows else None

    def _finish(self, r: GenRequest, reason: str) -> None:
        r.done = True
        r.emit(None, reason)
