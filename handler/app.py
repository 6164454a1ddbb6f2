"""The functions-framework target: one plain function of the request.

`make_handler(settings)` returns that function. It dispatches on the path
(OpenAI routes under `/v1`, `/api/v1` or no prefix, plus `/health`), checks the
method and the API key, and turns every failure into an OpenAI error object:
client mistakes are 4xx, and an unexpected exception is a 500 for that request
only.
"""

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import flask

from handler.body import read_json
from handler.chat import chat_completion
from handler.completions import completion
from handler.errors import (
    RETRY_AFTER_SECONDS,
    APIError,
    authentication_failed,
    error_response,
    internal_error,
    method_not_allowed,
    model_not_found,
    path_not_found,
)
from handler.model_host import ModelHost, ServedModel
from handler.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_request,
)
from handler.responses import ModelCard, ModelList, json_response
from handler.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[flask.Request], flask.Response]

# OpenAI clients are configured with a base URL ending in /v1 (the SDK), /api/v1
# (OpenRouter-style clients) or nothing; all reach the same routes.
API_PREFIXES = ("/api/v1", "/v1")


@dataclass(frozen=True)
class Server:
    """What every route needs: settings, the model host and fixed reply fields."""

    settings: Settings
    host: ModelHost
    created: int
    fingerprint: str

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created)


Route = Callable[[Server, flask.Request], flask.Response]
Body = TypeVar("Body", bound=GenerationRequest)


def make_handler(settings: Settings, host: ModelHost | None = None) -> Handler:
    """Build the HTTP handler; `host` defaults to one loading `settings.model`.

    Nothing loads here: the model loads in forked workers or on the first request.
    """
    host = host or ModelHost.from_settings(settings)
    host.start_in_forked_children()
    server = Server(settings, host, int(time.time()), system_fingerprint(settings))

    def handle(request: flask.Request) -> flask.Response:
        """Answer one HTTP request."""
        host.start()
        try:
            return dispatch(server, request)
        except APIError as err:
            return error_response(err)
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return error_response(internal_error())

    return handle


def system_fingerprint(settings: Settings) -> str:
    """Identifies the serving configuration, so clients can notice it changed."""
    config = f"{settings.model}|{settings.model_name}|{settings.dtype}|{settings.max_seq_len}"
    config += f"|{settings.kv_pool}"
    return "fp_" + hashlib.sha256(config.encode()).hexdigest()[:12]


def dispatch(server: Server, request: flask.Request) -> flask.Response:
    """Find the route for the request's path, check method and key, and run it."""
    routes, needs_key = find_routes(request.path)
    route = routes.get(request.method)
    if route is None:
        raise method_not_allowed(request.method, request.path, sorted(routes))
    if needs_key:
        check_api_key(server.settings.api_keys, request.headers.get("Authorization"))
    return route(server, request)


def find_routes(path: str) -> tuple[dict[str, Route], bool]:
    """The routes by method for `path`, and whether they need an API key."""
    if path == "/health":
        return {"GET": health}, False
    for prefix in API_PREFIXES:
        if path.startswith(prefix + "/"):
            path = path.removeprefix(prefix)
            break
    if path == "/chat/completions":
        return {"POST": chat_completions}, True
    if path == "/completions":
        return {"POST": completions}, True
    if path == "/models":
        return {"GET": list_models}, True
    if path.startswith("/models/") and len(path) > len("/models/"):
        return {"GET": retrieve_model}, True
    raise path_not_found(path)


def check_api_key(keys: list[str], authorization: str | None) -> None:
    """Raise a 401 unless `authorization` is `Bearer <one of keys>`; no keys = open."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise authentication_failed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
    offered = token.strip().encode()
    # Compare with every key, without stopping early, so timing reveals nothing.
    matches = [hmac.compare_digest(offered, key.encode()) for key in keys]
    if not any(matches):
        raise authentication_failed("Incorrect API key provided.")


def generation_route(
    schema: type[Body], generate: Callable[[ServedModel, Body, str], flask.Response]
) -> Route:
    """A route that validates its body as `schema`, for a model this server serves,
    and answers with `generate(llm, body, fingerprint)`."""

    def route(server: Server, request: flask.Request) -> flask.Response:
        body = parse_request(schema, read_json(request, server.settings.max_request_bytes))
        if body.model not in server.settings.model_names:
            raise model_not_found(body.model)
        return generate(server.host.llm(), body, server.fingerprint)

    return route


# POST /v1/chat/completions, and the legacy prompt API POST /v1/completions.
chat_completions = generation_route(ChatCompletionRequest, chat_completion)
completions = generation_route(CompletionRequest, completion)


def list_models(server: Server, request: flask.Request) -> flask.Response:
    """GET /v1/models: the model this server serves, under its id and each alias."""
    cards = [server.model_card(name) for name in server.settings.model_names]
    return json_response(ModelList(data=cards))


def retrieve_model(server: Server, request: flask.Request) -> flask.Response:
    """GET /v1/models/{id}."""
    model_id = request.path.split("/models/", 1)[1]
    if model_id not in server.settings.model_names:
        raise model_not_found(model_id, param=None)
    return json_response(server.model_card(model_id))


def health(server: Server, request: flask.Request) -> flask.Response:
    """GET /health: 200 once the model is warm, 503 while loading or after a failed load."""
    status = server.host.status
    if status == "ready":
        return json_response({"status": "ok"})
    if status == "loading":
        return json_response(
            {"status": "loading"}, 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
    return json_response({"status": "failed", "error": server.host.error}, 503)
