"""RunPod serverless handler: runs a ComfyUI API-format workflow and returns its outputs (docs/api.md).

``python handler.py`` starts the RunPod worker loop; ``python handler.py --rp_serve_api --rp_api_port P``
the SDK's local API (``/run``, ``/runsync``, ``/status``). Concurrency: env ``MAX_CONCURRENCY``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from websockets.exceptions import InvalidHandshake, WebSocketException

from comfy_worker import job_models, outputs
from comfy_worker.comfy_client import ComfyClient, close_shared_session, shared_session
from comfy_worker.job_errors import JobError
from comfy_worker.job_input import (
    ImageInput,
    JobInput,
    S3Config,
    apply_overrides,
    job_secrets,
    parse_job_input,
    parse_s3_config,
    rename_references,
)
from comfy_worker.job_runner import report_prompt
from comfy_worker.log_setup import (
    redact,
    redact_answer,
    reset_job_id,
    reset_job_secrets,
    safe_url,
    set_job_id,
    set_job_secrets,
    setup_logging,
)
from comfy_worker.model_use import Uses
from comfy_worker.prompt_runner import PromptRunner
from comfy_worker.services import comfy_unreachable
from comfy_worker.settings import Settings, secret_values
from comfy_worker.state_files import GATE
from s3_upload import S3Uploader

log = logging.getLogger(__name__)


def _runpod():
    """The RunPod SDK, imported on first use: its import takes about 2 s (it probes the CPU in a child
    process), which the API's job runner (pod/local mode: no SDK call) would otherwise wait for at every
    start. The serverless worker loop imports it in ``preload`` (while ComfyUI boots) or ``main``."""
    import runpod
    from runpod.serverless.utils import rp_upload

    # The SDK calls logging.basicConfig() at import; drop that handler to keep one log format (log_setup's).
    for h in list(logging.getLogger().handlers):
        if h.formatter is not None and h.formatter._fmt == rp_upload.FMT:
            logging.getLogger().removeHandler(h)
    return runpod


def preload() -> None:
    """What ``python -m comfy_worker.services --preload-handler handler.py`` runs while ComfyUI boots."""
    _runpod()


def __getattr__(name: str):  # ``handler.runpod``: the SDK, imported on first use
    if name == "runpod":
        return _runpod()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PROGRESS_INTERVAL_S = 0.5  # at most 2 progress updates a second
JOB_MARK_INPUT = "comfy_worker_job"
# what talking to ComfyUI can raise (TimeoutError and ConnectionError are OSErrors)
COMFY_ERRORS = (aiohttp.ClientError, OSError, WebSocketException)
DOWNLOAD_CHUNK = 256 * 1024


class ProgressThrottle:
    """Forwards progress events to RunPod, at most one per ``interval`` seconds (the rest are dropped)."""

    def __init__(self, job: dict, interval: float = PROGRESS_INTERVAL_S, send=None):
        self.job = {"id": job.get("id")}
        self.interval = interval
        self.send = send or _runpod().serverless.progress_update
        self.last = float("-inf")

    def __call__(self, event: dict) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.send(self.job, event)


def mark_outputs_unique(workflow: dict, token: str, output_classes: dict[str, bool] | None = None) -> None:
    """Give every output node (``OUTPUT_NODE`` per ``output_classes``, and every sink: a node whose outputs
    no other node uses) an extra input unique to this job.

    ComfyUI ignores inputs a node does not declare, but they are part of its cache key: so save nodes
    really run (and write files this job owns) even when an identical workflow ran before, while
    everything upstream (model loaders...) stays cached. A cached save node would resend the old
    ``executed`` message, naming a file of an earlier job.
    """
    output_classes = output_classes or {}
    used = {
        str(v[0])
        for node in workflow.values()
        for v in (node.get("inputs") or {}).values()
        if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)
    }
    for node_id, node in workflow.items():
        if node_id not in used or output_classes.get(node.get("class_type")):
            node.setdefault("inputs", {})[JOB_MARK_INPUT] = token


def stored_name(name: str, token: str) -> str:
    path = Path(name)
    return f"{path.stem}-{token}{path.suffix}"


def _too_big(image: ImageInput, shown: str, max_mb: float, size: int | None) -> JobError:
    told = f" (it announces {size / 1024 / 1024:.1f} MB)" if size is not None else ""
    return JobError(
        f"The image {image.name!r} from {shown} is larger than MAX_IMAGE_MB ({max_mb:g} MB){told}; "
        "send a smaller file, or raise MAX_IMAGE_MB on the endpoint.",
        {"name": image.name, "url": shown, "max_image_mb": max_mb},
    )


async def _fetch(image: ImageInput, max_mb: float) -> bytes:
    """The image's bytes, streamed and capped at ``max_mb`` (counted after any Content-Encoding is undone,
    so a compressed bomb stops at the same cap)."""
    shown = safe_url(image.url)
    limit = int(max_mb * 1024 * 1024)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    try:
        async with shared_session().get(image.url, timeout=timeout, headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status != 200:
                raise JobError(
                    f"Could not download image {image.name!r}: {shown} answered HTTP {resp.status}.",
                    {"name": image.name, "url": shown, "status": resp.status},
                )
            if (
                resp.content_length is not None
                and resp.content_length > limit
                and not resp.headers.get("Content-Encoding")
            ):
                raise _too_big(image, shown, max_mb, resp.content_length)
            data = bytearray()
            async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                data += chunk
                if len(data) > limit:
                    raise _too_big(image, shown, max_mb, None)
            return bytes(data)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        # library errors may quote the URL, query string included: redact() strips every query
        text = f"{type(exc).__name__}: {redact(str(exc))}" if str(exc) else type(exc).__name__
        if isinstance(exc, aiohttp.TooManyRedirects):
            text = f"it redirected too many times ({text})"
        raise JobError(
            f"Could not download image {image.name!r} from {shown}: {text}.",
            {"name": image.name, "url": shown},
        ) from None


async def upload_images(
    client: ComfyClient,
    images: list[ImageInput],
    token: str,
    uploaded: list[str],
    max_image_mb: float,
    pending: dict[str, str] | None = None,
) -> dict:
    """Upload every job image under a name unique to this job; returns {given name: stored name}.
    ``pending`` holds {name: what is being done} for the images not yet uploaded."""
    pending = {} if pending is None else pending

    async def one(image: ImageInput) -> tuple[str, str]:
        pending[image.name] = "uploading it to ComfyUI"
        if image.data is None:
            pending[image.name] = f"downloading it from {safe_url(image.url)}"
        data = image.data if image.data is not None else await _fetch(image, max_image_mb)
        pending[image.name] = "uploading it to ComfyUI"
        name = stored_name(image.name, token)
        uploaded.append(name)
        answer = await client.upload_input(name, data)
        stored = answer.get("name", name)
        if stored != name:
            uploaded.append(stored)
        pending.pop(image.name, None)
        return image.name, stored

    # wait for every upload (so clean-up sees them all) before reporting the first failure
    results = await asyncio.gather(*(one(i) for i in images), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(results)


def unused_images(workflow: dict, renames: dict[str, str]) -> list[str]:
    """Point the workflow at the stored names; a note for each uploaded image no input refers to."""
    notes = []
    for given, stored in renames.items():
        if rename_references(workflow, {given: stored}) == 0:
            notes.append(
                f"The image {given!r} was uploaded but no workflow input has that value, so it was not used "
                "(check the file name in the loader node)."
            )
    return notes


def comfy_error(client: ComfyClient, exc: BaseException, prompt_id: str) -> JobError:
    """One readable sentence for a failure to talk to ComfyUI (its process is checked first)."""
    client.check_alive("it stopped answering during the job")
    kind = type(exc).__name__
    if isinstance(exc, InvalidHandshake):
        what = f"refused the websocket connection ({kind}: {exc})"
    elif isinstance(exc, TimeoutError):
        what = f"did not answer in time during the job ({kind})"
    else:
        what = f"stopped answering during the job ({kind}: {exc})"
    return JobError(
        f"ComfyUI at {client.host} {what}; {client.after_hang}.",
        {"host": client.host, "prompt_id": prompt_id, "exception_type": kind},
        refresh_worker=True,
    )


async def _output_classes(client: ComfyClient, workflow: dict, deadline: float) -> dict[str, bool]:
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await client.output_node_classes({node["class_type"] for node in workflow.values()})
    except COMFY_ERRORS as exc:  # then only sinks are marked; a ComfyUI that is gone fails the next step
        log.warning("Could not read /object_info (%s: %s); marking only the sink nodes", type(exc).__name__, exc)
        return {}


def job_id_of(job) -> str:
    """The job's id as RunPod gave it (a fresh one when it has none); read once per job."""
    raw = job.get("id") if isinstance(job, dict) else None
    return str(raw) if raw else f"local-{uuid.uuid4().hex[:12]}"


