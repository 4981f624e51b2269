"""Python requirements of custom nodes: installed into the environment ComfyUI runs in, with a
constraints file that pins the installed torch, torchvision and torchaudio, so no node can replace
them.

- The target environment is the one of ``$PYTHON`` (default: the python running the script).
- ``uv pip install --python <python>`` when uv is found (next to that python, next to ours, or on
  PATH), else ``<python> -m pip install``. ``NODES_INSTALLER=uv|pip`` forces one.
- All changed nodes are installed together first; when that fails, one by one, so a node whose
  requirements conflict is named and the others still get installed.
- ``install.py`` runs after the requirements, with a timeout, with ``PIP_CONSTRAINT``/``UV_CONSTRAINT``
  set so a pip call inside it cannot replace torch either.
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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from cli_common import atomic_write_text

log = logging.getLogger("install_nodes")

PROTECTED = ("torch", "torchvision", "torchaudio")
RECORD_NAME = "comfy-worker-node-requirements.json"
PIP_TIMEOUT = 3600


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
        out = subprocess.run([path, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True)
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
    out = subprocess.run([env.python, "-c", _VERSIONS_CODE, *PROTECTED], capture_output=True, text=True, check=True)
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


def install_command(env: TargetEnv, uv: str | None, constraints: Path, files: list[Path]) -> list[str]:
    reqs = [arg for f in files for arg in ("-r", str(f))]
    if uv:
        return [uv, "pip", "install", "--python", env.python, "-c", str(constraints), *reqs]
    return [
        env.python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-c",
        str(constraints),
        *reqs,
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


def _run_pip(cmd: list[str], cwd: Path | None = None) -> tuple[bool, str]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"the installer did not finish within {PIP_TIMEOUT} s"
    log.debug("%s finished in %.1f s with %s", cmd[0], time.monotonic() - start, proc.returncode)
    return proc.returncode == 0, proc.stdout + proc.stderr


def run_install_py(node: NodeReqs, env: TargetEnv, constraints: Path, timeout: float) -> str | None:
    """Run the node's install.py; an error message, or None when it succeeded."""
    child_env = {**os.environ, "PIP_CONSTRAINT": str(constraints), "UV_CONSTRAINT": str(constraints)}
    proc = subprocess.Popen(
        [env.python, "install.py"],
        cwd=node.path,
        env=child_env,
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


def install(
    nodes: list[NodeReqs], env: TargetEnv, installer_mode: str = "auto", install_py_timeout: float = 600
) -> dict[str, str | None]:
    """Install the requirements of ``nodes`` into ``env``; label -> error message (None = installed)."""
    results: dict[str, str | None] = {n.label: None for n in nodes}
    before = protected_versions(env)
    uv = find_uv(env, installer_mode)
    with tempfile.TemporaryDirectory(prefix="comfy-worker-constraints-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(before), encoding="utf-8")
        with_reqs = [n for n in nodes if n.requirements_file is not None]
        if with_reqs:
            log.info(
                "installing requirements of %d node(s) with %s (pinned: %s)",
                len(with_reqs),
                "uv" if uv else "pip",
                ", ".join(f"{k}=={v}" for k, v in sorted(before.items())) or "nothing installed to pin",
            )
            ok, output = _run_pip(install_command(env, uv, constraints, [n.requirements_file for n in with_reqs]))
            if not ok and len(with_reqs) > 1:
                log.warning("installing all requirements together failed; trying node by node to find the culprit")
            if not ok:
                for node in with_reqs:
                    if len(with_reqs) > 1:
                        ok, output = _run_pip(
                            install_command(env, uv, constraints, [node.requirements_file]), node.path
                        )
                    if not ok:
                        results[node.label] = _conflict_message(node, output, before)
        for node in nodes:
            if results[node.label] is None and node.install_py is not None:
                log.info("%s: running install.py", node.label)
                results[node.label] = run_install_py(node, env, constraints, install_py_timeout)
    after = protected_versions(env)
    if after != before:  # the constraints make this impossible for pip/uv; install.py could still do it
        changed = ", ".join(
            f"{k} {before.get(k)} -> {after.get(k)}" for k in PROTECTED if before.get(k) != after.get(k)
        )
        log.error("the torch packages changed during node installation (%s); check the install.py scripts", changed)
    return results


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
