"""comfy_worker.api: the worker's own HTTP API, a real uvicorn process on a free port running handler.py
against the real ComfyUI (docs/api.md, "The worker's HTTP API")."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import aiohttp
import pytest
import requests
import runpod
import uvicorn
from PIL import Image
from support.api_server import SUPPORT, ApiServer, slow_workflow, tiny_workflow
from support.comfy_process import ROOT
from support.holding_proxy import HoldingProxy
from support.local_http import QuietHandler, serve_in_thread
from support.moto_s3 import moto_s3
from support.recording_handler import ran
from support.webhook_receiver import WebhookReceiver

from comfy_worker.api import (
    API_NICENESS,
    MAX_JSON_DEPTH,
    ApiError,
    JobService,
    create_app,
    status_body,
    status_response,
)
from comfy_worker.job_runner import RunnerProcess
from comfy_worker.job_store import JobStore
from comfy_worker.settings import Settings

TOKEN = "api-test-token-7f3a9c"
UI_FORMAT = "The workflow is in ComfyUI's UI format"


@contextlib.contextmanager
def api_processes(comfyui, tmp_path, handler: str | None = None):
    """A factory of API processes on ``tmp_path/volume`` (each its own free port); all stopped at the end."""
    started: list[ApiServer] = []

    def make(token: str | None = TOKEN, volume=None, log_name=None, **env) -> ApiServer:
        log = tmp_path / (log_name or f"api-{len(started)}.log")
        server = ApiServer(comfyui, volume or tmp_path / "volume", log, token=token, handler=handler, **env)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
def api_factory(comfyui, tmp_path):
    """API processes running handler.py against the test ComfyUI."""
    with api_processes(comfyui, tmp_path) as make:
        yield make


@pytest.fixture
def quick_api(tmp_path):
    """API processes running tests/support/recording_handler.py (no ComfyUI): a job's input is
    ``{"record": <file>, "sleep": <s>, "value": <any>}``; ``recorded(server)`` lists the jobs it started."""
    with api_processes(None, tmp_path, handler="recording_handler:handler") as make:
        yield make


@pytest.fixture
def api(api_factory):
    return api_factory()


def pixel(entry: dict) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(base64.b64decode(entry["data"]))) as img:
        assert img.size == (8, 8)
        return img.convert("RGB").getpixel((4, 4))


def history_size(comfyui) -> int:
    return len(comfyui.get_json("/history?max_items=100000"))


def comfy_idle(comfyui) -> bool:
    queue = comfyui.get_json("/queue")
    return queue["queue_running"] == [] and queue["queue_pending"] == []


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (waiting for whoever adopted it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the routes -------------------------------------------------------------------------------------
def test_runsync_returns_the_image_in_runpods_shape(api):
    answer = api.post("/runsync", {"input": {"workflow": tiny_workflow(0x336699)}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "COMPLETED" and body["id"].startswith("sync-"), body
    assert isinstance(body["delayTime"], int) and isinstance(body["executionTime"], int) and body["executionTime"] > 0
    (image,) = body["output"]["images"]
    assert image["filename"].startswith("api_test_") and pixel(image) == (0x33, 0x66, 0x99)
    assert body["output"]["errors"] == [] and "prompt_id" in body["output"]

    # the same route under /v2/<endpoint id>/, as RunPod's clients call it
    v2 = api.post("/v2/my-endpoint/runsync", {"input": {"workflow": tiny_workflow(0x010203)}}).json()
    assert v2["status"] == "COMPLETED" and pixel(v2["output"]["images"][0]) == (1, 2, 3)

    # a failed job: RunPod's shape, the handler's sentence in "error", its details under "output"
    failed = api.post("/runsync", {"input": {"workflow": {"nodes": [], "links": []}}}).json()
    assert failed["status"] == "FAILED" and failed["error"].startswith(UI_FORMAT), failed
    bad_node = api.post("/runsync", {"input": {"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}}).json()
    assert bad_node["status"] == "FAILED" and "details" in bad_node["output"], bad_node

    # request errors: one sentence under "error"
    missing = api.post("/run", {"workflow": tiny_workflow()})
    assert missing.status_code == 400 and 'has no "input"' in missing.json()["error"]
    typo = api.post("/run", {"input": {}, "webhok": "http://x"})
    assert typo.status_code == 400 and "webhok" in typo.json()["error"]
    not_json = api.http.post(f"{api.url}/run", data="{", headers=api.headers(...))
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    bad_hook = api.post("/run", {"input": {}, "webhook": "file:///etc/passwd"})
    assert bad_hook.status_code == 400 and "http(s) URL" in bad_hook.json()["error"]
    unknown = api.get("/status/no-such-job")
    assert unknown.status_code == 404 and "No job 'no-such-job'" in unknown.json()["error"]


def test_run_then_status_polling_get_and_post(api):
    sent = api.post("/run", {"input": {"workflow": slow_workflow(10)}})
    assert sent.status_code == 200 and set(sent.json()) == {"id", "status"} and sent.json()["status"] == "IN_QUEUE"
    job_id = sent.json()["id"]
    seen = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1] not in ("COMPLETED", "FAILED"):
        get = api.get(f"/status/{job_id}").json()
        post = api.post(f"/v2/ep/status/{job_id}").json()
        seen += [get["status"], post["status"]]
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    assert "IN_PROGRESS" in seen and seen[-1] == "COMPLETED", seen
    done = api.status(job_id)
    assert done["output"]["images"] and done["executionTime"] >= 500  # 10 steps of 0.05 s


def test_the_runpod_packages_endpoint_client_runs_jobs_here(api, monkeypatch):
    monkeypatch.setattr(runpod, "api_key", TOKEN)
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{api.url}/v2")
    endpoint = runpod.Endpoint("any-endpoint-id")

    output = endpoint.run_sync({"workflow": tiny_workflow(0x0A0B0C)}, timeout=60)
    assert pixel(output["images"][0]) == (10, 11, 12)

    job = endpoint.run({"input": {"workflow": tiny_workflow(0x0D0E0F)}})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert pixel(job.output(timeout=60)["images"][0]) == (13, 14, 15)
    assert job.status() == "COMPLETED"

    slow = endpoint.run({"workflow": slow_workflow(200)})
    queued = endpoint.run({"workflow": tiny_workflow()})
    wait_for(lambda: slow.status() == "IN_PROGRESS", 30, "the slow job to run")
    health = endpoint.health()
    assert health["jobs"]["inProgress"] == 1 and health["jobs"]["inQueue"] == 1 and health["workers"]["running"] == 1
    assert endpoint.purge_queue() == {"removed": 1, "status": "completed"}
    assert queued.status() == "CANCELLED"
    assert slow.cancel() == {"id": slow.job_id, "status": "CANCELLED"}

    monkeypatch.setattr(runpod, "api_key", "wrong-token")
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        runpod.Endpoint("any-endpoint-id").health()


# --- authentication ---------------------------------------------------------------------------------
def test_401_without_or_with_a_wrong_token_and_the_token_in_no_log(api_factory, tmp_path):
    hook = serve_in_thread(QuietHandler)  # answers 501: the webhook fails, and its URL is logged
    try:
        api = api_factory(WEBHOOK_RETRIES="0", WEBHOOK_ALLOW_HOSTS=f"127.0.0.1:{hook.server_port}")
        job = {"input": {"workflow": tiny_workflow()}}
        for token in (None, "wrong-token", TOKEN[:-1], TOKEN + "x", f"Basic {TOKEN}"):
            for method, path in (("post", "/run"), ("post", "/v2/x/runsync"), ("get", "/health"), ("get", "/status/x")):
                answer = getattr(api, method)(path, **({"body": job} if method == "post" else {}), token=token)
                assert answer.status_code == 401, (token, path, answer.text)
                assert "Authorization: Bearer" in answer.json()["error"] and TOKEN not in answer.text
                assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert api.get("/ping", token=None).status_code == 200  # liveness needs no token
        assert api.get("/health").status_code == 200

        # the token in a job's input and in a webhook URL: never in the log, nor in the result
        leaky = {
            "input": {
                "workflow": {**tiny_workflow(), "1": {"class_type": "LoadImage", "inputs": {"image": f"{TOKEN}.png"}}}
            },
            "webhook": f"http://127.0.0.1:{hook.server_port}/hook/{TOKEN}?sig={TOKEN}",
        }
        failed = api.post("/runsync", leaky).json()
        assert failed["status"] == "FAILED" and TOKEN not in json.dumps(failed) and "***" in failed["error"], failed
        wait_for(lambda: "giving up" in api.log(), 30, "the webhook to be given up")
        assert api.stop() == 0
        log = api.log()
        assert "Job failed" in log and "/hook/***" in log
        assert TOKEN not in log
    finally:
        hook.shutdown()


def test_a_token_is_generated_off_loopback_printed_once_and_api_auth_none_opts_out(api_factory, tmp_path):
    volume = tmp_path / "volume"
    first = api_factory(token=None, host="0.0.0.0", log_name="first.log")
    token_file = volume / ".api-token"
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) >= 32
    assert first.log().count(token) == 1 and f"API token (saved in {token_file}): {token}" in first.log()
    assert first.get("/health", token=None).status_code == 401
    assert first.get("/health", token=token).status_code == 200
    assert first.stop() == 0

    second = api_factory(token=None, host="0.0.0.0", log_name="second.log")  # the saved token, not printed again
    assert token not in second.log() and second.get("/health", token=token).status_code == 200
    assert second.get("/health", token=None).status_code == 401
    assert second.stop() == 0

    loopback = api_factory(token=None, log_name="loopback.log")  # no API_TOKEN, loopback only: no token asked
    assert loopback.get("/health", token=None).status_code == 200
    assert loopback.stop() == 0
    opted_out = api_factory(token=TOKEN, host="0.0.0.0", API_AUTH="none", log_name="none.log")
    assert opted_out.get("/health", token=None).status_code == 200
    assert "API_AUTH=none" in opted_out.log()


LEAKED = "token *** rejected with id *** and key *** (comfy key ***) at https://bucket.example/out.png?…"


@pytest.mark.parametrize(
    "handler, error",
    [("returns_secrets", LEAKED), ("raises_secrets", f"The handler failed unexpectedly: RuntimeError: {LEAKED}")],
    ids=["returned", "raised"],
)
def test_a_custom_handlers_error_quoting_secrets_is_redacted_in_answers_store_and_log(tmp_path, handler, error):
    """issue 21 (the API redacts whatever handler it runs): a ``--handler`` that returns or raises an error
    quoting API_TOKEN, the job's s3Config keys and Comfy.org key and a signed URL: none of them in /runsync,
    /run + /status, the store file or the log."""
    s3 = {"accessId": "AKIALEAKYTEST0001", "accessSecret": "leaky-s3-secret-Q9x7Lm2P", "bucketName": "b"}
    s3["endpointUrl"] = "https://s3.example"
    comfy_key = "leaky-comfy-key-8d2f"
    secrets = [TOKEN, s3["accessId"], s3["accessSecret"], comfy_key, "sig123"]
    body = {"input": {"workflow": tiny_workflow(), "comfy_org_api_key": comfy_key}, "s3Config": s3}
    with api_processes(None, tmp_path, handler=f"leaky_handlers:{handler}") as make:  # tests/support/
        api = make()
        sync = api.post("/runsync", body).json()
        queued = api.post("/run", body).json()
        answers = [sync, api.wait_final(queued["id"]), api.status(sync["id"])]
        for answer in answers:
            assert answer["status"] == "FAILED" and answer["error"] == error, answer
            assert not [s for s in secrets if s in json.dumps(answer)], answer
        if handler == "returns_secrets":
            assert sync["output"]["details"] == {"why": LEAKED}
        assert api.stop() == 0
    log = api.log()
    assert not [s for s in secrets if s in log], log
    assert handler == "returns_secrets" or "RuntimeError: token *** rejected" in log  # the runner's traceback
    for file in (api.volume / ".api").iterdir():  # the store, its WAL if any
        assert not [s for s in secrets if s.encode() in file.read_bytes()], file


# --- cancel, webhooks ---------------------------------------------------------------------------------
def test_cancel_interrupts_a_running_slow_workflow_and_drops_a_queued_job(api, comfyui):
    before = history_size(comfyui)
    running = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]  # 20 s uncancelled
    queued = api.post("/run", {"input": {"workflow": tiny_workflow()}}).json()["id"]
    api.wait_status(running, "IN_PROGRESS")
    wait_for(lambda: comfyui.get_json("/queue")["queue_running"], 30, "ComfyUI to run the prompt")
    time.sleep(0.3)

    assert api.post(f"/cancel/{queued}").json() == {"id": queued, "status": "CANCELLED"}
    started = time.monotonic()
    assert api.post(f"/v2/ep/cancel/{running}").json() == {"id": running, "status": "CANCELLED"}
    assert time.monotonic() - started < 5
    assert comfy_idle(comfyui)  # interrupted, not left running in ComfyUI
    body = api.status(running)
    assert body["status"] == "CANCELLED" and body["executionTime"] < 5000 and "output" not in body
    assert api.status(queued)["status"] == "CANCELLED"

    started = time.monotonic()
    nxt = api.post("/runsync", {"input": {"workflow": tiny_workflow(0x102030)}}).json()
    assert nxt["status"] == "COMPLETED" and pixel(nxt["output"]["images"][0]) == (0x10, 0x20, 0x30)
    assert time.monotonic() - started < 5
    assert history_size(comfyui) == before + 2  # the cancelled slow one and the next; the queued one never ran
    assert api.post(f"/cancel/{queued}").json()["status"] == "CANCELLED"  # cancelling again changes nothing
    assert api.post("/cancel/nope").status_code == 404


def test_a_webhook_gets_the_result_also_after_failing_once(api_factory):
    receiver = WebhookReceiver(fail_first=1)
    try:
        api = api_factory(WEBHOOK_RETRY_BACKOFF="0.2", WEBHOOK_ALLOW_HOSTS=receiver.host_port)
        job_id = api.post(
            "/run", {"input": {"workflow": tiny_workflow(0x445566)}, "webhook": f"{receiver.url}/done?k=1"}
        ).json()["id"]
        failed_id = api.post("/run", {"input": {"workflow": {"nodes": [], "links": []}}}, token=TOKEN).json()[
            "id"
        ]  # no webhook: nothing posted for it
        wait_for(lambda: len(receiver.posts) >= 2, 30, f"two webhook posts; {receiver.posts}")
        time.sleep(0.5)
        (first, second) = receiver.posts
        assert first[:2] == ("/done?k=1", 500) and second[:2] == ("/done?k=1", 200)
        body = second[2]
        assert body == first[2] == api.status(job_id)
        assert body["id"] == job_id and body["status"] == "COMPLETED"
        assert pixel(body["output"]["images"][0]) == (0x44, 0x55, 0x66)
        assert api.wait_final(failed_id)["status"] == "FAILED" and len(receiver.posts) == 2
        assert "webhook http://127.0.0.1" in api.log() and "?k=1" not in api.log()  # the query is never logged
    finally:
        receiver.server.shutdown()


def test_a_webhook_to_the_worker_itself_is_refused_with_400_naming_the_setting(api, comfyui):
    """issue 20 #4: a webhook to http://127.0.0.1:<ComfyUI's port>/interrupt was accepted and delivered
    (it stopped the running prompt); private and link-local addresses too."""
    for hook in (
        f"http://127.0.0.1:{comfyui.port}/interrupt",
        "http://localhost:8000/purge-queue",
        "http://[::1]:8188/interrupt",
        "http://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data",
    ):
        for route in ("/run", "/runsync"):
            answer = api.post(route, {"input": {"workflow": tiny_workflow()}, "webhook": hook})
            assert answer.status_code == 400, (hook, answer.text)
            error = answer.json()["error"]
            assert error.startswith("The webhook http") and "is refused" in error and "WEBHOOK_ALLOW_HOSTS=" in error
    assert api.get("/health").json()["jobs"]["inQueue"] == 0  # nothing was accepted


def test_a_cancelled_queued_jobs_webhook_is_sent(api_factory):
    """issue 20 (the suite's gaps): cancelling a queued job must send its webhook (CANCELLED)."""
    receiver = WebhookReceiver()
    try:
        api = api_factory(WEBHOOK_ALLOW_HOSTS=receiver.host_port)
        running = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]
        queued = api.post("/run", {"input": {"workflow": tiny_workflow()}, "webhook": f"{receiver.url}/c"}).json()["id"]
        api.wait_status(running, "IN_PROGRESS")
        assert api.post(f"/cancel/{queued}").json() == {"id": queued, "status": "CANCELLED"}
        wait_for(lambda: receiver.posts, 15, "the cancelled job's webhook")
        assert [(path, status, body["id"], body["status"]) for path, status, body in receiver.posts] == [
            ("/c", 200, queued, "CANCELLED")
        ]
        api.post(f"/cancel/{running}")
    finally:
        receiver.close()