async def _upload_within(client, request: JobInput, token: str, uploaded: list[str], settings, deadline, timeout):
    """Upload the job's images (downloading those given by URL) before the job's deadline."""
    pending: dict[str, str] = {}
    scope = asyncio.timeout(max(0.0, deadline - time.monotonic()))
    try:
        async with scope:
            return await upload_images(client, request.images, token, uploaded, settings.max_image_mb, pending)
    except TimeoutError:
        if not scope.expired():
            raise
        doing = "; ".join(f"{name!r}: {what}" for name, what in pending.items()) or "uploading"
        raise JobError(
            f"The job timed out after {timeout:g} s while its images were prepared ({doing}); the workflow "
            "was not queued.",
            {"timeout_s": timeout, "state": "images", "pending": dict(pending)},
        ) from None


async def _open_within(runner: PromptRunner, client: ComfyClient, deadline: float, timeout: float) -> None:
    """Connect to ComfyUI before the job's deadline: a ComfyUI that is starting or being restarted is waited
    for (up to COMFY_READY_TIMEOUT, ``PromptRunner.open``), but never past the job's own timeout."""
    scope = asyncio.timeout(max(0.0, deadline - time.monotonic()))
    try:
        async with scope:
            await runner.open()
    except TimeoutError:
        if not scope.expired():
            raise
        restarting = client.on_death == "restarted"
        why = " (it is being restarted)" if restarting else ""
        after = "send the job again once ComfyUI is back" if restarting else client.after_hang
        raise JobError(
            f"The job timed out after {timeout:g} s while it waited for ComfyUI at {client.host} to answer{why}; "
            f"the workflow was not queued: {after}.",
            {"timeout_s": timeout, "state": "waiting_for_comfyui", "host": client.host},
            refresh_worker=client.on_death == "replaced",
        ) from None


