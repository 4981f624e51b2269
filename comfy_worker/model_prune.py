"""Model files the config no longer names (``apply_config.sh`` says which; ``--prune`` removes them).

A model provisioned once is recorded in ``comfy.lock.yml`` (``models``, written by download_models.py);
removing its entry from config.yml leaves the file and its record, and ComfyUI keeps listing it. Here a
record is *named* when some entry of the current config has the same ``destination`` and the same file
(its ``filename``, else its URL or the URL's last path segment). Only recorded files are considered: a
file put into ``models/`` by hand is never touched. Pruning removes the file (a link to a cached model:
only the link, never the cache) and its record; a file that another recorded entry of the config
still names is kept, so nothing the config asks for goes away. A file a running job uses (its in-use
marker is held, model_use.py) is kept too, whoever recorded it; the job models themselves are not recorded
here (their own bound, job_models.py, removes them).
"""

from __future__ import annotations

import logging
from pathlib import Path

from comfy_worker.config_schema import ModelEntry, WorkerConfig
from comfy_worker.file_names import url_filename
from comfy_worker.lock_file import read_lock_file, update_lock_file
from comfy_worker.model_use import unused as unused_by_jobs
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)


def names(entry: ModelEntry, record: dict) -> bool:
    """Does this config entry name the recorded file?"""
    if record.get("destination") != entry.destination:
        return False
    wanted = entry.filename or url_filename(entry.url)
    return record.get("url") == entry.url or (wanted is not None and record.get("filename") == wanted)


def unnamed(settings: Settings, cfg: WorkerConfig) -> list[tuple[dict, Path]]:
    """(record, file) of every recorded model file on the volume that no entry of ``cfg`` names."""
    records = read_lock_file(settings.lock_file).get("models")
    found = []
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict) or not record.get("filename") or not record.get("destination"):
            continue
        if any(names(entry, record) for entry in cfg.models):
            continue
        path = settings.models_dir / record["destination"] / record["filename"]
        if path.is_file() or path.is_symlink():
            found.append((record, path))
    return found


def report_or_prune(settings: Settings, cfg: WorkerConfig, prune: bool) -> int:
    """Say which files no entry names any more, or (``prune``) remove them and their records; returns
    how many there were."""
    found = unnamed(settings, cfg)
    for record, path in found:
        shown = path.relative_to(settings.comfyui_path)
        if not prune:
            log.warning(
                "%s is on the volume but no config entry names it any more (ComfyUI still lists it): "
                "apply_config.sh --prune removes it",
                shown,
            )
            continue
        with unused_by_jobs(settings.models_dir, f"{record['destination']}/{record['filename']}") as free:
            if not free:
                log.warning("%s: kept, in use by a running job; --prune removes it once no job uses it", shown)
                continue
            path.unlink(missing_ok=True)
        update_lock_file(settings.lock_file, "models", lambda old, gone=record: _without(old, gone))
        log.info("pruned %s (no config entry names it)", shown)
    return len(found)


def _without(records, gone: dict) -> list:
    kept = records if isinstance(records, list) else []
    return [r for r in kept if not (isinstance(r, dict) and _same_file(r, gone))]


def _same_file(a: dict, b: dict) -> bool:
    return a.get("destination") == b.get("destination") and a.get("filename") == b.get("filename")
