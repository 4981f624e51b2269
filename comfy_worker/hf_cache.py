"""Hugging Face models already on the host: RunPod's cached models (``/runpod-volume/huggingface-cache/hub``)
and ``HF_HUB_CACHE``, in the standard hub cache layout
(``models--org--name/{refs/<branch>, blobs/<hash>, snapshots/<commit>/<path>}``).

Which file an entry names (``HfFile``: repo, type, revision, path) is model_sources' parsing of the URL
(``model_sources.hf_file``); download_models.py asks here before any network (docs/architecture.md,
"The flow of a start", step 5) and records a linked file in comfy.lock.yml like a download.

``find`` asks huggingface_hub's own cache lookup (``try_to_load_from_cache``: it follows ``refs/`` for a
branch or tag and knows the repo-type prefixes), so the layout is never re-implemented here.
``link_into`` checks the sha256 when the entry has one, then links the file into ``models/<destination>``
atomically: a link is made under a temporary name beside the target and renamed over it.

Which link: a **symlink** to the resolved blob. A hard link would be the sturdier reference, but the
cache is usually another filesystem (RunPod mounts it read-only next to the user's volume), where
hard links are impossible, and a copy would spend the very disk and time the cache exists to save.
The symlink points at the blob itself (not the snapshot's relative symlink), so it stays valid when
the snapshot folder is pruned, and it never writes inside the cache. A dangling link (cache gone)
is seen as a missing file by the start's local checks and re-provisioned.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model_sources pulls the downloader in; the start's summary only needs is_linked_from
    from comfy_worker.model_sources import HfFile


class CacheMismatch(Exception):
    """The cached file is not the one the entry asks for (sha256 differs): refused, never linked."""


def find(file: HfFile, cache_dirs: tuple[Path, ...] | list[Path]) -> Path | None:
    """The cached file (resolved to its blob) in the first cache that holds it, else None."""
    from huggingface_hub import try_to_load_from_cache

    for cache in cache_dirs:
        if not Path(cache).is_dir():
            continue
        found = try_to_load_from_cache(
            file.repo_id, file.path, cache_dir=str(cache), revision=file.revision, repo_type=file.repo_type
        )
        if isinstance(found, str) and os.path.isfile(found):
            return Path(os.path.realpath(found))
    return None


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def link_into(source: Path, target: Path, sha256: str | None) -> Path:
    """Symlink ``target`` to the cached ``source`` after checking ``sha256`` (when given); atomic."""
    if sha256:
        got = sha256_of(source)
        if got != sha256.lower():
            raise CacheMismatch(
                f"the cached file {source} has sha256 {got}, not the entry's {sha256.lower()}; "
                "not linked (the entry's sha256 or the cached revision is wrong)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mktemp(prefix=f".{target.name}.", suffix=".link", dir=target.parent))
    os.symlink(source, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def is_linked_from(target: Path, cache_dirs) -> bool:
    """Is ``target`` a symlink into one of ``cache_dirs`` (the log says "linked from cache")?"""
    if not target.is_symlink():
        return False
    dest = os.path.realpath(target)
    return any(dest.startswith(os.path.realpath(c) + os.sep) for c in cache_dirs)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def blob_sha256(path: Path) -> str | None:
    """An LFS blob is stored under its sha256: the name, when it looks like one (no hashing)."""
    return path.name if _HEX64.match(path.name) else None
