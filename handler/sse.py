"""Server-sent-events framing for streamed chat completions.

Each event is one `data: <json>` line and a blank line; the stream ends with
`data: [DONE]`. Lines starting with ":" are comments that clients ignore, which
makes them safe keep-alives.
"""

import json

from pydantic import BaseModel

from handler.errors import APIError

CONTENT_TYPE = "text/event-stream"
# Stop proxies (nginx, Cloud Run's front end honours it too) from buffering the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel | dict) -> str:
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


def comment(text: str = "") -> str:
    """A comment line: ignored by clients, keeps idle connections open."""
    return f": {text}\n\n"
