"""Logs Cloud Logging understands, and one access line per request.

`configure(settings)` sends every log record to stdout: with JAXCHAT_LOG_FORMAT
`json` (the default on Cloud Run, where K_SERVICE is set) as one JSON object per
line with `severity`, `message`, `time` and `logger`, which Cloud Logging reads as
structured entries; with `text`, as plain lines. Within a request each record also
carries the request id and, when the request came with `X-Cloud-Trace-Context` or
`traceparent`, `logging.googleapis.com/trace`, so the request's lines group under
its trace. The access line (`RequestLog.write`) adds `httpRequest` and the
request's model, client name (never its key), tokens and finish reasons.
"""

import contextvars
import datetime as dt
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from handler.settings import Settings

log = logging.getLogger("jaxchat.access")

REQUEST_ID = "X-Request-Id"
# The request being served by this thread: its id and trace, for every record it logs.
current: contextvars.ContextVar["RequestLog | None"] = contextvars.ContextVar(
    "jaxchat_request", default=None
)

_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/(\d+))?")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


class StdoutHandler(logging.StreamHandler):
    """jaxchat's handler on the root logger (others, such as a test's, stay); it
    writes to whatever sys.stdout is when it emits."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(settings: Settings) -> None:
    """Send every record to stdout in the configured format, from the configured level."""
    json_lines = settings.log_format == "json" or (
        settings.log_format == "auto" and "K_SERVICE" in os.environ
    )
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StdoutHandler)), None)
    if handler is None:
        handler = StdoutHandler()
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root.setLevel(settings.log_level)


def trace_id(headers: Mapping[str, str]) -> tuple[str, str | None] | None:
    """(trace id, span id) from X-Cloud-Trace-Context or W3C traceparent, or None;
    `headers` by lower-case name."""
    cloud = _CLOUD_TRACE.match(headers.get("x-cloud-trace-context", ""))
    if cloud:
        return cloud.group(1).lower(), cloud.group(2)
    parent = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if parent:
        return parent.group(1), str(int(parent.group(2), 16))
    return None


def project_id() -> str | None:
    """The Google Cloud project, for trace names (GOOGLE_CLOUD_PROJECT or GCP_PROJECT)."""
    return os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCP_PROJECT")


@dataclass
class RequestLog:
    """What the access line of one request says; routes fill in the generation's part."""

    method: str
    path: str
    request_id: str
    trace: tuple[str, str | None] | None = None
    user_agent: str | None = None
    remote_ip: str | None = None
    model: str | None = None
    client: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    cache: str | None = None
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls, method: str, path: str, headers: Mapping[str, str], remote_ip: str | None
    ) -> "RequestLog":
        """The log of a request just received (`headers` by lower-case name); it becomes
        the thread's current request."""
        request_id = headers.get(REQUEST_ID.lower()) or uuid.uuid4().hex
        entry = cls(
            method,
            path,
            request_id[:128],
            trace_id(headers),
            headers.get("user-agent"),
            remote_ip,
        )
        current.set(entry)
        return entry

    def trace_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"requestId": self.request_id}
        if self.trace is not None:
            trace, span = self.trace
            project = project_id()
            fields["logging.googleapis.com/trace"] = (
                f"projects/{project}/traces/{trace}" if project else trace
            )
            if span:
                fields["logging.googleapis.com/spanId"] = span
        return fields

    def write(self, status: int, seconds: float, response_bytes: int | None = None) -> None:
        """The access line."""
        http: dict[str, Any] = {
            "requestMethod": self.method,
            "requestUrl": self.path,
            "status": status,
            "latency": f"{seconds:.6f}s",
        }
        if self.user_agent:
            http["userAgent"] = self.user_agent
        if self.remote_ip:
            http["remoteIp"] = self.remote_ip
        if response_bytes is not None:
            http["responseSize"] = str(response_bytes)
        fields: dict[str, Any] = {"httpRequest": http, **self.trace_fields()}
        if self.model is not None:
            fields.update(
                model=self.model,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                finish_reason=",".join(self.finish_reasons) or None,
            )
        if self.client is not None:
            fields["client"] = self.client
        if self.cache is not None:
            fields["cache"] = self.cache
        log.info(
            "%s %s %d %.3fs",
            self.method,
            self.path,
            status,
            seconds,
            extra={"fields": fields, "request_log": self},
        )


SEVERITY = {"WARNING": "WARNING", "CRITICAL": "CRITICAL", "ERROR": "ERROR", "INFO": "INFO"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, in Cloud Logging's structured form."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # Error Reporting finds a stack trace in the message.
            message += "\n" + self.formatException(record.exc_info)
        entry: dict[str, Any] = {
            "severity": SEVERITY.get(record.levelname, "DEBUG"),
            "message": message,
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "logger": record.name,
        }
        request = getattr(record, "request_log", None) or current.get()
        if request is not None:
            entry.update(request.trace_fields())
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal: time, level, logger, message (and the request id)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            extra = {k: v for k, v in fields.items() if k != "httpRequest" and v is not None}
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line
