"""The OpenAI-compatible HTTP API of `lmtune serve`, in front of the continuous batcher (lmtune's decoder).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`
answers with server-sent events), and for task fine-tunes POST /v1/classify, /v1/translate, /v1/answer.
The OpenAPI schema is at /openapi.json, browsable at /docs. Every error, a user's mistake or a limit,
is answered in OpenAI's format `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

Task endpoints (the model's lmtune.json must say `"task": "classify"`, `"translate"` or `"qa"`):
  POST /v1/classify   {"input": "text" | ["text", ...]}
                      -> {"object": "list", "model", "data": [{"index", "label"}, ...]}
  POST /v1/translate  {"input": "text" | ["text", ...]}
                      -> {"object": "list", "model", "data": [{"index", "translation"}, ...]}
  POST /v1/answer     {"input": {"question", "context"} | [{"question", "context"}, ...]}
                      -> {"object": "list", "model", "data": [{"index", "answer"}, ...]}
Such a model is loaded by its task module (`lmtune.tasks.<task>.load`), and each route calls
`lmtune.tasks.<task>.predict` on its inputs, so the answers are those of `lmtune predict` (classify also
returns "probabilities"). A classify or extractive-qa model has no language-model head: it serves only
its task route, and /v1/completions and /v1/chat/completions answer 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lmtune import tasks
from lmtune.config import ServeConfig
from lmtune.errors import LmtuneError
from lmtune.serving.bodies import UNSUPPORTED, Body, ChatRequest, CompletionRequest, QAInput, TaskRequest
from lmtune.serving.errors import ApiError, Guard, add_error_handlers

TASK_ROUTES = {"classify": "classify", "translate": "translate", "answer": "qa"}  # route -> lmtune.json task

# ----------------------------------------------------------------------------------------------
# Generation: n sequences on the batcher, their tokens coming back on one asyncio queue.

@dataclass
class Served:
    model: Any
    tokenizer: Any
    name: str
    meta: dict
    cfg: ServeConfig
    batcher: Any
    lock: threading.Lock
    context: int  # the model's longest sequence


async def generate_events(state: Served, prompts: list[list[int]], body: Body, max_tokens: int, stop: list[str]):
    """Yield (choice index, text delta, finish_reason or None, tokens made); the batcher stops every sequence of
    this request when the consumer goes away (the `finally`), e.g. a client closing its stream."""
    from lmtune.generation.sampling import StopText
    from lmtune.serving.batcher import GenRequest

    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    requests = []
    for i, ids in enumerate(p for p in prompts for _ in range(body.n)):
        def emit(token, finish, i=i):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (i, token, finish))
            except RuntimeError:  # the event loop is closed (server shutting down): nobody listens any more
                requests[i].cancelled.set()
        seed = None if body.seed is None else body.seed + i
        requests.append(GenRequest(ids, max_tokens, emit, body.temperature, body.top_p, body.top_k, seed))
    detoks = [StopText(state.tokenizer, stop) for _ in requests]
    for r in requests:
        state.batcher.submit(r)
    left = len(requests)
    try:
        while left:
            i, token, finish = await events.get()
            d = detoks[i]
            if d.done:  # events the batcher sent before it saw a stop-string cancel
                continue
            delta = ""
            if finish is None:
                delta = d.add(token)
                if not d.stopped:
                    if delta:
                        yield i, delta, None, 0
                    continue
                requests[i].cancelled.set()
                finish = "stop"
            d.done = True
            left -= 1
            if finish.startswith("error"):
                raise ApiError(500, f"generation failed ({finish})", type="server_error", code="generation_failed")
            yield i, delta + d.flush(), finish, len(d.ids)
    finally:
        for r in requests:
            r.cancelled.set()


# ----------------------------------------------------------------------------------------------
# The OpenAI routes.

def check_request(state: Served, body: Body, prompts: list[list[int]], param: str, max_tokens: int | None):
    """The request's max_tokens and stop list, once every limit is checked (400 with the reason if not)."""
    cfg = state.cfg
    for name, no_op in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in no_op):
            raise ApiError(400, f"{name} is not supported by this server (only {no_op[-1]!r} or leaving it out)",
                           name, "unsupported_parameter")
    if body.model and body.model != state.name:
        raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{state.name}'",
                       "model", "model_not_found")
    max_tokens = max_tokens or cfg.max_tokens
    if max_tokens > cfg.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens}",
                       "max_tokens", "max_tokens_exceeded")
    if len(prompts) * body.n > cfg.max_n:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={body.n} is more than this server's limit of "
                       f"{cfg.max_n} completions per request", "n", "too_many_choices")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "stop must be up to 4 non-empty strings", "stop", "invalid_stop")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty", param, "empty_prompt")
        if len(ids) > cfg.max_prompt_tokens or len(ids) + max_tokens > state.context:
            most = min(cfg.max_prompt_tokens, state.context - max_tokens)
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most {most} with "
                           f"max_tokens={max_tokens} (limit {cfg.max_prompt_tokens}, context {state.context})",
                           param, "context_length_exceeded")
    return max_tokens, stop


