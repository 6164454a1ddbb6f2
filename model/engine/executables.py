"""Compiled engine executables kept on disk (JAXCHAT_COMPILE_CACHE), so a restart loads
them without tracing, and shared through Cloud Storage by every instance of a service.

JAX's persistent compilation cache skips XLA compilation but still traces and
lowers every function to compute its key: for the engine's unrolled layers that
is about a second per variant, most of a warm start. This store keys each
variant by a fingerprint of everything its executable depends on (the JAX
and Flax builds, the backend, devices and mesh, the host CPU, the model
config, the engine's shapes, and the source of every project module the
engine imports, at any depth: model/weights/source_digest.py), so a hit is one file
read and one `deserialize_and_load`, with no tracing.

A file that fails to load (truncated, written by another build) is a miss:
the variant is compiled again and the file replaced. An executable that JAX's
own persistent cache supplied (when a user turned it on) is not stored: its
serialization is broken in jax 0.10 on CPU.

A cache is a directory holding the store under `executables/`. JAX's own
persistent cache is turned off when one is set: it traces every function
before it can look it up, and an executable it loaded cannot be serialized
again, so the two must not overlap. A `gs://` URI names a Cloud Storage prefix
mirrored by a local directory under the download cache: `pull` fetches the
executables the mirror lacks at start-up, `push` uploads the ones Cloud Storage
lacks after something was compiled.
"""

import hashlib
import importlib.metadata
import logging
import os
import pickle
import platform
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jaxlib
from jax import monitoring
from jax.experimental import serialize_executable

from model.weights import gcs

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


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
        importlib.metadata.version("flax"),  # (not imported: model/nn/pytree.py)
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
    """Serialized executables of one engine (one fingerprint) under `directory`.

    devices: the devices the executables run on, in the mesh's order (default: every
    device). An executable for a mesh on some of the devices must be loaded onto
    exactly those: XLA aborts the process on a device count that does not match.
    """

    def __init__(
        self, directory: Path, key: str, devices: Sequence[jax.Device] | None = None
    ) -> None:
        self.directory = Path(directory) / key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.devices = None if devices is None else tuple(devices)

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
            return serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=self.devices
            )
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


SHARED = "executables"  # the subdirectory mirrored to Cloud Storage


class CompileCache:
    """A local cache directory, optionally mirroring a `gs://bucket/prefix`."""

    def __init__(self, uri: str, download_dir: Path) -> None:
        """uri: a local path or gs:// prefix; download_dir: where gs:// mirrors live."""
        self.uri = uri
        if gcs.is_gcs_uri(uri):
            bucket, prefix = gcs.parse_uri(uri)
            self.bucket_name: str | None = bucket
            self.directory = download_dir / "compile" / bucket / prefix.strip("/")
        else:
            self.bucket_name = None
            self.directory = Path(uri).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def executables(self) -> Path:
        return self.directory / SHARED

    @property
    def _shared_uri(self) -> str:
        return f"{self.uri.rstrip('/')}/{SHARED}"

    def pull(self) -> int:
        """Download the objects the local mirror lacks (or holds stale); returns how many."""
        if self.bucket_name is None:
            return 0
        count = gcs.mirror(self._shared_uri, gcs.list_prefix(self._shared_uri), self.executables)
        log.info("compile cache: fetched %d files from %s", count, self.uri)
        return count

    def push(self) -> int:
        """Upload the local files Cloud Storage lacks; returns how many."""
        if self.bucket_name is None:
            return 0
        remote = gcs.list_prefix(self._shared_uri)
        todo = {
            path.relative_to(self.executables).as_posix(): path
            for path in sorted(self.executables.rglob("*"))
            if path.is_file() and not path.name.endswith((".partial", ".tmp"))
        }
        todo = {name: path for name, path in todo.items() if name not in remote}
        gcs.upload(self._shared_uri, todo)
        log.info("compile cache: uploaded %d files to %s", len(todo), self.uri)
        return len(todo)


def open_compile_cache(uri: str | None, download_dir: Path) -> CompileCache | None:
    """The cache at `uri` (None or empty: no cache), pulled from Cloud Storage.

    Turns JAX's own persistent cache off (JAX_COMPILATION_CACHE_DIR): an executable
    it supplied could not be stored here (see the module docstring).
    """
    if not uri:
        return None
    jax.config.update("jax_enable_compilation_cache", False)
    cache = CompileCache(uri, download_dir)
    cache.pull()
    return cache