async def run_job(job: dict, settings: Settings, job_id: str) -> dict:
    started = time.monotonic()
    request: JobInput = parse_job_input(job.get("input"))
    settings = with_job_bucket(settings, parse_s3_config(job.get("s3Config")))
    workflow = request.workflow
    apply_overrides(workflow, request.overrides)
    client = ComfyClient(settings.comfy_host, settings.comfy_pid_file, settings.comfy_log_file, settings.comfy_on_death)
    folders = outputs.ComfyFolders.of(settings.comfyui_path, settings.comfy_args)
    api_key = request.comfy_org_api_key or settings.comfy_org_api_key
    timeout = request.timeout or settings.job_timeout
    token = uuid.uuid4().hex[:12]
    uploaded: list[str] = []
    progress = ProgressThrottle(job) if settings.send_progress else None
    uses = Uses(settings.models_dir)  # the job models this job uses: no eviction or prune deletes them meanwhile
    runner = PromptRunner(
        client,
        workflow,
        timeout=timeout,
        ready_timeout=settings.comfy_ready_timeout,
        extra_data={"api_key_comfy_org": api_key} if api_key else None,
        on_progress=progress,
        comfyui_path=settings.comfyui_path,
        # in the API's job runner: the API learns the prompt, to stop it and delete its files should the runner die
        on_queue=lambda: report_prompt(runner.prompt_id, runner.submitted_wall, uploaded),
    )
    files: list[outputs.OutputFile] = []
    notes: list[str] = []
    models: list[dict] = []
    try:
        try:
            # the job's clock starts with the job: waiting for a ComfyUI that (re)starts, model and image
            # downloads, uploads, queue and run all count
            runner.deadline = deadline = started + timeout
            await _open_within(runner, client, deadline, timeout)
            if request.models:
                models = await job_models.prepare(request.models, settings, uses, deadline, timeout, progress)
            if request.images:
                renames = await _upload_within(client, request, token, uploaded, settings, deadline, timeout)
                notes += unused_images(workflow, renames)
            mark_outputs_unique(workflow, token, await _output_classes(client, workflow, deadline))
            try:
                result = await runner.run()
            finally:
                files, texts = outputs.collect(runner.result.outputs)
        except COMFY_ERRORS as exc:
            raise comfy_error(client, exc, runner.prompt_id) from None
        delivery_start = time.monotonic()
        images_out, files_out, delivery_errors = await outputs.deliver(
            files,
            client=client,
            comfyui_path=folders,
            job_id=job_id,
            s3=S3Uploader.from_settings(settings),
            max_response_mb=settings.max_response_mb,
        )
        errors = [*result.errors, *notes, *delivery_errors]
        if not images_out and not files_out and not texts and not errors:
            errors.append("The workflow finished but produced no output files or text (does it have a save node?).")
        done = time.monotonic()
        log.info("Done: %d image(s), %d file(s), %d text(s)", len(images_out), len(files_out), len(texts))
        answer = {
            "images": images_out,
            "files": files_out,
            "text": texts,
            "errors": errors,
            "prompt_id": result.prompt_id,
            "timings": {
                "queue_ms": result.queue_ms,
                "execution_ms": result.execution_ms,
                "delivery_ms": round((done - delivery_start) * 1000),
                "total_ms": round((done - started) * 1000),
            },
        }
        if request.models:
            answer["models"] = models
        return answer
    finally:
        try:
            await runner.close()
        finally:
            uses.release()
            outputs.cleanup(files, folders, uploaded, created_after=runner.submitted_wall)