def test_the_same_idempotency_key_returns_the_same_job_also_after_the_api_was_killed(api_factory, comfyui):
    """issue 20 #20: a /runsync cut off by an API kill left the client without the job id, and its retry
    ran the work again; with an Idempotency-Key the retry gets the same job."""
    key = "retry-key-" + "7" * 40  # long: never logged whole
    first = api_factory(log_name="first.log")
    before = history_size(comfyui)
    body = {"input": {"workflow": slow_workflow(20)}}
    keyed = {"Idempotency-Key": key}
    sent = first.http.post(f"{first.url}/run", json=body, headers={**first.headers(...), **keyed}).json()
    again = first.http.post(f"{first.url}/run", json=body, headers={**first.headers(...), **keyed}).json()
    assert again["id"] == sent["id"] and again["status"] in ("IN_QUEUE", "IN_PROGRESS")
    synced = first.http.post(f"{first.url}/v2/ep/runsync", json=body, headers={**first.headers(...), **keyed})
    assert synced.json()["id"] == sent["id"] and synced.json()["status"] == "COMPLETED"  # waited for it
    other = first.http.post(f"{first.url}/run", json={"input": {}}, headers={**first.headers(...), **keyed})
    assert other.status_code == 422 and "already used for a different request" in other.json()["error"]
    bad = first.http.post(f"{first.url}/run", json=body, headers={**first.headers(...), "Idempotency-Key": "x" * 256})
    assert bad.status_code == 400 and "Idempotency-Key header must be 1 to 255" in bad.json()["error"]
    first.stop(signal.SIGKILL)

    second = api_factory(log_name="second.log")
    retried = second.http.post(f"{second.url}/runsync", json=body, headers={**second.headers(...), **keyed}).json()
    assert retried["id"] == sent["id"] and retried["status"] == "COMPLETED"
    assert history_size(comfyui) - before == 1  # the work ran once
    jobs = second.get("/health").json()["jobs"]
    assert jobs["completed"] == 1 and jobs["inQueue"] == 0
    assert key not in first.log() + second.log() and key[:8] in first.log()


def test_no_store_file_keeps_a_final_jobs_secrets_and_all_are_0600(api_factory):
    """issue 20 #2: after a COMPLETED job the store's WAL (created 0644) still held its s3Config keys
    and its comfy_org_api_key."""
    api = api_factory(S3_URL_EXPIRES="0")  # plain object URLs: a presigned one carries the key id, as SigV4 says
    comfy_key = "comfy-org-key-4e8d21a0"
    with moto_s3("pod-secret", enforce_auth=True) as s3:
        s3_config = {"accessId": s3.key_id, "accessSecret": s3.secret, "bucketName": "pod-secret"}
        s3_config["endpointUrl"] = s3.endpoint
        job = {"input": {"workflow": tiny_workflow(), "comfy_org_api_key": comfy_key}, "s3Config": s3_config}
        answer = api.post("/runsync", job).json()
        assert answer["status"] == "COMPLETED", answer
    store_dir = api.volume / ".api"
    files = sorted(store_dir.iterdir())
    assert {f.name for f in files} >= {"jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "jobs.sqlite3.lock"}
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
    secrets = [s.encode() for s in (s3.key_id, s3.secret, comfy_key)]

    def leaked():
        return [(f.name, s) for f in sorted(store_dir.iterdir()) for s in secrets if s in f.read_bytes()]

    wait_for(lambda: not leaked(), 15, "the secrets to leave every store file")


# --- bounds -------------------------------------------------------------------------------------------
def test_200_concurrent_runs_with_max_queue_depth_20_get_200_or_429_and_every_accepted_job_runs_once(
    api_factory, comfyui
):
    api = api_factory(MAX_QUEUE_DEPTH="20")
    before = history_size(comfyui)

    async def burst():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def one(i):
                body = {"input": {"workflow": tiny_workflow(i)}}
                async with session.post(f"{api.url}/run", json=body) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            return await asyncio.gather(*(one(i) for i in range(200)))

    answers = asyncio.run(burst())
    assert {status for status, _, _ in answers} <= {200, 429}
    accepted = [body["id"] for status, body, _ in answers if status == 200]
    refused = [(body, retry) for status, body, retry in answers if status == 429]
    assert len(accepted) >= 20 and refused, (len(accepted), len(refused))
    assert len(set(accepted)) == len(accepted)
    for body, retry in refused:
        assert "MAX_QUEUE_DEPTH=20" in body["error"] and int(retry) >= 1
    for job_id in accepted:
        assert api.wait_final(job_id)["status"] == "COMPLETED"
    assert history_size(comfyui) - before == len(accepted)  # each accepted job ran in ComfyUI exactly once
    health = api.get("/health").json()["jobs"]
    assert health["completed"] == len(accepted) and health["retried"] == 0 and health["inQueue"] == 0


def test_limits_request_size_runsync_wait_and_result_ttl(api_factory):
    api = api_factory(MAX_REQUEST_MB="0.05", RUNSYNC_WAIT_S="0.3", RESULT_TTL_S="2")
    big = {"input": {"workflow": tiny_workflow(), "pad": "x" * 60_000}}
    refused = api.post("/run", big)
    assert refused.status_code == 413 and "larger than MAX_REQUEST_MB (0.05 MB)" in refused.json()["error"]
    chunked = api.http.post(  # no Content-Length: counted while read
        f"{api.url}/run", data=iter([b'{"input": "', b"x" * 60_000, b'"}']), headers=api.headers(...)
    )
    assert chunked.status_code == 413

    waited = api.post("/runsync", {"input": {"workflow": slow_workflow(30)}}).json()  # 1.5 s > RUNSYNC_WAIT_S
    assert waited["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in waited, waited
    done = api.wait_final(waited["id"])
    assert done["status"] == "COMPLETED"
    quick = api.post("/runsync?wait=20000", {"input": {"workflow": slow_workflow(30)}}).json()  # ?wait= as RunPod's
    assert quick["status"] == "COMPLETED"
    time.sleep(2.2)
    expired = api.get(f"/status/{waited['id']}")
    assert expired.status_code == 404 and "RESULT_TTL_S=2 s" in expired.json()["error"]
    wait_for(lambda: stored_status(api, waited["id"]) is None, 5, "the expired row to be deleted from the store")


def test_a_result_over_max_stored_result_mb_ends_the_job_failed_telling_the_client_to_use_s3(api_factory):
    """issue 20 #21: the API kept any result whole in its store (base64 outputs, many MB per job)."""
    api = api_factory(MAX_STORED_RESULT_MB="0.001")  # 1 KB: four 8x8 PNGs (with their metadata) are more
    workflow = tiny_workflow()
    workflow["1"]["inputs"]["batch_size"] = 4
    body = api.post("/runsync", {"input": {"workflow": workflow}}).json()
    assert body["status"] == "FAILED" and "images" not in body["output"], body
    assert "more than MAX_STORED_RESULT_MB (0.001 MB)" in body["error"] and "S3" in body["error"]
    assert body["output"]["details"]["max_stored_result_mb"] == 0.001
    assert api.status(body["id"]) == body


def stored_status(server: ApiServer, job_id: str) -> str | None:
    """The job's status as the store on the volume holds it (read beside the API: WAL allows it)."""
    with contextlib.closing(sqlite3.connect(server.volume / ".api" / "jobs.sqlite3")) as db:
        row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def test_a_result_past_result_ttl_s_is_gone_even_before_the_store_is_swept(tmp_path):
    settings = Settings.from_env({"RESULT_TTL_S": "60", "VOLUME_ROOT": str(tmp_path)})
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        service = JobService(settings, None, store)
        now = time.time()
        for job_id, finished in (("old", now - 61), ("fresh", now - 59)):
            store.add(job_id, json.dumps({"input": {}}), None, finished - 1)
            store.start(job_id, finished - 1)
            store.finish(job_id, "COMPLETED", {"output": {}}, finished)
        assert service.get("fresh")["status"] == "COMPLETED"
        with pytest.raises(ApiError, match="its result expired") as err:
            service.get("old")
        assert err.value.status == 404
    finally:
        store.close()


def test_health_counts_match_what_was_sent(api, comfyui):
    for _ in range(3):
        assert api.post("/runsync", {"input": {"workflow": tiny_workflow()}}).json()["status"] == "COMPLETED"
    for _ in range(2):
        assert api.post("/runsync", {"input": {"workflow": {"nodes": [], "links": []}}}).json()["status"] == "FAILED"
    slow = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]
    queued = [api.post("/run", {"input": {"workflow": tiny_workflow()}}).json()["id"] for _ in range(4)]
    api.wait_status(slow, "IN_PROGRESS")
    wait_for(lambda: comfyui.get_json("/queue")["queue_running"], 30, "ComfyUI to run the prompt")
    health = api.get("/v2/ep/health").json()
    assert health["jobs"] == {
        "completed": 3,
        "failed": 2,
        "inProgress": 1,
        "inQueue": 4,
        "retried": 0,
        "cancelled": 0,
        "timedOut": 0,
    }
    assert health["workers"] == {"idle": 0, "running": 1}
    assert health["comfyui"]["reachable"] is True and health["comfyui"]["queue_running"] == 1
    api.post(f"/cancel/{queued[0]}")
    assert api.post("/purge-queue").json() == {"removed": 3, "status": "completed"}
    api.post(f"/cancel/{slow}")
    jobs = api.get("/health").json()["jobs"]
    assert (jobs["inQueue"], jobs["inProgress"], jobs["cancelled"], jobs["completed"]) == (0, 0, 5, 3)


# --- RunPod's policy, /stream ----------------------------------------------------------------------------
def test_policy_execution_timeout_stops_a_job_and_ttl_ends_one_still_queued_both_timed_out(api_factory, comfyui):
    hooks = WebhookReceiver()
    try:
        api = api_factory(WEBHOOK_ALLOW_HOSTS=hooks.host_port)
        slow = {"workflow": slow_workflow(400)}  # 20 s without a limit
        timed = api.post("/run", {"input": slow, "policy": {"executionTimeout": 11000, "lowPriority": True}}).json()
        waiting = {"input": {"workflow": tiny_workflow()}, "policy": {"ttl": 10000}, "webhook": f"{hooks.url}/ttl"}
        expired = api.post("/run", waiting).json()
        kept = api.post("/run", {"input": {"workflow": tiny_workflow()}, "policy": {"ttl": 60000}}).json()

        body = api.wait_final(timed["id"], 30)
        assert body["status"] == "TIMED_OUT", body
        assert (
            "policy.executionTimeout (11000 ms)" in body["error"]
            and "asked to interrupt its prompt" in body["error"]
            and 11000 <= body["executionTime"] < 16000
        )
        late = api.wait_final(expired["id"], 10)
        assert late["status"] == "TIMED_OUT" and "policy.ttl (10000 ms) and was not run" in late["error"]
        assert "executionTime" not in late and late["delayTime"] >= 10000
        assert api.wait_final(kept["id"], 30)["status"] == "COMPLETED"
        assert comfy_idle(comfyui)
        wait_for(lambda: hooks.posts, 10, "the webhook of the expired job")
        assert hooks.posts[0][2]["status"] == "TIMED_OUT"
        jobs = api.get("/health").json()["jobs"]
        assert (jobs["timedOut"], jobs["completed"]) == (2, 1)
    finally:
        hooks.server.shutdown()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"executionTimeout": 1000}, "policy.executionTimeout must be whole milliseconds from 5000"),
        ({"ttl": "1h"}, "policy.ttl must be whole milliseconds from 10000"),
        ({"executionTimeout": True}, "policy.executionTimeout must be whole milliseconds"),
        ({"lowPriority": "yes"}, "policy.lowPriority must be true or false"),
        ({"timeout": 5}, "Unknown key(s) in policy: timeout (allowed: executionTimeout, lowPriority, ttl)"),
        ([1], '"policy" must be an object'),
    ],
)
def test_a_bad_policy_is_refused_with_400_naming_it(api, policy, message):
    answer = api.post("/run", {"input": {"workflow": tiny_workflow()}, "policy": policy})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_an_s3config_that_is_not_an_object_is_refused_with_400(api):
    answer = api.post("/run", {"input": {"workflow": tiny_workflow()}, "s3Config": "s3://bucket"})
    assert answer.status_code == 400 and '"s3Config" must be an object' in answer.json()["error"]


