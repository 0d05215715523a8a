"""`pip install lmtune` as a new user does it: the wheel, in a fresh venv, with the core dependencies only.

SLOW (marker `install`, about 1-3 min: a fresh venv gets torch and transformers): it builds the wheel,
installs it into a venv made without --system-site-packages (so nothing of the test venv's extras leaks
in), and checks that every verb's --help works, that `serve` and `sweep` say in one line which extra to
install, and that a core verb (translate evaluation, which scores with sacrebleu) runs end to end.
torch comes from a local wheel found through pip's own find-links (pip config / PIP_FIND_LINKS), the
same build as the test venv's; without one the test is skipped rather than download a CUDA torch.
Skip it in a quick run with `pytest -m "not install"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune.cli import VERBS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.install


def _local_torch_wheel() -> Path | None:
    """A wheel of the running torch build in one of pip's find-links folders, if there is one."""
    import torch

    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = [v for line in out.splitlines() if "find-links" in line
               for v in line.split("=", 1)[1].strip("'\" ").split()]
    folders += os.environ.get("PIP_FIND_LINKS", "").split()
    name = f"torch-{torch.__version__}-"
    for folder in folders:
        folder = folder.removeprefix("file://")
        if Path(folder).is_dir():
            hits = [p for p in Path(folder).glob("torch-*.whl") if p.name.startswith(name)]
            if hits:
                return hits[0]
    return None


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    wheel = _local_torch_wheel()
    if wheel is None:
        pytest.skip("no local wheel of this torch build in pip's find-links (pip config / PIP_FIND_LINKS): "
                    "the test does not download torch")
    tmp = tmp_path_factory.mktemp("install")
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  tmp / "dist", ROOT], timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    lmtune_wheel = next((tmp / "dist").glob("lmtune-*.whl"))
    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", venv], timeout=120).returncode == 0
    pip = venv / "bin" / "pip"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # torch first, pinned to the local build (else pip might pick PyPI's CUDA build), then the wheel
    for args in (["install", "-q", wheel], ["install", "-q", lmtune_wheel]):
        r = _run([pip, *args], timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    return venv, env


def test_core_install_has_no_extras(core_venv):
    """The fresh venv holds the core dependencies and none of the extras: the checks below can fail."""
    venv, env = core_venv
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'transformers', 'peft', 'gguf', 'sacrebleu', 'matplotlib', 'pyarrow', "
            "'fastapi', 'uvicorn', 'optuna', 'tensorboard', 'bitsandbytes', 'pytest']}))")
    r = _run([venv / "bin" / "python", "-c", code], env=env, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert all(found[m] for m in ("torch", "transformers", "peft", "gguf", "sacrebleu", "matplotlib", "pyarrow"))
    assert not any(found[m] for m in ("fastapi", "uvicorn", "optuna", "tensorboard", "bitsandbytes", "pytest"))


def test_every_verb_help(core_venv):
    venv, env = core_venv
    for verb in VERBS:
        r = _run([venv / "bin" / "lmtune", verb, "--help"], env=env, cwd="/", timeout=120)
        assert r.returncode == 0 and f"lmtune {verb}" in r.stdout, (verb, r.stderr[-1000:])


@pytest.mark.parametrize("argv, extra", [(["serve"], "serve"), (["sweep", "--out", "/tmp/never-made"], "sweep")])
def test_missing_extra_is_one_line(core_venv, argv, extra):
    venv, env = core_venv
    r = _run([venv / "bin" / "lmtune", *argv], env={**env, "HF_HUB_OFFLINE": "1"}, cwd="/", timeout=120)
    assert r.returncode == 2, r.stderr[-1000:]
    assert r.stderr.count("\n") == 1 and f"pip install 'lmtune[{extra}]'" in r.stderr, r.stderr
    assert not Path("/tmp/never-made").exists()


def test_core_verb_runs_translate_evaluation(core_venv, tmp_path):
    """evaluate --task translate generates and then scores with sacrebleu: a core dependency now."""
    from _tiny_models import tiny_llama

    venv, env = core_venv
    model = tiny_llama(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                            for s, t in [("Hello.", "Bonjour."), ("Thank you.", "Merci.")]))
    r = _run([venv / "bin" / "lmtune", "evaluate", "--model", model, "--task", "translate", "--data", data,
              "--source-lang", "English", "--target-lang", "French", "--max-new-tokens", "4", "--json"],
             env={**env, "HF_HUB_OFFLINE": "1"}, cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bleu" in json.loads(r.stdout.strip().splitlines()[-1])
