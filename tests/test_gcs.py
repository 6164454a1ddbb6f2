"""gs:// model URIs against a real Cloud Storage emulator process (gcp-storage-emulator).

Bytes transferred are counted on the client's HTTP session (the Content-Length of each
media response), so "downloads nothing" and "downloads only the rest" are measured, not
inferred.
"""

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from model.weights import gcs
from model.weights.sources import bundled_model_path, resolve_model

BUCKET = "models"
GGUF_BYTES = os.urandom(3 * 2**20 + 12345)  # not a multiple of the chunk size
HF_FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 64}',
    "model-00001-of-00002.safetensors": os.urandom(2 * 2**20 + 7),
    "model-00002-of-00002.safetensors": os.urandom(2**20 + 3),
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "extra/notes.txt": b"nested files keep their relative path",
}
# A jaxchat checkpoint: no config.json and no .gguf, only jaxchat.json marks it a model.
CHECKPOINT_FILES = {
    "jaxchat.json": b'{"format": "jaxchat-orbax", "version": 1}',
    "params/_METADATA": b"{}",
    "params/ocdbt.process_0/d/5668019de886263e7cc44697f41d707c": os.urandom(2**20 + 11),
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
}


@pytest.fixture(scope="module")
def bucket(emulator: str) -> storage.Bucket:
    """The test bucket with model.gguf, HF and jaxchat checkpoint prefixes and a prefix with
    no model."""
    bucket = gcs.make_client().create_bucket(BUCKET)
    bucket.blob("model.gguf").upload_from_string(GGUF_BYTES)
    for name, data in HF_FILES.items():
        bucket.blob(f"hf/smol/{name}").upload_from_string(data)
    for name, data in CHECKPOINT_FILES.items():
        bucket.blob(f"ckpt/smol-int8/{name}").upload_from_string(data)
    bucket.blob("junk/readme.md").upload_from_string(b"no weights here")
    bucket.blob("weights.bin").upload_from_string(b"not a gguf")
    return bucket


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 KiB chunks, so a few-MB object is fetched as many parallel, out-of-order ranges."""
    monkeypatch.setattr(gcs, "CHUNK_BYTES", 256 * 2**10)


class CountingSession(requests.Session):
    """A real HTTP session that adds up the bytes of media (object data) responses."""

    def __init__(self) -> None:
        super().__init__()
        self.media_bytes = 0
        self._lock = threading.Lock()
        self.hooks["response"].append(self._count)

    def _count(self, response: requests.Response, **_) -> None:
        if "alt=media" in response.request.url:
            with self._lock:
                self.media_bytes += int(response.headers["Content-Length"])


@pytest.fixture
def session(bucket: storage.Bucket) -> CountingSession:
    return CountingSession()


@pytest.fixture
def client(session: CountingSession) -> storage.Client:
    return storage.Client(project=None, credentials=AnonymousCredentials(), _http=session)


def test_gguf_object_is_downloaded_byte_identical(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_CACHE_DIR", str(tmp_path))
    path = resolve_model(f"gs://{BUCKET}/model.gguf")
    assert path == tmp_path / "gcs" / BUCKET / "model.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert not path.with_name("model.gguf.partial").exists()


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("hf/smol/", HF_FILES), ("ckpt/smol-int8", CHECKPOINT_FILES)],
    ids=["hugging-face", "jaxchat-checkpoint"],
)
def test_prefix_is_downloaded_as_a_directory(bucket, tmp_path, monkeypatch, prefix, expected):
    monkeypatch.setenv("JAXCHAT_CACHE_DIR", str(tmp_path))
    path = resolve_model(f"gs://{BUCKET}/{prefix}")
    assert path == tmp_path / "gcs" / BUCKET / prefix.strip("/")
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert files == expected


def test_second_resolve_transfers_no_data(client, session, tmp_path):
    uri = f"gs://{BUCKET}/model.gguf"
    path = gcs.download(uri, tmp_path, client)
    assert session.media_bytes == len(GGUF_BYTES)
    before = path.stat()

    assert gcs.download(uri, tmp_path, client) == path
    assert session.media_bytes == len(GGUF_BYTES)  # no more object data was sent
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_missing_object_or_bucket_is_file_not_found(bucket, tmp_path):
    for uri in (f"gs://{BUCKET}/nothing.gguf", f"gs://{BUCKET}/no/prefix", "gs://no-bucket/m"):
        with pytest.raises(FileNotFoundError, match=uri):
            gcs.download(uri, tmp_path)


def test_prefix_without_model_files_is_value_error(bucket, tmp_path):
    for uri in (f"gs://{BUCKET}/junk", f"gs://{BUCKET}/weights.bin"):
        with pytest.raises(ValueError, match=uri):
            gcs.download(uri, tmp_path)
    with pytest.raises(ValueError, match="expected a .gguf, config.json .* or jaxchat.json"):
        gcs.download(f"gs://{BUCKET}/junk", tmp_path)
    assert not (tmp_path / "gcs" / BUCKET / "junk").exists()


def test_altered_cached_file_is_downloaded_again(client, session, tmp_path):
    uri = f"gs://{BUCKET}/model.gguf"
    path = gcs.download(uri, tmp_path, client)
    data = bytearray(GGUF_BYTES)
    data[len(data) // 2] ^= 0xFF  # same size: only the crc32c can tell
    path.write_bytes(data)

    assert gcs.download(uri, tmp_path, client).read_bytes() == GGUF_BYTES
    assert session.media_bytes == 2 * len(GGUF_BYTES)


def test_resume_downloads_only_the_rest(client, session, tmp_path):
    uri = f"gs://{BUCKET}/model.gguf"
    kept = 1_000_003  # not chunk-aligned
    partial = tmp_path / "gcs" / BUCKET / "model.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(GGUF_BYTES[:kept])

    path = gcs.download(uri, tmp_path, client)
    assert path.read_bytes() == GGUF_BYTES
    assert session.media_bytes == len(GGUF_BYTES) - kept
    assert not partial.exists()


def test_resume_keeps_the_partial_prefix_and_checks_crc32c(client, session, tmp_path):
    """Wrong bytes of the right length in the partial file are kept, so the crc32c fails."""
    uri = f"gs://{BUCKET}/model.gguf"
    kept = 2**20
    partial = tmp_path / "gcs" / BUCKET / "model.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(bytes(kept))

    with pytest.raises(gcs.CorruptDownload, match=uri):
        gcs.download(uri, tmp_path, client)
    assert session.media_bytes == len(GGUF_BYTES) - kept
    assert not partial.exists()
    assert not (tmp_path / "gcs" / BUCKET / "model.gguf").exists()

    assert gcs.download(uri, tmp_path, client).read_bytes() == GGUF_BYTES


def test_partial_longer_than_the_object_starts_over(client, session, tmp_path):
    partial = tmp_path / "gcs" / BUCKET / "model.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(GGUF_BYTES + b"stale tail")

    assert gcs.download(f"gs://{BUCKET}/model.gguf", tmp_path, client).read_bytes() == GGUF_BYTES
    assert session.media_bytes == len(GGUF_BYTES)


class Forbidden(BaseHTTPRequestHandler):
    """Answers every request as Cloud Storage does for a caller without access."""

    def do_GET(self) -> None:
        body = b'{"error": {"code": 403, "message": "caller lacks storage.objects.get"}}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_forbidden_is_permission_error(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = storage.Client(
            project=None,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": f"http://127.0.0.1:{server.server_port}"},
        )
        uri = f"gs://{BUCKET}/model.gguf"
        with pytest.raises(PermissionError, match=uri):
            gcs.download(uri, tmp_path, client)
    finally:
        server.shutdown()
        server.server_close()


def test_bundled_model_from_gcs_is_byte_identical(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(gcs, "CHUNK_BYTES", 16 * 2**20)
    bundled = bundled_model_path()
    bucket.blob("smollm2/model.gguf").upload_from_filename(bundled)
    monkeypatch.setenv("JAXCHAT_CACHE_DIR", str(tmp_path))

    path = resolve_model(f"gs://{BUCKET}/smollm2/model.gguf")
    assert path.stat().st_size == bundled.stat().st_size
    assert gcs.file_crc32c(path) == gcs.file_crc32c(bundled)


def test_killed_download_leaves_a_prefix_that_resumes(bucket, client, session, tmp_path):
    """SIGKILL mid-download: the partial file holds only correct leading bytes."""
    data = os.urandom(24 * 2**20)
    bucket.blob("big.gguf").upload_from_string(data)
    uri = f"gs://{BUCKET}/big.gguf"
    partial = tmp_path / "gcs" / BUCKET / "big.gguf.partial"
    script = (
        "import sys; from pathlib import Path; from model.weights import gcs; "
        "gcs.CHUNK_BYTES = 64 * 2**10; gcs.download(sys.argv[1], Path(sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, uri, str(tmp_path)])
    try:
        while proc.poll() is None and (not partial.exists() or partial.stat().st_size < 2**20):
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -9, "the download finished before it could be killed"
    kept = partial.read_bytes()
    assert 0 < len(kept) < len(data)
    assert kept == data[: len(kept)]

    assert gcs.download(uri, tmp_path, client).read_bytes() == data
    assert session.media_bytes == len(data) - len(kept)


def test_default_model_served_from_gcs_gives_the_reference_greedy_reply(
    bucket, tmp_path, monkeypatch, golden
):
    """LLM("gs://…/model.gguf") (what JAXCHAT_MODEL=gs://… loads) answers like the HF
    reference on the same weights."""
    monkeypatch.setattr(gcs, "CHUNK_BYTES", 16 * 2**20)
    if bucket.get_blob("smollm2/model.gguf") is None:
        bucket.blob("smollm2/model.gguf").upload_from_filename(bundled_model_path())
    monkeypatch.setenv("JAXCHAT_CACHE_DIR", str(tmp_path))
    from model import LLM, SamplingParams

    # The `llm` fixture's settings and compile cache: the executables are the same.
    llm = LLM(
        f"gs://{BUCKET}/smollm2/model.gguf",
        max_seq_len=512,
        batch=8,
        dtype="float32",
        compile_cache=os.environ["JAXCHAT_COMPILE_CACHE"],
    )
    assert llm.path.is_relative_to(tmp_path)
    prompt = golden["prompts"][0]
    reply = llm.generate(prompt["ids"], SamplingParams(temperature=0, max_tokens=16))
    assert list(reply.token_ids) == prompt["greedy"][: len(reply.token_ids)]
    assert reply.text == "The capital of France is Paris."
    llm.scheduler.stop()