def test_a_jobs_s3config_reaches_the_handler_and_leaves_the_store_once_the_job_is_final(api):
    with moto_s3("pod-out", enforce_auth=True) as store:
        s3_config = {"accessId": store.key_id, "accessSecret": store.secret, "bucketName": "pod-out"}
        s3_config["endpointUrl"] = store.endpoint
        body = {"input": {"workflow": tiny_workflow()}, "s3Config": s3_config}
        answer = api.post("/runsync", body).json()
        assert answer["status"] == "COMPLETED", answer
        image = answer["output"]["images"][0]
        assert image["type"] == "s3_url" and store.keys("pod-out") == [f"{answer['id']}/{image['filename']}"]
    with contextlib.closing(sqlite3.connect(api.volume / ".api" / "jobs.sqlite3")) as db:
        assert db.execute("SELECT request FROM jobs WHERE id = ?", (answer["id"],)).fetchone() == ("{}",)
    assert store.secret not in api.log()


def test_the_runpod_clients_stream_gets_the_output_once(api, monkeypatch):
    monkeypatch.setattr(runpod, "api_key", TOKEN)
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{api.url}/v2")
    job = runpod.Endpoint("ep").run({"workflow": tiny_workflow(0x050607)})
    chunks = list(job.stream())  # ends once the job is final and its chunk was handed out
    assert len(chunks) == 1 and pixel(chunks[0]["images"][0]) == (5, 6, 7)
    assert api.get(f"/stream/{job.job_id}").json() == {"id": job.job_id, "status": "COMPLETED", "stream": []}


# --- the job runner process -----------------------------------------------------------------------------
def test_a_job_runner_that_dies_fails_its_job_and_a_new_runner_runs_the_next(api, comfyui):
    doomed = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]
    after = api.post("/run", {"input": {"workflow": tiny_workflow(0x0C0C0C)}}).json()["id"]
    api.wait_status(doomed, "IN_PROGRESS")
    first_runner = api.runner_pid()
    os.kill(first_runner, signal.SIGKILL)  # as the kernel's OOM killer would

    body = api.wait_final(doomed, 30)
    assert body["status"] == "FAILED" and "The job runner process died while this job ran" in body["error"]
    assert "exit code -9" in body["error"] and "was not run again" in body["error"]
    done = api.wait_final(after, 60)
    assert done["status"] == "COMPLETED" and pixel(done["output"]["images"][0]) == (12, 12, 12)
    assert api.runner_pid() not in (None, first_runner)
    assert "a new job runner took over" in api.log()


def niceness(pid: int, thread: str | None = None) -> list[int]:
    """The nice value of each thread of process ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    tasks = Path(f"/proc/{pid}/task").iterdir() if thread is None else [Path(f"/proc/{pid}/task/{thread}")]
    return [int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16]) for task in tasks]


def test_the_api_runs_nicer_than_its_job_runner_also_after_the_runner_died(quick_api):
    """issue 25: where the cores are busy the job's work goes first: the API's uvicorn loop runs
    API_NICENESS nicer than its job runner, and a runner started after one died keeps the runner's priority."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    api = quick_api()
    assert api.post("/runsync", {"input": {"value": 1}}).json()["output"] == {"echo": 1}
    main_thread = niceness(api.proc.pid, str(api.proc.pid))[0]
    assert main_thread == min(19, own + API_NICENESS)
    first = api.runner_pid()
    assert set(niceness(first)) == {own}
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: api.runner_pid() not in (None, first), 30, "a new job runner")
    assert api.post("/runsync", {"input": {"value": 2}}).json()["output"] == {"echo": 2}
    assert set(niceness(api.runner_pid())) == {own}


def test_a_job_runner_killed_under_a_job_leaves_no_prompt_running_and_deletes_its_files(api, comfyui):
    """issue 20 #17: the runner's death (SIGKILL, as the OOM killer) left its ComfyUI prompt running and its
    output files (and uploaded inputs) behind while the job was told FAILED; the API now stops that prompt
    and deletes them."""
    prefix = f"orphan_{time.time_ns()}"
    workflow = tiny_workflow(size=16)
    workflow["3"] = {"class_type": "WorkerTestSaveAndPass", "inputs": {"image": ["1", 0], "filename_prefix": prefix}}
    workflow["4"] = {
        "class_type": "WorkerTestSteps",
        "inputs": {"image": ["3", 0], "steps": 400, "seconds_per_step": 0.05},
    }
    workflow["2"]["inputs"]["images"] = ["4", 0]
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(png, format="PNG")
    image = {"name": f"{prefix}.png", "image": base64.b64encode(png.getvalue()).decode()}
    job_id = api.post("/run", {"input": {"workflow": workflow, "images": [image]}}).json()["id"]
    saved = lambda: list((comfyui.path / "output").glob(f"{prefix}*"))  # noqa: E731
    uploaded = lambda: list((comfyui.path / "input").glob(f"{prefix}*"))  # noqa: E731
    wait_for(saved, 60, "the job's first output file")  # then 20 s of steps: the prompt runs on
    assert uploaded() and comfyui.get_json("/queue")["queue_running"]
    os.kill(api.runner_pid(), signal.SIGKILL)

    body = api.wait_final(job_id, 30)
    assert body["status"] == "FAILED" and "The job runner process died while this job ran" in body["error"], body
    assert comfy_idle(comfyui)  # interrupted, not left running for its 20 s
    assert saved() == [] and uploaded() == []
    assert "Its ComfyUI prompt was stopped and its files deleted (1 output file(s))." in body["error"], body


def test_a_job_runner_killed_while_its_prompt_is_on_its_way_leaves_no_prompt_running_once_comfyui_queues_it(
    api_factory, comfyui
):
    """issue 20 #17, the race: the runner dies while its POST /prompt is in flight (held by a proxy between
    it and ComfyUI until the API has looked and found nothing), and ComfyUI queues the prompt after that.
    The API keeps watching for it and stops it: it does not run to its end in front of the next job."""
    proxy = HoldingProxy(comfyui.port, b"POST /prompt").start()
    try:
        api = api_factory(COMFY_HOST=proxy.host)
        job_id = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]  # 20 s unless stopped
        proxy.wait_held(timeout=60)
        prompt_id = json.loads(proxy.held_bodies[0])["prompt_id"]
        os.kill(api.runner_pid(), signal.SIGKILL)
        body = api.wait_final(job_id, 30)  # the API looked: ComfyUI had no such prompt yet
        assert body["status"] == "FAILED" and "The job runner process died while this job ran" in body["error"]
        on_its_way = "Its ComfyUI prompt was on its way to ComfyUI (not queued yet): it is removed if ComfyUI queues it"
        assert on_its_way in body["error"], body
        proxy.release()  # now ComfyUI queues it
        wait_for(lambda: proxy.forwarded == 1, 10, "the held POST /prompt to reach ComfyUI")
        queued_late = f"Prompt {prompt_id} of a dead job runner was queued in ComfyUI after all"
        wait_for(lambda: queued_late in api.log(), 15, "the API to find the late prompt")
        wait_for(lambda: comfy_idle(comfyui), 10, "ComfyUI to be idle: the late prompt stopped")
        started = time.monotonic()
        after = api.post("/runsync", {"input": {"workflow": tiny_workflow(0x0D0D0D)}}).json()
        assert after["status"] == "COMPLETED" and time.monotonic() - started < 10  # not behind the late prompt
    finally:
        proxy.stop()
    entry = comfyui.get_json(f"/history/{prompt_id}").get(prompt_id)
    if entry is not None:  # it had started: it was interrupted
        assert "execution_success" not in [m[0] for m in entry["status"]["messages"]]


