"""ORPO, odds-ratio preference optimization (Hong et al. 2024), on preference pairs (tasks/preference.py).

No reference model: the loss is the chosen reply's negative log-likelihood (per token, over the batch's
chosen tokens) plus lambda times -log sigmoid(log odds(chosen) - log odds(rejected)), where a side's
odds are p/(1-p) of its mean token log-prob (as TRL's ORPOTrainer). Rewards are lambda times the mean
log-probs. TRL's NLL also covers the prompt's tokens; this one covers the reply only, as the paper's.
"""

from __future__ import annotations

from lmtune.tasks import preference
from lmtune.tasks.preference import HEAD, METRICS, encode_all  # noqa: F401  (the task interface)

METRIC = "val_loss"
KEYS = ("orpo_lambda",)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(batch: dict, c, r, nc, nr, ref=None):
    """(loss per pair, chosen rewards, rejected rewards); the NLL term is the batch's per-token mean."""
    import torch.nn.functional as F

    lam, w = batch["settings"]["orpo_lambda"], batch["pair_weight"]
    ac, ar = c / nc.clamp(min=1), r / nr.clamp(min=1)
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    nll = -(c * w).sum() / (nc * w).sum().clamp(min=1)
    return nll - lam * F.logsigmoid(log_odds), lam * ac.detach(), lam * ar.detach()


def loss(model, batch: dict):
    """(sum of the pair losses, pairs): one forward of the 2B rows, no reference."""
    c, r, nc, nr = preference.pair_log_probs(model, batch)
    losses, _, _ = pair_losses(batch, c, r, nc, nr)
    return (losses * batch["pair_weight"]).sum(), batch["n_items"]


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    return preference.read(path, cfg, targets)


def load(name: str, cfg, train_rows: list[dict] | None = None):
    return preference.load("orpo", name, {k: getattr(cfg, k) for k in KEYS}, evaluating=train_rows is None)


def check(rows: list[dict], meta: dict, path: str, cfg) -> None:
    for row in rows:
        preference.to_pair(row, path)


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    return encode_all(rows, tokenizer, cfg.max_length, path)


def collate(tokenizer, meta: dict):
    return preference.collate(tokenizer, meta, KEYS)


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    return preference.predict(model, tokenizer, rows, cfg, meta)


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    return preference.evaluate(model, tokenizer, rows, cfg, meta, pair_losses, needs_reference=False)
