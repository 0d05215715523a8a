"""The studio's HTTP side: a JSON API, two server-sent-event streams, the page and its assets.

GET  /api/runs                  every run's summary        GET /api/runs/events   the same, pushed on change
GET  /api/run?id=ID             summary, config, command, metrics, log tail
GET  /api/run/events?id=ID      metrics.jsonl tailed: `metrics` (new rows), `reset`, `status` events
POST /api/run/stop|resume       {id}
GET  /api/sweeps, /api/sweep?id=DIR   a sweep's trials (live, from their run folders)
GET  /api/form/VERB             the form, from the config dataclass
POST /api/validate|preview|estimate|launch|evaluate   {verb, values[, parallel]}
/play/ID/v1/...                 `lmtune serve`'s own app over the run's model (chat streams, classify)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import shlex
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from lmtune import cli
from lmtune.errors import LmtuneError
from lmtune.studio import forms, jobs
from lmtune.studio import runs as R

STATIC = Path(__file__).parent / "static"
COOKIE = "lmtune_studio_token"


class FormBody(BaseModel):
    verb: str = "finetune"
    values: dict = {}
    parallel: bool = False


class RunBody(BaseModel):
    id: str


def _error(e: Exception, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": f"error: {e}"}, status)  # the line the CLI prints


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(workspace: Path, readable: list[Path], token: str = "", hosts: set[str] | None = None) -> FastAPI:
    ws = workspace.resolve()
    readable = [r.resolve() for r in readable]
    app = FastAPI(title="lmtune studio", docs_url=None, redoc_url=None)

    @app.exception_handler(LmtuneError)
    async def _user_error(request, e):
        return _error(e)

    def run_folder(run_id: str) -> Path:
        p = (ws / run_id).resolve()
        if p != ws and ws not in p.parents:
            raise LmtuneError(f"run {run_id}: not inside the workspace {ws}")
        return p

    page = _one_page()

    @app.get("/")
    async def index():
        # one response paints the Runs page: styles, scripts and the current list of runs inlined
        runs = json.dumps({"workspace": str(ws), "runs": R.list_runs(ws)}).replace("</", "<\\/")
        return HTMLResponse(page.replace("/*INITIAL*/null", runs), headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    async def list_runs():
        return JSONResponse({"workspace": str(ws), "runs": R.list_runs(ws)})

    @app.get("/api/runs/events")
    async def runs_events(request: Request):
        async def stream():
            last = None
            while not await request.is_disconnected():
                rows = await asyncio.to_thread(R.list_runs, ws)
                if rows != last:
                    yield _sse("runs", rows)
                    last = rows
                await asyncio.sleep(1.0)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/run")
    async def run(id: str):
        folder = run_folder(id)
        info, record = R.read_info(folder), R.read_record(ws, id)
        verb = info.get("verb") or record.get("verb", "")
        config = info.get("config") or record.get("config") or {}
        log = R.log_path(ws, id)
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        argv = [a for a in record.get("argv") or R.argv_of(verb, config) if a != "--resume"]
        return {"summary": R.summary(ws, id), "config": config, "folder": str(folder),
                "command": shlex.join(["lmtune", verb, *argv]), "metrics": R.read_metrics(folder),
                "log": tail, "best": str(folder / "best") if (folder / "best").is_dir() else "",
                "versions": {k: info[k] for k in ("python", "torch", "transformers") if k in info}}

    @app.get("/api/run/events")
    async def run_events(request: Request, id: str):
        folder = run_folder(id)

        async def stream():
            sent, last_row, status = -1, None, None
            while not await request.is_disconnected():
                rows = R.read_metrics(folder)
                # all rows first, and again whenever the file was rewritten (resume, overwrite)
                if sent < 0 or len(rows) < sent or (sent and rows[sent - 1] != last_row):
                    yield _sse("reset", rows)
                    sent = len(rows)
                elif len(rows) > sent:
                    yield _sse("metrics", rows[sent:])
                    sent = len(rows)
                last_row = rows[sent - 1] if sent else None
                s = await asyncio.to_thread(R.summary, ws, id)
                if s != status:
                    yield _sse("status", s)
                    status = s
                await asyncio.sleep(0.4)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/sweeps")
    async def sweeps():
        return {"sweeps": R.list_sweeps(ws)}

    @app.get("/api/sweep")
    async def sweep(id: str):
        run_folder(id)
        return JSONResponse(await asyncio.to_thread(R.sweep_table, ws, id))

    @app.get("/api/image")
    async def image(path: str):  # a report's PNG inside the workspace (importance.png, loss.png)
        p = run_folder(path)
        if p.suffix != ".png" or not p.is_file():
            raise LmtuneError(f"{path}: not a PNG in the workspace")
        return FileResponse(p)

    @app.post("/api/run/stop")
    async def stop(body: RunBody):
        run_folder(body.id)
        jobs.stop(ws, body.id)
        return {"ok": True}

    @app.post("/api/run/resume")
    async def resume(body: RunBody):
        run_folder(body.id)
        verb, argv = jobs.resume_argv(ws, body.id)
        cfg = cli.parse(verb, argv)
        forms.confine(cfg, ws, readable)
        return {"id": jobs.launch(ws, verb, argv, cfg, parallel=True)}

    @app.get("/api/form/{verb}")
    async def form(verb: str):
        return forms.schema(verb)

    @app.post("/api/validate")
    async def validate(body: FormBody):
        cfg, argv = forms.parse(body.verb, body.values)
        forms.confine(cfg, ws, readable)
        return {"ok": True, "command": shlex.join(["lmtune", body.verb, *argv])}

    @app.post("/api/preview")
    async def preview(body: FormBody):
        cfg, _ = forms.parse(body.verb, body.values)
        forms.confine(cfg, ws, readable)
        return await asyncio.to_thread(forms.preview, cfg, body.verb)

    @app.post("/api/launch")
    async def launch(body: FormBody):
        if body.verb not in R.TRAINING_VERBS:
            raise LmtuneError(f"launch: '{body.verb}' is not a training verb ({', '.join(R.TRAINING_VERBS)})")
        cfg, argv = forms.parse(body.verb, body.values)
        forms.confine(cfg, ws, readable)
        return {"id": jobs.launch(ws, body.verb, argv, cfg, body.parallel)}

    async def child_json(args: list[str], timeout: float) -> JSONResponse | dict:
        """Run `python -m lmtune ARGS` (it prints one JSON object); its error line if it fails."""
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lmtune", *args,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            return JSONResponse({"error": f"error: lmtune {args[0]} took longer than {timeout:.0f} s"}, 400)
        lines = [line for line in err.decode(errors="replace").splitlines() if line.startswith("error:")]
        if proc.returncode:
            return JSONResponse({"error": lines[-1] if lines else f"lmtune {args[0]} exited {proc.returncode}"}, 400)
        return {"result": json.loads(out.decode().strip().splitlines()[-1])}

    @app.post("/api/estimate")
    async def estimate(body: FormBody):
        cfg, argv = forms.parse(body.verb, body.values)
        forms.confine(cfg, ws, readable)
        return await child_json(["estimate", body.verb, *argv, "--json"], 600)

    @app.post("/api/evaluate")
    async def evaluate(body: FormBody):
        cfg, argv = forms.parse("evaluate", body.values)
        forms.confine(cfg, ws, readable)
        return await child_json(["evaluate", *[a for a in argv if a != "--json"], "--json"], 1800)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/play", Playground(run_folder))
    app.add_middleware(Guard, token=token, hosts=hosts or set())
    return app


def _one_page() -> str:
    """index.html with its stylesheet and scripts inlined (no request waits for another)."""
    html = (STATIC / "index.html").read_text()
    html = html.replace('<link rel="stylesheet" href="/static/style.css">',
                        f"<style>\n{(STATIC / 'style.css').read_text()}</style>")
    for name in ("chart.js", "app.js"):
        html = html.replace(f'<script src="/static/{name}"></script>', f"<script>\n{(STATIC / name).read_text()}</script>")
    return html


class Playground:
    """/play/RUN_ID/v1/...: `lmtune serve`'s app (create_app over load_model and make_state) for the run's
    model, loaded on first use; one model at a time (the studio is one person's)."""

    def __init__(self, run_folder):
        self.run_folder, self.loaded, self.lock = run_folder, None, asyncio.Lock()

    async def __call__(self, scope, receive, send):
        route = scope["path"][len(scope.get("root_path", "")):]
        run_id, sep, _ = route.strip("/").partition("/v1/")
        if scope["type"] != "http" or not sep:
            return await _error(LmtuneError("use /play/RUN_ID/v1/chat/completions or /v1/classify"), 404)(
                scope, receive, send)
        try:
            served = await self._load(run_id)
        except LmtuneError as e:
            return await _error(e)(scope, receive, send)
        child = {**scope, "root_path": scope.get("root_path", "") + "/" + run_id}
        await served(child, receive, send)

    async def _load(self, run_id: str):
        async with self.lock:
            if self.loaded and self.loaded[0] == run_id:
                return self.loaded[1]
            folder = self.run_folder(run_id)
            if not (folder / "lmtune.json").is_file():
                raise LmtuneError(f"run {run_id} has no saved model yet (it is written when training ends)")
            if self.loaded:  # free the previous model (its batcher thread waits on an empty queue)
                state = self.loaded[2]
                if state.batcher:
                    state.batcher.model = None
                self.loaded = None
            self.loaded = await asyncio.to_thread(_serve_app, folder, run_id)
            return self.loaded[1]


def _serve_app(folder: Path, run_id: str):
    from lmtune import serve
    from lmtune.config import ServeConfig
    from lmtune.serving import api

    cfg = ServeConfig(model=str(folder), model_name=run_id, max_tokens=256)
    model, tokenizer, meta = serve.load_model(cfg)
    state = api.make_state(model, tokenizer, cfg, meta)
    return run_id, api.create_app(state), state


class Guard:
    """Pure ASGI middleware (server-sent events pass through unbuffered). With a token: the request must
    carry it (header, cookie, or ?token= once, which sets the cookie). On loopback: the Host header must
    be the loopback address (a web page on another site cannot reach the studio by DNS rebinding), and a
    POST must come from the studio's own pages (Origin)."""

    def __init__(self, app, token: str, hosts: set[str]):
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts and host not in self.hosts:
            return await _error(LmtuneError(f"Host '{host}' is not this studio's address"), 403)(scope, receive, send)
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin and origin.split("://", 1)[-1] != host:
            return await _error(LmtuneError(f"requests from {origin} are refused"), 403)(scope, receive, send)
        if self.token:
            query = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
            cookie = SimpleCookie(headers.get("cookie", ""))
            given = [headers.get("authorization", "").removeprefix("Bearer "), query,
                     cookie[COOKIE].value if COOKIE in cookie else ""]
            if not any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given):
                return await _error(LmtuneError("this studio needs its token: open /?token=TOKEN"), 401)(
                    scope, receive, send)
            if query:  # keep it in a cookie, so the page's own requests and event streams carry it
                async def send_with_cookie(message):
                    if message["type"] == "http.response.start":
                        message["headers"] = [*message.get("headers", []), (
                            b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode())]
                    await send(message)
                return await self.app(scope, receive, send_with_cookie)
        await self.app(scope, receive, send)
