"""The functions-framework target: one plain function of the request.

`make_handler(settings)` returns that function. It dispatches on the path
(OpenAI routes under `/v1`, `/api/v1` or no prefix, plus `/health`), checks the
method and the API key (handler/keys.py), charges the client (handler/quota.py),
answers repeated deterministic requests from the response cache
(handler/response_cache.py), and turns every failure into an OpenAI error object:
client mistakes are 4xx, and an unexpected exception is a 500 for that request
only.
"""

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import flask

from handler import logs, sse, vertex
from handler.body import read_json
from handler.chat import chat_completion
from handler.completions import completion
from handler.embeddings import EmbeddingRequest, embed
from handler.errors import (
    RETRY_AFTER_SECONDS,
    APIError,
    error_response,
    internal_error,
    method_not_allowed,
    model_not_found,
    path_not_found,
)
from handler.generation import Reply
from handler.keys import Client, Keyring
from handler.logs import REQUEST_ID, RequestLog
from handler.metrics import Metrics
from handler.model_host import ModelHost, ServedModel
from handler.playground import playground
from handler.quota import Meter, Quota, Store, StoreUnavailable
from handler.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_request,
)
from handler.response_cache import HEADER as CACHE_HEADER
from handler.response_cache import CachedReply, ResponseCache, recording
from handler.responses import ModelCard, ModelList, json_response
from handler.settings import Settings
from handler.state import open_store

log = logging.getLogger(__name__)

Handler = Callable[[flask.Request], flask.Response]

# OpenAI clients are configured with a base URL ending in /v1 (the SDK), /api/v1
# (OpenRouter-style clients) or nothing; all reach the same routes.
API_PREFIXES = ("/api/v1", "/v1")


@dataclass(frozen=True)
class Server:
    """What every route needs: settings, the model host, the keys, limits and cache,
    and fixed reply fields."""

    settings: Settings
    host: ModelHost
    keyring: Keyring
    quota: Quota
    cache: ResponseCache
    metrics: Metrics
    created: int
    fingerprint: str

    def model_card(self, name: str) -> ModelCard:
        return ModelCard(id=name, created=self.created)


Route = Callable[[Server, flask.Request, Client | None], flask.Response]
Body = TypeVar("Body", bound=GenerationRequest)
Generate = Callable[[ServedModel, Body, str, Meter], Reply]


def make_handler(settings: Settings, host: ModelHost | None = None) -> Handler:
    """Build the HTTP handler; `host` defaults to one loading `settings.model`.

    Nothing loads here: the model loads in forked workers or on the first request.
    A keys file that cannot be read or is invalid raises ValueError.
    """
    logs.configure(settings)
    host = host or ModelHost.from_settings(settings)
    host.start_in_forked_children()
    keyring = Keyring.load(settings.api_keys, settings.keys_file)
    # JAXCHAT_API_KEYS alone keeps no state: its keys have no limits.
    store = open_store(settings) if settings.keys_file or settings.response_cache_ttl else None
    fingerprint = system_fingerprint(settings)
    server = Server(
        settings,
        host,
        keyring,
        Quota(store),
        ResponseCache(store, settings.response_cache_ttl, fingerprint),
        Metrics(host),
        int(time.time()),
        fingerprint,
    )

    def handle(request: flask.Request) -> flask.Response:
        """Answer one HTTP request."""
        host.start()
        headers = {name.lower(): value for name, value in request.headers.items()}
        entry = RequestLog.start(request.method, request.path, headers, request.remote_addr)
        try:
            response = dispatch(server, request)
        except APIError as err:
            response = error_response(err)
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            response = error_response(internal_error())
        response.headers[REQUEST_ID] = entry.request_id
        access_line(entry, response, server.metrics)
        return response

    return handle


def access_line(entry: RequestLog, response: flask.Response, metrics: Metrics) -> None:
    """Count the request and write its access line once its response is complete (a
    stream's when it ended); /health, which probes call every few seconds, logs at DEBUG."""

    def write() -> None:
        metrics.request(entry.path, response.status_code)
        if entry.path == "/health" and not log.isEnabledFor(logging.DEBUG):
            return
        size = None if response.is_streamed else response.content_length
        entry.write(response.status_code, time.monotonic() - entry.started, size)

    if response.is_streamed:
        response.call_on_close(write)
    else:
        write()


