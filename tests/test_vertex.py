"""Vertex AI's custom-container contract, through the app over the fake engine."""

import pytest

from tests.fake_model import MODEL, FakeLLM

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def vertex(serve, monkeypatch):
    """The app as Vertex AI runs it: its routes from AIP_* variables."""
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/predict")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/isalive")
    llm = FakeLLM()
    return serve(llm=llm, api_keys=["k"]), llm


def test_health_answers_on_vertex_route(vertex):
    client, _ = vertex
    assert client.get("/isalive").get_json()["status"] == "ok"


def test_instances_are_chat_or_completion_requests_with_shared_parameters(vertex):
    client, llm = vertex
    body = {
        "instances": [{"messages": HELLO}, {"prompt": "Once", "max_tokens": 3}],
        "parameters": {"max_tokens": 5, "temperature": 0},
    }
    reply = client.post("/predict", json=body)  # no key: Vertex's IAM guards the endpoint
    assert reply.status_code == 200, reply.get_data(as_text=True)
    chat, legacy = reply.get_json()["predictions"]
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    assert chat["choices"][0]["message"]["content"] == "Hello"  # 5 tokens: parameters
    assert chat["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert legacy["object"] == "text_completion" and legacy["choices"][0]["text"] == "Hel"
    assert sorted(p.temperature for p in llm.calls) == [0.0, 0.0]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"instances": []}, "instances"),
        (
            {"instances": [{"messages": HELLO}, {"messages": HELLO, "top_p": 7}]},
            "instances.1.top_p",
        ),
        ({"instances": [{"messages": HELLO, "stream": True}]}, "instances.0"),
        ({"instances": [{"messages": HELLO, "model": "other"}]}, "instances.0.model"),
        ({"instances": ["text"]}, "instances.0"),
        ({"predict": []}, None),
    ],
)
def test_a_bad_instance_is_a_400_naming_it(vertex, body, param):
    client, llm = vertex
    reply = client.post("/predict", json=body)
    assert reply.status_code == 400
    assert reply.get_json()["error"]["param"] == param
    assert llm.calls == []  # nothing ran


def test_without_vertex_settings_there_is_no_predict_route(serve):
    assert serve().post("/predict", json={"instances": []}).status_code == 404
