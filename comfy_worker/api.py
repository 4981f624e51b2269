"""The worker's own HTTP API for pods and local boxes, in RunPod's shape (docs/api.md, "The worker's HTTP API").

``python -m comfy_worker.api [--host H] [--port P] [--handler MODULE:FUNCTION]`` (``start.sh`` runs it in
pod and local mode on ``API_PORT``): FastAPI + uvicorn answering HTTP, the jobs run in a child process
(job_runner.py) with the same function the serverless worker runs, ``handler:handler`` from ``APP_DIR``
by default (``--handler`` names it like uvicorn names an app), so a job's input and output are exactly
the handler's and this package imports no top-level script.

Routes, also under ``/v2/<any endpoint id>/`` (so RunPod's clients work by changing the base URL):
``POST /run``, ``POST /runsync``, ``GET|POST /status/{id}``, ``GET|POST /stream/{id}``,
``POST /cancel/{id}``, ``GET /health``, ``POST /purge-queue``; ``GET /ping`` and ``/docs`` answer
without a token. Without a token (local mode) what only a web page sends is refused (``local_guard``).
RunPod's ``policy`` (``executionTimeout``, ``ttl``) and ``s3Config`` are honoured. Every error is
``{"error": "<sentence>"}``.

Jobs live in ``$VOLUME_ROOT/.api/jobs.sqlite3`` (job_store.py): accepted before the 200 is sent, run
``MAX_CONCURRENCY`` at a time in the order they came, finished once. SIGTERM: no new request, running
jobs are cancelled (the handler interrupts their prompts) and go back to the queue; the next start runs
them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from comfy_worker.comfy_client import ComfyClient, close_shared_session
from comfy_worker.job_input import job_secrets
from comfy_worker.job_runner import EXPIRED, RunnerDied, RunnerProcess, keep_runner_priority
from comfy_worker.job_store import FINAL, JobStore
from comfy_worker.log_setup import redact_answer, safe_url, setup_logging
from comfy_worker.outputs import ComfyFolders
from comfy_worker.prompt_runner import LATE_PROMPT_WAIT_S, abandon_prompt, remove_when_queued
from comfy_worker.settings import Settings, secret_values
from comfy_worker.token_file import stored_token
from comfy_worker.webhooks import Webhooks, submit_problem

log = logging.getLogger(__spec__.name if __name__ == "__main__" else __name__)  # also under python -m

TOKEN_FILE = ".api-token"
STORE_FILE = Path(".api") / "jobs.sqlite3"
BODY_KEYS = {"input", "webhook", "policy", "s3Config"}
PREFETCH = 1  # jobs sent to the runner ahead of a free slot
CANCEL_WAIT_S = 15.0  # /cancel answers once the running job stopped (the handler waits up to 10 s)
RUNSYNC_MAX_WAIT_MS = 300_000
MAX_JSON_DEPTH = 100  # objects and arrays in a request body (a workflow needs under 10)
API_NICENESS = 10  # the API's threads run this much nicer than its job runner (yield_cpu_to_jobs)
# RunPod's ``policy``: its keys, and the bounds RunPod sets for the two that mean something here (ms)
POLICY_BOUNDS = {"executionTimeout": (5_000, 7 * 86_400_000), "ttl": (10_000, 7 * 86_400_000)}
POLICY_KEYS = {*POLICY_BOUNDS, "lowPriority"}


class ApiError(Exception):
    """An HTTP error answered as ``{"error": "<sentence>"}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class QueueFull(ApiError):
    pass


# --- authentication ----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_token(settings: Settings, host: str) -> tuple[str | None, bool]:
    """(the token requests must carry or None for no authentication, generated now).

    ``API_AUTH=none``: none. ``API_TOKEN``: that one. Unset and listening off loopback: the volume's
    ``.api-token``, else a new one written there (0600). Unset on loopback: none."""
    if settings.api_auth == "none":
        return None, False
    if settings.api_token:
        return settings.api_token, False
    if is_loopback(host):
        return None, False
    return stored_token(settings.volume_root / TOKEN_FILE)


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time (digests: no length leaks either)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), hashlib.sha256(token.encode()).digest())


def header_host(value: str) -> tuple[str | None, int | None]:
    """(host name, port) of a ``Host`` header or an origin's ``host:port``; (None, None) when unreadable."""
    try:
        parts = urlsplit(f"//{value}")
        return parts.hostname, parts.port
    except ValueError:
        return None, None


def local_guard(headers, check_host: bool) -> None:
    """What a web page could send, refused while no token is required (a page cannot add the token: the API
    answers no CORS preflight): a ``Host`` that is not a loopback name (DNS rebinding; only checked when
    the API listens on loopback), an ``Origin`` not the API's own, a body not sent as ``application/json``
    (a cross-origin ``text/plain`` POST needs no preflight)."""
    host = headers.get("host")
    if check_host and host is not None and not is_loopback(header_host(host)[0] or ""):
        raise ApiError(
            403,
            f"Refused: the Host header {host[:100]!r} is not a loopback name of this API (127.0.0.1, localhost, "
            "[::1]). Without API_TOKEN the API answers only requests addressed to it by such a name (a web page "
            "could otherwise reach it through DNS rebinding): call it as http://127.0.0.1:<port>, or set API_TOKEN.",
        )
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin if "://" in origin else "invalid:")
        default = {"http": 80, "https": 443}.get(parts.scheme)
        own_name, own_port = header_host(host or "")
        try:
            same = default is not None and (parts.hostname, parts.port or default) == (own_name, own_port or default)
        except ValueError:  # a port that is not a number
            same = False
        if not same:
            raise ApiError(
                403,
                f"Refused: the Origin header {origin[:100]!r} is not this API's own origin, so a web page sent this "
                "request; without API_TOKEN the API answers no other page. Send it from a script or the command line "
                "(they send no Origin), or set API_TOKEN and send 'Authorization: Bearer <API_TOKEN>'.",
            )
    length = headers.get("content-length")
    has_body = (length is not None and length.strip() != "0") or "transfer-encoding" in headers
    content_type = headers.get("content-type")
    if has_body and (content_type or "").partition(";")[0].strip().lower() != "application/json":
        sent = f"Content-Type {content_type[:100]!r}" if content_type else "no Content-Type"
        raise ApiError(
            415,
            f"The request body was sent with {sent}: send it as JSON with 'Content-Type: application/json' "
            "(curl: -H 'Content-Type: application/json'). Without API_TOKEN the API refuses other types, "
            "which any web page could send.",
        )


