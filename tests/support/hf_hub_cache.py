"""A Hugging Face hub cache folder laid out as RunPod's cached models
(``/runpod-volume/huggingface-cache/hub/models--org--name/{refs,blobs,snapshots/<commit>/<path>}``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def make_hf_cache(
    root: Path, repo: str, path: str, data: bytes, commit: str = "a" * 40, blob: str | None = None
) -> Path:
    """Put ``data`` into the cache at ``root`` as ``repo``'s file ``path`` at ``commit`` (``refs/main``
    points at it), stored as an LFS blob named by its sha256 (or ``blob``); the repo's folder."""
    folder = root / f"models--{repo.replace('/', '--')}"
    name = blob or hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / name).write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit / path
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(folder / "blobs" / name, snap.parent))  # relative, as huggingface_hub makes it
    return folder