def with_job_bucket(settings: Settings, s3: S3Config | None) -> Settings:
    """``settings`` for one job: its own bucket (RunPod's ``s3Config``) replaces the BUCKET_* endpoint, name
    and keys; BUCKET_PREFIX, BUCKET_REGION and S3_URL_EXPIRES still apply."""
    if s3 is None:
        return settings
    log.info("Outputs go to the job's own bucket %r at %s (s3Config)", s3.bucket_name, s3.endpoint_url)
    return dataclasses.replace(
        settings,
        bucket_endpoint_url=s3.endpoint_url,
        bucket_name=s3.bucket_name,
        bucket_access_key_id=s3.access_id,
        bucket_secret_access_key=s3.access_secret,
    )


async def handler(job: dict) -> dict:
    """RunPod entry point: ``job["input"]`` (and ``job["s3Config"]``) as docs/api.md describes; returns the
    output or ``{"error", "details"}``.

    Never raises: whatever goes wrong becomes a readable error."""
    job_id = job_id_of(job)
    token = set_job_id(job_id)
    secrets_token = set_job_secrets(job_secrets(job))
    try:
        return await _handle(job, job_id)
    except Exception as exc:  # a bug must still give the caller a readable answer
        log.exception("Unexpected error")
        secrets = [*secret_values(), *job_secrets(job)]
        return {
            "error": redact(f"The handler failed unexpectedly: {type(exc).__name__}: {exc}", secrets),
            "details": {"exception_type": type(exc).__name__},
        }
    finally:
        reset_job_secrets(secrets_token)
        reset_job_id(token)


async def _handle(job: dict, job_id: str) -> dict:
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a malformed env var: say which one
        log.error("Bad configuration: %s", exc)
        return {"error": f"The worker is misconfigured: {exc}.", "details": {}}
    secrets = [*settings.secrets(), *job_secrets(job)]
    try:
        result = await run_job(job, settings, job_id)
    except JobError as exc:
        log.error("Job failed: %s", redact(exc.message, secrets))
        result = exc.to_output()
    except Exception as exc:  # a bug must still give the caller a readable answer
        log.exception("Unexpected error")
        result = {
            "error": f"The handler failed unexpectedly: {type(exc).__name__}: {exc}",
            "details": {"exception_type": type(exc).__name__},
        }
    result = redact_answer(result, secrets)
    if settings.refresh_worker:
        result["refresh_worker"] = True
    return result


# the RunPod SDK's own arguments that decide its run mode (parsed as the SDK parses them: argparse, last wins)
_SDK_ARGS = argparse.ArgumentParser(add_help=False)
_SDK_ARGS.add_argument("--test_input")
_SDK_ARGS.add_argument("--rp_serve_api", action="store_true")
_SDK_ARGS.add_argument("--rp_log_level")


def local_test_run(args: argparse.Namespace, settings: Settings) -> bool:
    """Whether ``runpod.serverless.start`` runs one local test job and exits (its ``rp_local``): given
    ``--test_input``, or reading test_input.json when no RunPod job queue is configured; not its API."""
    if args.rp_serve_api or settings.sdk_realtime:
        return False
    return bool(args.test_input) or not settings.sdk_job_queue


