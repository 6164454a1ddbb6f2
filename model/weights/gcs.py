"""Model weights from Cloud Storage: a `gs://` URI downloaded into a verified local cache.

`gs://bucket/name` is an object (a `.gguf` file) or, when no object has that exact name,
a prefix ("directory") holding a GGUF, a Hugging Face checkpoint (config.json,
*.safetensors, tokenizer files) or a jaxchat checkpoint (jaxchat.json, params/, tokenizer
files; model/weights/orbax.py). Either lands at `<cache>/gcs/<bucket>/<name>`, a file or a
directory with the prefix's files under their relative names.

A cached file is reused when its size and crc32c equal the object's metadata; otherwise it
is downloaded again. A download goes to `<file>.partial` in chunks of CHUNK_BYTES fetched by
WORKERS threads but appended strictly in order, so the partial file is always a prefix of
the object: a killed download resumes from the partial file's size. At the end the whole
file's size and crc32c are checked against the metadata before it is renamed into place;
a mismatch deletes it and raises CorruptDownload.

Chunks are fetched with `Blob.download_to_file(start=, end=)` on a thread pool rather than
`transfer_manager.download_chunks_concurrently`, which truncates the destination and writes
chunks out of order into a sparse file: a killed run would leave no trustworthy prefix.
"""

from __future__ import annotations

import base64
import fcntl
import io
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.cloud import storage
    from tqdm import tqdm

# The Cloud Storage client and its helpers are imported where they are used: the engine
# imports this module for its gs:// compile cache, and a start without one need not pay.

log = logging.getLogger(__name__)

SCHEME = "gs://"
CHUNK_BYTES = 16 * 2**20
WORKERS = 8
# Chunks in flight or waiting to be appended: bounds memory at LOOKAHEAD * CHUNK_BYTES.
LOOKAHEAD = 2 * WORKERS
HASH_BLOCK_BYTES = 8 * 2**20


class CorruptDownload(OSError):
    """A downloaded or cached file whose size or crc32c differs from the object's metadata."""


def is_gcs_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def make_client() -> storage.Client:
    """A client with default credentials, or anonymous when STORAGE_EMULATOR_HOST is set."""
    # Imported here: google.cloud.storage adds 0.2 s to every start, gs:// or not.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=None, credentials=AnonymousCredentials())
    return storage.Client(project=None)  # reads need no project


def download(uri: str, cache_dir: Path, client: storage.Client | None = None) -> Path:
    """The local copy of `uri` (`gs://bucket/name`) under `cache_dir`, downloaded if needed.

    Returns the file for a `.gguf` object, or the directory for a prefix. Raises
    FileNotFoundError (no such bucket, object or prefix), PermissionError (403),
    ValueError (not a model: neither a .gguf nor a prefix with config.json, jaxchat.json
    or a .gguf)
    and CorruptDownload (size or crc32c mismatch); each message names the URI.
    """
    bucket_name, name = parse_uri(uri)
    client = client or make_client()
    dest = cache_dir / "gcs" / bucket_name / name
    from google.api_core import exceptions

    try:
        blobs = _model_blobs(client.bucket(bucket_name), name, uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked(dest.with_name(dest.name + ".lock")):
            _fetch_all(uri, blobs, dest)
    except exceptions.Forbidden as e:
        raise PermissionError(f"no permission to read {uri}: {e.message}") from e
    except exceptions.NotFound as e:
        raise FileNotFoundError(f"{uri} not found: {e.message}") from e
    return dest


def list_prefix(uri: str, client: storage.Client | None = None) -> dict[str, storage.Blob]:
    """The objects under the gs:// prefix `uri`, by their path below it.

    Raises FileNotFoundError (no such bucket) or PermissionError (403), naming the URI.
    """
    bucket_name, name = parse_uri(uri)
    prefix = f"{name.rstrip('/')}/" if name.strip("/") else ""
    from google.api_core import exceptions

    try:
        blobs = (client or make_client()).bucket(bucket_name).list_blobs(prefix=prefix)
        return {b.name[len(prefix) :]: b for b in blobs if not b.name.endswith("/")}
    except exceptions.NotFound as e:
        raise FileNotFoundError(f"{uri}: no such bucket") from e
    except exceptions.Forbidden as e:
        raise PermissionError(f"no permission to list {uri}: {e.message}") from e


def mirror(uri: str, blobs: dict[str, storage.Blob], dest: Path) -> int:
    """Download the objects in `blobs` (by path below `uri`) whose copies under `dest` are
    missing or stale, verified and resumable as a model is; returns how many."""
    todo = sum(not matches(dest / rel, b) for rel, b in blobs.items())
    _fetch_all(uri, blobs, dest)
    return todo


def upload(uri: str, files: dict[str, Path], client: storage.Client | None = None) -> None:
    """Upload local files to the gs:// prefix `uri` under the given relative names, WORKERS
    at a time."""
    bucket_name, name = parse_uri(uri)
    prefix = f"{name.rstrip('/')}/" if name.strip("/") else ""
    bucket = (client or make_client()).bucket(bucket_name)

    def put(item: tuple[str, Path]) -> None:
        bucket.blob(prefix + item[0]).upload_from_filename(item[1])

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="gcs") as pool:
        list(pool.map(put, files.items()))


