"""One provisioning run of a start (``start.sh``, ``start.sh --provision-only``, ``apply_config.sh``):
the config source, ComfyUI, the models, the nodes and the gate (docs/architecture.md, "The flow of a
start" and "The gate").

``python -m comfy_worker.provision [--force] [--update] [--dry-run] [--apply [--no-restart | --now]
[--max-wait S]]``; exit 0 when every required entry is ready, 1 when one failed (or, with --apply,
ComfyUI still had jobs after --max-wait and was not restarted), 2 for an invalid config or
environment variable. ``--dry-run`` lists what a run would do (dry_run.py); ``--apply`` restarts
ComfyUI when nodes changed, once its queue is empty (comfy_restart.py).

The warm path imports nothing heavy (no pydantic, yaml, git or huggingface_hub): beside the gate
(``.config-sha256``, the digest of ``config_schema.config_digest``) lies ``.config-sha256.json``,
which records the sha256 of the config text the digest was computed from (a CONFIG_YML decoded
first, so the same config in another encoding or on a volume mounted at another path finds it),
and what the run put on the volume (model files, node folders and commits). When the text is the
same and the gate still holds that digest, only local checks run: every recorded file and node folder exists,
the requirements records in the Python environment match. A missing model is fetched again alone
(``download_models.py --only``), a missing node or a fresh environment runs ``install_nodes.py``.
Any other source (a comment edited, another CONFIG_YML) is parsed and digested the ordinary way;
when that full check finds the gate matching and every recorded file there, it takes no lock (a
read-only volume starts) and rewrites the record for this source (best effort), so the next start
is fast again.

Many workers may share a volume: the work is done under ``$VOLUME_ROOT/.provision.lock``; a waiting
worker says so, and, once it holds the lock, finds the gate written and only checks.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from comfy_worker.exit_codes import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from comfy_worker.settings import Settings
from comfy_worker.state_files import GATE, GATE_RECORD, NODE_REQUIREMENTS_RECORD, NODE_STATE, PROVISION_LOCK

log = logging.getLogger(__spec__.name if __name__ == "__main__" else __name__)  # also under python -m


@dataclass
class Source:
    """Where the config comes from, its raw bytes, and the key of the warm record."""

    name: str  # "CONFIG_YML" or a path
    text: str
    path: Path | None  # the file the provisioning scripts get (--config)
    from_env: bool = False

    def key(self, settings: Settings) -> str:
        """The warm record's key: the config text itself (a CONFIG_YML decoded first) and COMFYUI_REF,
        so the same config read from another mount path, or base64-encoded another way (wrapped
        lines, URL-safe alphabet, no padding), finds the same record."""
        text = light_decode(self.text) if self.from_env else self.text
        raw = f"{text}\0{settings.comfyui_ref or ''}"
        return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")


def light_decode(value: str) -> str:
    """The YAML text of a CONFIG_YML value as ``config_schema.decode_config_env`` finds it for a valid
    config, without parsing YAML (the warm path imports nothing heavy): a YAML mapping always holds a
    ``:``, which base64 never does, so a value that is base64 once whitespace is dropped is decoded,
    any other value is the text itself. (An invalid value only gives a key no record has.)"""
    compact = re.sub(r"\s+", "", value)
    if _BASE64.fullmatch(compact):
        padded = compact.replace("-", "+").replace("_", "/") + "=" * (-len(compact) % 4)
        try:
            return base64.b64decode(padded, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            pass
    return value


@dataclass
class Summary:
    phases: list[tuple[str, float]] = field(default_factory=list)
    comfyui: str = ""
    models: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    config: object = None  # the WorkerConfig when this run parsed it (apply reuses it: parsed once)

    def line(self) -> str:
        def counts(d: dict[str, int]) -> str:
            shown = [f"{n} {word}" for word, n in d.items() if n]
            return ", ".join(shown) or "none"

        parts = [f"ComfyUI {self.comfyui}" if self.comfyui else None]
        parts += [f"models: {counts(self.models)}", f"nodes: {counts(self.nodes)}"]
        return "summary: " + "; ".join(p for p in parts if p)


class Phase:
    def __init__(self, summary: Summary, name: str):
        self.summary, self.name = summary, name

    def __enter__(self) -> Phase:
        self.start = time.monotonic()
        log.info("phase %s: started", self.name)
        return self

    def __exit__(self, *exc) -> None:
        took = time.monotonic() - self.start
        self.summary.phases.append((self.name, took))
        log.info("phase %s: %.2f s", self.name, took)


# ---- the config source (CONFIG_YML → $VOLUME_ROOT/config.yml → $APP_DIR/config.yml) ----


def read_source(settings: Settings) -> Source:
    """The raw config by precedence, without parsing it. Raises SourceError when there is none.
    On a pod without CONFIG_YML the baked ``$APP_DIR/config.yml`` is first copied onto the volume, so
    there is a ``config.yml`` to edit in Jupyter before running apply_config.sh."""
    if settings.config_yml is not None:
        return Source("CONFIG_YML", settings.config_yml, settings.volume_root / "config.yml", from_env=True)
    on_volume, baked = settings.volume_root / "config.yml", settings.app_dir / "config.yml"
    if settings.mode == "pod" and not on_volume.exists() and baked.is_file():
        from comfy_worker.lock_file import atomic_write_text

        atomic_write_text(on_volume, baked.read_text(encoding="utf-8"))
        log.info("copied %s to %s: edit it there (e.g. in Jupyter), then run apply_config.sh", baked, on_volume)
    for candidate in (settings.volume_root / "config.yml", settings.app_dir / "config.yml"):
        if candidate.is_file():
            try:
                return Source(str(candidate), candidate.read_text(encoding="utf-8"), candidate)
            except (OSError, UnicodeDecodeError) as err:
                raise SourceError(f"cannot read {candidate}: {err}") from None
    raise SourceError(f"no config found: set CONFIG_YML or create {settings.volume_root / 'config.yml'}")


class SourceError(Exception):
    pass


def volume_config(settings: Settings) -> str | None:
    try:
        return (settings.volume_root / "config.yml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_env_config(settings: Settings, text: str) -> Path:
    """The decoded CONFIG_YML goes to ``$VOLUME_ROOT/config.yml``; a different file there is kept as
    ``config.yml.bak`` first (one generation). Atomic."""
    from comfy_worker.lock_file import atomic_write_text

    dest = settings.volume_root / "config.yml"
    try:
        current = dest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current == text:
        return dest
    if current is not None or dest.exists():
        os.replace(dest, dest.with_name("config.yml.bak"))
        log.warning(
            "CONFIG_YML is set and differs from %s: CONFIG_YML wins, the file is kept as config.yml.bak "
            "(to edit the config on the volume instead, unset CONFIG_YML)",
            dest,
        )
    atomic_write_text(dest, text)
    return dest


def edited_under_config_yml(settings: Settings, source: Source) -> bool:
    """apply_config.sh on a box whose CONFIG_YML differs from the ``config.yml`` on the volume (edited
    in Jupyter): CONFIG_YML would win and replace the edits, so say so and stop (True)."""
    from comfy_worker.config_schema import ConfigError, decode_config_env

    path = settings.volume_root / "config.yml"
    try:
        differs = path.read_text(encoding="utf-8") != decode_config_env(source.text)
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError, ConfigError):
        differs = True
    if differs:
        log.error(
            "CONFIG_YML is set, so it, not %s, is this box's config: applying would replace your edits "
            "with it; unset CONFIG_YML (e.g. in the pod's settings) to apply the file, or change CONFIG_YML",
            path,
        )
    return differs


def load(settings: Settings, source: Source):
    """Parse the source (decoding CONFIG_YML); ConfigError names the source and each problem."""
    from comfy_worker.config_schema import decode_config_env, load_config_text

    if source.from_env:
        text = decode_config_env(source.text)
        cfg = load_config_text(text, "CONFIG_YML")
        return cfg, text
    return load_config_text(source.text, source.name), source.text


# ---- the gate and the warm record ----


def read_gate(settings: Settings) -> str | None:
    try:
        return (settings.volume_root / GATE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def read_record(settings: Settings) -> dict:
    try:
        data = json.loads((settings.volume_root / GATE_RECORD).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_gate(settings: Settings, digest: str, record: dict) -> bool:
    """The warm record first, the gate last (docs/architecture.md, "The gate"). Every entry is ready
    by now, so a gate that cannot be written (a full or read-only volume) fails no start: it is
    said, and the next start checks in full again."""
    from comfy_worker.lock_file import atomic_write_text

    try:
        atomic_write_text(settings.volume_root / GATE_RECORD, json.dumps({**record, "digest": digest}, indent=1))
        atomic_write_text(settings.volume_root / GATE, digest + "\n")
    except OSError as err:
        log.warning(
            "every entry is ready, but the gate %s cannot be written (%s): the next start checks in full again",
            settings.volume_root / GATE,
            err.strerror or err,
        )
        return False
    return True


def env_prefix(settings: Settings) -> Path:
    """sys.prefix of ``$PYTHON`` without starting it when it is ours or a venv's."""
    if not settings.python:
        return Path(sys.prefix)
    import shutil

    found = os.path.abspath(shutil.which(settings.python) or settings.python)
    if found == os.path.abspath(sys.executable):
        return Path(sys.prefix)
    if (Path(found).parent.parent / "pyvenv.cfg").is_file():  # as node_requirements.target_env decides
        return Path(found).parent.parent
    from comfy_worker.node_requirements import target_env

    return target_env(settings.python).prefix


