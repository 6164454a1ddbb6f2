"""Runtime settings for the server, read from the environment.

Every field is documented by its docstring; the `jaxchat serve` options
(handler/cli.py) are generated from them, so keep each to one or two sentences a
deployer can act on, and list each in the README's settings table (a test checks).
Defaults the Python API shares come
from model/limits.py.
"""

import ast
import inspect
import os
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.limits import (
    DEFAULT_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_SHARE,
    DEFAULT_SPECULATIVE_TOKENS,
)

ENV_PREFIX = "JAXCHAT_"


class Settings(BaseModel):
    """Server settings: `JAXCHAT_<FIELD>` environment variables, plus `PORT`.

    Read by hand rather than through pydantic-settings, whose import (its secret
    managers' sources, asyncio, dotenv) took 0.1 s of every start: a value given by
    field name wins over the environment (matched regardless of case, as
    pydantic-settings does), which wins over the default; pydantic validates each.
    """

    model_config = ConfigDict(
        # Not use_attribute_docstrings: it parses this module's source whenever it is
        # imported (50 ms of every start-up); `docs()` reads them when asked.
        populate_by_name=True,
        # `model` and `model_name` are our field names, not pydantic internals.
        protected_namespaces=(),
        extra="forbid",
        validate_default=True,
    )

    def __init__(self, **values: Any) -> None:
        environment = {name.upper(): value for name, value in os.environ.items()}
        found = {
            name: environment[variable.upper()]
            for name in type(self).model_fields
            if (variable := type(self).variable(name)).upper() in environment
        }
        super().__init__(**(found | values))

    model: str | None = None
    """The weights: a GGUF file, a Hugging Face directory (config.json, safetensors,
    tokenizer), or `gs://bucket/path` to either. Unset serves the bundled default
    model (SmolLM2-135M-Instruct)."""

    model_name: str = "smollm2-135m-instruct"
    """Model id listed by `/v1/models`; requests must name it (or an alias) in `model`."""

    model_aliases: list[str] = Field(default=[])
    """Comma-separated other names for the model, e.g. `default,fast,pro`. Each is
    listed by `/v1/models`, and a reply echoes the name the request used."""

    max_seq_len: int | None = Field(default=None, ge=16)
    """Context limit in tokens, prompt plus completion, per request. Unset: the
    model's own context (8192 for SmolLM2); a larger value is capped to it."""

    max_batch: int = Field(default=DEFAULT_BATCH, ge=1, le=1024)
    """Decode slots run together in one step (continuous batching): the most
    requests generating at once."""

    kv_pool: str | None = Field(default=None, pattern=r"^(\d+|0?\.\d+|1\.0*)$")
    """Size of the KV pool every sequence's keys and values share: a number of
    tokens (`65536`) or a fraction of the memory free at start-up (`0.5`). Unset:
    32768 tokens on CPU (up to 1.5 GB for SmolLM2-135M in float32), 85% of free device
    memory on GPU/TPU."""

    max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=0)
    """Requests that may wait for a free slot; beyond it requests get 503 with Retry-After."""

    mesh: str | None = None
    """Device mesh as DATAxMODEL, e.g. `2x4` (slots split over 2, weights and KV
    heads over 4). Unset: every device, on the model axis as far as KV heads divide."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: `auto` picks float32 on CPU and bfloat16 on TPU/GPU."""

    kv_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """The KV pool's element type: `auto` is the compute dtype; `float16` halves the pool's
    memory on CPU (jaxchat's kernels read it) at a small cost in precision."""

    unrolled_decode: Literal["auto", "on", "off"] = "auto"
    """Also compile the decode steps of up to 8 rows with unrolled layers, in the
    background once serving, and use them when ready: on CPU with f32 weights a lone
    stream decodes about a third faster, for a second copy of the weights in memory and
    about 10 s of compiling. `auto`: on CPU where the steps do not read quantized blocks
    through jaxchat's kernels (those are as fast scanned)."""

    speculative: Literal["off", "ngram"] = "ngram"
    """Speculative decoding: `ngram` drafts tokens by looking the latest ones up in the
    prompt and output (prompt lookup) and verifies them in one step, where that pays; `off`."""

    speculative_tokens: int = Field(default=DEFAULT_SPECULATIVE_TOKENS, ge=1, le=31)
    """The most draft tokens one sequence verifies per step."""

    prefill_share: float = Field(default=DEFAULT_PREFILL_SHARE, gt=0, le=100)
    """Prompt work a step carries beside decoding streams, as a share of their own step:
    their gaps between tokens stay within 1 + this times their length without it. Lower
    is smoother for running streams and slower for a long prompt's first token."""

    api_keys: list[str] = Field(default=[], repr=False)
    """Comma-separated API keys accepted as `Authorization: Bearer <key>`.
    Empty disables authentication (`/health` never needs a key)."""

    keys_file: str | None = None
    """A TOML file of client keys with their limits (a local path or `gs://`): one
    `[keys.<name>]` table per client with `key_sha256` (or `key`) and optional
    `requests_per_minute`, `tokens_per_minute`, `token_budget`, `budget_period`
    (`day`/`month`) and `models`. Read at start-up; used beside JAXCHAT_API_KEYS."""

    state_url: str | None = Field(default=None, repr=False)
    """`redis://[:password@]host:port/db` to share rate limits, budgets and the response
    cache between instances. Unset: embedded (limits and cache in memory, budgets in
    SQLite under JAXCHAT_STATE_DIR)."""

    state_dir: str = "~/.local/state/jaxchat"
    """Directory of the embedded store's SQLite usage file (budgets), when
    JAXCHAT_STATE_URL is unset. It must outlive the process for budgets to survive a
    restart (on Cloud Run, whose disk is memory, use Redis)."""

    response_cache_ttl: int = Field(default=0, ge=0)
    """Seconds a reply to a deterministic request (temperature 0 or a seed) is kept
    and answered again to an identical request; 0 disables the response cache."""

    response_cache_max_entries: int = Field(default=10_000, ge=1)
    """Most replies the response cache holds; the oldest go first."""

    response_cache_max_bytes: int = Field(default=64 << 20, ge=1024)
    """Most bytes the response cache holds; the oldest replies go first."""

    cache_hits_free: bool = False
    """Do not charge replies from the response cache to rate limits and budgets
    (by default a hit costs the tokens of the reply it repeats)."""

    log_format: Literal["auto", "json", "text"] = "auto"
    """`json`: one JSON object per line on stdout, as Cloud Logging reads them; `text`:
    plain lines. `auto`: json on Cloud Run (K_SERVICE set), text elsewhere."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The lowest level logged."""

    playground: bool = True
    """The browser playground at `GET /`: a chat page that streams from this server's
    API (the page needs no key; it sends the one typed into it). `0` turns it off."""

    compile_cache: str | None = None
    """Compilation cache: a local directory or a `gs://bucket/prefix` (mirrored under
    JAXCHAT_CACHE_DIR). A restart with a warm cache loads every executable instead
    of compiling it, and is ready as soon as the model is loaded. Unset: no cache
    (beyond `JAX_COMPILATION_CACHE_DIR`, which JAX reads itself)."""

    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body accepted, in bytes; larger bodies get 413."""

    keep_alive: int = Field(default=620, ge=1)
    """Seconds an idle connection stays open for the client's next request. Longer
    than the clients' own pools keep one (httpx, under the openai SDK: 5 s) and than
    Google Cloud load balancers' 600 s, so the client always closes first and never
    sends a request on a connection the server is closing."""

    vertex_predict_route: str | None = Field(default=None, validation_alias="AIP_PREDICT_ROUTE")
    """Vertex AI's predict route (it sets `AIP_PREDICT_ROUTE` in a custom container):
    `{"instances": [...], "parameters": {...}}` answered with `{"predictions": [...]}`."""

    vertex_health_route: str | None = Field(default=None, validation_alias="AIP_HEALTH_ROUTE")
    """Vertex AI's health route (`AIP_HEALTH_ROUTE`): answers as `/health` does."""

    port: int = Field(default=8080, validation_alias="PORT")
    """Port to listen on, from the plain `PORT` variable (as Cloud Run sets it)."""

    @field_validator("model_aliases", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Accept "a,b,c" (the environment form) as well as a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable that sets field `name`: `JAXCHAT_<NAME>`, or the
        field's alias (`PORT`)."""
        alias = cls.model_fields[name].validation_alias
        if isinstance(alias, str):
            return alias
        return f"{ENV_PREFIX}{name.upper()}"

    @classmethod
    @cache
    def docs(cls) -> dict[str, str]:
        """Each field's docstring (the string under it in this class), as one line."""
        [body] = ast.parse(inspect.getsource(cls)).body
        assert isinstance(body, ast.ClassDef)
        docs = {}
        for field, doc in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[field.target.id] = " ".join(doc.value.value.split())
        return docs

    @property
    def model_names(self) -> list[str]:
        """Every name the model answers to: its id first, then the aliases."""
        return list(dict.fromkeys([self.model_name, *self.model_aliases]))

    @property
    def llm_dtype(self) -> str | None:
        """The dtype argument for `LLM`: None lets the engine choose by backend."""
        return None if self.dtype == "auto" else self.dtype

    @property
    def llm_unrolled_decode(self) -> bool | None:
        """The unrolled_decode argument for `LLM`: None lets the engine choose by backend."""
        return {"auto": None, "on": True, "off": False}[self.unrolled_decode]
