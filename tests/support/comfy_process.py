"""A real ComfyUI process on CPU for the tests: its own checkout (a local clone of the cached
upstream repo), a free port, a PID file and a log file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT / ".cache" / "upstream" / "ComfyUI"
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_upstream() -> Path:
    if not (UPSTREAM / "main.py").exists():
        raise RuntimeError(f"{UPSTREAM} is missing: run scripts/setup_env.sh (or scripts/test.sh) first")
    return UPSTREAM


def clone_comfyui(dest: Path) -> Path:
    """A fresh ComfyUI checkout at v0.3.75 (hardlinked local clone: about half a second)."""
    subprocess.run(
        ["git", "clone", "-q", "--branch", "v0.3.75", str(require_upstream()), str(dest)],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    return dest


class ComfyUIProcess:
    """``python main.py --cpu`` on a free port, started from ``path`` (a ComfyUI checkout)."""

    def __init__(self, path: Path, run_dir: Path, extra_args: list[str] | None = None):
        self.path = Path(path)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = extra_args or []
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.run_dir / "comfyui.log"
        self.pid_file = self.run_dir / "comfyui.pid"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def install_test_nodes(self) -> None:
        dest = self.path / "custom_nodes" / "comfy_worker_test_nodes"
        if not dest.exists():
            shutil.copytree(TEST_NODES, dest)

    def start(self, timeout: float = 90, port: int | None = None) -> ComfyUIProcess:
        """Start it on ``port`` (a restart on the same port, as the worker's supervisor does) or a free one."""
        self.port = port or free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), *self.extra_args],
            cwd=self.path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.pid_file.write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"ComfyUI not ready after {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like an OOM kill: no cleanup happens in ComfyUI."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def ensure_running(self) -> ComfyUIProcess:
        return self if self.alive() else self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.load(r)

    def env(self) -> dict[str, str]:
        """Environment variables that point the worker at this ComfyUI."""
        return {
            "COMFY_HOST": self.host,
            "COMFYUI_PATH": str(self.path),
            "COMFY_PID_FILE": str(self.pid_file),
        }
