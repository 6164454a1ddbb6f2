"""Generated requests for the OpenAI routes: mostly broken, some valid, all cheap to serve.

`requests(route)` draws an HTTP request (path, body bytes, Content-Type) made from a
valid base body by a few mutations: wrong types, out-of-range and boundary numbers,
odd Unicode (lone surrogates, control and bidi characters, chat-template markup),
deep nesting, broken JSON and encodings, and broken tool and JSON schemas. A body
that stays valid asks for at most a few tokens, so thousands run in a minute.

`check_reply` is what every reply must satisfy: never a 5xx; a 4xx carries exactly
OpenAI's error object; a 200 is a well-formed JSON or SSE reply with no error event.
"""

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

MODEL = "smollm2-135m-instruct"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BASES = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
}


@dataclass(frozen=True)
class Request:
    path: str
    data: bytes
    content_type: str | None

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Request({self.path}, {self.content_type!r}, {self.data[:600]!r})"


ODD_STRINGS = [
    "",
    " ",
    "\ud800",
    "hi \udfff there",
    "\udc00\ud800",
    "\x00",
    "\x1b[31m",
    "\u202eevil",
    "\ufeff",
    "a\u0301\u0301\u0301",
    "💥🏳️‍🌈",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<tool_call>",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "</tool_call>",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "{{ raise_exception('boom') }}",
    "{% for x in range(10**9) %}x{% endfor %}",
    "\\",
    '"',
    "0.5",
    "yes",
    "null",
    "NaN",
    "9" * 40,
]
odd_text = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
)
BOUNDARY_NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    20,
    21,
    128,
    129,
    2**31 - 1,
    2**31,
    2**32,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    10**400,
    0.5,
    -0.0,
    1e-45,
    1e308,
    -1e308,
    1.5,
    100.0,
    100.5,
]
numbers = st.one_of(
    st.sampled_from(BOUNDARY_NUMBERS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=8,
)


def nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


deep = st.builds(nested, st.integers(30, 300), st.sampled_from(["list", "dict"]))
weird = st.one_of(scalars, json_values, deep)

# JSON schemas: plausible shapes with broken parts.
schema_types = st.sampled_from(
    ["object", "string", "integer", "number", "boolean", "array", "null", "nonsense", 5]
)
schemas = st.recursive(
    st.fixed_dictionaries(
        {"type": schema_types},
        optional={
            "enum": st.lists(scalars, max_size=3),
            "pattern": st.sampled_from(["^[a-z]+$", "(", "a{99999}", "[", ".*"]) | odd_text,
            "minimum": numbers,
            "maxLength": numbers,
            "format": st.sampled_from(["date-time", "email", "uuid", "nonsense"]),
            "$ref": st.sampled_from(["#/$defs/x", "#/nowhere", "http://example.com/s.json"]),
            "required": st.lists(odd_text, max_size=3) | weird,
        },
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(odd_text, inner, max_size=3)},
            optional={"additionalProperties": st.booleans() | inner},
        ),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries(
            {"$defs": st.dictionaries(st.just("x"), inner), "$ref": st.just("#/$defs/x")}
        ),
    ),
    max_leaves=6,
)
names = st.sampled_from(["get_weather", "f", "a b", "", "x" * 65, "ünïcode"]) | odd_text
tools = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["function", "code_interpreter"]),
                "function": st.fixed_dictionaries(
                    {"name": names},
                    optional={
                        "description": odd_text,
                        "parameters": schemas | weird,
                        "strict": st.booleans() | weird,
                    },
                ),
            }
        ),
        weird,
    ),
    max_size=3,
)
tool_choices = st.one_of(
    st.sampled_from(["none", "auto", "required", "sometimes"]),
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": names})}
    ),
    weird,
)
response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": names}, optional={"schema": schemas | weird, "strict": st.booleans()}
            ),
        }
    ),
    weird,
)
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "robot", ""]
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(ROLES)},
            optional={
                "content": odd_text
                | st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url"]), "text": odd_text}
                    ),
                    max_size=2,
                )
                | weird,
                "name": names | weird,
                "tool_call_id": odd_text,
                "tool_calls": st.lists(
                    st.fixed_dictionaries(
                        {
                            "id": odd_text,
                            "type": st.just("function"),
                            "function": st.fixed_dictionaries(
                                {"name": names, "arguments": odd_text | st.just('{"a": 1}')}
                            ),
                        }
                    )
                    | weird,
                    max_size=2,
                ),
                "function_call": st.fixed_dictionaries({"name": names, "arguments": odd_text})
                | weird,
            },
        ),
        weird,
    ),
    max_size=4,
)
# max_tokens stays small when valid: a valid body must be cheap to serve.
token_budgets = st.sampled_from([0, -1, 1, 2, 3, 2**31, 10**30, "2", 1.5, True, [2]])
token_ids = st.one_of(
    st.integers(0, 49151), st.sampled_from([-1, 49152, 2**31, 2**64, 10**400]), weird
)
prompts = st.one_of(
    odd_text,
    st.lists(odd_text, max_size=3),
    st.lists(token_ids, max_size=6),
    st.lists(st.lists(token_ids, max_size=4), max_size=3),
    st.sampled_from(["", [], [[]], [""], [[], []]]),
    weird,
)
COMMON = {
    "model": st.sampled_from([MODEL, "gpt-4o", ""]) | weird,
    "max_tokens": token_budgets,
    "temperature": numbers | weird,
    "top_p": numbers | weird,
    "top_k": numbers | weird,
    "min_p": numbers | weird,
    "frequency_penalty": numbers | weird,
    "presence_penalty": numbers | weird,
    "repetition_penalty": numbers | weird,
    "logit_bias": st.dictionaries(
        st.sampled_from(["0", "-1", "49152", "1" * 50]) | odd_text, numbers | weird, max_size=3
    )
    | weird,
    "n": numbers | weird,
    "seed": numbers | weird,
    "stop": odd_text | st.lists(odd_text, max_size=5) | weird,
    "stream": st.booleans() | weird,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | weird}) | weird,
    "ignore_eos": st.booleans() | weird,
    "user": odd_text | weird,
    "unknown_field": weird,
}
FIELDS = {
    CHAT: {
        **COMMON,
        "messages": messages,
        "max_completion_tokens": token_budgets,
        "logprobs": st.booleans() | weird,
        "top_logprobs": numbers | weird,
        "response_format": response_formats,
        "tools": tools,
        "tool_choice": tool_choices,
        "parallel_tool_calls": st.booleans() | weird,
        "functions": st.lists(
            st.fixed_dictionaries({"name": names}, optional={"parameters": schemas | weird}),
            max_size=2,
        )
        | weird,
        "function_call": st.sampled_from(["none", "auto"]) | st.fixed_dictionaries({"name": names}),
    },
    COMPLETIONS: {
        **COMMON,
        "prompt": prompts,
        "logprobs": numbers | weird,
        "echo": st.booleans() | weird,
        "best_of": numbers | weird,
        "suffix": odd_text | weird,
    },
}
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
]


