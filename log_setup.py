"""One logging format for every comfy-worker process, with secret redaction and a job-id prefix."""

from __future__ import annotations

import contextvars
import logging
import sys

from settings import secret_values

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(job_prefix)s%(message)s"
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


def set_job_id(job_id: str | None) -> contextvars.Token:
    """Mark the current (async) context as working on ``job_id``; every log line gets ``[job_id]``."""
    return _job_id.set(job_id)


def reset_job_id(token: contextvars.Token) -> None:
    _job_id.reset(token)


class _ContextFilter(logging.Filter):
    """Adds the job prefix and removes secret values from every record."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        job = _job_id.get()
        record.job_prefix = f"[{job}] " if job else ""
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
        return True


def setup_logging(level: int | str = logging.INFO, stream=None) -> None:
    """Configure the root logger once (idempotent): one format, job prefix, secrets redacted."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_comfy_worker", False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler._comfy_worker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    else:
        # A second call may name another stream; the old one may be closed already (no flush).
        handler.stream = stream or sys.stderr
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.filters = [_ContextFilter(secret_values())]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "websockets", "git", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
