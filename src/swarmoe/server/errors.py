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
    """The first pydantic complaint, with the field it concerns as `param`."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members and discriminator tags add location parts that name types, not fields.
    loc = [p for p in loc if not (p[:1].isupper() or "[" in p or p in _UNION_TAGS)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind == "missing" and not loc:
        return APIError(400, "request body is required (JSON)", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "model_attributes_type" and not loc:
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param,
                    code="invalid_value")


_UNION_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url",
               "function-after", "str", "int", "list", "float"}


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