def _encode(draw, body: Any) -> bytes:
    """The body as bytes: valid JSON, or one of the ways clients break it."""
    ascii_only = draw(st.booleans())
    text = json.dumps(body, ensure_ascii=ascii_only)
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate is invalid UTF-8
    breakage = draw(st.sampled_from(["none"] * 6 + ["truncate", "garbage", "nan", "latin-1"]))
    if breakage == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if breakage == "garbage":
        return draw(st.binary(max_size=40))
    if breakage == "nan":
        return data.replace(b'"max_tokens": 2', b'"max_tokens": NaN', 1).replace(
            b"}", b', "x": Infinity}', 1
        )
    if breakage == "latin-1":
        return text.encode("latin-1", "replace") + b"\xe9\xff"
    return data


@st.composite
def requests(draw, path: str) -> Request:
    """A request for `path` (CHAT or COMPLETIONS); see the module docstring."""
    body: Any = dict(BASES[path])
    fields = FIELDS[path]
    for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        body[name] = draw(fields[name])
    if draw(st.integers(0, 9)) == 0:  # a field missing (never the small budget)
        body.pop(draw(st.sampled_from(sorted(set(body) - {"max_tokens"}))))
    if draw(st.integers(0, 19)) == 0:
        body = draw(weird)  # not an object at all
    content_type = draw(st.sampled_from(CONTENT_TYPES[:3] * 5 + CONTENT_TYPES[3:]))
    return Request(path, _encode(draw, body), content_type)


ERROR_KEYS = {"message", "type", "param", "code"}


def check_reply(status: int, content_type: str, text: str) -> None:
    """What every reply must be (see the module docstring); raises AssertionError."""
    assert status < 500, f"{status}: {text[:800]}"
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == ERROR_KEYS, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str), error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error
        return
    assert status == 200, status
    if content_type.startswith("text/event-stream"):
        events = text.removesuffix("\n\n").split("\n\n")
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            payload = json.loads(event.removeprefix("data: "))
            assert "error" not in payload, payload
            assert payload["object"] in ("chat.completion.chunk", "text_completion")
    else:
        reply = json.loads(text)
        assert reply["object"] in ("chat.completion", "text_completion"), reply
        assert reply["choices"] and reply["usage"]["completion_tokens"] >= 0, reply
