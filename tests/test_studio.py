"""`lmtune studio` in a real headless Chromium (Debian's, driven by Playwright): launch a tiny fine-tune from
the generated form, watch its curve grow, stop it, resume it, see it finish, compare two runs, chat with
the result, evaluate it, and get the CLI's own message for a bad value. The browser tests write
screenshots of every page at 1280 and 800 px into $LMTUNE_SCREENSHOTS (pytest's temporary folder when unset;
`LMTUNE_SCREENSHOTS=docs/screenshots make test` refreshes the README's). Without a browser they skip (CI
installs one: .ci/run); the tests of the server's rules (token, host, confined paths) run anyway.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import read_metrics, run_cli

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
# the suite never writes into the checkout: screenshots go to a temporary folder unless asked for
SHOTS = Path(os.environ["LMTUNE_SCREENSHOTS"]).resolve() if os.environ.get("LMTUNE_SCREENSHOTS") else \
    Path(__import__("tempfile").mkdtemp(prefix="lmtune-screenshots-"))

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
needs_browser = pytest.mark.skipif(
    sync_playwright is None or not Path(CHROMIUM).exists(),
    reason=f"needs the playwright package and a Chromium at {CHROMIUM} (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Studio:
    """`python -m lmtune studio` in a subprocess, and whatever runs it started, stopped at the end."""

    def __init__(self, workspace: Path, data: list[str]):
        self.workspace, self.port = workspace, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workspace.parent / f"studio-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmtune", "studio", "--runs", str(workspace),
                                      "--data", ",".join(data), "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                call(self.url + "/api/runs")
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(Path(self.log.name).read_text())
                time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        for rec in (self.workspace / ".studio").glob("*.json"):
            pid = json.loads(rec.read_text()).get("pid")
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        self.log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def shoot(page, name: str) -> None:
    """The page as it is now, at 1280 and 800 px wide (left at 1280)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.eval_on_selector_all("details", "els => els.forEach(e => e.open = false)")
    for width in (800, 1280):
        page.set_viewport_size({"width": width, "height": 860})
        page.wait_for_timeout(250)  # charts redraw on resize
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)


def field(page, name: str):
    return page.locator(f'.field[data-field="{name}"] input, .field[data-field="{name}"] select').first


def fill_form(page, values: dict) -> None:
    page.eval_on_selector_all("details", "els => els.forEach(e => e.open = true)")
    for name, value in values.items():
        el = field(page, name)
        if isinstance(value, bool):
            el.set_checked(value)
        else:
            el.fill(str(value))
        el.dispatch_event("change")


def wait_state(page, state: str, timeout_s: float) -> None:
    page.wait_for_selector(f".title .badge.{state}", timeout=timeout_s * 1000)


def points(page, canvas: str) -> int:
    return int(page.get_attribute(canvas, "data-points") or 0)


