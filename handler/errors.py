"""OpenAI-shaped errors: one exception type, what becomes one, and its JSON response.

Body: `{"error": {"message", "type", "param", "code"}}`. The status codes and
types follow OpenAI; clients (the official SDK first) map them to exception
classes and retry only 408, 409, 429 and 5xx, so a client's mistake must
never be a 5xx. A request that fails validation (`validation_error`) or asks
the model for more than it can serve (`refused`, the rules in model/limits.py)
is a 400 whose `param` names the request's own field.
"""

from typing import Any

import flask
from pydantic import ValidationError

from handler.responses import json_response
from model.limits import InvalidRequest

RETRY_AFTER_SECONDS = 10


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` object, also used for SSE error events."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(error: APIError) -> flask.Response:
    """The Flask JSON response for `error`, with its status and headers."""
    return json_response(error.body(), error.status, error.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is malformed or asks for something out of range."""
    return APIError(400, message, "invalid_request_error", param=param, code=code)


def refused(exc: InvalidRequest) -> APIError:
    """400 for a request the model cannot serve as asked (model/limits.py's rules)."""
    return invalid_request(str(exc), param=exc.param, code=exc.code)


def authentication_failed(message: str) -> APIError:
    """401: the API key is missing or wrong."""
    return APIError(
        401,
        message,
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(name: str, param: str | None = "model") -> APIError:
    """404 for a model id this server does not serve."""
    return APIError(
        404,
        f"The model '{name}' does not exist.",
        "not_found_error",
        param=param,
        code="model_not_found",
    )


def path_not_found(path: str, detail: str = "") -> APIError:
    """404 for a URL this server has no route for (or, `detail` says why, not here)."""
    message = f"Unknown URL: {path}" + (f". {detail}" if detail else "")
    return APIError(404, message, "not_found_error", code="unknown_url")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> APIError:
    """405 for a known path asked with the wrong HTTP method."""
    return APIError(
        405,
        f"Method {method} is not allowed for {path}; use {', '.join(allowed)}.",
        "invalid_request_error",
        code="method_not_allowed",
        headers={"Allow": ", ".join(allowed)},
    )


def request_too_large(limit: int) -> APIError:
    """413 for a body beyond the configured size limit."""
    message = f"The request body exceeds the limit of {limit} bytes."
    return APIError(413, message, "invalid_request_error", code="request_too_large")


def unavailable(message: str, code: str, retry_after: int | None = None) -> APIError:
    """503: this instance cannot serve the request now; `retry_after` seconds, when
    given, tell the client when to try again."""
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return APIError(503, message, "server_error", code=code, headers=headers)


def model_loading() -> APIError:
    """503 while the model loads and compiles; the client should retry later."""
    return unavailable("The model is loading; retry shortly.", "model_loading", RETRY_AFTER_SECONDS)


def overloaded(detail: str) -> APIError:
    """503 when the engine's waiting queue is full; the client should retry later."""
    message = f"The server is overloaded ({detail}); retry shortly."
    return unavailable(message, "overloaded", retry_after=1)


def model_failed() -> APIError:
    """503 when the model failed to load; retrying this process will not help."""
    return unavailable("The model failed to load.", "model_load_failed")


def engine_failed() -> APIError:
    """503 when the engine failed (a device fault): this instance serves no more, and
    /health says so, so that the platform replaces it."""
    message = "The inference engine of this server instance failed; retry on another instance."
    return unavailable(message, "engine_failed")


def internal_error() -> APIError:
    """500 for an unexpected failure while serving one request."""
    return APIError(500, "The server had an error while processing your request.", "server_error")


# Validation errors.

# Segments of a pydantic error location that name a union member, not a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_type_tag(part: str) -> bool:
    return (
        part in _TYPE_TAGS
        or "[" in part  # "list[TextPart]", "literal['none','auto']", "[key]"
        or (part.isidentifier() and part[0].isupper())  # a model class, "NamedToolChoice"
    )


def error_param(loc: tuple[str | int, ...]) -> str | None:
    """The OpenAI `param` for a pydantic error location, e.g. "messages.0.role".

    Union validation adds the member type to the location ("str",
    "list[TextPart]", "NamedToolChoice"); those segments are dropped.
    """
    parts = [str(part) for part in loc if isinstance(part, int) or not _is_type_tag(part)]
    return ".".join(parts) or None


def validation_error(exc: ValidationError) -> APIError:
    """A 400 for a pydantic error, naming the most specific failing field."""
    errors = exc.errors(include_url=False)
    # Within a union, the deepest error explains the mismatch best.
    error = max(errors, key=lambda e: len(e["loc"]))
    param = error_param(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "missing":
        message += f" (got {_short_repr(error.get('input'))})"
    message = f"{param or 'Request body'}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more validation error(s))"
    return invalid_request(message, param=param)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
