"""CPU kernels of our own, called from jitted code through `jax.ffi`.

- the quantized matrix product (qmatmul.cc), which reads weights in GGUF's block
  formats or jaxchat's int8 rows and expands them in registers, so a decode step
  streams 4-8 bits per weight instead of 32, and a many-row step expands each weight
  once for all rows (model/nn/quantize.py's `BlockWeight`); a prompt's tokens (with
  AVX-512 VNNI, a step's decode rows too) multiply 16-bit integers (int_gemm.cc);
- attention over the paged pool: decode rows (attention.cc), and a prefill region's
  queries over the positions already in the pool (prompt_attention.cc), read the blocks
  in place instead of gathering them into new arrays (model/nn/attention.py);
- RMSNorm over a step's real tokens (norm.cc), each token's sums in one order whatever
  the step's shape;
- a step's sampling (sample.cc): model/nn/sampling.py's `sample` in one call, which
  under XLA took two thirds of every step executable's compile;
- the pool's zeros (pool.cc), which leave its pages untouched until they are written.

The first three share a pool of worker threads (workers.h).

The library is compiled from the source here by the project's own set-up with the
system's C++ compiler, into a file named by the digest of its source and flags, so a
changed source is never loaded stale: `python -m model.kernels` (`make setup`) builds it
for this CPU's x86-64 level (v4: AVX-512, v3: AVX2), `--portable` (the Dockerfile, whose
image may run on another CPU) with the hot loops compiled for each level, one picked at
load, which takes three times as long to compile. `load()` registers the library built
for this CPU, else the portable one; without either (no compiler at set-up, another
platform) the engine runs the pure-JAX path and the start-up log says so.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import jax
import numpy as np

from model.nn.attention import ATTENTION_TARGET, PROMPT_TARGET, ZEROS_TARGET
from model.nn.norm import RMS_NORM_TARGET
from model.nn.quantize import QMATMUL_TARGET
from model.nn.sampling import SAMPLE_TARGET

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# The longest to compile first (-O3 for x86-64-v3 on a 2-core EPYC: 18, 15 and 10 s, the
# others 2-4 s each), so that `build`, one compile per core, ends them together.
SOURCES = tuple(
    HERE / name
    for name in (
        "qmatmul.cc",
        "prompt_attention.cc",
        "attention.cc",
        "sample.cc",
        "norm.cc",
        "pool.cc",
        "int_gemm.cc",
    )
)
HEADERS = (
    HERE / "workers.h",
    HERE / "attention.h",
    HERE / "int_gemm.h",
    HERE / "int_blocks.h",
    HERE / "vec16.h",
    HERE / "formats.h",
)
# GCC's global CSE passes take most of -O3's time on these unrolled loops (qmatmul.cc:
# 37 s, 17 s without them) and gain nothing measurable in the kernels' speed. -O2 builds
# faster (29 s against 37 s on a 2-core EPYC) but its products run up to twice as long:
# a SmolLM2 step's products took 68 ms against 33 with 12 decode rows, 100 against 73
# with 8 decode rows and 32 prompt tokens.
OPTIMIZE = ("-O3", "-fno-gcse", "-fno-gcse-after-reload")
FLAGS = (*OPTIMIZE, "-std=c++20", "-fPIC", "-DNDEBUG", "-Wall", "-Wno-psabi")
# The x86-64 levels a build may target, and the CPU flags each needs (as /proc/cpuinfo
# names them; v4 needs v3's too).
LEVELS = {
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def level_of(cpu_flags: set[str]) -> str | None:
    """The highest x86-64 level (LEVELS) a CPU with these flags has, or None."""
    if not LEVELS["x86-64-v3"] <= cpu_flags:
        return None
    return "x86-64-v4" if LEVELS["x86-64-v4"] <= cpu_flags else "x86-64-v3"


@cache
def cpu_level() -> str | None:
    """This CPU's x86-64 level (None: another architecture, an older CPU, no /proc)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return level_of(set(flags.partition(":")[2].split()))


def flags(level: str | None) -> tuple[str, ...]:
    """The compiler's flags for a build for `level` (None: portable)."""
    return FLAGS if level is None else (*FLAGS, f"-march={level}", "-DJAXCHAT_TARGETS=")


def digest(level: str | None = None) -> str:
    """The identity of a build for `level` (None: portable): its sources and flags."""
    text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    return hashlib.sha256(text + repr(flags(level)).encode()).hexdigest()[:16]


def library_path(level: str | None = None) -> Path:
    return HERE / f"_kernels.{digest(level)}.so"


