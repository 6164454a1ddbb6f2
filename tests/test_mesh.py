"""Sharded serving gives the reference's greedy tokens, in-process and through the server.

Both run with 8 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
in their own processes, since XLA fixes the device count when its backend starts.
"""

import os

import openai
import pytest

from tests.server_process import EIGHT_DEVICES, run_python_report, running_server


def test_meshes_give_the_reference_greedy_tokens(golden):
    """KV heads split over 'model' (1x3); slots over 'data' run in the 2x4 server below."""
    specs = ["1x3"]
    tokens = run_python_report(
        ["-m", "tests.mesh_greedy", *specs], {**os.environ, **EIGHT_DEVICES}, timeout=1200
    )
    for spec in specs:
        for prompt, got in zip(golden["prompts"], tokens[spec], strict=True):
            assert got == prompt["greedy"][: len(got)] and len(got) == 24, spec


@pytest.fixture(scope="module")
def mesh_server(tmp_path_factory):
    # Eight slots (four step shapes), and no unrolled steps compiling while it idles.
    env = {
        **EIGHT_DEVICES,
        "JAXCHAT_MESH": "2x4",
        "JAXCHAT_MAX_SEQ_LEN": "256",
        "JAXCHAT_MAX_BATCH": "8",
        "JAXCHAT_UNROLLED_DECODE": "off",
    }
    with running_server(tmp_path_factory.mktemp("mesh"), env) as url:
        yield url


def test_server_on_a_2x4_mesh_gives_the_reference_replies(mesh_server, golden):
    client = openai.OpenAI(base_url=f"{mesh_server}/v1", api_key="none", max_retries=0)
    for prompt in golden["prompts"]:
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=prompt["messages"],
            temperature=0,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage.prompt_tokens == len(prompt["ids"])
        assert reply.usage.completion_tokens == 24
        assert reply.choices[0].message.content == _reference_text(prompt["greedy"][:24])


def _reference_text(tokens: list[int]) -> str:
    from model.sources import bundled_model_path
    from model.tokenizer import Tokenizer

    return Tokenizer.from_file(bundled_model_path()).decode(tokens, skip_special_tokens=True)
