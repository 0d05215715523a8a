"""The suite runs on its own lmtune cache: a user's cache neither changes the tests nor is changed by them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import USER_CACHE

TESTS = Path(__file__).resolve().parent


def test_lmtune_cache_is_the_sessions_own(session_cache):
    from lmtune import models

    assert models.cache_dir() == session_cache
    assert not models.cache_dir().resolve().is_relative_to(USER_CACHE.resolve())
    child = subprocess.run([sys.executable, "-c", "from lmtune import models; print(models.cache_dir())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(child) == session_cache  # every `python -m lmtune` the tests start inherits it


def test_environments_copied_at_import_hold_the_session_cache(session_cache):
    """test_chat copies os.environ when pytest imports it (before any fixture runs), as test_distributed
    did: the session cache must already be set then, or such a module's subprocesses write into the user's
    cache (CI's fresh home caught test_distributed's pretraining shards there)."""
    import test_chat

    assert test_chat.ENV["LMTUNE_CACHE"] == str(session_cache)


def test_smollm2_resolves_into_the_session_cache(smollm2_dir, session_cache):
    assert Path(smollm2_dir).is_relative_to(session_cache)
    assert (Path(smollm2_dir) / "tokenizer.json").is_file()


def test_no_test_reads_the_home_folder():
    needles = ("Path." + "home()", '"~/' + '.cache', "'~/" + ".cache")
    offenders = [f"{p.name}: {n}" for p in TESTS.glob("*.py") if p.name != "conftest.py"
                 for n in needles if n in p.read_text()]
    assert not offenders, offenders