def test_the_api_killed_by_sigkill_leaves_no_prompt_running_in_comfyui(api, comfyui):
    job_id = api.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]  # 20 s
    api.wait_status(job_id, "IN_PROGRESS")
    wait_for(lambda: comfyui.get_json("/queue")["queue_running"], 30, "ComfyUI to run the prompt")
    runner = api.runner_pid()
    api.stop(signal.SIGKILL)
    wait_for(lambda: comfy_idle(comfyui), 10, "ComfyUI to be idle: the orphaned runner stopped its prompt")
    wait_for(lambda: process_gone(runner), 15, "the runner to exit")
    assert "the API is gone: stopping 1 running job(s)" in api.log()


# --- nothing lost ---------------------------------------------------------------------------------------
def test_sigkill_with_jobs_queued_and_one_running_then_restart_completes_all_and_keeps_results(
    api_factory, comfyui, tmp_path
):
    first = api_factory(log_name="first.log")
    earlier = first.post("/runsync", {"input": {"workflow": tiny_workflow(0x778899)}}).json()
    assert earlier["status"] == "COMPLETED"
    running = first.post("/run", {"input": {"workflow": slow_workflow(40)}}).json()["id"]
    queued = [first.post("/run", {"input": {"workflow": tiny_workflow(0x111111 * i)}}).json()["id"] for i in (1, 2, 3)]
    first.wait_status(running, "IN_PROGRESS")
    first.stop(signal.SIGKILL)

    second = api_factory(log_name="second.log")
    assert "1 job(s) were interrupted by the last stop" in second.log()
    results = {job_id: second.wait_final(job_id) for job_id in [running, *queued]}
    assert {body["status"] for body in results.values()} == {"COMPLETED"}, results
    for i, job_id in zip((1, 2, 3), queued, strict=True):
        assert pixel(results[job_id]["output"]["images"][0]) == tuple([0x11 * i] * 3)
    assert second.status(earlier["id"]) == earlier  # the earlier result, unchanged
    jobs = second.get("/health").json()["jobs"]
    assert (jobs["completed"], jobs["retried"], jobs["inQueue"], jobs["inProgress"]) == (5, 1, 0, 0)


def test_sigterm_stops_promptly_interrupts_the_running_job_and_the_restart_runs_it(api_factory, comfyui):
    first = api_factory(log_name="first.log")
    job_id = first.post("/run", {"input": {"workflow": slow_workflow(400)}}).json()["id"]
    queued = first.post("/run", {"input": {"workflow": tiny_workflow()}}).json()["id"]
    first.wait_status(job_id, "IN_PROGRESS")
    wait_for(lambda: comfyui.get_json("/queue")["queue_running"], 30, "ComfyUI to run the prompt")
    waiter = threading.Thread(target=lambda: first.post("/runsync", {"input": {"workflow": tiny_workflow()}}))
    waiter.start()  # a /runsync waiting does not hold the stop up
    time.sleep(0.3)
    started = time.monotonic()
    assert first.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5, first.log()
    waiter.join(10)
    wait_for(lambda: comfy_idle(comfyui), 10, "ComfyUI to be idle (the prompt interrupted)")
    assert "stopped by the shutdown: it runs again after the restart" in first.log()
    assert stored_status(first, job_id) == "IN_QUEUE"  # put back by the stop itself, not only by the next start

    second = api_factory(log_name="second.log", RUNSYNC_WAIT_S="1")
    second_body = second.status(job_id)
    assert second_body["status"] in ("IN_QUEUE", "IN_PROGRESS")
    second.post(f"/cancel/{job_id}")  # 20 s of sleeping steps: its restart is proven, no need to wait
    assert second.wait_final(queued)["status"] == "COMPLETED"
    assert second.get("/health").json()["jobs"]["retried"] == 1


