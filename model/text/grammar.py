"""Constrained decoding: OpenAI response formats and forced tool calls as llguidance grammars.

`Grammars` compiles, for one tokenizer, a grammar per request: any JSON
object (`json_object`), a JSON schema (`json_schema`) or Hermes tool-call
blocks (`tool_calls`). `Grammars.matcher` starts a `Constraint` for one
request; each decode step it writes the allowed next tokens into a row of an
int32 bitmask [B, ceil(V/32)] (bit j of word i allows token 32*i+j, llguidance's
layout), which the engine applies to the logits on device, and it is told the
token that was sampled.

All JSON is written compactly with json.dumps' separators (`{"a": 1, "b": 2}`):
no other whitespace is allowed, since small models otherwise loop on spaces
and newlines.

Stop tokens: every id in `Tokenizer.stop_ids` is an llguidance EOS token, so
once the grammar is complete the mask allows exactly the stop tokens (and
whatever may still extend the output, e.g. another parallel tool call). The
chat end-of-turn token (`<|im_end|>` for SmolLM2) is listed first, which
makes it llguidance's primary EOS. Special tokens are marked as such, so they
never match text inside the grammar.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from model.text.tokenizer import END_OF_TURN_TOKENS, Tokenizer
from model.text.tool_calls import CALL_CLOSE, CALL_OPEN

# json.dumps' default separators and no other whitespace.
_COMPACT_JSON: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_CALL_OPEN, _CALL_CLOSE = f"{CALL_OPEN}\n", f"\n{CALL_CLOSE}"  # as hermes_call_text writes them
# The arguments of a function declared without parameters: exactly `{}`.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class GrammarError(ValueError):
    """A schema or tool definition that cannot be compiled; the message is for the client."""


class Constraint:
    """One request's grammar state: allowed-token masks in, sampled tokens out."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [B, ceil(V/32)])."""
        fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by the sampled `token`; False if it violates the grammar.

        After a violation the matcher stays in error and its mask allows only
        the stop tokens.
        """
        return self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """True once the grammar is finished (or broken): only a stop token may follow."""
        return self._matcher.is_stopped()


class Grammars:
    """Compiles grammars for one tokenizer and starts per-request `Constraint`s."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Build llguidance's view of `tokenizer` (~0.2 s for a 49k vocab; do it once)."""
        self.vocab_words: int = -(-tokenizer.vocab_size // 32)
        stop_ids = _stop_ids(tokenizer)
        wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, stop_ids[0]))
        self._lltokenizer = llguidance.LLTokenizer(wrapper, eos_token=stop_ids)

    def json_object(self) -> str:
        """Grammar for any JSON object (OpenAI `response_format: json_object`)."""
        return self._json({"type": "object"}, strict=True, field="json_object")

    def json_schema(self, schema: dict[str, Any], *, strict: bool = False) -> str:
        """Grammar for JSON matching `schema` (OpenAI `response_format: json_schema`).

        strict: reject keywords and formats llguidance cannot enforce; when
        False they are ignored and the rest of the schema is still enforced.
        Raises GrammarError if the schema is invalid (or unsupported, if strict).
        """
        field = "response_format.json_schema.schema"
        if not isinstance(schema, dict):
            raise GrammarError(f"{field} must be a JSON object, not {type(schema).__name__}")
        return self._json(schema, strict=strict, field=field)

    def tool_calls(
        self, tools: list[dict[str, Any]], *, name: str | None = None, parallel: bool = True
    ) -> str:
        """Grammar for forced Hermes tool calls: `<tool_call>\\n{json}\\n</tool_call>` blocks.

        Each block is `{"name": <fn>, "arguments": {...}}`, the arguments
        matching that function's `parameters` schema (`{}` if it has none, as
        OpenAI defines a function without parameters). tools: OpenAI tool
        dicts. name: exactly one call, of this function. parallel: one or
        more blocks separated by "\\n" (the model may stop after any of
        them); otherwise exactly one. Raises GrammarError for a bad
        parameters schema or an unknown `name`.
        """
        functions = [tool.get("function") or {} for tool in tools]
        chosen = [i for i, f in enumerate(functions) if name is None or f.get("name") == name]
        if not chosen:
            raise GrammarError(
                f"tool_choice names function {name!r}, which is not in tools"
                if name is not None
                else "tools must contain at least one function"
            )
        rules = [self._call_rules(i, functions[i]) for i in chosen]
        calls = " | ".join(f"call_{i}" for i in chosen)
        lark = "\n".join(
            [
                'start: call ("\\n" call)*' if parallel and name is None else "start: call",
                f"call: {_lark_string(_CALL_OPEN)} ({calls}) {_lark_string(_CALL_CLOSE)}",
                *rules,
            ]
        )
        return self._checked(llguidance.LLMatcher.grammar_from_lark(lark), "tools")

    def matcher(self, grammar: str) -> Constraint:
        """Start matching `grammar` (from the methods above) for one request."""
        # log_level=0: rejected tokens are reported by Constraint.accept, not on stderr.
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher)

    def _call_rules(self, index: int, function: dict[str, Any]) -> str:
        """Lark rules `call_<index>` (the call's JSON) and `args_<index>` (its arguments)."""
        field = f"tools[{index}].function"
        fn_name = function.get("name")
        if not isinstance(fn_name, str) or not fn_name:
            raise GrammarError(f"{field}.name must be a non-empty string")
        parameters = function.get("parameters")
        if parameters is None or parameters == {}:
            parameters = NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise GrammarError(f"{field}.parameters must be a JSON object")
        strict = bool(function.get("strict", False))
        # Checked alone first, so that an error names the function it is in.
        self._json(parameters, strict=strict, field=f"{field}.parameters")
        # Its own %json keeps the schema's root, so "#/$defs/..." refs still resolve.
        arguments = {**parameters, "x-guidance": _json_options(strict)}
        head = '{"name": ' + json.dumps(fn_name, ensure_ascii=False) + ', "arguments": '
        return (
            f'call_{index}: {_lark_string(head)} args_{index} "}}"\n'
            f"args_{index}: %json {json.dumps(arguments)}"
        )

    def _json(self, schema: dict[str, Any], *, strict: bool, field: str) -> str:
        """Checked grammar for JSON text matching `schema`; errors name `field`."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides=_json_options(strict)
            )
        except ValueError as e:  # not JSON-serializable
            raise GrammarError(f"{field}: {e}") from e
        return self._checked(grammar, field)

    def _checked(self, grammar: str, field: str) -> str:
        """`grammar` if llguidance accepts it with this tokenizer, else GrammarError."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._lltokenizer
        )
        if is_error:
            raise GrammarError(f"{field}: {'; '.join(messages)}")
        return grammar


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # Stop ids are special even if the GGUF types them otherwise, so text never spells them.
        self.special_token_ids = sorted(tokenizer.special_ids | tokenizer.stop_ids)
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        # llguidance passes valid UTF-8 here and tokenizes any trailing partial character itself.
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_bos=False)


def _stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The tokenizer's stop ids, the preferred chat end-of-turn token first."""
    if not tokenizer.stop_ids:
        raise ValueError("constrained decoding needs a tokenizer with a stop token")
    rank = {token.encode(): n for n, token in enumerate(END_OF_TURN_TOKENS)}

    def key(token_id: int) -> tuple[int, int]:
        return rank.get(tokenizer.token_bytes(token_id), len(rank)), token_id

    return sorted(tokenizer.stop_ids, key=key)


def _json_options(strict: bool) -> JsonCompileOptions:
    """llguidance JSON options: compact whitespace; lenient (ignore unsupported) unless strict."""
    return {**_COMPACT_JSON, "lenient": not strict}


def _lark_string(text: str) -> str:
    """`text` as a Lark string literal (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)
