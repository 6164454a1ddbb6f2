"""jaxchat's Orbax checkpoint directory: a converted model that restores sharded onto a mesh.

    jaxchat.json     format version, the ModelConfig fields, the stored weight dtype,
                     `quantization` (null or "int8") and the source it was converted from
    params/          an Orbax PyTree checkpoint (tensorstore, OCDBT) of the parameter tree
    gguf_metadata.json  from a GGUF source: its tokenizer.* and general.* metadata
    tokenizer.json … from a Hugging Face source: its tokenizer and config files, copied

`convert` writes one with the GGUF / Hugging Face loaders, optionally with int8 matmul
weights (model/nn/quantize.py). `load_checkpoint` restores it onto a mesh: the target
NamedSharding of every parameter comes from the sharding rules, and Orbax reads each
device's shard from tensorstore straight into that device. No full copy of a split
array is assembled on the host or put on every device first, and the Engine's
device_put finds every array already in place.
The tokenizer and chat template come from the usual constructors over the files above.
"""

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

from model.nn.config import ModelConfig
from model.nn.params import Params
from model.nn.quantize import map_matmul_weights, path_str, quantize_int8, quantized_shape
from model.text.chat_template import ChatTemplate
from model.text.metadata import text_from_metadata
from model.text.tokenizer import Tokenizer
from model.weights.gguf import load_gguf, metadata_json, read_metadata
from model.weights.hf import load_hf
from model.weights.manifest import (
    DTYPES,
    GGUF_METADATA,
    MANIFEST,
    PARAMS,
    QUANTIZATIONS,
    Manifest,
    is_checkpoint,
    read_manifest,
)
from sharding.rules import TENSOR_PARALLEL, ShardingRules, param_shardings

# What Tokenizer.from_hf_dir and ChatTemplate.from_hf_dir read; config.json too,
# because the tokenizer pads its vocabulary to config.json's vocab_size.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "config.json",
)


# ---- writing ----------------------------------------------------------------------------


def convert(
    src: str | Path,
    dest: str | Path,
    *,
    quantize: str | None = None,
    dtype: str | jnp.dtype = jnp.float32,
    source: str | None = None,
    report: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Write the checkpoint directory `dest` from a GGUF file or Hugging Face directory `src`.

    quantize: None, or "int8" for int8 matmul weights (model/nn/quantize.py). dtype: how the
    other weights are stored (float32 or bfloat16). source: recorded in jaxchat.json
    (default: `src`). report: called with a line per step. Returns the written Manifest.
    Raises FileExistsError when `dest` exists and is not an empty directory; `dest` only
    appears once complete (it is written next to it and renamed).
    """
    src, dest = Path(src), Path(dest)
    dtype = _checked_arguments(src, dest, quantize, dtype)
    report(f"loading {src} …")
    config, params, write_tokenizer = _load_source(src)
    kind = "hf" if src.is_dir() else "gguf"
    manifest = Manifest(config, dtype, quantize, source or str(src), kind)
    params = _stored_params(params, quantize, jnp.dtype(dtype))
    report(f"writing {dest} …")
    import orbax.checkpoint as ocp  # 0.4 s to import: only when a checkpoint is used

    with _staged(dest) as staging:
        write_tokenizer(staging)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            checkpointer.save(staging / PARAMS, args=ocp.args.PyTreeSave(params))
        (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def _checked_arguments(src: Path, dest: Path, quantize: str | None, dtype) -> str:
    """The dtype's name, once `convert`'s arguments are valid; ValueError or
    FileExistsError naming the one that is not."""
    name = jnp.dtype(dtype).name
    if quantize not in QUANTIZATIONS or name not in DTYPES:
        raise ValueError(
            f"quantize must be None or 'int8' (got {quantize!r}) and dtype one of "
            f"{', '.join(DTYPES)} (got {name!r})"
        )
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not an empty directory")
    if is_checkpoint(src):
        raise ValueError(f"{src} is already a jaxchat checkpoint")
    return name


@contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `dest` (absolute) that becomes `dest` when the block
    succeeds and is deleted when it fails, so `dest` never holds half a checkpoint."""
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run with this pid
    staging.mkdir()
    try:
        yield staging
        if dest.exists():
            dest.rmdir()  # an empty directory, checked before
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_source(src: Path) -> tuple[ModelConfig, Params, Callable[[Path], None]]:
    """(config, f32 params, a function writing the tokenizer files into a directory)."""
    if src.is_dir():
        config, params = load_hf(src, jnp.float32)
        return config, params, lambda directory: copy_hf_tokenizer(src, directory)
    config, params, reader = load_gguf(src, jnp.float32)
    metadata = {
        key: value
        for key, value in read_metadata(reader).items()
        if key.startswith(("tokenizer.", "general."))
    }

    def write_tokenizer(directory: Path) -> None:
        (directory / GGUF_METADATA).write_text(metadata_json(metadata))

    return config, params, write_tokenizer


def _stored_params(params: Params, quantize: str | None, dtype: jnp.dtype) -> Params:
    """The tree to save: matmul weights as QuantizedWeight when asked, the rest as `dtype`."""
    cast = lambda w: jnp.asarray(w, dtype)  # noqa: E731
    if quantize is None:
        return jax.tree.map(cast, params)
    total = sum(jax.tree.leaves(map_matmul_weights(lambda w: 1, params, other=lambda w: 0)))
    with tqdm(total=total, desc="int8", unit="tensor", disable=not sys.stderr.isatty()) as bar:

        def quantize_one(w):
            bar.update()
            return quantize_int8(w)

        return map_matmul_weights(quantize_one, params, other=cast)


def copy_hf_tokenizer(src: Path, directory: Path) -> None:
    """Copy the tokenizer and config files of Hugging Face directory `src` that exist."""
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)


