"""Every shipped YAML config loads into its verb's typed config (no stale or misspelt keys)."""

from pathlib import Path

import pytest

from lmtune import cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    verb = next((v for v in ("pretrain", "sweep") if v in path.parts), "finetune")
    cfg = cli.parse(verb, ["--config", str(path)])
    assert cfg.out and (cfg.train["data"] if verb == "sweep" else cfg.data)


def test_there_are_configs():
    assert len(CONFIGS) >= 2