def _choice(chat: bool, stream: bool, i: int, text: str, finish: str | None) -> dict:
    if not chat:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
    key, value = ("delta", {"content": text} if text else {}) if stream else \
        ("message", {"role": "assistant", "content": text})
    return {"index": i, key: value, "logprobs": None, "finish_reason": finish}


async def respond(state: Served, chat: bool, body: Body, prompts: list[list[int]], max_tokens: int, stop: list[str]):
    """Run the generation; answer with one JSON object, or a stream of server-sent events."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    k, created = len(prompts) * body.n, int(time.time())
    prompt_tokens = sum(len(p) for p in prompts) * body.n

    def envelope(obj, choices, usage=None):
        out = {"id": rid, "object": obj, "created": created, "model": state.name, "choices": choices}
        return out | ({"usage": usage} if usage else {})

    events = generate_events(state, prompts, body, max_tokens, stop)
    if not body.stream:
        texts, finishes, made = [""] * k, [None] * k, 0
        async for i, delta, finish, n_tokens in events:
            texts[i] += delta
            finishes[i], made = finish or finishes[i], made + n_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": made, "total_tokens": prompt_tokens + made}
        return envelope(kind, [_choice(chat, False, i, texts[i], finishes[i]) for i in range(k)], usage)

    chunk_kind = "chat.completion.chunk" if chat else kind
    with_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def sse():
        made = 0
        try:
            if chat:  # OpenAI opens every chat stream with the assistant role
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(k)]
                yield f"data: {json.dumps(envelope(chunk_kind, first))}\n\n"
            async for i, delta, finish, n_tokens in events:
                made += n_tokens
                yield f"data: {json.dumps(envelope(chunk_kind, [_choice(chat, True, i, delta, finish)]))}\n\n"
            if with_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": made,
                         "total_tokens": prompt_tokens + made}
                yield f"data: {json.dumps(envelope(chunk_kind, [], usage))}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:
            error = {"message": e.message, "type": e.type, "param": None, "code": e.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:  # the client went away (or we are done): stop its sequences now, not at max_tokens
            await events.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def chat_prompt(state: Served, body: ChatRequest) -> list[int]:
    from lmtune.tasks import instruct

    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    text = instruct.render(state.tokenizer, messages, add_generation_prompt=True)
    return state.tokenizer(text, add_special_tokens=False)["input_ids"]


def task_rows(task: str, inputs: list) -> list[dict]:
    """Inputs as the rows the task's `read` would give `predict` (default column names)."""
    if task == "qa":
        return [{"question": x.question, "context": x.context} for x in inputs]
    return [{"source" if task == "translate" else "text": x} for x in inputs]


