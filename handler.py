"""RunPod serverless handler: runs a ComfyUI API-format workflow and returns its outputs (SPEC §7, §8).

``python handler.py`` starts the RunPod worker loop; ``python handler.py --rp_serve_api --rp_api_port P``
the SDK's local API (``/run``, ``/runsync``, ``/status``). Concurrency: env ``MAX_CONCURRENCY``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger
from runpod.serverless.utils import rp_upload
from websockets.exceptions import InvalidHandshake, WebSocketException

from comfy_worker import outputs
from comfy_worker.comfy_client import ComfyClient, close_shared_session, shared_session
from comfy_worker.job_errors import JobError
from comfy_worker.job_input import ImageInput, JobInput, apply_overrides, parse_job_input, rename_references
from comfy_worker.log_setup import redact, reset_job_id, reset_job_secrets, set_job_id, set_job_secrets, setup_logging
from comfy_worker.prompt_runner import PromptRunner
from comfy_worker.settings import Settings, secret_values
from s3_upload import S3Uploader

log = logging.getLogger("handler")
# The RunPod SDK calls logging.basicConfig() at import; drop that handler to keep one log format (log_setup's).
for _h in list(logging.getLogger().handlers):
    if _h.formatter is not None and _h.formatter._fmt == rp_upload.FMT:
        logging.getLogger().removeHandler(_h)

PROGRESS_INTERVAL_S = 0.5  # at most 2 progress updates a second
JOB_MARK_INPUT = "comfy_worker_job"
# what talking to ComfyUI can raise (TimeoutError and ConnectionError are OSErrors)
COMFY_ERRORS = (aiohttp.ClientError, OSError, WebSocketException)
_s3_cache: dict[tuple, S3Uploader] = {}


class ProgressThrottle:
    """Forwards progress events to RunPod, at most one per ``interval`` seconds (the rest are dropped)."""

    def __init__(self, job: dict, interval: float = PROGRESS_INTERVAL_S, send=None):
        self.job = {"id": job.get("id")}
        self.interval = interval
        self.send = send or runpod.serverless.progress_update
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


def _public_url(url: str) -> str:
    """The URL without its query string (which may carry a signature or token) for messages and logs."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


