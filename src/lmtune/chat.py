"""`lmtune chat`: a terminal conversation with a model, its reply streamed token by token.

The conversation is rendered with the model's chat template, or lmtune's plain instruct layout when the
tokenizer has none (what `finetune --task instruct` trained on). It works the same when standard input
is a pipe: no prompt is printed, each input line is one user turn, and end of input ends the chat.
Commands: /reset forgets the conversation, /system TEXT sets the system message, /exit quits.
"""

from __future__ import annotations

import sys
import threading

from lmtune import device
from lmtune.config import ChatConfig

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """The prompt's token ids, dropping the oldest turns (never the system message or the newest
    turn) until it fits in `budget` tokens, so a long chat keeps going instead of failing."""
    from lmtune.tasks import instruct

    messages = list(messages)
    while True:
        text = instruct.render(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = 1 if messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return messages, ids[-budget:]
        del messages[first]


def reply(decoder, tokenizer, ids: list[int], cfg: ChatConfig, out, seed: int, eos: list[int]) -> str:
    """Generate the assistant's turn with `lmtune.generation.decoder`, writing each piece of text to `out` as soon as
    it is decoded (the streamer holds back a piece until it is whole text)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    errors = []

    def run():
        try:
            decoder.generate([ids], cfg.max_new_tokens, eos_ids=eos, pad_id=tokenizer.pad_token_id,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed,
                             on_token=streamer.put)
            streamer.end()
        except Exception as e:  # re-raised below, in the main thread
            errors.append(e)
            streamer.end()

    # the worker decodes; this thread's OpenMP team (it loaded the model) would halve its speed: 64 vs 142
    # tok/s for SmolLM2 on 2 cores (lmtune.device.release_cpu_threads)
    device.release_cpu_threads()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    worker.join()
    if errors:
        raise errors[0]
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def chat(cfg: ChatConfig) -> list[dict]:
    import torch

    from lmtune import models
    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import stop_ids

    dev = device.settle(cfg)
    model, tokenizer = models.load_causal_lm(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else None, device=dev)
    model.eval()
    eos = stop_ids(model, tokenizer)
    decoder = Decoder(model)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = max(context - cfg.max_new_tokens, 16)
    interactive = sys.stdin.isatty()
    system = cfg.system
    history: list[dict] = []
    if interactive:
        print(f"chatting with {cfg.model}; {HELP}", file=sys.stderr)
    n_line = 0
    while True:
        n_line += 1
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError as e:
            from lmtune.errors import LmtuneError

            raise LmtuneError(f"standard input: not UTF-8 (line {n_line}, byte {e.start} of that line); "
                              "send UTF-8 text") from None
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip()
            print(f"(system message {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=sys.stderr)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": text}]
        messages, ids = fit_history(tokenizer, messages, budget)
        if interactive:
            sys.stdout.write("bot> ")
        answer = reply(decoder, tokenizer, ids, cfg, sys.stdout, cfg.seed + len(history), eos)
        history = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
    return history