# --- the jobs ----------------------------------------------------------------------------------------
def timed_out_error(timeout_ms: int) -> str:
    return (
        f"The job ran longer than its policy.executionTimeout ({timeout_ms} ms) and was stopped: ComfyUI was "
        "asked to interrupt its prompt (ComfyUI stops between nodes or steps, so it may finish the current one "
        "first, and the next job waits for that); raise policy.executionTimeout, or make the workflow lighter."
    )


def handler_result(output) -> tuple[str, dict]:
    """(status, stored result) from what the handler returned, as RunPod's worker shapes it: ``error``
    at the top, the rest (``details``...) under ``output``; ``refresh_worker`` has no meaning here."""
    if not isinstance(output, dict):
        return "COMPLETED", {"output": output}
    output = dict(output)
    error = output.pop("error", None)
    output.pop("refresh_worker", None)
    result = {"output": output} if output else {}
    if error:
        return "FAILED", {**result, "error": error}
    return "COMPLETED", result


def ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def status_body(job: dict) -> dict:
    """A job as RunPod's ``/status`` shows it."""
    body = {"id": job["id"], "status": job["status"]}
    if job["started"] is not None:
        body["delayTime"] = ms(job["started"] - job["created"])
        if job["finished"] is not None:
            body["executionTime"] = ms(job["finished"] - job["started"])
    elif job["finished"] is not None:  # cancelled while queued
        body["delayTime"] = ms(job["finished"] - job["created"])
    if job["status"] in FINAL:
        body.update(job["result"])
    return body


def status_response(job: dict) -> Response:
    """``status_body`` as the HTTP answer. A job that just finished here carries its result as the store
    encoded it (``result_json``, ``JobStore.complete``): that text is spliced in, not encoded a second time
    (a result may be megabytes of base64)."""
    text = job.get("result_json")
    if text is None or text == "{}":
        return JSONResponse(status_body(job))  # as is: outputs are plain JSON
    head = json.dumps(status_body({**job, "result": {}}))
    return Response(f"{head[:-1]}, {text[1:]}", media_type="application/json")


