"""GGUF files prepared once for a fast start: weights as blocks and f32, metadata as JSON.

Loading a GGUF costs a few seconds on a small machine: dequantising the embedding,
fusing and unpermuting the layers' rows, and copying what the steps read out of the
file (1.5-2.5 s for SmolLM2). With a compile cache set, the first load writes what it
produced into `$JAXCHAT_CACHE_DIR/models/<key>/`: the metadata as JSON, the matmul
weights' quantized blocks as they are in the file (model/weights/gguf.py's
`load_gguf_blocks`), and the other parameters in f32 (embeddings, norms, and any
weight in a format the blocks do not take), each as one safetensors file.
No f32 copy of a weight kept as blocks is made, here or on a later load: the quantized
kernels read the blocks, and only where they do not apply (another backend, a mesh)
does the engine dequantise them (model/engine/quantized.py's `split_blocks`); for a
Q4_1 SmolLM2 that saves dequantising, stacking and writing 0.4 GB of f32 on a first
start. The layers' weights are stored stacked ([L, ...] per weight), and read back as
views of those arrays: the engine's scanned layers take them as they are
(model/engine/engine.py's `stack_params`), with no copy to stack them. Both files are
mapped, not read: a weight is paged in when used.
The key covers the file (path, size, modification time), the source of every
project module this one imports at any depth (the loader, config parsing:
model/weights/source_digest.py) and the versions of the libraries that decode the
blocks, so a changed file, loader, config parser or library is prepared afresh.
"""

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from model.nn.config import ModelConfig
from model.nn.params import Params, flatten_dict, unflatten_dict
from model.nn.quantize import BlockWeight, stack_blocks
from model.weights.manifest import config_from_json
from model.weights.source_digest import source_digest

log = logging.getLogger(__name__)

# 2: layers stacked; 3: with the blocks; 4: no f32 copy of the blocks; 5: blocks stacked
FORMAT = 5


# The libraries whose code turns GGUF blocks into the stored arrays.
LIBRARIES = ("gguf", "numpy", "safetensors")


def _key(path: Path) -> str:
    stat = path.stat()
    code = (source_digest(__name__), [version(lib) for lib in LIBRARIES])
    identity = (FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns, code)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:32]


def load_gguf_prepared(
    path: Path, dtype: jnp.dtype, directory: Path | None
) -> tuple[ModelConfig, Params, dict[str, Any], Params]:
    """(config, params as `dtype`, metadata, blocks) of a GGUF file, through the prepared
    copy under `directory` (written on first use; None: always read the GGUF itself).
    `params` lacks the weights that `blocks` holds: the engine dequantises those it
    reads as f32 (model/engine/quantized.py's `split_blocks`)."""
    prepared = None if directory is None else directory / _key(path)
    if prepared is not None and (prepared / "params.safetensors").is_file():
        try:
            return _read(prepared, dtype)
        except (OSError, ValueError, KeyError, SafetensorError) as error:  # damaged: again
            log.warning("ignoring the prepared copy %s: %s", prepared, error)
    # Imported here: a start from the prepared copy never reads the GGUF (60 ms of imports).
    from model.weights import gguf as gguf_loader

    reader = gguf_loader.GGUFFile(path)
    metadata = gguf_loader.read_metadata(reader)
    config = gguf_loader.config_from_gguf(reader, metadata)
    arch = metadata["general.architecture"]
    blocks = gguf_loader.load_gguf_blocks(reader, config, arch)
    kept = set(flatten_dict(blocks))
    params = gguf_loader.load_gguf_params(reader, config, jnp.float32, arch, skip=kept)
    if prepared is not None:
        _write(prepared, path, config, params, metadata, blocks)
    return config, _cast(params, dtype), metadata, blocks


def _cast(params: Params, dtype: jnp.dtype) -> Params:
    return jax.tree.map(lambda w: np.asarray(w).astype(dtype, copy=False), params)


def _flatten(params: Params) -> dict[str, np.ndarray]:
    """Flat f32 arrays by name; every layer's weight stacked under `layers/<name>`."""
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    flat = {k: np.asarray(v, np.float32) for k, v in _flat(rest).items()}
    layers = [_flat(params[f"layers_{i}"]) for i in range(len(params) - len(rest))]
    for name in layers[0] if layers else ():
        flat[f"layers/{name}"] = np.stack([np.asarray(layer[name], np.float32) for layer in layers])
    return flat


def _unflatten(flat: dict[str, np.ndarray], dtype: jnp.dtype) -> Params:
    """Host arrays, as a loader's: layer i's weights are views of the stacked arrays."""
    stacked = {k.removeprefix("layers/"): v for k, v in flat.items() if k.startswith("layers/")}
    params = unflatten_dict({k: v for k, v in flat.items() if not k.startswith("layers/")}, sep="/")
    count = len(next(iter(stacked.values()))) if stacked else 0
    for i in range(count):
        layer = {name: weights[i] for name, weights in stacked.items()}
        params[f"layers_{i}"] = unflatten_dict(layer, sep="/")
    return _cast(params, dtype)


