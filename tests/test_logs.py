"""Structured logs: the JSON lines Cloud Logging reads, traces, and the access line,
through the app over the fake engine (whose token counts are known)."""

import json
import logging

import pytest

from handler.logs import JsonFormatter, RequestLog, trace_id
from tests.fake_model import CHAT, HELLO_PROMPT_TOKENS, chat_body, sse_events

TRACE = "105445aa7843bc8bf206b12000100000"


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"x-cloud-trace-context": f"{TRACE}/1;o=1"}, (TRACE, "1")),
        ({"x-cloud-trace-context": TRACE.upper()}, (TRACE, None)),
        ({"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}, (TRACE, str(0x00F067AA0BA902B7))),
        ({"traceparent": "garbage"}, None),
        ({}, None),
    ],
)
def test_traces_come_from_either_header(headers, expected):
    assert trace_id(headers) == expected


def test_a_record_within_a_request_names_its_trace(monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj")
    RequestLog.start("POST", CHAT, {"x-cloud-trace-context": f"{TRACE}/7"}, None)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "careful: %d", (3,), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "WARNING" and entry["message"] == "careful: 3"
    assert entry["logging.googleapis.com/trace"] == f"projects/proj/traces/{TRACE}"
    assert entry["logging.googleapis.com/spanId"] == "7" and len(entry["requestId"]) == 32


def access_lines(output: str) -> list[dict]:
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    return [line for line in lines if line.get("logger") == "jaxchat.access"]


def test_every_request_gets_one_json_access_line_without_its_key(serve, tmp_path, capsys):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.team]\nkey = "sk-secret-team"\nrequests_per_minute = 2\n')
    client = serve(keys_file=str(keys), state_dir=str(tmp_path), log_format="json")
    auth = {"Authorization": "Bearer sk-secret-team"}
    capsys.readouterr()
    reply = client.post(CHAT, json=chat_body(), headers={**auth, "X-Request-Id": "req-1"})
    assert reply.headers["X-Request-Id"] == "req-1"
    streamed = client.post(CHAT, json=chat_body(stream=True), headers=auth)
    assert sse_events(streamed)[-1] == "[DONE]"
    streamed.close()  # as a WSGI server does once it sent the body
    assert client.post(CHAT, json=chat_body(), headers=auth).status_code == 429
    assert client.get("/v1/models").status_code == 401
    output = capsys.readouterr().out
    assert "sk-secret-team" not in output
    first, streamed, limited, unauthorized = access_lines(output)
    assert first["requestId"] == "req-1" and first["severity"] == "INFO"
    assert first["httpRequest"]["requestMethod"] == "POST"
    assert first["httpRequest"]["requestUrl"] == CHAT
    assert first["httpRequest"]["status"] == 200
    assert first["httpRequest"]["latency"].endswith("s")
    assert (first["model"], first["client"], first["finish_reason"]) == (
        "smollm2-135m-instruct",
        "team",
        "stop",
    )
    assert (first["prompt_tokens"], first["completion_tokens"]) == (HELLO_PROMPT_TOKENS, 13)
    # The stream's line is written when it ended, with its tokens.
    assert streamed["httpRequest"]["status"] == 200 and streamed["completion_tokens"] == 13
    assert len(streamed["requestId"]) == 32 and streamed["requestId"] != first["requestId"]
    assert limited["httpRequest"]["status"] == 429 and limited["completion_tokens"] == 0
    assert unauthorized["httpRequest"]["status"] == 401 and "client" not in unauthorized


def test_text_logs_by_default_off_cloud_run(serve, monkeypatch, capsys):
    monkeypatch.delenv("K_SERVICE", raising=False)
    client = serve()
    capsys.readouterr()
    client.post(CHAT, json=chat_body())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert " INFO jaxchat.access: POST /v1/chat/completions 200 " in line
    assert "prompt_tokens=9 completion_tokens=13 finish_reason=stop" in line
    monkeypatch.setenv("K_SERVICE", "jaxchat")
    client = serve()
    capsys.readouterr()
    client.post(CHAT, json=chat_body())
    assert access_lines(capsys.readouterr().out)[0]["completion_tokens"] == 13