async def run_task(state: Served, route: str, body: TaskRequest) -> dict:
    """A task endpoint: a thin call into lmtune.tasks.<task>.predict, looked up only when asked for."""
    from starlette.concurrency import run_in_threadpool

    from lmtune.config import PredictConfig
    from lmtune.device import release_cpu_threads

    task = TASK_ROUTES[route]
    if body.model and body.model != state.name:
        raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{state.name}'",
                       "model", "model_not_found")
    have = state.meta.get("task")
    if have != task:
        what = f"was fine-tuned for task '{have}'" if have else "records no task (lmtune.json)"
        raise ApiError(400, f"/v1/{route} needs a model fine-tuned with --task {task}; this server's model "
                       f"'{state.name}' {what}", None, "wrong_task")
    inputs = body.input if isinstance(body.input, list) else [body.input]
    want = QAInput if task == "qa" else str
    if not inputs or not all(isinstance(x, want) for x in inputs):
        shape = "{question, context} or a list of them" if task == "qa" else "a string or a list of strings"
        raise ApiError(400, f"input must be {shape}", "input", "invalid_input")
    if len(inputs) > state.cfg.max_batch:
        raise ApiError(400, f"at most {state.cfg.max_batch} inputs per request", "input", "too_many_inputs")
    predict = tasks.get(task).predict
    task_cfg = PredictConfig(model=state.name, task=task, batch_size=state.cfg.max_batch)

    def call():
        with state.lock:  # the batcher's worker may run the same model
            try:
                return predict(state.model, state.tokenizer, task_rows(task, inputs), task_cfg, state.meta)
            finally:  # this pool thread's OpenMP team would slow the batcher's (device.release_cpu_threads)
                release_cpu_threads()

    try:
        results = await run_in_threadpool(call)
    except LmtuneError as e:
        raise ApiError(400, str(e), "input", "invalid_input") from None
    return {"object": "list", "model": state.name, "data": [{"index": i, **r} for i, r in enumerate(results)]}


def create_app(state: Served, api_key: str = "") -> FastAPI:
    app = FastAPI(title="lmtune", version="1", summary=f"OpenAI-compatible API serving {state.name}")
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        batcher = {"waiting": state.batcher.queue.qsize(), **state.batcher.stats} if state.batcher else {}
        return {"status": "ok", "model": state.name, "task": state.meta.get("task"), **batcher}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                            "owned_by": "lmtune", "task": state.meta.get("task")}]}

    def require_generation():
        if state.batcher is None:
            route = next((r for r, t in TASK_ROUTES.items() if t == state.meta.get("task")), "")
            raise ApiError(400, f"this server's model is a '{state.meta.get('task')}' fine-tune without a "
                           f"language-model head: use /v1/{route}", None, "not_generative")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        require_generation()
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        special = not state.tokenizer.chat_template  # as `lmtune generate` encodes a raw prompt
        prompts = [state.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt", "empty_prompt")
        max_tokens, stop = check_request(state, body, prompts, "prompt", body.max_tokens)
        return await respond(state, False, body, prompts, max_tokens, stop)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        require_generation()
        if not body.messages:
            raise ApiError(400, "messages must hold at least one message", "messages", "empty_messages")
        prompts = [chat_prompt(state, body)]
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens, stop = check_request(state, body, prompts, "messages", asked)
        return await respond(state, True, body, prompts, max_tokens, stop)

    for route in TASK_ROUTES:
        async def task_route(body: TaskRequest, route=route):
            return await run_task(state, route, body)
        app.post(f"/v1/{route}", summary=f"{route} with a '{TASK_ROUTES[route]}' fine-tune")(task_route)

    app.add_middleware(Guard, api_key=api_key, max_body=state.cfg.max_body_bytes)
    return app


def make_state(model, tokenizer, cfg: ServeConfig, meta: dict | None = None) -> Served:
    """What the routes need, with the batcher's worker thread started when the model can generate: it
    decodes through lmtune's decoder (as `lmtune generate` does), stopping at the same stop ids."""
    from lmtune.generation.decoder import Decoder
    from lmtune.generation.sampling import stop_ids
    from lmtune.serving.batcher import Batcher

    model.eval()
    meta = meta or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own
    lock, batcher = threading.Lock(), None
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if type(base).__name__.endswith("ForCausalLM"):
        # a task route (translate, qa) also runs `model` through its task's predict: never merge into it
        decoder = Decoder(model, keep_model=meta.get("task") in TASK_ROUTES.values())
        batcher = Batcher(decoder, stop_ids(model, tokenizer), cfg.max_batch, cfg.batch_wait_ms, lock,
                          max_len=min(context, cfg.max_prompt_tokens + cfg.max_tokens))
    return Served(model, tokenizer, cfg.model_name or cfg.model, meta, cfg, batcher, lock, context)
