"""comfy.lock.yml (what the volume holds, exactly) and the atomic file write every record uses.

The lock file is YAML with up to three sections, each owned by one writer: ``comfyui`` ({ref: commit},
or {ref: vX.Y.Z}, the release ``latest`` resolved to; start.sh), ``models`` (download_models.py) and
``nodes`` (install_nodes.py). It is shaped like a config.yml, so it can be fed back as one to rebuild
the same box. A writer replaces only its own section, under a file lock (``comfy.lock.yml.lock``), and
writes the whole file atomically. The format is described in docs/architecture.md.
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
        data = dict(read_lock_file(path))  # a plain dict: yaml.safe_dump refuses subclasses
        data[section] = value(data.get(section)) if callable(value) else value
        header = "# comfy.lock.yml: what this volume holds, exactly. Usable as a config.yml to reproduce it.\n"
        atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


# What a record of each list section holds: field -> allowed types, and the fields it must have.
# Fields not listed here (a newer writer's) are kept when they hold a plain value.
_RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "models": {
        "url": (str,),
        "destination": (str,),
        "filename": (str, type(None)),
        "sha256": (str, type(None)),
        "size": (int, type(None)),
        "optional": (bool,),
    },
    "nodes": {
        "url": (str,),
        "version": (str,),
        "name": (str, type(None)),
        "optional": (bool,),
        "requirements": (bool,),
    },
}
_REQUIRED = {"models": ("url", "destination"), "nodes": ("url", "version")}
_PLAIN = (str, int, float, bool, type(None))


def _type_name(value: object) -> str:
    """'null', 'an int', 'a str'... for a message."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _record_problem(section: str, record: object) -> str | None:
    """Why ``record`` is not a valid record of ``section``, or None when it is."""
    if not isinstance(record, dict):
        return f"is {_type_name(record)}, not a mapping"
    fields = _RECORD_FIELDS[section]
    for name in _REQUIRED[section]:
        if name not in record:
            return f"has no {name!r}"
    for name, value in record.items():
        if not isinstance(name, str):
            return f"has a key that is {_type_name(name)}"
        allowed = fields.get(name, _PLAIN)
        if isinstance(value, bool) and bool not in allowed:  # bool is an int to isinstance
            return f"{name!r} is a bool"
        if not isinstance(value, allowed):
            return f"{name!r} is {_type_name(value)}"
        if name == "size" and value is not None and value < 0:
            return "'size' is negative"
    return None


def _sane(data: dict) -> tuple[dict, list[str]]:
    """``data`` with every damaged part left out, and one phrase per part left out."""
    damage: list[str] = []
    sane: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            damage.append(f"a top-level key that is {_type_name(key)}")
        elif key in _RECORD_FIELDS:
            if value is None:
                continue
            if not isinstance(value, list):
                damage.append(f"section {key!r} ({_type_name(value)}, not a list)")
                continue
            kept = []
            for i, record in enumerate(value):
                problem = _record_problem(key, record)
                if problem:
                    damage.append(f"{key}[{i}] ({problem})")
                else:
                    kept.append(record)
            sane[key] = kept
        elif (
            key == "comfyui"
            and value is not None
            and not (isinstance(value, dict) and isinstance(value.get("ref", ""), str))
        ):
            damage.append("section 'comfyui' (not a mapping with a text 'ref')")
        else:
            sane[key] = value
    return sane, damage


class LockData(dict):
    """The sections of comfy.lock.yml; ``damaged`` is true when parts of the file were left out, so
    a reader that writes only on change knows the file needs a rewrite anyway."""

    damaged: bool = False


def _damaged(data: dict | None = None) -> LockData:
    result = LockData(data or {})
    result.damaged = True
    return result


def read_lock_file(path: Path) -> LockData:
    """comfy.lock.yml as a dict whose ``models`` and ``nodes`` are lists of records with fields of
    the right types (``comfyui`` a mapping). It is a record, not a config: damaged parts (a file that
    is not YAML or not UTF-8, a section of the wrong type, an invalid record) are left out with a
    warning (and ``damaged`` set), and the next write rewrites the file without them."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return LockData()
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as err:
        log.warning("ignoring unreadable %s (%s); it will be rewritten", path, type(err).__name__)
        return _damaged()
    if data is None:
        return LockData()
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a mapping but %s; it will be rewritten", path, _type_name(data))
        return _damaged()
    sane, damage = _sane(data)
    if damage:
        shown = "; ".join(damage[:5]) + (f"; and {len(damage) - 5} more" if len(damage) > 5 else "")
        log.warning("ignoring damaged parts of %s: %s; it will be rewritten without them", path, shown)
        return _damaged(sane)
    return LockData(sane)
