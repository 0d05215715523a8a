"""`lmtune generate`: continue a prompt, greedily or by sampling, with any causal LM lmtune can load."""

from __future__ import annotations

import sys

from lmtune.config import GenerateConfig


def format_prompt(tokenizer, meta: dict, prompt: str, template: str) -> str:
    """The prompt as the model saw prompts in training: its chat template, lmtune's instruct layout
    for an instruct fine-tune without one, or the raw text."""
    from lmtune.tasks import instruct

    if template == "raw":
        return prompt
    if template == "chat" or tokenizer.chat_template or meta.get("task") == "instruct":
        return instruct.prompt_text(tokenizer, prompt)
    return prompt


def generate(cfg: GenerateConfig) -> str:
    import torch

    from lmtune import device, models
    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import stop_ids

    dev = device.settle(cfg)
    model, tokenizer = models.load_causal_lm(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else None, device=dev)
    meta = models.read_lmtune_file(models.resolve(cfg.model))
    text = format_prompt(tokenizer, meta, cfg.prompt, cfg.template)
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    decoder = Decoder(model, compile=cfg.compile, quantize=cfg.quantize)
    out = decoder.generate([ids], cfg.max_new_tokens, eos_ids=stop_ids(model, tokenizer),
                           pad_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, seed=cfg.seed)
    completion = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    print(completion)
    sys.stdout.flush()
    return completion
