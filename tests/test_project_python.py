"""comfy_worker/project_python.py: the entry scripts run as ``./script.py`` by a new user, whose first
``python3`` on PATH lacks the project's packages. Each run uses a copy of the scripts, a plain PATH and a
"bare" python3 (this interpreter with ``-S``: no site-packages, so no pydantic, filelock or yaml)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.comfy_process import ROOT
from support.hermetic import SYSTEM_PATH

SCRIPTS = ["check_workflow.py", "download_models.py", "install_nodes.py"]


def shim(path: Path, *argv: str) -> Path:
    """An executable at ``path`` that runs ``argv`` followed by its own arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in argv) + ' "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def scripts_copy(tmp_path: Path, venv_python: list[str] | None) -> Path:
    """The entry scripts, the package and the interpreter finder, with a ``.venv/bin/python`` that runs
    ``venv_python`` (None: no .venv, as a fresh clone has)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "comfy_worker", repo / "comfy_worker", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "project_python.sh", repo / "scripts")
    for script in SCRIPTS:
        shutil.copy2(ROOT / script, repo)
    if venv_python:
        shim(repo / ".venv" / "bin" / "python", *venv_python)
    return repo


def run(repo: Path, tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``args`` run from ``repo`` with PATH's first python3 a bare one."""
    bare = shim(tmp_path / "bin" / "python3", sys.executable, "-S")
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    env = {**keep, "PATH": f"{bare.parent}:{SYSTEM_PATH}", **env}
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_started_with_a_python_without_the_packages_runs_in_the_repos_venv(tmp_path, script):
    repo = scripts_copy(tmp_path, [sys.executable])
    done = run(repo, tmp_path, [f"./{script}", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}")


def test_the_arguments_and_the_exit_code_are_the_scripts_own(tmp_path):
    """The second run gets the same arguments (a relative path still means the same file) and its exit
    code is the one the user sees: here 2, the config is invalid."""
    repo = scripts_copy(tmp_path, [sys.executable])
    (repo / "bad.yml").write_text("models:\n  - url: not-a-url\n")
    done = run(repo, tmp_path, ["./download_models.py", "--validate-only", "--config", "bad.yml"])
    assert done.returncode == 2
    assert "bad.yml" in done.stderr + done.stdout and "No module named" not in done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_a_project_python_one_line_says_what_is_missing_and_how_to_fix_it(tmp_path, script):
    """No .venv and PYTHON names a bare interpreter too: it is tried once (no loop), then one message
    without a traceback names the missing module, what was tried and the fix; exit 2."""
    repo = scripts_copy(tmp_path, None)
    other_bare = shim(tmp_path / "other" / "python", sys.executable, "-S")
    done = run(repo, tmp_path, [f"./{script}", "--help"], PYTHON=str(other_bare))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert f"{script}: the Python it ran in lacks the project's packages (no module named" in done.stderr
    assert f"tried: {sys.executable})" in done.stderr  # both bare pythons run this interpreter: named once
    assert "run ./scripts/setup_env.sh once" in done.stderr and f"PYTHON=/path/to/bin/python ./{script}" in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_venv_that_also_lacks_the_packages_is_tried_once(tmp_path):
    """The repo's .venv exists but is bare as well: the script runs there once, then says so."""
    repo = scripts_copy(tmp_path, [sys.executable, "-S"])
    done = run(repo, tmp_path, ["./check_workflow.py", "x.json"])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "run ./scripts/setup_env.sh once" in done.stderr


def test_a_missing_module_of_the_project_itself_is_not_taken_for_the_wrong_python(tmp_path):
    """A broken checkout (a comfy_worker module missing) shows Python's own error, not the advice."""
    repo = scripts_copy(tmp_path, [sys.executable])
    (repo / "comfy_worker" / "workflow_check.py").unlink()
    done = subprocess.run(
        [sys.executable, "check_workflow.py", "--help"], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'comfy_worker.workflow_check'" in done.stderr
    assert "setup_env.sh" not in done.stderr
