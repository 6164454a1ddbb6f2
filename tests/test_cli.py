"""The `jaxchat` command: its serve command line, the real server it starts (the e2e
server), and a chat session on the real model (reference replies from HF)."""

import io
import json

from handler.cli import build_parser, run_chat, serve_command
from handler.settings import Settings
from model.types import SamplingParams
from tests.server_process import REPO

GOLDEN = json.loads((REPO / "tests" / "fixtures" / "smollm2_golden.json").read_text())
CAPITAL = GOLDEN["prompts"][0]
CAPITAL_REPLY = "The capital of France is Paris."


def test_serve_options_become_settings():
    args = _parse(["serve", "--model", "gs://b/m.gguf", "--max-batch", "4", "--port", "9000"])
    command, env = serve_command(args)
    assert env == {"JAXCHAT_MODEL": "gs://b/m.gguf", "JAXCHAT_MAX_BATCH": "4", "PORT": "9000"}
    assert command[1:4] == ["-m", "functions_framework", "--target=app"]
    assert command[4] == f"--source={REPO / 'main.py'}" and "--port=9000" in command


def test_the_readme_lists_every_setting():
    settings = (REPO / "README.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    variables = [Settings.variable(name) for name in Settings.model_fields]
    assert [v for v in variables if f"`{v}`" not in settings] == []


def test_every_serve_option_is_helped_by_its_settings_docstring():
    [serve] = [
        choice
        for action in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
        for name, choice in action.choices.items()
        if name == "serve"
    ]
    helps = {a.dest: a.help for a in serve._actions}
    docs = Settings.docs()
    assert sorted(docs) == sorted(Settings.model_fields)
    assert (
        docs["port"] == "Port to listen on, from the plain `PORT` variable (as Cloud Run sets it)."
    )
    for name in Settings.model_fields:
        assert len(docs[name]) > 20, name
        assert helps[name] == f"{docs[name]} ({Settings.variable(name)})".replace("%", "%%")


def test_boolean_settings_are_flag_pairs(monkeypatch):
    args = _parse(["serve", "--keys-file", "gs://b/keys.toml", "--cache-hits-free"])
    _, env = serve_command(args)
    assert env == {"JAXCHAT_KEYS_FILE": "gs://b/keys.toml", "JAXCHAT_CACHE_HITS_FREE": "True"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().cache_hits_free is True
    assert serve_command(_parse(["serve", "--no-cache-hits-free"]))[1] == {
        "JAXCHAT_CACHE_HITS_FREE": "False"
    }


def _parse(argv):
    return build_parser().parse_args(argv)


def test_the_e2e_server_is_started_by_jaxchat_serve(client):
    """tests/server_process.py runs `jaxchat serve`; every e2e test goes through it."""
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=CAPITAL["messages"], temperature=0
    )
    assert reply.choices[0].message.content == CAPITAL_REPLY


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
