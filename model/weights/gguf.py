"""Load a Llama-family GGUF file into the Transformer's parameter tree.

A declarative table maps GGUF tensor names to parameter paths and a pure
transform from the GGUF (numpy, [out, in]) layout to ours. Quantised tensors
(Q8_0, Q4_0, Q4_1, …) and F16/BF16 are dequantised by the `gguf` package.
"""

import dataclasses
import json
import math
import mmap
import struct
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.quants import quant_shape_to_byte_shape

from model.nn.config import ModelConfig
from model.nn.params import Params, unflatten_dict
from model.nn.quantize import BLOCK_FORMATS, BlockWeight

# Architectures whose converter permuted Q/K rows into llama.cpp's interleaved
# RoPE layout; we undo it to get the rotate-half layout of the HF weights.
PERMUTED_QK_ARCHS = ("llama", "mistral")


class GGUFTensor(NamedTuple):
    """A tensor's entry, as `gguf.GGUFReader`'s: `shape` in GGUF's order (innermost
    first); `data` a read-only view of the file in numpy's order, a quantized tensor's
    rows as their bytes ([..., row bytes] uint8)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


# GGUF's scalar value types → struct/numpy format; GGML's plain tensor types → dtype.
_V = gguf.GGUFValueType
_SCALARS: dict[int, str] = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.FLOAT32: "f",
    _V.BOOL: "?",
    _V.UINT64: "Q",
    _V.INT64: "q",
    _V.FLOAT64: "d",
}
_PLAIN = {
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


class GGUFFile:
    """A GGUF file's metadata (as Python values) and tensor table, read in one pass over
    its header, with the tensors' data mapped from the file. It reads what
    `gguf.GGUFReader` reads (tests/test_gguf_loader.py compares them), without a numpy
    view per metadata element: SmolLM2's header (49k tokens, 48k merges) takes 0.25 s
    instead of 3.3."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._at = 0
        try:
            self._read()
        except (struct.error, ValueError) as error:  # a header cut short, or not GGUF
            raise ValueError(f"{path}: not a readable GGUF file ({error})") from error

    def _read(self) -> None:
        magic, version, n_tensors, n_fields = self._unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError("not a little-endian GGUF file of version 2 or 3")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.metadata:
                raise ValueError(f"the field {key} appears twice")
            self.metadata[key] = self._value(self._unpack("<I")[0])
        entries = [self._entry() for _ in range(n_tensors)]
        align = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self._at // align) * align
        self.tensors = [
            self._tensor(start + at, name, dims, kind) for name, dims, kind, at in entries
        ]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("a tensor name appears twice")

    def _unpack(self, layout: str) -> tuple:
        values = struct.unpack_from(layout, self._map, self._at)
        self._at += struct.calcsize(layout)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        self._at += length
        return str(self._map[self._at - length : self._at], "utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _V.STRING:
            return self._string()
        if kind == _V.ARRAY:
            item, count = self._unpack("<IQ")
            if item not in _SCALARS:
                return [self._value(item) for _ in range(count)]
            dtype = np.dtype("<" + _SCALARS[item])
            values = np.frombuffer(self._map, dtype, count, self._at).tolist()
            self._at += count * dtype.itemsize
            return values
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._unpack("<" + _SCALARS[kind])[0]

    def _entry(self) -> tuple[str, tuple[int, ...], int, int]:
        """(name, dims, type, offset from the data's start) of the next tensor."""
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        kind, offset = self._unpack("<IQ")
        return name, dims, kind, offset

    def _tensor(self, at: int, name: str, dims: tuple[int, ...], kind: int) -> GGUFTensor:
        tensor_type = gguf.GGMLQuantizationType(kind)
        shape, count = tuple(reversed(dims)), math.prod(dims)
        dtype = _PLAIN.get(tensor_type)
        if dtype is None:  # a quantized tensor: its rows' bytes
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            shape = quant_shape_to_byte_shape(shape, tensor_type)
            count, dtype = count // block * size, np.uint8
        data = np.frombuffer(self._map, dtype, count, at).reshape(shape)
        return GGUFTensor(name, tensor_type, dims, data)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields of a GGUF file as Python values."""
    return dict(reader.metadata)


def metadata_json(metadata: dict[str, Any]) -> str:
    """GGUF metadata as JSON (a prepared copy's: model/weights/prepared.py), read back
    with json.loads."""
    return json.dumps(metadata, default=_json_value)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert `permute`: [heads*H, ...] interleaved → halves."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Transform = Callable[..., np.ndarray]
Table = dict[tuple[str, ...], tuple[tuple[str, ...], Transform]]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _fused_qkv(n_heads: int, n_kv_heads: int, permuted: bool) -> Transform:
    """q [N·H, D], k [K·H, D], v [K·H, D] (weights or biases) → qkv [(N+2K)·H, D]."""

    def transform(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if permuted:
            q, k = unpermute_rows(q, n_heads), unpermute_rows(k, n_kv_heads)
        return np.concatenate([q, k, v], axis=0)

    return transform


def _stack_rows(*ws: np.ndarray) -> np.ndarray:
    """gate [F, D], up [F, D] → [2F, D]."""
    return np.concatenate(ws, axis=0)


def tensor_table(config: ModelConfig, arch: str) -> Table:
    """Parameter path → (GGUF tensor names, transform of their [out, in] arrays).

    Our weights are [out, in] like GGUF's, so most tensors map as they are.
    """
    fuse = _fused_qkv(config.n_heads, config.n_kv_heads, arch in PERMUTED_QK_ARCHS)
    table: Table = {
        ("embed", "embedding"): (("token_embd.weight",), _same),
        ("final_norm", "scale"): (("output_norm.weight",), _same),
    }
    if not config.tie_embeddings:
        table[("lm_head",)] = (("output.weight",), _same)
    for i in range(config.n_layers):
        layer, blk = f"layers_{i}", f"blk.{i}"
        table |= {
            (layer, "attn_norm", "scale"): ((f"{blk}.attn_norm.weight",), _same),
            (layer, "attn", "qkv"): (tuple(f"{blk}.attn_{x}.weight" for x in "qkv"), fuse),
            (layer, "attn", "o"): ((f"{blk}.attn_output.weight",), _same),
            (layer, "mlp_norm", "scale"): ((f"{blk}.ffn_norm.weight",), _same),
            (layer, "mlp", "gate_up"): (
                (f"{blk}.ffn_gate.weight", f"{blk}.ffn_up.weight"),
                _stack_rows,
            ),
            (layer, "mlp", "down"): ((f"{blk}.ffn_down.weight",), _same),
        }
        if config.qkv_bias:
            table[(layer, "attn", "qkv_bias")] = (
                tuple(f"{blk}.attn_{x}.bias" for x in "qkv"),
                fuse,
            )
    return table


def config_from_metadata(meta: dict[str, Any], *, has_output: bool) -> ModelConfig:
    """The ModelConfig in GGUF key/values (`{arch}.block_count`, …).

    has_output: whether the file has an `output.weight` tensor; without it the
    head is tied to the token embedding.
    """
    arch = meta["general.architecture"]
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama, mistral, qwen2)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", dim // n_heads)),
        ffn_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output,
        qkv_bias=arch == "qwen2",
        max_position=int(get("context_length", 2048)),
    )


def config_from_gguf(reader: GGUFFile, meta: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig described by a GGUF file's metadata and tensor list."""
    meta = meta if meta is not None else read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata(meta, has_output="output.weight" in names)
    if "rope_freqs.weight" in names:
        # llama.cpp stores Llama-3.1 RoPE scaling as per-frequency factors; ignoring
        # them would silently change the model.
        raise ValueError(
            "this GGUF scales RoPE with a rope_freqs tensor (Llama 3.1), which is not "
            "supported for GGUF yet; serve the Hugging Face checkpoint directory instead"
        )
    if "blk.0.attn_q.bias" in names and not config.qkv_bias:
        config = dataclasses.replace(config, qkv_bias=True)
    return config


def load_gguf_params(
    reader: GGUFFile,
    config: ModelConfig,
    dtype: jnp.dtype,
    arch: str,
    skip: Collection[tuple[str, ...]] = (),
) -> Params:
    """Dequantise the tensors and place them in the parameter tree as `dtype`; the
    parameters at the paths in `skip` are left out (weights kept as blocks)."""
    tensors = {t.name: t for t in reader.tensors}
    table = {path: entry for path, entry in tensor_table(config, arch).items() if path not in skip}
    missing = sorted({n for names, _ in table.values() for n in names} - set(tensors))
    if missing:
        raise ValueError(f"GGUF file lacks tensors: {', '.join(missing[:5])}")

    def dequantize(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)

    flat = {
        path: jnp.asarray(transform(*map(dequantize, names)), dtype=dtype)
        for path, (names, transform) in table.items()
    }
    return unflatten_dict(flat)


def load_gguf_blocks(reader: GGUFFile, config: ModelConfig, arch: str) -> Params:
    """The matmul weights as they are stored, for the quantized kernel: BlockWeights by
    parameter path (the head as "lm_head", tied or not). A weight whose tensors are not
    all in one format the kernel reads is left out (it stays an f32 parameter).

    The row transforms are the dequantised ones' (unpermuting and concatenating rows),
    applied to rows of blocks: a block never spans two rows.
    """
    tensors = {t.name: t for t in reader.tensors}
    table = tensor_table(config, arch)
    head = ("output.weight",) if "output.weight" in tensors else ("token_embd.weight",)
    wanted = {path: entry for path, entry in table.items() if path[-1] in MATMULS}
    wanted[("lm_head",)] = (head, _same)
    flat = {}
    for path, (names, transform) in wanted.items():
        kinds = {tensors[name].tensor_type.name for name in names}
        if len(kinds) != 1 or (kind := kinds.pop()) not in BLOCK_FORMATS:
            continue
        rows = [
            np.asarray(tensors[name].data).reshape(int(tensors[name].shape[-1]), -1)
            for name in names
        ]
        flat[path] = BlockWeight(transform(*rows), BLOCK_FORMATS[kind][0])
    return unflatten_dict(flat)


MATMULS = ("qkv", "o", "gate_up", "down")


def dequantize_blocks(weight: BlockWeight) -> np.ndarray:
    """A GGUF-format BlockWeight [out, bytes] as the f32 weight [out, in] it stores."""
    assert isinstance(weight.kind, int), "one weight, not a stack of them"
    kind = gguf.GGMLQuantizationType(weight.kind)
    return gguf.quants.dequantize(np.asarray(weight.blocks), kind).astype(np.float32, copy=False)


def load_gguf(path: Path, dtype: jnp.dtype) -> tuple[ModelConfig, Params, GGUFFile]:
    """(config, params, reader) for a GGUF file; the reader also feeds the tokenizer."""
    reader = GGUFFile(path)
    meta = read_metadata(reader)
    config = config_from_gguf(reader, meta)
    params = load_gguf_params(reader, config, dtype, meta["general.architecture"])
    return config, params, reader
