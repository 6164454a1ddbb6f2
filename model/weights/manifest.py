"""jaxchat.json, the manifest of a converted checkpoint (model/weights/orbax.py): its schema,
checked by pydantic, with errors that name the file and the field.

The "config" object (ModelConfig's fields) is also how a prepared GGUF copy
(model/weights/prepared.py) stores its config.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from model.nn.config import ModelConfig

FORMAT = "jaxchat-orbax"
VERSION = 1
MANIFEST = "jaxchat.json"
PARAMS = "params"
GGUF_METADATA = "gguf_metadata.json"
DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = (None, "int8")

# ModelConfig's fields as a pydantic model, read in strict JSON mode (no "2" for 2):
# unknown fields are refused, absent ones with a default take it (so checkpoints
# outlive new optional fields).
_ConfigJSON = create_model(  # type: ignore[call-overload]
    "ConfigJSON",
    __config__=ConfigDict(extra="forbid", strict=True),
    **{
        f.name: (f.type, ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(ModelConfig)
    },
)


class _ManifestJSON(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Literal["jaxchat-orbax"]
    version: Literal[1]
    config: dict[str, Any]
    dtype: Literal["float32", "bfloat16"]
    quantization: Literal["int8"] | None
    source: str
    tokenizer: Literal["gguf", "hf"]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The contents of jaxchat.json. dtype: how unquantized weights are stored;
    tokenizer: "gguf" (gguf_metadata.json) or "hf" (copied Hugging Face files)."""

    config: ModelConfig
    dtype: str
    quantization: str | None
    source: str
    tokenizer: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": dataclasses.asdict(self.config),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "source": self.source,
            "tokenizer": self.tokenizer,
        }


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory with a jaxchat.json (a checkpoint, maybe a broken one)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(path: str | Path) -> Manifest:
    """The Manifest of checkpoint directory `path`.

    Raises FileNotFoundError without jaxchat.json, ValueError naming the file and the
    field for anything malformed.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a jaxchat checkpoint: it has no {MANIFEST}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise ValueError(f"{file}: version {version} needs a newer jaxchat")
    try:
        manifest = _ManifestJSON.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        name = error["loc"][0]
        raise ValueError(f"{file}: field {name!r} is {data.get(name)!r}, {error['msg']}") from None
    return Manifest(
        config=config_from_json(manifest.config, str(file)),
        dtype=manifest.dtype,
        quantization=manifest.quantization,
        source=manifest.source,
        tokenizer=manifest.tokenizer,
    )


def config_from_json(data: dict[str, Any], where: str) -> ModelConfig:
    """A ModelConfig from a "config" object; ValueError naming `where` and the field."""
    try:
        fields = _ConfigJSON.model_validate_json(json.dumps(data))
    except ValidationError as e:
        raise ValueError(f"{where}: {_config_problem(e, data)}") from None
    try:
        return ModelConfig(**dict(fields))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _config_problem(error: ValidationError, data: dict[str, Any]) -> str:
    """The first problem of a "config" object, in words that name the field."""
    errors = error.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown config field(s) {unknown}"
    first = errors[0]
    name = first["loc"][0]
    if first["type"] == "missing" and len(first["loc"]) == 1:
        return f"config lacks the field {name!r}"
    return f"config field {name!r} has the invalid value {data.get(str(name))!r}"
