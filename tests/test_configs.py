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


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [p for p in CONFIGS if "pretrain" not in p.parts], ids=lambda p: p.name)
def test_a_recipe_reads_the_data_it_names(path, monkeypatch):
    """Every record of a fine-tuning recipe's data (and eval data), a sweep's included, passes its task's
    reader: the Alpaca file's two empty answers once refused the whole file, so the SmolLM2 recipe failed
    on the very data it names while its YAML still parsed."""
    from lmtune import tasks

    monkeypatch.chdir(ROOT)  # recipes name ../shared/data relative to the checkout
    cfg = cli.parse("sweep" if "sweep" in path.parts else "finetune", ["--config", str(path)])
    if "sweep" in path.parts:
        if cfg.verb != "finetune":
            pytest.skip("a pretraining sweep: its text is read by pretrain's token shards, not a task reader")
        from lmtune.sweep import check_sweep

        cfg = check_sweep(cfg)[0]
    files = [f for spec in (cfg.data, cfg.eval_data) if spec for f in spec.split(",")]
    if not all(Path(f).exists() for f in files):
        pytest.skip(f"{cfg.data}: the shared data is not in this checkout's ../shared/data")
    task = tasks.get(cfg.task)
    assert task.read(cfg.data, cfg)
    if cfg.eval_data:
        assert task.read(cfg.eval_data, cfg)
