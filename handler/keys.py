"""Who is calling: API keys, each naming a client with its own limits.

Keys come from two settings, both optional (with neither, the server is open):
- `JAXCHAT_API_KEYS`: comma-separated keys with no limits, named `api-key-1`, `api-key-2`…
- `JAXCHAT_KEYS_FILE`: a TOML file, a local path or `gs://bucket/name`, with one table
  per client::

    [keys.team-a]
    key_sha256 = "9f86d08…"     # hex sha256 of the key (or key = "sk-…")
    requests_per_minute = 60
    tokens_per_minute = 20000   # prompt + completion tokens
    token_budget = 1000000      # total tokens, for the key's lifetime or per period
    budget_period = "month"     # "day" | "month" (UTC); unset = lifetime
    models = ["smollm2-135m-instruct"]   # names or aliases; unset = every model

A key is matched by its sha256, compared with every client's in constant time,
so that neither the file nor the timing of a reply reveals a key. Only the
client's name is ever logged or stored.
"""

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from handler.errors import authentication_failed

Period = Literal["day", "month"]


class ClientEntry(BaseModel):
    """One `[keys.<name>]` table of the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=0)
    budget_period: Period | None = None
    models: list[str] | None = None

    @model_validator(mode="after")
    def _one_key(self) -> "ClientEntry":
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        if self.budget_period is not None and self.token_budget is None:
            raise ValueError("budget_period needs a token_budget")
        return self

    def digest(self) -> bytes:
        """The sha256 of the key."""
        if self.key is not None:
            return key_digest(self.key.get_secret_value())
        assert self.key_sha256 is not None, "validated: one of the two is set"
        return bytes.fromhex(self.key_sha256)


class KeysFile(BaseModel):
    """The keys file: `[keys.<client name>]` tables."""

    model_config = ConfigDict(extra="forbid")

    keys: dict[str, ClientEntry]


@dataclass(frozen=True)
class Client:
    """An authenticated caller: its name and its limits (None: unlimited)."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: Period | None = None
    models: tuple[str, ...] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Keyring:
    """The clients this server accepts, by key digest; empty means no authentication."""

    def __init__(self, clients: dict[bytes, Client]) -> None:
        self._clients = list(clients.items())

    @classmethod
    def load(cls, api_keys: list[str], keys_file: str | None) -> "Keyring":
        """The keyring of the two settings; ValueError naming the problem in the keys file."""
        clients = {
            key_digest(key): Client(f"api-key-{i}") for i, key in enumerate(api_keys, start=1)
        }
        if keys_file:
            for digest, client in read_keys_file(keys_file).items():
                if digest in clients:
                    raise ValueError(f"{keys_file}: client '{client.name}' reuses another key")
                clients[digest] = client
        return cls(clients)

    @property
    def open(self) -> bool:
        return not self._clients

    def authenticate(self, authorization: str | None) -> Client | None:
        """The client whose key `authorization` ("Bearer <key>") carries; None when
        the server is open; a 401 otherwise."""
        if self.open:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise authentication_failed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        offered = key_digest(token.strip())
        found = None
        # Compare with every digest, without stopping early, so timing reveals nothing.
        for digest, client in self._clients:
            if hmac.compare_digest(offered, digest):
                found = client
        if found is None:
            raise authentication_failed("Incorrect API key provided.")
        return found


def read_keys_file(location: str) -> dict[bytes, Client]:
    """The clients of a keys file (local path or gs://), by key digest."""
    try:
        data = tomllib.loads(read_text(location))
        entries = KeysFile.model_validate(data).keys
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ValueError(f"keys file {location}: {exc}") from None
    clients: dict[bytes, Client] = {}
    for name, entry in entries.items():
        digest = entry.digest()
        if digest in clients:
            raise ValueError(f"keys file {location}: '{name}' reuses another client's key")
        clients[digest] = Client(
            name=name,
            requests_per_minute=entry.requests_per_minute,
            tokens_per_minute=entry.tokens_per_minute,
            token_budget=entry.token_budget,
            budget_period=entry.budget_period,
            models=None if entry.models is None else tuple(entry.models),
        )
    return clients


def read_text(location: str) -> str:
    """A local file's text, or a Cloud Storage object's."""
    from model.weights import gcs

    if gcs.is_gcs_uri(location):
        return gcs.read_bytes(location).decode()
    return Path(location).read_text()
