"""Chat template rendering: SmolLM2's template against transformers, plus HF-compatible extras."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from model.text.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateError
from model.weights.sources import bundled_model_path
from tests.gguf_text import gguf_text

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    return gguf_text(bundled_model_path())[1]


def plain(source: str) -> ChatTemplate:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>")


def test_golden_chat_template(smollm2_template: ChatTemplate) -> None:
    cases = json.loads(GOLDEN.read_text())["chat_template"]
    assert len(cases) == 10
    for case in cases:
        text = smollm2_template.render(
            case["messages"], add_generation_prompt=case["add_generation_prompt"]
        )
        assert text == case["text"]


def test_smollm2_default_system_prompt(smollm2_template: ChatTemplate) -> None:
    text = smollm2_template.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_template.bos_token == "<|im_start|>"


def test_content_parts_are_flattened(smollm2_template: ChatTemplate) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": parts}]
    text = smollm2_template.render(messages, add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nfirst\nsecond<|im_end|>\n"
    assert messages[1]["content"] is parts  # caller's messages untouched


def test_non_text_part_rejected() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.raises(TemplateError, match="image_url"):
        plain(CHATML_TEMPLATE).render([{"role": "user", "content": [image]}])


def test_chatml_fallback() -> None:
    text = plain(CHATML_TEMPLATE).render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_trim_and_lstrip_blocks() -> None:
    source = (
        "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n"
        "{% endfor %}"
    )
    assert plain(source).render(
        [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]
    ) == ("[a]\n[b]\n")


def test_tojson_like_transformers() -> None:
    source = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}"
    tools = [{"name": "f<&>", "desc": "héllo"}]
    text = plain(source).render([], tools=tools)
    # No HTML escaping, no ASCII escaping, optional indent.
    assert text == '[{"name": "f<&>", "desc": "héllo"}]|{\n  "name": "f<&>",\n  "desc": "héllo"\n}'


def test_raise_exception_is_template_error() -> None:
    source = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('must start with user') }}{% endif %}ok"
    )
    template = plain(source)
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="^must start with user$") as info:
        template.render([{"role": "assistant", "content": "x"}])
    assert isinstance(info.value, ValueError)


def test_variables_and_extra_kwargs() -> None:
    source = (
        "{{ bos_token }}{{ eos_token }}|{{ add_generation_prompt }}|{{ tools }}"
        "|{{ enable_thinking }}"
    )
    text = plain(source).render([], add_generation_prompt=False, enable_thinking=True)
    assert text == "<s></s>|False|None|True"


def test_strftime_now_and_loopcontrols() -> None:
    source = (
        "{{ strftime_now('%Y') }}:{% for m in messages %}"
        "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    )
    text = plain(source).render([{"role": "u", "content": "a"}, {"role": "u", "content": "b"}])
    assert text == f"{datetime.now().year}:a"


def test_generation_tag_is_transparent() -> None:
    source = (
        "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    )
    assert plain(source).render([{"role": "assistant", "content": "x"}]) == "<x>"


def test_sandbox_blocks_mutation() -> None:
    source = "{% set x = messages.append(1) %}"
    with pytest.raises(TemplateError):
        plain(source).render([])


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        plain("{% for m in messages %}")


def test_tool_use_variant_selected_with_tools() -> None:
    template = ChatTemplate(
        "default", bos_token="", eos_token="", variants={"tool_use": "tools:{{ tools | length }}"}
    )
    assert template.render([]) == "default"
    assert template.render([], tools=[{"type": "function"}]) == "tools:1"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# Qwen2.5's tools section, written out by hand, with WEATHER_TOOL as one JSON line.
TOOLS_SECTION = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": '
    '"Current weather in a city.", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}}}}\n'
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def test_smollm2_tools_become_system_prompt(smollm2_template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = smollm2_template.render(messages, tools=[WEATHER_TOOL])
    # The tools section replaces SmolLM2's default system prompt, as a system turn.
    assert text == (
        f"<|im_start|>system\n{TOOLS_SECTION}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "<tools>" in text.split("<|im_start|>user")[0]


def test_smollm2_tool_call_history(smollm2_template: ChatTemplate) -> None:
    call = {"id": "call_1", "type": "function"}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {**call, "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {**call, "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "?"},
    ]
    text = smollm2_template.render(messages, tools=[WEATHER_TOOL])
    assert text == (
        f"<|im_start|>system\nBe brief.\n\n{TOOLS_SECTION}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n"
        "<tool_response>\n25C\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n?\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
    assert messages[0]["role"] == "developer"  # caller's messages untouched


def test_smollm2_developer_is_system(smollm2_template: ChatTemplate) -> None:
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert smollm2_template.render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_developer_kept_when_template_knows_it() -> None:
    source = "{% for m in messages %}{{ 'D' if m.role == 'developer' else m.role }};{% endfor %}"
    messages = [{"role": "developer", "content": ""}, {"role": "user", "content": ""}]
    assert plain(source).render(messages) == "D;user;"
    assert plain("{% for m in messages %}{{ m.role }};{% endfor %}").render(messages) == (
        "system;user;"
    )


def test_tool_aware_template_gets_tools_and_dict_arguments() -> None:
    source = (
        "{{ tools[0].function.name }}|{% for m in messages %}{{ m.role }}:"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}"
        "{{ m.content }};{% endfor %}"
    )
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    # No Hermes system turn, the tool turn as is, arguments parsed into a mapping.
    assert plain(source).render(messages, tools=[WEATHER_TOOL]) == (
        'get_weather|user:u;assistant:{"a": 1};tool:r;'
    )
    assert call["function"]["arguments"] == '{"a":1}'


def test_tool_support_read_from_ast_not_text() -> None:
    # 'tools' appears only as a string literal: the template cannot show tools itself.
    source = "{{ 'tools' }}{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}"
    text = plain(source).render([{"role": "user", "content": "u"}], tools=[WEATHER_TOOL])
    assert text == f"tools[system|{TOOLS_SECTION}][user|u]"


def test_chatml_tools_appended_to_system() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    text = plain(CHATML_TEMPLATE).render(messages, tools=[WEATHER_TOOL])
    assert text == (
        f"<|im_start|>system\nS\n\n{TOOLS_SECTION}<|im_end|>\n"
        "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    )