def system_fingerprint(settings: Settings) -> str:
    """Identifies the serving configuration, so clients can notice it changed."""
    config = f"{settings.model}|{settings.model_name}|{settings.dtype}|{settings.max_seq_len}"
    config += f"|{settings.kv_pool}|{settings.kv_dtype}"
    return "fp_" + hashlib.sha256(config.encode()).hexdigest()[:12]


def dispatch(server: Server, request: flask.Request) -> flask.Response:
    """Find the route for the request's path, check method and key, and run it."""
    routes, needs_key = find_routes(request.path, server.settings)
    route = routes.get(request.method)
    if route is None:
        raise method_not_allowed(request.method, request.path, sorted(routes))
    client = None
    if needs_key:
        client = server.keyring.authenticate(request.headers.get("Authorization"))
    return route(server, request, client)


def find_routes(path: str, settings: Settings) -> tuple[dict[str, Route], bool]:
    """The routes by method for `path`, and whether they need an API key."""
    if path == settings.vertex_predict_route:
        return {"POST": vertex_predict}, False  # Vertex AI's IAM authenticates callers
    if path in ("/health", settings.vertex_health_route):
        return {"GET": health}, False
    if path == "/metrics":
        return {"GET": metrics}, False
    if path == "/" and settings.playground:
        return {"GET": playground}, False  # the page sends the key it is given to the API
    for prefix in API_PREFIXES:
        if path.startswith(prefix + "/"):
            path = path.removeprefix(prefix)
            break
    if path == "/chat/completions":
        return {"POST": chat_completions}, True
    if path == "/completions":
        return {"POST": completions}, True
    if path == "/embeddings":
        return {"POST": embeddings}, True
    if path == "/models":
        return {"GET": list_models}, True
    if path.startswith("/models/") and len(path) > len("/models/"):
        return {"GET": retrieve_model}, True
    if path == "/usage":
        return {"GET": usage}, True
    raise path_not_found(path)


