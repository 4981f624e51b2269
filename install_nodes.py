#!/usr/bin/env python3
"""Install the custom nodes listed in config.yml (docs/nodes.md).

Each node is a git checkout in ``custom_nodes/<name>`` at the commit its ``version`` resolves to
(see git_versions.py), submodules included; its requirements go into the environment ComfyUI runs
in without ever replacing torch (see node_requirements.py); ``$VOLUME_ROOT/comfy.lock.yml`` gets the
resolved commit of every node. docs/nodes.md explains the rules.

A warm run (nothing changed) reads a small state file per node (``.git/comfy-worker-node.json``:
the config entry it was installed for and the commit) and the checked-out HEAD from files: no git
process, no network. SIGTERM stops the run promptly: it sets ``Context.stop``, which ends the lock
wait and every git, pip and install.py process (and what they started).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:
    from filelock import FileLock

    from comfy_worker import git_versions, node_requirements, volume_lock
    from comfy_worker.cli import (
        add_common_args,
        format_table,
        run_parallel,
        settings_and_config,
        status_word,
    )
    from comfy_worker.config_schema import NodeEntry, WorkerConfig
    from comfy_worker.exit_codes import EXIT_FAILED, EXIT_OK
    from comfy_worker.lock_file import atomic_write_text, read_lock_file, update_lock_file
    from comfy_worker.log_setup import setup_logging
    from comfy_worker.settings import Settings
    from comfy_worker.state_files import NODE_STATE
    from comfy_worker.volume_lock import Interrupted, LockError
except ModuleNotFoundError as missing:  # started with a Python that lacks the project's packages
    from comfy_worker.project_python import run_again

    run_again(missing)

log = logging.getLogger(__name__)

RUN_LOCK = ".install_nodes.lock"  # in custom_nodes (ComfyUI ignores files that are not .py)
CLONE = "clone"
MOVE = "move"
KEEP = "keep"
# --update resolves these again (a tag too: one moved upstream is followed); commits are fixed
UPDATE_KINDS = (*git_versions.MOVING_KINDS, "tag")
LOCK_WAIT_TIMEOUT = 7200.0  # seconds a run waits for another one on the volume (each step of that run is bounded)


class NodeError(Exception):
    """A node that cannot be installed; the message names the folder and the fix."""


@dataclass
class NodeResult:
    index: int
    entry: NodeEntry
    path: Path
    action: str = ""
    commit: str | None = None
    described: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    changed: bool = False  # the checkout moved (or was created) in this run
    checked_out: bool = False  # the folder holds ``commit``, submodules included (for the lock file)
    requirements: str = "-"

    @property
    def label(self) -> str:
        return f"nodes[{self.index}] {self.entry.dir_name()}"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Context:
    custom_nodes: Path
    token: str | None
    dry_run: bool = False
    force: bool = False
    update: bool = False
    stop: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM


# ---- per-node state (what this folder was installed for) ----


def state_path(node_dir: Path) -> Path | None:
    gdir = git_versions.git_dir(node_dir)
    return gdir / NODE_STATE if gdir else None


def read_state(node_dir: Path) -> dict | None:
    path = state_path(node_dir)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(node_dir: Path, entry: NodeEntry, commit: str, kind: str, described: str) -> None:
    """Written only once a checkout is complete (submodules included): ``commit`` is what a later
    run trusts without looking."""
    state = {"url": entry.url, "version": entry.version, "commit": commit, "kind": kind, "described": described}
    atomic_write_text(state_path(node_dir), json.dumps(state, indent=1))


def write_pending_state(node_dir: Path, entry: NodeEntry, resolved: git_versions.Resolved, commit: str) -> None:
    """Before a checkout starts: nothing is claimed as complete (a crash half-way is redone by the
    next run), but the target is kept so that run needs no network for the same config entry."""
    state = {
        "url": entry.url,
        "version": entry.version,
        "commit": None,
        "moving_to": commit,
        "kind": resolved.kind,
        "described": resolved.describe(),
    }
    atomic_write_text(state_path(node_dir), json.dumps(state, indent=1))


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "?"


# ---- one node ----


def fast_keep(ctx: Context, result: NodeResult) -> bool:
    """The no-process, no-network check: the folder holds the commit recorded for this very config
    entry, and nothing asks to look again."""
    if ctx.force or result.path.is_symlink():
        return False
    state = read_state(result.path)
    if not state or state.get("url") != result.entry.url or state.get("version") != result.entry.version:
        return False
    if ctx.update and state.get("kind") in UPDATE_KINDS:
        return False
    head = git_versions.read_head(result.path)
    if not head or head != state.get("commit"):
        return False
    result.action, result.commit, result.described = KEEP, head, state.get("described", "")
    result.checked_out = True
    return True


def sync_node(ctx: Context, result: NodeResult) -> NodeResult:
    try:
        path = result.path
        if path.is_symlink():
            raise NodeError(
                f"{path} is a symbolic link (to {os.readlink(path)}); a node folder must be a real folder, "
                "or one node could re-target another: remove the link (or give this entry another 'name'), "
                "then run again"
            )
        if path.is_dir() and not any(path.iterdir()) and not ctx.dry_run:
            log.info("%s: %s is an empty folder: the node is cloned in its place", result.label, path)
            path.rmdir()  # an empty folder (e.g. a mount point left behind) is not an install
        if not path.exists():
            _clone_node(ctx, result)
        elif git_versions.git_dir(path) is None:
            raise NodeError(
                f"{path} exists but is not a git checkout; move it away (or give this entry another 'name'), "
                "then run again"
            )
        else:
            _update_node(ctx, result)
        result.checked_out = not ctx.dry_run
    except (NodeError, git_versions.VersionError, git_versions.LocalEditsError) as err:
        result.error = f"{result.label} ({result.entry.url}): {err}"
    except Interrupted:
        raise
    except Exception as err:  # one broken node never stops the others
        log.debug("%s failed", result.label, exc_info=True)
        result.error = f"{result.label} ({result.entry.url}): unexpected {type(err).__name__}: {err}"
    return result


def _resolve_remote(ctx: Context, entry: NodeEntry) -> git_versions.Resolved:
    refs = git_versions.ls_remote(entry.url, ctx.token, ctx.stop)
    return git_versions.resolve_version(entry.version, refs, entry.url)


def _clone_node(ctx: Context, result: NodeResult) -> None:
    entry = result.entry
    resolved = _resolve_remote(ctx, entry)
    result.action, result.commit, result.described = CLONE, resolved.commit, resolved.describe()
    if ctx.dry_run:
        return
    staging = ctx.custom_nodes / f".{result.path.name}.partial-{uuid.uuid4().hex[:8]}.disabled"
    try:
        repo = git_versions.clone(entry.url, staging, ctx.token, ctx.stop)
        try:
            commit = git_versions.commit_in_clone(repo, entry.url, ctx.token, resolved, ctx.stop)
            git_versions.checkout(repo, commit, entry.url, ctx.token, ctx.stop)
        finally:
            repo.close()
        write_state(staging, entry, commit, resolved.kind, resolved.describe())
        os.rename(staging, result.path)  # the folder appears only complete
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    result.commit, result.changed = commit, True
    log.info("%s: cloned %s at %s (%s)", result.label, entry.url, _short(commit), resolved.describe())


def _update_node(ctx: Context, result: NodeResult) -> None:
    entry, path = result.entry, result.path
    state = read_state(path)
    head = git_versions.read_head(path)
    repo = git_versions.open_repo(path)
    try:
        origin = git_versions.origin_url(repo)
        if origin is None or not git_versions.same_url(origin, entry.url):
            if state is None:
                raise NodeError(
                    f"{path} is a checkout of {origin or 'an unknown remote'}, not of {entry.url}; remove the "
                    "folder (or give this entry another 'name'), then run again"
                )
            result.notes.append(f"origin changed from {origin} to {entry.url}")
            if not ctx.dry_run:
                git_versions.set_origin(repo, entry.url)
        same_entry = bool(state) and state.get("url") == entry.url and state.get("version") == entry.version
        refresh = ctx.force or (ctx.update and state is not None and state.get("kind") in UPDATE_KINDS)
        # the state file is written only after a complete checkout, so this says submodules are done too
        complete = same_entry and head is not None and state.get("commit") == head
        recorded = (state.get("commit") or state.get("moving_to")) if same_entry else None
        if recorded and not refresh and git_versions.FULL_SHA_RE.match(str(recorded)):
            # same config entry, folder moved by hand (or a move cut short): to the recorded commit, no network
            resolved = git_versions.Resolved(entry.version, state.get("kind", ""), recorded, state.get("described", ""))
        elif git_versions.FULL_SHA_RE.match(entry.version.lower()) and (
            local := git_versions.has_commit(repo, entry.version)
        ):  # a full sha already in the clone: no network. A short one may be a ref name: asked upstream
            resolved = git_versions.Resolved(entry.version, "commit", local, f"commit {local[:12]}")
        else:
            resolved = _resolve_remote(ctx, entry)
        result.described, result.commit = resolved.describe(), resolved.commit
        if resolved.commit and resolved.commit == head and complete and not ctx.force:
            result.action = KEEP
            if not ctx.dry_run:
                write_state(path, entry, head, resolved.kind, resolved.describe())
            return
        result.action = MOVE if not (resolved.commit and resolved.commit == head) else KEEP
        if ctx.dry_run:
            edits, in_submodules = git_versions.worktree_changes(repo)
            if in_submodules and result.action == MOVE:
                result.notes.append(
                    f"local edits inside submodules would stop the move: {', '.join(in_submodules[:5])}"
                )
            elif edits and result.action == MOVE:
                result.notes.append(f"local edits would be stashed: {', '.join(edits[:5])}")
            return
        commit = git_versions.commit_in_clone(repo, entry.url, ctx.token, resolved, ctx.stop)
        result.commit = commit
        if commit != head:
            note = git_versions.stash_local_edits(
                repo,
                path,
                f"comfy-worker: local edits at {_short(head)} before moving to {entry.version} ({commit[:12]})",
            )
            if note:
                log.warning("%s: %s", result.label, note)
                result.notes.append(note)
        else:
            result.action = KEEP
            if not complete and not ctx.force:
                log.info(
                    "%s: at %s but not recorded as complete; checking out again with submodules",
                    result.label,
                    _short(commit),
                )
        write_pending_state(path, entry, resolved, commit)
        git_versions.checkout(repo, commit, entry.url, ctx.token, ctx.stop)
        write_state(path, entry, commit, resolved.kind, resolved.describe())
        result.changed = True
        if commit != head:
            log.info("%s: moved from %s to %s (%s)", result.label, _short(head), commit[:12], resolved.describe())
    finally:
        repo.close()


# ---- requirements ----


def install_requirements(results: list[NodeResult], settings: Settings, ctx: Context) -> None:
    wanted: list[tuple[NodeResult, node_requirements.NodeReqs]] = []
    for r in results:
        if not r.ok or not r.commit:
            continue
        if not r.entry.requirements:
            r.requirements = "off"
            continue
        node = node_requirements.NodeReqs(r.label, r.path, r.commit)
        if ctx.dry_run and r.action == CLONE:
            r.requirements = "after clone"
        elif node.has_work():
            wanted.append((r, node))
        else:
            r.requirements = "none"
    if not wanted:
        return
    try:
        env = node_requirements.target_env(settings.python)
    except RuntimeError as err:
        for r, _ in wanted:
            r.requirements, r.error = "FAILED", f"{r.label}: requirements not installed: {err}"
        return
    record = node_requirements.read_record(env)
    todo, present = [], []
    for r, node in wanted:
        if ctx.force or r.changed or record.get(node_requirements.record_key(node.path)) != node.commit:
            todo.append((r, node))
        else:
            r.requirements = "present"
            present.append((r, node))
    if ctx.dry_run:
        for r, _ in todo:
            r.requirements = "would install"
        return
    if not todo:
        return
    node_requirements.write_record(
        env, {}, forget=[node_requirements.record_key(n.path) for _, n in todo]
    )  # claim nothing until done
    try:
        # the present nodes' requirements go to the resolver too, so a new node cannot silently break them
        outcome = node_requirements.install(
            [n for _, n in todo],
            env,
            settings.nodes_installer,
            settings.install_py_timeout,
            installed=[n for _, n in present],
            package_cache=settings.node_package_cache,
            stop=ctx.stop,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        outcome = {n.label: f"{n.label}: requirements not installed: {err}" for _, n in todo}
    done, broken = {}, []
    for r, node in todo:
        error = outcome.get(node.label)
        if error:
            r.requirements, r.error = "FAILED", error
        else:
            r.requirements = "installed"
            done[node_requirements.record_key(node.path)] = node.commit
    for r, node in present:  # their packages were replaced by a conflicting node's
        if error := outcome.get(node.label):
            r.requirements, r.error = "FAILED", error
            broken.append(node_requirements.record_key(node.path))
    node_requirements.write_record(env, done, forget=broken)


# ---- the whole run ----


def lock_entries(results: list[NodeResult], previous: object = None) -> list[dict]:
    """A node checked out at its resolved commit is recorded with it; a node that failed keeps the
    record of its last good run (same name and url), or is left out."""
    old = {}
    for item in previous if isinstance(previous, list) else []:
        if isinstance(item, dict) and isinstance(item.get("version"), str):
            old.setdefault((item.get("name"), item.get("url")), item["version"])
    entries = []
    for r in results:
        if r.checked_out and r.commit and git_versions.read_head(r.path) == r.commit:
            commit = r.commit
        else:
            commit = old.get((r.entry.dir_name(), r.entry.url))
        if not commit:
            continue
        item = {"url": r.entry.url, "version": commit, "name": r.entry.dir_name()}
        if r.entry.optional:
            item["optional"] = True
        if not r.entry.requirements:
            item["requirements"] = False
        entries.append(item)
    return entries


def write_lock(settings: Settings, results: list[NodeResult]) -> None:
    data = read_lock_file(settings.lock_file)
    previous = data.get("nodes")
    entries = lock_entries(results, previous)
    if previous != entries or data.damaged:  # a damaged file is rewritten even when the nodes are the same
        update_lock_file(settings.lock_file, "nodes", entries)


def acquire_volume_lock(custom_nodes: Path, stop: threading.Event | None = None) -> FileLock:
    """One install_nodes.py per volume at a time; a second one says what it waits for, waits at most
    LOCK_WAIT_TIMEOUT (LockError) and ends on ``stop`` (Interrupted)."""
    return volume_lock.acquire(
        custom_nodes / RUN_LOCK, "another install_nodes.py to finish on this volume", stop, LOCK_WAIT_TIMEOUT
    )


def cleanup_partials(custom_nodes: Path) -> None:
    """Remove clones left behind by a crashed run (only ever called under the run lock)."""
    for stale in custom_nodes.glob(".*.partial-*.disabled"):
        shutil.rmtree(stale, ignore_errors=True)


def run(cfg: WorkerConfig, settings: Settings, ctx: Context, parallel: int = 4) -> list[NodeResult]:
    results = [NodeResult(i, e, ctx.custom_nodes / e.dir_name()) for i, e in enumerate(cfg.nodes)]
    if not results:
        return results
    slow = [r for r in results if not fast_keep(ctx, r)]
    if slow:
        if not ctx.dry_run:
            ctx.custom_nodes.mkdir(parents=True, exist_ok=True)
            cleanup_partials(ctx.custom_nodes)
        run_parallel(lambda r: sync_node(ctx, r), slow, parallel, ctx.stop)
    install_requirements(results, settings, ctx)
    return results


def print_summary(results: list[NodeResult], dry_run: bool) -> None:
    rows = []
    for r in results:
        status = status_word(r.ok, r.entry.optional)
        rows.append(
            [
                r.entry.dir_name(),
                r.entry.version,
                f"{_short(r.commit)} {r.described}".strip(),
                r.action or "-",
                r.requirements,
                status,
            ]
        )
    title = "dry run: nothing changed" if dry_run else "custom nodes"
    print(f"\n{title}")
    print(format_table(["node", "version", "resolves to", "action", "requirements", "status"], rows))
    for r in results:
        for note in r.notes:
            print(f"note: {r.label}: {note}")
        if r.error:
            print(f"{'warning' if r.entry.optional else 'error'}: {r.error}")


def json_rows(results: list[NodeResult]) -> list[dict]:
    """``--json``: one object per entry (what ``apply_config.sh --dry-run`` lists)."""
    return [
        {
            "index": r.index,
            "name": r.entry.dir_name(),
            "version": r.entry.version,
            "commit": r.commit,
            "described": r.described,
            "action": r.action or None,
            "requirements": r.requirements,
            "error": r.error,
            "notes": r.notes,
            "optional": r.entry.optional,
        }
        for r in results
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Install the custom nodes listed in config.yml.")
    add_common_args(parser)
    parser.add_argument("--comfyui-dir", metavar="DIR", help="ComfyUI checkout (default $COMFYUI_PATH)")
    parser.add_argument(
        "--update", action="store_true", help="resolve latest, nightly, branch and tag nodes again and move them"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = settings_and_config(args)
    if isinstance(loaded, int):
        return loaded
    settings, cfg = loaded
    setup_logging()
    comfyui = Path(args.comfyui_dir) if args.comfyui_dir else settings.comfyui_path
    ctx = Context(comfyui / "custom_nodes", settings.github_token, args.dry_run, args.force, args.update)
    start = time.monotonic()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ctx.stop.set()) if main_thread else None
    try:
        if args.dry_run:
            results = run(cfg, settings, ctx, args.parallel)
        elif not cfg.nodes:
            results = []
            write_lock(settings, results)
        else:
            ctx.custom_nodes.mkdir(parents=True, exist_ok=True)
            lock = acquire_volume_lock(ctx.custom_nodes, ctx.stop)
            try:
                results = run(cfg, settings, ctx, args.parallel)
                write_lock(settings, results)
            finally:
                lock.release()
    except Interrupted as err:
        print(
            f"interrupted ({err}); nothing unfinished was recorded as done: the next run completes the work",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except LockError as err:
        print(
            f"error: {err}; run install_nodes.py again once the other run has finished (it holds the lock only "
            "while it runs)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    failed = [r for r in results if not r.ok and not r.entry.optional]
    if args.json:
        print(json.dumps(json_rows(results)))
        return EXIT_FAILED if failed else EXIT_OK
    print_summary(results, args.dry_run)
    print(
        f"{len(results)} node(s), {sum(r.ok for r in results)} ok, {len(failed)} required failed "
        f"({time.monotonic() - start:.2f} s)"
    )
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