def local_test_log_level(level: str) -> str:
    """The SDK's log level for a local test run: at INFO it prints the job's result raw (a signed link with
    the credentials in its query), so INFO becomes WARN (its errors still show); DEBUG and TRACE, which print
    raw jobs and outputs on purpose, and WARN, ERROR, NOTSET stay."""
    return "WARN" if level.upper() == "INFO" else level


def _shown_result(result: dict) -> dict:
    """``result`` for a log line: each base64 file's data replaced by its length."""
    shown = dict(result)
    for key in ("images", "files"):
        if isinstance(shown.get(key), list):
            shown[key] = [
                {**entry, "data": f"<{len(entry['data'])} base64 characters>"}
                if isinstance(entry, dict) and entry.get("type") == "base64" and isinstance(entry.get("data"), str)
                else entry
                for entry in shown[key]
            ]
    return shown


async def local_test_handler(job: dict) -> dict:
    """``handler`` for the SDK's local test run: logs a successful job's result through the redacting log (no
    URL query, no secret; the SDK's own raw ``Job result`` line is silenced by ``local_test_log_level``, its
    error line for a failed job is not) and closes the shared HTTP session (the process ends with the job)."""
    try:
        result = await handler(job)
    finally:
        await close_shared_session()
    if result.get("error"):  # logged already ("Job failed: ..."), and by the SDK
        return result
    token, secrets_token = set_job_id(job_id_of(job)), set_job_secrets(job_secrets(job))
    try:
        log.info("Job result: %s", _shown_result(result))
    finally:
        reset_job_secrets(secrets_token)
        reset_job_id(token)
    return result


class WorkerUnfit(RuntimeError):
    """Why this serverless worker must not take jobs (RunPod's fitness check reports it, then replaces it)."""


FITNESS_COMFY_TIMEOUT_S = 10.0


def worker_ready() -> None:
    """RunPod's fitness check (serverless only; the SDK runs it before the first job request): the
    provisioning gate is on the volume (every required model and node is ready) and ComfyUI answers.
    Raises ``WorkerUnfit`` with the reason; the SDK logs ``Fitness check failed: worker_ready |
    WorkerUnfit: <reason>``, tells RunPod, and ends the worker, which RunPod then replaces."""
    settings = Settings.from_env()
    gate = settings.volume_root / GATE
    try:
        digest = gate.read_text(encoding="utf-8").strip()
    except OSError as err:
        digest, why = "", err.strerror or str(err)
    else:
        why = "it is empty"
    if not digest:
        raise WorkerUnfit(
            f"provisioning left no gate at {gate} ({why}): the config's models and nodes are not all ready on "
            "this volume (a failed download or node install, or a volume that cannot be written: see the "
            "start's log above); this worker takes no jobs"
        )
    cause = comfy_unreachable(settings, FITNESS_COMFY_TIMEOUT_S)
    if cause is not None:
        raise WorkerUnfit(
            f"ComfyUI does not answer at http://{settings.comfy_host}/system_stats ({cause}): it died or never "
            f"started (its log: {settings.comfy_log_file}); this worker takes no jobs"
        )
    log.info("Fitness check: the provisioning gate is on the volume and ComfyUI answers")


def main() -> None:
    setup_logging()
    settings = Settings.from_env()
    log.info("Starting the RunPod handler (ComfyUI at %s, concurrency %d)", settings.comfy_host, settings.concurrency)
    entry, level = handler, settings.runpod_log_level
    args, _ = _SDK_ARGS.parse_known_args(sys.argv[1:])
    if local_test_run(args, settings):
        entry, level = local_test_handler, local_test_log_level(args.rp_log_level or level)
        if args.rp_log_level:  # the SDK applies --rp_log_level after this: the last one given wins
            sys.argv += ["--rp_log_level", level]
    runpod = _runpod()
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(level)
    if settings.mode == "serverless":
        runpod.serverless.register_fitness_check(worker_ready)
    runpod.serverless.start({"handler": entry, "concurrency_modifier": lambda _current: settings.concurrency})


if __name__ == "__main__":
    # run the module under its own name (one copy of its state; its logger is "handler", not "__main__")
    import handler

    handler.main()
