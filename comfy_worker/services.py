"""The services of a start, by mode (docs/architecture.md, "Paths and modes"), supervised from Python.

``python -m comfy_worker.services`` (the last step of ``start.sh``):

1. GPU check without importing torch: a CUDA device is an NVIDIA device node or driver entry
   (``/dev/nvidia0``, ``/proc/driver/nvidia/gpus/*``) not hidden by ``CUDA_VISIBLE_DEVICES``. None:
   pod/local add ``--cpu`` with a warning; serverless stops with a clear message unless ``ALLOW_CPU=1``.
2. ComfyUI (``main.py --listen <host> --port COMFY_PORT [--cpu] COMFY_ARGS``) in its own process
   group, without the worker's own secrets in its environment (``settings.comfyui_env``: custom nodes
   see only ``HF_TOKEN`` and ``CIVITAI_TOKEN``); its PID in ``COMFY_PID_FILE``, its output in ``COMFY_LOG_FILE``. The supervisor waits until
   it answers (``/system_stats``).
3. ``WARMUP_WORKFLOW`` runs once (warmup.py); a failure is a loud warning.
4. The handler, only now (it takes no job before ComfyUI answers): ``python handler.py`` in serverless,
   the worker's own HTTP API (``python -m comfy_worker.api``, running ``handler.handler``) on ``API_PORT``
   in pod (0.0.0.0, with a token) and local (127.0.0.1). Its imports (the RunPod SDK, aiohttp, boto3,
   FastAPI: about 2 s) are paid while ComfyUI boots: the handler process is spawned beside ComfyUI as
   ``python -m comfy_worker.services --preload-handler handler.py ARGS``, which imports the handler
   module (or ``-m comfy_worker.api ARGS``, whose ``api.preload`` imports FastAPI and starts the job
   runner, which imports the handler), and then blocks on its stdin; the supervisor writes the go byte
   once ComfyUI answers and the warm-up is done, and only then does it run ``handler.py`` as
   ``__main__`` (the worker loop) or the API's ``main``. Closed without the byte, it exits without a job.
5. JupyterLab on ``JUPYTER_PORT`` rooted at ``VOLUME_ROOT`` (pod/local, or ``ENABLE_JUPYTER=1``), with
   a token: ``JUPYTER_PASSWORD``, else one generated into ``$VOLUME_ROOT/.jupyter-token`` (0600) and
   printed once; ``JUPYTER_AUTH=none`` turns it off. The token reaches Jupyter by its environment.

Then it watches: ComfyUI exits → restarted when ``COMFY_RESTART`` is on, else every child is stopped
and the supervisor exits 1. SIGHUP (sent by ``apply_config.sh`` once ComfyUI has no job, see
comfy_restart.py) restarts ComfyUI and never ends the container. The handler exiting ends everything with its code. SIGTERM/SIGINT: SIGTERM to every child's
process group, SIGKILL to what is left after 8 s, exit 0: every child is gone within 10 s.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from comfy_worker.settings import Settings, comfyui_env
from comfy_worker.token_file import stored_token

log = logging.getLogger(__spec__.name if __name__ == "__main__" else __name__)  # also under python -m

STOP_GRACE_S = 8.0
TOKEN_FILE = ".jupyter-token"


def supervisor_pid_file(settings: Settings) -> Path:
    return settings.comfy_pid_file.with_name(settings.comfy_pid_file.name + ".supervisor")


def restart_due_file(settings: Settings) -> Path:
    """Written by apply_config.sh while a restart of ComfyUI is due (comfy_restart.py); removed
    whenever ComfyUI is started."""
    return settings.comfy_pid_file.with_name(settings.comfy_pid_file.name + ".restart-due")


def has_cuda_device(env=None, dev: str = "/dev", proc: str = "/proc/driver/nvidia/gpus") -> bool:
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1", "none", "NoDevFiles"):
        return False
    return bool(glob.glob(os.path.join(dev, "nvidia[0-9]*")) or glob.glob(os.path.join(proc, "*")))


def comfy_command(settings: Settings, cpu: bool) -> list[str]:
    listen = "0.0.0.0" if settings.mode == "pod" else "127.0.0.1"
    cmd = [sys.executable, "main.py", "--listen", listen, "--port", str(settings.comfy_port)]
    return cmd + (["--cpu"] if cpu else []) + shlex.split(settings.comfy_args)


def handler_command(settings: Settings) -> list[str]:
    handler = str(settings.app_dir / "handler.py")
    if settings.mode == "serverless":
        return [sys.executable, handler]
    host = "0.0.0.0" if settings.mode == "pod" else "127.0.0.1"
    return [sys.executable, "-m", "comfy_worker.api", "--host", host, "--port", str(settings.api_port)]


PRELOAD_FLAG = "--preload-handler"
GO = b"1"


def preloaded(command: list[str]) -> list[str]:
    """``handler_command`` as a process that imports the handler now and runs it on the go byte."""
    return [command[0], "-m", "comfy_worker.services", PRELOAD_FLAG, *command[1:]]


def run_preloaded_handler(args: list[str]) -> int:
    """The child of ``preloaded``: import the handler module (the slow part), wait for the go byte on
    stdin, then run ``handler.py`` as ``__main__`` with its own arguments; or, for ``-m comfy_worker.api
    ARGS``, import the API and start its job runner (``api.preload``), then ``api.main(ARGS)``."""
    import runpy

    if args[0] == "-m":
        module = importlib.import_module(args[1])  # comfy_worker.api: FastAPI, uvicorn; its runner: handler.py
        module.preload()
        if sys.stdin.buffer.read(1) != GO:
            return 0
        sys.stdin.close()
        sys.argv = [args[1], *args[2:]]
        return module.main(args[2:])
    script = Path(args[0]).resolve()
    sys.argv = [str(script), *args[1:]]
    sys.path.insert(0, str(script.parent))
    module = importlib.import_module(script.stem)  # e.g. ``import handler``: aiohttp, boto3
    if callable(getattr(module, "preload", None)):
        module.preload()  # handler.py: the RunPod SDK
    if sys.stdin.buffer.read(1) != GO:
        return 0  # the supervisor stopped before ComfyUI answered: no job was ever taken
    sys.stdin.close()
    runpy.run_path(str(script), run_name="__main__")
    return 0


def jupyter_token(settings: Settings) -> tuple[str, bool]:
    """(token, generated now). JUPYTER_PASSWORD, else the volume's token file, else a new one (0600)."""
    if settings.jupyter_password:
        return settings.jupyter_password, False
    return stored_token(settings.volume_root / TOKEN_FILE, nbytes=24)


