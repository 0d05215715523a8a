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
    if verb == "sweep":  # its train: settings, space and metric, as the sweep checks them before any trial
        from lmtune.sweep import check_sweep

        base, space, metric, _ = check_sweep(cfg)
        assert space and metric.startswith("val_") and base.data == cfg.train["data"]


def test_there_are_configs():
    assert len(CONFIGS) >= 2