@needs_browser
def test_lifecycle_in_the_browser(browser, tmp_path, tiny_chat_model, dates_jsonl):
    ws = tmp_path / "runs"
    studio = Studio(ws, [str(Path(tiny_chat_model)), str(Path(dates_jsonl).parent)])
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    try:
        page.goto(studio.url + "/#/new")
        page.wait_for_selector('.field[data-field="data"]')
        # every config field is in the form: it is generated from the dataclass behind --help
        from lmtune import config as C
        from lmtune.config import options
        shown = set(page.eval_on_selector_all(".field", "els => els.map(e => e.dataset.field)"))
        assert shown == set(options.fields_of(C.FinetuneConfig))
        common = {"model": tiny_chat_model, "data": dates_jsonl, "max_length": 128, "batch_size": 2, "threads": 1,
                  "log_every": 1}
        # a bad value: the form shows the line the command line prints
        fill_form(page, {**common, "out": ws / "a", "learning_rate": "abc"})
        page.wait_for_selector("#form-message.error")
        cli = run_cli("finetune", "--model", tiny_chat_model, "--data", dates_jsonl, "--out", ws / "z",
                      "--learning-rate", "abc")
        assert cli.returncode == 2
        assert page.inner_text("#form-message") == cli.stderr.strip() \
            == "error: command line: key 'learning_rate' must be float, got 'abc'"
        assert page.locator('.field.bad[data-field="learning_rate"]').count() == 1
        # 16 steps with a checkpoint after each: slow enough to stop midway on a fast machine
        fill_form(page, {"learning_rate": "0.002", "max_steps": 16, "save_every": 1, "val_split": 0.1, "eval_every": 4})
        page.wait_for_selector("#form-message.ok")
        assert "--learning-rate=0.002" in page.inner_text("#form-command")
        page.click("#preview")  # the rows as the model sees them: the answer's tokens carry the loss
        page.wait_for_selector(".tok.loss")
        n_loss, n_all = page.locator(".tok.loss").count(), page.locator(".tok").count()
        assert 0 < n_loss < n_all
        shoot(page, "new-run")

        page.click("#launch")
        page.wait_for_url("**/#/run?id=a")
        wait_state(page, "running", 30)
        status, body = call(studio.url + "/api/launch", {"verb": "finetune", "values": {
            "model": tiny_chat_model, "data": dates_jsonl, "out": str(ws / "other")}})
        assert status == 400 and "is already training in run a" in body["error"]  # one run per model
        # the curve grows while the page stays open (streamed: the page is never reloaded)
        page.wait_for_function("() => +document.querySelector('#chart-loss')?.dataset.points >= 1", timeout=120_000)
        seen = points(page, "#chart-loss")
        page.click("#stop")
        wait_state(page, "stopped", 60)
        stopped_at = max(r["step"] for r in read_metrics(ws / "a"))
        assert seen <= stopped_at < 16 and points(page, "#chart-loss") == stopped_at
        page.click("#resume")
        wait_state(page, "finished", 180)
        page.wait_for_function("() => +document.querySelector('#chart-loss')?.dataset.points == 16")
        steps = [r["step"] for r in read_metrics(ws / "a") if "loss" in r]
        assert steps == list(range(1, 17))  # resumed where it stopped: no step lost or repeated
        # validations at steps 0 (the base model, with retention scored: tests/test_retention.py), 4, 8, 12, 16
        assert int(page.get_attribute("#chart-val", "data-points")) == 5
        command = page.inner_text("#command")
        assert command.startswith("lmtune finetune ") and "--max-steps=16" in command and "--resume" not in command
        shoot(page, "run")

        # a second run from this one's settings, for the comparison
        page.goto(studio.url + "/#/new?from=a")
        page.wait_for_selector('.field[data-field="data"]')
        fill_form(page, {"out": ws / "b", "max_steps": 4, "learning_rate": "0.0005", "save_every": 100})
        page.click("#launch")
        page.wait_for_url("**/#/run?id=b")
        wait_state(page, "finished", 180)

        page.goto(studio.url + "/#/runs")
        page.wait_for_selector('tr[data-id="b"][data-state="finished"]')
        assert page.locator('tr[data-id="a"] .badge').inner_text() == "finished"
        assert "16 / 16" in page.locator('tr[data-id="a"]').inner_text()
        shoot(page, "runs")

        page.goto(studio.url + "/#/compare?ids=a,b")
        page.wait_for_function("() => +document.querySelector('#compare-chart')?.dataset.series == 2")
        assert points(page, "#compare-chart") == 20
        shoot(page, "compare")

        page.goto(studio.url + "/#/play?id=a")
        page.fill("#chat-input", "What is the date today?")
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
        reply = page.locator(".msg.assistant")
        assert "error-text" not in (reply.get_attribute("class") or "")
        assert reply.inner_text().strip() and int(reply.get_attribute("data-chunks")) >= 2  # streamed in pieces
        shoot(page, "playground")

        page.goto(studio.url + "/#/evaluate?id=a")
        page.wait_for_selector('.field[data-field="limit"]')
        fill_form(page, {"limit": 4, "max_new_tokens": 8})
        page.click("#eval-run")
        page.wait_for_selector("#eval-metrics", timeout=180_000)
        assert "exact_match" in page.inner_text("#eval-metrics")
        shoot(page, "evaluate")
    finally:
        page.close()
        studio.close()


