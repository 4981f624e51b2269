"""Running start.sh / apply_config.sh as subprocesses against a temp volume (tests/test_start.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from support.comfy_process import ROOT, require_upstream

NODE_INIT = """
class PassImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, image):
        return (image,)


NODE_CLASS_MAPPINGS = {"StartTestPassImage": PassImage}
"""


def start_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a start on a volume in ``tmp_path``: the local upstream ComfyUI repo, no
    RunPod variables, the project's python first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "HF_", "CONFIG_YML", "MODE"))}
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "PYTHON": sys.executable,
            "VOLUME_ROOT": str(tmp_path / "volume"),
            "COMFYUI_REPO": str(require_upstream()),
            "COMFY_PID_FILE": str(run / "comfyui.pid"),
            "COMFY_LOG_FILE": str(run / "comfyui.log"),
            "DOWNLOAD_RETRIES": "1",
            "DOWNLOAD_RETRY_BACKOFF": "0",
            "HF_HUB_OFFLINE": "",
        }
    )
    env.update(extra)
    return env


def run_script(env: dict[str, str], script: str = "start.sh", *args: str, timeout: float = 300):
    return subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def volume_lock_held(volume: Path):
    """Hold ``$VOLUME_ROOT/.provision.lock`` as another worker provisioning the volume would: a start
    that takes the lock waits for as long as this lasts, a fast warm start does not notice it."""
    from filelock import FileLock

    lock = FileLock(str(volume / ".provision.lock"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_fast(env: dict[str, str], script: str = "start.sh", *args: str, timeout: float = 60):
    """``run_script`` with the volume lock held elsewhere: a start that waits for it is not the fast
    warm path, and fails here instead of hanging."""
    with volume_lock_held(Path(env["VOLUME_ROOT"])):
        try:
            return run_script(env, script, *args, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"{script} waited for the volume lock for {timeout:g} s: it did not take the fast warm path; "
                f"its output:\n{err.stderr}"
            ) from None


READ_ONLY_MOUNT = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'


def read_only_mounts() -> bool:
    """Can this machine mount a folder read-only in a private mount namespace (``unshare -rm``)?"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            probe = subprocess.run(
                ["unshare", "-rm", "sh", "-c", READ_ONLY_MOUNT, "sh", tmp, tmp, "sh", "-c", f"! touch {tmp}/x"],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return probe.returncode == 0


def run_on_read_only_volume(env: dict[str, str], volume: Path, script: str = "start.sh", *args: str, timeout=120):
    """``script`` with ``volume`` mounted read-only at ``env["VOLUME_ROOT"]`` (a bind mount that only
    the script's private mount namespace sees: nothing is left mounted after it)."""
    mount_at = Path(env["VOLUME_ROOT"])
    mount_at.mkdir(parents=True, exist_ok=True)
    cmd = ["unshare", "-rm", "sh", "-c", READ_ONLY_MOUNT, "sh", str(volume), str(mount_at)]
    cmd += ["bash", str(ROOT / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
