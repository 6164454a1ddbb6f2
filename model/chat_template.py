"""Jinja chat templates rendered the way Hugging Face transformers renders them.

Chat templates are written against transformers' `apply_chat_template`, so the
environment here copies its setup: a sandboxed, immutable Jinja environment
with trim_blocks / lstrip_blocks, the loopcontrols extension, transformers'
`tojson` filter and the `raise_exception` / `strftime_now` globals.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import gguf
import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

# Used when a GGUF carries no template: the widely used ChatML format.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A chat template rejected its input or could not be compiled/rendered."""


class _GenerationTag(Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks.

    transformers uses them to mark assistant tokens for training masks; for
    rendering they are transparent, but templates using them would not parse
    without this extension.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes '<', '>', '&', "'"; transformers' does not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """Return `message` with list-of-parts content joined into one string.

    OpenAI clients may send content as [{"type": "text", "text": ...}, ...];
    most templates concatenate content as a string, so text parts are joined
    with newlines. Non-text parts raise TemplateError (the model is text-only).
    The input dict is not modified.
    """
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise TemplateError(f"unsupported message content part: {kind!r}")
        texts.append(part.get("text", ""))
    return {**message, "content": "\n".join(texts)}


class ChatTemplate:
    """A compiled chat template that turns a message list into a prompt string."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str,
        eos_token: str,
        variants: dict[str, str] | None = None,
    ) -> None:
        """Compile `source`; bos/eos token strings are passed to the template.

        variants: optional named alternatives (GGUF `tokenizer.chat_template.<name>`);
        the "tool_use" one, if present, is used when tools are given, as in
        transformers.
        """
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        try:
            self._template = env.from_string(source)
            self._variants = {name: env.from_string(s) for name, s in (variants or {}).items()}
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, tokenizer: Tokenizer) -> ChatTemplate:
        """Template from GGUF `tokenizer.chat_template` (ChatML if absent)."""
        source = CHATML_TEMPLATE
        variants: dict[str, str] = {}
        prefix = "tokenizer.chat_template."
        for key, field in reader.fields.items():
            if key == "tokenizer.chat_template":
                source = field.contents()
            elif key.startswith(prefix):
                variants[key.removeprefix(prefix)] = field.contents()
        return cls(
            source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, variants=variants
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Return the prompt text for `messages`.

        add_generation_prompt: append the assistant-turn opener. tools: JSON
        tool schemas, passed as `tools`. extra: further template variables
        (e.g. enable_thinking). Raises TemplateError if the template raises
        or fails.
        """
        template = self._variants.get("tool_use", self._template) if tools else self._template
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": [flatten_content(m) for m in messages],
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**context)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
