"""Sharded serving gives the reference's greedy tokens through the server, on a 2x3 mesh
of host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, in the server's
own process, since XLA fixes the device count when its backend starts): slots and the
pool split over 'data', weights and SmolLM2's 3 KV heads over 'model'. (Dimensions that
do not divide, such as 3 KV heads over 4, are tests/test_sharding.py's.)
"""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.server_process import EIGHT_DEVICES, running_server


@pytest.fixture(scope="module")
def mesh_server(tmp_path_factory):
    # Eight slots (four step shapes), and no unrolled steps compiling while it idles.
    env = {
        **EIGHT_DEVICES,
        "JAXCHAT_MESH": "2x3",
        "JAXCHAT_MAX_SEQ_LEN": "256",
        "JAXCHAT_MAX_BATCH": "8",
        "JAXCHAT_UNROLLED_DECODE": "off",
    }
    with running_server(tmp_path_factory.mktemp("mesh"), env) as url:
        yield url


def test_server_on_a_2x3_mesh_gives_the_reference_replies(mesh_server, golden):
    """The three golden prompts at once, so they share steps (rows on both data shards)."""
    client = openai.OpenAI(base_url=f"{mesh_server}/v1", api_key="none", max_retries=0)

    def reply(prompt: dict):
        return client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=prompt["messages"],
            temperature=0,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(len(golden["prompts"])) as pool:
        replies = list(pool.map(reply, golden["prompts"]))
    for prompt, got in zip(golden["prompts"], replies, strict=True):
        assert got.usage.prompt_tokens == len(prompt["ids"])
        assert got.usage.completion_tokens == 24
        assert got.choices[0].message.content == _reference_text(prompt["greedy"][:24])


def _reference_text(tokens: list[int]) -> str:
    from model.weights.sources import bundled_model_path
    from tests.gguf_text import gguf_tokenizer

    return gguf_tokenizer(bundled_model_path()).decode(tokens, skip_special_tokens=True)
