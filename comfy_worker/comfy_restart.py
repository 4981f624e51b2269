"""Restarting ComfyUI from ``apply_config.sh`` without cutting a job short.

A restart (to load nodes that changed) is asked of the running supervisor (services.py) by SIGHUP.
Before that, ComfyUI's own queue (``GET /queue``: ``queue_running`` and ``queue_pending``) is polled
until it is empty, saying what it waits for (the prompt ids) and how long it may wait, so the job
running now completes and the restart comes after it (the queue must stay empty for a second, so the
job whose prompt just ended has fetched its result). ``--now`` restarts at once (the running job
then fails). The wait is bounded: past it ComfyUI is not restarted and the run says so.

After the SIGHUP apply_config.sh waits until the new ComfyUI answers (``COMFY_READY_TIMEOUT`` at most)
and says, in its own output, which custom nodes that ComfyUI failed to import (its log, which each
start writes anew, lists them as ``IMPORT FAILED``): success is reported only once the nodes are loaded.

Until ComfyUI has really been restarted, the restart stays due: ``<COMFY_PID_FILE>.restart-due``
holds what changed, the next ``apply_config.sh`` restarts ComfyUI even when nothing changes any more,
and the supervisor removes the file whenever it starts ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.request

from comfy_worker.services import comfy_ready, import_failures, restart_due_file, supervisor_pid_file
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.5
SAY_EVERY_S = 30.0
SETTLE_S = 1.0  # the queue stays empty this long: a prompt that just ended leaves its job time to collect outputs


def queue_state(settings: Settings) -> tuple[list[str], list[str]] | None:
    """(running prompt ids, waiting prompt ids) from ComfyUI's ``GET /queue``; None when it does not
    answer (then nothing runs on it)."""
    try:
        with urllib.request.urlopen(f"http://{settings.comfy_host}/queue", timeout=5) as r:
            data = json.load(r)
    except (OSError, ValueError):
        return None

    def ids(key: str) -> list[str]:
        items = data.get(key) if isinstance(data, dict) else None
        return [str(i[1]) if isinstance(i, list) and len(i) > 1 else "?" for i in items or []]

    return ids("queue_running"), ids("queue_pending")


def _jobs(running: list[str], pending: list[str]) -> str:
    shown = ", ".join(running[:3]) + (f" and {len(running) - 3} more" if len(running) > 3 else "")
    return f"{len(running)} running (prompt {shown or '-'}), {len(pending)} waiting"


def wait_until_idle(settings: Settings, max_wait: float, stop: threading.Event) -> bool:
    """Poll ComfyUI's queue until it is empty (True), saying once what it waits for and then every
    SAY_EVERY_S how it goes; False after ``max_wait`` seconds or when ``stop`` is set."""
    started = time.monotonic()
    said = 0.0
    idle_since: float | None = None
    while True:
        state = queue_state(settings)
        if state is None:
            log.info("ComfyUI does not answer on %s: no job to wait for", settings.comfy_host)
            return True
        if not state[0] and not state[1]:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= SETTLE_S:  # the job that ran collects its outputs meanwhile
                if said:
                    log.info("ComfyUI's jobs are done (after %.0f s)", time.monotonic() - started)
                return True
            if stop.wait(POLL_S):
                return False
            continue
        idle_since = None
        waited = time.monotonic() - started
        if not said:
            log.info(
                "ComfyUI has jobs: %s; waiting for them to finish before restarting it (at most %g s; "
                "apply_config.sh --now restarts at once, and the running job then fails)",
                _jobs(*state),
                max_wait,
            )
            said = time.monotonic()
        elif time.monotonic() - said >= SAY_EVERY_S:
            log.info("still waiting for ComfyUI's jobs: %s (%.0f s of at most %g s)", _jobs(*state), waited, max_wait)
            said = time.monotonic()
        if waited >= max_wait:
            log.error("ComfyUI still has jobs after %g s: %s", max_wait, _jobs(*state))
            return False
        if stop.wait(POLL_S):
            return False


def due(settings: Settings) -> str | None:
    """What an earlier apply_config.sh changed that ComfyUI has not loaded yet, or None."""
    try:
        return restart_due_file(settings).read_text(encoding="utf-8").strip() or "nodes changed"
    except OSError:
        return None


def mark_due(settings: Settings, what: str) -> None:
    try:
        restart_due_file(settings).write_text(what + "\n", encoding="utf-8")
    except OSError as err:
        log.warning("cannot record that a ComfyUI restart is due (%s): %s", restart_due_file(settings), err)


def request_restart(settings: Settings) -> bool:
    """Ask the running supervisor (services.py) to restart ComfyUI: SIGHUP to its PID file."""
    try:
        pid = int(supervisor_pid_file(settings).read_text().strip())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False


def supervisor_running(settings: Settings) -> bool:
    try:
        os.kill(int(supervisor_pid_file(settings).read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def comfy_pid(settings: Settings) -> int | None:
    """The pid ComfyUI's PID file names, None without one."""
    try:
        return int(settings.comfy_pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_back(settings: Settings, old_pid: int | None, stop: threading.Event) -> bool:
    """After a restart was asked: True once a new ComfyUI process (not ``old_pid``) answers, False after
    ``COMFY_READY_TIMEOUT`` seconds or when ``stop`` is set."""
    deadline = time.monotonic() + settings.comfy_ready_timeout
    while time.monotonic() < deadline:
        pid = comfy_pid(settings)
        if pid is not None and pid != old_pid and comfy_ready(settings):
            return True
        if stop.wait(POLL_S):
            return False
    return False


def failed_imports(settings: Settings) -> list[str]:
    """The custom node folders the running ComfyUI's log lists as failed to import."""
    try:
        return import_failures(settings.comfy_log_file.read_text(errors="replace"))
    except OSError:
        return []
