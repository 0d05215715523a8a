"""`lmtune serve`: load the model, start the OpenAI-compatible API (`lmtune.serving.api`, which lists its
routes) on uvicorn. A classify/translate/qa fine-tune is loaded by its task module and serves its task route."""

from __future__ import annotations

import os
import sys

from lmtune import tasks
from lmtune.config import ServeConfig
from lmtune.errors import LmtuneError
from lmtune.serving.api import TASK_ROUTES, create_app, make_state


def load_model(cfg: ServeConfig):
    """(model, tokenizer, meta): a classify/translate/qa fine-tune through its task's loader (which
    knows its head and labels), anything else as a causal LM."""
    import torch

    from lmtune import device, models
    from lmtune.config import PredictConfig

    dev = device.settle(cfg)
    meta = models.read_lmtune_file(models.resolve(cfg.model))
    task = meta.get("task")
    if task in TASK_ROUTES.values():
        module = tasks.get(task)
        model, tokenizer, task_meta = module.load(cfg.model, PredictConfig(model=cfg.model, task=task))
        return model.to(dev), tokenizer, {**meta, **task_meta}
    model, tokenizer = models.load_causal_lm(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else None, device=dev)
    return model, tokenizer, meta


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise LmtuneError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None


def serve(cfg: ServeConfig) -> None:
    import torch
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    api_key = cfg.api_key or os.environ.get("LMTUNE_API_KEY", "")
    _check_port(cfg.host, cfg.port)
    model, tokenizer, meta = load_model(cfg)
    state = make_state(model, tokenizer, cfg, meta)
    app = create_app(state, api_key)
    print(f"serving '{state.name}' at http://{cfg.host}:{cfg.port}/v1 "
          f"({'API key required' if api_key else 'no API key'}); schema at /openapi.json, docs at /docs",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")

