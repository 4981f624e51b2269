"""One logging format for every comfy-worker process, with secret redaction and a job-id prefix.

``redact`` is the one scrubber of text shown to people or returned to callers: it removes the value
of every secret (the list of ``settings.is_secret_name``, plus a job's own secrets) and the query
string and credentials of every URL in the text (signed links carry short-lived credentials there).
``safe_url`` is the same for one URL.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Iterable

from comfy_worker.settings import secret_values

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(job_prefix)s%(message)s"
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_job_secrets: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("job_secrets", default=())


def set_job_id(job_id: str | None) -> contextvars.Token:
    """Mark the current (async) context as working on ``job_id``; every log line gets ``[job_id]``."""
    return _job_id.set(job_id)


def reset_job_id(token: contextvars.Token) -> None:
    _job_id.reset(token)


def set_job_secrets(values) -> contextvars.Token:
    """Secrets of the current job (e.g. an API key sent in its input), redacted like the env secrets."""
    return _job_secrets.set(tuple(v for v in values if v and len(v) >= 4))


def reset_job_secrets(token: contextvars.Token) -> None:
    _job_secrets.reset(token)


# the query runs to the next space or quote; trailing punctuation (the ")" or "." of the sentence) stays
_URL_QUERY = re.compile(
    r"""((?:https?|s3|wss?)://[^\s'"<>?#]*)[?#][^\s'"<>]*?(?=[)\]}.,;:!]*(?:[\s'"<>]|$))""", re.IGNORECASE
)
_URL_USERINFO = re.compile(r"""((?:https?|wss?)://)[^\s'"<>/@]+@""", re.IGNORECASE)
# a path with its query where a library quotes no scheme or host (requests: "Max retries exceeded with
# url: /f?X-Amz-Signature=..."): a signed link carries a short-lived credential there too
_PATH_QUERY = re.compile(r"""(/[^\s'"<>?#()]*)[?#][^\s'"<>()]*?(?=[)\]}.,;:!]*(?:[\s'"<>()]|$))""")


def safe_url(url: str) -> str:
    """``url`` fit to show: no ``user:password@``, and a query string or fragment shown as ``?…``."""
    return redact_urls(url)


def redact_urls(text: str) -> str:
    """Every URL in ``text`` without its query string/fragment (``?…``) and without credentials; also
    a bare ``/path?query`` as libraries quote it."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(lambda m: m.group(1) + "?…", text)
    return _PATH_QUERY.sub(r"\1?…", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret of 4 characters or more replaced by ``***`` (longest first, so a
    secret containing another is removed whole) and every URL's query string and credentials removed."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact_urls(text)


ANSWER_KEYS = ("error", "details", "errors")  # the parts of a handler's answer that describe a failure


def redact_obj(value, secrets: Iterable[str]):
    """``value`` (strings, lists, dicts) with ``redact`` applied to every string in it."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [redact_obj(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: redact_obj(v, secrets) for k, v in value.items()}
    return value


def redact_answer(output, secrets: Iterable[str]):
    """A handler's answer with its ``error``, ``details`` and ``errors`` redacted (every secret, every URL
    query string); the rest (images, signed output links) as it is. Anything but a dict is returned as is."""
    if not isinstance(output, dict):
        return output
    secrets = tuple(secrets)
    return {k: redact_obj(v, secrets) if k in ANSWER_KEYS else v for k, v in output.items()}


class _ContextFilter(logging.Filter):
    """Adds the job prefix and removes secret values from every record."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = tuple(secrets)

    def redact(self, text: str, extra: tuple[str, ...] = ()) -> str:
        return redact(text, (*self.secrets, *extra))

    def filter(self, record: logging.LogRecord) -> bool:
        job = _job_id.get()
        record.job_prefix = f"[{job}] " if job else ""
        extra = _job_secrets.get()
        record.msg = self.redact(record.getMessage(), extra)
        record.args = None
        # a traceback's exception message too, also when another handler formatted it first
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text, extra)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info, extra)
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
