"""Server-sent events: the framing of streamed replies, and the streamed response.

Each event is one `data: <json>` line and a blank line; the stream ends with
`data: [DONE]`. Once the headers went out, a failure can no longer be an HTTP
error: it becomes an `{"error": {...}}` event, followed by `[DONE]`.
"""

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flask
from pydantic import BaseModel

from handler.errors import APIError, internal_error

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/event-stream"
# Stop proxies (nginx, Cloud Run's front end honours it too) from buffering the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel | dict[str, Any]) -> str:
    """One `data: {json}` event for a pydantic model or a plain dict."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


def error(err: APIError) -> str:
    """An `{"error": {...}}` event, for failures after the headers went out."""
    return event(err.body())


def done() -> str:
    """The terminating `data: [DONE]` event."""
    return "data: [DONE]\n\n"


def stream_response(events: Iterator[str], close: Callable[[], None]) -> flask.Response:
    """The streamed response of `events`, then `[DONE]`; an exception among them
    becomes an error event. `close` cancels the generation: it runs when the events
    end or fail, when the client disconnects, and when the body is never iterated."""

    def body() -> Iterator[str]:
        try:
            yield from events
        except Exception:
            log.exception("generation failed after the response started")
            yield error(internal_error())
        finally:
            # Runs on client disconnect too (GeneratorExit).
            close()
        yield done()

    response = flask.Response(body(), mimetype=CONTENT_TYPE, headers=HEADERS)
    response.call_on_close(close)
    return response
