"""start.sh with its services (local mode): a real ComfyUI, the RunPod SDK's local API serving
handler.py, JupyterLab; warm-up, apply_config.sh, SIGTERM, ComfyUI dying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from support.comfy_process import ROOT, free_port
from support.models import UPSCALE_MODEL_NAME
from support.origins import FaultyOrigin
from support.start_env import NODE_INIT, run_script, start_env

pytestmark = pytest.mark.slow

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
    "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALE_MODEL_NAME}},
    "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
    "4": {"class_type": "StartTestPassImage", "inputs": {"image": ["3", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "start_test"}},
}
SECRET = "jupyter-secret-token-123"


def get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start(env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(ROOT / "start.sh")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def box(tmp_path, git_repos, upscale_model_file):
    repo = git_repos.create("StartNode", {"__init__.py": NODE_INIT})
    repo.tag("v1.0.0")
    repo.push()
    with FaultyOrigin() as origin:
        origin.add(f"/{UPSCALE_MODEL_NAME}", file=upscale_model_file)
        origin.add("/extra.bin", body=b"x" * 1234)
        env = start_env(
            tmp_path,
            MODE="local",
            COMFY_PORT=str(free_port()),
            API_PORT=str(free_port()),
            JUPYTER_PORT=str(free_port()),
            JUPYTER_PASSWORD=SECRET,
            WARMUP_WORKFLOW=str(tmp_path / "warmup.json"),
        )
        (tmp_path / "warmup.json").write_text(json.dumps({"input": {"workflow": WORKFLOW}}))
        volume = Path(env["VOLUME_ROOT"])
        volume.mkdir(parents=True)
        cfg = {
            "models": [{"url": f"{origin.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}],
            "nodes": [{"url": repo.url, "version": "v1.0.0"}],
        }
        (volume / "config.yml").write_text(yaml.safe_dump(cfg))
        yield env, origin, cfg, volume


def test_local_mode_serves_a_job_warm_up_first_jupyter_token_apply_config_and_sigterm(tmp_path, box):
    env, origin, cfg, volume = box
    log = tmp_path / "start.log"
    proc = start(env, log)
    try:
        api = f"http://127.0.0.1:{env['API_PORT']}"
        wait_until(lambda: get(f"{api}/docs") == 200, 240, f"the local API; log:\n{log.read_text()}")
        text = log.read_text()
        assert text.index("warm-up workflow") < text.index("handler started"), text  # "warm-up workflow ... done"
        answer = post(f"{api}/runsync", {"input": {"workflow": WORKFLOW}})
        assert answer["status"] == "COMPLETED", answer
        assert "WARNING: the warm-up" not in text

        jupyter = f"http://127.0.0.1:{env['JUPYTER_PORT']}"
        wait_until(lambda: get(f"{jupyter}/api/status?token={SECRET}") == 200, 60, "Jupyter")
        assert get(f"{jupyter}/api/contents") == 403
        assert get(f"{jupyter}/api/contents?token={SECRET}") == 200
        assert get(f"{jupyter}/api/contents?token=wrong") == 403

        # apply_config.sh adds a model to the running box; ComfyUI keeps its PID
        comfy_pid = Path(env["COMFY_PID_FILE"]).read_text().strip()
        cfg["models"].append({"url": f"{origin.url}/extra.bin", "destination": "checkpoints"})
        (volume / "config.yml").write_text(yaml.safe_dump(cfg))
        applied = run_script(env, "apply_config.sh")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert (volume / "ComfyUI" / "models" / "checkpoints" / "extra.bin").read_bytes() == b"x" * 1234
        assert "no node changed: ComfyUI keeps running" in applied.stderr
        assert Path(env["COMFY_PID_FILE"]).read_text().strip() == comfy_pid and psutil.pid_exists(int(comfy_pid))

        # SIGTERM: every child gone within 10 s
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=max(0.1, 10 - (time.monotonic() - started)))
        assert alive == [] and time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text() + Path(env["COMFY_LOG_FILE"]).read_text()
    assert SECRET not in text


def test_comfyui_killed_ends_the_start_non_zero(tmp_path, box):
    env, _, _, volume = box
    env = {**env, "COMFY_RESTART": "0", "ENABLE_JUPYTER": "0", "WARMUP_WORKFLOW": ""}
    log = tmp_path / "start.log"
    proc = start(env, log)
    try:
        api = f"http://127.0.0.1:{env['API_PORT']}"
        wait_until(lambda: get(f"{api}/docs") == 200, 240, f"the local API; log:\n{log.read_text()}")
        os.kill(int(Path(env["COMFY_PID_FILE"]).read_text()), signal.SIGKILL)
        assert proc.wait(20) != 0
        assert "ComfyUI exited" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