def _flat(tree: dict) -> dict[str, Any]:
    return flatten_dict(tree, sep="/")


def _read(prepared: Path, dtype: jnp.dtype) -> tuple[ModelConfig, Params, dict[str, Any], Params]:
    info = json.loads((prepared / "prepared.json").read_text())
    config = config_from_json(info["config"], str(prepared / "prepared.json"))
    metadata = json.loads((prepared / "metadata.json").read_text())
    params = _unflatten(_mapped(prepared / "params.safetensors"), dtype)
    arrays = _mapped(prepared / "blocks.safetensors")
    blocks = {}
    for name, kind in info["blocks"].items():
        if isinstance(kind, dict):  # every layer's, stacked: each layer's rows, unpadded
            for i, (k, width) in enumerate(zip(kind["kinds"], kind["widths"], strict=True)):
                path = f"layers_{i}/{name.removeprefix('layers/')}"
                blocks[path] = BlockWeight(arrays[name][i, :, :width], k)
        else:
            blocks[name] = BlockWeight(arrays[name], kind)
    return config, params, metadata, unflatten_dict(blocks, sep="/")


# safetensors' element types, as they appear in a file's header, that the copy stores.
_DTYPES = {"F32": np.float32, "U8": np.uint8, "I8": np.int8, "I32": np.int32}


def _mapped(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as read-only views of the file mapped into memory (the
    library's numpy loader reads every byte): an 8-byte little-endian header length, a
    JSON header of name → dtype, shape and byte range, then the data."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file
    start, arrays = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        if not 0 <= begin <= end <= len(data) - start:
            raise ValueError(f"{path}: {name} lies past the end of the file")
        flat = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize, start + begin)
        arrays[name] = flat.reshape(entry["shape"])
    return arrays


def _write(
    prepared: Path,
    source: Path,
    config: ModelConfig,
    params: Params,
    metadata: dict,
    blocks: Params,
) -> None:
    """Write into a temporary sibling and rename it into place: never half a copy. Then
    remove the copies of the same file made before (the file, the code or a library
    changed since: nothing reads them again); other files' copies stay."""
    from model.weights.gguf import metadata_json

    prepared.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=prepared.parent, suffix=".tmp"))
    try:
        save_file(_flatten(params), tmp / "params.safetensors")
        stored, kinds = _stacked_blocks(blocks, config.n_layers)
        save_file(stored, tmp / "blocks.safetensors")
        (tmp / "metadata.json").write_text(metadata_json(metadata))
        info = {
            "format": FORMAT,
            "source": str(source.resolve()),
            "config": dataclasses.asdict(config),
            "blocks": kinds,
        }
        (tmp / "prepared.json").write_text(json.dumps(info))
        shutil.rmtree(prepared, ignore_errors=True)  # a damaged earlier copy
        os.replace(tmp, prepared)
    except OSError as error:  # a full disk costs speed, not the load
        log.warning("could not write the prepared copy %s: %s", prepared, error)
        return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for other in prepared.parent.iterdir():
        if other != prepared and other.suffix != ".tmp" and _source(other) == info["source"]:
            log.info("removing the stale prepared copy %s", other)
            shutil.rmtree(other, ignore_errors=True)  # (a process mapping it keeps its pages)


def _stacked_blocks(blocks: Params, n_layers: int) -> tuple[dict[str, np.ndarray], dict]:
    """The blocks as stored: a weight that every layer has as blocks as one [L, rows,
    bytes] array under `layers/<name>` (a layer's rows padded to the longest), which the
    engine's kernels take as it is (model/engine/quantized.py's `kernel_params`); (arrays,
    what `_read` needs of each: its format, or the layers' formats and row widths)."""
    flat = _flat(blocks)
    arrays = {k: np.asarray(w.blocks) for k, w in flat.items()}
    kinds: dict[str, Any] = {k: w.kind for k, w in flat.items()}
    names = {k.split("/", 1)[1] for k in flat if k.startswith("layers_")}
    for name in sorted(names):
        keys = [f"layers_{i}/{name}" for i in range(n_layers)]
        if not all(k in flat for k in keys):
            continue
        layers = [flat[k] for k in keys]
        arrays[f"layers/{name}"] = np.asarray(stack_blocks(layers).blocks)
        widths = [int(w.blocks.shape[1]) for w in layers]
        kinds[f"layers/{name}"] = {"kinds": [int(w.kind) for w in layers], "widths": widths}
        for k in keys:
            del arrays[k], kinds[k]
    return arrays, kinds


def _source(copy: Path) -> str | None:
    """The GGUF file a prepared copy was made from (None: not a copy, or unreadable)."""
    try:
        return json.loads((copy / "prepared.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
