"""What a provisioning run would do, changing nothing (``apply_config.sh --dry-run``,
``python -m comfy_worker.provision --dry-run``).

One line per thing a run touches: ComfyUI (cloned, or kept where it is), each model entry (fetched,
linked from a hub cache on the host, or kept), each node entry (cloned, moved from its old version to
the new one, or kept, with the commits), the nodes that leave comfy.lock.yml, and, for apply_config.sh,
whether ComfyUI would be restarted. It asks the scripts the run runs (``download_models.py`` and
``install_nodes.py`` with ``--dry-run --json``): remote refs and model sizes are looked up (``git
ls-remote``, HTTP HEAD), but no file, record, lock or checkout on the volume or in the Python
environment is written, and no lock is taken.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from comfy_worker.exit_codes import EXIT_FAILED, EXIT_OK
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    node_changes: list[str] = field(default_factory=list)  # as provision.node_changes words them
    failed: int = 0  # required entries that cannot be provisioned as they stand

    def add(self, action: str, what: str) -> None:
        self.lines.append(f"  {action:<22} {what}")


def script_rows(settings: Settings, script: str, args: list[str], stop) -> list[dict]:
    """``script --dry-run --json ARGS`` of APP_DIR as a child (its log goes to our stderr): its rows.
    Raises DryRunError when it gives none (an invalid config is reported by the child itself)."""
    cmd = [sys.executable, str(settings.app_dir / script), "--dry-run", "--json", *args]
    proc = subprocess.Popen(cmd, cwd=settings.app_dir, stdout=subprocess.PIPE, text=True)
    while True:
        try:
            out, _ = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if stop.is_set():
                proc.terminate()
                proc.communicate()
                raise DryRunError(f"stopped during {script} --dry-run") from None
    try:
        rows = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DryRunError(f"{script} --dry-run ended with {proc.returncode} without a result (see above)") from None
    if not isinstance(rows, list):
        raise DryRunError(f"{script} --dry-run gave no list of entries")
    return [r for r in rows if isinstance(r, dict)]


class DryRunError(Exception):
    pass


def plan_comfyui(settings: Settings, ref: str, plan: Plan, update: bool = False) -> None:
    """ComfyUI cloned, moved or kept; ``latest`` is shown as the release a run would take (the one
    comfy.lock.yml records, else, and with ``update``, the newest: git ls-remote)."""
    from comfy_worker import comfyui_checkout
    from comfy_worker.git_versions import read_head
    from comfy_worker.lock_file import read_lock_file
    from comfy_worker.log_setup import safe_url

    path = settings.comfyui_path
    moving = settings.comfyui_update
    if ref == comfyui_checkout.LATEST:
        try:
            locked = read_lock_file(settings.lock_file).get("comfyui")
            release = comfyui_checkout.resolve_ref(settings, ref, locked, update)[0]
        except comfyui_checkout.CheckoutError as err:
            plan.add("cannot resolve", str(err))
            plan.failed += 1
            return
        ref, moving = f"{release} (latest)", moving or update
    if not comfyui_checkout.is_checkout(path):
        plan.add("would clone", f"ComfyUI {ref} from {safe_url(settings.comfyui_repo)} into {path}")
    elif moving:
        why = "COMFYUI_UPDATE=1" if settings.comfyui_update else "--update"
        plan.add("would move (if not at)", f"ComfyUI to {ref} ({why}); now at {(read_head(path) or '?')[:12]}")
    else:
        plan.add("keep", f"ComfyUI at {(read_head(path) or '?')[:12]} ({path})")


def plan_models(settings: Settings, config: Path, force: bool, stop, plan: Plan) -> None:
    from comfy_worker.cli import human_size

    words = {"present": "keep", "would download": "would fetch", "would link from cache": "would link from cache"}
    rows = script_rows(settings, "download_models.py", ["--config", str(config), *(["--force"] if force else [])], stop)
    for r in rows:
        where = f"models[{r.get('index')}] {r.get('path')}"
        if r.get("error"):
            plan.failed += not r.get("optional")
            plan.add("CANNOT TELL", f"{where}: {r['error']}")
            continue
        what = where + (f" ({human_size(r['size'])})" if isinstance(r.get("size"), int) else "")
        if r.get("action") == "would download":
            what += f" from {r.get('from')}"
        plan.add(words.get(r.get("action"), str(r.get("action"))), what)


def _node_before(settings: Settings, name: str) -> tuple[str, str]:
    """(version, commit) a node folder holds now, from its state file and HEAD (no git process)."""
    from comfy_worker.git_versions import read_head
    from comfy_worker.state_files import NODE_STATE

    folder = settings.custom_nodes_dir / name
    try:
        version = json.loads((folder / ".git" / NODE_STATE).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    return str(version or "?"), (read_head(folder) or "?")[:12]


def plan_nodes(settings: Settings, config: Path, cfg, opts, stop, plan: Plan) -> None:
    from comfy_worker.lock_file import read_lock_file

    args = ["--config", str(config), *(["--force"] if opts.force else []), *(["--update"] if opts.update else [])]
    rows = script_rows(settings, "install_nodes.py", args, stop)
    recorded = {n.get("name"): n.get("version") for n in read_lock_file(settings.lock_file).get("nodes") or []}
    for r in rows:
        name, commit = str(r.get("name")), r.get("commit")
        where = f"nodes[{r.get('index')}] {name}"
        if r.get("error"):
            plan.failed += not r.get("optional")
            plan.add("CANNOT TELL", f"{r['error']}")
            continue
        new = f"{r.get('version')} ({(commit or '?')[:12]})"
        reqs = f"; requirements: {r['requirements']}" if r.get("requirements") not in ("-", "none", None) else ""
        if r.get("action") == "clone":
            plan.add("would clone", f"{where} at {new}{reqs}")
        elif r.get("action") == "move":
            old_version, old_commit = _node_before(settings, name)
            plan.add("would move", f"{where} from {old_version} ({old_commit}) to {new}{reqs}")
        else:
            plan.add("keep", f"{where} at {new}{reqs}")
        if commit and recorded.get(name) != commit:
            before = recorded.get(name)
            plan.node_changes.append(f"{name} {before[:12]} -> {commit[:12]}" if before else f"{name} added")
        for note in r.get("notes") or []:
            plan.add("", f"note: {note}")
    for name in recorded:
        if name not in {e.dir_name() for e in cfg.nodes}:
            plan.add("would forget", f"{name}: no longer in the config, it leaves comfy.lock.yml (its folder stays)")
            plan.node_changes.append(f"{name} removed")


def show(settings: Settings, cfg, text: str, ref: str, gate_matches: bool, opts, stop, restart_due: str | None) -> int:
    """Print what a run with ``opts`` would do for the config ``cfg`` (whose YAML is ``text``); exit 1
    when a required entry could not be resolved. The scripts read the config from a temp file: the
    volume's config.yml is not written, not even for a CONFIG_YML."""
    plan = Plan()
    plan_comfyui(settings, ref, plan, getattr(opts, "update", False))
    with tempfile.TemporaryDirectory(prefix="comfy-worker-dry-run-") as tmp:
        config = Path(tmp) / "config.yml"
        config.write_text(text, encoding="utf-8")
        try:
            if cfg.models:
                plan_models(settings, config, opts.force, stop, plan)
            if cfg.nodes or read_lock_file_nodes(settings):
                plan_nodes(settings, config, cfg, opts, stop, plan)
        except DryRunError as err:
            log.error("%s", err)
            return EXIT_FAILED
    gate = "matches: a run would only check the files" if gate_matches else "differs: a run would check every entry"
    print(f"dry run (nothing is changed): volume {settings.volume_root}; gate {gate}", flush=True)
    print("\n".join(plan.lines))
    if opts.apply:
        print(restart_line(plan.node_changes, restart_due, opts))
    if plan.failed:
        print(f"{plan.failed} required entr{'y' if plan.failed == 1 else 'ies'} cannot be provisioned as listed above")
    return EXIT_FAILED if plan.failed else EXIT_OK


def read_lock_file_nodes(settings: Settings) -> list:
    from comfy_worker.lock_file import read_lock_file

    return read_lock_file(settings.lock_file).get("nodes") or []


def restart_line(changes: list[str], restart_due: str | None, opts) -> str:
    reasons = "; ".join(changes + ([f"still due from an earlier run: {restart_due}"] if restart_due else []))
    if not reasons:
        return "ComfyUI would keep running: no node would change"
    if not opts.restart:
        return f"ComfyUI would NOT be restarted (--no-restart), although nodes would change: {reasons}"
    when = "at once (--now)" if getattr(opts, "now", False) else "once it has no job running or waiting"
    return f"ComfyUI would be restarted {when}, to load: {reasons}"
