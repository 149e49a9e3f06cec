"""Every failure leaves the server as OpenAI's error object, never as a stack trace.

Clients (the openai package, the swarm's backends) branch on status and `error.code`, so the
mapping is fixed: 400 bad request (malformed JSON, bad values, context overflow), 401 bad key,
404 unknown model or route, 413 body too large, 500 anything unexpected (logged here, opaque
there).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarmoe.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("swarmoe.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
}


class APIError(Exception):
    """An error meant for the client: its message must be safe and say what to fix."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_bytes(status: int, message: str, **kw: str | None) -> bytes:
    return json.dumps(error_body(status, message, **kw)).encode()


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> APIError:
    """OpenAI's wording and code, which clients match to trim their history."""
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
        f"the completion). Please reduce the length of the messages or the completion.",
        param="messages",
        code="context_length_exceeded",
    )


def _validation_error(exc: RequestValidationError) -> APIError:
    """The most specific pydantic complaint, with the field it concerns as `param`."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))
    loc = _field_path(first.get("loc", ()))
    kind = first.get("type", "")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {message}", code="invalid_json")
    if not loc and kind in ("missing", "model_attributes_type", "dict_type"):
        return APIError(400, "request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}",
                        param=".".join(loc))
    if not loc:  # a cross-field check: its message starts with the field it concerns
        word = message.split(" ", 1)[0]
        loc = [word] if word in _FIELDS else []
        return APIError(400, message, param=loc[0] if loc else None, code="invalid_value")
    if loc[0] in _UNION_HINTS and len(errors) > 1:
        return APIError(400, f"{loc[0]} {_UNION_HINTS[loc[0]]}", param=loc[0], code="invalid_value")
    param = ".".join(loc)
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _field_path(loc: tuple) -> list[str]:
    """`loc` without the parts pydantic adds for unions: member labels (`list[int]`,
    `NamedToolChoice`) and discriminator tags (the `user` in messages.0.user.content)."""
    out: list[str] = []
    after_index = False
    for part in loc:
        if part == "body" and not out:
            continue
        text = str(part)
        is_label = isinstance(part, str) and (
            "[" in text or "-" in text or text[:1].isupper() or text in _TYPE_NAMES)
        is_tag = after_index and text in _TAGS
        if not (is_label or is_tag):
            out.append(text)
        after_index = isinstance(part, int)
    return out


# Fields whose type is a union: pydantic's per-member complaints help less than a summary.
_UNION_HINTS = {
    "prompt": "must be a non-empty string, list of strings, list of token ids (integers >= 0), "
              "or list of token-id lists",
    "stop": "must be a non-empty string or a list of at most 16 non-empty strings",
    "top_k": "must be -1 (off) or an integer >= 1",
}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url"}
_FIELDS = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error; see the server log"),
                            status_code=500)
