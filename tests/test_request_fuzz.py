"""Generated requests (tests/request_fuzz.py) against the real model: none gets a 5xx,
every 4xx is an OpenAI error object, and the engine still answers a normal request with
the Hugging Face reference's greedy reply afterwards. Six hundred go through the Flask test
client of the functions-framework app, a smaller run to the real server process
(JAXCHAT_FUZZ_EXAMPLES=N sends N per route through the app instead, for a deeper run).
"""

import json
import os
import time
from collections import Counter

import pytest
import requests as http
from hypothesis import HealthCheck, given, settings

from handler.model_host import ModelHost
from handler.settings import Settings
from tests.function_app import app_client
from tests.request_fuzz import CHAT, COMPLETIONS, MODEL, Request, check_reply, requests
from tests.server_process import KEY

EXAMPLES = {"client": int(os.environ.get("JAXCHAT_FUZZ_EXAMPLES", 300)), "server": 150}


def fuzz(route: str, examples: int, send) -> Counter:
    """Send `examples` generated requests for `route` through `send`; the status counts."""
    statuses: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(route))
    def one(request: Request) -> None:
        status, content_type, text = send(request)
        statuses[status] += 1
        check_reply(status, content_type, text)

    one()
    print(f"{route}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    return statuses


def assert_still_serves(post, golden: dict) -> None:
    """A normal streamed greedy request gets the reference reply."""
    capital = golden["prompts"][0]
    body = {"model": MODEL, "messages": capital["messages"], "temperature": 0, "stream": True}
    status, _, text = post(CHAT, body)
    assert status == 200, text
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    reply = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert reply == "The capital of France is Paris."


@pytest.fixture(scope="module")
def client(llm, tmp_path_factory):
    """The functions-framework app serving the real model (the session's `llm`)."""
    host = ModelHost(lambda: llm)
    assert host.wait(60) == "ready"
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield app_client(monkeypatch, tmp_path_factory.mktemp("app"), host, Settings())


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_generated_requests_through_the_app_get_no_5xx(client, llm, golden, route):
    def send(request: Request):
        response = client.post(request.path, data=request.data, content_type=request.content_type)
        return response.status_code, response.content_type, response.get_data(as_text=True)

    statuses = fuzz(route, EXAMPLES["client"], send)
    assert sum(statuses.values()) == EXAMPLES["client"]
    assert statuses[200] >= 15 and statuses[400] >= 100  # both valid and broken bodies ran

    def post(path: str, body: dict):
        response = client.post(path, json=body)
        return response.status_code, response.content_type, response.get_data(as_text=True)

    assert_still_serves(post, golden)
    # The reply's last event can reach the client just before the scheduler frees its slot.
    deadline = time.monotonic() + 10
    while llm.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not llm.failed and llm.scheduler.active == 0


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_generated_requests_to_the_server_process_get_no_5xx(base_url, golden, route):
    session = http.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"

    def send(request: Request):
        headers = {"Content-Type": request.content_type} if request.content_type else {}
        response = session.post(base_url + request.path, data=request.data, headers=headers)
        return response.status_code, response.headers.get("Content-Type", ""), response.text

    statuses = fuzz(route, EXAMPLES["server"], send)
    assert statuses[200] >= 2 and statuses[400] >= 50

    def post(path: str, body: dict):
        response = session.post(base_url + path, json=body)
        return response.status_code, response.headers.get("Content-Type", ""), response.text

    assert_still_serves(post, golden)
