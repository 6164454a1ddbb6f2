"""Jinja chat templates rendered the way Hugging Face transformers renders them.

Chat templates are written against transformers' `apply_chat_template`, so the
environment here copies its setup: a sandboxed, immutable Jinja environment
with trim_blocks / lstrip_blocks, the loopcontrols extension, transformers'
`tojson` filter and the `raise_exception` / `strftime_now` globals.

Tools: a template whose source uses the `tools` variable gets the OpenAI tool
list and messages as they are. Other templates (SmolLM2's, plain ChatML) get
Hermes-style text instead: the tool list in the system prompt, an assistant's
`tool_calls` as <tool_call> blocks after its content, and `tool` results as a
user turn of <tool_response> blocks, the way Qwen2.5's template renders them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.text.tool_calls import hermes_call_text, hermes_system_prompt

if TYPE_CHECKING:
    from model.text.tokenizer import Tokenizer

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


def _developer_as_system(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "role": "system"} if message.get("role") == "developer" else message


def _arguments_as_dict(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with JSON-string tool-call arguments parsed into dicts.

    Tool-aware templates (Qwen2.5, Llama 3.1, ...) write `arguments | tojson`,
    which would quote an OpenAI JSON string a second time; transformers' docs
    ask for dicts, and vLLM converts the same way. Unparseable strings stay.
    """
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            calls.append(call)
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                call = {**call, "function": {**function, "arguments": parsed}}
        calls.append(call)
    return {**message, "tool_calls": calls}


def _assistant_calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message with `tool_calls` as content followed by <tool_call> blocks."""
    blocks = []
    for call in message["tool_calls"]:
        function = call.get("function", call)
        blocks.append(hermes_call_text(function["name"], function.get("arguments", {})))
    content = message.get("content")
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": "\n".join([content, *blocks] if content else blocks)}


def _hermes_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results as plain text, for templates that do not know about tools.

    Consecutive `tool` messages become one user turn of <tool_response> blocks.
    """
    out: list[dict[str, Any]] = []
    previous_role = None
    for message in messages:
        role = message.get("role")
        if role == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if previous_role == "tool":
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response})
        elif role == "assistant" and message.get("tool_calls"):
            out.append(_assistant_calls_as_text(message))
        else:
            out.append(message)
        previous_role = role
    return out


def _with_tools_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Messages with the Hermes tools section appended to (or as) the first system message."""
    section = hermes_system_prompt(tools)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        content = first.get("content")
        return [
            {**first, "content": f"{content}\n\n{section}" if content else section},
            *messages[1:],
        ]
    return [{"role": "system", "content": section}, *messages]


@dataclass(frozen=True)
class _Compiled:
    """A compiled template and what its source knows about."""

    template: jinja2.Template
    uses_tools: bool  # reads the `tools` variable
    knows_developer: bool  # mentions the "developer" role


def _compile(env: jinja2.Environment, source: str) -> _Compiled:
    ast = env.parse(source)
    return _Compiled(
        template=env.from_string(ast),
        uses_tools="tools" in jinja2.meta.find_undeclared_variables(ast),
        knows_developer="developer" in source,
    )


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
        transformers. Whether each template reads `tools` is decided here, once.
        """
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        try:
            self._default = _compile(env, source)
            self._variants = {name: _compile(env, s) for name, s in (variants or {}).items()}
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate:
        """Template from GGUF metadata (key → value): `tokenizer.chat_template` and
        its named variants `tokenizer.chat_template.<name>` (ChatML if absent)."""
        prefix = "tokenizer.chat_template."
        source = meta.get("tokenizer.chat_template", CHATML_TEMPLATE)
        variants = {k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)}
        return cls(
            source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, variants=variants
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str], tokenizer: Tokenizer) -> ChatTemplate:
        """Template of a Hugging Face directory (ChatML if it has none).

        Read from `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`,
        which is a string or a list of {"name", "template"} (named variants).
        """
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        templates = config.get("chat_template") or CHATML_TEMPLATE
        if isinstance(templates, list):
            templates = {t["name"]: t["template"] for t in templates}
        else:
            templates = {"default": templates}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        source = templates.pop("default", CHATML_TEMPLATE)
        return cls(
            source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, variants=templates
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

        add_generation_prompt: append the assistant-turn opener. tools: OpenAI
        tool dicts; passed as `tools` to a template that reads them, otherwise
        described in the system prompt (see the module docstring), as is any
        tool-call history. Role "developer" becomes "system" for templates
        that never mention it. extra: further template variables (e.g.
        enable_thinking). Raises TemplateError if the template raises or fails in
        any way (a template written for other inputs may, e.g., add None to a string).
        """
        compiled = self._variants.get("tool_use", self._default) if tools else self._default
        messages = [flatten_content(m) for m in messages]
        if not compiled.knows_developer:
            messages = [_developer_as_system(m) for m in messages]
        if compiled.uses_tools:
            messages = [_arguments_as_dict(m) for m in messages]
        else:
            messages = _hermes_history(messages)
            if tools:
                messages = _with_tools_prompt(messages, tools)
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return compiled.template.render(**context)
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template may fail on any input it does not expect
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
