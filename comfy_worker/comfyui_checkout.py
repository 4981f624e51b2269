"""ComfyUI itself on the volume: cloned at its ref when absent, moved to the ref on COMFYUI_UPDATE=1,
its requirements installed with torch, torchvision and torchaudio pinned (docs/architecture.md,
"The flow of a start").

- A clone goes into a temporary folder beside ``COMFYUI_PATH`` and is renamed into place when it is
  complete, so a killed clone never looks like a checkout. When ``COMFYUI_PATH`` already exists
  without a checkout (a user put models or outputs there first), the finished clone's entries are
  moved in beside what is there (nothing existing is replaced) and ``.git`` goes last: a folder is a
  checkout only once its ``.git`` is there. A clone a killed start left behind
  (``.<name>.partial-*`` beside ``COMFYUI_PATH``) is removed by the next ``ensure``, which runs under
  the provisioning lock, so no live process is writing it.
- ``output/``, ``input/`` and ``user/`` are never deleted: git checkout leaves untracked and ignored
  files alone, and nothing here removes a file of the checkout.
- ``latest`` (comfyui.ref or COMFYUI_REF) is the newest release tag of ``COMFYUI_REPO`` (``vX.Y.Z``, no
  pre-release), looked up once: comfy.lock.yml records the tag (``comfyui: {ref: vX.Y.Z}``), later
  starts keep it, and only ``apply_config.sh --update`` (provision ``--update``) looks again and
  moves the checkout to a newer release (resolve_ref). A warm start reads neither the lock nor git.
- ComfyUI's requirements are installed into the environment of ``$PYTHON`` (uv when found, else pip)
  with a constraints file pinning the installed torch trio. What was installed is recorded inside
  that environment (``<prefix>/comfy-worker-comfyui-requirements.json``: the requirements file's
  sha256), so a warm start only compares two hashes and a fresh container installs them again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comfy_worker.log_setup import safe_url
from comfy_worker.state_files import COMFYUI_REQUIREMENTS_RECORD

log = logging.getLogger(__name__)

LATEST = "latest"  # comfyui.ref: the newest release tag, resolved at provisioning and locked
RELEASE_TAG_RE = re.compile(r"^v\d+\.\d+\.\d+$")  # ComfyUI's release tags (v0.3.75); nothing else is a release


class CheckoutError(Exception):
    """ComfyUI could not be cloned, moved or set up: one readable sentence."""


@dataclass
class CheckoutResult:
    action: str  # "cloned", "updated", "kept"
    commit: str | None
    at_ref: bool = True  # False: a kept checkout that is not at the ref it was asked for


def newest_release(settings) -> str:
    """The newest release tag (``vX.Y.Z``, no pre-release) of ``settings.comfyui_repo`` (git ls-remote)."""
    from comfy_worker import git_versions

    try:
        refs = git_versions.ls_remote(settings.comfyui_repo, settings.github_token)
    except git_versions.VersionError as err:
        raise CheckoutError(f"ComfyUI ref 'latest': {err}; check COMFYUI_REPO") from None
    tag = git_versions.newest_release_tag([t for t in refs.tags if RELEASE_TAG_RE.match(t)])
    if tag is None:
        raise CheckoutError(
            f"ComfyUI ref 'latest': {safe_url(str(settings.comfyui_repo))} has no release tag "
            "(vX.Y.Z); set comfyui.ref in config.yml (or COMFYUI_REF) to a tag, branch or commit"
        )
    return tag


def locked_release(section: object) -> str | None:
    """The release tag comfy.lock.yml's ``comfyui`` section records for ``latest`` (other refs are
    recorded as a commit, which is no release tag)."""
    ref = section.get("ref") if isinstance(section, dict) else None
    return ref if isinstance(ref, str) and RELEASE_TAG_RE.match(ref) else None


def resolve_ref(settings, ref: str, locked: object, update: bool) -> tuple[str, str | None]:
    """The ref to check out, and the release ``latest`` stands for (None for any other ref): the one
    comfy.lock.yml records (``locked``: its ``comfyui`` section), else, and always with ``update``
    (apply_config.sh --update), the newest release of COMFYUI_REPO."""
    if ref != LATEST:
        return ref, None
    tag = None if update else locked_release(locked)
    if tag:
        log.info("ComfyUI 'latest' is %s, as comfy.lock.yml records (apply_config.sh --update looks again)", tag)
        return tag, tag
    tag = newest_release(settings)
    log.info("ComfyUI 'latest': the newest release of COMFYUI_REPO is %s", tag)
    return tag, tag


def partial_prefix(dest: Path) -> str:
    """The name prefix of the temporary folders a clone of ``dest`` is made in (beside ``dest``)."""
    return f".{dest.name}.partial-"


def cleanup_partials(dest: Path) -> None:
    """Remove clones of ``dest`` left behind by a killed start. Only ever called under the provisioning
    lock (volume_lock): every clone is made under it, so none of these is being written."""
    for stale in dest.parent.glob(glob.escape(partial_prefix(dest)) + "*"):
        if stale.is_dir() and not stale.is_symlink():
            log.info("removing %s, a ComfyUI clone left behind by a killed start", stale)
            shutil.rmtree(stale, ignore_errors=True)


def is_checkout(path: Path) -> bool:
    return (path / ".git").exists() and (path / "main.py").is_file()


def _resolve(repo, ref: str) -> str | None:
    from comfy_worker.git_versions import has_commit

    for candidate in (ref, f"origin/{ref}", f"refs/tags/{ref}"):
        sha = has_commit(repo, candidate)
        if sha:
            return sha
    return None


def _move_into(src: Path, dest: Path) -> None:
    """Move every entry of ``src`` into ``dest`` unless ``dest`` has it already (folders merged)."""
    for child in sorted(src.iterdir(), key=lambda p: p.name == ".git"):  # .git last
        target = dest / child.name
        if target.is_dir() and child.is_dir() and not child.is_symlink():
            _move_into(child, target)
        elif not target.exists() and not target.is_symlink():
            os.replace(child, target)


def clone(settings, ref: str) -> str:
    """Clone ``settings.comfyui_repo`` at ``ref`` into ``settings.comfyui_path``; the commit."""
    from comfy_worker import git_versions

    dest = settings.comfyui_path
    if dest.exists() and not dest.is_dir():
        raise CheckoutError(f"COMFYUI_PATH {dest} is a file, not a folder: move it away or set COMFYUI_PATH elsewhere")
    if (dest / ".git").exists() or (dest / ".git").is_symlink():
        raise CheckoutError(
            f"COMFYUI_PATH {dest} holds a .git but no ComfyUI checkout (no main.py): it is another repository "
            "or a broken checkout; nothing was changed there. Move it away (keep your output/, input/, user/), "
            "or set COMFYUI_PATH to another folder"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(dest), dir=dest.parent))
    try:
        repo = git_versions.clone(settings.comfyui_repo, tmp / "ComfyUI", settings.github_token)
        commit = _resolve(repo, ref)
        if commit is None:
            raise CheckoutError(
                f"ComfyUI ref {ref!r} is not a tag, branch or commit of {settings.comfyui_repo}; "
                "fix comfyui.ref in config.yml or COMFYUI_REF"
            )
        git_versions.checkout(repo, commit, settings.comfyui_repo, settings.github_token)
        repo.close()
        work = tmp / "ComfyUI"
        if dest.exists():
            log.info("%s exists without a checkout: adding ComfyUI beside its files (none replaced)", dest)
            _move_into(work, dest)
        else:
            os.replace(work, dest)
        return commit
    except git_versions.VersionError as err:
        raise CheckoutError(f"ComfyUI: {err}; check COMFYUI_REPO and COMFYUI_REF") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def update(settings, ref: str) -> str:
    """Move the existing checkout to ``ref`` (COMFYUI_UPDATE=1); local edits are stashed, never lost."""
    from comfy_worker import git_versions

    path = settings.comfyui_path
    try:
        repo = git_versions.open_repo(path)
        commit = _resolve(repo, ref) if len(ref) == 40 else None
        if commit is None:
            git_versions.fetch(repo, settings.comfyui_repo, settings.github_token, ref if len(ref) == 40 else None)
            commit = _resolve(repo, ref)
        if commit is None:
            raise CheckoutError(f"ComfyUI ref {ref!r} is not in {settings.comfyui_repo}; fix COMFYUI_REF")
        if git_versions.read_head(path) != commit:
            if git_versions.local_edits(repo):
                log.warning("ComfyUI: %s", git_versions.stash_local_edits(repo, path, f"comfy-worker before {ref}"))
            git_versions.checkout(repo, commit, settings.comfyui_repo, settings.github_token)
        return commit
    except (git_versions.VersionError, git_versions.LocalEditsError) as err:
        raise CheckoutError(f"ComfyUI update to {ref}: {err}") from None


def ensure(settings, ref: str, move: bool = False) -> CheckoutResult:
    """ComfyUI at ``settings.comfyui_path``: cloned when absent, moved to ``ref`` on ``COMFYUI_UPDATE=1``
    or ``move`` (``latest`` under apply_config.sh --update). Called under the provisioning lock only
    (provision.py): it removes clones a killed start left."""
    from comfy_worker.git_versions import read_head

    path = settings.comfyui_path
    cleanup_partials(path)
    if not is_checkout(path):
        log.info("cloning ComfyUI %s from %s into %s", ref, settings.comfyui_repo, path)
        return CheckoutResult("cloned", clone(settings, ref))
    if settings.comfyui_update or move:
        before = read_head(path)
        commit = update(settings, ref)
        return CheckoutResult("updated" if commit != before else "kept", commit)
    head = read_head(path)
    return CheckoutResult("kept", head, _say_when_elsewhere(path, ref, head))


def _say_when_elsewhere(path: Path, ref: str, head: str | None) -> bool:
    """An existing checkout is never moved without COMFYUI_UPDATE=1; say so when it is not at the ref
    (as far as the local repo knows the ref: no network here). False when it is elsewhere."""
    from comfy_worker import git_versions

    try:
        repo = git_versions.open_repo(path)
        try:
            wanted = _resolve(repo, ref)
        finally:
            repo.close()
    except Exception:  # noqa: BLE001 - only a hint: the checkout is kept either way
        return True
    if wanted is not None and wanted != head:
        log.warning(
            "ComfyUI at %s is at %s, not at %s (%s): it is kept as it is; set COMFYUI_UPDATE=1 to move it",
            path,
            (head or "?")[:12],
            ref,
            wanted[:12],
        )
        return False
    return True


# ---- ComfyUI's requirements, torch pinned ----


def requirements_digest(comfyui_path: Path) -> str | None:
    try:
        return hashlib.sha256((comfyui_path / "requirements.txt").read_bytes()).hexdigest()
    except OSError:
        return None


def record_path(prefix: Path) -> Path:
    return prefix / COMFYUI_REQUIREMENTS_RECORD


def requirements_current(comfyui_path: Path, prefix: Path) -> bool:
    """Were exactly these requirements installed into the environment at ``prefix``? (no process)"""
    digest = requirements_digest(comfyui_path)
    if digest is None:
        return True
    try:
        return json.loads(record_path(prefix).read_text(encoding="utf-8")).get("sha256") == digest
    except (OSError, ValueError, AttributeError):
        return False


def install_requirements(settings) -> str:
    """Install ComfyUI's requirements.txt with the torch trio pinned; "installed" or "present"."""
    from comfy_worker import node_requirements as nr

    env = nr.target_env(settings.python)
    if requirements_current(settings.comfyui_path, env.prefix):
        return "present"
    req = settings.comfyui_path / "requirements.txt"
    pinned = nr.protected_versions(env)
    with tempfile.TemporaryDirectory(prefix="comfyui-constraints-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(nr.constraints_text(pinned))
        cmd = nr.install_command(env, nr.find_uv(env, settings.nodes_installer), constraints, [req])
        log.info("installing ComfyUI's requirements (%s pinned)", ", ".join(f"{k}=={v}" for k, v in pinned.items()))
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=nr.child_env(nr.cache_env(settings.node_package_cache))
        )
    if proc.returncode != 0:
        tail = " / ".join(ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()[-6:] if ln.strip())
        raise CheckoutError(
            f"ComfyUI's requirements ({req}) could not be installed with {', '.join(pinned) or 'torch'} pinned: {tail}"
        )
    if nr.protected_versions(env) != pinned:
        raise CheckoutError(f"installing {req} changed torch ({pinned} before); reinstall the pinned versions")
    from comfy_worker.lock_file import atomic_write_text

    atomic_write_text(record_path(env.prefix), json.dumps({"sha256": requirements_digest(settings.comfyui_path)}))
    return "installed"
