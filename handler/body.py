"""The request body: its size, its Content-Type, and JSON that is valid Unicode.

Every check here is a 4xx in OpenAI's shape. The size limit is Werkzeug's
`max_content_length`, set per request: a declared Content-Length beyond it is
refused before reading, and a chunked body once it passes it. A body is JSON
when its Content-Type is `application/json` (or `application/*+json`), or when
it has none; anything else is a 400, also because `text/plain` and form bodies are
what a browser may send cross-site without asking first. `NaN`/`Infinity`
are not JSON. Text must be valid Unicode: a lone UTF-16 surrogate escape
(`"\\ud800"`) decodes to a Python string that no tokenizer can take, so it is
a 400 naming the field it is in, as is nesting deeper than any request needs.
"""

import json
import re
from typing import Any

import flask
from werkzeug.exceptions import RequestEntityTooLarge

from handler.errors import invalid_request, request_too_large

# Deeper than any request or JSON schema needs, and shallow enough for every
# recursive consumer (the chat template's tojson, the grammar compiler).
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_json(request: flask.Request, limit: int) -> Any:
    """The request body decoded as JSON and checked (see the module docstring).

    Raises a 413 APIError beyond `limit` bytes and a 400 for everything else.
    """
    check_content_type(request.mimetype)
    body = read_body(request, limit)
    try:
        value = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise invalid_request(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    check_text(value)
    return value


def read_body(request: flask.Request, limit: int) -> bytes:
    """The body; a 413 APIError beyond `limit` bytes, as Werkzeug's `max_content_length`
    finds it: a declared Content-Length is refused before reading; a chunked body is
    cut at the limit, and reading on then raises (so a chunked body must stay under it)."""
    request.max_content_length = limit
    try:
        body = request.get_data()
        request.stream.read(1)
    except RequestEntityTooLarge:
        raise request_too_large(limit) from None
    finally:
        # functions-framework reads the body again after the reply (cached, unless
        # the limit refused it): lift the limit for that.
        request.max_content_length = None
    return body


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