class JobService:
    """The queue, the job runner, the store and the webhooks of one API process.

    A job is ``queued`` from its 200 until the runner says it started (``concurrency`` run at once; up to
    ``PREFETCH`` more are sent ahead so the runner starts the next one the moment one ends, without a round
    trip through this process), then ``running`` until its result is written. The store's calls are quick
    (WAL, ``synchronous=NORMAL``: no fsync per write) and made right here in the event loop."""

    def __init__(self, settings: Settings, runner: RunnerProcess | None, store: JobStore):
        self.settings = settings
        self.runner = runner
        self.runner_up = asyncio.Event()
        self.restarting: asyncio.Task | None = None
        self.store = store
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.running: dict[str, float] = {}  # job id: when it started (monotonic)
        self.cancel_asked: set[str] = set()
        self.finished: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []
        self.webhooks = Webhooks(settings, store, status_body)
        # accepted by this process: (request, its JSON text as stored and sent to the runner, created)
        self.requests: dict[str, tuple[dict, str, float]] = {}
        self.time_limits: dict[str, float] = {}  # job id: its policy.executionTimeout in seconds
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.ttl_timers: dict[str, asyncio.TimerHandle] = {}  # queued job id: its policy.ttl ends it then
        self.timed_out: set[str] = set()
        self.prompts: dict[str, dict] = {}  # job id: its ComfyUI prompt (the runner's ``prompt`` message)
        self.ended_prompts: deque[str] = deque(maxlen=64)  # prompt ids of jobs that ended (for /health)
        self.streamed: set[str] = set()  # finished jobs whose output /stream handed out
        self.late_prompts: set[asyncio.Task] = set()  # prompts of a dead runner watched for (remove_when_queued)
        self.durations: deque[float] = deque(maxlen=20)
        self.stopping = False
        self.secrets = secret_values()  # read once: the environment is set before the API starts
        self.session = None
        self.loop: asyncio.AbstractEventLoop | None = None  # for the signal handler

    # -- life --
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = aiohttp.ClientSession()
        await self.adopt(self.runner)  # a handler that cannot be imported stops the start here, its error logged
        requeued = self.store.recover()
        queued = self.store.queued_ids()
        if requeued:
            log.warning("%d job(s) were interrupted by the last stop: they run again", requeued)
        if queued:
            log.info("%d job(s) in the queue from before the restart", len(queued))
        for job_id in queued:
            self.queued.add(job_id)
            self.queue.put_nowait(job_id)
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # a broken row fails when it is run
                request, _, created = self.stored_request(job_id)
                self.expire_at_ttl(job_id, request.get("policy"), created)
        self.tasks = [asyncio.create_task(self.worker()) for _ in range(self.settings.concurrency + PREFETCH)]
        self.tasks.append(asyncio.create_task(self.expire_loop()))
        self.webhooks.start()  # also the webhooks owed from before the restart

    async def adopt(self, runner: RunnerProcess) -> None:
        runner.on_started, runner.on_exit = self.job_started, self.restart_runner
        runner.on_prompt = self.prompts.__setitem__
        await runner.attach()
        self.runner = runner
        self.runner_up.set()

    def begin_stop(self) -> None:
        """SIGTERM: stop the runner's jobs now (each goes back to the queue) and wake every /runsync waiter."""
        if self.stopping:
            return
        self.stopping = True
        for job_id in list(self.runner.pending):
            self.runner.cancel(job_id)
        for event in self.finished.values():
            event.set()

    async def stop(self) -> None:
        """Running jobs are cancelled in the runner and requeued (waiting up to CANCEL_WAIT_S for their
        prompts to stop), then the runner, the webhooks and the store close."""
        self.begin_stop()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while self.runner.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.restarting is not None:
            self.restarting.cancel()
        for task in self.late_prompts:
            task.cancel()
        await asyncio.gather(*self.late_prompts, return_exceptions=True)
        await self.runner.close(timeout=CANCEL_WAIT_S)
        await self.webhooks.close()
        if self.session is not None:
            await self.session.close()
        await close_shared_session()  # ComfyClient's (abandon_prompt)
        self.store.close()

    # -- submitting --
    def retry_after(self) -> int:
        per_job = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return max(1, min(600, math.ceil(per_job * (len(self.queued) + 1) / self.settings.concurrency)))

    async def submit(self, body: dict, prefix: str = "", key: str | None = None) -> str:
        """The new job's id; with ``key`` (an ``Idempotency-Key``) that of the job sent before with it, if
        its result has not expired."""
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() if key is not None else ""
        if key is not None and (same := self.same_job(key, digest)):
            return same
        if problem := submit_problem(body.get("webhook"), self.webhooks.allowed):
            raise ApiError(400, problem)
        if self.stopping:
            raise ApiError(503, "The API is shutting down; send the job again in a moment.", {"Retry-After": "5"})
        if len(self.queued) >= self.settings.max_queue_depth:
            raise QueueFull(
                429,
                f"The queue is full ({len(self.queued)} jobs waiting, MAX_QUEUE_DEPTH={self.settings.max_queue_depth}); "
                "send the job again later (see Retry-After).",
                {"Retry-After": str(self.retry_after())},
            )
        job_id = f"{prefix}{uuid.uuid4()}"
        request = {key: body[key] for key in ("input", "policy", "s3Config") if body.get(key) is not None}
        encoded, now = json.dumps(request), time.time()  # the one encoding: stored, then sent to the runner
        self.store.add(job_id, encoded, body.get("webhook"), now, key, digest)
        self.queued.add(job_id)
        self.finished[job_id] = asyncio.Event()
        self.requests[job_id] = (request, encoded, now)
        self.queue.put_nowait(job_id)
        self.expire_at_ttl(job_id, request.get("policy"), now)
        log.info("job %s accepted (%d waiting)", job_id, len(self.queued))
        return job_id

    def same_job(self, key: str, digest: str) -> str | None:
        """The job an earlier request with this ``Idempotency-Key`` made (None: none, or its result
        expired); 422 when that request was a different one."""
        found = self.store.by_key(key, time.time() - self.settings.result_ttl_s)
        if found is None:
            return None
        job_id, earlier = found
        if earlier != digest:
            raise ApiError(
                422,
                f"The Idempotency-Key {shown_key(key)!r} was already used for a different request (job {job_id}); "
                "send a new key with a new request.",
            )
        log.info("job %s: sent again with its Idempotency-Key %s: the same job answers", job_id, shown_key(key))
        return job_id

    def get(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        expired = job and job["finished"] is not None and job["finished"] < time.time() - self.settings.result_ttl_s
        if job is None or expired:
            raise ApiError(
                404,
                f"No job {job_id!r}: it does not exist, or its result expired "
                f"(results are kept RESULT_TTL_S={self.settings.result_ttl_s:g} s).",
            )
        return job

    async def wait(self, job_id: str, seconds: float) -> dict:
        """The job once it is final, or as it is after ``seconds`` (or when the API stops). A job this
        process runs has an event until it is final (no store read before waiting), and ``job_done`` hands
        the final job to its waiters with it (none after)."""
        event = self.finished.get(job_id)
        if event is None or self.stopping:
            job = self.get(job_id)
            if job["status"] in FINAL or self.stopping:
                return job
            event = self.finished.setdefault(job_id, asyncio.Event())  # a job from before a restart: job_done sets it
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # no task of its own, unlike wait_for
                await event.wait()
        final = getattr(event, "job", None)
        return final if final is not None and not self.stopping else self.get(job_id)

    # -- cancelling --
    async def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] == "IN_QUEUE" and self.store.cancel_queued([job_id], time.time()):
            self.dequeue(job_id)
        elif job_id in self.running:
            self.cancel_asked.add(job_id)
            self.runner.cancel(job_id)
            await self.wait(job_id, CANCEL_WAIT_S)
        return self.get(job_id)

    async def purge(self) -> int:
        removed = self.store.cancel_queued(None, time.time())
        for job_id in removed:
            self.dequeue(job_id)
        return len(removed)

    def dequeue(self, job_id: str) -> None:
        """A queued job was cancelled in the store: forget it here and in the runner (if it was sent ahead)."""
        self.queued.discard(job_id)
        self.runner.cancel(job_id)
        self.job_done(job_id)
        self.send_webhook(job_id)

    def stream(self, job_id: str) -> dict:
        """RunPod's ``/stream``: the output chunks not fetched yet. The handler returns one output, so that
        is one chunk, handed out once (as RunPod's stream hands each chunk out once)."""
        job = self.get(job_id)
        body = {"id": job_id, "status": job["status"], "stream": []}
        if job["status"] in FINAL and job_id not in self.streamed:
            self.streamed.add(job_id)
            if "output" in job["result"]:
                body["stream"].append({"output": job["result"]["output"]})
            if "error" in job["result"]:
                body["error"] = job["result"]["error"]
        return body

    def job_done(self, job_id: str, job: dict | None = None) -> None:
        """The job is final (``job``: as the store has it now, when known): its waiters wake up."""
        if (timer := self.ttl_timers.pop(job_id, None)) is not None:
            timer.cancel()
        event = self.finished.pop(job_id, None)
        if event is not None:
            event.job = job
            event.set()

    # -- running --
    async def worker(self) -> None:
        while not self.stopping:
            job_id = await self.queue.get()
            if self.stopping:
                return  # still IN_QUEUE in the store: the next start runs it
            if job_id not in self.queued:
                self.requests.pop(job_id, None)
                continue  # cancelled or purged while it waited
            try:
                await self.run(job_id)
            except Exception as exc:  # a bug: this job fails, the queue worker goes on
                log.exception("job %s: the API failed on it", job_id)
                self.fail(
                    job_id,
                    f"The API failed on this job unexpectedly ({type(exc).__name__}); the API's log has the "
                    "traceback. Send the job again; if it fails the same way, report it with that log.",
                )

    def fail(self, job_id: str, error: str) -> None:
        """End a job the API could not run (queued or running) ``FAILED`` with ``error``, and forget it."""
        now, result = time.time(), {"error": error}
        self.queued.discard(job_id)
        self.requests.pop(job_id, None)
        self.running.pop(job_id, None)
        self.cancel_asked.discard(job_id)
        self.timed_out.discard(job_id)
        self.time_limits.pop(job_id, None)
        if (timer := self.timers.pop(job_id, None)) is not None:
            timer.cancel()
        if self.runner is not None:
            self.runner.cancel(job_id)  # when it was sent to the runner
        try:
            done = self.store.cancel_queued([job_id], now, "FAILED", result) or self.store.finish(
                job_id, "FAILED", result, now
            )
        except Exception:
            log.exception("job %s: its failure could not be stored", job_id)
            done = False
        if done:
            log.error("job %s FAILED: %s", job_id, error)
            self.send_webhook(job_id)
        self.job_done(job_id)

    def job_started(self, job_id: str, at: float) -> None:
        """The runner started the job: ``IN_PROGRESS`` (unless it was cancelled while it was sent ahead)."""
        self.queued.discard(job_id)
        if (timer := self.ttl_timers.pop(job_id, None)) is not None:
            timer.cancel()  # policy.ttl bounds the wait only
        if not self.store.start(job_id, at):
            self.runner.cancel(job_id)
            return
        self.running[job_id] = time.monotonic()
        if job_id in self.time_limits:
            self.timers[job_id] = self.loop.call_later(self.time_limits[job_id], self.time_out, job_id)

    def time_out(self, job_id: str) -> None:
        """The job's ``policy.executionTimeout`` is over: the runner stops it (its prompt interrupted)."""
        self.timers.pop(job_id, None)
        if job_id in self.running:
            log.warning("job %s ran past its policy.executionTimeout: stopping it", job_id)
            self.timed_out.add(job_id)
            self.runner.cancel(job_id)

    def expire_at_ttl(self, job_id: str, policy, created: float) -> None:
        """A job with ``policy.ttl`` ends ``TIMED_OUT`` the moment its ttl is over if it has not started:
        waiting in this queue, or sent ahead to the runner (which is told to drop it)."""
        ttl_ms = policy.get("ttl") if isinstance(policy, dict) else None
        if isinstance(ttl_ms, int) and not isinstance(ttl_ms, bool):
            delay = max(0.0, created + ttl_ms / 1000 - time.time())
            self.ttl_timers[job_id] = self.loop.call_later(delay, self.expire_queued, job_id, ttl_ms)

    def expire_queued(self, job_id: str, ttl_ms: int) -> None:
        """A queued job older than its ``policy.ttl`` ends ``TIMED_OUT`` without running (nothing changes
        for a job that started or ended meanwhile)."""
        error = f"The job waited in the queue longer than its policy.ttl ({ttl_ms} ms) and was not run."
        if self.store.cancel_queued([job_id], time.time(), "TIMED_OUT", {"error": error}):
            log.warning("job %s TIMED_OUT in the queue (policy.ttl)", job_id)
            self.dequeue(job_id)

    def stored_request(self, job_id: str) -> tuple[object, str, float] | None:
        """(request, its JSON text, created) of a job queued before this process started (None: not queued);
        a request that is not JSON reads as None, and fails when it is run."""
        stored = self.store.queued_request(job_id)
        if stored is None:
            return None
        encoded, created = stored
        try:
            return json.loads(encoded), encoded, created
        except ValueError:
            return None, encoded, created

    async def run(self, job_id: str) -> None:
        """One job: read its request, send it to the runner (its ``policy.ttl`` as the runner's ``not_after``),
        wait for what comes back, decide the outcome (``outcome``) and write it once, then announce it."""
        queued = self.requests.pop(job_id, None) or self.stored_request(job_id)
        if queued is None:  # cancelled meanwhile
            self.queued.discard(job_id)
            return
        request, encoded, created = queued
        if not isinstance(request, dict) or not isinstance(request.get("input"), dict):
            self.fail(
                job_id,
                'The stored request of this job has no valid "input" (an object): an older version of the API '
                'accepted it without one. Nothing was run; send the job again as {"input": {"workflow": {...}}}.',
            )
            return
        policy = request.get("policy", {})
        if "executionTimeout" in policy:
            self.time_limits[job_id] = policy["executionTimeout"] / 1000
        not_after = created + policy["ttl"] / 1000 if "ttl" in policy else None
        job = {"id": job_id, "input": request["input"]}
        if "s3Config" in request:  # RunPod's per-request bucket: the handler reads it beside the input
            job["s3Config"] = request["s3Config"]
        output = await self.output_of(job, not_after, encoded)
        if output is EXPIRED:
            self.expire_queued(job_id, policy["ttl"])
            return
        # whatever handler ran (--handler): no secret and no URL query in the error stored and returned
        output = redact_answer(output, [*self.secrets, *job_secrets(job)])
        started = self.running.pop(job_id, None)
        outcome = self.outcome(job_id, output, started is not None, policy)
        if outcome is None:
            return
        status, result = outcome
        if started is not None:
            self.durations.append(time.monotonic() - started)
        final = self.store.complete(job_id, status, result, time.time())
        if final is not None:
            log.info("job %s %s", job_id, final["status"])
            if final["webhook"]:
                self.send_webhook(job_id)  # a job without one wakes nothing more
        self.job_done(job_id, final)

    def outcome(self, job_id: str, output: dict | None, started: bool, policy: dict) -> tuple[str, dict] | None:
        """(status, result) of what the runner gave back (None: cancelled or stopped), or None when the
        job is not over: stopped by the shutdown (back to the queue), or never started."""
        cancel_asked = job_id in self.cancel_asked
        self.cancel_asked.discard(job_id)
        self.time_limits.pop(job_id, None)
        if (timer := self.timers.pop(job_id, None)) is not None:
            timer.cancel()
        timed_out = job_id in self.timed_out
        self.timed_out.discard(job_id)
        if output is not None:  # also when its time ran out as it finished: the result stands
            return handler_result(output)
        if timed_out:
            return "TIMED_OUT", {"error": timed_out_error(policy["executionTimeout"])}
        if not started:  # cancelled in the store before it started, or queued for the next start
            return None
        if self.stopping or not cancel_asked:
            self.store.requeue(job_id)
            log.info("job %s stopped by the shutdown: it runs again after the restart", job_id)
            return None
        return "CANCELLED", {}

    async def output_of(self, job: dict, not_after: float | None, encoded: str):
        """The handler's output for the job, None when it was cancelled (or the API stops); a job the
        runner took with it when it died fails (its ComfyUI prompt stopped, its files deleted), one it had
        not started yet goes to the next runner."""
        try:
            while True:
                await self.runner_up.wait()
                try:
                    return await self.runner.run(job, not_after, encoded)
                except asyncio.CancelledError:  # the API stops (the runner was told to cancel it)
                    return None
                except RunnerDied as exc:
                    if self.stopping:
                        return None
                    if not exc.started:
                        continue
                    log.error("job %s: %s", job["id"], exc)
                    return {
                        "error": f"The job runner process died while this job ran ({exc}); the log says why "
                        f"(out of memory?). {await self.abandon_prompt(job['id'])}The job was not run again: "
                        "send it again if it should."
                    }
        finally:
            prompt = self.prompts.pop(job["id"], None)
            if prompt and prompt.get("prompt_id"):
                self.ended_prompts.append(str(prompt["prompt_id"]))

    async def abandon_prompt(self, job_id: str) -> str:
        """The runner died under the job: stop its ComfyUI prompt (if it had queued one) and delete the files
        it wrote and the inputs it uploaded (issue 20 #17); a prompt ComfyUI has no trace of may still be on
        its way (the runner died during its POST /prompt): it is watched for in the background and stopped
        once ComfyUI queues it (``remove_when_queued``). Returns a sentence for the job's error."""
        prompt = self.prompts.get(job_id)
        if prompt is None:
            return ""
        settings = self.settings
        client = ComfyClient(settings.comfy_host, settings.comfy_pid_file, settings.comfy_log_file)
        folders = ComfyFolders.of(settings.comfyui_path, settings.comfy_args)
        prompt_id, queued_at, inputs = (
            str(prompt.get("prompt_id")),
            prompt.get("queued_at"),
            list(prompt.get("inputs") or []),
        )
        stopped, files = await abandon_prompt(client, prompt_id, folders, queued_at, inputs)
        if stopped is None:  # its POST /prompt may still be on its way: ComfyUI may queue it now
            task = asyncio.create_task(remove_when_queued(client, prompt_id, folders, queued_at, inputs))
            self.late_prompts.add(task)
            task.add_done_callback(self.late_prompts.discard)
            return (
                "Its ComfyUI prompt was on its way to ComfyUI (not queued yet): it is removed if ComfyUI queues "
                f"it within {LATE_PROMPT_WAIT_S:g} s, and its uploaded inputs were deleted. "
            )
        if not stopped:
            return "Its ComfyUI prompt could not be stopped (see the log). "
        return f"Its ComfyUI prompt was stopped and its files deleted ({files} output file(s)). "

    def restart_runner(self) -> None:
        """A new runner after one died (jobs wait for it); tried again every few seconds while it fails."""
        if self.stopping or (self.restarting is not None and not self.restarting.done()):
            return
        self.runner_up.clear()
        log.error("the job runner process ended; starting a new one")

        async def restart():
            delay = 1.0
            while not self.stopping:
                runner = RunnerProcess(self.runner.handler, self.runner.concurrency)
                try:
                    await self.adopt(runner)
                    log.info("a new job runner took over")
                    return
                except RunnerDied as exc:
                    log.error("%s; trying again in %.0f s", exc, delay)
                    await runner.close(timeout=5)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30)

        self.restarting = asyncio.create_task(restart())

    async def expire_loop(self) -> None:
        every = min(60.0, self.settings.result_ttl_s / 4)
        while True:
            gone = self.store.expire(time.time() - self.settings.result_ttl_s)
            self.streamed = {job_id for job_id in self.streamed if self.store.get(job_id) is not None}
            if gone:
                log.info("forgot %d finished job(s) older than RESULT_TTL_S", gone)
            await asyncio.sleep(every)

    # -- webhooks --
    def send_webhook(self, job_id: str) -> None:
        """The job's webhook (if any) is owed now: webhooks.py sends it, retrying over minutes."""
        self.webhooks.notify()

    # -- health --
    async def health(self) -> dict:
        counts = self.store.counts()
        comfy: dict = {"host": self.settings.comfy_host, "reachable": False}
        try:
            timeout = aiohttp.ClientTimeout(total=3)
            async with self.session.get(f"http://{self.settings.comfy_host}/queue", timeout=timeout) as resp:
                queue = await resp.json()
            running_ids = [
                str(item[1]) for item in queue.get("queue_running", []) if isinstance(item, list) and item[1:]
            ]
            comfy.update(
                reachable=True,
                queue_running=len(queue.get("queue_running", [])),
                queue_pending=len(queue.get("queue_pending", [])),
                # prompts of jobs that already ended (cancelled, timed out) that ComfyUI is still finishing
                finishing_ended_jobs=sum(pid in self.ended_prompts for pid in running_ids),
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            comfy["problem"] = f"{type(exc).__name__}: {exc}"
        running = len(self.running)
        return {
            "jobs": {
                "completed": counts.get("COMPLETED", 0),
                "failed": counts.get("FAILED", 0),
                "inProgress": counts.get("IN_PROGRESS", 0),
                "inQueue": counts.get("IN_QUEUE", 0),
                "retried": counts.get("retried", 0),
                "cancelled": counts.get("CANCELLED", 0),
                "timedOut": counts.get("TIMED_OUT", 0),
            },
            "workers": {"idle": self.settings.concurrency - running, "running": running},
            "comfyui": comfy,
        }


# --- HTTP ----------------------------------------------------------------------------------------------
async def read_json(request, limit_mb: float) -> dict:
    """The request's JSON body (``{}`` when empty), refused with 413 beyond ``MAX_REQUEST_MB``."""
    limit = int(limit_mb * 1024 * 1024)
    too_big = ApiError(
        413,
        f"The request body is larger than MAX_REQUEST_MB ({limit_mb:g} MB); send input images by 'url' "
        "instead of base64, or raise MAX_REQUEST_MB.",
    )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    if not data.strip():
        return {}
    too_deep = ApiError(
        400,
        f"The request body is nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays; a job needs far "
        "fewer: send a flatter body.",
    )
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from None
    except RecursionError:  # nested deeper than Python's recursion limit: far beyond MAX_JSON_DEPTH
        raise too_deep from None
    if nested_deeper_than(body, MAX_JSON_DEPTH):  # before anything else walks it recursively
        raise too_deep
    if not isinstance(body, dict):
        raise ApiError(400, 'The request body must be a JSON object: {"input": {...}}.')
    return body


def nested_deeper_than(value, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) has more than ``limit`` levels of objects and arrays (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
}


def job_body(body: dict) -> dict:
    if "input" not in body:
        raise ApiError(400, 'The request body has no "input": send {"input": {"workflow": {...}}}.')
    if not isinstance(body["input"], dict):
        kind = JSON_TYPES.get(type(body["input"]), type(body["input"]).__name__)
        raise ApiError(400, f'"input" must be an object, got {kind}: send {{"input": {{"workflow": {{...}}}}}}.')
    unknown = sorted(set(body) - BODY_KEYS)
    if unknown:
        raise ApiError(
            400, f"Unknown key(s) in the request body: {', '.join(unknown)} (allowed: {', '.join(sorted(BODY_KEYS))})."
        )
    check_policy(body.get("policy"))
    if not isinstance(body.get("s3Config", {}), dict):
        raise ApiError(400, '"s3Config" must be an object: {"accessId", "accessSecret", "bucketName", "endpointUrl"}.')
    hook = body.get("webhook")
    if hook is not None:
        parts = urlsplit(hook) if isinstance(hook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(400, f"The webhook must be an http(s) URL, got {safe_url(str(hook))!r}.")
    return body


def check_policy(policy) -> None:
    """RunPod's ``policy``: ``executionTimeout`` and ``ttl`` in whole milliseconds within RunPod's bounds;
    ``lowPriority`` (it steers RunPod's scaling) is accepted and means nothing here."""
    if policy is None:
        return
    if not isinstance(policy, dict):
        raise ApiError(400, f'"policy" must be an object such as {{"executionTimeout": 600000}}, got {policy!r}.')
    unknown = sorted(set(policy) - POLICY_KEYS)
    if unknown:
        raise ApiError(
            400, f"Unknown key(s) in policy: {', '.join(unknown)} (allowed: {', '.join(sorted(POLICY_KEYS))})."
        )
    for key, (low, high) in POLICY_BOUNDS.items():
        value = policy.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ApiError(
                400, f"policy.{key} must be whole milliseconds from {low} to {high} (7 days), got {value!r}."
            )
    if not isinstance(policy.get("lowPriority", False), bool):
        raise ApiError(400, f"policy.lowPriority must be true or false, got {policy['lowPriority']!r}.")


IDEMPOTENCY_KEY_MAX = 255


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header (1 to 255 visible ASCII characters), None without one."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX or not all("!" <= c <= "~" for c in key):
        raise ApiError(
            400,
            f"The Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters without "
            "spaces (a UUID is a good key).",
        )
    return key


def shown_key(key: str) -> str:
    """An Idempotency-Key fit for the log: a long one only by its start."""
    return key if len(key) <= 16 else f"{key[:8]}…({len(key)} chars)"


class Api(FastAPI):
    """The FastAPI app, with the routes every job takes answered before FastAPI's own stack (``HotRoutes``)."""

    hot: HotRoutes | None = None

    async def __call__(self, scope, receive, send) -> None:
        route = self.hot.match(scope) if self.hot is not None else None
        if route is None:
            await super().__call__(scope, receive, send)
        else:
            await self.hot.answer(route, scope, receive, send)


class HotRoutes:
    """``POST /run``, ``POST /runsync`` and ``GET|POST /status/{id}`` (also under ``/v2/<id>/``) answered
    straight from the ASGI scope: the same checks, the same functions and the same answers as the FastAPI
    routes that document them (``create_app``), without FastAPI's route matching, dependency solving and
    middleware for every job: a fifth to a third of the API's CPU per trivial job (bench/api_throughput.py).
    Anything else goes to FastAPI, and so does a ``/runsync`` whose query is more than ``wait=<digits>``
    (FastAPI's validation then answers a malformed one)."""

    def __init__(self, routes: dict, authorized):
        self.routes = routes  # (method, route name) -> async function(request, job_id, wait) -> Response
        self.authorized = authorized

    def match(self, scope) -> tuple | None:
        """(function, job id, wait) of a hot route, None for anything else."""
        if scope["type"] != "http" or scope.get("root_path"):
            return None
        path = scope["path"]
        if path.startswith("/v2/"):
            endpoint, _, rest = path[4:].partition("/")
            if not endpoint or not rest:
                return None
            path = f"/{rest}"
        name, slash, job_id = path[1:].partition("/")
        if (name == "status") != bool(job_id) or "/" in job_id or (slash and not job_id):
            return None
        function = self.routes.get((scope["method"], name))
        if function is None:
            return None
        wait = None
        if name == "runsync" and scope["query_string"]:
            key, _, value = scope["query_string"].partition(b"=")
            if key != b"wait" or not value.isdigit() or len(value) > 18:
                return None
            wait = int(value)
        return function, job_id, wait

    async def answer(self, route: tuple, scope, receive, send) -> None:
        """Run the route; an ``ApiError`` is its JSON answer, anything else a 500 as ``create_app``'s
        handler words it, raised again for uvicorn to log."""
        function, job_id, wait = route
        request = Request(scope, receive)
        try:
            await self.authorized(request)
            response = await function(request, job_id, wait)
        except ApiError as exc:
            response = error_response(exc)
        except Exception as exc:
            await JSONResponse({"error": unexpected_error(exc)}, 500)(scope, receive, send)
            raise
        await response(scope, receive, send)


def error_response(exc: ApiError) -> JSONResponse:
    """An ``ApiError`` as its HTTP answer, ``{"error": "<sentence>"}``."""
    return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)


def unexpected_error(exc: Exception) -> str:
    """The answer to a request a bug broke: its type only (its message may hold secrets; uvicorn logs it)."""
    return f"The API failed on this request unexpectedly ({type(exc).__name__}); its log has the details."


def create_app(settings: Settings, runner: RunnerProcess, token: str | None, store: JobStore, host: str = "127.0.0.1"):
    """The FastAPI app: RunPod's routes (also under ``/v2/<id>/``) over a ``JobService`` running its jobs in
    ``runner`` with them kept in ``store`` (both closed when the app stops); ``host``: the address it listens
    on (without a token, on loopback, requests must name a loopback host: ``local_guard``). The routes every
    job takes are answered by ``HotRoutes`` first, with the functions defined here."""
    service = JobService(settings, runner, store)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Api(title="comfy-worker API", lifespan=lifespan, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"The request is malformed ({problems})."}, 400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug: uvicorn logs its traceback; its message may hold secrets
        return JSONResponse({"error": unexpected_error(exc)}, 500)

    check_host = is_loopback(host)

    async def authorized(request: Request) -> None:  # async: FastAPI would run a plain def in a thread
        if token is None:
            local_guard(request.headers, check_host)
        elif not token_matches(request.headers.get("authorization"), token):
            raise ApiError(
                401,
                "Missing or wrong API token: send 'Authorization: Bearer <API_TOKEN>'.",
                {"WWW-Authenticate": "Bearer"},
            )

    async def submit_run(request: Request, _job_id="", _wait=None) -> Response:
        body = job_body(await read_json(request, settings.max_request_mb))
        job_id = await service.submit(body, key=idempotency_key(request))
        # IN_QUEUE, unless sent before (its key)
        return JSONResponse({"id": job_id, "status": service.get(job_id)["status"]})

    async def submit_runsync(request: Request, _job_id="", wait: int | None = None) -> Response:
        body = job_body(await read_json(request, settings.max_request_mb))
        job_id = await service.submit(body, prefix="sync-", key=idempotency_key(request))
        seconds = settings.runsync_wait_s if wait is None else min(max(wait, 0), RUNSYNC_MAX_WAIT_MS) / 1000
        return status_response(await service.wait(job_id, seconds))

    async def job_status(request: Request, job_id: str, _wait=None) -> Response:
        await read_json(request, settings.max_request_mb)
        return JSONResponse(status_body(service.get(job_id)))

    app.hot = HotRoutes(
        {
            ("POST", "run"): submit_run,
            ("POST", "runsync"): submit_runsync,
            ("GET", "status"): job_status,
            ("POST", "status"): job_status,
        },
        authorized,
    )
    router = APIRouter(dependencies=[Depends(authorized)])

    @router.post("/run")
    async def run(request: Request):
        return await submit_run(request)

    @router.post("/runsync")
    async def runsync(request: Request, wait: int | None = None):
        return await submit_runsync(request, wait=wait)

    async def status(job_id: str, request: Request):
        return await job_status(request, job_id)

    router.add_api_route("/status/{job_id}", status, methods=["GET", "POST"])

    async def stream(job_id: str, request: Request):
        await read_json(request, settings.max_request_mb)
        return JSONResponse(service.stream(job_id))

    router.add_api_route("/stream/{job_id}", stream, methods=["GET", "POST"])

    @router.post("/cancel/{job_id}")
    async def cancel(job_id: str, request: Request):
        await read_json(request, settings.max_request_mb)
        job = await service.cancel(job_id)
        return {"id": job["id"], "status": job["status"]}

    @router.post("/purge-queue")
    async def purge_queue(request: Request):
        await read_json(request, settings.max_request_mb)
        return {"removed": await service.purge(), "status": "completed"}

    @router.get("/health")
    async def health():
        return await service.health()

    app.include_router(router)
    app.include_router(router, prefix="/v2/{endpoint_id}")

    @app.get("/ping")
    async def ping():
        return {"status": "healthy"}

    return app


# --- the process ---------------------------------------------------------------------------------------
_early_runner: RunnerProcess | None = None


def preload(spec: str = "handler:handler") -> None:
    """What ``python -m comfy_worker.services --preload-handler`` does while ComfyUI boots: start the job
    runner (it imports the handler meanwhile) and import FastAPI and uvicorn here."""
    global _early_runner
    _early_runner = RunnerProcess(spec, Settings.from_env().concurrency).spawn()
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401


def yield_cpu_to_jobs() -> None:
    """Run the API's threads (this one and all it starts from now on: uvicorn's loop, the store's WAL
    flushes, webhooks) ``API_NICENESS`` nicer than its job runner, whose priority stays (runners are
    started from a thread made before: ``job_runner.keep_runner_priority``). Where the cores are busy,
    the job's own work (the runner, ComfyUI) then goes first and the API's bookkeeping fills the gaps: on
    these 2-core machines trivial jobs gained about 4% of throughput through the API
    (bench/api_throughput.py). The API's work per request stays well under a millisecond, so its answers
    are not held up noticeably. Not undone: a process may lower its priority but not raise it again."""
    keep_runner_priority()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + API_NICENESS))


