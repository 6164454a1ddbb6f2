"""GET /: the playground, one static page for chatting with the served model in a browser.

The page (handler/static/playground.html, shipped in the wheel) is plain HTML with
its CSS and JavaScript inline: no build step, nothing fetched from elsewhere. It talks
to this server's own OpenAI API with relative URLs (`/v1/models`, a streamed
`/v1/chat/completions`), so it works behind any host name or proxy. The page itself
needs no API key; a key typed into it stays in the browser's localStorage and goes
to the API as `Authorization: Bearer <key>`. JAXCHAT_PLAYGROUND=0 turns the route off.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

import flask

if TYPE_CHECKING:
    from handler.app import Server
    from handler.keys import Client

# The page's own inline script and style, and requests to this origin only.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'unsafe-inline'",
        "style-src 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


@cache
def page() -> str:
    """The playground's HTML, read from the package once."""
    return (files("handler") / "static" / "playground.html").read_text(encoding="utf-8")


def playground(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /: the page, revalidated on every load so an upgrade shows at once."""
    return flask.Response(
        page(),
        content_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
        },
    )