def built() -> Path | None:
    """The library to load: the build for this CPU's level, else the portable one."""
    paths = (library_path(level) for level in dict.fromkeys((cpu_level(), None)))
    return next((path for path in paths if path.is_file()), None)


def build(compiler: str | None = None, portable: bool = False) -> Path:
    """Compile the library for this CPU's level (or `portable`, or where the level is
    unknown) if it has not been (a no-op otherwise) → its path."""
    level = None if portable else cpu_level()
    target = library_path(level)
    if target.is_file():
        return target
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    include = jax.ffi.include_dir()
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        # The sources compile one per core, in SOURCES' order, then link (29 s on 2 cores):
        # all at once, the longest would share its core with the others to the end.
        objects = [str(Path(tmp) / f"{path.stem}.o") for path in SOURCES]
        commands = [
            [compiler, *flags(level), "-isystem", include, "-c", str(path), "-o", obj]
            for path, obj in zip(SOURCES, objects, strict=True)
        ]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            runs = list(pool.map(subprocess.run, commands))  # (waits for every one)
        failed = [run for run in runs if run.returncode != 0]
        if failed:
            raise subprocess.CalledProcessError(failed[0].returncode, failed[0].args)
        out = Path(tmp) / target.name
        subprocess.run([compiler, "-shared", *objects, "-o", str(out)], check=True)
        keep = {library_path(None).name, library_path(cpu_level()).name}
        for stale in HERE.glob("_*.so"):
            if stale.name not in keep:  # other sources' builds
                stale.unlink()
        os.replace(out, target)  # readers never see half a file
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The built library, or None when it is not built for these sources."""
    path = built()
    return ctypes.cdll.LoadLibrary(str(path)) if path is not None else None


def _asks(symbol: str, *args: int) -> bool:
    """The library's answer to a yes-or-no question about this CPU, `symbol(*args)` with
    int64 arguments (False where the library is not built)."""
    lib = library()
    if lib is None:
        return False
    function = getattr(lib, symbol)
    function.argtypes = (ctypes.c_int64,) * len(args)
    return bool(function(*args))


def widen(way: int, halves: np.ndarray) -> np.ndarray | None:
    """float16 values (a multiple of 16) widened to float32 the attention kernels' `way`
    (0: AVX-512, 1: F16C, 2: the scalar conversion), or None where this CPU lacks it."""
    lib = library()
    if lib is None:
        return None
    bits = np.ascontiguousarray(halves, np.float16).view(np.uint16)
    out = np.empty(bits.shape, np.float32)
    lib.JaxchatWiden.argtypes = (ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
    done = lib.JaxchatWiden(way, bits.ctypes.data, bits.size // 16, out.ctypes.data)
    return out if done else None


def int_gemm_path(kind: int) -> bool:
    """Whether every column of a product (decode rows and prompt tokens, few or many)
    rounds x to 16-bit integers as int_gemm.cc does, each column's product the same to
    the bit in any step, for weights of GGML type `kind` on this CPU (AVX2 with FMA and
    F16C, or AVX-512 VNNI; blocks of 32 values only); elsewhere every column takes f32."""
    return _asks("JaxchatIntGemm", kind)


def wide_vectors() -> bool:
    """Whether the kernels' f32 loops take vectors of 16 floats (the CPU has AVX-512, or
    JAXCHAT_KERNEL_VECTORS=16) rather than of 8 (AVX2's registers)."""
    return _asks("JaxchatWideVectors")


def set_wide_vectors(wide: bool) -> None:
    """Make the kernels' f32 loops take vectors of 16 floats (or of 8) from the next call
    on, whatever the CPU picked: the tests run both widths' code in one process. (Not while
    a kernel runs.)"""
    lib = library()
    if lib is not None:
        lib.JaxchatSetWideVectors.argtypes = (ctypes.c_int,)
        lib.JaxchatSetWideVectors(int(wide))


@cache
def load() -> bool:
    """Register the kernels with XLA:CPU; False (and why, in the log) when the library is
    not built for these sources."""
    if built() is None:
        log.warning(
            "jaxchat's CPU kernels are not built (%s): quantized weights and decode "
            "attention run through XLA in f32; run `python -m model.kernels` (make setup does)",
            library_path(cpu_level()).name,
        )
        return False
    lib = library()
    assert lib is not None
    for target, symbol in (
        (QMATMUL_TARGET, lib.JaxchatQMatmul),
        (ATTENTION_TARGET, lib.JaxchatDecodeAttention),
        (PROMPT_TARGET, lib.JaxchatPromptAttention),
        (RMS_NORM_TARGET, lib.JaxchatRmsNorm),
        (ZEROS_TARGET, lib.JaxchatZeros),
        (SAMPLE_TARGET, lib.JaxchatSample),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return True
