"""OpenAI error bodies: every failure the server reports is `{"error": {message, type, param, code}}`.

`APIError` is raised anywhere in a request's handling; `install` turns it and FastAPI's and
Starlette's own errors into that body with the right status, so that clients (the openai package
raises `BadRequestError`, `NotFoundError`, ... from it) see one format. An unexpected exception is
answered with a 500 in that format by app.Gate, which keeps the connection usable.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

__all__ = ["APIError", "error_body", "error_response", "from_validation", "install", "param_of"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


_UNION_TAGS = {"body", "str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """A request the server refuses or cannot serve: HTTP status plus the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def param_of(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as a parameter path: ("messages", 0, "role") -> "messages[0].role"."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or "-" in part or part[:1].isupper():
            continue  # pydantic names the branch of a union it tried: not a field
        else:
            text += f".{part}" if text else part
    return text or None


def from_validation(errors: list[dict[str, Any]]) -> APIError:
    """The first field's pydantic error as a 400 naming the parameter.

    A union reports one error per branch; the deepest says most (a list of parts with a bad part
    beats "not a string").
    """
    field = errors[0].get("loc", ("",))[:1]
    first = max((e for e in errors if e.get("loc", ("",))[:1] == field), key=lambda e: len(e.get("loc", ())))
    param = param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return APIError(
            400, f"'{param}' is a required property", param=param, code="missing_required_parameter"
        )
    value = first.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    where = f"'{param}'" if param else "the request body"
    return APIError(
        400, f"Invalid value for {where}: {first.get('msg', 'invalid')} (got {shown})", param=param
    )


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the OpenAI body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(from_validation(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404:
            message = f"Unknown path {request.url.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        return error_response(APIError(status, message), headers=getattr(exc, "headers", None))
