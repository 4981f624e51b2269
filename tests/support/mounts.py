"""Real filesystem conditions for tests: a read-only or full filesystem, a directory the user cannot write.

``in_private_mount`` runs a Python snippet in its own mount namespace (``unshare -m`` as root, ``unshare
-rm`` otherwise, a user namespace) after mounting a tmpfs with the given options at a directory: the
mount exists only for that process and vanishes with it, so nothing leaks to the machine or other tests.
``without_write_permission`` runs one as a user that file permissions apply to (root drops the
capabilities that bypass them).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _unshare() -> list[str]:
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


@functools.cache
def mount_unavailable() -> str | None:
    """Why a private tmpfs mount cannot be made here, or None when it can."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) not installed"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            [*_unshare(), "mount", "-t", "tmpfs", "-o", "ro", "none", d], capture_output=True, text=True, timeout=30
        )
    return None if r.returncode == 0 else f"cannot mount in a private namespace: {r.stderr.strip()}"


def in_private_mount(target: Path, options: str, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` with a tmpfs mounted (``-o options``) at ``target`` for it alone."""
    target.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o "$1" none "$2" && shift 2 && exec "$@"'
    return subprocess.run(
        [*_unshare(), "sh", "-c", script, "sh", options, str(target), sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def without_write_permission(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` so that a directory's missing write bit applies (root: without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, via setpriv(1))."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )
