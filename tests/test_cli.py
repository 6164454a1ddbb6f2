"""The `jaxchat` command: its serve command line, a real server it starts, and a chat
session in a real subprocess on the real model (reference replies from HF)."""

import json
import os
import subprocess
import sys

import openai
import requests

from handler.cli import build_parser, serve_command
from tests.server_process import REPO, free_port, wait_until_healthy

GOLDEN = json.loads((REPO / "tests" / "fixtures" / "smollm2_golden.json").read_text())
CAPITAL = GOLDEN["prompts"][0]
CAPITAL_REPLY = "The capital of France is Paris."
JAXCHAT = [sys.executable, "-m", "handler.cli"]


def test_serve_options_become_settings():
    args = _parse(["serve", "--model", "gs://b/m.gguf", "--max-batch", "4", "--port", "9000"])
    command, env = serve_command(args)
    assert env == {"JAXCHAT_MODEL": "gs://b/m.gguf", "JAXCHAT_MAX_BATCH": "4", "PORT": "9000"}
    assert command[1:4] == ["-m", "functions_framework", "--target=app"]
    assert command[4] == f"--source={REPO / 'main.py'}" and "--port=9000" in command


def _parse(argv):
    return build_parser().parse_args(argv)


def test_serve_runs_the_server(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *JAXCHAT,
                "serve",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--max-seq-len",
                "256",
                "--max-batch",
                "2",
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_path)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=CAPITAL["messages"], temperature=0
        )
        assert reply.choices[0].message.content == CAPITAL_REPLY
        assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_chat_streams_replies_and_keeps_the_conversation():
    session = "What is the capital of France?\n/reset\nWhat is the capital of France?\n/exit\n"
    result = subprocess.run(
        [*JAXCHAT, "chat", "--temperature", "0", "--max-tokens", "32", "--max-seq-len", "256"],
        input=session,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Two identical greedy turns (the second after /reset), each the reference reply.
    # One prompt per line read: reply, /reset (nothing), reply, /exit (nothing).
    turns = result.stdout.split("> ")[1:]
    assert turns == [CAPITAL_REPLY + "\n", "", CAPITAL_REPLY + "\n", ""]
    assert "loading" in result.stderr and "loaded in" in result.stderr