async def _fetch(image: ImageInput) -> bytes:
    shown = _public_url(image.url)
    try:
        async with shared_session().get(image.url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
            if resp.status != 200:
                raise JobError(
                    f"Could not download image {image.name!r}: {shown} answered HTTP {resp.status}.",
                    {"name": image.name, "url": shown, "status": resp.status},
                )
            return await resp.read()
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        raise JobError(
            f"Could not download image {image.name!r} from {shown}: {exc or type(exc).__name__}.",
            {"name": image.name, "url": shown},
        ) from None


async def upload_images(client: ComfyClient, images: list[ImageInput], token: str, uploaded: list[str]) -> dict:
    """Upload every job image under a name unique to this job; returns {given name: stored name}."""

    async def one(image: ImageInput) -> tuple[str, str]:
        data = image.data if image.data is not None else await _fetch(image)
        name = stored_name(image.name, token)
        uploaded.append(name)
        answer = await client.upload_input(name, data)
        stored = answer.get("name", name)
        if stored != name:
            uploaded.append(stored)
        return image.name, stored

    # wait for every upload (so clean-up sees them all) before reporting the first failure
    results = await asyncio.gather(*(one(i) for i in images), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(results)


def _s3(settings: Settings) -> S3Uploader | None:
    if not settings.bucket_endpoint_url:
        return None
    key = (
        settings.bucket_endpoint_url,
        settings.bucket_name,
        settings.bucket_region,
        settings.bucket_prefix,
        settings.s3_url_expires,
        settings.bucket_access_key_id,
        settings.bucket_secret_access_key,
    )
    if key not in _s3_cache:
        _s3_cache[key] = S3Uploader(settings)
    return _s3_cache[key]


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
        f"ComfyUI at {client.host} {what}; this worker will be replaced.",
        {"host": client.host, "prompt_id": prompt_id, "exception_type": kind},
        refresh_worker=True,
    )


async def _output_classes(client: ComfyClient, workflow: dict) -> dict[str, bool]:
    try:
        return await client.output_node_classes({node["class_type"] for node in workflow.values()})
    except COMFY_ERRORS as exc:  # then only sinks are marked; a ComfyUI that is gone fails the next step
        log.warning("Could not read /object_info (%s: %s); marking only the sink nodes", type(exc).__name__, exc)
        return {}


async def run_job(job: dict, settings: Settings) -> dict:
    started = time.monotonic()
    job_id = str(job.get("id") or uuid.uuid4())
    request: JobInput = parse_job_input(job.get("input"))
    workflow = request.workflow
    apply_overrides(workflow, request.overrides)
    client = ComfyClient(settings.comfy_host, settings.comfy_pid_file, settings.comfy_log_file)
    api_key = request.comfy_org_api_key or settings.comfy_org_api_key
    runner = PromptRunner(
        client,
        workflow,
        timeout=request.timeout or settings.job_timeout,
        ready_timeout=settings.comfy_ready_timeout,
        extra_data={"api_key_comfy_org": api_key} if api_key else None,
        on_progress=ProgressThrottle(job) if settings.send_progress else None,
    )
    token = uuid.uuid4().hex[:12]
    uploaded: list[str] = []
    files: list[outputs.OutputFile] = []
    notes: list[str] = []
    try:
        try:
            await runner.open()
            if request.images:
                notes += unused_images(workflow, await upload_images(client, request.images, token, uploaded))
            mark_outputs_unique(workflow, token, await _output_classes(client, workflow))
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
            comfyui_path=settings.comfyui_path,
            job_id=job_id,
            s3=_s3(settings),
            max_response_mb=settings.max_response_mb,
        )
        errors = [*result.errors, *notes, *delivery_errors]
        if not images_out and not files_out and not texts and not errors:
            errors.append("The workflow finished but produced no output files or text (does it have a save node?).")
        done = time.monotonic()
        log.info("Done: %d image(s), %d file(s), %d text(s)", len(images_out), len(files_out), len(texts))
        return {
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
    finally:
        try:
            await runner.close()
        finally:
            outputs.cleanup(files, settings.comfyui_path, uploaded)


def _job_key(job) -> list[str]:
    """The job's own Comfy.org key (a secret of this job only), read without trusting the input's shape."""
    raw = job.get("input") if isinstance(job, dict) else None
    key = raw.get("comfy_org_api_key") if isinstance(raw, dict) else None
    return [key] if isinstance(key, str) else []


async def handler(job: dict) -> dict:
    """RunPod entry point: ``job["input"]`` as in SPEC §7; returns the output or ``{"error", "details"}``.

    Never raises: whatever goes wrong becomes a readable error."""
    token = set_job_id(str(job.get("id", "")) if isinstance(job, dict) and job.get("id") else None)
    secrets_token = set_job_secrets(_job_key(job))
    try:
        return await _handle(job)
    except Exception as exc:  # a bug must still give the caller a readable answer
        log.exception("Unexpected error")
        secrets = [*secret_values(), *_job_key(job)]
        return {
            "error": redact(f"The handler failed unexpectedly: {type(exc).__name__}: {exc}", secrets),
            "details": {"exception_type": type(exc).__name__},
        }
    finally:
        reset_job_secrets(secrets_token)
        reset_job_id(token)


async def _handle(job: dict) -> dict:
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # a malformed env var: say which one
        log.error("Bad configuration: %s", exc)
        return {"error": f"The worker is misconfigured: {exc}.", "details": {}}
    secrets = [*settings.secrets(), *_job_key(job)]
    try:
        result = await run_job(job, settings)
    except JobError as exc:
        log.error("Job failed: %s", redact(exc.message, secrets))
        result = exc.to_output()
    except Exception as exc:  # a bug must still give the caller a readable answer
        log.exception("Unexpected error")
        result = {
            "error": f"The handler failed unexpectedly: {type(exc).__name__}: {exc}",
            "details": {"exception_type": type(exc).__name__},
        }
    for key in ("error", "details", "errors"):
        if key in result:
            result[key] = _redact_obj(result[key], secrets)
    if settings.refresh_worker:
        result["refresh_worker"] = True
    return result


def _redact_obj(value, secrets: list[str]):
    if not any(len(s) >= 4 for s in secrets if s):
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [_redact_obj(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _redact_obj(v, secrets) for k, v in value.items()}
    return value


def main() -> None:
    setup_logging()
    settings = Settings.from_env()
    log.info("Starting the RunPod handler (ComfyUI at %s, concurrency %d)", settings.comfy_host, settings.concurrency)
    entry = handler
    if any(arg.startswith("--test_input") for arg in sys.argv):  # one local job, then the loop ends

        async def entry(job: dict) -> dict:
            try:
                return await handler(job)
            finally:
                await close_shared_session()

    RunPodLogger().set_level(settings.runpod_log_level)
    runpod.serverless.start({"handler": entry, "concurrency_modifier": lambda _current: settings.concurrency})


if __name__ == "__main__":
    main()
