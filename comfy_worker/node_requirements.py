"""Python requirements of custom nodes: installed into the environment ComfyUI runs in, with a
constraints file that pins the installed torch, torchvision and torchaudio, so no node can replace
them.

- The target environment is the one of ``$PYTHON`` (default: the python running the script).
- ``uv pip install --python <python>`` when uv is found (next to that python, next to ours, or on
  PATH), else ``<python> -m pip install``. ``NODES_INSTALLER=uv|pip`` forces one.
- All changed nodes are installed together first; when that fails, one by one, so a node whose
  requirements conflict is named and the others still get installed.
- When installing them together fails but each node alone succeeds, their requirements conflict
  with each other: every node whose requirements are no longer met afterwards fails, naming the
  node(s) it cannot be installed together with. Nodes already installed earlier are passed to the
  resolver too (``installed=``), so a new node cannot silently break them.
- ``install.py`` runs after the requirements, with a timeout, with ``PIP_CONSTRAINT``/``UV_CONSTRAINT``
  set so a pip call inside it cannot replace torch either. A script that replaces them anyway
  (constraints only bind pip calls that read them) fails its node, and the pinned versions are
  installed back.
- install.py, pip and uv run without any secret (``settings.is_secret_name``) in their
  environment (third-party code runs there).
- What has been installed is recorded INSIDE the target environment (``<sys.prefix>/comfy-worker-node-
  requirements.json``): the record lives and dies with the packages it describes. A fresh container
  with a fresh environment has no record, so the requirements are installed again, even though the
  node folders on the volume are current.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from comfy_worker.lock_file import atomic_write_text
from comfy_worker.settings import is_secret_name

log = logging.getLogger("install_nodes")

PROTECTED = ("torch", "torchvision", "torchaudio")
RECORD_NAME = "comfy-worker-node-requirements.json"
PIP_TIMEOUT = 3600


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment minus the secrets, for every process started here (install.py, pip, uv and
    the target python: all of them run code from the nodes or their packages)."""
    env = {k: v for k, v in os.environ.items() if not is_secret_name(k)}
    env.update(extra or {})
    return env


def cache_env(package_cache: Path | None) -> dict[str, str]:
    """pip's and uv's caches on the volume (unless the user set them): a fresh container reinstalls
    node requirements from wheels already downloaded or built there."""
    if package_cache is None:
        return {}
    wanted = {"PIP_CACHE_DIR": package_cache / "pip", "UV_CACHE_DIR": package_cache / "uv"}
    env = {k: str(v) for k, v in wanted.items() if not os.environ.get(k)}
    if env:
        env.setdefault("UV_LINK_MODE", os.environ.get("UV_LINK_MODE") or "copy")  # the volume is another fs
    return env


@dataclass(frozen=True)
class TargetEnv:
    python: str
    prefix: Path

    @property
    def is_current(self) -> bool:
        return self.python == sys.executable

    @property
    def record_path(self) -> Path:
        return self.prefix / RECORD_NAME


@dataclass
class NodeReqs:
    """One node whose requirements are to be installed."""

    label: str  # e.g. "nodes[2] ComfyUI-Foo" (used in every message about it)
    path: Path
    commit: str

    @property
    def requirements_file(self) -> Path | None:
        f = self.path / "requirements.txt"
        return f if f.is_file() else None

    @property
    def install_py(self) -> Path | None:
        f = self.path / "install.py"
        return f if f.is_file() else None

    def has_work(self) -> bool:
        return self.requirements_file is not None or self.install_py is not None


def target_env(python: str | None) -> TargetEnv:
    """The environment packages go into. Symlinks are not resolved: a venv's python is a symlink
    to the base interpreter, and resolving it would lose the venv."""
    if not python:
        return TargetEnv(sys.executable, Path(sys.prefix))
    found = shutil.which(python) or python
    path = os.path.abspath(found)
    if path == os.path.abspath(sys.executable):
        return TargetEnv(sys.executable, Path(sys.prefix))
    venv = Path(path).parent.parent
    if (venv / "pyvenv.cfg").is_file():  # a venv's sys.prefix is the folder holding pyvenv.cfg
        return TargetEnv(path, venv)
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True, env=child_env()
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"cannot run the python {python!r} (env PYTHON): {err}; point PYTHON at ComfyUI's python"
        ) from None
    return TargetEnv(path, Path(out.stdout.strip()))


def _installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


_VERSIONS_CODE = (
    "import importlib.metadata as m, json, sys\n"
    "out = {}\n"
    "for n in sys.argv[1:]:\n"
    "    try: out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))\n"
)


def protected_versions(env: TargetEnv) -> dict[str, str]:
    """Installed versions of torch, torchvision and torchaudio in ``env`` (importlib.metadata)."""
    if env.is_current:
        return _installed_versions(PROTECTED)
    out = subprocess.run(
        [env.python, "-c", _VERSIONS_CODE, *PROTECTED], capture_output=True, text=True, check=True, env=child_env()
    )
    return json.loads(out.stdout)