def serve(settings: Settings, runner: RunnerProcess, host: str, port: int, token: str | None) -> int:
    import uvicorn

    # before listening: a busy store is a clear error
    store = JobStore(settings.volume_root / STORE_FILE, settings.max_stored_result_mb)
    app = create_app(settings, runner, token, store, host)
    service: JobService = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: stop the running jobs at once, not after the waiters
            super().handle_exit(sig, frame)
            if service.loop is not None:
                with contextlib.suppress(RuntimeError):
                    service.loop.call_soon_threadsafe(service.begin_stop)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # our logging (one format, secrets redacted)
        access_log=False,
        loop="uvloop",  # the faster loop and HTTP parser (both pinned in requirements.txt), not "auto"'s guess
        http="httptools",
        proxy_headers=False,  # nothing here reads the client's address: no X-Forwarded-* rewriting per request
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = Server(config)
    yield_cpu_to_jobs()
    # uvicorn raises the signal it stopped on again once it is done: let that end main() with 0, not kill us
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="python -m comfy_worker.api", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=settings.api_port, help="port (default API_PORT, 8000)")
    parser.add_argument("--handler", default="handler:handler", help="the job function, MODULE:FUNCTION")
    args = parser.parse_args(argv)
    token, generated = api_token(settings, args.host)
    if token:
        os.environ["API_TOKEN"] = token  # a secret from here on: redacted from every log line and job result
    setup_logging()
    runner = _early_runner if _early_runner is not None and _early_runner.handler == args.handler else None
    runner = runner or RunnerProcess(args.handler, settings.concurrency).spawn()  # imports while uvicorn starts
    if generated:
        print(f"API token (saved in {settings.volume_root / TOKEN_FILE}): {token}", flush=True)
    elif token is None and not is_loopback(args.host):
        log.warning("WARNING: API_AUTH=none: the API on %s:%d answers anyone who reaches it", args.host, args.port)
    elif token is not None:
        log.info("the API asks for a bearer token (API_TOKEN or %s)", settings.volume_root / TOKEN_FILE)
    log.info(
        "API on http://%s:%d (concurrency %d, queue depth %d); jobs in %s",
        args.host,
        args.port,
        settings.concurrency,
        settings.max_queue_depth,
        settings.volume_root / STORE_FILE,
    )
    try:
        return serve(settings, runner, args.host, args.port, token)
    except RuntimeError as exc:  # e.g. the store is in use by another API process
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
