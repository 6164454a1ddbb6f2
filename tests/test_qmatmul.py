"""The quantized-matmul kernel (model/kernels/qmatmul.cc) against NumPy.

The reference expands the blocks with the `gguf` package's own NumPy dequantisers (an
implementation independent of ours) and multiplies in float64. Shapes are odd on
purpose: output rows that do not split evenly among threads or into the many-row path's
panels of 12, one block or many per row, 1 to 100 rows of activations (up to 8 the kernel
takes them 8 at a time, with a remainder; past 8, 32 at a time as a small GEMM, with a
remainder of up to 16 or up to 32), threads on and off.

The formats with blocks of 32 values (Q8_0, Q4_0, Q4_1) take integers where the CPU has
AVX2 (with AVX-512, wider ones): every column, decode row or prompt token, as int_gemm.cc
computes it (the library says where): x rounded to 16 bits per block of 32. There the
kernel is held to NumPy's rendering of that arithmetic (`integer_reference`) and, against
the exact product, to the bound that rounding allows (`rounding_bound`); elsewhere (the
other formats, or a CPU without AVX2) to the exact product. A column's product is then
the same to the bit whichever path takes it and whatever else the step holds.
"""

import fnmatch
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from model import LLM, SamplingParams, kernels
from model.engine.variants import FIRST_NEEDED, SMALL_CHUNK, StepShape, small_shapes
from model.nn.params import BLOCKS
from model.nn.quantize import (
    BLOCK_FORMATS,
    INT8_ROW,
    QMATMUL_TARGET,
    BlockWeight,
    int8_rows,
    project,
    quantize_int8,
    stack_blocks,
)
from model.types import Choices
from model.weights.gguf import load_gguf
from model.weights.prepared import load_gguf_prepared
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf

ROWS = [1, 2, 3, 8, 9, 17, 40, 64, 100]
INTEGER_FORMATS = {"Q8_0", "Q4_0", "Q4_1"}  # the integer path, where the CPU has it


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert kernels.load(), "the kernel is built by `make setup` (python -m model.kernels)"


