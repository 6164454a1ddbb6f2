"""Embeddings from the served model: `LLM.embed` and `POST /v1/embeddings`.

The reference is HF transformers on the same GGUF (tests/reference/make_embeddings.py
wrote tests/fixtures/smollm2_embeddings.json): mean of `last_hidden_state` over the
input's tokens, L2-normalised.
"""

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from gguf import GGMLQuantizationType
from prometheus_client.parser import text_string_to_metric_families

from model import kernels
from model.limits import InvalidRequest
from model.types import SamplingParams
from tests.server_process import KEY, MAX_SEQ_LEN, MODEL

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_embeddings.json"
WIDTH = 576  # SmolLM2-135M's hidden size
# Against the reference: 1e-6 at most with f32 products, 2.2e-4 where the quantized kernel
# rounds every prompt token to 16 bits per block of 32 (a CPU with AVX2 or AVX-512 VNNI).
VECTOR_ATOL = 5e-4 if kernels.int_gemm_path(GGMLQuantizationType.Q4_1) else 2e-5


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def texts(reference) -> list[str]:
    return [case["text"] for case in reference["cases"]]


@pytest.fixture(scope="module")
def batched(llm, texts):
    return llm.embed(texts)


# ---- the Python API ------------------------------------------------------------------


def test_the_vectors_match_hf_transformers_on_the_same_weights(llm, reference, batched):
    cases = reference["cases"]
    assert [llm.tokenizer.encode(c["text"]) for c in cases] == [c["ids"] for c in cases]
    expected = np.array([c["embedding"] for c in cases])
    assert batched.tokens == tuple(len(c["ids"]) for c in cases)
    np.testing.assert_allclose(batched.vectors, expected, atol=VECTOR_ATOL)
    assert (batched.vectors * expected).sum(1) == pytest.approx(1.0, abs=1e-6)


def test_the_vectors_have_the_models_width_and_unit_norm(llm, batched, texts):
    assert llm.width == WIDTH
    assert batched.vectors.shape == (len(texts), WIDTH)
    assert batched.vectors.dtype == np.float32
    assert np.linalg.norm(batched.vectors, axis=1) == pytest.approx(1.0, abs=1e-6)


def test_batched_results_equal_single_ones(llm, batched, texts):
    singles = np.stack([llm.embed([text]).vectors[0] for text in texts])
    np.testing.assert_allclose(singles, batched.vectors, atol=1e-5)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(batched):
    cat, paraphrase, revenue = batched.vectors[:3]  # the fixture's first three sentences
    assert cat @ paraphrase > cat @ revenue + 0.1
    assert paraphrase @ cat > paraphrase @ revenue + 0.1


def test_token_ids_embed_as_their_text_does(llm, reference, batched):
    ids = [case["ids"] for case in reference["cases"][:3]]
    np.testing.assert_allclose(llm.embed(ids).vectors, batched.vectors[:3], atol=1e-5)


def test_an_embedding_computed_beside_a_stream_changes_neither(llm, batched, texts):
    """The paragraphs are prefilled in small chunks while a stream decodes: every
    chunk's hidden states are pooled once, and the stream keeps its greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompt = llm.encode_chat("Count from one to fifty in words.")
    alone = llm.generate(prompt, params).token_ids
    stream = llm.stream(prompt, params)
    deltas = [next(stream)]  # it decodes from now on
    beside = llm.embed([texts[-1]] * 3).vectors  # 3 x 86 tokens, 64 per step at most
    deltas += list(stream)
    assert tuple(t for d in deltas for t in d.token_ids) == alone
    np.testing.assert_allclose(beside, np.repeat(batched.vectors[-1:], 3, 0), atol=1e-5)


def test_inputs_the_model_cannot_embed_are_refused(llm):
    with pytest.raises(InvalidRequest, match="empty"):
        llm.embed(["fine", ""])
    with pytest.raises(InvalidRequest, match=r"input\[1\] holds token ids outside"):
        llm.embed([[1, 2], [llm.vocab_size]])
    with pytest.raises(InvalidRequest, match=f"{MAX_SEQ_LEN} tokens, however input has 600"):
        llm.embed([[5] * 600])


# ---- POST /v1/embeddings through the real server --------------------------------------


def test_the_sdk_gets_the_same_vectors_as_the_python_api(client, batched, texts):
    reply = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    assert reply.object == "list" and reply.model == MODEL
    assert [d.index for d in reply.data] == list(range(len(texts)))
    assert all(d.object == "embedding" for d in reply.data)
    got = np.array([d.embedding for d in reply.data])
    np.testing.assert_allclose(got, batched.vectors, atol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(batched.tokens)


def test_float_and_base64_encodings_carry_the_same_numbers(base_url, texts):
    def post(**fields):
        reply = requests.post(
            f"{base_url}/v1/embeddings",
            json={"model": MODEL, "input": texts[0], **fields},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    floats = post(encoding_format="float")["data"][0]["embedding"]
    packed = post(encoding_format="base64")["data"][0]["embedding"]
    assert isinstance(floats, list) and len(floats) == WIDTH
    unpacked = np.frombuffer(base64.b64decode(packed), dtype="<f4")
    assert unpacked.tolist() == np.float32(floats).tolist()
    assert post()["data"][0]["embedding"] == floats  # float is the default


def test_token_id_inputs_over_http(client, reference):
    ids = reference["cases"][3]["ids"]
    one = client.embeddings.create(model="fast", input=ids, encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids) and one.model == "fast"
    many = client.embeddings.create(model=MODEL, input=[ids, ids + ids])
    assert len(many.data) == 2 and many.usage.prompt_tokens == 3 * len(ids)
    np.testing.assert_allclose(
        many.data[0].embedding, reference["cases"][3]["embedding"], atol=VECTOR_ATOL
    )


@pytest.mark.parametrize(
    ("fields", "status", "param", "message"),
    [
        ({"dimensions": 256}, 400, "dimensions", "does not support specifying dimensions"),
        ({"input": "x " * 600}, 400, "input", f"maximum context length is {MAX_SEQ_LEN}"),
        ({"input": ""}, 400, "input", "empty"),
        ({"input": []}, 400, "input", "empty list"),
        ({"input": ["a", 3]}, 400, "input.1", None),
        ({"encoding_format": "int8"}, 400, "encoding_format", None),
        ({"model": "nope"}, 404, "model", "nope"),
    ],
)
def test_bad_requests_get_openai_errors(base_url, fields, status, param, message):
    body = {"model": MODEL, "input": "hello", **fields}
    reply = requests.post(
        f"{base_url}/v1/embeddings",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    if message is not None:
        assert message in error["message"]


def test_the_models_own_width_is_accepted_as_dimensions(client):
    reply = client.embeddings.create(model=MODEL, input="hi", dimensions=WIDTH)
    assert len(reply.data[0].embedding) == WIDTH


def test_metrics_count_embedding_tokens_and_requests(base_url, client):
    def scrape() -> dict[tuple[str, tuple], float]:
        text = requests.get(f"{base_url}/metrics", timeout=30).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = scrape()
    reply = client.embeddings.create(model=MODEL, input=["one", "two words"])
    after = scrape()
    tokens = ("jaxchat:prompt_tokens_total", ())
    assert after[tokens] - before.get(tokens, 0) == reply.usage.prompt_tokens
    ok = ("jaxchat:http_requests_total", (("route", "/embeddings"), ("status", "200")))
    assert after[ok] - before.get(ok, 0) == 1


def test_embeddings_need_the_key(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MODEL, input="hello")
