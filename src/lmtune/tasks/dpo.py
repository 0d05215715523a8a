"""Direct Preference Optimization (Rafailov et al. 2023) on preference pairs (see tasks/preference.py).

The policy's log-ratio against a reference, chosen minus rejected, is pushed up:
  sigmoid: -(1-e) log sigmoid(beta d) - e log sigmoid(-beta d), d = (pc - rc) - (pr - rr), sums over the
           reply tokens; e is --label-smoothing (conservative DPO; e = 0 is TRL's DPOTrainer 'sigmoid')
  ipo:     ((pc - rc)/nc - (pr - rr)/nr - 1/(2 beta))^2, per-token means, as TRL 1.16's 'ipo'.
Rewards are beta (p - r) per side. The reference costs no second model: with LoRA it is the base with
the adapter off (in the loss, no gradient); for a full fine-tune its log-probs are computed once before
training (`add_reference`) and travel with the encoded pairs.
"""

from __future__ import annotations

from lmtune.errors import LmtuneError
from lmtune.tasks import preference
from lmtune.tasks.preference import HEAD, METRICS, encode_all  # noqa: F401  (the task interface)

METRIC = "val_loss"
KEYS = ("beta", "dpo_loss", "label_smoothing")


def pair_losses(batch: dict, c, r, nc, nr, ref):
    """(loss per pair, chosen rewards, rejected rewards)."""
    import torch.nn.functional as F

    s = batch["settings"]
    beta, (rc, rr) = s["beta"], ref
    chosen, rejected = c - rc, r - rr
    if s["dpo_loss"] == "ipo":
        d = chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        d, e = chosen - rejected, s["label_smoothing"]
        losses = -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def loss(model, batch: dict):
    """(sum of the pair losses, pairs): one forward of the 2B rows, the reference's without gradient."""
    c, r, nc, nr = preference.pair_log_probs(model, batch)
    losses, _, _ = pair_losses(batch, c, r, nc, nr, preference.reference_log_probs(model, batch))
    return (losses * batch["pair_weight"]).sum(), batch["n_items"]


def check_settings(cfg) -> None:
    if cfg.beta <= 0:
        raise LmtuneError(f"--beta must be > 0, got {cfg.beta}")
    if cfg.label_smoothing and cfg.dpo_loss != "sigmoid":
        raise LmtuneError(f"--label-smoothing applies to --dpo-loss sigmoid, not {cfg.dpo_loss}")


def read(path: str, cfg, targets: bool = True) -> list[dict]:
    check_settings(cfg)
    return preference.read(path, cfg, targets)


def load(name: str, cfg, train_rows: list[dict] | None = None):
    return preference.load("dpo", name, {k: getattr(cfg, k) for k in KEYS}, evaluating=train_rows is None)


def check(rows: list[dict], meta: dict, path: str, cfg) -> None:
    for row in rows:
        preference.to_pair(row, path)


def encode(rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
    return encode_all(rows, tokenizer, cfg.max_length, path)


def add_reference(model, tokenizer, rows: list[dict], cfg, meta: dict, path: str) -> None:
    """Before a full fine-tune: the model as loaded is the reference; its log-probs, once, with the rows."""
    preference.add_reference(model, tokenizer, rows, cfg, path)


def collate(tokenizer, meta: dict):
    return preference.collate(tokenizer, meta, KEYS)


def predict(model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
    return preference.predict(model, tokenizer, rows, cfg, meta)


def evaluate(model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
    return preference.evaluate(model, tokenizer, rows, cfg, meta, pair_losses, needs_reference=True)
