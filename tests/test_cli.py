"""The `jaxchat` command: its serve command line, a real server it starts, and a chat
session on the real model (reference replies from HF)."""

import io
import json
import subprocess
import sys

import openai
import requests

from handler.cli import build_parser, run_chat, serve_command
from model.sampling_params import SamplingParams
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


def test_chat_streams_replies_and_keeps_the_conversation(llm):
    session = io.StringIO(
        "What is the capital of France?\n/reset\nWhat is the capital of France?\n"
        "And of Italy?\n/exit\n"
    )
    out = io.StringIO()
    args = build_parser().parse_args(["chat", "--temperature", "0", "--max-tokens", "32"])
    assert run_chat(args, llm=llm, stdin=session, stdout=out) == 0
    # One prompt per line read: reply, /reset (nothing), the same reply again (the
    # history was cleared), a reply in context, /exit (nothing).
    turns = out.getvalue().split("> ")[1:]
    assert turns[:4] == [CAPITAL_REPLY + "\n", "", CAPITAL_REPLY + "\n"] + turns[3:4]
    assert turns[4] == ""
    follow_up = llm.encode_chat(
        [
            *CAPITAL["messages"],
            {"role": "assistant", "content": CAPITAL_REPLY},
            {"role": "user", "content": "And of Italy?"},
        ]
    )
    expected = llm.generate(follow_up, SamplingParams(temperature=0, max_tokens=32)).text
    assert turns[3] == expected + "\n"
