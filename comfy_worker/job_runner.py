"""The process that runs the API's jobs (docs/architecture.md, "The API's job runner").

The API (api.py) answers HTTP and keeps the store; the jobs run here, in a child process of its own,
calling the same handler function the serverless worker calls (``handler:handler`` by default). Two
processes, not one: the HTTP work then fits in the time the handler waits for ComfyUI, on another core,
instead of delaying the job that is running (bench/api_throughput.py).

The protocol, one JSON object per line (``json.dumps`` escapes newlines, so a line is a message):

- API -> runner on the runner's stdin:
  ``{"run": {"id": ..., "input": {...}}, "not_after": <epoch s or null>}`` queues a job (``run`` is the
  request as the API stored it, ``s3Config`` and ``policy`` included, with the job's id): it starts when
  fewer than ``--concurrency`` run (the API sends one ahead, so the next starts the moment one ends), or
  ends unstarted once ``not_after`` is past (RunPod's ``policy.ttl``). ``{"cancel": "<id>"}`` cancels a
  job, waiting or running (the handler interrupts its prompt). End of file: the API is gone (stopped, or
  killed): every running job is cancelled, so no prompt is left running in ComfyUI for nobody, and
  the runner exits.
- runner -> API on the runner's stdout: ``{"ready": true}`` once the handler is imported; per job
  ``{"started": "<id>", "at": <epoch s>}``, then ``{"prompt": "<id>", "prompt_id": "<ComfyUI prompt id>",
  "queued_at": <epoch s>, "inputs": [<names uploaded to ComfyUI's input folder>]}`` just before each of
  its prompts is queued in ComfyUI (``report_prompt``; written at once, not buffered: should the runner
  die, the API stops that prompt and deletes the files it wrote and the inputs), then one of
  ``{"done": "<id>", "output": <what the handler returned>}``, ``{"done": "<id>", "cancelled": true}``
  or ``{"done": "<id>", "expired": true}``. Anything printed by the handler goes to stderr, never into
  the protocol.

SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a container stop reaches the whole process group,
and the API decides what happens to the running jobs (it cancels them and then closes the pipe).

    python -m comfy_worker.job_runner [--handler MODULE:FUNCTION]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path

from comfy_worker.job_input import job_secrets
from comfy_worker.log_setup import set_job_secrets, setup_logging
from comfy_worker.settings import Settings

log = logging.getLogger(__spec__.name if __name__ == "__main__" else __name__)

RunJob = Callable[[dict], Awaitable[dict]]
LINE_LIMIT = 1 << 31  # a message is one line: a job's input or output may be hundreds of MB of base64
_prompt_reports: ContextVar[Callable[[dict], None] | None] = ContextVar("prompt_reports", default=None)


def report_prompt(prompt_id: str, queued_at: float, inputs: list[str]) -> None:
    """Tell the API which ComfyUI prompt the current job is about to queue (the protocol's ``prompt``
    message), with the time it is queued and the job's uploaded inputs: if this runner dies under the
    job, the API stops that prompt and deletes its files. Outside a job runner (serverless) a no-op."""
    report = _prompt_reports.get()
    if report is not None:
        report({"prompt_id": prompt_id, "queued_at": queued_at, "inputs": list(inputs)})


def load_handler(spec: str, app_dir: Path) -> RunJob:
    """``MODULE:FUNCTION`` (default ``handler:handler``) imported with ``app_dir`` first on the path."""
    module_name, _, name = spec.partition(":")
    sys.path.insert(0, str(app_dir))
    return getattr(importlib.import_module(module_name), name or "handler")


def parse_message(line: bytes) -> dict:
    """One protocol line; a line that is not a JSON object is logged and read as an empty message."""
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        log.error("job runner protocol: ignoring a malformed line (%d bytes)", len(line))
        return {}
    return message


class Runner:
    """Reads messages, runs a task per job, writes the answers."""

    def __init__(self, run_job: RunJob, out, concurrency: int):
        self.run_job = run_job
        self.out = out  # the protocol's binary stream
        self.concurrency = concurrency
        self.waiting: dict[str, tuple[dict, float | None]] = {}  # sent ahead, in order: (job, not after)
        self.tasks: dict[str, asyncio.Task] = {}
        self.flush_due = False

    def send(self, message: dict) -> None:
        """Buffered, flushed once the loop's current step is done: a job's ``done`` and the next one's
        ``started`` reach the API in one write (one wake-up there, not two)."""
        self.out.write(json.dumps(message).encode() + b"\n")
        if not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        with contextlib.suppress(BrokenPipeError):  # the API is gone: nobody is left to tell
            self.out.flush()

    def report(self, job_id: str, prompt: dict) -> None:
        """A ``prompt`` message, written now: the prompt is queued right after it."""
        self.send({"prompt": job_id, **prompt})
        self.flush()

    async def job(self, job: dict) -> None:
        job_id = job["id"]
        _prompt_reports.set(lambda prompt: self.report(job_id, prompt))  # this task's context only
        set_job_secrets(job_secrets(job))  # this task's log lines (any handler's, the traceback below) too
        try:
            output = await self.run_job(job)
        except asyncio.CancelledError:
            self.send({"done": job_id, "cancelled": True})
            return
        except Exception as exc:  # the handler never raises; this is a last resort
            log.exception("job %s: the handler raised", job_id)
            output = {"error": f"The handler failed unexpectedly: {type(exc).__name__}: {exc}"}
        finally:
            self.tasks.pop(job_id, None)
            self.start_waiting()
        self.send({"done": job_id, "output": output})

    def start_waiting(self) -> None:
        while self.waiting and len(self.tasks) < self.concurrency:
            job_id = next(iter(self.waiting))
            job, not_after = self.waiting.pop(job_id)
            if not_after is not None and time.time() > not_after:
                self.send({"done": job_id, "expired": True})
                continue
            self.send({"started": job_id, "at": time.time()})
            self.tasks[job_id] = asyncio.create_task(self.job(job))

    def cancel(self, job_id: str) -> None:
        if self.waiting.pop(job_id, None) is not None:
            self.send({"done": job_id, "cancelled": True})
        elif (task := self.tasks.get(job_id)) is not None:
            task.cancel()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            message = parse_message(line)
            if "run" in message:
                job = message["run"]
                self.waiting[job["id"]] = (job, message.get("not_after"))
                self.start_waiting()
            elif "cancel" in message:
                self.cancel(message["cancel"])
        self.waiting.clear()
        if self.tasks:
            log.warning("the API is gone: stopping %d running job(s)", len(self.tasks))
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def amain(run_job: RunJob, out, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    runner = Runner(run_job, out, concurrency)
    runner.send({"ready": True})
    try:
        await runner.serve(reader)
    finally:
        runner.flush()
        with contextlib.suppress(Exception):
            from comfy_worker.comfy_client import close_shared_session

            await close_shared_session()


EXPIRED = object()  # what ``RunnerProcess.run`` returns for a job not started by its ``not_after``


_spawner: ThreadPoolExecutor | None = None  # the thread later runners are started from (keep_runner_priority)


def keep_runner_priority() -> None:
    """Start every later runner from a thread made now: a child gets the CPU priority of the thread that
    starts it, so runners keep the priority the calling thread has now even after it lowers its own
    (``api.yield_cpu_to_jobs``), also a runner started after one died. Lowering a priority needs no
    privilege, raising it back does."""
    global _spawner
    if _spawner is None:
        _spawner = ThreadPoolExecutor(1, thread_name_prefix="runner-spawn")
        _spawner.submit(lambda: None).result()  # its one thread exists from here on


class RunnerDied(RuntimeError):
    """The runner process ended under a job; ``started``: whether the job had started in it."""

    def __init__(self, message: str, started: bool = False):
        super().__init__(message)
        self.started = started


class RunnerProcess:
    """The API's side of the protocol: the child process and a future per job sent to it.

    ``spawn`` starts the process (early: ``api.preload`` does it while ComfyUI boots, so the handler's
    import overlaps); ``attach`` (in the API's event loop) waits for ``ready``; ``run(job)`` returns the
    handler's output, or None when the job was cancelled (``cancel(id)``), and raises ``RunnerDied`` when
    the process ends under it. ``on_started(id, at)`` is called when a job starts, ``on_prompt(id, prompt)``
    before it queues a ComfyUI prompt (the ``prompt`` message), ``on_exit()`` when the process ends by itself. ``close`` closes the pipe (the runner cancels what still runs) and waits."""

    def __init__(self, handler: str = "handler:handler", concurrency: int = 1):
        self.handler, self.concurrency = handler, concurrency
        self.on_started: Callable[[str, float], None] = lambda job_id, at: None
        self.on_prompt: Callable[[str, dict], None] = lambda job_id, prompt: None
        self.on_exit: Callable[[], None] = lambda: None
        self.alive = self.closing = False
        self.proc: subprocess.Popen | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.started: set[str] = set()
        self.reader_task: asyncio.Task | None = None
        self.ready: asyncio.Event | None = None
        self.writer: asyncio.WriteTransport | None = None

    def spawn(self) -> RunnerProcess:
        cmd = [sys.executable, "-m", "comfy_worker.job_runner", "--handler", self.handler]
        cmd += ["--concurrency", str(self.concurrency)]
        popen = lambda: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # noqa: E731
        self.proc = popen() if _spawner is None else _spawner.submit(popen).result()
        return self

    async def attach(self, timeout: float = 300) -> None:
        """Read the runner's messages from now on; wait for ``ready`` (RunnerDied if it ends first)."""
        loop = asyncio.get_running_loop()
        if self.proc is None:
            self.spawn()
        self.ready = asyncio.Event()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.proc.stdout)
        self.writer, _ = await loop.connect_write_pipe(asyncio.Protocol, self.proc.stdin)
        self.reader_task = asyncio.create_task(self._read(reader))
        self.alive = True
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait([self.reader_task, ready], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not self.ready.is_set():
            raise RunnerDied(f"the job runner did not start (exit code {self.proc.poll()}); its error is logged above")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            message = parse_message(line)
            if "started" in message:
                self.started.add(message["started"])
                self.on_started(message["started"], message["at"])
            elif "prompt" in message:
                self.on_prompt(message["prompt"], message)
            elif "done" in message:
                self.started.discard(message["done"])
                future = self.pending.pop(message["done"], None)
                if future is not None and not future.done():
                    future.set_result(EXPIRED if message.get("expired") else message.get("output"))
            elif "ready" in message:
                self.ready.set()
        self.alive = False
        if not self.closing and self.ready.is_set():
            self.on_exit()
        code = await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
        for job_id, future in self.pending.items():
            if not future.done():
                future.set_exception(
                    RunnerDied(f"the job runner process ended (exit code {code})", job_id in self.started)
                )
        self.pending.clear()

    def _send(self, message: dict | str) -> None:
        """One message (a dict, or its JSON text already) on the runner's stdin."""
        if self.writer is None or self.writer.is_closing():
            raise OSError("the pipe to the job runner is closed")
        text = message if isinstance(message, str) else json.dumps(message)
        self.writer.write(text.encode() + b"\n")  # buffered: never blocks the API's loop

    async def run(self, job: dict, not_after: float | None = None, encoded: str | None = None):
        """The handler's output for ``job``; None when it was cancelled, ``EXPIRED`` when it was not
        started by ``not_after`` (epoch seconds: RunPod's ``policy.ttl``). ``encoded``: the job's request
        as the API stored it (``json.dumps`` of ``{"input": ...}``: one line, never empty), sent as it is
        with the job's id put in front, so a request (its images as base64 too) is encoded once; ``job``
        is then only read for its id."""
        if not self.alive:
            raise RunnerDied("the job runner process is not running")
        future = asyncio.get_running_loop().create_future()
        self.pending[job["id"]] = future
        try:
            if encoded is None:
                self._send({"run": job, "not_after": not_after})
            else:
                head = f'{{"not_after": {json.dumps(not_after)}, "run": {{"id": {json.dumps(job["id"])}, '
                self._send(head + encoded[1:] + "}")  # the request's members and closing brace follow
        except OSError as exc:
            self.pending.pop(job["id"], None)
            raise RunnerDied(f"the job runner cannot take jobs ({exc})") from None
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up on it: the runner stops it too
            self.cancel(job["id"])
            raise

    def cancel(self, job_id: str) -> None:
        if job_id in self.pending:
            with contextlib.suppress(OSError):
                self._send({"cancel": job_id})

    async def close(self, timeout: float) -> int | None:
        """Close the pipe (the runner cancels what still runs, then exits); kill it after ``timeout``."""
        if self.proc is None:
            return None
        self.closing = True
        if self.writer is not None:
            self.writer.close()
        else:
            self.proc.stdin.close()
        loop = asyncio.get_running_loop()
        try:
            code = await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)
        except TimeoutError:
            self.proc.kill()
            code = await loop.run_in_executor(None, self.proc.wait)
        if self.reader_task is not None:
            await asyncio.gather(self.reader_task, return_exceptions=True)
        return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_worker.job_runner", description=__doc__.split("\n")[0])
    parser.add_argument("--handler", default="handler:handler", help="the job function, MODULE:FUNCTION")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once (MAX_CONCURRENCY)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")  # the protocol; fd 1 then points at stderr, so stray prints stay out of it
    os.dup2(2, 1)
    setup_logging()
    run_job = load_handler(args.handler, Settings.from_env().app_dir)
    setup_logging()  # again: importing the handler (the RunPod SDK) may touch the root logger
    import uvloop  # here: the serverless handler imports this module (report_prompt) and runs on asyncio's loop

    # uvloop, the API's loop too (pinned in requirements.txt): the jobs run on the critical path of the API's
    # throughput, and the handler uses only portable asyncio (aiohttp, websockets), so it runs the same on
    # asyncio's own loop, the one the serverless worker uses (bench/api_throughput.py compares the two)
    uvloop.run(amain(run_job, out, args.concurrency))
    return 0


if __name__ == "__main__":
    # run the module under its own name: one copy of its state (``report_prompt``'s context variable, which
    # the handler reaches by importing this module)
    from comfy_worker import job_runner

    sys.exit(job_runner.main())
