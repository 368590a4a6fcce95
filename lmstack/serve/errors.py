"""Every error the server sends is OpenAI's envelope: {"error": {"message", "type", "param",
"code"}}, including the ones raised before a route runs (invalid JSON, a body that is not UTF-8,
an unknown route, a body over the size limit). A client's mistake is a 4xx, never a 5xx: the
openai client retries 5xx answers, which would replay a bad request.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("lmstack.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable"}


class APIError(Exception):
    """An answer other than 200: status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(status, message, param, code), status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg')}", code="json_invalid")
    where = ".".join(loc) or "body"
    return error_response(400, f"{where}: {first.get('msg', 'invalid value')}",
                          loc[0] if loc else None, first.get("type"))


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    if e.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the routes"
    elif e.status_code == 400:  # FastAPI's body parser: a body that is not UTF-8 JSON
        message = f"the body could not be read as UTF-8 JSON ({e.detail})"
    else:
        message = str(e.detail)
    return error_response(e.status_code, message, headers=getattr(e, "headers", None))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(e).__name__}")


DRAIN_FACTOR = 64


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before the app sees it. The body is read
    here (kept only up to the limit) and replayed to the app. An oversized body is read on (up
    to DRAIN_FACTOR times the limit, then dropped) before the answer, because a client still
    sending when the connection closes sees a reset instead of the 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
            if size > DRAIN_FACTOR * self.max_bytes:
                break  # answer now; the connection closes with the rest unread
        if size > self.max_bytes:
            return await self._too_large(send)
        return await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, send) -> None:
        body = json.dumps(envelope(413, f"the body is over the server's limit of {self.max_bytes} "
                                        "bytes (lmstack serve --max-body-bytes)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect
    return replay
