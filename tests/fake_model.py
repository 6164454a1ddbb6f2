"""A fake engine whose every output is computable by hand, and the functions-framework
app serving it (`serve`), for the handler's tests."""

import json
import os

import pytest

from handler.model_host import ModelHost
from handler.settings import Settings
from model.engine.scheduler import QueueFull
from model.engine.stats import SchedulerStats
from model.llm import LLM
from model.types import Delta, SamplingParams
from tests.function_app import app_client

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
# The fake's reply, one delta per piece and one token per character (13 tokens).
REPLY_PIECES = ("Hello", ",", " world", "!")
REPLY = "".join(REPLY_PIECES)
# "user: hi\n" is the fake's rendering of HELLO: 9 tokens.
HELLO = [{"role": "user", "content": "hi"}]
HELLO_PROMPT_TOKENS = 9


class CharTokenizer:
    """One token per character; the id is the code point. No BOS unless one is given."""

    def __init__(self, bos_id: int | None = None) -> None:
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def token_bytes(self, token_id: int) -> bytes:
        return chr(token_id).encode()


class FakeGrammars:
    """Grammar "compilation" that names what was asked for."""

    def tool_calls(self, tools: list[dict], *, name: str | None = None, parallel: bool = True):
        return f"tool_calls name={name} parallel={parallel}"

    def json_object(self) -> str:
        return "json_object"


class FakeLLM:
    """An engine with hand-computable behaviour.

    encode_chat renders each message as "<role>: <content>\\n". stream replies
    `pieces` (REPLY_PIECES unless given), cut at the first stop string (finish
    "stop") or at max_tokens tokens (finish "length"). A prompt containing
    "REJECT" fails the template, "LATE BOOM" raises after the first delta,
    "BOOM" raises before any delta, "BUSY" finds the scheduler's queue full.
    """

    def __init__(self, max_seq_len: int = 64, pieces=REPLY_PIECES, bos_id: int | None = None):
        self.failed = False
        self.pieces = pieces
        self.tokenizer = CharTokenizer(bos_id)
        self.max_seq_len = max_seq_len
        self.batch = 4
        self.max_queue = 256
        self.vocab_size = 0x110000  # every code point
        self.calls: list[SamplingParams] = []
        self.closed_streams = 0
        self.grammars = FakeGrammars()

    def warmup(self, *, wait: bool = True) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"model": "fake", "context": self.max_seq_len, "slots": self.batch}

    def stats(self) -> SchedulerStats:
        """Fixed, so that /metrics shows exactly these."""
        return SchedulerStats(2, 3, 100, 25, 7, 121, 40, 2.0, 12, 9, 1)

    # The real model's request checks (model/limits.py), on this fake's sizes.
    check = LLM.check

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if "REJECT" in text:
            raise ValueError("the chat template rejects this conversation")
        return self.tokenizer.encode(text)

    def stream(self, prompt_ids: list[int], params: SamplingParams):
        self.calls.append(params)
        if "BUSY" in self.tokenizer.decode(prompt_ids):
            raise QueueFull("256 requests are already waiting")
        return self._generate(self.tokenizer.decode(prompt_ids), params)

    def _generate(self, prompt: str, params: SamplingParams):
        try:
            if "BOOM" in prompt and "LATE BOOM" not in prompt:
                raise RuntimeError("engine exploded")
            text, finish = self.reply(params)
            position = 0
            for index, piece in enumerate(self.pieces):
                if index == 1 and "LATE BOOM" in prompt:
                    raise RuntimeError("engine exploded mid-stream")
                part = text[position : position + len(piece)]
                position += len(part)
                last = position >= len(text)
                yield Delta(part, tuple(self.tokenizer.encode(part)), finish if last else None)
                if last:
                    return
        finally:
            self.closed_streams += 1

    def reply(self, params: SamplingParams) -> tuple[str, str]:
        """The full reply text and finish_reason for `params`."""
        text, finish = "".join(self.pieces), "stop"
        for stop in params.stop:
            if stop in text:
                text = text[: text.index(stop)]
        if params.max_tokens is not None and params.max_tokens < len(text):
            text, finish = text[: params.max_tokens], "length"
        return text, finish


@pytest.fixture
def serve(tmp_path, monkeypatch):
    """serve(llm=…, host=…, **settings) -> a test client of the functions-framework app."""
    for name in list(os.environ):
        if name.startswith("JAXCHAT_"):
            monkeypatch.delenv(name)

    def build(llm: FakeLLM | None = None, host: ModelHost | None = None, **settings):
        if host is None:
            fake = llm or FakeLLM()
            host = ModelHost(lambda: fake)
            assert host.wait(5) == "ready"
        return app_client(monkeypatch, tmp_path, host, Settings(**settings))

    return build


def chat_body(**fields) -> dict:
    """A valid request body; a field set to ... is removed."""
    body = {"model": MODEL, "messages": HELLO, **fields}
    return {key: value for key, value in body.items() if value is not ...}


def sse_events(response) -> list:
    """The decoded `data:` payloads of an SSE body, "[DONE]" kept as a string."""
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    text = response.get_data(as_text=True)
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


def assert_error(response, status: int, type_: str, param=None, code=None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    return error