def read_bytes(uri: str, client: storage.Client | None = None) -> bytes:
    """A small object's content (a settings file), read whole; FileNotFoundError or
    PermissionError naming the URI."""
    bucket_name, name = parse_uri(uri)
    from google.api_core import exceptions

    try:
        blob = (client or make_client()).bucket(bucket_name).blob(name)
        return bytes(blob.download_as_bytes())
    except exceptions.NotFound as e:
        raise FileNotFoundError(f"{uri}: no such object") from e
    except exceptions.Forbidden as e:
        raise PermissionError(f"no permission to read {uri}: {e.message}") from e


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, object name or prefix) of `gs://bucket/name`; the name may be empty."""
    if not is_gcs_uri(uri):
        raise ValueError(f"{uri!r} is not a gs:// URI")
    bucket, _, name = uri.removeprefix(SCHEME).partition("/")
    name = name.rstrip("/")
    parts = PurePosixPath(name).parts
    if not bucket or ".." in parts or name.startswith("/"):
        raise ValueError(f"{uri!r} is not a valid gs://bucket/path URI")
    return bucket, name


def file_crc32c(path: Path) -> str:
    """Base64 big-endian CRC32C of a file, as in Cloud Storage object metadata."""
    import google_crc32c

    crc = google_crc32c.Checksum()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            crc.update(block)
    return base64.b64encode(crc.digest()).decode("ascii")


def matches(path: Path, blob: storage.Blob) -> bool:
    """True when `path` is a file with the object's size and crc32c."""
    if not path.is_file() or path.stat().st_size != blob.size:
        return False
    return blob.crc32c is None or file_crc32c(path) == blob.crc32c


def _model_blobs(bucket: storage.Bucket, name: str, uri: str) -> dict[str, storage.Blob]:
    """The objects to download by path relative to the URI: {"": the `.gguf` object}, or
    every object under the prefix."""
    blob = bucket.get_blob(name) if name else None
    if blob is not None:
        if not name.endswith(".gguf"):
            raise ValueError(f"{uri} is neither a .gguf object nor a model prefix")
        return {"": blob}
    prefix = f"{name}/" if name else ""
    blobs = [b for b in bucket.list_blobs(prefix=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    by_path = {b.name.removeprefix(prefix): b for b in blobs}
    if not {"config.json", "jaxchat.json"} & by_path.keys() and not any(
        p.endswith(".gguf") and "/" not in p for p in by_path
    ):
        raise ValueError(
            f"{uri} holds no model: expected a .gguf, config.json (Hugging Face) or "
            f"jaxchat.json (jaxchat checkpoint) directly under it, found {sorted(by_path)[:5]}"
        )
    for path in by_path:  # object names may hold anything; keep files inside the cache
        if ".." in PurePosixPath(path).parts or path.startswith("/"):
            raise ValueError(f"{uri}: object name {prefix + path!r} is not a safe file path")
    return by_path


def _fetch_all(uri: str, blobs: dict[str, storage.Blob], dest: Path) -> None:
    """Download every blob whose cached copy is missing or stale, with one progress bar."""
    todo = [(b, dest / rel if rel else dest) for rel, b in blobs.items()]
    todo = [(b, path) for b, path in todo if not matches(path, b)]
    if not todo:
        log.info("%s: using the cached copy at %s", uri, dest)
        return
    total = sum(b.size for b, _ in todo)
    log.info("%s: downloading %d file(s), %.1f MB, to %s", uri, len(todo), total / 1e6, dest)
    started = time.monotonic()
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=uri,
        disable=not sys.stderr.isatty(),
    ) as bar:
        for blob, path in todo:
            _fetch(uri, blob, path, bar)
    seconds = time.monotonic() - started
    log.info("%s: downloaded %.1f MB in %.1f s", uri, total / 1e6, seconds)


def _fetch(uri: str, blob: storage.Blob, path: Path, bar: tqdm) -> None:
    """Resume or start `path`.partial, verify it, and rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > blob.size:  # not a prefix of this object: start over
        partial.unlink()
        offset = 0
    bar.update(offset)
    _append_range(blob, partial, offset, bar)
    if not matches(partial, blob):
        partial.unlink()
        raise CorruptDownload(
            f"{uri}: {blob.name} downloaded to {partial} does not match the object's size "
            f"{blob.size} and crc32c {blob.crc32c} (changed during download, or a corrupt "
            "partial file); it was deleted, so the next attempt starts over"
        )
    os.replace(partial, path)


def _append_range(blob: storage.Blob, partial: Path, offset: int, bar: tqdm) -> None:
    """Append bytes [offset, size) of `blob` to `partial`, chunks fetched in parallel."""
    starts = iter(range(offset, blob.size, CHUNK_BYTES))
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="gcs")
    pending: deque[Future[bytes]] = deque()
    try:
        with partial.open("ab") as f:
            while True:
                while len(pending) < LOOKAHEAD and (start := next(starts, None)) is not None:
                    end = min(start + CHUNK_BYTES, blob.size) - 1
                    pending.append(pool.submit(_read_range, blob, start, end))
                if not pending:
                    break
                data = pending.popleft().result()
                f.write(data)
                bar.update(len(data))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_range(blob: storage.Blob, start: int, end: int) -> bytes:
    """Bytes [start, end] (inclusive) of the object's generation that was listed."""
    buf = io.BytesIO()
    # raw_download: the stored bytes, which the size and crc32c metadata describe.
    blob.download_to_file(buf, start=start, end=end, checksum=None, raw_download=True)
    data = buf.getvalue()
    if len(data) != end - start + 1:  # checked before appending, so the prefix stays valid
        raise CorruptDownload(
            f"gs://{blob.bucket.name}/{blob.name}: got {len(data)} bytes for range {start}-{end}"
        )
    return data


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, so processes sharing a cache download a model once."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
