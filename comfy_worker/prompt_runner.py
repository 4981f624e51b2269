"""Runs one API-format workflow on ComfyUI and follows it over the websocket until it ends.

The websocket is opened before the prompt is queued (the prompt id is chosen here, so no message can
be missed). A dropped socket is reopened and ``/history`` consulted (and polled while the new socket is
silent); a dead ComfyUI process (or another one in the PID file: ComfyUI was restarted under the job)
ends the job at once, while a job that starts during a restart waits for ComfyUI to be back; on timeout the prompt is removed from the queue,
or interrupted if it is running; the same happens when the job is cancelled (``abort``).

A cancellation or timeout may come while ``POST /prompt`` is on its way: ComfyUI may queue the prompt after
the job ended. So the POST runs in its own task (a cancelled job does not cut it), ``abort`` waits for its
answer (the moment the prompt is surely queued) before deleting or interrupting the prompt, and a POST that
outlives that wait (or the job's deadline) is followed up in the background: its prompt is removed the
moment ComfyUI answers. An aborted runner never sends the POST.

Only well-formed messages that carry this prompt's id act on the job: a custom node may broadcast
anything (a string payload, a message without ``prompt_id``) and that is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from comfy_worker import outputs
from comfy_worker.comfy_client import HTTP_TIMEOUT, ComfyClient
from comfy_worker.job_errors import JobError
from comfy_worker.model_folders import describe_missing_model

log = logging.getLogger(__name__)

RECONNECT_GIVE_UP_S = 30.0
INTERRUPT_GRACE_S = 10.0
HISTORY_POLL_S = 1.5  # after a reconnect: ask /history when the socket was silent this long
_WS_ERRORS = (ConnectionClosed, InvalidHandshake, OSError, asyncio.TimeoutError)
_closing: set[asyncio.Task] = set()  # websockets being closed in the background (referenced until done)
_follow_ups: set[asyncio.Task] = set()  # prompts of ended jobs removed once their POST is answered
# a dead job runner's POST /prompt may still queue its prompt this long (the POST's own read timeout)
LATE_PROMPT_WAIT_S = float(HTTP_TIMEOUT.sock_read)
LATE_PROMPT_POLL_S = 0.2


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _parse(raw: Any) -> dict | None:
    """A websocket text frame as a message object; None for binary frames (previews) and anything
    that is not a JSON object."""
    if not isinstance(raw, str):
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        log.debug("Ignoring a websocket message that is not JSON: %.200s", raw)
        return None
    return msg if isinstance(msg, dict) else None


async def _close_ws(ws) -> None:
    try:
        await ws.close()
    except Exception as exc:  # noqa: BLE001 - nothing waits for this close: never let it raise
        log.debug("Closing the websocket: %s", exc)
    finally:
        ws.transport.abort()  # no-op once closed; ends the connection if this task was cancelled


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, dict] = field(default_factory=dict)  # node id -> ComfyUI "ui" output
    queue_ms: int = 0
    execution_ms: int = 0
    errors: list[str] = field(default_factory=list)  # non-fatal: parts of the workflow ComfyUI did not run


def _options(input_config: Any) -> list | None:
    """The allowed values from a ComfyUI input config: ``[[...], {}]`` or ``["COMBO", {"options": [...]}]``."""
    if not isinstance(input_config, list) or not input_config:
        return None
    if isinstance(input_config[0], list):
        return input_config[0]
    if len(input_config) > 1 and isinstance(input_config[1], dict) and isinstance(input_config[1].get("options"), list):
        return input_config[1]["options"]
    return None


def _short_list(values: list, limit: int = 10) -> str:
    if not values:
        return "none are installed"
    shown = ", ".join(map(repr, values[:limit]))
    return f"available: {shown}" + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _problems(node_errors: dict, workflow: dict, comfyui_path: Path | None = None) -> list[dict]:
    """ComfyUI's node errors as records; a model file it rejects also says which folder its loader
    reads and where a file of that name lies (``model_folders.describe_missing_model``)."""
    problems = []
    for node_id, entry in node_errors.items():
        if not isinstance(entry, dict):
            continue
        class_type = entry.get("class_type") or (workflow.get(node_id) or {}).get("class_type")
        for err in entry.get("errors", []):
            info = err.get("extra_info") or {}
            problem = {
                "node_id": node_id,
                "class_type": class_type,
                "type": err.get("type"),
                "message": err.get("message"),
                "details": err.get("details"),
            }
            if info.get("input_name"):
                problem["input"] = info["input_name"]
            if err.get("type") == "value_not_in_list":
                problem["received_value"] = info.get("received_value")
                problem["available_values"] = _options(info.get("input_config")) or []
                if comfyui_path is not None and problem.get("input"):
                    hint = describe_missing_model(
                        class_type,
                        problem["input"],
                        problem["received_value"],
                        comfyui_path,
                        problem["available_values"],
                    )
                    if hint:
                        problem["model_folder"] = hint
            problems.append(problem)
    return problems


def _describe(problem: dict) -> str:
    """``node 4 (CheckpointLoaderSimple) input 'ckpt_name': 'x' is not one of the values ...``"""
    where = f"node {problem['node_id']} ({problem['class_type']})"
    if problem.get("input"):
        where += f" input {problem['input']!r}"
    if problem["type"] == "value_not_in_list":
        what = (
            f"{problem['received_value']!r} is not one of the values ComfyUI offers "
            f"({_short_list(problem['available_values'])})"
        )
        if problem.get("model_folder"):
            what += f"; {problem['model_folder']}"
    else:
        what = f"{problem['message']}" + (f": {problem['details']}" if problem.get("details") else "")
    return f"{where}: {what}"


def rejection_error(body: dict, workflow: dict, comfyui_path: Path | None = None) -> JobError:
    """A readable error for ComfyUI's HTTP 400 answer to ``POST /prompt`` (validation failure)."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {"message": str(body.get("error", body))}
    node_errors = body.get("node_errors") or {}
    problems = _problems(node_errors, workflow, comfyui_path)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s), see details)" if len(problems) > 1 else ""
        message = f"ComfyUI rejected the workflow: {_describe(problems[0])}{more}."
    else:
        text = error.get("message") or "invalid prompt"
        if error.get("details"):
            text += f": {error['details']}"
        message = f"ComfyUI rejected the workflow: {text}."
    return JobError(message, {"error": error, "problems": problems, "node_errors": node_errors})


