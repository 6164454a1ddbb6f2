"""POST /v1/embeddings: OpenAI's embeddings API over the served model.

An input's embedding is the mean of the model's final hidden states (after its
final norm) over the input's tokens, L2-normalised (README "Embeddings" says why).
The engine computes it in its own prefill steps (`LLM.embed`), beside running
generations: the served weights are the only copy. `input` is a string, a list
of strings, one list of token ids or a list of them, as OpenAI takes it; the
reply lists one embedding per input, in order, and the tokens they took.
`encoding_format` "float" writes the numbers; "base64" packs them as
little-endian float32, which the openai SDK asks for by default and unpacks.
`dimensions` is refused unless it is the model's own width: a chat model's
vectors cannot be shortened the way Matryoshka-trained embedding models' can.
"""

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from handler.errors import invalid_request
from handler.generation import engine_errors
from handler.model_host import ServedModel
from handler.quota import Meter
from handler.request_parts import Strict
from handler.requests import INT32_MAX
from model.limits import MAX_EMBEDDING_INPUTS, check_embedding_input

TokenId = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]


class EmbeddingRequest(Strict):
    """The body of `POST /v1/embeddings`."""

    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=INT32_MAX)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _some_inputs(cls, value: object) -> object:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds more than {MAX_EMBEDDING_INPUTS} items")
        return value

    @property
    def inputs(self) -> list[str | list[int]]:
        """The inputs: one string or id list, or a batch of them."""
        value = self.input
        if isinstance(value, str) or isinstance(value[0], int):
            return [value]  # a str, or one list of ids
        return list(value)  # strings, or lists of ids


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def embed(llm: ServedModel, request: EmbeddingRequest, meter: Meter) -> EmbeddingList:
    """The reply to an embeddings request; its tokens are reserved with `meter` before
    the engine runs and charged when it is done (none if it fails)."""
    if request.dimensions is not None and request.dimensions != llm.width:
        raise invalid_request(
            f"This model does not support specifying dimensions other than its own ({llm.width}).",
            param="dimensions",
        )
    inputs = request.inputs
    ids = [llm.tokenizer.encode(x) if isinstance(x, str) else x for x in inputs]
    with engine_errors():
        for i, one in enumerate(ids):
            name = f"input[{i}]" if isinstance(request.input, list) and len(ids) > 1 else "input"
            check_embedding_input(one, llm.vocab_size, llm.max_seq_len, name)
    tokens = sum(map(len, ids))
    meter.admit(tokens)
    try:
        with engine_errors():
            vectors = llm.embed(ids).vectors
    except BaseException:
        meter.settle(0)
        raise
    meter.settle(tokens)
    data = [
        Embedding(index=i, embedding=encode(vector, request.encoding_format))
        for i, vector in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingList(data=data, model=request.model, usage=usage)


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float32 vector as JSON numbers (each float32's shortest decimal form) or base64."""
    vector = np.asarray(vector, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(str(x)) for x in vector]
