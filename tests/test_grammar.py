"""Grammar constraints against the real default tokenizer, decoding simulated on the host.

No model runs here: a random walk picks each next token among those the
bitmask allows, which is what masked sampling does with arbitrary logits. The
text that comes out is checked with `json` and `jsonschema`, independently of
llguidance.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest

from model.text.grammar import Constraint, GrammarError, Grammars
from model.text.tokenizer import Tokenizer
from model.weights.sources import resolve_model
from tests.gguf_text import gguf_tokenizer

SEEDS = range(20)
MAX_STEPS = 400

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"$ref": "#/$defs/unit"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
            "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: any object
TOOLS = [WEATHER, CLOCK]
CALL = re.compile(r"<tool_call>\n(\{.*?\})\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return gguf_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def grammars(tokenizer: Tokenizer) -> Grammars:
    return Grammars(tokenizer)


@pytest.fixture(scope="module")
def closers(tokenizer: Tokenizer) -> np.ndarray:
    """[V] bool: the token's text contains a quote or closing bracket."""
    return np.array(
        [any(c in tokenizer.token_bytes(i) for c in b'"}]') for i in range(tokenizer.vocab_size)]
    )


def allowed_ids(bitmask: np.ndarray, row: int, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set: bit j of word i is token 32*i + j."""
    words = bitmask[row].astype(np.uint32)
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1  # [W, 32]
    ids = np.flatnonzero(bits.reshape(-1))
    return ids[ids < vocab_size]


def mask_after(grammars: Grammars, tokenizer: Tokenizer, grammar: str, text: str) -> np.ndarray:
    """Allowed ids after feeding the tokens of `text`."""
    constraint = grammars.matcher(grammar)
    assert feed(constraint, tokenizer, text) is None
    bitmask = np.zeros((1, grammars.vocab_words), np.int32)
    constraint.fill(bitmask, 0)
    return allowed_ids(bitmask, 0, tokenizer.vocab_size)


def feed(constraint: Constraint, tokenizer: Tokenizer, text: str) -> int | None:
    """Feed the tokens of `text`; return the index of the first rejected one, or None."""
    for n, token in enumerate(tokenizer.encode(text, add_bos=False)):
        if not constraint.accept(token):
            return n
    return None


def walk(
    grammars: Grammars,
    tokenizer: Tokenizer,
    closers: np.ndarray,
    grammar: str,
    seed: int,
    fill_times: list[float] | None = None,
) -> str:
    """Decode with random allowed tokens until a stop token; return the text before it.

    Half the steps draw from tokens with a quote or closing bracket, so that
    strings and containers end within a few hundred steps.
    """
    rng = np.random.default_rng(seed)
    constraint = grammars.matcher(grammar)
    bitmask = np.zeros((2, grammars.vocab_words), np.int32)
    stop_ids = np.array(sorted(tokenizer.stop_ids))
    not_stop_specials = np.array(sorted(tokenizer.special_ids - tokenizer.stop_ids))
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        start = time.perf_counter()
        constraint.fill(bitmask, 1)
        if fill_times is not None:
            fill_times.append(time.perf_counter() - start)
        allowed = allowed_ids(bitmask, 1, tokenizer.vocab_size)
        assert not np.isin(not_stop_specials, allowed).any()
        stops = allowed[np.isin(allowed, stop_ids)]
        if len(stops) and (constraint.done or rng.random() < 0.5):
            assert constraint.accept(int(rng.choice(stops)))
            assert constraint.done
            return tokenizer.decode(tokens)
        assert not constraint.done
        choices = allowed[~np.isin(allowed, stop_ids)]
        if rng.random() < 0.5 and closers[choices].any():
            choices = choices[closers[choices]]
        token = int(rng.choice(choices))
        assert constraint.accept(token)
        tokens.append(token)
    raise AssertionError(f"no stop token after {MAX_STEPS} steps: {tokenizer.decode(tokens)!r}")


def assert_compact(text: str) -> None:
    """Outside string literals, the only whitespace is json.dumps' ", " and ": "."""
    skeleton = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    assert not re.search(r"\s", skeleton.replace(", ", ",").replace(": ", ":")), text


# -- json_object / json_schema ----------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_walk_is_a_compact_object(grammars, tokenizer, closers, seed):
    text = walk(grammars, tokenizer, closers, grammars.json_object(), seed)
    assert isinstance(json.loads(text), dict)
    assert_compact(text)


def test_json_schema_walks_validate(grammars, tokenizer, closers, capsys):
    grammar = grammars.json_schema(PERSON, strict=True)
    fill_times: list[float] = []
    texts = [walk(grammars, tokenizer, closers, grammar, seed, fill_times) for seed in SEEDS]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
        assert_compact(text)
    assert len({*texts}) > 10  # the walks really differ
    mean_us = 1e6 * sum(fill_times) / len(fill_times)
    with capsys.disabled():  # a measurement to read, not a limit to assert
        print(f"\nConstraint.fill: {mean_us:.0f} us/step mean over {len(fill_times)} steps")


def test_after_key_only_colon_is_allowed(grammars, tokenizer):
    allowed = mask_after(grammars, tokenizer, grammars.json_object(), '{"a"')
    colon, x = tokenizer.encode(":", add_bos=False), tokenizer.encode("x", add_bos=False)
    assert len(colon) == len(x) == 1
    assert colon[0] in allowed
    assert x[0] not in allowed
    assert all(tokenizer.token_bytes(int(t)).startswith(b":") for t in allowed)


def test_bits_agree_with_accept(grammars, tokenizer):
    """Every token's bit says whether the matcher would accept it (the bit layout is right)."""
    grammar = grammars.json_schema(PERSON)
    prefix = '{"name": "Al'
    allowed = set(mask_after(grammars, tokenizer, grammar, prefix).tolist())
    rng = np.random.default_rng(0)
    randoms = rng.choice(tokenizer.vocab_size, 150, replace=False).tolist()
    sample = [*randoms, *sorted(allowed)[:150]]  # mostly disallowed, then allowed ones
    for token in sample:
        constraint = grammars.matcher(grammar)
        feed(constraint, tokenizer, prefix)
        assert constraint.accept(token) == (token in allowed), tokenizer.token_bytes(token)


def test_fill_writes_only_its_row(grammars, tokenizer):
    constraint = grammars.matcher(grammars.json_object())
    bitmask = np.full((3, grammars.vocab_words), 7, np.int32)
    constraint.fill(bitmask, 1)
    assert (bitmask[[0, 2]] == 7).all()
    allowed = allowed_ids(bitmask, 1, tokenizer.vocab_size)
    assert tokenizer.encode("{", add_bos=False)[0] in allowed
    assert all(tokenizer.token_bytes(int(t)).startswith(b"{") for t in allowed)


def test_missing_required_key_is_rejected(grammars, tokenizer):
    constraint = grammars.matcher(grammars.json_schema(PERSON))
    text = '{"name": "Bob"}'  # age and pet are required
    rejected = feed(constraint, tokenizer, text)
    assert rejected is not None
    assert tokenizer.decode(tokenizer.encode(text, add_bos=False)[:rejected]) == '{"name": "Bob'


def test_complete_object_allows_exactly_the_stop_tokens(grammars, tokenizer):
    grammar = grammars.json_schema(PERSON)
    text = '{"name": "Bob", "age": 42, "pet": null}'
    assert json.loads(text)  # the reference text itself is valid
    allowed = mask_after(grammars, tokenizer, grammar, text)
    assert set(allowed.tolist()) == tokenizer.stop_ids
    assert b"<|im_end|>" in {tokenizer.token_bytes(int(t)) for t in allowed}


def test_loose_whitespace_is_rejected(grammars, tokenizer):
    for text in ['{"a":1}', '{"a": 1,"b": 2}', '{ "a": 1}', '{"a":  1}', '{"a": 1}\n']:
        constraint = grammars.matcher(grammars.json_object())
        assert feed(constraint, tokenizer, text) is not None, text


def test_special_token_text_is_not_a_special_token_in_strings(grammars, tokenizer):
    """Inside a JSON string, text like <|im_end|> is spelled in bytes, never a special token."""
    allowed = mask_after(grammars, tokenizer, grammars.json_object(), '{"a": "')
    assert not set(allowed.tolist()) & tokenizer.special_ids
    assert tokenizer.encode("<", add_bos=False)[0] in allowed


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nonsense"}, "nonsense"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ([{"type": "object"}], "must be a JSON object"),
    ],
)
def test_invalid_schema_raises(grammars, schema, message):
    with pytest.raises(GrammarError, match=message):
        grammars.json_schema(schema)


