"""Async client for one ComfyUI server: HTTP (aiohttp, one pooled session per event loop), the websocket
(``websockets``), readiness and whether the ComfyUI process is still alive (its PID file)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

from comfy_worker.job_errors import JobError

log = logging.getLogger(__name__)

_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
_node_classes: dict[str, dict[str, bool]] = {}  # host -> {class_type: is an OUTPUT_NODE}, from /object_info
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
SHORT_TIMEOUT = aiohttp.ClientTimeout(total=10)
WS_CLOSE_TIMEOUT_S = 2.0  # a websocket whose closing handshake ComfyUI does not answer is cut after this


def shared_session() -> aiohttp.ClientSession:
    """One keep-alive session per event loop, so jobs do not pay a TCP connect per request."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        for old in [k for k in _sessions if k.is_closed()]:
            del _sessions[old]
        session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT, connector=aiohttp.TCPConnector(limit=32))
        _sessions[loop] = session
    return session


async def close_shared_session() -> None:
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def process_state(pid_file: Path) -> tuple[bool | None, int | None]:
    """(alive, pid) of the process named in ``pid_file``; alive is None when there is no usable PID file.

    A zombie (killed, not yet reaped by its parent) counts as dead.
    """
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (OSError, ValueError):
        return None, None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"), pid
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, pid
    except PermissionError:
        return True, pid
    return True, pid


def log_tail(log_file: Path, lines: int = 30, max_chars: int = 4000) -> str:
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-max_chars:]


# what a job's error says happens after ComfyUI died (``Settings.comfy_on_death``), and after it stopped
# answering while its process lives on
AFTER_DEATH = {
    "replaced": "this worker will be replaced",
    "restarted": "ComfyUI is being restarted: send the job again, it runs once ComfyUI is back",
    "stopped": "the worker stops (COMFY_RESTART=0): start it again, or set COMFY_RESTART=1 to have ComfyUI restarted",
}
AFTER_HANG = {
    "replaced": "this worker will be replaced",
    "restarted": "send the job again; if this repeats, ComfyUI's log (COMFY_LOG_FILE) says why",
    "stopped": "send the job again; if this repeats, ComfyUI's log (COMFY_LOG_FILE) says why",
}
RESTART_GRACE_S = 10.0  # a dead ComfyUI still named by the PID file this long after: nothing restarts it


