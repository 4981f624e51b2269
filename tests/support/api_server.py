"""``python -m comfy_worker.api`` as a real process (uvicorn on a free port) against the test ComfyUI,
with a client speaking its routes (tests/test_api.py, bench/api_throughput.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from support.comfy_process import ROOT, free_port

SUPPORT = Path(__file__).resolve().parent  # recording_handler.py's folder
# variables of the test runner's environment that would change what the API or the handler does
CLEAN_ENV = ("BUCKET_ENDPOINT_URL", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID", "REFRESH_WORKER", "MAX_RESPONSE_MB", "API_")


def tiny_workflow(color: int | None = None, size: int = 8) -> dict:
    """EmptyImage -> SaveImage (a fresh color by default)."""
    color = random.randrange(0x1000000) if color is None else color
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "api_test"}},
    }


def slow_workflow(steps: int, seconds_per_step: float = 0.05) -> dict:
    """EmptyImage -> WorkerTestSteps (sleeps per step, interruptible between steps) -> SaveImage."""
    wf = tiny_workflow(size=32)
    wf["3"] = {
        "class_type": "WorkerTestSteps",
        "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": seconds_per_step},
    }
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf


class ApiServer:
    """The API process: ``start()``, then ``post``/``get`` (with the token unless told otherwise)."""

    def __init__(
        self,
        comfyui,
        volume: Path,
        log_path: Path,
        token: str | None = None,
        host="127.0.0.1",
        handler: str | None = None,
        **env,
    ):
        """``comfyui``: the test ComfyUI, or None for a ``handler`` that needs none (``recording_handler:handler``,
        from tests/support/, runs without one)."""
        self.comfyui, self.volume, self.log_path, self.token, self.host = comfyui, volume, log_path, token, host
        self.handler = handler
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV)}
        self.env["VOLUME_ROOT"] = str(volume)
        if comfyui is not None:
            self.env.update(comfyui.env(), COMFY_LOG_FILE=str(comfyui.log_path))
        else:
            self.env["COMFY_HOST"] = f"127.0.0.1:{free_port()}"  # nothing listens: /health says unreachable
        if handler is not None:  # its module is found in tests/support/
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"
        if token:
            self.env["API_TOKEN"] = token
        self.env.update(env)
        self.proc: subprocess.Popen | None = None
        self.http = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "comfy_worker.api", "--host", self.host, "--port", str(self.port)]
                + (["--handler", self.handler] if self.handler else []),
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None, f"the API exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"the API did not answer in {timeout} s:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self, token) -> dict:
        token = self.token if token is ... else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, path: str, body: dict | None = None, token=..., timeout: float = 120) -> requests.Response:
        data = None if body is None else json.dumps(body)
        headers = {**self.headers(token), "Content-Type": "application/json"}
        return self.http.post(f"{self.url}{path}", data=data, headers=headers, timeout=timeout)

    def get(self, path: str, token=..., timeout: float = 30) -> requests.Response:
        return self.http.get(f"{self.url}{path}", headers=self.headers(token), timeout=timeout)

    def status(self, job_id: str) -> dict:
        answer = self.get(f"/status/{job_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_final(self, job_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status(job_id)
            if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['status']}:\n{self.log()}"
            time.sleep(0.05)

    def wait_status(self, job_id: str, status: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while (body := self.status(job_id))["status"] != status:
            assert time.monotonic() < deadline, f"job {job_id} never {status}: {body}\n{self.log()}"
            time.sleep(0.05)
        return body

    def runner_pid(self) -> int | None:
        """The pid of the API's job runner (its child ``python -m comfy_worker.job_runner``)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"comfy_worker.job_runner" in cmdline:
                return int(stat.parent.name)
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the API did not stop within {timeout} s after signal {sig}:\n{self.log()}") from None