def test_unsupported_keyword_raises_only_when_strict(grammars, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "string", "format": "zip-code"}}}
    with pytest.raises(GrammarError, match="zip-code"):
        grammars.json_schema(schema, strict=True)
    constraint = grammars.matcher(grammars.json_schema(schema))
    assert feed(constraint, tokenizer, '{"a": "anything"}') is None
    assert constraint.done


# -- tool calls -----------------------------------------------------------------------


def parse_calls(text: str) -> list[dict]:
    """The JSON bodies of `text`, which must be nothing but "\\n"-separated call blocks."""
    bodies = CALL.findall(text)
    assert "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies) == text
    return [json.loads(b) for b in bodies]


def check_call(call: dict) -> None:
    """`call` names a tool in TOOLS and its arguments match that tool's parameters."""
    assert set(call) == {"name", "arguments"}
    function = {t["function"]["name"]: t["function"] for t in TOOLS}[call["name"]]
    jsonschema.validate(call["arguments"], function.get("parameters", {"type": "object"}))


@pytest.mark.parametrize("seed", SEEDS)
def test_parallel_tool_call_walks_are_valid_calls(grammars, tokenizer, closers, seed):
    text = walk(grammars, tokenizer, closers, grammars.tool_calls(TOOLS), seed)
    calls = parse_calls(text)
    assert calls
    for call in calls:
        check_call(call)