def skipped_parts(node_errors: dict, workflow: dict, comfyui_path: Path | None = None) -> list[str]:
    """One sentence per node ComfyUI rejected while it accepted the rest of the prompt (HTTP 200 with
    ``node_errors``: the outputs that depend on the node are silently not run)."""
    lines = []
    for node_id, entry in node_errors.items():
        problems = _problems({node_id: entry}, workflow, comfyui_path)
        if not problems:
            continue
        reason = "; ".join(_describe(p) for p in problems)
        outputs = [str(o) for o in (entry.get("dependent_outputs") or []) if str(o) != str(node_id)]
        labels = ", ".join(f"{o} ({(workflow.get(o) or {}).get('class_type')})" for o in outputs)
        skipped = f"so output node(s) {labels} did not run" if outputs else "so it did not run"
        lines.append(f"ComfyUI rejected {reason}; {skipped} (the rest of the workflow ran).")
    return lines


def execution_error(data: dict) -> JobError:
    traceback = data.get("traceback") or []
    node_id = data.get("node_id")
    class_type = data.get("node_type")
    exc_msg = str(data.get("exception_message", "")).strip()
    return JobError(
        f"ComfyUI failed in node {node_id} ({class_type}): {data.get('exception_type', 'error')}: {exc_msg}",
        {
            "prompt_id": data.get("prompt_id"),
            "node_id": node_id,
            "class_type": class_type,
            "exception_type": data.get("exception_type"),
            "exception_message": exc_msg,
            "traceback": traceback[-8:] if isinstance(traceback, list) else traceback,
            "executed": data.get("executed", []),
        },
    )