def directory_bytes(path: str | Path) -> int:
    """The total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- reading ----------------------------------------------------------------------------


def abstract_params(config: ModelConfig, dtype: jnp.dtype, quantization: str | None) -> Params:
    """The parameter tree as ShapeDtypeStructs: Transformer(config, dtype)'s, with the
    matmul weights as QuantizedWeight shapes for "int8". Nothing is allocated."""
    from model.nn.transformer import param_shapes  # (Flax, only where a checkpoint is read)

    shapes = param_shapes(config, dtype)
    return map_matmul_weights(quantized_shape, shapes) if quantization == "int8" else shapes


def load_checkpoint(
    path: str | Path, mesh: Mesh, dtype: jnp.dtype, rules: ShardingRules = TENSOR_PARALLEL
) -> tuple[ModelConfig, Params]:
    """(config, params) of checkpoint directory `path`, restored onto `mesh`.

    Every array already has its `param_shardings(…, mesh, rules)` sharding; each device's
    shard is read on its own. Unquantized weights are cast to `dtype` as they are read;
    int8 values and their f32 scales stay as stored. Raises FileNotFoundError /
    ValueError naming the path for a missing or malformed jaxchat.json or params.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / PARAMS).is_dir():
        raise FileNotFoundError(f"{path} is not a complete jaxchat checkpoint: no {PARAMS}/")
    shapes = abstract_params(manifest.config, jnp.dtype(dtype), manifest.quantization)
    target = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        param_shardings(shapes, mesh, rules),
    )
    import orbax.checkpoint as ocp  # 0.4 s to import: only when a checkpoint is used

    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        stored = checkpointer.metadata(path.absolute() / PARAMS).item_metadata.tree
        _check_stored(path, _shapes(stored), _shapes(target))
        params = checkpointer.restore(path.absolute() / PARAMS, args=restore)
    return manifest.config, params


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined path → shape of every array (or metadata) leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_str(p): tuple(leaf.shape) for p, leaf in leaves}


def _check_stored(path: Path, stored: dict, wanted: dict) -> None:
    """ValueError naming the parameters whose presence or shape in params/ differs from
    what jaxchat.json describes (checked up front: Orbax's own errors are noisy)."""
    problems = [f"missing {name}" for name in wanted if name not in stored]
    problems += [f"unexpected {name}" for name in stored if name not in wanted]
    problems += [
        f"{name} is {list(stored[name])}, expected {list(shape)}"
        for name, shape in wanted.items()
        if name in stored and stored[name] != shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + ("; …" if len(problems) > 4 else "")
        raise ValueError(f"{path}/{PARAMS} does not match {MANIFEST}: {shown}")


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, ChatTemplate]:
    """The tokenizer and chat template stored in checkpoint directory `path`."""
    path = Path(path)
    if read_manifest(path).tokenizer == "gguf":
        return text_from_metadata(json.loads((path / GGUF_METADATA).read_text()))
    tokenizer = Tokenizer.from_hf_dir(path)
    return tokenizer, ChatTemplate.from_hf_dir(path, tokenizer)