def test_a_second_api_on_the_same_volume_refuses_to_start(api, tmp_path):
    other = subprocess.run(
        [sys.executable, "-m", "comfy_worker.api", "--port", "0"],
        cwd=ROOT,
        env={**api.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 1
    assert "is in use by another API process" in other.stderr and "one API serves one volume" in other.stderr


# --- bad input never freezes the queue --------------------------------------------------------------------
def test_an_input_that_is_missing_null_or_not_an_object_is_refused_with_400_naming_input(quick_api, tmp_path):
    """issue 20 #1: such a request was answered 200, stored with its input dropped, and broke a queue worker."""
    api = quick_api()
    record = tmp_path / "ran.txt"
    for body, message in (
        ({"input": None}, '"input" must be an object, got null'),
        ({"input": "x"}, '"input" must be an object, got a string'),
        ({"input": [{"workflow": {}}]}, '"input" must be an object, got an array'),
        ({"input": 3}, '"input" must be an object, got a number'),
        ({"webhook": "http://127.0.0.1/x"}, 'has no "input"'),
    ):
        for route in ("/run", "/runsync", "/v2/ep/run"):
            answer = api.post(route, body)
            assert answer.status_code == 400, (route, body, answer.text)
            assert message in answer.json()["error"] and '{"input": {' in answer.json()["error"], answer.text
    assert api.get("/health").json()["jobs"]["inQueue"] == 0  # nothing was stored
    done = api.post("/runsync", {"input": {"record": str(record), "value": 1}}).json()
    assert done["status"] == "COMPLETED" and done["output"] == {"echo": 1}, done
    assert ran(record) == [done["id"]]


def test_a_request_is_encoded_once_for_the_store_and_the_runner(tmp_path, monkeypatch):
    """issue 25 (JSON handled once): the API encodes a job's request once; the store keeps that text and
    the runner gets it as it is (a big input, e.g. an image as base64, is not encoded twice). The job the
    handler gets is the request with its id, ``s3Config`` and ``policy`` included."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(SUPPORT))
    settings = Settings.from_env({"VOLUME_ROOT": str(tmp_path), "MAX_CONCURRENCY": "1"})
    record = tmp_path / "ran.txt"
    blob = "iVBORw0KGgo" * 20000  # 220 KB, like a small image as base64
    encodings: list[int] = []
    real_dumps = json.dumps

    def counting_dumps(obj, *args, **kw):
        text = real_dumps(obj, *args, **kw)
        if blob in text:
            encodings.append(len(text))
        return text

    monkeypatch.setattr(json, "dumps", counting_dumps)

    async def go():
        store = JobStore(tmp_path / "jobs.sqlite3")
        service = JobService(settings, RunnerProcess("recording_handler:handler", 1), store)
        await service.start()
        try:
            job_id = await service.submit(
                {"input": {"record": str(record), "blob": blob, "value": 3}, "policy": {"ttl": 600000}}
            )
            done = await service.wait(job_id, 20)
            assert done["status"] == "COMPLETED" and done["result"] == {"output": {"echo": 3}}, done
        finally:
            await service.stop()

    asyncio.run(asyncio.wait_for(go(), 60))
    assert len(encodings) == 1, encodings


def test_jobs_that_break_a_queue_worker_fail_alone_and_the_next_job_completes(tmp_path, monkeypatch, caplog):
    """issue 20 #1: an exception in the worker loop killed that queue worker silently; two such jobs (one
    per worker at MAX_CONCURRENCY=1) froze the queue for good. Each now fails alone, its error logged."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(SUPPORT))  # the runner's handler: recording_handler
    settings = Settings.from_env({"VOLUME_ROOT": str(tmp_path), "MAX_CONCURRENCY": "1"})
    record = tmp_path / "ran.txt"

    async def go():
        store = JobStore(tmp_path / "jobs.sqlite3")
        service = JobService(settings, RunnerProcess("recording_handler:handler", 1), store)
        real_output_of = service.output_of

        async def output_of(job, not_after, encoded):  # a bug that strikes between the queue and the runner
            if job["input"].get("explode"):
                raise KeyError("a bug in the queue worker")
            return await real_output_of(job, not_after, encoded)

        real_outcome = service.outcome

        def outcome(job_id, output, started, policy):  # one that strikes once the handler ran the job
            if output == {"echo": "explode"}:
                raise ValueError("a bug after the run")
            return real_outcome(job_id, output, started, policy)

        service.output_of, service.outcome = output_of, outcome
        await service.start()
        try:
            broken = [await service.submit({"input": {"explode": True, "record": str(record)}}) for _ in range(2)]
            late = await service.submit({"input": {"record": str(record), "value": "explode"}})
            good = await service.submit({"input": {"record": str(record), "value": 7}})
            done = await service.wait(good, 20)
            assert done["status"] == "COMPLETED" and done["result"] == {"output": {"echo": 7}}, done
            for job_id, kind in ((broken[0], "KeyError"), (broken[1], "KeyError"), (late, "ValueError")):
                failed = service.get(job_id)
                assert failed["status"] == "FAILED", failed
                assert f"The API failed on this job unexpectedly ({kind})" in failed["result"]["error"]
            assert service.get(late)["started"] is not None and ran(record) == [late, good]
            assert not any(task.done() for task in service.tasks)  # every queue worker goes on
            health = await service.health()
            assert health["jobs"]["failed"] == 3 and health["jobs"]["completed"] == 1
            assert health["workers"] == {"idle": 1, "running": 0}
        finally:
            await service.stop()

    with caplog.at_level(logging.ERROR, logger="comfy_worker.api"):
        asyncio.run(asyncio.wait_for(go(), 60))
    logged = [r.exc_info[0] for r in caplog.records if "failed on it" in r.getMessage() and r.exc_info]
    assert logged == [KeyError, KeyError, ValueError]


def test_a_store_with_jobs_without_a_valid_input_from_an_older_version_recovers_on_start(quick_api, tmp_path):
    """issue 20 #1: rows an older version stored with the input dropped (or null, or a string) were first in
    the queue after every restart and froze it; they now end FAILED with a clear error and later jobs run."""
    volume = tmp_path / "volume"
    record = tmp_path / "ran.txt"
    store_path = volume / ".api" / "jobs.sqlite3"
    JobStore(store_path).close()  # today's schema; the rows as the older version wrote them
    rows = [  # it stored {"input": null} with the input dropped: each such row killed a queue worker
        ("old-null-1", {}),
        ("old-null-2", {"policy": {"ttl": 600000}}),
        ("old-string", {"input": "x"}),
        ("old-good", {"input": {"record": str(record), "value": 3}}),
    ]
    with contextlib.closing(sqlite3.connect(store_path)) as db, db:
        for i, (job_id, request) in enumerate(rows):
            db.execute(
                "INSERT INTO jobs (id, status, request, webhook, created) VALUES (?, 'IN_QUEUE', ?, NULL, ?)",
                (job_id, json.dumps(request), time.time() - 10 + i),
            )
    api = quick_api(volume=volume)
    good = api.wait_final("old-good", 30)
    assert good["status"] == "COMPLETED" and good["output"] == {"echo": 3}, good
    for job_id, _ in rows[:3]:
        body = api.wait_final(job_id, 5)
        assert body["status"] == "FAILED", body
        assert 'has no valid "input"' in body["error"] and "send the job again" in body["error"], body
    assert ran(record) == ["old-good"]
    assert api.post("/runsync", {"input": {"value": 4}}).json()["output"] == {"echo": 4}


# --- local mode refuses web pages ---------------------------------------------------------------------
def test_local_mode_refuses_a_foreign_origin_a_body_not_sent_as_json_and_a_foreign_host(quick_api, tmp_path):
    """issue 20 #3: with no token on loopback the API took a cross-origin text/plain POST (no CORS
    preflight) and any Host header (DNS rebinding): any web page could queue jobs."""
    api = quick_api(token=None)
    record = tmp_path / "ran.txt"
    body = json.dumps({"input": {"record": str(record)}})
    own = f"http://127.0.0.1:{api.port}"

    def post(path="/run", data=body, **headers):
        return api.http.post(f"{api.url}{path}", data=data, headers=headers, timeout=30)

    as_text = post(**{"Content-Type": "text/plain;charset=UTF-8"})
    assert as_text.status_code == 415, as_text.text
    assert "Content-Type 'text/plain;charset=UTF-8'" in as_text.json()["error"]
    assert "Content-Type: application/json" in as_text.json()["error"]
    assert post(**{"Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert post().status_code == 415  # no Content-Type at all
    foreign = post(**{"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert foreign.status_code == 403, foreign.text
    error = foreign.json()["error"]
    assert "Origin header 'https://evil.example'" in error and "set API_TOKEN" in error
    assert post(**{"Content-Type": "application/json", "Origin": "null"}).status_code == 403
    for path in ("/purge-queue", "/cancel/x", "/v2/ep/purge-queue"):  # no body: the Origin decides
        assert post(path, data=None, Origin="http://localhost.evil.example").status_code == 403
    rebound = post(**{"Content-Type": "application/json", "Host": f"evil.example:{api.port}"})
    assert rebound.status_code == 403, rebound.text
    error = rebound.json()["error"]
    assert f"Host header 'evil.example:{api.port}'" in error and "http://127.0.0.1:<port>" in error
    get = api.http.get(f"{api.url}/health", headers={"Host": f"rebind.evil.example:{api.port}"}, timeout=30)
    assert get.status_code == 403
    assert api.get("/health").json()["jobs"]["inQueue"] == 0 and ran(record) == []  # nothing got through

    # what a local client sends: JSON, its own Host (127.0.0.1, localhost, [::1]), no Origin or its own
    for headers in (
        {"Content-Type": "application/json"},
        {"Content-Type": "Application/JSON; charset=utf-8", "Host": f"localhost:{api.port}"},
        {"Content-Type": "application/json", "Host": f"[::1]:{api.port}", "Origin": f"http://[::1]:{api.port}"},
        {"Content-Type": "application/json", "Origin": own},
    ):
        answer = post("/runsync", **headers)
        assert answer.status_code == 200 and answer.json()["status"] == "COMPLETED", (headers, answer.text)
    assert post("/purge-queue", data=None).json() == {"removed": 0, "status": "completed"}  # empty body: any type
    assert api.http.get(f"{api.url}/ping", headers={"Host": "evil.example"}, timeout=30).status_code == 200
    assert len(ran(record)) == 4


def test_local_mode_checks_keep_runpods_client_working_and_a_token_or_a_pod_changes_them(
    quick_api, monkeypatch, tmp_path
):
    """issue 20 #3: the RunPod SDK and examples/client.py send JSON with its content type, so they work in
    local mode; with a token the token is the guard (a page cannot send it), and off loopback the Host
    cannot be checked."""
    local = quick_api(token=None)
    monkeypatch.setattr(runpod, "api_key", "")
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{local.url}/v2")
    endpoint = runpod.Endpoint("ep")
    assert endpoint.run_sync({"value": 5}, timeout=30) == {"echo": 5}
    assert endpoint.purge_queue() == {"removed": 0, "status": "completed"}
    request = tmp_path / "job.json"
    request.write_text(json.dumps({"input": {"value": 7}}))
    client = subprocess.run(
        [sys.executable, "examples/client.py", str(request), "--url", local.url, "--poll", "0.1"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "API_TOKEN"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert client.returncode == 0 and ": COMPLETED" in client.stdout, client.stdout + client.stderr
    local.stop()

    with_token = quick_api(log_name="token.log")
    answer = with_token.http.post(
        f"{with_token.url}/runsync",
        data=json.dumps({"input": {"value": 6}}),
        headers={**with_token.headers(...), "Origin": "https://my-dashboard.example", "Host": "pod.example"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["output"] == {"echo": 6}, answer.text
    with_token.stop()

    pod = quick_api(token=None, host="0.0.0.0", API_AUTH="none", log_name="pod.log")
    ok = pod.http.post(
        f"{pod.url}/runsync", json={"input": {"value": 8}}, headers={"Host": f"my-pod.example:{pod.port}"}, timeout=30
    )
    assert ok.status_code == 200 and ok.json()["output"] == {"echo": 8}, ok.text
    foreign = pod.http.post(
        f"{pod.url}/run", json={"input": {}}, headers={"Origin": "https://evil.example"}, timeout=30
    )
    assert foreign.status_code == 403
    as_text = pod.http.post(f"{pod.url}/run", data='{"input": {}}', headers={"Content-Type": "text/plain"}, timeout=30)
    assert as_text.status_code == 415


# --- policy.ttl while a job waits -------------------------------------------------------------------------
def test_a_job_waiting_past_its_ttl_ends_timed_out_on_time_also_the_one_sent_ahead_to_the_runner(quick_api, tmp_path):
    """issue 20 #7: a job past its policy.ttl behind a long job stayed IN_QUEUE until a slot freed."""
    hooks = WebhookReceiver()
    try:
        api = quick_api(WEBHOOK_ALLOW_HOSTS=hooks.host_port)
        record = tmp_path / "ran.txt"
        long = api.post("/run", {"input": {"record": str(record), "sleep": 120}}).json()["id"]
        api.wait_status(long, "IN_PROGRESS")
        ahead, behind = (  # MAX_CONCURRENCY=1: the first is sent ahead to the runner, the second waits here
            api.post(
                "/run", {"input": {"record": str(record)}, "policy": {"ttl": 10000}, "webhook": f"{hooks.url}/{name}"}
            ).json()["id"]
            for name in ("ahead", "behind")
        )
        bodies = {job_id: api.wait_final(job_id, 25) for job_id in (ahead, behind)}
        for body in bodies.values():
            assert body["status"] == "TIMED_OUT" and "policy.ttl (10000 ms) and was not run" in body["error"], body
            assert 10000 <= body["delayTime"] < 12000 and "executionTime" not in body, body
        wait_for(lambda: len(hooks.posts) == 2, 10, f"the two webhooks; {hooks.posts}")
        assert {path: sent["status"] for path, _, sent in hooks.posts} == {
            "/ahead": "TIMED_OUT",
            "/behind": "TIMED_OUT",
        }
        assert api.status(long)["status"] == "IN_PROGRESS" and ran(record) == [long]
        assert api.post(f"/cancel/{long}").json()["status"] == "CANCELLED"
        assert api.post("/runsync", {"input": {"record": str(record), "value": 2}}).json()["output"] == {"echo": 2}
        assert len(ran(record)) == 2
    finally:
        hooks.server.shutdown()


def test_a_job_from_before_a_restart_ends_at_its_ttl_while_another_runs(quick_api, tmp_path):
    """issue 20 #7: the ttl of a job read back from the store after a restart is applied while it waits too."""
    volume = tmp_path / "volume"
    record = tmp_path / "ran.txt"
    store_path = volume / ".api" / "jobs.sqlite3"
    store = JobStore(store_path)
    created = time.time() - 5  # its ttl is over 5 s from now
    store.add("long", json.dumps({"input": {"record": str(record), "sleep": 120}}), None, created - 1)
    store.add("short-lived", json.dumps({"input": {"record": str(record)}, "policy": {"ttl": 10000}}), None, created)
    store.close()
    api = quick_api(volume=volume)
    up_ms = (time.time() - created) * 1000  # a busy machine may start the API after the ttl is over
    body = api.wait_final("short-lived", 15)
    assert body["status"] == "TIMED_OUT" and 10000 <= body["delayTime"] < max(10000, up_ms) + 2000, body
    assert api.status("long")["status"] == "IN_PROGRESS"
    wait_for(lambda: ran(record) == ["long"], 10, "the long job to reach the handler")


# --- every error is JSON ---------------------------------------------------------------------------------
def test_a_deeply_nested_body_is_refused_with_400_json_naming_the_depth_limit(quick_api):
    """issue 20 #12: a deeply nested body gave a plain-text 500 (RecursionError, a traceback in the log)."""
    api = quick_api()
    headers = {**api.headers(...), "Content-Type": "application/json"}
    very_deep = '{"input": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    over_the_limit = {"input": {"x": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}}
    for route in ("/run", "/runsync", "/status/x", "/v2/ep/cancel/x"):
        for data in (very_deep, json.dumps(over_the_limit)):
            answer = api.http.post(f"{api.url}{route}", data=data, headers=headers, timeout=30)
            assert answer.status_code == 400, (route, answer.text[:300])
            assert f"nested deeper than {MAX_JSON_DEPTH} levels" in answer.json()["error"]
    at_the_limit = {"input": {"x": json.loads("[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2))}}
    assert api.post("/runsync", at_the_limit).json()["status"] == "COMPLETED"
    assert "Traceback" not in api.log() and api.get("/health").json()["jobs"]["inQueue"] == 0


@contextlib.contextmanager
def app_in_thread(app):
    """``app`` served by a real uvicorn in a thread, without lifespan (no runner: jobs stay queued); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_unexpected_error_in_a_route_answers_json_500_without_its_message(tmp_path):
    """issue 20 #12: any exception a route did not expect answered a plain-text 500. /status is a hot route
    (HotRoutes), /stream is FastAPI's: both answer it the same way."""
    settings = Settings.from_env({"VOLUME_ROOT": str(tmp_path)})
    store = JobStore(tmp_path / "jobs.sqlite3")
    app = create_app(settings, None, None, store)  # no lifespan: only the routes that need no runner are used

    def broken_get(job_id):
        raise RuntimeError(f"the store broke holding {TOKEN}")

    app.state.service.get = broken_get
    app.state.service.stream = broken_get
    try:
        with app_in_thread(app) as url:
            for route in ("/status/x", "/stream/x"):
                answer = requests.get(f"{url}{route}", timeout=30)
                assert answer.status_code == 500 and answer.headers["content-type"] == "application/json", answer.text
                assert answer.json() == {
                    "error": "The API failed on this request unexpectedly (RuntimeError); its log has the details."
                }
    finally:
        store.close()


def test_the_hot_routes_answer_every_request_as_fastapi_s_own_routes_do(tmp_path):
    """issue 25: /run, /runsync and /status are answered before FastAPI's stack (HotRoutes, for speed). The
    same requests, sent once to them and once to FastAPI's routes (``app.hot`` off), get the same status,
    content type, auth challenge and body (job ids aside): with a token, without one, with bad bodies, a
    malformed ``wait``, unknown jobs and the /v2/<id>/ copies."""
    settings = Settings.from_env({"VOLUME_ROOT": str(tmp_path)})
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = {"input": {"workflow": tiny_workflow()}}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("POST", "/run", auth, json.dumps(job)),
        ("POST", "/v2/ep-1/run", auth, json.dumps(job)),
        ("POST", "/run", {}, json.dumps(job)),
        ("POST", "/run", {"Authorization": "Bearer wrong"}, json.dumps(job)),
        ("POST", "/run", auth, "{not json"),
        ("POST", "/run", auth, json.dumps({"input": 3})),
        ("POST", "/run", auth, json.dumps({"input": {}, "policy": {"ttl": 1}})),
        ("POST", "/run", {**auth, "Idempotency-Key": "bad key"}, json.dumps(job)),
        ("POST", "/runsync?wait=0", auth, json.dumps(job)),
        ("POST", "/v2/ep-1/runsync?wait=0", auth, json.dumps(job)),
        ("POST", "/runsync?wait=soon", auth, json.dumps(job)),
        ("POST", "/runsync?wait=0&x=1", auth, json.dumps(job)),
        ("GET", "/status/no-such-job", auth, None),
        ("POST", "/v2/ep-1/status/no-such-job", auth, None),
        ("GET", "/status/no-such-job", {}, None),
        ("GET", "/status/", auth, None),
        ("PUT", "/run", auth, json.dumps(job)),
    ]

    def answers(url: str) -> list:
        seen = []
        for method, path, headers, data in cases:
            headers = {**headers, "Content-Type": "application/json"} if data is not None else headers
            answer = requests.request(method, f"{url}{path}", headers=headers, data=data, timeout=30)
            body = answer.json()
            if isinstance(body, dict) and "id" in body:
                body["id"] = body["id"].startswith("sync-")  # ids differ; their kind must not
            seen.append(
                (
                    path,
                    answer.status_code,
                    answer.headers.get("content-type"),
                    answer.headers.get("www-authenticate"),
                    body,
                )
            )
        return seen

    try:
        for token in (TOKEN, None):
            app = create_app(settings, None, token, store)
            with app_in_thread(app) as url:
                hot = answers(url)
                queued = store.db.execute("SELECT id FROM jobs WHERE status = 'IN_QUEUE'").fetchone()["id"]
                status_hot = requests.get(f"{url}/status/{queued}", headers=auth, timeout=30)
                app.hot = None  # every request through FastAPI's routes
                assert answers(url) == hot
                status_fastapi = requests.get(f"{url}/status/{queued}", headers=auth, timeout=30)
            assert (status_hot.status_code, status_hot.json()) == (status_fastapi.status_code, status_fastapi.json())
            assert status_hot.json()["status"] == "IN_QUEUE"
            assert [code for _, code, *_ in hot][:3] == ([200, 200, 401] if token else [200, 200, 200])
    finally:
        store.close()


@pytest.mark.parametrize(
    ("method", "path", "query", "hot"),
    [
        ("POST", "/run", b"", "run"),
        ("POST", "/runsync", b"wait=5000", "runsync"),
        ("POST", "/v2/abc/runsync", b"", "runsync"),
        ("GET", "/status/job-1", b"", "status"),
        ("POST", "/v2/abc/status/job-1", b"", "status"),
        ("POST", "/runsync", b"wait=x", None),
        ("POST", "/runsync", b"wait=1&wait=2", None),
        ("POST", "/run/", b"", None),
        ("GET", "/status", b"", None),
        ("GET", "/status/a/b", b"", None),
        ("GET", "/run", b"", None),
        ("POST", "/v2//run", b"", None),
        ("POST", "/v2/abc", b"", None),
        ("GET", "/health", b"", None),
        ("POST", "/cancel/job-1", b"", None),
    ],
)
def test_which_requests_the_hot_routes_take(method, path, query, hot):
    """issue 25: only the routes every job takes, in the forms FastAPI would route them the same way; the
    rest (and a /runsync query that needs FastAPI's validation) goes on to FastAPI."""
    app = create_app(Settings.from_env({}), None, TOKEN, None)
    route = app.hot.match({"type": "http", "method": method, "path": path, "query_string": query, "root_path": ""})
    named = {"run": ("POST", "run"), "runsync": ("POST", "runsync"), "status": (method, "status")}
    assert (route and route[0]) == (app.hot.routes[named[hot]] if hot else None)


# --- /cancel after a restart ------------------------------------------------------------------------------
def test_health_says_when_a_cancelled_jobs_prompt_is_still_finishing(api, comfyui):
    """issue 21 #11: /cancel answers within its cap while ComfyUI may finish the current node of the prompt
    (it stops between nodes or steps); /health says so until ComfyUI is done with it."""
    wf = tiny_workflow(size=16)
    wf["3"] = {"class_type": "WorkerTestSleep", "inputs": {"image": ["1", 0], "seconds": 16.0}}  # never interruptible
    wf["2"]["inputs"]["images"] = ["3", 0]
    job = api.post("/run", {"input": {"workflow": wf}}).json()["id"]
    api.wait_status(job, "IN_PROGRESS")
    wait_for(lambda: comfyui.get_json("/queue")["queue_running"], 30, "ComfyUI to run the prompt")
    assert api.get("/health").json()["comfyui"]["finishing_ended_jobs"] == 0
    started = time.monotonic()
    assert api.post(f"/cancel/{job}").json() == {"id": job, "status": "CANCELLED"}
    assert time.monotonic() - started < 15.5  # the documented cap
    assert not comfy_idle(comfyui)  # ComfyUI is still in the sleeping node
    comfy = api.get("/health").json()["comfyui"]
    assert comfy["queue_running"] == 1 and comfy["finishing_ended_jobs"] == 1, comfy
    wait_for(lambda: comfy_idle(comfyui), 30, "ComfyUI to finish the interrupted prompt")
    assert api.get("/health").json()["comfyui"]["finishing_ended_jobs"] == 0


def test_cancel_of_a_job_recovered_after_a_restart_answers_once_it_is_cancelled(quick_api, tmp_path):
    """issue 20 #16: recovered jobs had no "finished" event: /cancel answered IN_PROGRESS at once."""
    record = tmp_path / "ran.txt"
    first = quick_api(log_name="first.log")
    job_id = first.post("/run", {"input": {"record": str(record), "sleep": 120}}).json()["id"]
    first.wait_status(job_id, "IN_PROGRESS")
    first.stop(signal.SIGKILL)

    second = quick_api(log_name="second.log")
    second.wait_status(job_id, "IN_PROGRESS")
    wait_for(lambda: ran(record) == [job_id, job_id], 10, "the second API to run the job again")
    assert second.post(f"/v2/ep/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert second.status(job_id)["status"] == "CANCELLED"


# --- the suite's gaps ------------------------------------------------------------------------------------
def test_exactly_max_queue_depth_jobs_wait_before_the_first_429(quick_api, tmp_path):
    """issue 20 (gaps): an off-by-one in the queue bound passed every test."""
    api = quick_api(MAX_QUEUE_DEPTH="3")
    record = tmp_path / "ran.txt"
    running = api.post("/run", {"input": {"record": str(record), "sleep": 120}}).json()["id"]
    api.wait_status(running, "IN_PROGRESS")  # running: no longer counted as waiting
    waiting = []
    for _ in range(3):
        answer = api.post("/run", {"input": {"record": str(record)}})
        assert answer.status_code == 200, (len(waiting), answer.text)
        waiting.append(answer.json()["id"])
    full = api.post("/run", {"input": {"record": str(record)}})
    assert full.status_code == 429 and "(3 jobs waiting, MAX_QUEUE_DEPTH=3)" in full.json()["error"], full.text
    assert int(full.headers["Retry-After"]) >= 1
    assert api.post("/runsync", {"input": {}}).status_code == 429
    assert api.post(f"/cancel/{waiting.pop()}").json()["status"] == "CANCELLED"  # one place frees
    assert api.post("/run", {"input": {"record": str(record)}}).status_code == 200
    assert api.post("/run", {"input": {"record": str(record)}}).status_code == 429
    assert api.get("/health").json()["jobs"]["inQueue"] == 3


def authenticated_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the API's own app (as its OpenAPI schema lists them) but /ping."""
    app = create_app(Settings.from_env({}), None, TOKEN, None)
    with warnings.catch_warnings():  # GET and POST of one function share an operation id: harmless here
        warnings.simplefilter("ignore")
        paths = app.openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops if path != "/ping"]


def test_401_on_every_route_and_method_of_the_route_table_but_ping(quick_api):
    """issue 20 (gaps): /cancel, /stream, /purge-queue, POST /status and the /v2/<id>/ copies were never
    checked: moving one off the authenticated router passed the 401 test."""
    routes = authenticated_routes()
    documented = {
        ("POST", "/run"),
        ("POST", "/runsync"),
        ("GET", "/status/{job_id}"),
        ("POST", "/status/{job_id}"),
        ("GET", "/stream/{job_id}"),
        ("POST", "/stream/{job_id}"),
        ("POST", "/cancel/{job_id}"),
        ("POST", "/purge-queue"),
        ("GET", "/health"),
    }
    assert set(routes) == documented | {(m, f"/v2/{{endpoint_id}}{path}") for m, path in documented}
    api = quick_api()
    body = {"input": {"value": 1}}
    open_routes = []
    for method, path in routes:
        url = path.replace("{endpoint_id}", "ep").replace("{job_id}", "no-such-job")
        for token in (None, "wrong-token"):
            answer = api.http.request(method, f"{api.url}{url}", json=body, headers=api.headers(token), timeout=30)
            if answer.status_code != 401 or answer.headers.get("WWW-Authenticate") != "Bearer":
                open_routes.append((method, path, token, answer.status_code))
    assert open_routes == []
    assert api.get("/ping", token=None).status_code == 200
    assert api.get("/health").json()["jobs"]["inQueue"] == 0  # no request got a job in


def test_a_cancelled_queued_job_is_never_handed_to_the_handler_and_its_webhook_is_sent(quick_api, tmp_path):
    """issue 20 (gaps): whether a job cancelled while it waited (sent ahead to the runner, or still in the
    API's queue) never reached the handler was not checked on the handler's side."""
    hooks = WebhookReceiver()
    try:
        api = quick_api(WEBHOOK_ALLOW_HOSTS=hooks.host_port)
        record = tmp_path / "ran.txt"
        running = api.post("/run", {"input": {"record": str(record), "sleep": 120}}).json()["id"]
        api.wait_status(running, "IN_PROGRESS")
        ahead, behind = (  # MAX_CONCURRENCY=1: the first is sent ahead to the runner, the second waits here
            api.post("/run", {"input": {"record": str(record)}, "webhook": f"{hooks.url}/{name}"}).json()["id"]
            for name in ("ahead", "behind")
        )
        assert api.post(f"/cancel/{ahead}").json()["status"] == "CANCELLED"
        assert api.post(f"/v2/ep/cancel/{behind}").json()["status"] == "CANCELLED"
        assert api.post(f"/cancel/{running}").json()["status"] == "CANCELLED"  # the slot frees
        after = api.post("/runsync", {"input": {"record": str(record), "value": 9}}).json()
        assert after["status"] == "COMPLETED", after
        assert ran(record) == [running, after["id"]]
        wait_for(lambda: len(hooks.posts) == 2, 10, f"the two webhooks; {hooks.posts}")
        assert {path: sent["status"] for path, _, sent in hooks.posts} == {
            "/ahead": "CANCELLED",
            "/behind": "CANCELLED",
        }
    finally:
        hooks.server.shutdown()


def test_finished_jobs_without_a_webhook_wake_no_webhook_work_and_their_waiters_read_nothing_back(
    tmp_path, monkeypatch
):
    """issue 25: every finished job woke the webhook loop (two queries, one of them over the whole table) even
    without a webhook, and each /runsync read its job back from the store and decoded the result that had just
    been written. Now a job without a webhook wakes nothing more, and its waiter gets the job as written, its
    answer splicing in the result's stored text. The job runner runs on uvloop, as uvicorn does."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(SUPPORT))  # the runner's handler: recording_handler
    settings = Settings.from_env({"VOLUME_ROOT": str(tmp_path), "MAX_CONCURRENCY": "1"})

    async def go():
        store = JobStore(tmp_path / "jobs.sqlite3")
        calls = {"due_webhooks": 0, "get": 0}
        for name in calls:
            real = getattr(store, name)

            def counted(*args, _real=real, _name=name):
                calls[_name] += 1
                return _real(*args)

            setattr(store, name, counted)
        service = JobService(settings, RunnerProcess("recording_handler:handler", 1), store)
        await service.start()
        try:
            with open(f"/proc/{service.runner.proc.pid}/maps") as maps:
                assert "/uvloop/" in maps.read()
            job_ids = [await service.submit({"input": {"value": ["é", i]}}) for i in range(20)]
            finals = await asyncio.gather(*(service.wait(job_id, 20) for job_id in job_ids))  # /runsync's waits
            assert calls == {"due_webhooks": 1, "get": 0}  # the webhook loop's first pass at the start only
            for job_id, final in zip(job_ids, finals, strict=True):
                stored = service.get(job_id)
                assert stored["status"] == "COMPLETED" and {k: final[k] for k in stored} == stored
                assert json.loads(status_response(final).body) == status_body(stored)
        finally:
            await service.stop()

    asyncio.run(asyncio.wait_for(go(), 60))
