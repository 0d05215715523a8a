"""Tasks: one module each, with the same few functions (read rows, load, check, encode, collate, the loss,
predict, evaluate). `get(name)` is the one place a task module is looked up; `Task` says the contract."""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

from lmtune.errors import LmtuneError

NAMES = ("instruct", "classify", "translate", "qa", "lm", "dpo", "orpo")


class Task(Protocol):
    """What every module in NAMES has; a verb calls these and nothing else of a task (finetune also calls
    `add_reference` and `check_settings` where the preference tasks have them). `cfg` is the verb's config."""

    METRIC: str                # the validation metric that picks DIR/best ("val_loss": the loss)
    METRICS: tuple[str, ...]   # what `evaluate` reports besides the loss

    def read(self, path: str, cfg, targets: bool = True) -> list[dict]:
        """Rows of a data file (targets=False: inputs only, for predict), errors with file:line."""

    def load(self, name: str, cfg, train_rows: list[dict] | None = None) -> tuple:
        """(model with the task's head, tokenizer, meta): meta is what lmtune.json records (labels, ...)."""

    def check(self, rows: list[dict], meta: dict, path: str, cfg) -> None:
        """Refuse rows this model cannot take (an unknown label), before anything runs."""

    def encode(self, rows: list[dict], tokenizer, cfg, meta: dict, path: str) -> list[dict]:
        """Rows -> training examples (input_ids, labels, ...)."""

    def collate(self, tokenizer, meta: dict) -> Callable[[list[dict]], dict]:
        """The function that turns a list of examples into a batch of tensors."""

    def loss(self, model, batch: dict) -> tuple:
        """(summed loss, number of items it sums over) of one batch: the loop divides by the step's total."""

    def predict(self, model, tokenizer, rows: list[dict], cfg, meta: dict) -> list[dict]:
        """One output dict per row (label, translation, answer, response, ...)."""

    def evaluate(self, model, tokenizer, rows: list[dict], cfg, meta: dict) -> dict:
        """Metrics over the rows (METRICS, and the loss where the task has one)."""


def get(name: str) -> Task:
    """The module of task `name` (imported on first use: tasks pull in torch and transformers)."""
    if name not in NAMES:
        raise LmtuneError(f"unknown task '{name}': the tasks are {', '.join(NAMES)}")
    return importlib.import_module(f"lmtune.tasks.{name}")
