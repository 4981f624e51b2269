"""File names for models: what a URL, a server or a config offers, made safe to create and to show.

One place decides a model's file name from untrusted text (a URL's last segment, a server's
Content-Disposition, a CivitAI API answer): ``safe_filename`` drops directories, control and bidi
characters and leading dots, refuses option-like names and our own suffixes, and shortens what would
not fit the filesystem's limit together with those suffixes.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlparse

# Our own suffixes next to a target (``.part``, its records, their temp files, the lock, hf_xet's staging
# folder): a server-chosen name must not be one of them, and a name plus the longest must fit the
# filesystem's 255-byte limit.
OWN_SUFFIXES = (".part", ".part.source", ".part.state", ".tmp", ".lock", ".part.hf")
LONGEST_SUFFIX = ".part.source.tmp"
NAME_MAX = 255
MAX_NAME_BYTES = NAME_MAX - len(LONGEST_SUFFIX) - 2  # also leaves room for hf_xet's ".<name>.part.hf"
# control characters (C0, DEL, C1) and the Unicode format characters that reorder or hide text (bidi
# overrides and isolates, zero-width marks, BOM)
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def safe_filename(name: str | None) -> str | None:
    """A plain file name fit to create and to show, or None when there is none to be had.

    Directories are dropped (``a/b`` -> ``b``), control and bidi/zero-width characters removed, leading
    dots stripped (no hidden files such as ``.bashrc``); an option-like name (``-rf``) or one ending in
    one of our own suffixes (``x.part``) is refused; a name longer than ``MAX_NAME_BYTES`` (UTF-8) is
    shortened, keeping its extension, so that it plus our suffixes fits the filesystem's limit."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("", name).strip().strip('"').strip().lstrip(".").strip()
    if not name or name.startswith("-") or name.lower().endswith(OWN_SUFFIXES):
        return None
    if len(name.encode()) > MAX_NAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if dot and 0 < len(ext.encode()) <= 16 else ""
        stem = name[: len(name) - len(ext)] if ext else name
        budget = MAX_NAME_BYTES - len(ext.encode())
        stem = stem.encode()[:budget].decode(errors="ignore").rstrip()
        name = stem + ext
    return name or None


def content_disposition_name(value: str | None) -> str | None:
    """The file name a Content-Disposition header offers (RFC 6266 ``filename*`` preferred), as sent:
    not yet safe to use (see ``content_disposition_filename``)."""
    if not value:
        return None
    m = re.search(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", value, re.IGNORECASE)
    if m:
        try:
            return unquote(m.group(2).strip(), encoding=m.group(1) or "utf-8")
        except LookupError:
            pass
    m = re.search(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', value, re.IGNORECASE) or re.search(
        r"filename\s*=\s*([^;]+)", value, re.IGNORECASE
    )
    return m.group(1).replace('\\"', '"') if m else None


def content_disposition_filename(value: str | None) -> str | None:
    """The file name in a Content-Disposition header, sanitised (``safe_filename``)."""
    return safe_filename(content_disposition_name(value))


def url_filename(url: str) -> str | None:
    """The last path segment of ``url``, decoded and made safe (see ``safe_filename``), or None."""
    return safe_filename(unquote(urlparse(url).path.rsplit("/", 1)[-1]))
