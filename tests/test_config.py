"""Configuration: YAML + command line into typed objects, one clear line for every mistake."""

import subprocess
import sys
import time

import pytest

from lmtune import cli
from lmtune.config import FinetuneConfig
from lmtune.errors import LmtuneError


def test_cli_values_override_file_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.001\nbatch_size: 4\nlora: true\ndata: a.jsonl\nout: o\n")
    cfg = cli.parse("finetune", ["--config", str(f), "--batch-size", "2", "seed=7"])
    assert isinstance(cfg, FinetuneConfig)
    assert (cfg.learning_rate, cfg.batch_size, cfg.lora, cfg.seed) == (0.001, 2, True, 7)


def test_misspelt_yaml_key_suggests_the_right_one(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 3e-4\n")
    with pytest.raises(LmtuneError, match="unknown key 'learning_rat', did you mean 'learning_rate'"):
        cli.parse("finetune", ["--config", str(f), "--data", "a", "--out", "b"])


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "many"], "key 'batch_size' must be int, got 'many'"),
    (["--batch-size", "0"], "key 'batch_size' must be >= 1"),
    (["--optimizer", "lion"], "key 'optimizer' must be one of sgd, adam, adamw, rmsprop"),
    (["--learning-rat", "1"], "unknown option '--learning-rat', did you mean '--learning-rate'"),
    ([], "missing required setting data, out"),
])
def test_bad_command_line_values(args, message):
    base = ["--data", "a", "--out", "b"] if args else []
    with pytest.raises(LmtuneError, match=message):
        cli.parse("finetune", base + args)


def test_wrong_type_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_steps: 1.5\n")
    with pytest.raises(LmtuneError, match=r"c.yaml: key 'max_steps' must be int, got 1.5"):
        cli.parse("pretrain", ["--config", str(f), "--data", "a", "--out", "b"])


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, lmtune.cli as c; c.parse('finetune', ['--data','a','--out','b']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lmtune", "finetune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--learning-rate" in r.stdout and "Peak learning rate" in r.stdout
    assert time.perf_counter() - t < 1.5  # well under a second here; slack for a loaded CI machine
