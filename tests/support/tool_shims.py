"""A Python environment whose git, uv and pip calls are recorded: what a test needs to observe that a
start ran none of them, rather than infer it from a log line.

``container_python`` makes a fresh venv that sees the project's packages (torch, ComfyUI's
requirements) through a ``.pth`` file, as an image bakes them in, with ComfyUI's requirements recorded
as installed: node packages go into it. ``record_tools`` puts ``git``, ``uv`` and ``pip`` shims in its
``bin`` (first on PATH; uv is also what the installers find next to ``$PYTHON``): each appends its
command line to a log file, then runs the real tool.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from comfy_worker.state_files import COMFYUI_REQUIREMENTS_RECORD
from support.wheels import UV


def container_python(path: Path, comfyui_requirements: bytes) -> Path:
    """A fresh venv at ``path`` (its python returned) that sees the project's packages and records
    ``comfyui_requirements`` (the bytes of ComfyUI's requirements.txt) as installed."""
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    digest = hashlib.sha256(comfyui_requirements).hexdigest()
    (path / COMFYUI_REQUIREMENTS_RECORD).write_text(json.dumps({"sha256": digest}))
    return python


def record_tools(bin_dir: Path, log: Path, tools: tuple[str, ...] = ("git", "uv", "pip")) -> None:
    """Shims in ``bin_dir`` that log ``<tool> <args>`` to ``log`` and run the real tool (found now)."""
    real = {"uv": str(UV), "pip": f"{shlex.quote(sys.executable)} -m pip"}
    for tool in tools:
        target = real.get(tool) or shlex.quote(shutil.which(tool) or tool)
        shim = bin_dir / tool
        shim.write_text(f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(log))}\nexec {target} "$@"\n')
        shim.chmod(0o755)


def recorded_calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
