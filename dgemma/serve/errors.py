"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with the right HTTP status.

A client's mistake is a 4xx with a message that says what to change; only a fault of the server is a 500.
Every way a request can fail (our own checks, pydantic validation, the engine's `GenerationError`, unknown
routes, wrong methods, an unexpected exception) ends up in `error_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..generate import ContextLengthError

log = logging.getLogger("dgemma.serve")

# OpenAI's `type` values for the statuses we return.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error to send as OpenAI error JSON with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------- translations
def from_validation(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the offending field (`messages.0.role`)."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "json-or-python"))]
    # Union members show up in the location (`prompt.str`, `prompt.list[int]`): keep the field path only.
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool", "list")]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {err.get('msg', 'invalid')}.", param=param, code="invalid_value")


def from_generation(e: Exception, param: str | None = None) -> APIError:
    """The engine's `GenerationError` (a request that cannot run as given): 400, or context_length_exceeded."""
    msg = str(e).replace("max_new_tokens", "max_tokens")  # the engine's name -> the API's
    if isinstance(e, ContextLengthError):
        return APIError(400, msg, param="messages" if param == "messages" else "prompt",
                        code="context_length_exceeded")
    for key, name in (("bad_words", "bad_words"), ("allowed_token_ids", "allowed_token_ids"),
                      ("max_new_tokens", "max_tokens"), ("max_denoising_steps", "steps"), ("t_min", "t_min"),
                      ("t_max", "t_max"), ("entropy_bound", "entropy_bound"), ("stop", "stop"),
                      ("stability_threshold", "stability_threshold"), ("ar_temperature", "temperature"),
                      ("confidence_threshold", "confidence_threshold"), ("vocabulary", param or "prompt"),
                      ("prompt is empty", param or "prompt"), ("fixed", "suffix")):
        if key in msg:
            param = name
            break
    return APIError(400, msg, param=param, code="invalid_value")


# ---------------------------------------------------------------- handlers
def install(app) -> None:
    """Route every failure through the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if request.url.path.startswith("/v1/messages"):  # Anthropic's clients read Anthropic's error shape
            from .messages import error_body

            return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, e: RequestValidationError):  # a query or path parameter of a bad type
        err = (e.errors() or [{}])[0]
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
        param = ".".join(loc) or None
        return error_response(APIError(400, f"Invalid value for '{param}': {err.get('msg', 'invalid')}.", param=param,
                                       code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, f"Unknown path {request.url.path}", code="unknown_url")
        elif e.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail))
        err.headers.update(e.headers or {})
        return error_response(err)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # a bug of ours, never a client's mistake
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(e).__name__})", code="internal_error"))