@needs_browser
def test_runs_page_paints_200_runs_within_a_second(browser, tmp_path):
    ws = tmp_path / "runs"
    for i in range(200):  # what finetune leaves: run.json, metrics.jsonl (100 steps, 5 validations)
        run = ws / f"sweep-{i // 50}" / f"trial-{i:03d}"
        run.mkdir(parents=True)
        config = {"model": "smollm2-135m", "task": "instruct", "max_steps": 100, "learning_rate": 1e-4 * (i + 1)}
        (run / "run.json").write_text(json.dumps({"verb": "finetune", "config": config, "started": "2026-01-01T00:00:00"}))
        rows = [{"step": s, "loss": 3 / s, "lr": 1e-4, "tokens_per_s": 1000.0, "elapsed_s": s * 0.5}
                for s in range(1, 101)] + [{"step": s, "val_loss": 2 / s + (i * 7 % 11) / 100} for s in (20, 40, 60, 80, 100)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "lmtune.json").write_text("{}")
    studio = Studio(ws, [])
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    try:
        call(studio.url + "/api/runs")  # the server's first listing fills its cache, as a user's first visit
        page.goto(studio.url + "/#/runs")
        page.wait_for_function("() => window.__runsPainted !== undefined")
        painted_ms = page.evaluate("window.__runsPainted")  # since navigation start
        assert page.locator("tbody tr").count() == 200
        assert page.locator("tbody tr .badge.finished").count() == 200
        assert "val_loss 0.02" in page.locator('tr[data-id="sweep-0/trial-000"]').inner_text()
        assert painted_ms < 1000, f"first paint of 200 runs took {painted_ms:.0f} ms"
        # the Sweep page: a sweep's trials, the setting that varies, the history of the best value
        page.goto(studio.url + "/#/sweep?id=sweep-1")
        page.wait_for_function("() => +document.querySelector('#sweep-history')?.dataset.points == 100")
        assert page.locator("#sweep-trials tr").count() == 51
        assert "learning_rate" in page.inner_text("#sweep-trials tr >> nth=0")
        shoot(page, "sweep")
    finally:
        page.close()
        studio.close()


# ----------------------------------------------------------------------------------------------
# The server's rules, without a browser.

@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from lmtune.studio.app import create_app

    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    app = create_app(tmp_path / "runs", [tmp_path / "data"], token="sekret", hosts={"testserver"})
    return TestClient(app), tmp_path


def test_token_host_and_origin_are_checked(client):
    c, _ = client
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.get("/?token=sekret")
    assert r.status_code == 200 and "lmtune_studio_token=sekret" in r.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200  # the cookie it set
    assert c.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    r = c.post("/api/validate", json={"verb": "finetune", "values": {}}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_paths_stay_inside_the_workspace_and_data_folders(client):
    c, tmp = client
    c.get("/?token=sekret")
    data = str(tmp / "data" / "d.jsonl")
    ok = c.post("/api/validate", json={"verb": "finetune", "values": {"data": data, "out": str(tmp / "runs" / "x")}})
    assert ok.status_code == 200 and ok.json()["command"].startswith("lmtune finetune --data=")
    for values, bad in [({"data": "/etc/passwd", "out": str(tmp / "runs" / "x")}, "--data /etc/passwd"),
                        ({"data": data, "out": str(tmp / "elsewhere")}, "--out"),
                        ({"data": data, "out": str(tmp / "runs" / "x"), "model": str(tmp)}, "--model")]:
        r = c.post("/api/validate", json={"verb": "finetune", "values": values})
        assert r.status_code == 400 and r.json()["error"].startswith(f"error: {bad}") and "outside" in r.json()["error"]
    assert c.get("/api/run", params={"id": "../.."}).status_code == 400
    # the CLI's own message for a missing setting
    r = c.post("/api/validate", json={"verb": "finetune", "values": {"data": data}})
    assert r.json()["error"] == "error: missing required setting out: give --out ... (or put it in --config)"


def test_non_loopback_host_needs_a_token(tmp_path):
    r = run_cli("studio", "--runs", tmp_path, "--host", "0.0.0.0")
    assert r.returncode == 2 and r.stderr.startswith("error: --host 0.0.0.0 exposes the studio")
    assert "Traceback" not in r.stderr


def test_default_metrics_agree_with_the_tasks():
    from lmtune import tasks
    from lmtune.studio import runs as R

    for task in tasks.NAMES:
        default = tasks.get(task).METRIC
        assert R.watched({"task": task})[0] == (default if default.startswith("val_") else f"val_{default}")


def test_the_reproducing_command_parses_back_to_the_config(tmp_path):
    from lmtune import cli
    from lmtune.config.options import to_dict
    from lmtune.studio import runs as R

    cfg = cli.parse("finetune", ["--data", "d.jsonl", "--out", str(tmp_path / "o"), "--lora", "--no-group-by-length",
                                 "--learning-rate", "1e-3", "--seed=-1"])
    argv = R.argv_of("finetune", to_dict(cfg))
    assert to_dict(cli.parse("finetune", argv)) == to_dict(cfg)