def generation_route(name: str, schema: type[Body], generate: Generate[Body]) -> Route:
    """A route that validates its body as `schema`, for a model this server serves and
    the client may use, and answers from the response cache or with
    `generate(llm, body, fingerprint, meter)`, charging the client for it."""

    def route(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
        body = parse_request(schema, read_json(request, server.settings.max_request_bytes))
        entry = served_model(server, body.model, client)
        meter = server.quota.meter(client)
        key = server.cache.key(name, body)
        hit = server.cache.get(key) if key is not None else None
        if hit is not None:
            if not server.settings.cache_hits_free:
                meter.admit(hit.tokens, final=True)
            response = cached_response(hit)
            if entry is not None:
                entry.prompt_tokens, entry.completion_tokens = (
                    hit.prompt_tokens,
                    hit.completion_tokens,
                )
        else:
            try:
                reply = generate(server.host.llm(), body, server.fingerprint, meter)
            except BaseException:
                meter.settle(0)
                raise
            response = reply_response(server, reply, meter, key, entry)
        response.headers.update(meter.headers)
        if key is not None:
            result = "miss" if hit is None else "hit"
            response.headers[CACHE_HEADER] = result
            server.metrics.cache.labels(result).inc()
            if entry is not None:
                entry.cache = result
        return response

    return route


def served_model(server: Server, model: str, client: Client | None) -> RequestLog | None:
    """404 unless the request names a model this server serves and the client may use;
    the request's log entry (if any) notes both."""
    if model not in server.settings.model_names or (
        client is not None and not client.may_use(model)
    ):
        raise model_not_found(model)
    entry = logs.current.get()
    if entry is not None:
        entry.model, entry.client = model, client.name if client else None
    return entry


def embeddings(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """POST /v1/embeddings (handler/embeddings.py)."""
    body = parse_request(EmbeddingRequest, read_json(request, server.settings.max_request_bytes))
    entry = served_model(server, body.model, client)
    meter = server.quota.meter(client)
    reply = embed(server.host.llm(), body, meter)
    server.metrics.prompt_tokens.inc(reply.usage.prompt_tokens)
    if entry is not None:
        entry.prompt_tokens, entry.completion_tokens = reply.usage.prompt_tokens, 0
    return json_response(reply, headers=meter.headers)


def reply_response(
    server: Server, reply: Reply, meter: Meter, key: str | None, entry: RequestLog | None
) -> flask.Response:
    """The HTTP response of a generated reply; once it ended, the client is charged and
    the access line and metrics count its tokens, and a complete reply is cached."""
    cache = server.cache
    done = threading.Event()

    def ended() -> None:
        """Once: a stream's close runs when its events end and when the server closes it."""
        if done.is_set():
            return
        done.set()
        meter.settle(reply.used())
        prompt, completion = reply_tokens(reply)
        if entry is not None:
            entry.prompt_tokens, entry.completion_tokens = prompt, completion
            entry.finish_reasons = reply.finish_reasons()
            now, first = time.monotonic(), reply.first_token_at()
            server.metrics.generation(
                now - entry.started,
                None if first is None else first - entry.started,
                prompt,
                completion,
                entry.finish_reasons,
            )

    if reply.body is not None:
        ended()
        response = json_response(reply.body)
        if key is not None:
            body = response.get_data(as_text=True)
            cache.put(key, CachedReply(*reply_tokens(reply), body=body))
        return response
    assert reply.events is not None, "a reply is a body or events"
    events = reply.events
    if key is not None:

        def store(seen: tuple[str, ...]) -> None:
            cache.put(key, CachedReply(*reply_tokens(reply), events=seen))

        events = recording(events, store)

    def close() -> None:
        reply.close()
        ended()

    return sse.stream_response(events, close)


def reply_tokens(reply: Reply) -> tuple[int, int]:
    """(prompt, completion) tokens of a reply."""
    return reply.prompt_tokens(), reply.completion_tokens()


def cached_response(hit: CachedReply) -> flask.Response:
    """A cached reply, with a new id and created."""
    if hit.body is not None:
        return flask.Response(hit.renewed_body(), mimetype="application/json")
    return sse.stream_response(hit.renewed_events(), lambda: None)


# POST /v1/chat/completions, and the legacy prompt API POST /v1/completions.
chat_completions = generation_route("chat", ChatCompletionRequest, chat_completion)
completions = generation_route("completions", CompletionRequest, completion)


def list_models(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /v1/models: the model this server serves, under its id and each alias."""
    names = server.settings.model_names
    cards = [server.model_card(n) for n in names if client is None or client.may_use(n)]
    return json_response(ModelList(data=cards))


def retrieve_model(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /v1/models/{id}."""
    model_id = request.path.split("/models/", 1)[1]
    if model_id not in server.settings.model_names or (
        client is not None and not client.may_use(model_id)
    ):
        raise model_not_found(model_id, param=None)
    return json_response(server.model_card(model_id))


def vertex_predict(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """POST $AIP_PREDICT_ROUTE: Vertex AI's predict contract (handler/vertex.py)."""
    body = read_json(request, server.settings.max_request_bytes)
    names = server.settings.model_names
    answer = vertex.predict(
        server.host.llm, body, model_names=names, fingerprint=server.fingerprint
    )
    return json_response(answer)


def metrics(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /metrics: Prometheus's text format (handler/metrics.py)."""
    return server.metrics.response()


def usage(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /v1/usage: the calling key's usage, remaining budget and period."""
    if client is None or server.quota.store is None:
        raise path_not_found(request.path, "This server keeps usage for keys of JAXCHAT_KEYS_FILE.")
    return json_response(server.quota.report(client))


def health(server: Server, request: flask.Request, client: Client | None) -> flask.Response:
    """GET /health: 200 once the model is warm, 503 while loading or after a failed load.

    With a state store, it says whether the store answers (`"state"`): a server whose
    Redis is down still serves (budgets fail closed, the cache open), so it stays 200."""
    status = server.host.status
    if status == "ready":
        return json_response({"status": "ok", **state_health(server.quota.store)})
    if status == "loading":
        return json_response(
            {"status": "loading"}, 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
    return json_response({"status": "failed", "error": server.host.error}, 503)


def state_health(store: Store | None) -> dict[str, object]:
    """The state store's part of /health (nothing without a store)."""
    if store is None:
        return {}
    try:
        store.ping()
    except StoreUnavailable as exc:
        log.error("state store %s unreachable: %s", store.kind, exc)
        return {"state": {"store": store.kind, "reachable": False, "error": str(exc)}}
    return {"state": {"store": store.kind, "reachable": True}}