def jupyter_command(settings: Settings) -> list[str]:
    listen = "0.0.0.0" if settings.mode == "pod" else "127.0.0.1"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={listen}"]
    cmd += [f"--ServerApp.port={settings.jupyter_port}", f"--ServerApp.root_dir={settings.volume_root}"]
    cmd += ["--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    if settings.jupyter_auth == "none":
        cmd += ["--IdentityProvider.token=", "--ServerApp.password="]
    return cmd


_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\):\s*(.+?)\s*$", re.M)


def import_failures(comfy_log: str) -> list[str]:
    """The custom node folders ComfyUI's start log lists as ``(IMPORT FAILED): <path>``."""
    return [Path(m.group(1)).name for m in _IMPORT_FAILED.finditer(comfy_log)]


def comfy_unreachable(settings: Settings, timeout: float = 2.0) -> str | None:
    """Why ComfyUI does not answer ``/system_stats`` at COMFY_HOST (the cause), None when it answers."""
    try:
        with urllib.request.urlopen(f"http://{settings.comfy_host}/system_stats", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", None) or err)


def comfy_ready(settings: Settings) -> bool:
    return comfy_unreachable(settings) is None


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.restart_asked = False
        self.cpu = False

    # -- children --
    def spawn(
        self,
        name: str,
        cmd: list[str],
        cwd: Path,
        env: dict | None = None,
        log_file: Path | None = None,
        stdin=subprocess.DEVNULL,
        said: str = "started",
    ):
        out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        finally:
            if out:
                out.close()
        self.children[name] = proc
        log.info("%s %s (pid %d)", name, said, proc.pid)
        return proc

    def start_comfy(self) -> subprocess.Popen:
        settings = self.settings
        settings.comfy_log_file.parent.mkdir(parents=True, exist_ok=True)
        settings.comfy_log_file.write_bytes(b"")
        restart_due_file(settings).unlink(missing_ok=True)  # this ComfyUI loads every node there is
        proc = self.spawn(
            "ComfyUI",
            comfy_command(settings, self.cpu),
            settings.comfyui_path,
            env=comfyui_env(),  # without the worker's own secrets: custom nodes run in this process
            log_file=settings.comfy_log_file,
        )
        tmp = settings.comfy_pid_file.with_name(settings.comfy_pid_file.name + ".tmp")
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, settings.comfy_pid_file)
        return proc

    def wait_comfy(self) -> bool:
        deadline = time.monotonic() + self.settings.comfy_ready_timeout
        proc = self.children["ComfyUI"]
        while time.monotonic() < deadline and not self.stopping:
            if proc.poll() is not None:
                log.error("ComfyUI exited with %s before answering; its log: %s", proc.returncode, self.log_tail())
                return False
            if comfy_ready(self.settings):
                log.info("ComfyUI answers on %s", self.settings.comfy_host)
                self.report_import_failures()
                return True
            time.sleep(0.05)  # each tenth of a second here is a tenth on the time to the first job
        if not self.stopping:
            log.error("ComfyUI did not answer within %.0f s (COMFY_READY_TIMEOUT)", self.settings.comfy_ready_timeout)
        return False

    def report_import_failures(self) -> None:
        """Say loudly which custom nodes ComfyUI could not import: otherwise only its own log knows,
        and a job using them fails with "node X does not exist"."""
        try:
            text = self.settings.comfy_log_file.read_text(errors="replace")
        except OSError:
            return
        for folder in import_failures(text):
            log.warning(
                "custom node %s failed to import in ComfyUI: its nodes are missing; the reason is in %s",
                folder,
                self.settings.comfy_log_file,
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.settings.comfy_log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_all(self) -> None:
        alive = {n: p for n, p in self.children.items() if p.poll() is None}
        for name, proc in alive.items():
            log.info("stopping %s (pid %d)", name, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in alive.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for name, proc in alive.items():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # also what is left of its group
                if proc.poll() is None:
                    log.warning("%s did not stop within %.0f s: killed", name, STOP_GRACE_S)
            except ProcessLookupError:
                pass
            proc.wait()

    def restart_comfy(self) -> bool:
        old = self.children.get("ComfyUI")
        if old is not None and old.poll() is None:
            os.killpg(old.pid, signal.SIGTERM)
            try:
                old.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(old.pid, signal.SIGKILL)
                old.wait()
        self.start_comfy()
        return self.wait_comfy()

    # -- the run --
    def on_signal(self, signum, frame):
        if signum == signal.SIGHUP:
            self.restart_asked = True
        else:
            self.stopping = True

    def run(self) -> int:
        settings = self.settings
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        pid_file = supervisor_pid_file(settings)
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            return self._run()
        finally:
            self.stop_all()
            pid_file.unlink(missing_ok=True)

    def _run(self) -> int:
        settings = self.settings
        if not has_cuda_device():
            if settings.mode == "serverless" and not settings.allow_cpu:
                log.error(
                    "no CUDA device found: this serverless worker cannot run ComfyUI on a GPU; pick a GPU "
                    "type for the endpoint, or set ALLOW_CPU=1 to run on the CPU (slow)"
                )
                return 1
            log.warning("WARNING: no CUDA device: ComfyUI runs on the CPU (--cpu), which is slow")
            self.cpu = True
        self.start_comfy()
        handler = self.spawn(
            "handler",
            preloaded(handler_command(settings)),
            settings.app_dir,
            stdin=subprocess.PIPE,
            said="loading while ComfyUI starts; it takes no job before the go",
        )
        if not self.wait_comfy():
            return 0 if self.stopping else 1
        if settings.warmup_workflow is not None and not self.stopping:
            from comfy_worker.warmup import run_warmup

            run_warmup(settings)
        if self.stopping:
            return 0
        if handler.poll() is not None:
            log.error("the handler exited with %s while loading (its output is above): stopping", handler.returncode)
            return handler.returncode or 1
        try:
            handler.stdin.write(GO)
            handler.stdin.close()
        except OSError:  # it died just now: watch() reports its exit code
            pass
        log.info("handler started (pid %d)", handler.pid)
        if settings.enable_jupyter:
            env = dict(os.environ)
            if settings.jupyter_auth == "none":
                env.pop("JUPYTER_TOKEN", None)
                log.warning("WARNING: JupyterLab runs WITHOUT a token (JUPYTER_AUTH=none)")
            else:
                token, generated = jupyter_token(settings)
                env["JUPYTER_TOKEN"] = token
                if generated:
                    print(f"JupyterLab token (saved in {settings.volume_root / TOKEN_FILE}): {token}", flush=True)
                else:
                    log.info(
                        "JupyterLab asks for the token (JUPYTER_PASSWORD or %s)", settings.volume_root / TOKEN_FILE
                    )
            self.spawn("Jupyter", jupyter_command(settings), settings.volume_root, env=env)
        log.info(
            "ready (%s): ComfyUI http://%s%s%s",
            settings.mode,
            settings.comfy_host,
            "" if settings.mode == "serverless" else f"  API http://127.0.0.1:{settings.api_port}",
            f"  Jupyter http://127.0.0.1:{settings.jupyter_port}" if settings.enable_jupyter else "",
        )
        return self.watch()

    def watch(self) -> int:
        settings = self.settings
        while not self.stopping:
            time.sleep(0.2)
            if self.restart_asked:
                self.restart_asked = False
                log.info("restarting ComfyUI (asked by apply_config.sh)")
                if not self.restart_comfy() and not self.stopping:
                    log.error("ComfyUI did not come back after the restart")
                continue
            comfy = self.children["ComfyUI"]
            if comfy.poll() is not None and not self.stopping:
                log.error("ComfyUI exited with %s; its log ends with:\n%s", comfy.returncode, self.log_tail())
                if not settings.comfy_restart:
                    log.error("stopping the worker (COMFY_RESTART=0): RunPod replaces it")
                    return 1
                log.warning("restarting ComfyUI (COMFY_RESTART=1)")
                self.restart_comfy()
                continue
            handler = self.children["handler"]
            if handler.poll() is not None and not self.stopping:
                log.error("the handler exited with %s: stopping the worker", handler.returncode)
                return handler.returncode or 1
            jupyter = self.children.get("Jupyter")
            if jupyter is not None and jupyter.poll() is not None:
                log.warning("JupyterLab exited with %s; the worker goes on without it", jupyter.returncode)
                del self.children["Jupyter"]
        return 0


def main() -> int:
    if sys.argv[1:2] == [PRELOAD_FLAG]:
        return run_preloaded_handler(sys.argv[2:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [start] %(message)s", datefmt="%H:%M:%S")
    try:
        settings = Settings.from_env()
    except ValueError as err:
        log.error("%s", err)
        return 2
    return Supervisor(settings).run()


if __name__ == "__main__":
    sys.exit(main())
