"""comfy.lock.yml (what the volume holds, exactly) and the atomic file write every record uses.

The lock file is YAML with up to three sections, each owned by one writer: ``comfyui`` ({ref: commit},
start.sh), ``models`` (download_models.py) and ``nodes`` (install_nodes.py). It is shaped like a
config.yml, so it can be fed back as one to rebuild the same box. A writer replaces only its own
section, under a file lock (``comfy.lock.yml.lock``), and writes the whole file atomically. The format
is described in docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import yaml
from filelock import FileLock

log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are meant to be read by others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_lock_file(path: Path, section: str, value: object) -> None:
    """Replace one section (``comfyui``, ``models`` or ``nodes``) of comfy.lock.yml, keeping the
    others; safe when several processes update it at once. ``value`` may be a function of the
    section's current value (read under the same lock), for merging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = read_lock_file(path)
        data[section] = value(data.get(section)) if callable(value) else value
        header = "# comfy.lock.yml: what this volume holds, exactly. Usable as a config.yml to reproduce it.\n"
        atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def read_lock_file(path: Path) -> dict:
    """comfy.lock.yml as a dict; a damaged file counts as empty (it is a record, rewritten by the
    next successful run), with a warning."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("ignoring unreadable %s (%s); it will be rewritten", path, type(err).__name__)
        return {}
    if data is not None and not isinstance(data, dict):
        log.warning("ignoring %s: not a mapping; it will be rewritten", path)
        return {}
    return data or {}