def _node_record(prefix: Path) -> dict:
    try:
        data = json.loads((prefix / NODE_REQUIREMENTS_RECORD).read_text(encoding="utf-8"))
        return data.get("nodes", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _node_state_commit(folder: Path) -> str | None:
    try:
        return json.loads((folder / ".git" / NODE_STATE).read_text(encoding="utf-8")).get("commit")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Check:
    missing_models: list[dict]
    nodes_stale: list[str]
    comfyui_ok: bool

    @property
    def ok(self) -> bool:
        return not self.missing_models and not self.nodes_stale and self.comfyui_ok


def local_check(settings: Settings, record: dict) -> Check:
    """Only files: every recorded model file and node folder is there, and the Python environment
    holds the recorded requirements (no network, git or pip)."""
    from comfy_worker.comfyui_checkout import is_checkout, requirements_current

    prefix = env_prefix(settings)
    missing = [m for m in record.get("models", []) if not (settings.models_dir / m["path"]).is_file()]
    installed = _node_record(prefix)
    stale = []
    for node in record.get("nodes", []):
        folder = settings.custom_nodes_dir / node["dir"]
        has_reqs = any((folder / f).is_file() for f in ("requirements.txt", "install.py"))
        if _node_state_commit(folder) != node["commit"] or (
            node.get("requirements", True) and has_reqs and installed.get(str(folder.absolute())) != node["commit"]
        ):
            stale.append(node["dir"])
    comfy_ok = is_checkout(settings.comfyui_path) and requirements_current(settings.comfyui_path, prefix)
    return Check(missing, stale, comfy_ok)


# ---- running the provisioning scripts ----


def _python(settings: Settings) -> str:
    return sys.executable


def run_script(settings: Settings, script: str, args: list[str], stop: threading.Event) -> int:
    """``script`` of APP_DIR as a child (its output goes straight to ours); SIGTERM is passed on within
    0.1 s (the scripts stop within a second or two: downloads keep their .part), SIGKILL after 20 s.
    Not started at all once ``stop`` is set (volume_lock.Interrupted)."""
    _check_stop(stop, f"before {script}")
    cmd = [_python(settings), str(settings.app_dir / script), *args]
    proc = subprocess.Popen(cmd, cwd=settings.app_dir)
    while True:
        try:
            return proc.wait(0.1)
        except subprocess.TimeoutExpired:
            if stop.is_set():
                proc.terminate()
                try:
                    return proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()


def _check_stop(stop: threading.Event, where: str) -> None:
    """Between phases: a SIGTERM ends the run here (no further phase, no gate)."""
    if stop.is_set():
        from comfy_worker.volume_lock import Interrupted

        raise Interrupted(f"SIGTERM received; the run ends {where}, the gate is not written")


def _lock_models(settings: Settings) -> list[dict]:
    from comfy_worker.lock_file import read_lock_file

    return [m for m in read_lock_file(settings.lock_file).get("models") or [] if isinstance(m, dict)]


def _lock_nodes(settings: Settings) -> list[dict]:
    from comfy_worker.lock_file import read_lock_file

    return [n for n in read_lock_file(settings.lock_file).get("nodes") or [] if isinstance(n, dict)]


def model_paths(settings: Settings, cfg) -> dict[str, str]:
    """entry url -> path under models/ (the lock file's record when there is one: CivitAI names)."""
    recorded = {(m.get("url"), m.get("destination")): m.get("filename") for m in _lock_models(settings)}
    out = {}
    for e in cfg.models:
        name = recorded.get((e.url, e.destination))
        out[e.url] = f"{e.destination}/{name}" if name else e.planned_path()
    return out


def provision_models(
    settings, cfg, config_path: Path, stop, summary: Summary, only: list[str] | None = None, force: bool = False
) -> int:
    """download_models.py (which also links Hugging Face files found in a hub cache on the host); the
    summary counts each entry as kept, fetched, linked from cache or failed, by what lies on the volume.
    ``force`` (``--force``): every present file is hashed against its sha256 and replaced when it differs."""
    from comfy_worker.hf_cache import is_linked_from

    paths = model_paths(settings, cfg)
    before = {u for u, p in paths.items() if (settings.models_dir / p).is_file()}
    todo = [e.url for e in cfg.models if only is None or e.url in only]
    rc = EXIT_OK
    if todo:
        args = ["--config", str(config_path)]
        if only is not None:
            args += ["--only", *todo]
        if force:
            args.append("--force")
        rc = run_script(settings, "download_models.py", args, stop)
    after_paths = model_paths(settings, cfg)
    for e in cfg.models:
        target = settings.models_dir / after_paths[e.url]
        present = target.is_file()
        if present and e.url in before:
            word = "kept"
        elif present and is_linked_from(target, settings.hf_cache_dirs):
            word = "linked from cache"
        else:
            word = "fetched" if present else "failed"
        summary.models[word] = summary.models.get(word, 0) + 1
        if word == "failed" and not e.optional:
            summary.failed.append(after_paths[e.url])
    return rc


def node_changes(before: dict[str, str | None], after: dict[str, str | None]) -> list[str]:
    """What moved between two ``{name: commit}`` of comfy.lock.yml, one phrase per node."""
    changes = []
    for name, commit in after.items():
        if name not in before:
            changes.append(f"{name} added at {(commit or '?')[:12]}")
        elif before[name] != commit:
            changes.append(f"{name} {(before[name] or '?')[:12]} -> {(commit or '?')[:12]}")
    changes += [f"{name} removed" for name in before if name not in after]
    return changes


def provision_nodes(
    settings, config_path: Path, stop, summary: Summary, flags: list[str] = ()
) -> tuple[int, list[str]]:
    """install_nodes.py (``flags``: --force, --update); its exit code and what moved (a node folder
    moved: ComfyUI must restart)."""
    before = {n.get("name"): n.get("version") for n in _lock_nodes(settings)}
    rc = run_script(settings, "install_nodes.py", ["--config", str(config_path), *flags], stop)
    after = {n.get("name"): n.get("version") for n in _lock_nodes(settings)}
    changed = node_changes(before, after)
    summary.nodes["installed"] = len([n for n in after if before.get(n) != after[n]])
    summary.nodes["kept"] = len([n for n in after if before.get(n) == after[n]])
    if rc != EXIT_OK:
        summary.nodes["failed"] = max(1, summary.nodes.get("failed", 0))
    return rc, changed


def build_record(settings: Settings, cfg, source: Source) -> dict:
    paths = model_paths(settings, cfg)
    by_name = {n.get("name"): n for n in _lock_nodes(settings)}
    nodes = []
    for e in cfg.nodes:
        rec = by_name.get(e.dir_name())
        if rec and rec.get("version"):
            nodes.append({"dir": e.dir_name(), "commit": rec["version"], "requirements": e.requirements})
    models = [
        {"url": e.url, "path": paths[e.url]} for e in cfg.models if (settings.models_dir / paths[e.url]).is_file()
    ]
    return {"source": source.key(settings), "models": models, "nodes": nodes}


# ---- the run ----


@dataclass
class Options:
    force: bool = False
    dry_run: bool = False
    apply: bool = False
    restart: bool = True
    update: bool = False  # resolve latest, nightly and branch nodes again
    now: bool = False  # restart ComfyUI without waiting for its jobs
    max_wait: float = 900.0  # seconds a restart waits for ComfyUI's jobs to end
    prune: bool = False  # remove recorded model files no config entry names any more


def refresh_record(settings: Settings, record: dict, source: Source) -> None:
    """A full check found the gate matching for a source the record does not name (the same config
    from another mount path or another encoding, or a record of an older version): the record is
    keyed to this source, so the next start takes the fast path again. Never fails the start: a
    record that cannot be written (a read-only volume) costs later starts the full check, no more."""
    key = source.key(settings)
    if record.get("source") == key:
        return
    from comfy_worker.lock_file import atomic_write_text

    path = settings.volume_root / GATE_RECORD
    try:
        atomic_write_text(path, json.dumps({**record, "source": key}, indent=1))
    except OSError as err:
        log.warning(
            "cannot refresh the warm record %s (%s): this start goes on, but each later start with this "
            "config checks it in full (about 0.5 s more) until the record can be written",
            path,
            err.strerror or err,
        )
        return
    log.info("warm record refreshed for this config source: later starts take the fast path")


def edited_since(settings: Settings, source: Source) -> bool:
    """A set CONFIG_YML and a volume config.yml that differs from it (edited in Jupyter since): the full
    check runs, which puts CONFIG_YML there and keeps the edited file as .bak, with a warning."""
    return source.from_env and volume_config(settings) != light_decode(source.text)


def warm(
    settings: Settings, source: Source, record: dict, stop, summary: Summary, check_only: bool = False
) -> int | None:
    """The gate matches: local checks, and only what is missing is provisioned again (not with
    ``check_only``). None when the record is unusable or, with ``check_only``, when something is
    missing (the cold path runs then)."""
    with Phase(summary, "local checks"):
        check = local_check(settings, record)
    summary.comfyui = "kept"
    if check.ok:
        summary.models["kept"] = len(record.get("models", []))
        summary.nodes["kept"] = len(record.get("nodes", []))
        log.info("gate matches (%s): nothing to do", GATE)
        refresh_record(settings, record, source)
        return EXIT_OK
    if check_only or not check.comfyui_ok:
        return None
    cfg, _ = load(settings, source)
    summary.config = cfg
    config_path = source.path
    rc = EXIT_OK
    if check.missing_models:
        with Phase(summary, "models (missing ones)"):
            names = [m["path"] for m in check.missing_models]
            log.info("gate matches but %d model file(s) are missing: %s", len(names), ", ".join(names))
            rc = max(
                rc,
                provision_models(settings, cfg, config_path, stop, summary, [m["url"] for m in check.missing_models]),
            )
    else:
        summary.models["kept"] = len(record.get("models", []))
    _check_stop(stop, "after the models")
    if check.nodes_stale:
        with Phase(summary, "nodes"):
            log.info("node(s) to reinstall: %s", ", ".join(check.nodes_stale))
            rc = max(rc, provision_nodes(settings, config_path, stop, summary)[0])
    else:
        summary.nodes["kept"] = len(record.get("nodes", []))
    _check_stop(stop, "after the nodes")
    if rc == EXIT_OK:
        write_gate(settings, record["digest"], build_record(settings, cfg, source))
    return rc


def cold(settings: Settings, source: Source, opts: Options, stop, summary: Summary) -> tuple[int, list[str]]:
    """Under the volume lock: ComfyUI, models, nodes, then the gate. (exit code, node changes)."""
    from comfy_worker import comfyui_checkout
    from comfy_worker.config_schema import config_digest

    cfg, text = load(settings, source)
    summary.config = cfg
    ref = settings.effective_comfyui_ref(cfg.comfyui.ref)
    digest = config_digest(cfg, ref)
    if opts.dry_run:
        from comfy_worker import dry_run
        from comfy_worker.comfy_restart import due

        log.info("dry run: config %s, ComfyUI %s; nothing is changed", source.name, ref)
        gate_ok = read_gate(settings) == digest
        return dry_run.show(settings, cfg, text, ref, gate_ok, opts, stop, due(settings)), []
    from comfy_worker.volume_lock import acquire

    def gate_matches(record: dict) -> bool:
        return (
            not opts.force
            and not opts.update
            and not settings.comfyui_update
            and read_gate(settings) == digest
            and record.get("digest") == digest
        )

    record = read_record(settings)
    if gate_matches(record) and not (source.from_env and volume_config(settings) != text):
        # nothing to write when every file is there: no lock (which a read-only volume cannot take)
        log.info("this volume is provisioned for this config (gate matches): only local checks")
        if warm(settings, source, record, stop, summary, check_only=True) is not None:
            return EXIT_OK, []
    settings.volume_root.mkdir(parents=True, exist_ok=True)
    lock = acquire(settings.volume_root / PROVISION_LOCK, "another worker provisioning this volume", stop)
    try:
        if source.from_env:
            source.path = write_env_config(settings, text)
        record = read_record(settings)
        if gate_matches(record):
            log.info("this volume is provisioned for this config (gate matches): only local checks")
            result = warm(settings, source, record, stop, summary)
            if result is not None:
                return result, []
        with Phase(summary, "comfyui"):
            result, release = provision_comfyui(settings, ref, opts.update)
            reqs = comfyui_checkout.install_requirements(settings)
            shown = f"{(result.commit or '?')[:12]}" + (f" ({release})" if release else "")
            summary.comfyui = f"{result.action} {shown}, requirements {reqs}"
        _check_stop(stop, "after ComfyUI")
        with Phase(summary, "models"):
            rc_models = provision_models(settings, cfg, source.path, stop, summary, force=opts.force)
        _check_stop(stop, "after the models")
        with Phase(summary, "nodes"):
            flags = [*(["--force"] if opts.force else []), *(["--update"] if opts.update else [])]
            rc_nodes, changed = provision_nodes(settings, source.path, stop, summary, flags)
        _check_stop(stop, "after the nodes")
        rc = max(rc_models, rc_nodes)
        if result.action == "updated":  # a running ComfyUI must restart to run the new one
            changed = [f"ComfyUI moved to {shown}", *changed]
        if rc == EXIT_OK:
            if write_gate(settings, digest, build_record(settings, cfg, source)):
                log.info("gate written (%s)", GATE)
        else:
            log.error("not every required entry is ready: the gate is not written; the next start retries")
        return rc, changed
    finally:
        lock.release()


def provision_comfyui(settings: Settings, ref: str, update: bool):
    """ComfyUI at ``ref`` (comfyui_checkout.ensure) and its record in comfy.lock.yml; (the checkout
    result, the release ``latest`` stands for or None). ``latest`` is the release the lock file
    records, looked up again (and the checkout moved there) only with ``update``; the lock records
    that tag while the checkout is at it, else the commit, as for any other ref."""
    from comfy_worker import comfyui_checkout
    from comfy_worker.lock_file import read_lock_file, update_lock_file

    locked = read_lock_file(settings.lock_file).get("comfyui") if ref == comfyui_checkout.LATEST else None
    target, release = comfyui_checkout.resolve_ref(settings, ref, locked, update)
    result = comfyui_checkout.ensure(settings, target, move=release is not None and update)
    if release is not None and not result.at_ref:
        release = None  # a kept checkout elsewhere (ensure said so): the lock records where it is
    update_lock_file(settings.lock_file, "comfyui", {"ref": release or result.commit})
    return result, release


def apply_restart(settings: Settings, opts: Options, changed: list[str], stop: threading.Event) -> int:
    """apply_config.sh after provisioning: restart ComfyUI when nodes changed (or a restart is still
    due from an earlier run), once its jobs are done (comfy_restart.py) unless ``--now``."""
    from comfy_worker import comfy_restart

    earlier = comfy_restart.due(settings)
    if not changed and not earlier:
        log.info("no node changed: ComfyUI keeps running")
        return EXIT_OK
    what = "; ".join(changed + ([f"still due from an earlier run: {earlier}"] if earlier else []))
    if changed:
        comfy_restart.mark_due(settings, "; ".join(changed + ([earlier] if earlier else [])))
    if not opts.restart:
        log.warning("nodes changed (%s): restart ComfyUI to load them (--no-restart given)", what)
        return EXIT_OK
    if not comfy_restart.supervisor_running(settings):
        log.warning("nodes changed (%s) but no running worker was found to restart ComfyUI", what)
        return EXIT_OK
    if opts.now:
        state = comfy_restart.queue_state(settings)
        if state and state[0]:
            log.warning("--now: ComfyUI is restarted at once; its running prompt(s) %s fail", ", ".join(state[0]))
    else:
        try:
            idle = comfy_restart.wait_until_idle(settings, opts.max_wait, stop)
        except KeyboardInterrupt:
            idle = False
        if not idle:
            log.error(
                "ComfyUI was NOT restarted, so the changed nodes (%s) are not loaded yet: run apply_config.sh "
                "again once it is idle (it restarts ComfyUI then), or apply_config.sh --now to restart it at once "
                "(its running job then fails)",
                what,
            )
            return EXIT_FAILED
    old_pid = comfy_restart.comfy_pid(settings)
    if not comfy_restart.request_restart(settings):
        log.warning("nodes changed (%s) but no running worker was found to restart ComfyUI", what)
        return EXIT_OK
    log.info("nodes changed (%s): ComfyUI is being restarted", what)
    return report_restarted(settings, old_pid, stop)


def report_restarted(settings: Settings, old_pid: int | None, stop: threading.Event) -> int:
    """Wait until the restarted ComfyUI answers, then name the custom nodes it failed to import."""
    from comfy_worker import comfy_restart

    started = time.monotonic()
    if not comfy_restart.wait_back(settings, old_pid, stop):
        log.error(
            "ComfyUI did not answer again within %g s (COMFY_READY_TIMEOUT) after the restart: its log %s says why",
            settings.comfy_ready_timeout,
            settings.comfy_log_file,
        )
        return EXIT_FAILED
    failed = comfy_restart.failed_imports(settings)
    for folder in failed:
        log.error(
            "custom node %s failed to import in ComfyUI: its nodes are missing; the reason is in %s",
            folder,
            settings.comfy_log_file,
        )
    if failed:
        return EXIT_FAILED
    log.info("ComfyUI answers again (%.1f s) with every custom node imported", time.monotonic() - started)
    return EXIT_OK


def run(settings: Settings, opts: Options, stop: threading.Event) -> int:
    from comfy_worker.volume_lock import Interrupted, LockError

    summary = Summary()
    started = time.monotonic()
    try:
        source = read_source(settings)
    except SourceError as err:
        log.error("%s", err)
        return EXIT_INVALID
    log.info("config from %s; volume %s; mode %s", source.name, settings.volume_root, settings.mode)
    if opts.apply and source.from_env and edited_under_config_yml(settings, source):
        return EXIT_INVALID
    rc, changed = EXIT_OK, []
    try:
        record = read_record(settings)
        gate = read_gate(settings)
        fast = (
            not opts.force
            and not opts.update
            and not opts.dry_run
            and not settings.comfyui_update  # COMFYUI_UPDATE=1: ComfyUI is brought to its ref on every start
            and gate is not None
            and record.get("digest") == gate
            and record.get("source") == source.key(settings)
            and not edited_since(settings, source)
        )
        result = warm(settings, source, record, stop, summary) if fast else None
        if result is None:
            rc, changed = cold(settings, source, opts, stop, summary)
        else:
            rc = result
    except Exception as err:  # noqa: BLE001 - every failure becomes one readable line and an exit code
        from comfy_worker.comfyui_checkout import CheckoutError
        from comfy_worker.config_schema import ConfigError

        if isinstance(err, ConfigError):
            log.error("%s is invalid (%d problem(s)):", err.source, err.total)
            for problem in err.problems:
                log.error("  %s", problem)
            return EXIT_INVALID
        if isinstance(err, (CheckoutError, LockError)):
            log.error("%s", err)
            rc = EXIT_FAILED
        elif isinstance(err, Interrupted):
            log.error("stopped: %s", err)
            return EXIT_FAILED
        else:
            raise
    if opts.dry_run:
        return rc
    if summary.failed:
        log.error("failed required model(s): %s", ", ".join(summary.failed))
    print(f"{summary.line()} ({time.monotonic() - started:.2f} s)", flush=True)
    if opts.apply:
        report_unnamed_models(settings, source, opts.prune, summary.config)
        rc = max(rc, apply_restart(settings, opts, changed, stop))
    return rc


def report_unnamed_models(settings: Settings, source: Source, prune: bool, cfg=None) -> None:
    """apply_config.sh: the model files a removed entry left (model_prune.py); ``--prune`` removes them.
    ``cfg``: the config the run parsed; parsed here only when the run did not (a warm start)."""
    from comfy_worker import model_prune
    from comfy_worker.config_schema import ConfigError

    if cfg is None:
        try:
            cfg, _ = load(settings, source)
        except (ConfigError, OSError):
            return  # already reported by the run
    model_prune.report_or_prune(settings, cfg, prune)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds (e.g. 600)")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Provision ComfyUI, the models and the nodes of config.yml.")
    parser.add_argument("--force", action="store_true", help="ignore the gate: check every entry again")
    parser.add_argument("--dry-run", action="store_true", help="say what the config asks for, change nothing")
    parser.add_argument("--apply", action="store_true", help="a running box: restart ComfyUI when nodes changed")
    parser.add_argument("--no-restart", action="store_true", help="with --apply: never restart ComfyUI")
    parser.add_argument(
        "--now", action="store_true", help="with --apply: restart ComfyUI at once, without waiting for its jobs"
    )
    parser.add_argument(
        "--max-wait",
        type=_seconds,
        default=Options.max_wait,
        metavar="SECONDS",
        help=f"with --apply: wait at most this long for ComfyUI's jobs before a restart (default {Options.max_wait:g})",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="resolve latest, nightly and branch nodes (and comfyui.ref latest) again and move them",
    )
    parser.add_argument(
        "--prune", action="store_true", help="with --apply: remove model files no config entry names any more"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [start] %(message)s", datefmt="%H:%M:%S")
    try:
        settings = Settings.from_env()
    except ValueError as err:
        log.error("%s", err)
        return EXIT_INVALID
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    opts = Options(
        force=args.force,
        dry_run=args.dry_run,
        apply=args.apply,
        restart=not args.no_restart,
        update=args.update,
        now=args.now,
        max_wait=args.max_wait,
        prune=args.prune,
    )
    return run(settings, opts, stop)


if __name__ == "__main__":
    sys.exit(main())
