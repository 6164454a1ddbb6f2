"""The request body: its size, its Content-Type, and JSON that is valid Unicode.

Every check here is a 4xx in OpenAI's shape. A body is JSON when its
Content-Type is `application/json` (or `application/*+json`), or when it has
none; anything else is a 400, also because `text/plain` and form bodies are
what a browser may send cross-site without asking first. `NaN`/`Infinity`
are not JSON. Text must be valid Unicode: a lone UTF-16 surrogate escape
(`"\\ud800"`) decodes to a Python string that no tokenizer can take, so it is
a 400 naming the field it is in, as is nesting deeper than any request needs.
"""

import json
import re
from typing import Any

import flask

from handler.errors import invalid_request, request_too_large

READ_CHUNK_BYTES = 64 * 1024
# Deeper than any request or JSON schema needs, and shallow enough for every
# recursive consumer (the chat template's tojson, the grammar compiler).
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_json(request: flask.Request, limit: int) -> Any:
    """The request body decoded as JSON and checked (see the module docstring).

    Raises a 413 APIError beyond `limit` bytes and a 400 for everything else.
    """
    check_content_type(request.mimetype)
    if request.content_length is not None and request.content_length > limit:
        raise request_too_large(limit)
    body = _read_at_most(request, limit + 1)
    if len(body) > limit:
        raise request_too_large(limit)
    try:
        value = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise invalid_request(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    check_text(value)
    return value


def check_content_type(mimetype: str) -> None:
    """400 unless the body is declared as JSON (or not declared at all)."""
    if not mimetype or mimetype == "application/json" or mimetype.endswith("+json"):
        return
    raise invalid_request(
        f"The request body must be JSON, sent with 'Content-Type: application/json' "
        f"(got '{mimetype}').",
        code="invalid_content_type",
    )


def check_text(value: Any) -> None:
    """400 naming the first field that holds a lone surrogate or nests too deep."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise invalid_request(
                f"{_name(path[:MAX_DEPTH])}: the request nests deeper than {MAX_DEPTH} levels.",
                param=_name(path[:1]) or None,
            )
        if isinstance(item, str):
            _check_string(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, str(i))) for i, child in enumerate(item))


def _check_string(text: str, path: tuple[str, ...]) -> None:
    if _SURROGATE.search(text):
        param = _name(path) or None
        raise invalid_request(
            f"{param or 'Request body'}: the text is not valid Unicode (it holds a lone "
            "surrogate such as '\\ud800', the half of a UTF-16 pair).",
            param=param,
            code="invalid_unicode",
        )


def _name(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")


def _read_at_most(request: flask.Request, size: int) -> bytes:
    # Read the stream in bounded pieces: a chunked body has no Content-Length
    # to check up front, and one read() may return less than asked.
    chunks: list[bytes] = []
    total = 0
    while total < size:
        chunk = request.stream.read(min(READ_CHUNK_BYTES, size - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