class ComfyClient:
    """HTTP + websocket access to ComfyUI at ``host`` (``127.0.0.1:8188``).

    ``on_death`` (``Settings.comfy_on_death``): what follows ComfyUI's death. ``restarted``: a job waits for
    a dead ComfyUI to come back (``wait_ready``) instead of failing, and its errors say ComfyUI is being
    restarted; ``replaced`` (serverless) and ``stopped``: a dead ComfyUI fails the job at once."""

    def __init__(self, host: str, pid_file: Path, log_file: Path, on_death: str = "replaced"):
        self.host = host
        self.base = f"http://{host}"
        self.pid_file = Path(pid_file)
        self.log_file = Path(log_file)
        self.on_death = on_death
        self.pid: int | None = None  # the process the job's prompt went to (``note_process``)

    @property
    def session(self) -> aiohttp.ClientSession:
        return shared_session()

    @property
    def after_hang(self) -> str:
        """The end of an error about a ComfyUI that stopped answering: what happens now, what to do."""
        return AFTER_HANG[self.on_death]

    # --- process and readiness -------------------------------------------------------------------
    def note_process(self) -> None:
        """Remember the process the PID file names now (call just before queueing): another one there later
        means ComfyUI was restarted under the job, and its prompt is gone."""
        self.pid = process_state(self.pid_file)[1]

    def died_error(self, during: str) -> JobError:
        alive, pid = process_state(self.pid_file)
        dead = self.pid if self.pid is not None else pid
        tail = log_tail(self.log_file)
        details = {"pid": dead, "pid_file": str(self.pid_file), "comfyui_log_tail": tail}
        if pid != dead:
            details["new_pid"] = pid
        return JobError(
            f"ComfyUI (process {dead}) is no longer running ({during}); {AFTER_DEATH[self.on_death]}.",
            details,
            refresh_worker=True,
        )

    def check_alive(self, during: str) -> None:
        """Raise at once if the PID file names a process that is gone, or (after ``note_process``)
        another process than the job's."""
        alive, pid = process_state(self.pid_file)
        if alive is False or (self.pid is not None and pid is not None and pid != self.pid):
            raise self.died_error(during)

    def _dead_while_waiting(self, dead: dict) -> None:
        """``wait_ready`` found the PID file naming a dead process: fail, unless ComfyUI is restarted
        (``on_death``) and its supervisor has had ``RESTART_GRACE_S`` to name the new one."""
        alive, pid = process_state(self.pid_file)
        if alive is not False:
            dead.clear()
            return
        if self.on_death != "restarted":
            raise self.died_error("while waiting for it to start")
        if dead.get("pid") != pid:
            dead.update(pid=pid, since=time.monotonic())
            log.warning("ComfyUI (process %s) is not running: waiting for its restart", pid)
        elif time.monotonic() - dead["since"] > RESTART_GRACE_S:
            raise JobError(
                f"ComfyUI (process {pid}) is no longer running and nothing restarted it within "
                f"{RESTART_GRACE_S:g} s; start the worker again (start.sh restarts ComfyUI when COMFY_RESTART=1).",
                {"pid": pid, "pid_file": str(self.pid_file), "comfyui_log_tail": log_tail(self.log_file)},
                refresh_worker=True,
            )

    async def wait_ready(self, timeout: float) -> None:
        """Wait until ComfyUI answers HTTP. A dead ComfyUI process fails the wait at once, or is waited for
        when ComfyUI is restarted (``on_death``): a job sent during a restart runs once it is back."""
        deadline = time.monotonic() + timeout
        attempt = 0
        dead: dict = {}
        while True:
            self._dead_while_waiting(dead)
            try:
                async with self.session.get(
                    f"{self.base}/system_stats", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    if resp.status == 200:
                        await resp.read()
                        return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            attempt += 1
            if attempt == 1:
                log.info("Waiting for ComfyUI at %s", self.host)
            if time.monotonic() >= deadline:
                raise JobError(
                    f"ComfyUI at {self.host} did not answer within {timeout:g} s; check that it started "
                    "(its log) and COMFY_HOST.",
                    {"host": self.host, "comfyui_log_tail": log_tail(self.log_file)},
                    refresh_worker=True,
                )
            await asyncio.sleep(0.2)

    # --- websocket -------------------------------------------------------------------------------
    async def open_ws(self, client_id: str) -> ClientConnection:
        return await connect(
            f"ws://{self.host}/ws?clientId={client_id}",
            max_size=None,
            compression=None,
            open_timeout=10,
            ping_interval=20,
            ping_timeout=60,
            close_timeout=WS_CLOSE_TIMEOUT_S,  # the library's default (10 s) held jobs (issue 20 #15)
        )

    # --- HTTP ------------------------------------------------------------------------------------
    async def queue_prompt(self, workflow: dict, prompt_id: str, client_id: str, extra_data: dict) -> dict:
        """POST /prompt. Returns ComfyUI's answer; a rejected prompt returns ``{"rejected": body}``."""
        body: dict[str, Any] = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = extra_data
        async with self.session.post(f"{self.base}/prompt", json=body) as resp:
            text = await resp.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = {"raw": text[:2000]}
            if resp.status == 200:
                return data
            if resp.status == 400:
                return {"rejected": data}
            raise JobError(
                f"ComfyUI answered HTTP {resp.status} when the workflow was queued.",
                {"status": resp.status, "body": data},
            )

    async def upload_input(self, name: str, data: bytes) -> dict:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("overwrite", "true")
        async with self.session.post(f"{self.base}/upload/image", data=form) as resp:
            if resp.status != 200:
                raise JobError(
                    f"ComfyUI refused the upload of {name!r} (HTTP {resp.status}).",
                    {"name": name, "status": resp.status, "body": (await resp.text())[:500]},
                )
            return await resp.json()

    async def history(self, prompt_id: str) -> dict | None:
        async with self.session.get(f"{self.base}/history/{prompt_id}", timeout=SHORT_TIMEOUT) as resp:
            resp.raise_for_status()
            return (await resp.json()).get(prompt_id)

    async def view(self, filename: str, subfolder: str, type_: str) -> bytes:
        params = {"filename": filename, "subfolder": subfolder, "type": type_}
        async with self.session.get(f"{self.base}/view", params=params) as resp:
            resp.raise_for_status()
            return await resp.read()

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is the one running (ComfyUI ignores it otherwise)."""
        async with self.session.post(
            f"{self.base}/interrupt", json={"prompt_id": prompt_id}, timeout=SHORT_TIMEOUT
        ) as resp:
            await resp.read()

    async def queue_state(self, prompt_id: str) -> str | None:
        """``"running"``, ``"pending"`` or None (not in ComfyUI's queue), from ``GET /queue``."""
        async with self.session.get(f"{self.base}/queue", timeout=SHORT_TIMEOUT) as resp:
            resp.raise_for_status()
            queue = await resp.json()
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            items = queue.get(key) or []
            if any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items):
                return state
        return None

    async def is_running(self, prompt_id: str) -> bool:
        return await self.queue_state(prompt_id) == "running"

    async def output_node_classes(self, class_types: set[str]) -> dict[str, bool]:
        """{class_type: OUTPUT_NODE} for every node class ComfyUI knows, from ``/object_info``: fetched once
        per process and host, again when a class is unknown (nodes installed since)."""
        known = _node_classes.get(self.host)
        if known is None or not class_types <= known.keys():
            async with self.session.get(f"{self.base}/object_info", timeout=aiohttp.ClientTimeout(total=60)) as resp:
                resp.raise_for_status()
                info = await resp.json()
            known = {name: bool(v.get("output_node")) for name, v in info.items() if isinstance(v, dict)}
            _node_classes[self.host] = known
        return known

    async def delete_queued(self, prompt_id: str) -> None:
        async with self.session.post(f"{self.base}/queue", json={"delete": [prompt_id]}, timeout=SHORT_TIMEOUT) as resp:
            await resp.read()