def test_tool_call_walks_cover_both_tools_and_parallel_calls(grammars, tokenizer, closers):
    grammar = grammars.tool_calls(TOOLS)
    calls = [parse_calls(walk(grammars, tokenizer, closers, grammar, seed)) for seed in SEEDS]
    assert {c["name"] for cs in calls for c in cs} == {"get_weather", "get_time"}
    assert max(map(len, calls)) > 1


def test_single_tool_call_ends_after_one_block(grammars, tokenizer):
    constraint = grammars.matcher(grammars.tool_calls(TOOLS, parallel=False))
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert feed(constraint, tokenizer, text) is None
    assert constraint.done
    # With parallel calls the same text may go on with "\n" and another block.
    allowed = mask_after(grammars, tokenizer, grammars.tool_calls(TOOLS), text)
    assert b"\n" in {tokenizer.token_bytes(int(t)) for t in allowed}


def test_named_tool_choice_rejects_other_functions(grammars, tokenizer, closers):
    grammar = grammars.tool_calls(TOOLS, name="get_weather")
    constraint = grammars.matcher(grammar)
    assert feed(constraint, tokenizer, '<tool_call>\n{"name": "get_time"') is not None
    for seed in range(5):
        calls = parse_calls(walk(grammars, tokenizer, closers, grammar, seed))
        assert {c["name"] for c in calls} == {"get_weather"}


def test_arguments_follow_the_parameters_schema(grammars, tokenizer):
    head = '<tool_call>\n{"name": "get_weather", "arguments": '
    good = head + '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    constraint = grammars.matcher(grammars.tool_calls(TOOLS))
    assert feed(constraint, tokenizer, good) is None
    for bad in ['{"city": "Paris", "unit": "kelvin"}}', '{"city": "Paris"}}', '{"city":"Paris"']:
        constraint = grammars.matcher(grammars.tool_calls(TOOLS))
        assert feed(constraint, tokenizer, head + bad) is not None, bad


def test_tool_call_errors_name_the_problem(grammars):
    with pytest.raises(GrammarError, match="'get_stock'"):
        grammars.tool_calls(TOOLS, name="get_stock")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(GrammarError, match=r"tools\[2\]\.function\.parameters: .*nonsense"):
        grammars.tool_calls([*TOOLS, bad])
    with pytest.raises(GrammarError, match="at least one"):
        grammars.tool_calls([])
