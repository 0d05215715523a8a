"""Errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), the API key and the body
size (Guard), and the handlers that turn FastAPI's own errors into that shape."""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status, message, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


class Guard:
    """Pure ASGI middleware (so it never buffers a streamed answer): checks the API key, then reads the
    body up to `max_body` bytes and hands it on, so an oversized body is refused before it is parsed."""

    def __init__(self, app, api_key: str, max_body: int):
        self.app, self.key, self.max_body = app, api_key.encode(), max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and not hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + self.key):
            return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                        code="invalid_api_key")(scope, receive, send)
        too_big = error_response(400, f"request body is larger than {self.max_body} bytes", code="body_too_large")
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the real channel (streaming needs its disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)



def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error object, so clients (the openai package) show its message."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        err = errors[0]
        if err["type"] != "json_invalid":  # of a union's alternatives, the one that got furthest says most
            err = max(errors, key=lambda x: len(x["loc"]))
        if err["type"] == "json_invalid":
            return error_response(400, f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')})",
                                  None, "invalid_json")
        # loc without "body" and without the names pydantic gives a union's branches (str, list[TextPart])
        where = ".".join(str(x) for x in err["loc"] if x != "body" and not (
            isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x))) or None
        if err["type"] == "extra_forbidden":
            return error_response(400, f"{where}: this server does not support this field; leave it out (see "
                                  "/openapi.json for the fields each route takes)", where, "unsupported_parameter")
        return error_response(400, f"{where or 'body'}: {err['msg']}", where, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return error_response(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request, e):  # a bug in lmtune: still answered in the same shape
        return error_response(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error")
