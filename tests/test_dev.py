"""scripts/dev.sh and the scripts' choice of interpreter (scripts/project_python.sh), walked as a new user
walks them: the scripts themselves, from a copy of the repo, with a plain PATH (no virtualenv activated)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.comfy_process import ROOT, require_upstream
from support.hermetic import SYSTEM_PATH

EMPTY_CONFIG = "models: []\nnodes: []\n"


def fresh_copy(tmp_path: Path) -> Path:
    """The repo as a new clone has it: no .venv, no workspace; .cache shared (the local ComfyUI repo and
    the image test's base, which setup_env.sh would otherwise build again)."""
    repo = tmp_path / "repo"
    skip = shutil.ignore_patterns(".git", ".venv", ".cache", "workspace", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, repo, ignore=skip, symlinks=True)
    (repo / "workspace").mkdir()
    (repo / ".cache").symlink_to((ROOT / ".cache").resolve())
    return repo


def plain_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = ("HOME", "LANG", "TMPDIR", "UV_CACHE_DIR", "XDG_CACHE_HOME")
    env = {k: v for k, v in os.environ.items() if k in keep}
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    env.update(
        PATH=SYSTEM_PATH,
        VOLUME_ROOT=str(tmp_path / "volume"),
        COMFY_PID_FILE=str(run / "comfyui.pid"),
        COMFY_LOG_FILE=str(run / "comfyui.log"),
        CONFIG_YML=EMPTY_CONFIG,
        **extra,
    )
    return env


def test_apply_config_finds_the_projects_python_without_python_on_path(tmp_path):
    """issue 21 #2: no PYTHON, no virtualenv on PATH (where only the system's python3 lives, without the
    project's packages): apply_config.sh and start.sh use the repo's .venv by themselves."""
    env = plain_env(tmp_path, COMFYUI_REPO=str(require_upstream()))
    assert shutil.which("python", path=SYSTEM_PATH) is None or "venv" not in shutil.which("python", path=SYSTEM_PATH)
    done = subprocess.run(
        ["bash", str(ROOT / "apply_config.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "No module named" not in done.stderr and "command not found" not in done.stderr
    done = subprocess.run(
        ["bash", str(ROOT / "start.sh"), "--provision-only"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "volume" / "ComfyUI" / "main.py").is_file()


def test_a_python_that_is_not_there_is_named(tmp_path):
    """issue 21 #2: PYTHON set to something that does not exist: one line naming PYTHON and the fix."""
    env = plain_env(tmp_path, PYTHON=str(tmp_path / "nowhere" / "python"))
    done = subprocess.run(["bash", str(ROOT / "apply_config.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"PYTHON={tmp_path / 'nowhere' / 'python'} is not an executable Python" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_python_on_path_without_the_projects_packages_is_not_used_and_the_fix_is_named(tmp_path):
    """A fresh clone without .venv, whose python3 on PATH is the system's (no filelock, pydantic, yaml):
    apply_config.sh stops with one line naming that Python and the fix, not a traceback from deep inside
    provisioning."""
    if Path("/opt/venv/bin/python").exists():
        pytest.skip("/opt/venv (the image's virtualenv) comes before PATH here")
    repo = fresh_copy(tmp_path)
    bare = tmp_path / "bin" / "python3"  # this interpreter without site-packages
    bare.parent.mkdir()
    bare.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    bare.chmod(0o755)
    env = plain_env(tmp_path)
    env["PATH"] = f"{bare.parent}:{env['PATH']}"
    done = subprocess.run(
        ["bash", "apply_config.sh", "--dry-run"], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        f"no Python with the project's packages found: {bare} lacks the project's packages (ModuleNotFoundError: "
        "No module named 'filelock'): run ./scripts/setup_env.sh (it creates .venv), or set PYTHON or VENV to a "
        "Python or virtualenv that has requirements.txt installed"
    )


def test_dev_sh_honours_venv_from_a_fresh_clone(tmp_path):
    """issue 21 #2: ``VENV=/elsewhere ./scripts/dev.sh`` on a clone without .venv uses that virtualenv
    (it failed with rc 127)."""
    repo = fresh_copy(tmp_path)
    venv = tmp_path / "elsewhere-venv"
    venv.symlink_to((ROOT / ".venv").resolve())
    env = plain_env(tmp_path, VENV=str(venv), COMFYUI_REPO=str(require_upstream()))
    done = subprocess.run(
        ["bash", "scripts/dev.sh", "--provision-only"], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"with {venv}/bin/python" in done.stdout
    assert not (repo / ".venv").exists()
    assert (tmp_path / "volume" / "ComfyUI" / "main.py").is_file()


def test_dev_sh_without_a_reachable_comfyui_names_the_cause_and_starts_nothing(tmp_path):
    """issue 21 #1: ComfyUI cannot be cloned: no traceback, one line naming the cause and
    COMFYUI_REPO/COMFYUI_REF, a non-zero exit, nothing left running."""
    repo = fresh_copy(tmp_path)
    venv = tmp_path / "venv"
    venv.symlink_to((ROOT / ".venv").resolve())
    unreachable = tmp_path / "no-such-repo"
    env = plain_env(tmp_path, VENV=str(venv), COMFYUI_REPO=str(unreachable), DOWNLOAD_RETRIES="1")
    proc = subprocess.Popen(
        ["bash", "scripts/dev.sh"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode not in (0, None), out + err
    assert "Traceback" not in err and "FileNotFoundError" not in err, err
    line = [ln for ln in err.splitlines() if "ComfyUI is not on the volume" in ln]
    assert len(line) == 1 and "COMFYUI_REPO" in line[0] and "COMFYUI_REF" in line[0], err
    assert "the services start anyway" not in err
    time.sleep(0.5)
    group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert group.stdout.strip() == "", f"left running: {group.stdout}"
