"""Running start.sh / apply_config.sh as subprocesses against a temp volume (tests/test_start.py)."""

from __future__ import annotations

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
