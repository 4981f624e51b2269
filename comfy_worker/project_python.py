"""Run an entry script with the project's Python when it was started with another one.

``./download_models.py`` runs the first ``python3`` on PATH (its ``#!/usr/bin/env python3`` line),
often the system's, which lacks the project's packages. So each entry script imports its packages
inside ``try`` and, on ``ModuleNotFoundError``, calls ``run_again``, which:

1. raises the error as it is when the missing module is the project's own (``comfy_worker.…``): that
   is a broken checkout, not the wrong Python;
2. asks ``scripts/project_python.sh`` which interpreter has the packages (the one place that says it,
   also for the shell scripts: ``$PYTHON``, ``$VENV``, the repo's ``.venv``, the image's ``/opt/venv``,
   then ``python3`` on PATH);
3. runs the same script with the same arguments in that interpreter (``os.execve``: the same process,
   so signals and the exit code are the script's own), unless it is the interpreter already running,
   or this run is already the second one (``RERUN_MARK`` in the environment: no loop);
4. else ends with exit 2 (``EXIT_INVALID``: the environment is invalid) and one message that names the
   missing package, the interpreter(s) tried and the fix, without a traceback.

Stdlib only: it runs exactly when the project's packages cannot be imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from comfy_worker.exit_codes import EXIT_INVALID

ROOT = Path(__file__).resolve().parent.parent
FINDER = ROOT / "scripts" / "project_python.sh"
# set for the second run: the interpreter the first one ran in. Internal, not a setting (settings.py
# cannot be imported without the packages this module runs for lack of).
RERUN_MARK = "COMFY_WORKER_RERUN_FROM"


def run_again(missing: ModuleNotFoundError) -> None:
    """Run ``sys.argv`` again in the project's interpreter, or exit with a message saying how to get
    one. Returns only by raising ``missing`` (a module of the project itself is missing)."""
    if (missing.name or "").partition(".")[0] == "comfy_worker":
        raise missing
    first = os.environ.get(RERUN_MARK)
    python = None if first else project_interpreter()
    if python and not _is_running(python):
        env = {**os.environ, RERUN_MARK: sys.executable}
        with contextlib.suppress(OSError):  # not runnable after all: said below
            os.execve(python, [python, sys.argv[0], *sys.argv[1:]], env)
    tried = list(dict.fromkeys(p for p in (first, sys.executable) if p))
    sys.stderr.write(_explain(missing, tried))
    raise SystemExit(EXIT_INVALID)


def project_interpreter() -> str | None:
    """The absolute path of the interpreter ``scripts/project_python.sh`` picks, or None (none found,
    or no bash)."""
    script = 'source "$1" && project_python "$2" && printf %s "$PY"'
    try:
        found = subprocess.run(
            ["bash", "-c", script, "project_python", str(FINDER), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    name = found.stdout.strip()
    if found.returncode != 0 or not name:
        return None
    if os.sep not in name:  # a command name ($PYTHON=python3.12, or python3 on PATH)
        name = shutil.which(name) or ""
    return os.path.abspath(name) if name else None


def _is_running(python: str) -> bool:
    """Whether ``python`` is the interpreter running now. Paths are compared as given, not resolved: a
    virtualenv's ``bin/python`` is a link to the system's, and yet a different environment."""
    return os.path.abspath(sys.executable) == python


def _explain(missing: ModuleNotFoundError, tried: list[str]) -> str:
    script = os.path.basename(sys.argv[0]) or "this script"
    return (
        f"{script}: the Python it ran in lacks the project's packages (no module named {missing.name!r};"
        f" tried: {', '.join(tried)}). Fix: run ./scripts/setup_env.sh once (it creates .venv, which"
        f" ./{script} then uses by itself), or point PYTHON at a Python that has requirements.txt"
        f" installed: PYTHON=/path/to/bin/python ./{script} ...\n"
    )
