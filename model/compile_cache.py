"""The compilation cache (JAXCHAT_COMPILE_CACHE): a restart loads executables instead of
compiling them.

A cache is a directory holding the engine's serialized variants under
`executables/` (model/executables.py: loaded without tracing). JAX's own
persistent cache is not turned on: it traces every function before it can
look it up, and an executable it loaded cannot be serialized again (in jax
0.10 on CPU the copy fails at run time), so the two must not overlap. A `gs://`
URI names a Cloud Storage prefix mirrored by a local directory under the
download cache: `pull` fetches the executables the mirror lacks at start-up,
`push` uploads the ones Cloud Storage lacks after something was compiled, so
every instance of a service shares one cache. Prepared model copies
(model/prepared.py) are kept in the download cache, not here: they are large
and quick to rebuild from the model itself.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import jax

from model import gcs

if TYPE_CHECKING:
    from google.cloud import storage

log = logging.getLogger(__name__)

WORKERS = 8
SHARED = "executables"  # the subdirectory mirrored to Cloud Storage


class CompileCache:
    """A local cache directory, optionally mirroring a `gs://bucket/prefix`."""

    def __init__(self, uri: str, download_dir: Path) -> None:
        """uri: a local path or gs:// prefix; download_dir: where gs:// mirrors live."""
        self.uri = uri
        if gcs.is_gcs_uri(uri):
            self.bucket_name, prefix = gcs.parse_uri(uri)
            self.prefix = prefix.strip("/")
            self.directory = download_dir / "compile" / self.bucket_name / self.prefix
        else:
            self.bucket_name = None
            self.directory = Path(uri).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def executables(self) -> Path:
        return self.directory / SHARED

    def _blobs(self) -> dict[str, "storage.Blob"]:
        """The cache's shared objects by their path relative to the prefix."""
        client = gcs.make_client()
        start = f"{self.prefix}/" if self.prefix else ""
        shared = f"{start}{SHARED}/"
        try:
            blobs = client.bucket(self.bucket_name).list_blobs(prefix=shared)
            return {blob.name[len(start) :]: blob for blob in blobs}
        except gcs.exceptions.NotFound as error:
            raise FileNotFoundError(f"compile cache {self.uri}: no such bucket") from error
        except gcs.exceptions.Forbidden as error:
            raise PermissionError(f"compile cache {self.uri}: {error.message}") from error

    def pull(self) -> int:
        """Download the objects the local mirror lacks (or holds stale); returns how many."""
        if self.bucket_name is None:
            return 0
        todo = [
            (blob, self.directory / name)
            for name, blob in self._blobs().items()
            if not name.endswith("/") and not gcs.matches(self.directory / name, blob)
        ]

        def fetch(item) -> None:
            blob, path = item
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            blob.download_to_filename(partial)
            partial.replace(path)

        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(fetch, todo))
        log.info("compile cache: fetched %d files from %s", len(todo), self.uri)
        return len(todo)

    def push(self) -> int:
        """Upload the local files Cloud Storage lacks; returns how many."""
        if self.bucket_name is None:
            return 0
        remote = self._blobs()
        bucket = gcs.make_client().bucket(self.bucket_name)
        todo = [
            path.relative_to(self.directory).as_posix()
            for path in sorted(self.executables.rglob("*"))
            if path.is_file() and not path.name.endswith((".partial", ".tmp"))
        ]
        todo = [name for name in todo if name not in remote]

        def upload(name: str) -> None:
            blob = bucket.blob(f"{self.prefix}/{name}" if self.prefix else name)
            blob.upload_from_filename(self.directory / name)

        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(upload, todo))
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
