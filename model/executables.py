"""Compiled engine variants kept on disk, so a restart loads them without tracing.

JAX's persistent compilation cache skips XLA compilation but still traces and
lowers every function to compute its key: for the engine's unrolled layers that
is about a second per variant, most of a warm start. This store keys each
variant by a fingerprint of everything its executable depends on (the JAX
and Flax builds, the backend, devices and mesh, the host CPU, the model
config, the engine's shapes, and the source of every project module the
engine imports, at any depth: model/source_digest.py), so a hit is one file
read and one `deserialize_and_load`, with no tracing.

A file that fails to load (truncated, written by another build) is a miss:
the variant is compiled again and the file replaced. An executable that JAX's
own persistent cache supplied (when a user turned it on) is not stored: its
serialization is broken in jax 0.10 on CPU.
"""

import hashlib
import logging
import os
import pickle
import platform
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import flax
import jax
import jaxlib
from jax import monitoring
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)


def host_cpu() -> str:
    """The host CPU's model and instruction-set flags: XLA:CPU compiles for the CPU it
    runs on, so an executable built on another machine may not run here."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features")  # x86 and Arm spellings
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def fingerprint(parts: Iterable[object]) -> str:
    """A short hex key for an engine: `parts` describe its shapes, model, mesh and source
    code; the JAX and Flax builds, backend, devices, host CPU and XLA flags are added here."""
    devices = jax.devices()
    context = (
        jax.__version__,
        jaxlib.__version__,
        flax.__version__,
        jax.default_backend(),
        [d.device_kind for d in devices],
        host_cpu(),
        os.environ.get("XLA_FLAGS", ""),
    )
    return hashlib.sha256(repr((context, *parts)).encode()).hexdigest()[:32]


# Set in the compiling thread by JAX's cache-hit event (listeners run synchronously).
_from_jax_cache = threading.local()


def _note_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _from_jax_cache.hit = True


monitoring.register_event_listener(_note_cache_hit)


def compile_variant(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """(the executable, whether it may be stored: not loaded from JAX's own cache)."""
    _from_jax_cache.hit = False
    compiled = lowered.compile()
    return compiled, not _from_jax_cache.hit


class ExecutableStore:
    """Serialized executables of one engine (one fingerprint) under `directory`."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = Path(directory) / key
        self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, kind: str, size) -> Path:
        sizes = size if isinstance(size, tuple) else (size,)
        return self.directory / f"{kind}-{'-'.join(map(str, sizes))}.xla"

    def __contains__(self, variant: tuple[str, object]) -> bool:
        return self._file(*variant).is_file()

    def load(self, kind: str, size) -> jax.stages.Compiled | None:
        """The stored executable, or None if absent or unreadable."""
        file = self._file(kind, size)
        if not file.is_file():
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(file.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as error:  # noqa: BLE001 - any bad entry is just a miss
            log.warning("ignoring unreadable compiled variant %s: %s", file, error)
            return None

    def save(self, kind: str, size, compiled: jax.stages.Compiled) -> None:
        """Write atomically: a reader never sees a partial file. A failed write (a full
        or read-only disk) costs the next start its speed, not this one its model."""
        data = pickle.dumps(serialize_executable.serialize(compiled))
        file = self._file(kind, size)
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as f:
                f.write(data)
            os.replace(f.name, file)
        except OSError as error:
            log.warning("could not store the compiled variant %s: %s", file, error)