class PromptRunner:
    """One prompt from queueing to its end. ``on_progress(dict)`` gets every progress event."""

    def __init__(
        self,
        client: ComfyClient,
        workflow: dict,
        *,
        timeout: float,
        ready_timeout: float,
        extra_data: dict | None = None,
        on_progress: Callable[[dict], None] | None = None,
        deadline: float | None = None,
        comfyui_path: Path | None = None,
        on_queue: Callable[[], None] | None = None,
    ):
        """``deadline`` (``time.monotonic()``) ends the job; by default ``timeout`` s after queueing.
        ``comfyui_path`` lets a rejected model file be explained (which folder its loader reads).
        ``on_queue()`` is called just before the prompt is queued (``prompt_id`` and ``submitted_wall`` set)."""
        self.comfyui_path = comfyui_path
        self.on_queue = on_queue
        self.client = client
        self.workflow = workflow
        self.timeout = timeout
        self.deadline = deadline
        self.ready_timeout = ready_timeout
        self.extra_data = extra_data or {}
        self.on_progress = on_progress
        self.client_id = uuid.uuid4().hex
        self.prompt_id = str(uuid.uuid4())
        self.result = RunResult(self.prompt_id)
        self.ws = None
        self.done = False
        self.reconnected = False
        self.history_used = False
        self.submitted = 0.0
        self.submitted_wall: float | None = None  # time.time() just before queueing (files older are not ours)
        self.aborted = False  # the job was cancelled (``abort``): the prompt is never sent from now on
        self.post: asyncio.Task | None = None  # POST /prompt once sent (ComfyUI may queue the prompt until it ends)
        self.started: float | None = None
        self.current_node: str | None = None
        self.nodes_done: set[str] = set()
        self.interrupt_error: str | None = None  # why the last stop() could not reach ComfyUI

    # --- main flow -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the websocket (waiting for ComfyUI to be ready if needed). Call before uploads/queueing."""
        if self.ws is None:
            self.ws = await self._connect_first()

    async def close(self) -> None:
        """Close the websocket without waiting for ComfyUI's side of the closing handshake: it ends in the
        background (cut after ``WS_CLOSE_TIMEOUT_S`` when ComfyUI does not answer), so the job never
        waits for it."""
        if self.ws is not None:
            ws, self.ws = self.ws, None
            task = asyncio.create_task(_close_ws(ws))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def run(self) -> RunResult:
        await self.open()
        try:
            self.submitted = time.monotonic()
            self.submitted_wall = time.time()
            if self.deadline is None:
                self.deadline = self.submitted + self.timeout
            self.client.note_process()  # another ComfyUI process later: it was restarted, the prompt is gone
            if self.on_queue is not None:
                self.on_queue()
            answer = await self._queue()
            if "rejected" in answer:
                raise rejection_error(answer["rejected"], self.workflow, self.comfyui_path)
            if answer.get("node_errors"):
                self.result.errors = skipped_parts(answer["node_errors"], self.workflow, self.comfyui_path)
                for line in self.result.errors:
                    log.warning("%s", line)
            log.info("Queued prompt %s", self.prompt_id)
            await self._watch()
            if self.reconnected and not self.history_used:
                await self._outputs_from_history()
        except asyncio.CancelledError:  # the job was cancelled (RunPod cancel or endpoint timeout)
            await self.abort()
            raise
        finally:
            await self.close()
        finished = time.monotonic()
        if self.started is not None and not self.result.execution_ms:
            self.result.queue_ms = round((self.started - self.submitted) * 1000)
            self.result.execution_ms = round((finished - self.started) * 1000)
        return self.result

    async def _queue(self) -> dict:
        """Send POST /prompt (never once aborted, nor with a cancellation pending) in its own task, so a
        cancelled job does not cut it half-sent, and wait for the answer until the deadline; a POST still
        unanswered then has its prompt removed once ComfyUI answers (``_follow_up``)."""
        if self.aborted or asyncio.current_task().cancelling():
            raise asyncio.CancelledError  # the job was cancelled just before the prompt was sent: nothing is sent
        self.post = asyncio.create_task(
            self.client.queue_prompt(self.workflow, self.prompt_id, self.client_id, self.extra_data)
        )
        try:
            # a ComfyUI that does not answer must not hold the job past its deadline
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await asyncio.shield(self.post)
        except TimeoutError:
            self._follow_up()
            raise

    def _follow_up(self) -> None:
        """Remove the prompt in the background once its unanswered POST ends (queued then, or never): delete
        it from the queue, interrupt it if it runs and wait (up to INTERRUPT_GRACE_S) for it to stop."""

        async def remove() -> None:
            with contextlib.suppress(Exception):
                await self.post
            try:
                async with asyncio.timeout(INTERRUPT_GRACE_S):
                    await self.client.delete_queued(self.prompt_id)
                    if await self.client.is_running(self.prompt_id):
                        await self.client.interrupt(self.prompt_id)
                        while await self.client.is_running(self.prompt_id):  # it stops at its next step
                            await asyncio.sleep(0.1)
                log.info("Prompt %s of an ended job was removed from ComfyUI once it was queued", self.prompt_id)
            except Exception as exc:  # noqa: BLE001 - nobody waits for this task
                log.warning("Could not remove prompt %s of an ended job from ComfyUI: %s", self.prompt_id, exc)

        task = asyncio.create_task(remove())
        _follow_ups.add(task)
        task.add_done_callback(_follow_ups.discard)

    async def _posted(self) -> bool:
        """Whether the prompt may be in ComfyUI: wait (up to INTERRUPT_GRACE_S) for a POST on its way to
        be answered; one still unanswered then is followed up in the background."""
        if self.post is None:
            return False
        if not self.post.done():
            await asyncio.wait([self.post], timeout=INTERRUPT_GRACE_S)
            if not self.post.done():
                self._follow_up()
                return True
        if self.post.cancelled() or self.post.exception() is not None:
            return True  # it may have reached ComfyUI all the same
        return "rejected" not in self.post.result()

    async def _connect_first(self):
        try:
            return await self.client.open_ws(self.client_id)
        except _WS_ERRORS:
            await self.client.wait_ready(self.ready_timeout)
            return await self.client.open_ws(self.client_id)

    async def _watch(self) -> None:
        deadline = self.deadline
        while not self.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._expire()
            # after a reconnect ComfyUI may have dropped the new socket without closing it: poll /history
            wait = min(remaining, HISTORY_POLL_S) if self.reconnected else remaining
            try:
                async with asyncio.timeout(wait):
                    raw = await self.ws.recv()
            except TimeoutError:
                if wait < remaining:
                    await self._check_history()
                    continue
                await self._expire()
            except (ConnectionClosed, OSError):
                await self._recover(deadline)
                continue
            msg = _parse(raw)
            if msg is None:
                continue
            if msg.get("type") == "status" and self.started is None:
                await self._check_still_queued()
            self._handle(msg)

    # --- messages --------------------------------------------------------------------------------
    def _handle(self, msg: dict) -> None:
        kind = msg.get("type")
        data = msg.get("data")
        if kind == "status":
            if self.started is None and isinstance(data, dict):
                remaining = _dict(_dict(data.get("status")).get("exec_info")).get("queue_remaining")
                self._progress({"status": "queued", "queue_remaining": remaining})
            return
        if not isinstance(data, dict) or data.get("prompt_id") != self.prompt_id:
            return  # not about this prompt (or not well-formed): never acts on this job
        if kind == "execution_start":
            self.started = time.monotonic()
            self._progress({"status": "running"})
        elif kind == "execution_cached":
            nodes = data.get("nodes")
            self.nodes_done.update(map(str, nodes if isinstance(nodes, list) else []))
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                self.done = True
                return
            if self.current_node is not None:
                self.nodes_done.add(self.current_node)
            self.current_node = str(node)
            self._progress({"status": "running"})
        elif kind == "progress":
            self._progress({"status": "running", "value": data.get("value"), "max": data.get("max")})
        elif kind == "executed":
            if isinstance(data.get("output"), dict):
                self.result.outputs[str(data.get("node"))] = data["output"]
        elif kind == "execution_success":
            self.done = True
        elif kind == "execution_error":
            raise execution_error(data)
        elif kind == "execution_interrupted":
            raise JobError(
                f"The prompt was interrupted in ComfyUI at node {data.get('node_id')} ({data.get('node_type')}), "
                "not by this job (was /interrupt called by someone else?).",
                {"prompt_id": self.prompt_id, "node_id": data.get("node_id"), "class_type": data.get("node_type")},
            )

    def _progress(self, event: dict) -> None:
        if self.on_progress is None:
            return
        node = self.current_node
        event.update(
            {
                "prompt_id": self.prompt_id,
                "node_id": node,
                "class_type": (self.workflow.get(node) or {}).get("class_type") if node else None,
                "nodes_done": len(self.nodes_done),
                "nodes_total": len(self.workflow),
            }
        )
        self.on_progress(event)

    # --- dropped socket --------------------------------------------------------------------------
    async def _recover(self, deadline: float) -> None:
        """Reopen the websocket (same client id), then ask /history whether the prompt ended meanwhile."""
        self.reconnected = True
        log.warning("Websocket to ComfyUI dropped; reconnecting")
        started = time.monotonic()
        while True:
            self.client.check_alive("its websocket closed during the job")
            try:
                self.ws = await self.client.open_ws(self.client_id)
                break
            except _WS_ERRORS as exc:
                if time.monotonic() >= deadline:
                    await self._expire()
                if time.monotonic() - started > RECONNECT_GIVE_UP_S:
                    raise JobError(
                        f"Lost the connection to ComfyUI at {self.client.host} during the job and could not "
                        f"reconnect within {RECONNECT_GIVE_UP_S:g} s ({exc}).",
                        {"prompt_id": self.prompt_id, "host": self.client.host},
                        refresh_worker=True,
                    ) from None
                await asyncio.sleep(0.25)
        log.info("Websocket reconnected; checking /history for prompt %s", self.prompt_id)
        await self._check_history()

    async def _check_history(self) -> None:
        """End the watch from /history if the prompt is finished there (its entry appears at the end)."""
        try:
            entry = await self.client.history(self.prompt_id)
        except (TimeoutError, aiohttp.ClientError, OSError):
            self.client.check_alive("it stopped answering during the job")
            entry = None
        if entry:
            log.info("Prompt %s found finished in /history", self.prompt_id)
            self._from_history(entry)

    async def _outputs_from_history(self) -> None:
        """After a reconnect, ``executed`` messages sent during the gap are lost: take the outputs from
        /history (written just after ``execution_success``, so wait a moment for it)."""
        for _ in range(40):
            entry = await self.client.history(self.prompt_id)
            if entry:
                self.result.outputs = entry.get("outputs") or self.result.outputs
                return
            await asyncio.sleep(0.05)
        log.warning("Prompt %s is missing from /history; outputs seen on the websocket are used", self.prompt_id)

    def _from_history(self, entry: dict) -> None:
        self.history_used = True
        status = entry.get("status") or {}
        messages = {m[0]: m[1] for m in status.get("messages", []) if isinstance(m, list) and len(m) == 2}
        if "execution_error" in messages:
            raise execution_error(messages["execution_error"])
        if "execution_interrupted" in messages:
            self._handle({"type": "execution_interrupted", "data": messages["execution_interrupted"]})
        self.result.outputs = entry.get("outputs") or {}
        start = (messages.get("execution_start") or {}).get("timestamp")
        end = (messages.get("execution_success") or {}).get("timestamp")
        if start and end:
            self.result.execution_ms = int(end - start)
            self.result.queue_ms = max(0, round((time.monotonic() - self.submitted) * 1000) - int(end - start))
        self.done = True

    async def _check_still_queued(self) -> None:
        """The queue changed before our prompt started: fail at once if someone removed it from the queue
        (otherwise the job would wait for its timeout). /queue is read before /history, so a prompt that
        finished in between is found in /history."""
        try:
            state = await self.client.queue_state(self.prompt_id)
            if state is not None or await self.client.history(self.prompt_id):
                return
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return  # the watch notices a ComfyUI that is gone
        raise JobError(
            "The prompt was removed from ComfyUI's queue before it ran, not by this job (was the queue "
            "cleared, or the prompt deleted with POST /queue, by someone else?).",
            {"prompt_id": self.prompt_id, "state": "removed"},
        )

    # --- timeout and cancellation ----------------------------------------------------------------
    async def stop(self) -> tuple[bool, bool]:
        """Drop the prompt from the queue (if pending), interrupt it (if running) and wait up to
        INTERRUPT_GRACE_S for it to stop. Returns (was running, stopped)."""
        self.interrupt_error = None
        if not await self._posted():
            return False, True
        running = self.started is not None
        try:
            async with asyncio.timeout(INTERRUPT_GRACE_S):
                await self.client.delete_queued(self.prompt_id)
                # it may have started without our seeing it (a reconnect, or just now): ask ComfyUI
                running = running or await self.client.is_running(self.prompt_id)
                if running:
                    await self.client.interrupt(self.prompt_id)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.interrupt_error = str(exc) or type(exc).__name__
            log.warning("Could not interrupt prompt %s: %s", self.prompt_id, self.interrupt_error)
        stopped = await self._wait_stopped() if running and self.ws is not None else not running
        return running, stopped

    async def abort(self) -> None:
        """The job was cancelled: never send the prompt from now on, and stop it as a timeout does (a POST on
        its way is waited for first: ComfyUI may queue the prompt until it answers); bounded in time, never
        raises."""
        self.aborted = True
        log.warning("Job cancelled; stopping prompt %s", self.prompt_id)
        try:
            async with asyncio.timeout(INTERRUPT_GRACE_S + 5):
                await self.stop()
        except Exception as exc:  # noqa: BLE001 - the cancellation itself must go on
            log.warning("Could not stop prompt %s after the cancellation: %s", self.prompt_id, exc)

    async def _expire(self) -> None:
        """Drop the prompt from the queue (if pending), interrupt it (if running), wait briefly, fail."""
        node = self.current_node
        class_type = (self.workflow.get(node) or {}).get("class_type") if node else None
        if self.started is None:
            where = "while the prompt was still waiting in ComfyUI's queue"
        elif node:
            where = f"while ComfyUI was running node {node} ({class_type})"
        else:
            where = "while ComfyUI was running the prompt"
        log.warning("Timeout after %g s %s; stopping prompt %s", self.timeout, where, self.prompt_id)
        running, stopped = await self.stop()
        raise JobError(
            f"The job timed out after {self.timeout:g} s {where}; {self._stop_outcome(running, stopped)}.",
            {
                "prompt_id": self.prompt_id,
                "timeout_s": self.timeout,
                "state": "running" if self.started is not None else "queued",
                "node_id": node,
                "class_type": class_type,
                "stopped": stopped,
            },
        )

    def _stop_outcome(self, running: bool, stopped: bool) -> str:
        """What stopping the prompt did, as it is: only a prompt seen to end within the grace time is
        called interrupted; one still running holds ComfyUI (the next job waits behind it)."""
        if not running:
            return "the prompt was removed from ComfyUI's queue"
        if stopped:
            return "the prompt was interrupted"
        if self.interrupt_error is not None:
            return (
                f"the prompt could not be interrupted ({self.interrupt_error}): ComfyUI may still be running it, "
                "and the next job waits behind it"
            )
        return (
            f"ComfyUI was asked to interrupt the prompt, but it was still running {INTERRUPT_GRACE_S:g} s later "
            "(ComfyUI stops a prompt only between nodes or steps): ComfyUI is still finishing it, and the next "
            "job waits behind it"
        )

    async def _wait_stopped(self) -> bool:
        end = time.monotonic() + INTERRUPT_GRACE_S
        while (left := end - time.monotonic()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except (TimeoutError, ConnectionClosed, OSError):
                return False
            msg = _parse(raw)
            data = msg.get("data") if msg is not None else None
            if not isinstance(data, dict) or data.get("prompt_id") != self.prompt_id:
                continue
            if msg.get("type") == "executed" and isinstance(data.get("output"), dict):  # saved files to clean up
                self.result.outputs[str(data.get("node"))] = data["output"]
            if msg.get("type") in ("execution_interrupted", "execution_error", "execution_success"):
                return True
            if msg.get("type") == "executing" and data.get("node") is None:
                return True
        return False


async def _stop_abandoned(client: ComfyClient, prompt_id: str) -> bool:
    """Delete ``prompt_id`` from ComfyUI's queue (again while it is pending: it may have been queued just now)
    and interrupt it while it runs, until ComfyUI has it no more. Returns whether ComfyUI had it queued."""
    seen, interrupted = False, False
    await client.delete_queued(prompt_id)
    while (state := await client.queue_state(prompt_id)) is not None:
        seen = True
        if state == "pending":
            await client.delete_queued(prompt_id)
        elif not interrupted:
            await client.interrupt(prompt_id)
            interrupted = True
        await asyncio.sleep(0.1)
    return seen


async def abandon_prompt(
    client: ComfyClient, prompt_id: str, folders: outputs.ComfyFolders, queued_at: float | None, inputs: list[str]
) -> tuple[bool | None, int]:
    """Stop a prompt whose job is gone (the API's job runner died under it) and delete what it left: drop
    it from ComfyUI's queue, interrupt it while it runs (waiting up to INTERRUPT_GRACE_S for it to end),
    then delete the output and temp files /history lists for it (changed since ``queued_at``, as the
    handler's own clean-up) and the job's uploaded ``inputs``. Returns (stopped, files deleted); stopped is
    None when ComfyUI has no trace of the prompt (neither queued nor in /history): its POST /prompt may
    still be on its way (``remove_when_queued`` watches for it). Never raises for ComfyUI (a ComfyUI that
    is gone took the prompt with it)."""
    stopped: bool | None = False
    try:
        async with asyncio.timeout(INTERRUPT_GRACE_S):
            seen = await _stop_abandoned(client, prompt_id)
            stopped = True
        entry = await client.history(prompt_id)
        if not seen and not entry:
            stopped = None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        log.warning("Prompt %s: could not stop it or read its outputs (%s)", prompt_id, exc or type(exc).__name__)
        entry = None
    files, _ = outputs.collect((entry or {}).get("outputs") or {})
    outputs.cleanup(files, folders, inputs, created_after=queued_at)
    if stopped:
        log.info("Prompt %s of a dead job runner: stopped, %d file(s) deleted", prompt_id, len(files))
    return stopped, len(files)


async def remove_when_queued(
    client: ComfyClient,
    prompt_id: str,
    folders: outputs.ComfyFolders,
    queued_at: float | None,
    inputs: list[str],
    within: float = LATE_PROMPT_WAIT_S,
) -> bool:
    """The prompt of a dead job runner that ComfyUI had no trace of (``abandon_prompt`` said None): its
    POST /prompt may have been on its way, and ComfyUI may queue it later. Watch ComfyUI's queue and
    /history for it for up to ``within`` seconds (the POST's own read timeout by default) and, the moment
    it shows, stop it and delete its files as ``abandon_prompt`` does. Returns whether it showed; never
    raises for ComfyUI (one that does not answer is asked again until the end)."""
    started = time.monotonic()
    while time.monotonic() < started + within:
        try:
            shown = await client.queue_state(prompt_id) is not None or bool(await client.history(prompt_id))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            shown = False
        if shown:
            log.warning(
                "Prompt %s of a dead job runner was queued in ComfyUI after all (%.1f s later): stopping it",
                prompt_id,
                time.monotonic() - started,
            )
            await abandon_prompt(client, prompt_id, folders, queued_at, inputs)
            return True
        await asyncio.sleep(LATE_PROMPT_POLL_S)
    log.info("Prompt %s of a dead job runner never reached ComfyUI (watched for %g s)", prompt_id, within)
    return False
