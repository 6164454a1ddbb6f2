"""OpenAI-shaped errors: one exception type and the JSON response it becomes.

Body: `{"error": {"message", "type", "param", "code"}}`. The status codes and
types follow OpenAI; clients (the official SDK first) map them to exception
classes and retry only 408, 409, 429 and 5xx, so a client's mistake must
never be a 5xx.
"""

import json

import flask

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

    def body(self) -> dict:
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
    return flask.Response(
        json.dumps(error.body()),
        status=error.status,
        mimetype="application/json",
        headers=error.headers,
    )


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is malformed or asks for something out of range."""
    return APIError(400, message, "invalid_request_error", param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    """400 for a valid OpenAI parameter that this server does not implement yet."""
    return invalid_request(
        f"{what} is not supported yet.", param=param, code="unsupported_parameter"
    )


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


def path_not_found(path: str) -> APIError:
    """404 for a URL this server has no route for."""
    return APIError(404, f"Unknown URL: {path}", "not_found_error", code="unknown_url")


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
    return APIError(
        413,
        f"The request body exceeds the limit of {limit} bytes.",
        "invalid_request_error",
        code="request_too_large",
    )


def model_loading() -> APIError:
    """503 while the model loads and compiles; the client should retry later."""
    return APIError(
        503,
        "The model is loading; retry shortly.",
        "server_error",
        code="model_loading",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def overloaded(detail: str) -> APIError:
    """503 when the engine's waiting queue is full; the client should retry later."""
    return APIError(
        503,
        f"The server is overloaded ({detail}); retry shortly.",
        "server_error",
        code="overloaded",
        headers={"Retry-After": "1"},
    )


def model_failed() -> APIError:
    """503 when the model failed to load; retrying this process will not help."""
    return APIError(503, "The model failed to load.", "server_error", code="model_load_failed")


def engine_failed() -> APIError:
    """503 when the engine failed (a device fault): this instance serves no more, and
    /health says so, so that the platform replaces it."""
    return APIError(
        503,
        "The inference engine of this server instance failed; retry on another instance.",
        "server_error",
        code="engine_failed",
    )


def internal_error() -> APIError:
    """500 for an unexpected failure while serving one request."""
    return APIError(500, "The server had an error while processing your request.", "server_error")
