"""`lmtune studio`: a local web app over a workspace folder of runs.

Pages: Runs (every run, live), Run (curves streamed as metrics.jsonl grows, config, Stop/Resume, the
command that reproduces it), New run (a form generated from the config dataclasses, checked by the CLI's
parser, with a token-level data preview and an estimate), Compare, Playground (chat/classify through
`lmtune serve`'s app) and Evaluate. runs.py reads run folders, forms.py makes and checks the forms,
jobs.py starts and stops the child processes, app.py is the HTTP side, static/ the page.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from lmtune.config import StudioConfig
from lmtune.errors import LmtuneError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def studio(cfg: StudioConfig) -> None:
    """Check the options, then serve the studio until Ctrl-C (runs it started keep running)."""
    import uvicorn

    from lmtune.studio.app import create_app

    if not is_loopback(cfg.host) and not cfg.token:
        raise LmtuneError(f"--host {cfg.host} exposes the studio (it can start processes and read the workspace) "
                          "to the network: give --token SECRET too, or keep the default --host 127.0.0.1")
    workspace = Path(cfg.runs)
    if workspace.exists() and not workspace.is_dir():
        raise LmtuneError(f"--runs {cfg.runs} is a file: give a folder (it is created when missing)")
    readable = [Path(d.strip()) for d in cfg.data.split(",") if d.strip()]
    for d in readable:
        if not d.is_dir():
            raise LmtuneError(f"--data {d}: not a folder; give folders the studio may read data and models from")
    try:
        with socket.create_server((cfg.host.strip("[]"), cfg.port)):
            pass
    except OSError as e:
        raise LmtuneError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port") from None
    workspace.mkdir(parents=True, exist_ok=True)
    hosts = {f"{h}:{cfg.port}" for h in ("127.0.0.1", "localhost", "[::1]")} if is_loopback(cfg.host) and cfg.port else set()
    app = create_app(workspace, readable, cfg.token, hosts)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"lmtune studio over {workspace.resolve()} at http://{shown}:{cfg.port}/"
          + (f"?token={cfg.token}" if cfg.token else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
