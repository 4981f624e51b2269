"""comfy_worker.api: the worker's own HTTP API, a real uvicorn process on a free port running handler.py
against the real ComfyUI (docs/api.md, "The worker's HTTP API")."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
import runpod
from PIL import Image
from support.api_server import ApiServer, slow_workflow, tiny_workflow
from support.comfy_process import ROOT
from support.local_http import QuietHandler, serve_in_thread
from support.moto_s3 import moto_s3

from comfy_worker.api import ApiError, JobService
from comfy_worker.job_store import JobStore
from comfy_worker.settings import Settings

TOKEN = "api-test-token-7f3a9c"
UI_FORMAT = "The workflow is in ComfyUI's UI format"


@pytest.fixture
def api_factory(comfyui, tmp_path):
    """Start API processes on ``tmp_path/volume`` (each its own free port); all stopped at the end."""
    started: list[ApiServer] = []

    def make(token: str | None = TOKEN, volume=None, log_name=None, **env) -> ApiServer:
        log = tmp_path / (log_name or f"api-{len(started)}.log")
        server = ApiServer(comfyui, volume or tmp_path / "volume", log, token=token, **env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


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
        api = api_factory(WEBHOOK_RETRIES="0")
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
)
def test_a_custom_handlers_error_quoting_secrets_is_redacted_in_answers_store_and_log(
    api_factory, tmp_path, handler, error
):
    """issue 21 (the API redacts whatever handler it runs): a ``--handler`` that returns or raises an error
    quoting API_TOKEN, the job's s3Config keys and Comfy.org key and a signed URL: none of them in /runsync,
    /run + /status, the store file or the log."""
    s3 = {"accessId": "AKIALEAKYTEST0001", "accessSecret": "leaky-s3-secret-Q9x7Lm2P", "bucketName": "b"}
    s3["endpointUrl"] = "https://s3.example"
    comfy_key = "leaky-comfy-key-8d2f"
    secrets = [TOKEN, s3["accessId"], s3["accessSecret"], comfy_key, "sig123"]
    body = {"input": {"workflow": tiny_workflow(), "comfy_org_api_key": comfy_key}, "s3Config": s3}
    api = api_factory(handler=f"leaky_handlers:{handler}", volume=tmp_path / handler, log_name=f"{handler}.log")
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


class WebhookReceiver:
    """A loopback webhook receiver that answers 500 to the first ``fail_first`` POSTs of each path."""

    def __init__(self, fail_first: int = 0):
        self.posts: list[tuple[str, int, dict]] = []  # (path, status answered, body)
        self.lock = threading.Lock()
        receiver = self

        class Receive(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    seen = sum(1 for p, _, _ in receiver.posts if p == self.path)
                    status = 500 if seen < fail_first else 200
                    receiver.posts.append((self.path, status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = serve_in_thread(Receive)
        self.url = f"http://127.0.0.1:{self.server.server_port}"


def test_a_webhook_gets_the_result_also_after_failing_once(api_factory):
    receiver = WebhookReceiver(fail_first=1)
    try:
        api = api_factory(WEBHOOK_RETRY_BACKOFF="0.2")
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
            store.add(job_id, {"input": {}}, None, finished - 1)
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
def test_policy_execution_timeout_stops_a_job_and_ttl_ends_one_still_queued_both_timed_out(api, comfyui):
    hooks = WebhookReceiver()
    try:
        slow = {"workflow": slow_workflow(400)}  # 20 s without a limit
        timed = api.post("/run", {"input": slow, "policy": {"executionTimeout": 11000, "lowPriority": True}}).json()
        waiting = {"input": {"workflow": tiny_workflow()}, "policy": {"ttl": 10000}, "webhook": f"{hooks.url}/ttl"}
        expired = api.post("/run", waiting).json()
        kept = api.post("/run", {"input": {"workflow": tiny_workflow()}, "policy": {"ttl": 60000}}).json()

        body = api.wait_final(timed["id"], 30)
        assert body["status"] == "TIMED_OUT", body
        assert "policy.executionTimeout (11000 ms)" in body["error"] and 11000 <= body["executionTime"] < 16000
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