def constraints_text(versions: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def find_uv(env: TargetEnv, mode: str = "auto") -> str | None:
    if mode == "pip":
        return None
    for candidate in (Path(env.python).parent / "uv", Path(sys.executable).parent / "uv"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("uv")
    if found is None and mode == "uv":
        raise RuntimeError("NODES_INSTALLER=uv but no uv executable was found (next to python or on PATH)")
    return found


def install_command(
    env: TargetEnv, uv: str | None, constraints: Path, files: list[Path], specs: list[str] = (), dry_run: bool = False
) -> list[str]:
    args = [arg for f in files for arg in ("-r", str(f))] + list(specs) + (["--dry-run"] if dry_run else [])
    if uv:
        return [uv, "pip", "install", "--python", env.python, "-c", str(constraints), *args]
    return [
        env.python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-c",
        str(constraints),
        *args,
    ]


def _summary(output: str, lines: int = 6) -> str:
    kept = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith("Using Python")]
    return " / ".join(kept[-lines:]) or "(no output)"


def _conflict_message(node: NodeReqs, output: str, pinned: dict[str, str]) -> str:
    message = f"{node.label}: requirements.txt cannot be installed: {_summary(output)}"
    if any(name in output for name in pinned):
        pins = ", ".join(f"{k}=={v}" for k, v in sorted(pinned.items()))
        message += f" (the installed {pins} are pinned and never replaced; pin this node to a version that fits)"
    return message


def _run_pip(cmd: list[str], cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> tuple[bool, str]:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT, env=child_env(extra_env)
        )
    except subprocess.TimeoutExpired:
        return False, f"the installer did not finish within {PIP_TIMEOUT} s"
    log.debug("%s finished in %.1f s with %s", cmd[0], time.monotonic() - start, proc.returncode)
    return proc.returncode == 0, proc.stdout + proc.stderr


def run_install_py(
    node: NodeReqs, env: TargetEnv, constraints: Path, timeout: float, extra_env: dict[str, str] | None = None
) -> str | None:
    """Run the node's install.py; an error message, or None when it succeeded."""
    proc = subprocess.Popen(
        [env.python, "install.py"],
        cwd=node.path,
        env=child_env({**(extra_env or {}), "PIP_CONSTRAINT": str(constraints), "UV_CONSTRAINT": str(constraints)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"{node.label}: install.py did not finish within {timeout:g} s and was stopped (INSTALL_PY_TIMEOUT)"
    if proc.returncode != 0:
        return f"{node.label}: install.py failed with exit code {proc.returncode}: {_summary(out)}"
    return None


@dataclass
class _Installer:
    """One installation run: the target, the installer, the constraints file and the pinned versions."""

    env: TargetEnv
    uv: str | None
    constraints: Path
    pinned: dict[str, str]
    extra_env: dict[str, str]

    def pip(self, nodes: list[NodeReqs], cwd: Path | None = None, dry_run: bool = False) -> tuple[bool, str]:
        files = [n.requirements_file for n in nodes]
        cmd = install_command(self.env, self.uv, self.constraints, files, dry_run=dry_run)
        return _run_pip(cmd, cwd, self.extra_env)

    def satisfied(self, node: NodeReqs) -> bool:
        """Whether the node's requirements are met as installed now (the installer's dry run would
        change nothing). A dry run that fails says nothing: counted as met."""
        ok, output = self.pip([node], node.path, dry_run=True)
        if not ok:
            log.debug("%s: dry run failed, requirements not checked: %s", node.label, _summary(output))
        return not ok or not re.search(r"^\s*Would (install|uninstall)", output, re.MULTILINE)

    def guard(self) -> str | None:
        """None when torch, torchvision and torchaudio are as pinned; else what changed, after
        installing the pinned versions back."""
        now = protected_versions(self.env)
        changed = {k: v for k, v in self.pinned.items() if now.get(k) != v}
        if not changed:
            return None
        what = ", ".join(f"{k} {v} \u2192 {now.get(k) or 'removed'}" for k, v in sorted(changed.items()))
        pins = [f"{k}=={v}" for k, v in sorted(changed.items())]
        cmd = install_command(self.env, self.uv, self.constraints, [], specs=pins)
        ok, output = _run_pip(cmd, extra_env=self.extra_env)
        if ok and all(protected_versions(self.env).get(k) == v for k, v in changed.items()):
            log.error("%s changed during a node install; restored %s", what, ", ".join(pins))
            return f"{what}; restored {', '.join(pins)}"
        log.error("%s changed during a node install; restoring %s failed: %s", what, ", ".join(pins), _summary(output))
        return f"{what}; restoring {', '.join(pins)} failed ({_summary(output, 3)}): install them again by hand"


def install(
    nodes: list[NodeReqs],
    env: TargetEnv,
    installer_mode: str = "auto",
    install_py_timeout: float = 600,
    installed: list[NodeReqs] = (),
    package_cache: Path | None = None,
) -> dict[str, str | None]:
    """Install the requirements of ``nodes`` into ``env``, then run their install.py; label -> error
    message (None = installed). ``installed``: nodes whose requirements are already installed; they
    join the resolver run, and get an error here when a conflicting node replaced their packages."""
    context = [n for n in installed if n.requirements_file is not None]
    results: dict[str, str | None] = {n.label: None for n in [*nodes, *context]}
    pinned = protected_versions(env)
    uv = find_uv(env, installer_mode)
    with tempfile.TemporaryDirectory(prefix="comfy-worker-constraints-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(pinned), encoding="utf-8")
        run = _Installer(env, uv, constraints, pinned, cache_env(package_cache))
        with_reqs = [n for n in nodes if n.requirements_file is not None]
        if with_reqs:
            log.info(
                "installing requirements of %d node(s) with %s (pinned: %s)",
                len(with_reqs),
                "uv" if uv else "pip",
                ", ".join(f"{k}=={v}" for k, v in sorted(pinned.items())) or "nothing installed to pin",
            )
            _install_requirements(run, with_reqs, context, results)
        for node in nodes:
            if results[node.label] is None and node.install_py is not None:
                log.info("%s: running install.py", node.label)
                failed = run_install_py(node, env, constraints, install_py_timeout, run.extra_env)
                if changed := run.guard():  # constraints bind only pip calls that read them
                    failed = "; ".join(filter(None, [f"{node.label}'s install.py changed {changed}", failed]))
                results[node.label] = failed
    return results


def _install_requirements(
    run: _Installer, with_reqs: list[NodeReqs], context: list[NodeReqs], results: dict[str, str | None]
) -> None:
    together = with_reqs + context
    ok, output = run.pip(together)
    if ok and (changed := run.guard()):  # the constraints make this impossible; checked all the same
        ok, output = False, f"the installer changed {changed}"
    if ok:
        return
    if len(together) > 1:
        log.warning("installing all requirements together failed; trying node by node to find the culprit")
    for node in with_reqs:
        if len(together) > 1:
            ok, output = run.pip([node], node.path)
            if ok and (changed := run.guard()):
                results[node.label] = f"{node.label}'s requirements.txt changed {changed}"
                continue
        if not ok:
            results[node.label] = _conflict_message(node, output, run.pinned)
    for node in context:  # nodes installed before keep their packages: a conflicting newcomer loses
        if results[node.label] is None and not run.satisfied(node):
            ok, output = run.pip([node], node.path)
            if not ok:
                results[node.label] = _conflict_message(node, output, run.pinned)
            elif changed := run.guard():
                results[node.label] = f"{node.label}'s requirements.txt changed {changed}"
    # each alone worked but not all together: they conflict with each other, and the node installed
    # last won. Name every node whose requirements are not met now, and whom it conflicts with.
    alone_ok = [n for n in together if results[n.label] is None]
    if len(alone_ok) < 2:
        return
    broken = [n for n in alone_ok if not run.satisfied(n)]
    if broken:
        log.warning("the requirements of %s cannot all be installed together", ", ".join(n.label for n in alone_ok))
    for node in broken:
        partners, reason = [], ""
        for other in alone_ok:
            if other is not node:
                fits, out = run.pip([node, other], node.path, dry_run=True)
                if not fits:
                    partners.append(other.label)
                    reason = reason or _summary(out, 3)
        with_whom = ", ".join(partners) or "the other nodes' requirements"
        results[node.label] = (
            f"{node.label}: requirements.txt cannot be installed together with {with_whom}"
            f"{f' ({reason})' if reason else ''}; installed one after the other, this node's requirements are "
            "no longer met: pin versions that fit together, or keep only one of them"
        )


# ---- the record of what is installed, kept inside the target environment ----


def record_key(node_path: Path) -> str:
    return str(Path(node_path).absolute())


def read_record(env: TargetEnv) -> dict[str, str]:
    """node folder -> commit whose requirements are installed in ``env``."""
    try:
        data = json.loads(env.record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("nodes", {}) if isinstance(data, dict) else {}


def write_record(env: TargetEnv, done: dict[str, str], forget: list[str] = ()) -> None:
    """Add ``done`` (folder -> commit) to the record, drop ``forget``; safe with concurrent writers."""
    path = env.record_path
    try:
        with FileLock(str(path) + ".lock", timeout=60):
            nodes = read_record(env)
            nodes.update(done)
            for key in forget:
                nodes.pop(key, None)
            atomic_write_text(path, json.dumps({"python": env.python, "nodes": nodes}, indent=1, sort_keys=True))
    except OSError as err:
        log.warning("cannot write %s (%s); node requirements will be installed again next time", path, err)
