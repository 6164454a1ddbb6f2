"""Vertex AI's custom-container prediction contract.

Vertex AI sets `AIP_HTTP_PORT` (the Dockerfile listens on it), `AIP_HEALTH_ROUTE`
and `AIP_PREDICT_ROUTE`. A predict body is `{"instances": [...], "parameters":
{...}}`: each instance is a chat request body (with `messages`) or a completions
body (with `prompt`), with `parameters` as defaults for every instance's fields,
and `model` defaulting to the served model's id. The answer is `{"predictions":
[...]}`, each prediction the OpenAI reply to its instance. Instances run at once,
so they decode in one batch. Vertex authenticates callers with IAM before they
reach the container, so this route takes no API key; an invalid instance fails the
whole request with a 400 naming it.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from handler.chat import chat_completion
from handler.completions import completion
from handler.errors import APIError, invalid_request
from handler.generation import Reply
from handler.model_host import ServedModel
from handler.quota import Meter, Quota
from handler.requests import ChatCompletionRequest, CompletionRequest, parse_request

MAX_INSTANCES = 64


def predict(
    llm: Callable[[], ServedModel],
    body: Any,
    *,
    model_names: list[str],
    fingerprint: str,
) -> dict[str, list[Any]]:
    """The predictions for a decoded predict body (APIError for a bad one)."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise invalid_request("A predict body is {'instances': [...], 'parameters': {...}}.")
    instances, parameters = body["instances"], body.get("parameters") or {}
    if not instances or len(instances) > MAX_INSTANCES:
        raise invalid_request(f"Send 1 to {MAX_INSTANCES} instances.", param="instances")
    if not isinstance(parameters, dict):
        raise invalid_request("parameters must be an object.", param="parameters")
    jobs = [job(i, x, parameters, model_names) for i, x in enumerate(instances)]
    served = llm()
    with ThreadPoolExecutor(len(jobs), thread_name_prefix="predict") as pool:
        replies = list(pool.map(lambda run: run(served, fingerprint), jobs))
    return {"predictions": [r.body.model_dump(mode="json") for r in replies if r.body]}


def job(
    index: int, instance: Any, parameters: dict[str, Any], model_names: list[str]
) -> Callable[[ServedModel, str], Reply]:
    """One instance validated as a chat or completions request, ready to run."""
    if not isinstance(instance, dict):
        raise invalid_request(f"instances.{index} must be an object.", param=f"instances.{index}")
    fields = {"model": model_names[0], **parameters, **instance}
    if fields.get("stream"):
        raise invalid_request("Vertex AI predictions are not streamed.", param=f"instances.{index}")
    try:
        if "messages" in fields:
            chat = parse_request(ChatCompletionRequest, fields)
            request: ChatCompletionRequest | CompletionRequest = chat
        else:
            request = parse_request(CompletionRequest, fields)
    except APIError as err:
        err.message = f"instances.{index}: {err.message}"
        err.param = f"instances.{index}.{err.param}" if err.param else f"instances.{index}"
        raise
    if request.model not in model_names:
        raise invalid_request(
            f"instances.{index}: the model '{request.model}' is not served here.",
            param=f"instances.{index}.model",
        )
    unmetered = Meter(Quota(None), None)

    def run(llm: ServedModel, fingerprint: str) -> Reply:
        if isinstance(request, ChatCompletionRequest):
            return chat_completion(llm, request, fingerprint, unmetered)
        return completion(llm, request, fingerprint, unmetered)

    return run
