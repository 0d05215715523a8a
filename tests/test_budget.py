"""`--budget`: a run sized by wall-clock time ends within it, decays its schedule to that end, and resumes
against the same end; a budget that cannot hold a step is refused before anything is written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny_models import run_cli, tiny_llama
from conftest import read_metrics

from lmtune.errors import LmtuneError
from lmtune.train.budget import parse_duration
from lmtune.train.optim import lr_factor


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                          ("45", 45), ("1.5m", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "5x", "-3m", "0s", "m", "1e9999"])
def test_parse_duration_refuses(text):
    with pytest.raises(LmtuneError):
        parse_duration(text)


def test_wsd_is_flat_then_decays_over_the_last_fifth():
    f = [lr_factor(s, 0, 100, "wsd") for s in range(100)]
    assert f[0] == f[79] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmtune.data.synthetic import date_records

    d = tmp_path_factory.mktemp("budget")
    tiny_llama(d / "tiny")
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in date_records(200, seed=0)))
    return d


def args(d: Path, out: Path, budget: str) -> list[str]:
    return ["finetune", "--model", d / "tiny", "--data", d / "d.jsonl", "--out", out, "--budget", budget,
            "--val-split", "0.1", "--eval-every", "15", "--batch-size", "4", "--max-length", "64",
            "--save-every", "10", "--retain-data", "none"]  # retention's generation is not what is tested


def test_fast_steps_and_slow_saves_still_plan_steps():
    """A resumed run measured 0.03 s steps against 0.25 s predicted saves: the old fixed-point iteration
    swung to 0 steps and refused the budget as too short."""
    import time as clock

    from lmtune.train.budget import Plan

    plan = Plan(60, clock.monotonic(), step_s=0.03, eval_s=0.01, save_s=0.4, eval_every=15, save_every=10,
                validates=True)
    assert plan.total > 300, plan.total  # the old iteration planned 0 here
    assert plan.total * 0.03 + plan._overhead(0, plan.total) <= 60  # and what it plans fits


def test_one_slow_save_does_not_end_the_run_early():
    """A busy disk once made one checkpoint slow; counted for every later save, it cut a 60 s plan from 518
    steps to the step it was at. The plan takes the median of the saves it saw."""
    import time as clock

    from lmtune.train.budget import Plan

    plan = Plan(60, clock.monotonic(), step_s=0.05, eval_s=0.1, save_s=0.05, eval_every=15, save_every=10,
                validates=True)
    before = plan.total
    for step in range(1, 31):
        plan.saw_step(step, 0.05)
        if step % 10 == 0:
            plan.saw_save(3.0 if step == 20 else 0.05)
    assert plan.total > 0.8 * before, (before, plan.total)


def test_the_plan_follows_the_mean_step_time():
    """Batches of unequal lengths: most steps short, one in five long. The steps still to come cost their
    mean, so the plan is sized by it; the median of recent steps (as before) planned about twice as many
    steps as fit, and swung from one step to the next."""
    import time as clock

    from lmtune.train.budget import Plan

    plan = Plan(3600, clock.monotonic(), step_s=0.05, eval_s=0.0, save_s=0.05, eval_every=0, save_every=10**9,
                validates=False)
    totals = []
    for step in range(1, 401):
        totals.append(plan.saw_step(step, 0.2 if step % 5 == 0 else 0.03))
    mean = (4 * 0.03 + 0.2) / 5
    left = plan.deadline - clock.monotonic() - max(0.03 * 3600, 3.0)
    assert abs((plan.total - 400) * mean - left) < 0.03 * left, (plan.total, left / mean)
    assert max(totals[-100:]) - min(totals[-100:]) < 0.01 * plan.total, (min(totals[-100:]), max(totals[-100:]))


@pytest.mark.parametrize("extra,words", [(["--max-steps", "5"], "not both"), (["--epochs", "2"], "not both"),
                                         ([], "cannot hold")])
def test_refused_before_anything_is_written(setup, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    code = run_cli(args(setup, out, "1s" if not extra else "5m") + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and words in err[-1] and err[-1].startswith("error: ")
    assert not out.exists()


def test_ends_within_the_budget_and_resumes_to_the_same_end(setup, tmp_path):
    budget = 60
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lmtune", *map(str, args(setup, out, f"{budget}s"))],
                          capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wall <= budget * 1.05, f"{wall:.1f} s for a {budget} s budget"
    rows = [r for r in read_metrics(out) if "loss" in r and "val_loss" not in r]
    planned = rows[-1]["planned_steps"]
    assert planned >= 5 and rows[-1]["step"] == planned  # it ran to the end it planned
    assert rows[-1]["lr"] < 0.02 * rows[0]["lr"] + 1e-12 or rows[-1]["lr"] < 1e-5  # cosine decayed to that end
    assert any(r.get("val_loss") for r in read_metrics(out))

    # interrupted half-way, then resumed: it continues to the end its checkpoint planned
    out2 = tmp_path / "run2"
    p = subprocess.Popen([sys.executable, "-m", "lmtune", *map(str, args(setup, out2, f"{budget}s"))],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list((out2 / "checkpoints").glob("step-*")):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    ckpts = sorted((out2 / "checkpoints").glob("step-*"))
    assert ckpts, "no checkpoint before SIGTERM"
    code = run_cli(args(setup, out2, f"{budget}s") + ["--resume"])
    assert code == 0
    rows2 = [r for r in read_metrics(out2) if "loss" in r and "val_loss" not in r]
    assert rows2[-1]["step"] == rows2[-1]["planned_steps"]
    stopped_at = int(ckpts[-1].name.split("-")[1])
    resumed = [r for r in rows2 if r["step"] > stopped_at]
    assert resumed and len({r["planned_steps"] for r in resumed}) == 1  # one end, fixed by the checkpoint


def test_estimate_answers_what_a_budget_buys(setup, capsys):
    code = run_cli(["estimate", "finetune", "--model", setup / "tiny", "--data", setup / "d.jsonl", "--out",
                    setup / "never", "--budget", "10m", "--batch-size", "4", "--max-length", "64", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    asked = next(v for v in result["variants"] if v.get("asked"))
    b = result["budget"]
    assert b["seconds"] == 600 and b["steps"] == int(600 / asked["step_s"]) and b["examples"] == 4 * b["steps"]
    assert b["epochs"] == pytest.approx(b["examples"] / 200, abs=0.01)  # 200 rows, none held back here
    assert not (setup / "never").exists()