def random_blocks(name: str, n: int, k: int, rng) -> np.ndarray:
    """n rows of k values in format `name`: quantized from random weights where gguf can
    quantize it, else random bytes with scales set to small finite halves."""
    kind = GGMLQuantizationType[name]
    try:
        return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), kind)
    except NotImplementedError:
        _, values, size = BLOCK_FORMATS[name]
        data = rng.integers(0, 256, (n, k // values, size), dtype=np.uint8)
        half = lambda: rng.uniform(0.001, 0.05, data.shape[:2]).astype(np.float16)  # noqa: E731
        if name == "Q4_K":  # d and dmin first
            data[..., 0:2] = half().view(np.uint8).reshape(*data.shape[:2], 2)
            data[..., 2:4] = half().view(np.uint8).reshape(*data.shape[:2], 2)
        if name == "Q6_K":  # d last
            data[..., 208:210] = half().view(np.uint8).reshape(*data.shape[:2], 2)
        return data.reshape(n, -1)


def canonical(name: str) -> bool:
    """Whether every column of a product in this format takes integers, each the same to
    the bit on every path (AVX2, or AVX-512 VNNI)."""
    gemm = kernels.int_gemm_path(GGMLQuantizationType[name].value)
    assert not gemm or name in INTEGER_FORMATS
    return gemm


def integer_reference(name: str, data: np.ndarray, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w [N, K] @ x [T, K].T as the integer path computes it (qmatmul.cc): each block of
    32 values of x rounded to a multiple of max|x| / 32767 (f32 arithmetic, ties to even),
    Q4_1's offset m applied to the block's exact sum of x."""
    (n, k), t = w.shape, x.shape[0]
    blocks = x.reshape(t, k // 32, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767) / np.maximum(amax, 1e-30), 0).astype(np.float32)
    step = (amax / np.float32(32767)).astype(np.float64)
    rounded = (np.rint(blocks * inv) * step).reshape(t, k)
    w = w.astype(np.float64)
    offset = 0.0
    if name == "Q4_1":  # blocks of 20 bytes: d, m (halves), 16 bytes of nibbles
        m = data.reshape(n, k // 32, 20)[..., 2:4].copy().view(np.float16)[..., 0]
        m = m.astype(np.float64)
        w = w - np.repeat(m, 32, axis=1)
        offset = m @ blocks.astype(np.float64).sum(-1).T
    return w @ rounded.T + offset


def rounding_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How far the integer path may be from the exact w @ x.T, [N, T]: each value of x
    moves by at most half a step (its block's max|x| / 65534), and the integer part of a
    weight (w less Q4_1's offset, which meets x's exact sum) is at most twice its block's
    max|w|."""
    (n, k), t = w.shape, x.shape[0]
    wmax = np.abs(w).reshape(n, k // 32, 32).max(-1).astype(np.float64)
    xmax = np.abs(x).reshape(t, k // 32, 32).max(-1).astype(np.float64)
    return 2 * 32 * wmax @ xmax.T / 65534


def qmatmul(
    blocks,
    x,
    kind,
    threads: int,
    layer: int = 0,
    used: int | None = None,
    decode: int = 0,
    glu: bool = False,
    rows: bool = False,
) -> np.ndarray:
    """The kernel's y [N, T] for blocks [N, bytes] (or stacked [L, N, bytes] with a kind
    per layer) and x [T, K] (its first `used` rows real, the first `decode` of them decode
    rows; glu: x [T, 2K] is [gate, up] and the kernel multiplies silu(gate) * up; rows: y
    comes as [T, N]), through jax.ffi."""
    stacked = blocks.ndim == 3
    blocks = blocks if stacked else blocks[None]
    kinds = np.asarray(kind if stacked else [kind], np.int32)
    n, t = blocks.shape[1], x.shape[0]
    out = jax.ShapeDtypeStruct((t, n) if rows else (n, t), jnp.float32)
    call = jax.ffi.ffi_call(QMATMUL_TARGET, out)
    x_km = np.ascontiguousarray(x.T)  # the kernel takes x feature-major, [K, T]
    columns = np.int32(x.shape[0] if used is None else used)
    if decode:
        columns = np.asarray([columns, decode], np.int32)
    y = call(
        blocks,
        kinds,
        np.int32(layer),
        columns,
        x_km,
        threads=np.int64(threads),
        glu=np.int64(glu),
        rows=np.int64(rows),
    )
    return np.asarray(y)


@pytest.mark.usefixtures("vectors")
@pytest.mark.parametrize("t", [5, 24, 40, 100])
@pytest.mark.parametrize("decode", ["none", "some", "all"])
def test_only_the_used_columns_are_multiplied_the_rest_are_zero(t, decode):
    """A step's padding (past its last real token) is not multiplied: those columns of y
    are zero, whatever x holds there (NaN too), and the others are the full product's
    (with decode rows first: none, 7 of them, or every real column): to the bit where
    each column takes the same path (with AVX2 every column, decode rows too, takes
    integers alike), else to the order of sums."""
    rng = np.random.default_rng(17)
    data = random_blocks("Q4_1", 50, 256, rng)
    x = rng.standard_normal((t, 256)).astype(np.float32)
    rows = {"none": 0, "some": 7, "all": t}[decode]
    full = qmatmul(data, x, 3, 0, decode=rows)
    for used in (0, 1, t // 2, t - 1, t, t + 7):
        padded = x.copy()
        padded[used:] = np.nan
        y = qmatmul(data, padded, 3, 0, used=used, decode=min(rows, used))
        real, f32 = min(used, t), min(used, t) - min(rows, used)
        if canonical("Q4_1") or real == t or f32 > 8:  # the same sums
            assert np.array_equal(y[:, :real], full[:, :real]), used
        else:  # up to 8 f32 columns take the few-row path: the sums in another order
            bound = 1e-6 * np.abs(full).max()
            assert (np.abs(y[:, :real] - full[:, :real]) <= bound).all(), used
        assert not y[:, real:].any(), used


# One thread at this CPU's width, and threads at both (`vectors`): how the rows are split
# among threads does not depend on the width, and the split runs the same loops.
THREADS_AND_WIDTHS = pytest.mark.parametrize(
    "threads, vectors", [(1, "own"), (0, "own"), (0, "other")], indirect=["vectors"]
)


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
@THREADS_AND_WIDTHS
def test_block_formats_match_numpy(name, threads, vectors):
    rng = np.random.default_rng(7)
    _, values, _ = BLOCK_FORMATS[name]
    for n, blocks_per_row in [(1, 1), (7, 3), (33, 2), (301, 6)]:
        k = values * blocks_per_row
        data = random_blocks(name, n, k, rng)
        w = gguf.quants.dequantize(data, GGMLQuantizationType[name]).reshape(n, k)
        for t in ROWS:
            x = rng.standard_normal((t, k)).astype(np.float32)
            decode = 2 * t // 3  # past 8 rows: the first two thirds are decode rows
            y = qmatmul(data, x, BLOCK_FORMATS[name][0], threads, decode=decode)
            ref = w.astype(np.float64) @ x.astype(np.float64).T
            scale = np.abs(w).sum(axis=1, keepdims=True) * np.abs(x).max() + 1e-6
            rounded = np.full(t, canonical(name))
            if rounded.any():
                emulated = integer_reference(name, data, w, x)[:, rounded]
                # (each block's integer sum converted and scaled in f32: a few roundings)
                assert np.abs(y[:, rounded] - emulated).max() <= 3e-7 * scale.max(), (n, k, t)
                bound = rounding_bound(w, x)[:, rounded] + 2e-6 * scale
                assert (np.abs(y - ref)[:, rounded] <= bound).all()
            exact = np.abs(y - ref)[:, ~rounded]
            assert exact.max(initial=0) <= 2e-6 * scale.max(), (n, k, t)


@THREADS_AND_WIDTHS
def test_int8_rows_match_numpy(threads, vectors):
    """jaxchat's int8 rows (model/nn/quantize.py), any row length: a tail of fewer than
    16 values is handled too."""
    rng = np.random.default_rng(3)
    for n, k in [(5, 16), (77, 37), (260, 1000)]:
        q = quantize_int8(rng.standard_normal((n, k)))
        rows = int8_rows(q)
        assert rows.kind == INT8_ROW and rows.blocks.shape == (n, 4 + k)
        w = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)
        for t in ROWS:
            x = rng.standard_normal((t, k)).astype(np.float32)
            y = qmatmul(rows.blocks, x, INT8_ROW, threads)
            ref = w @ x.astype(np.float64).T
            assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max() + 1e-6, (n, k, t)


@pytest.mark.usefixtures("vectors")
@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("decode", [1, 5, 8])
def test_decode_rows_beside_prompt_tokens_multiply_as_alone(name, decode):
    """Up to 8 decode rows give the same products, to the bit, with prompt tokens after
    them in the step (up to 8 or more, padding after) as in a step of their own: the
    kernel's part of a stream's logits does not depend on whether a prompt shares its
    steps. The prompt tokens' products are the exact ones to f32's rounding, or to the
    integer paths' where they take those."""
    rng = np.random.default_rng(23)
    data = random_blocks(name, 300, 512, rng)
    kind = BLOCK_FORMATS[name][0]
    x = rng.standard_normal((72, 512)).astype(np.float32)
    alone = qmatmul(data, x[:decode], kind, 0, decode=decode)
    for prompt in (3, 40):
        used = decode + prompt
        y = qmatmul(data, x, kind, 0, used=used, decode=decode)
        assert np.array_equal(y[:, :decode], alone), prompt
        w = gguf.quants.dequantize(data, GGMLQuantizationType[name]).reshape(300, 512)
        exact = w.astype(np.float64) @ x[decode:used].astype(np.float64).T
        scale = np.abs(w).sum(axis=1, keepdims=True) * np.abs(x).max()
        bound = 2e-6 * scale.max()
        if canonical(name):
            bound = bound + rounding_bound(w, x[decode:used])
        assert (np.abs(y[:, decode:used] - exact) <= bound).all()
        assert not y[:, used:].any()


@pytest.mark.parametrize("name", sorted(INTEGER_FORMATS))
def test_a_columns_product_is_the_same_to_the_bit_on_every_path(name):
    """A column's product (decode row or prompt token, where every column takes integers:
    AVX2 or AVX-512 VNNI) does not depend on the step around it: alone (the few-row path),
    among up to 8 decode rows and prompt tokens (few rows), beside more (the integer GEMM),
    in any chunk of 32 columns. So a prompt's keys and values are the same however it was
    cut into chunks, and a stream's logits whatever shares its step. (Up to 4 columns read
    the weights in place, 5 to 8 from a copy.)"""
    if not canonical(name):
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: every column takes f32")
    rng = np.random.default_rng(29)
    data = random_blocks(name, 77, 576, rng)
    kind = BLOCK_FORMATS[name][0]
    x = rng.standard_normal((100, 576)).astype(np.float32) * np.exp(rng.standard_normal(576))
    x = x.astype(np.float32)
    alone = np.stack([qmatmul(data, x[i : i + 1], kind, 0)[:, 0] for i in range(100)], axis=1)
    for t, used, decode in [
        (8, 2, 1),
        (8, 4, 4),
        (8, 8, 3),
        (8, 5, 0),
        (72, 12, 8),
        (72, 40, 8),
        (72, 72, 0),
        (100, 100, 33),
        (100, 61, 61),
        (40, 9, 1),
    ]:
        y = qmatmul(data, x[:t], kind, 0, used=used, decode=decode)
        assert np.array_equal(y[:, :used], alone[:, :used]), (t, used, decode)
        assert not y[:, used:].any(), (t, used, decode)


def test_the_installed_package_holds_every_source_the_build_reads():
    """The Docker image builds the kernels from the installed package (`pip install .`):
    every source and header the build compiles must be package data, or the build fails
    there and the image serves without the kernels."""
    config = tomllib.loads((Path(kernels.__file__).parents[2] / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["model.kernels"]
    files = [*kernels.SOURCES, *kernels.HEADERS]
    missing = [f.name for f in files if not any(fnmatch.fnmatch(f.name, g) for g in globs)]
    assert not missing
    assert {f.name for f in kernels.HERE.iterdir() if f.suffix in (".cc", ".h")} == {
        f.name for f in files
    }


def test_the_library_is_built_for_this_cpus_level():
    """make setup compiles the kernels for the CPU at hand (its x86-64 level, a third of
    the compile time of the portable build that the Dockerfile makes) and that build is
    the one loaded; a portable build clones the hot loops for each level instead."""
    v3 = kernels.LEVELS["x86-64-v3"]
    assert kernels.level_of(v3 | {"sse2"}) == "x86-64-v3"
    assert kernels.level_of(v3 | kernels.LEVELS["x86-64-v4"]) == "x86-64-v4"
    assert kernels.level_of(kernels.LEVELS["x86-64-v4"]) is None  # not without v3's
    assert kernels.level_of(v3 - {"fma"}) is None
    level = kernels.cpu_level()
    assert kernels.built() == kernels.library_path(level)
    if level is not None:
        assert {f"-march={level}", "-DJAXCHAT_TARGETS="} <= set(kernels.flags(level))
        assert not any(flag.startswith("-march") for flag in kernels.flags(None))
        assert kernels.digest(level) != kernels.digest(None)


def test_every_source_compiles_for_the_portable_build():
    """The Dockerfile builds the kernels portable (`python -m model.kernels --portable`:
    any x86-64 CPU), which `make setup` on this machine never does: every source
    compiles with the portable flags, at -O0 (a quarter of the time; code that only this
    CPU's level compiles, such as a 512-bit vector in an asm operand, fails there too)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert compiler, "make setup installs a C++ compiler"
    flags = [f for f in kernels.flags(None) if not f.startswith("-O")]
    include = jax.ffi.include_dir()
    jobs = [  # side by side, as `build` runs them
        subprocess.Popen(
            [compiler, *flags, "-O0", "-isystem", include, "-c", str(path), "-o", os.devnull],
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in kernels.SOURCES
    ]
    errors = [(job.args[-3], job.communicate()[1]) for job in jobs]  # (waits for each)
    assert [error for error, job in zip(errors, jobs, strict=True) if job.returncode] == []


def test_the_vector_width_is_the_cpus_unless_set():
    """The kernels' f32 loops come in vectors of 16 floats (AVX-512) and of 8 (AVX2's
    registers: the formats' expansion then takes AVX2 intrinsics, formats.h), the CPU
    picking one: JAXCHAT_KERNEL_VECTORS overrides it as the library loads (a child
    process), set_wide_vectors at run time (the `vectors` fixture runs the tests of the
    products, SwiGLU, the norms and attention at both widths). A product whose sums run
    across lanes (Q4_K's f32 rows) then differs in its last bits: the switch reaches the
    loops."""
    other = "8" if kernels.wide_vectors() else "16"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "JAXCHAT_KERNEL_VECTORS": other}
    width = "from model import kernels; print(16 if kernels.wide_vectors() else 8)"
    picked = subprocess.run(
        [sys.executable, "-c", width], cwd=root, env=env, capture_output=True, text=True
    )
    assert picked.stdout.split() == [other], picked.stderr[-2000:]  # the child takes the other
    rng = np.random.default_rng(31)
    data = random_blocks("Q4_K", 64, 2048, rng)
    x = rng.standard_normal((3, 2048)).astype(np.float32)
    kind = BLOCK_FORMATS["Q4_K"][0]
    own, wide = qmatmul(data, x, kind, 1), kernels.wide_vectors()
    kernels.set_wide_vectors(not wide)
    try:
        assert kernels.wide_vectors() is not wide
        switched = qmatmul(data, x, kind, 1)
    finally:
        kernels.set_wide_vectors(wide)
    assert not np.array_equal(own, switched)
    np.testing.assert_allclose(own, switched, rtol=1e-4, atol=1e-4)
    assert np.array_equal(qmatmul(data, x, kind, 1), own)


def test_threads_and_one_thread_agree_exactly():
    """Rows are split among threads, never the sum of one output: same bits either way."""
    rng = np.random.default_rng(5)
    data = random_blocks("Q4_1", 999, 256, rng)
    for t, decode in ((1, 0), (5, 0), (40, 0), (40, 33)):
        x = rng.standard_normal((t, 256)).astype(np.float32)
        one = qmatmul(data, x, 3, 1, decode=decode)
        assert np.array_equal(one, qmatmul(data, x, 3, 0, decode=decode))


@pytest.mark.parametrize("t", [1, 8, 40])
def test_a_stacked_weight_reads_the_layer_asked_for_in_its_own_format(t):
    """Layers stacked by `stack_blocks` in different formats (rows padded to the longest,
    as Q4_K_M files mix Q4_K and Q6_K for one tensor): each product reads its layer's
    rows in that layer's format, also from a jitted function with a traced layer index."""
    rng = np.random.default_rng(13)
    names = ["Q4_K", "Q6_K", "Q8_0"]
    layers = [random_blocks(name, 30, 512, rng) for name in names]
    kinds = [BLOCK_FORMATS[name][0] for name in names]
    stacked = stack_blocks([BlockWeight(b, k) for b, k in zip(layers, kinds, strict=True)])
    assert stacked.kind == tuple(kinds)
    assert stacked.blocks.shape == (3, 30, 544)  # Q8_0: 16 blocks of 34 bytes (Q4_K: 288)
    x = rng.standard_normal((t, 512)).astype(np.float32)
    step = jax.jit(lambda b, x, i: project(stacked.replace(blocks=b), x, jnp.float32, i))
    for i, name in enumerate(names):
        w = gguf.quants.dequantize(layers[i], GGMLQuantizationType[name]).reshape(30, 512)
        ref = w.astype(np.float64) @ x.astype(np.float64).T
        tolerance = 2e-6 * np.abs(w).sum(axis=1).max() * np.abs(x).max()
        if canonical(name):
            tolerance = tolerance + rounding_bound(w, x)
        assert (np.abs(qmatmul(stacked.blocks, x, kinds, 0, layer=i) - ref) <= tolerance).all()
        y = step(stacked.blocks, x.T, np.int32(i))
        assert (np.abs(np.asarray(y) - ref) <= tolerance).all()


def test_project_in_a_jitted_function_is_w_at_x():
    """`project` (what the layers call) takes feature-major x [K, T] → [N, T]."""
    rng = np.random.default_rng(11)
    data = random_blocks("Q8_0", 40, 96, rng)
    w = gguf.quants.dequantize(data, GGMLQuantizationType.Q8_0).reshape(40, 96)
    x = rng.standard_normal((96, 5)).astype(np.float32)
    y = jax.jit(lambda b, x: project(BlockWeight(b, 8), x, jnp.float32))(data, x)
    emulated = integer_reference("Q8_0", data, w, x.T)  # 5 rows: the integer path
    np.testing.assert_allclose(np.asarray(y), emulated, rtol=1e-5, atol=1e-5)


def silu_times_up(x: np.ndarray) -> np.ndarray:
    """SwiGLU's silu(gate) * up of x [T, 2K] = [gate, up], in float64."""
    gate, up = np.split(x.astype(np.float64), 2, axis=1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.usefixtures("vectors")
def test_glu_takes_silu_of_the_gate_times_up_to_a_few_ulp():
    """With glu, the kernel's x is [gate; up] and it multiplies silu(gate) * up (the MLP's
    down projection). Through 127 times the identity (int8 rows of one 127, scale 1:
    exact, and always multiplied in f32; 20 columns: a panel), y is 127 times that product,
    held to float64's over gates from -100 to 100 (below -87 the kernel's exp saturates:
    silu there is under 1e-35), and zero past the used columns."""
    k, t, used = 64, 20, 17
    identity = int8_rows(quantize_int8(127 * np.eye(k))).blocks
    rng = np.random.default_rng(5)
    gate = np.concatenate([np.linspace(-100, 100, 41), rng.standard_normal(k * t - 41) * 4])
    x = np.concatenate([gate.reshape(t, k), rng.standard_normal((t, k))], axis=1)
    x = x.astype(np.float32)
    padded = x.copy()
    padded[used:] = np.nan
    y = qmatmul(identity, padded, INT8_ROW, 0, used=used, glu=True)
    expected = 127 * silu_times_up(x).T
    np.testing.assert_allclose(y[:, :used], expected[:, :used], rtol=3e-7, atol=1e-30)
    assert not y[:, used:].any()


@pytest.mark.usefixtures("vectors")
@pytest.mark.parametrize("t, decode", [(3, 0), (12, 8), (12, 12), (40, 0), (40, 32), (16400, 0)])
def test_glu_is_the_product_of_silu_of_the_gate_times_up(t, decode):
    """glu on every path (few rows, decode rows beside prompt tokens, panels, the integer
    GEMM; 16,400 tokens, too many for the buffer a thread keeps): the same as the kernel's
    product of silu(gate) * up taken in NumPy, to the rounding the integer paths allow and
    f32's elsewhere."""
    rng = np.random.default_rng(t + decode)
    data = random_blocks("Q4_1", 50, 256, rng)
    w = gguf.quants.dequantize(data, GGMLQuantizationType.Q4_1).reshape(50, 256)
    x = rng.standard_normal((t, 512)).astype(np.float32)
    product = silu_times_up(x).astype(np.float32)
    y = qmatmul(data, x, 3, 0, decode=decode, glu=True)
    alone = qmatmul(data, product, 3, 0, decode=decode)
    bound = 2 * rounding_bound(w, product) + 1e-6 * np.abs(alone).max()
    assert (np.abs(y - alone) <= bound).all()
    exact = w.astype(np.float64) @ product.T.astype(np.float64)
    np.testing.assert_allclose(
        y, exact, rtol=0, atol=float((rounding_bound(w, product) * 3).max()) + 1e-4
    )


@pytest.mark.parametrize(
    "t, used, decode", [(5, 5, 5), (12, 9, 8), (40, 33, 32), (40, 40, 0), (6000, 5990, 0)]
)
def test_rows_gives_the_product_as_a_row_per_column_of_x(t, used, decode):
    """With rows (the head, whose logits the sampler reads a row per token), y is [T, N]:
    the [N, T] product's used columns as rows, bit for bit, on each path (few rows, decode
    rows beside prompt tokens, the integer GEMM, panels; a forward pass's 6,000 tokens, too
    many for the buffer a thread keeps), and zero rows past them. 700 outputs: more than
    one block of the transpose, and not a multiple of it."""
    rng = np.random.default_rng(t + used)
    data = random_blocks("Q4_1", 700, 128, rng)
    x = rng.standard_normal((t, 128)).astype(np.float32)
    y = qmatmul(data, x, 3, 0, used=used, decode=decode, rows=True)
    columns = qmatmul(data, x, 3, 0, used=used, decode=decode)
    assert y.shape == (t, 700)
    assert np.array_equal(y[:used], columns.T[:used])
    assert not y[used:].any()
    w = gguf.quants.dequantize(data, GGMLQuantizationType.Q4_1).reshape(700, 128)
    bound = rounding_bound(w, x).T[:used] + 1e-4
    assert (np.abs(y[:used] - (x[:used] @ w.T.astype(np.float64))) <= bound).all()


def test_a_row_that_does_not_hold_the_values_is_refused():
    """Blocks whose row length does not fit K values in the format are an error, not a
    read past the row."""
    data = np.zeros((4, 20), np.uint8)  # one Q4_1 block: 32 values
    with pytest.raises(Exception, match="cannot hold 64 values"):
        qmatmul(data, np.zeros((1, 64), np.float32), 3, 0)


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """The tiny Llama with its matrices stored as Q8_0 blocks."""
    root = tmp_path_factory.mktemp("q8")
    return write_tiny_gguf(root, TINY_LLAMA, seed=9, qtype=GGMLQuantizationType.Q8_0)


def test_blocks_are_the_dequantised_weights_also_through_the_prepared_copy(q8_gguf, tmp_path):
    """The blocks the loader keeps (rows unpermuted and fused as the f32 weights are)
    expand to exactly the f32 parameters; the prepared copy gives the same bytes back."""
    _, params, reader = load_gguf(q8_gguf, jnp.float32)
    fresh = load_gguf_prepared(q8_gguf, jnp.float32, tmp_path)[3]
    again = load_gguf_prepared(q8_gguf, jnp.float32, tmp_path)[3]  # read from the copy
    paths = [("layers_1", "attn", "qkv"), ("layers_0", "mlp", "gate_up"), ("lm_head",)]
    for path in paths:
        block, copy = fresh, again
        for key in path:
            block, copy = block[key], copy[key]
        assert block.kind == copy.kind == BLOCK_FORMATS["Q8_0"][0]
        assert np.array_equal(np.asarray(block.blocks), np.asarray(copy.blocks))
        w = params
        for key in path:
            w = w[key]
        expanded = gguf.quants.dequantize(np.asarray(block.blocks), GGMLQuantizationType.Q8_0)
        assert np.array_equal(expanded, np.asarray(w))


def test_an_engine_on_the_blocks_decodes_as_one_on_f32(q8_gguf, monkeypatch):
    """The steps on the blocks (the prompt's chunk through the kernel's many-row path, the
    decode steps through its few-row one, their attention through the attention kernel)
    give the f32 steps' greedy tokens and log-probabilities. (The 2- and 4-row and the
    unrolled steps on the blocks: test_small_steps_run_once_their_executables_are_there.)
    Only the steps the request runs are compiled. (The engine's settings are the next
    test's, whose steps on the blocks are then these, from JAX's compilation cache.)"""
    prompt = list(range(5, 29))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
    runs = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("JAXCHAT_QUANTIZED_KERNEL", setting)
        llm = LLM(str(q8_gguf), max_seq_len=128, batch=8, unrolled_decode=False, speculative="off")
        assert (llm.engine.kernel is not None) == (setting == "on")
        assert (BLOCKS in llm.engine.stacked) == (setting == "on")
        assert llm.engine.network().kernels == (setting == "on")
        runs[setting] = llm.generate(prompt, params)
        llm.scheduler.stop()
    on, off = runs["on"], runs["off"]
    assert on.token_ids == off.token_ids
    np.testing.assert_allclose(
        [t.logprob for t in on.logprobs], [t.logprob for t in off.logprobs], atol=1e-4
    )


@pytest.mark.parametrize("unrolled", [None, True])
def test_small_steps_run_once_their_executables_are_there(q8_gguf, unrolled):
    """The 2- and 4-row decode steps are upgrades (scanned on the blocks by default,
    unrolled where those are on): the engine offers them only once compiled; then three
    streams decode in 4-row steps, each getting the tokens it gets alone."""
    llm = LLM(str(q8_gguf), max_seq_len=128, batch=8, unrolled_decode=unrolled, speculative="off")
    assert (llm.engine.params is not None) == bool(unrolled)
    small = {StepShape(2, 0), StepShape(4, 0)}
    assert set(small_shapes(8)) == small
    assert not small & set(llm.engine.runnable())
    assert llm.stats().pending_executables >= len(small)  # (/metrics' executables_pending)
    llm.warmup()
    assert small <= set(llm.engine.runnable())
    assert llm.stats().pending_executables == 0
    # Long enough that the three streams surely overlap (a step of the tiny model takes
    # well under a millisecond, a step for each token): each is sent as soon as the one
    # before has its first token, from this thread (threads woken together can still be
    # scheduled tens of milliseconds apart on a loaded machine), and read to the end after.
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompts = [list(range(5 + i, 20 + 2 * i)) for i in range(3)]
    alone = [llm.generate(p, params).token_ids for p in prompts]
    streams = [llm.stream(p, params) for p in prompts]
    results = [Choices(1) for _ in prompts]
    for stream, result in zip(streams, results, strict=True):
        result.add(next(stream))  # sends the request, waits for its first token
    for stream, result in zip(streams, results, strict=True):
        for delta in stream:
            result.add(delta)
    together = [result.completions()[0].token_ids for result in results]
    llm.scheduler.stop()
    assert StepShape(4, 0) in llm.scheduler.speculation.timed  # a 4-row step ran
    assert together == alone


def test_a_server_start_compiles_what_a_first_request_needs_and_the_rest_when_idle(q8_gguf):
    """warmup(wait=False), as the server calls it, with nothing stored: it compiles the
    FIRST_NEEDED executables (the pool's set-up, a slot's admission, a short prompt's step
    and a lone stream's decode step) and returns; a short request runs on those alone, and
    the other steps and the upgrades compile in the background once nothing is served.
    (The settings of the tests above, whose executables JAX's cache then has.)"""
    llm = LLM(str(q8_gguf), max_seq_len=128, batch=8, unrolled_decode=False, speculative="off")
    variants = llm.engine.variants
    everything = len(variants.names) + len(variants.upgrades)
    llm.warmup(wait=False)
    assert llm.engine.compilations == FIRST_NEEDED < len(variants.names)
    first = [name for name in variants.names if variants.ready(*name)]
    assert {kind for kind, _ in first} == {"init", "admit", "step"}
    assert {size[0] for kind, size in first if kind == "step"} == {
        StepShape(1, 0),
        StepShape(8, SMALL_CHUNK),
    }
    prompt = list(range(5, 29))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reply = llm.generate(prompt, greedy)
    deadline = time.monotonic() + 300
    while llm.stats().pending_executables and time.monotonic() < deadline:
        time.sleep(0.2)
    assert llm.engine.compilations == everything
    assert llm.generate(prompt, greedy).token_ids == reply.token_ids
    llm.scheduler.stop()
