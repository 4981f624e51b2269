"""handler.py against the real ComfyUI (CPU): outputs, inputs, overrides, errors, timeouts, crashes,
a dropped websocket, concurrency, and the RunPod SDK's local API (docs/api.md)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import wave
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from support.aio import arun, gather_jobs
from support.comfy_process import free_port
from support.dropping_proxy import DroppingProxy, cut_once_running
from support.image_host import ImageHost
from support.moto_s3 import moto_s3 as moto_s3_server
from support.processes import stop_process
from support.runpod_fakes import FakeRunPodQueue, ProgressSink

import handler
from comfy_worker import comfy_client
from comfy_worker.job_errors import JobError
from comfy_worker.job_input import ImageInput
from comfy_worker.log_setup import setup_logging

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = Path(__file__).resolve().parent / "data"  # real request bodies

UI_FORMAT_ERROR = (
    "The workflow is in ComfyUI's UI format; export it in API format with Workflow > Export (API) "
    "and send that JSON as input.workflow."
)
CLEAN_ENV = ("BUCKET_ENDPOINT_URL", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID", "REFRESH_WORKER", "MAX_RESPONSE_MB")


# --- helpers ---------------------------------------------------------------------------------------
def run(job: dict) -> dict:
    """Run the async handler in a fresh event loop (as one RunPod job)."""
    return arun(lambda: handler.handler(job))


def run_many(jobs: list[dict]) -> list[dict]:
    return gather_jobs(handler.handler, jobs)


def png_b64(size=(8, 8), color=(255, 0, 0), prefix=True) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{data}" if prefix else data


def decode_image(entry: dict) -> Image.Image:
    assert entry["type"] == "base64"
    img = Image.open(io.BytesIO(base64.b64decode(entry["data"])))
    img.load()
    return img.convert("RGB")


def empty_to_save(width=64, height=48, color=0x336699, batch=1, prefix="worker_test") -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
            "_meta": {"title": "Canvas"},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def slow_workflow(steps: int, seconds_per_step: float, color: int | None = None) -> dict:
    """EmptyImage -> WorkerTestSteps -> SaveImage; a fresh color by default so ComfyUI's cache never skips it."""
    wf = empty_to_save(32, 32, color if color is not None else random.randrange(0x1000000))
    wf["3"] = {
        "class_type": "WorkerTestSteps",
        "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": seconds_per_step},
    }
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf


def job(workflow: dict, job_id: str = "test-job", **extra) -> dict:
    return {"id": job_id, "input": {"workflow": workflow, **extra}}


def output_files(comfyui) -> set[str]:
    out = comfyui.path / "output"
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("_")}


def input_files(comfyui) -> set[str]:
    return {p.name for p in (comfyui.path / "input").iterdir() if p.is_file()}


@pytest.fixture
def worker_env(comfyui, monkeypatch):
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in comfyui.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMFY_LOG_FILE", str(comfyui.log_path))
    return comfyui


@pytest.fixture
def worker_log():
    """The worker's log as the real logging setup writes it (job prefix, secrets and URL queries redacted)."""
    import logging

    from comfy_worker.log_setup import setup_logging

    stream = io.StringIO()
    setup_logging(stream=stream)
    yield stream
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_comfy_worker", False)]:
        root.removeHandler(h)


# --- outputs ---------------------------------------------------------------------------------------
def test_empty_image_returns_golden_base64_png_and_removes_the_file(worker_env):
    before = output_files(worker_env)
    result = run(job(empty_to_save(64, 48, 0x336699)))
    assert "error" not in result, result
    assert len(result["images"]) == 1
    entry = result["images"][0]
    assert entry["filename"].startswith("worker_test_") and entry["filename"].endswith(".png")
    assert entry["node_id"] == "2" and entry["content_type"] == "image/png"
    img = decode_image(entry)
    assert img.size == (64, 48)
    assert img.getcolors() == [(64 * 48, (0x33, 0x66, 0x99))]
    assert result["files"] == [] and result["text"] == [] and result["errors"] == []
    assert set(result["timings"]) >= {"queue_ms", "execution_ms", "delivery_ms"}
    assert result["prompt_id"]
    assert output_files(worker_env) == before  # delivered, then removed


def test_identical_job_twice_delivers_fresh_files_both_times(worker_env):
    first = run(job(empty_to_save(16, 16, 0x00FF00)))
    second = run(job(empty_to_save(16, 16, 0x00FF00)))
    for result in (first, second):
        assert "error" not in result, result
        assert decode_image(result["images"][0]).getpixel((0, 0)) == (0, 255, 0)


def test_uploaded_image_is_inverted_and_input_removed(worker_env):
    before = input_files(worker_env)
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    }
    result = run(job(wf, images=[{"name": "photo.png", "image": png_b64((8, 8), (255, 0, 0))}]))
    assert "error" not in result, result
    img = decode_image(result["images"][0])
    assert img.size == (8, 8) and img.getpixel((3, 3)) == (0, 255, 255)
    assert input_files(worker_env) == before


def test_image_from_url(worker_env):
    png = base64.b64decode(png_b64((4, 4), (0, 0, 255), prefix=False))
    with ImageHost(png) as host:
        wf = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "remote.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "url"}},
        }
        result = run(job(wf, images=[{"name": "remote.png", "url": host.url("/ok.png")}]))
        assert "error" not in result, result
        assert decode_image(result["images"][0]).getpixel((0, 0)) == (0, 0, 255)
        bad_url = f"http://127.0.0.1:{free_port()}/x.png?X-Amz-Signature=sig123"
        before = input_files(worker_env)
        good = {"name": "also.png", "image": png_b64()}
        bad = run(job(wf, images=[good, {"name": "remote.png", "url": bad_url}]))
        assert input_files(worker_env) == before  # the upload that succeeded was removed too
        assert "remote.png" in bad["error"] and "download" in bad["error"]
        assert "sig123" not in json.dumps(bad)  # a signed URL's query is never echoed


def test_upscale_model_gives_64x64(worker_env):
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_compact_x2.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "upscaled"}},
    }
    result = run(job(wf, images=[{"name": "small.png", "image": png_b64((32, 32), (10, 200, 30))}]))
    assert "error" not in result, result
    assert decode_image(result["images"][0]).size == (64, 64)


def test_video_text_and_temp_outputs_are_classified(worker_env):
    before = output_files(worker_env)
    wf = empty_to_save(32, 32, 0x808080, batch=4)
    wf["2"] = {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8}}
    wf["3"] = {
        "class_type": "SaveVideo",
        "inputs": {"video": ["2", 0], "filename_prefix": "video/clip", "format": "auto", "codec": "auto"},
    }
    wf["4"] = {"class_type": "PreviewAny", "inputs": {"source": "hello from ComfyUI"}}
    wf["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    result = run(job(wf))
    assert "error" not in result, result
    assert result["images"] == []  # the PreviewImage temp files are not delivered
    (video,) = result["files"]
    assert video["content_type"] == "video/mp4" and video["node_id"] == "3"
    assert base64.b64decode(video["data"])[4:8] == b"ftyp"
    assert result["text"] == [{"node_id": "4", "text": "hello from ComfyUI"}]
    assert output_files(worker_env) == before


def test_audio_upload_and_flac_output(worker_env):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x10" * 800)
    wf = {
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/tone"}},
    }
    result = run(job(wf, images=[{"name": "tone.wav", "image": base64.b64encode(buf.getvalue()).decode()}]))
    assert "error" not in result, result
    (audio,) = result["files"]
    assert audio["content_type"] == "audio/flac"
    assert base64.b64decode(audio["data"])[:4] == b"fLaC"


def test_max_response_mb_guard_advises_s3(worker_env, monkeypatch):
    monkeypatch.setenv("MAX_RESPONSE_MB", "0.0001")
    before = output_files(worker_env)
    result = run(job(empty_to_save(256, 256, 0x123456)))
    assert "MAX_RESPONSE_MB" in result["error"] and "S3" in result["error"]
    assert result["details"]["max_response_mb"] == 0.0001
    assert output_files(worker_env) == before


def test_outputs_go_to_s3_with_content_type_and_presigned_url(worker_env, monkeypatch, worker_log):
    with moto_s3_server("worker-out") as store:
        for name, value in store.env("worker-out", BUCKET_PREFIX="runs/", S3_URL_EXPIRES="300").items():
            monkeypatch.setenv(name, value)
        s3 = store.client
        before = output_files(worker_env)
        wf = empty_to_save(24, 24, 0x00AA00, batch=2)
        wf["3"] = {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 4}}
        wf["4"] = {
            "class_type": "SaveVideo",
            "inputs": {"video": ["3", 0], "filename_prefix": "s3clip", "format": "auto", "codec": "auto"},
        }
        result = run(job(wf, job_id="s3-job"))
        assert "error" not in result, result
        assert len(result["images"]) == 2 and len(result["files"]) == 1
        for entry in result["images"]:
            assert entry["type"] == "s3_url" and entry["content_type"] == "image/png"
            head = s3.head_object(Bucket="worker-out", Key=f"runs/s3-job/{entry['filename']}")
            assert head["ContentType"] == "image/png"
            with urllib.request.urlopen(entry["data"], timeout=10) as r:  # presigned: plain HTTP works
                img = Image.open(io.BytesIO(r.read())).convert("RGB")
            assert img.getpixel((1, 1)) == (0, 0xAA, 0)
        video = result["files"][0]
        assert video["type"] == "s3_url" and video["content_type"] == "video/mp4"
        assert s3.head_object(Bucket="worker-out", Key=f"runs/s3-job/{video['filename']}")["ContentType"] == "video/mp4"
        assert output_files(worker_env) == before
        # a path that does log the secret: a node's error quotes it
        failed = run(job({"1": {"class_type": "WorkerTestFail", "inputs": {"message": f"denied for {store.secret}"}}}))
        assert failed["error"].endswith("RuntimeError: denied for ***")
        assert "denied for ***" in worker_log.getvalue() and store.secret not in worker_log.getvalue()


# --- a job's own bucket: RunPod's per-request s3Config ---------------------------------------------------
@pytest.fixture
def moto_s3():
    """moto's S3 server (reset) with buckets ``job-out`` and ``env-out`` and one IAM key allowed to use S3;
    from the first request of the test on, moto checks every key and signature as a real store does."""
    with moto_s3_server("job-out", "env-out", enforce_auth=True) as store:
        yield store


def s3_job(workflow: dict, store, job_id: str = "s3config-job", **s3_config) -> dict:
    """A job whose top-level s3Config names the ``job-out`` bucket of ``store`` with its IAM key."""
    config = {"accessId": store.key_id, "accessSecret": store.secret, "bucketName": "job-out"}
    config |= {"endpointUrl": store.endpoint, **s3_config}
    return {**job(workflow, job_id=job_id), "s3Config": config}


def without_bucket_env(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith(("BUCKET_", "S3_URL_EXPIRES"))]:
        monkeypatch.delenv(name)


def test_a_jobs_s3config_receives_its_outputs_without_any_bucket_env(worker_env, monkeypatch, moto_s3):
    without_bucket_env(monkeypatch)
    before = output_files(worker_env)
    result = run(s3_job(empty_to_save(16, 16, 0x0000FF), moto_s3))
    assert "error" not in result and result["errors"] == [], result
    [entry] = result["images"]
    assert entry["type"] == "s3_url" and entry["content_type"] == "image/png"
    key = f"s3config-job/{entry['filename']}"
    assert moto_s3.keys("job-out") == [key]
    assert entry["data"].startswith(f"{moto_s3.endpoint}/job-out/{key}?") and "X-Amz-Expires=3600" in entry["data"]
    body = moto_s3.client.get_object(Bucket="job-out", Key=key)["Body"].read()
    assert Image.open(io.BytesIO(body)).convert("RGB").getpixel((1, 1)) == (0, 0, 255)
    assert output_files(worker_env) == before


def test_a_jobs_s3config_overrides_the_bucket_env_for_that_job_only(worker_env, monkeypatch, moto_s3):
    env = {
        "BUCKET_ENDPOINT_URL": moto_s3.endpoint,
        "BUCKET_NAME": "env-out",
        "BUCKET_ACCESS_KEY_ID": "AKIAENVNOTKNOWN",  # moto refuses it: only the job's own key can upload
        "BUCKET_SECRET_ACCESS_KEY": "env-secret-not-known",
        "BUCKET_PREFIX": "runs/",
        "BUCKET_REGION": "eu-west-3",
        "S3_URL_EXPIRES": "120",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run(s3_job(empty_to_save(16, 16, 0x00FF00), moto_s3, job_id="own-bucket"))
    assert "error" not in result and result["errors"] == [], result
    [entry] = result["images"]
    key = f"runs/own-bucket/{entry['filename']}"  # BUCKET_PREFIX still applies
    assert moto_s3.keys("job-out") == [key] and moto_s3.keys("env-out") == []
    url = entry["data"]
    assert url.startswith(f"{moto_s3.endpoint}/job-out/{key}?") and "X-Amz-Expires=120" in url  # S3_URL_EXPIRES
    assert "%2Feu-west-3%2Fs3%2Faws4_request" in url  # BUCKET_REGION
    # the next job, without s3Config, goes to the env's bucket with the env's keys again
    plain = run(job(empty_to_save(16, 16, 0x00FF01), job_id="env-bucket"))
    assert plain["error"].startswith("None of the 1 output file(s) could be delivered: "), plain
    assert "InvalidAccessKeyId" in plain["error"] and moto_s3.keys("job-out") == [key]


@pytest.mark.parametrize(
    ("s3_config", "error", "details"),
    [
        (
            ["https://s3.example", "bucket"],
            "'s3Config' must be a JSON object with accessId, accessSecret, bucketName, endpointUrl, got list.",
            {"key": "s3Config", "allowed_keys": ["accessId", "accessSecret", "bucketName", "endpointUrl"]},
        ),
        (
            {"accessId": "AKIA-typo-7", "secretAccessKey": "typo-secret-7", "bucketName": "b", "endpointUrl": "x"},
            "Unknown s3Config key(s) 'secretAccessKey'; allowed keys are accessId, accessSecret, bucketName, "
            "endpointUrl.",
            {
                "unknown_keys": ["secretAccessKey"],
                "allowed_keys": ["accessId", "accessSecret", "bucketName", "endpointUrl"],
            },
        ),
        (
            {
                "accessId": "AKIA-query-7",
                "accessSecret": "query-secret-7",
                "bucketName": "job-out",
                "endpointUrl": "https://s3.example/?X-Amz-Credential=AKIA-query-7",
            },
            "s3Config.endpointUrl is not a usable S3 endpoint: it has a query string or fragment; send the endpoint "
            "alone, such as https://s3.eu-west-1.amazonaws.com or https://<account id>.r2.cloudflarestorage.com.",
            {"key": "s3Config.endpointUrl"},
        ),
    ],
    ids=["not-an-object", "unknown-key", "endpoint-with-query"],
)
def test_a_malformed_s3config_is_an_input_error_before_anything_runs(worker_env, worker_log, s3_config, error, details):
    before = output_files(worker_env), input_files(worker_env)
    result = run({**job(empty_to_save(8, 8, 0x010203)), "s3Config": s3_config})
    assert result == {"error": error, "details": details}
    assert (output_files(worker_env), input_files(worker_env)) == before
    assert f"Job failed: {error}" in worker_log.getvalue()


def test_the_s3config_keys_never_reach_the_result_or_the_log(worker_env, monkeypatch, moto_s3, worker_log):
    without_bucket_env(monkeypatch)
    wf = empty_to_save(8, 8, 0x0A0B0C)
    wrong_secret = run(s3_job(wf, moto_s3, accessSecret="wrong-secret-0451"))
    unknown_id = run(s3_job(wf, moto_s3, accessId="AKIAUNKNOWN0451", accessSecret="unknown-secret-0451"))
    for result, code in ((wrong_secret, "SignatureDoesNotMatch"), (unknown_id, "InvalidAccessKeyId")):
        assert result["error"].startswith("None of the 1 output file(s) could be delivered: Output "), result
        assert code in result["error"], result
    # a path that does quote them: a node's error (as a library quoting its arguments would)
    quoting = {
        "1": {"class_type": "WorkerTestFail", "inputs": {"message": "denied: AKIA-quoted-42 / quoted-secret-42"}}
    }
    quoted = run(s3_job(quoting, moto_s3, accessId="AKIA-quoted-42", accessSecret="quoted-secret-42"))
    assert quoted["error"] == "ComfyUI failed in node 1 (WorkerTestFail): RuntimeError: denied: *** / ***", quoted
    log_text = worker_log.getvalue()
    assert "denied: *** / ***" in log_text and "could not be delivered" in log_text
    secrets = ["wrong-secret-0451", "AKIAUNKNOWN0451", "unknown-secret-0451", "AKIA-quoted-42", "quoted-secret-42"]
    for text in (json.dumps([wrong_secret, unknown_id, quoted]), log_text):
        assert [s for s in [*secrets, moto_s3.key_id, moto_s3.secret] if s in text] == [], text


def test_a_bug_quoting_the_s3config_keys_answers_without_them(worker_env, monkeypatch, worker_log):
    # the last resort of handler() redacts the job's s3Config keys too, read from the raw job
    async def broken(job, job_id):
        raise RuntimeError(f"boom near {job['s3Config']['accessId']} and {job['s3Config']['accessSecret']}")

    monkeypatch.setattr(handler, "_handle", broken)
    store = SimpleNamespace(endpoint="https://s3.example", key_id="AKIA-bug-1234", secret="bug-secret-1234")
    result = run(s3_job(empty_to_save(8, 8), store))
    assert result == {
        "error": "The handler failed unexpectedly: RuntimeError: boom near *** and ***",
        "details": {"exception_type": "RuntimeError"},
    }
    assert "boom near *** and ***" in worker_log.getvalue()
    assert "AKIA-bug-1234" not in worker_log.getvalue() and "bug-secret-1234" not in worker_log.getvalue()


def test_malformed_env_var_is_named(worker_env, monkeypatch):
    monkeypatch.setenv("MAX_RESPONSE_MB", "lots")
    result = run(job(empty_to_save(8, 8)))
    assert "misconfigured" in result["error"] and "MAX_RESPONSE_MB" in result["error"]


def test_refresh_worker_env_flag(worker_env, monkeypatch):
    monkeypatch.setenv("REFRESH_WORKER", "1")
    result = run(job(empty_to_save(8, 8)))
    assert result["refresh_worker"] is True and len(result["images"]) == 1


# --- overrides ---------------------------------------------------------------------------------------
def test_overrides_by_id_by_title_and_into_a_list(worker_env):
    wf = empty_to_save(64, 64, 0xFFFFFF)
    wf["5"] = {"class_type": "EmptyImage", "inputs": {"width": 20, "height": 10, "batch_size": 1, "color": 0}}
    overrides = [
        {"title": "Canvas", "field": "inputs.width", "value": 24},  # by title
        {"node_id": "2", "field": "inputs.filename_prefix", "value": "overridden"},  # by id
        {"node_id": 2, "field": "inputs.images.0", "value": "5"},  # list index: re-link to node 5
    ]
    result = run(job(wf, overrides=overrides))
    assert "error" not in result, result
    entry = result["images"][0]
    assert entry["filename"].startswith("overridden_")
    img = decode_image(entry)
    assert img.size == (20, 10) and img.getpixel((0, 0)) == (0, 0, 0)


def test_title_override_on_real_workflow_sets_the_value(worker_env):
    body = json.loads((WORKFLOWS / "workflow_sdxl_turbo.json").read_text())
    body["input"]["overrides"] = [{"title": "Load Checkpoint", "field": "inputs.ckpt_name", "value": "other.ckpt"}]
    result = run({"id": "sdxl", **body})
    problem = result["details"]["problems"][0]
    assert problem["received_value"] == "other.ckpt"


def test_unknown_override_targets_list_what_exists(worker_env):
    wf = empty_to_save()
    result = run(job(wf, overrides=[{"node_id": "99", "field": "inputs.width", "value": 1}]))
    assert "'99'" in result["error"] and "1 (EmptyImage" in result["error"] and "2 (SaveImage" in result["error"]
    result = run(job(wf, overrides=[{"title": "Nope", "field": "inputs.width", "value": 1}]))
    assert "'Nope'" in result["error"] and "'Canvas'" in result["error"]
    result = run(job(wf, overrides=[{"node_id": "1", "field": "inputs.size.w", "value": 1}]))
    assert "'size'" in result["error"] and "'width'" in result["error"] and "'height'" in result["error"]
    result = run(job(wf, overrides=[{"node_id": "1", "field": "width", "value": 1}]))
    assert "did you mean inputs.width" in result["error"]


# --- input errors ----------------------------------------------------------------------------------
def test_ui_format_workflow_is_rejected_with_export_instructions(worker_env):
    ui = {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}
    result = run(job(ui))
    assert result["error"] == UI_FORMAT_ERROR


def test_bad_base64_names_the_image(worker_env):
    result = run(job(empty_to_save(), images=[{"name": "broken.png", "image": "not base64 at all!!"}]))
    assert "'broken.png'" in result["error"] and "base64" in result["error"]


@pytest.mark.parametrize("name", ["../evil.png", "sub/evil.png", "..", "a\\b.png"])
def test_path_traversal_image_name_is_rejected(worker_env, name):
    before = input_files(worker_env)
    result = run(job(empty_to_save(), images=[{"name": name, "image": png_b64()}]))
    assert "plain file name" in result["error"]
    assert input_files(worker_env) == before
    assert not (worker_env.path / "evil.png").exists()


def test_missing_checkpoint_lists_the_available_values(worker_env):
    body = json.loads((WORKFLOWS / "workflow_sdxl_turbo.json").read_text())
    dummy = worker_env.path / "models" / "checkpoints" / "worker_test_available.safetensors"
    dummy.write_bytes(b"0")
    try:
        result = run({"id": "missing-model", **body})
    finally:
        dummy.unlink()
    assert "sd_xl_turbo_1.0_fp16.safetensors" in result["error"]
    assert "CheckpointLoaderSimple" in result["error"] and "worker_test_available.safetensors" in result["error"]
    problem = result["details"]["problems"][0]
    assert problem["node_id"] == "4" and problem["input"] == "ckpt_name"
    assert problem["available_values"] == ["worker_test_available.safetensors"]
    assert "4" in result["details"]["node_errors"]


def test_a_model_in_another_folder_is_named_in_the_rejection(worker_env):
    body = json.loads((WORKFLOWS / "workflow_sdxl_turbo.json").read_text())
    stray = worker_env.path / "models" / "diffusion_models" / "sd_xl_turbo_1.0_fp16.safetensors"
    stray.write_bytes(b"0")
    try:
        result = run({"id": "misplaced-model", **body})
    finally:
        stray.unlink()
    folder = result["details"]["problems"][0]["model_folder"]
    assert folder.startswith("CheckpointLoaderSimple reads models/checkpoints")
    assert "models/diffusion_models/sd_xl_turbo_1.0_fp16.safetensors" in folder
    assert folder in result["error"]


def test_a_windows_style_model_path_rejected_by_comfyui_names_the_slash_form(worker_env):
    """issue 20 #10: ComfyUI refuses 'worker_test_sub\\m.safetensors' (it offers 'worker_test_sub/m.safetensors');
    the job's error says to write the '/' form, not that the file is missing or unlisted."""
    sub = worker_env.path / "models" / "checkpoints" / "worker_test_sub"
    sub.mkdir()
    (sub / "m.safetensors").write_bytes(b"0")  # never loaded: ComfyUI rejects the value before
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "worker_test_sub\\m.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "worker_test"}},
    }
    try:
        result = run(job(wf))
    finally:
        shutil.rmtree(sub)
    problem = result["details"]["problems"][0]
    assert problem["node_id"] == "1" and "worker_test_sub/m.safetensors" in problem["available_values"]
    assert problem["model_folder"] == (
        "model paths use '/', not '\\' (a workflow saved on Windows): write 'worker_test_sub/m.safetensors' "
        "instead of 'worker_test_sub\\\\m.safetensors'; ComfyUI offers 'worker_test_sub/m.safetensors'"
    )
    assert problem["model_folder"] in result["error"]


def test_execution_error_names_node_class_and_message(worker_env):
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "corrupt.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    garbage = base64.b64encode(b"this is not a png").decode()
    result = run(job(wf, images=[{"name": "corrupt.png", "image": garbage}]))
    assert result["error"].startswith("ComfyUI failed in node 1 (LoadImage)")
    assert result["details"]["node_id"] == "1" and result["details"]["class_type"] == "LoadImage"
    assert result["details"]["exception_message"]


def test_comfy_org_api_key_from_input_then_env_never_logged(worker_env, monkeypatch, worker_log):
    wf = {"1": {"class_type": "WorkerTestApiKey", "inputs": {}}}
    key = "sk-test-0123456789abcdef"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    assert run(job(wf, comfy_org_api_key=key))["text"] == [{"node_id": "1", "text": digest}]
    assert run(job(wf))["text"] == [{"node_id": "1", "text": "none"}]
    monkeypatch.setenv("COMFY_ORG_API_KEY", key)
    assert run(job(wf))["text"] == [{"node_id": "1", "text": digest}]
    # a path that does log the key: the node's error quotes it, the handler logs and returns that error
    failed = run(job({"1": {"class_type": "WorkerTestApiKey", "inputs": {"fail": True}}}))
    assert (
        failed["error"]
        == "ComfyUI failed in node 1 (WorkerTestApiKey): RuntimeError: the service rejected the API key ***"
    )
    assert "rejected the API key ***" in worker_log.getvalue()
    assert key not in worker_log.getvalue() and key not in json.dumps(failed)


# --- time limits, crashes, dropped sockets -----------------------------------------------------------
def test_timeout_interrupts_the_prompt_and_the_next_job_runs(worker_env):
    started = time.monotonic()
    result = run(job(slow_workflow(200, 0.05), timeout=1.5))
    elapsed = time.monotonic() - started
    assert result["error"].startswith(
        "The job timed out after 1.5 s while ComfyUI was running node 3 (WorkerTestSteps)"
    )
    assert result["error"].endswith("; the prompt was interrupted.")  # stopped within the grace time: said so
    assert result["details"]["stopped"] is True and result["details"]["state"] == "running"
    assert elapsed < 6
    queue = worker_env.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    started = time.monotonic()
    ok = run(job(empty_to_save(8, 8, 0xFF0000)))
    assert "error" not in ok, ok
    assert time.monotonic() - started < 3


def private_comfyui(comfyui_factory, monkeypatch, mode: str):
    """A ComfyUI of the test's own (it gets killed), the worker pointed at it, in ``mode``."""
    private = comfyui_factory(start=False)
    private.install_test_nodes()
    return worker_on(private.start(), monkeypatch, mode)


def worker_on(private, monkeypatch, mode: str):
    """The worker pointed at the ComfyUI ``private``, in ``mode``."""
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in private.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMFY_LOG_FILE", str(private.log_path))
    monkeypatch.setenv("MODE", mode)
    monkeypatch.delenv("COMFY_RESTART", raising=False)  # the mode's default: restarted except in serverless
    return private


def kill_when_running(comfyui) -> threading.Thread:
    def kill():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if comfyui.get_json("/queue")["queue_running"]:
                time.sleep(0.3)
                comfyui.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


@pytest.mark.slow
def test_comfyui_killed_mid_job_fails_fast_with_log_tail(comfyui_factory, monkeypatch):
    """In serverless (ComfyUI not restarted: issue 20 #18) the job fails at once, and so does the next one."""
    private = private_comfyui(comfyui_factory, monkeypatch, "serverless")
    killer = kill_when_running(private)
    started = time.monotonic()
    result = run(job(slow_workflow(600, 0.05), timeout=60))
    killer.join()
    assert time.monotonic() - started < 15
    assert "no longer running" in result["error"] and result["error"].endswith("; this worker will be replaced.")
    assert result["refresh_worker"] is True
    assert "got prompt" in result["details"]["comfyui_log_tail"]
    # the next job fails at once too (the PID file names a dead process), instead of waiting for readiness
    started = time.monotonic()
    again = run(job(empty_to_save(8, 8)))
    assert "no longer running" in again["error"] and time.monotonic() - started < 3


@pytest.mark.slow
def test_comfyui_restarting_on_a_pod_fails_the_running_job_saying_so_and_a_job_sent_meanwhile_waits_and_completes(
    comfyui, monkeypatch, worker_log
):
    """issue 20 #18 (and the "replaced" wording): on pods and local boxes ComfyUI is restarted when it dies.
    The job it ran fails at once saying ComfyUI is being restarted (no replacement is promised); a job
    sent while the PID file still names the dead process waits for the new one (started here on the same
    port after a delay, as the supervisor does) and completes; one whose own timeout ends while it waits
    ends then, with its timeout error. The shared ComfyUI is the one killed: the
    test restarts it on its port (one boot instead of a private ComfyUI's two)."""
    private = worker_on(comfyui, monkeypatch, "pod")
    try:
        _restarting_on_a_pod(private, worker_log)
    finally:
        if not private.alive():
            private.start(port=private.port)


def _restarting_on_a_pod(private, worker_log):
    killer = kill_when_running(private)
    started = time.monotonic()
    result = run(job(slow_workflow(600, 0.05), timeout=60))
    killer.join()
    assert time.monotonic() - started < 15
    dead_pid = private.proc.pid
    assert result["error"] == (
        f"ComfyUI (process {dead_pid}) is no longer running (its websocket closed during the job); ComfyUI is "
        "being restarted: send the job again, it runs once ComfyUI is back."
    ), result

    # a job whose own timeout ends while it waits for ComfyUI ends then, with its timeout error (not after
    # COMFY_READY_TIMEOUT, nor after the 10 s given to the supervisor to restart a dead ComfyUI)
    started = time.monotonic()
    short = run(job(empty_to_save(8, 8), timeout=2))
    assert 2.0 <= time.monotonic() - started < 2.0 + 3.0, short
    assert short["error"] == (
        f"The job timed out after 2 s while it waited for ComfyUI at {private.host} to answer (it is being "
        "restarted); the workflow was not queued: send the job again once ComfyUI is back."
    ), short
    assert short["details"]["state"] == "waiting_for_comfyui" and "refresh_worker" not in short

    port = private.port
    restarter = threading.Thread(target=lambda: (time.sleep(1.0), private.start(port=port)))
    restarter.start()
    started = time.monotonic()
    again = run(job(empty_to_save(8, 8, 0x102030)))
    restarter.join()
    assert time.monotonic() - started >= 1.0
    assert "error" not in again, again
    assert decode_image(again["images"][0]).getpixel((4, 4)) == (0x10, 0x20, 0x30)
    assert f"ComfyUI (process {dead_pid}) is not running: waiting for its restart" in worker_log.getvalue()


@pytest.mark.parametrize(
    "refuse_for",
    [0.0, 0.6, 3.0],
    ids=["reconnect-during-run", "output-saved-while-disconnected", "finished-while-disconnected"],
)
def test_websocket_cut_mid_job_reconnects_and_checks_history(worker_env, monkeypatch, caplog, refuse_for):
    # EmptyImage -> 0.5 s -> SaveImage "first" -> 0.5 s -> SaveImage "second"; the socket is cut 0.2 s in
    color = random.randrange(1 << 24)
    wf = slow_workflow(10, 0.05, color=color)
    wf["2"]["inputs"]["filename_prefix"] = "first"
    wf["4"] = {"class_type": "WorkerTestSteps", "inputs": {"image": ["3", 0], "steps": 10, "seconds_per_step": 0.05}}
    wf["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "second"}}
    proxy = DroppingProxy(worker_env.port).start()
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{proxy.port}")
    try:
        cutter = cut_once_running(worker_env, proxy, refuse_for)
        with caplog.at_level("INFO"):
            result = run(job(wf, timeout=30))
        cutter.join()
    finally:
        proxy.stop()
    assert "error" not in result, result
    assert sorted(e["filename"].split("_")[0] for e in result["images"]) == ["first", "second"]
    for entry in result["images"]:
        assert decode_image(entry).getpixel((0, 0)) == ((color >> 16) & 255, (color >> 8) & 255, color & 255)
    assert "Websocket reconnected" in caplog.text
    assert proxy.connections >= 3  # websocket, POST /prompt, websocket again


def test_two_concurrent_jobs_get_only_their_own_outputs(worker_env):
    def with_upload(color):
        wf = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "input.png"}},
            "2": {"class_type": "WorkerTestSteps", "inputs": {"image": ["1", 0], "steps": 3, "seconds_per_step": 0.1}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "concurrent"}},
        }
        # both jobs upload a different file under the same name
        return job(wf, job_id=f"job-{color}", images=[{"name": "input.png", "image": png_b64((6, 6), color)}])

    before_out, before_in = output_files(worker_env), input_files(worker_env)
    red, blue = run_many([with_upload((255, 0, 0)), with_upload((0, 0, 255))])
    for result, color in ((red, (255, 0, 0)), (blue, (0, 0, 255))):
        assert "error" not in result, result
        assert len(result["images"]) == 1
        assert decode_image(result["images"][0]).getpixel((2, 2)) == color
    assert output_files(worker_env) == before_out and input_files(worker_env) == before_in


# --- the RunPod SDK's local API ----------------------------------------------------------------------
@pytest.fixture
def local_api(worker_env, tmp_path):
    """``python handler.py --rp_serve_api`` as RunPod would run it (RUNPOD_ENDPOINT_ID set, so progress is
    sent, to a local sink)."""
    sink = ProgressSink()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(worker_env.env(), COMFY_LOG_FILE=str(worker_env.log_path), PYTHONUNBUFFERED="1")
    env.update(
        RUNPOD_ENDPOINT_ID="test-endpoint", RUNPOD_WEBHOOK_POST_OUTPUT=sink.url, COMFY_ORG_API_KEY="sk-secret-9876"
    )
    log_path = tmp_path / "handler.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)

        post.url = f"http://127.0.0.1:{port}"
        yield post, sink, log_path
    finally:
        stop_process(proc)
        sink.server.shutdown()


def test_runsync_through_the_sdk_local_api_with_throttled_progress(local_api):
    post, sink, log_path = local_api
    body = json.loads((ROOT / "test_input.json").read_text())
    answer = post("/runsync", body)
    assert answer["status"] == "COMPLETED", answer
    assert answer["output"]["images"][0]["type"] == "base64"
    assert answer["id"].startswith("test-")

    failed = post("/runsync", {"input": {"workflow": {"nodes": [], "links": []}}})
    assert failed["status"] == "FAILED" and failed["error"] == UI_FORMAT_ERROR

    slow = post("/runsync", {"input": {"workflow": slow_workflow(40, 0.05)}})  # about 80 progress messages in 2 s
    assert slow["status"] == "COMPLETED", slow
    time.sleep(0.3)  # progress posts are sent from threads
    progress = [(t, p) for t, job_id, p in sink.posts if job_id == slow["id"] and p.get("status") == "IN_PROGRESS"]
    # at most 2 a second (posts travel in threads, so judge by count and typical spacing, not by each gap)
    seconds = slow["output"]["timings"]["total_ms"] / 1000
    assert 2 <= len(progress) <= 2 * seconds + 1, progress
    times = [t for t, _ in progress]
    assert statistics.median(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.45, times
    assert any(p["output"].get("class_type") == "WorkerTestSteps" for _, p in progress)

    keyed = post(
        "/runsync",
        {
            "input": {
                "workflow": {"1": {"class_type": "WorkerTestApiKey", "inputs": {}}},
                "comfy_org_api_key": "sk-input-5555",
            }
        },
    )
    assert keyed["output"]["text"] == [{"node_id": "1", "text": hashlib.sha256(b"sk-input-5555").hexdigest()[:16]}]

    log_text = log_path.read_text()
    assert "sk-secret-9876" not in log_text and "sk-input-5555" not in log_text
    assert "Handler output" not in log_text  # the SDK's DEBUG dump of every output is off by default
    job_lines = [line for line in log_text.splitlines() if " handler: " in line or " prompt_runner: " in line]
    job_lines = [line for line in job_lines if "Starting the RunPod handler" not in line]
    assert len(job_lines) >= 4 and all(": [test-" in line for line in job_lines), job_lines


def test_example_client_saves_the_returned_images(local_api, tmp_path):
    post, _, _ = local_api
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "examples/test_local.py", "--url", post.url, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (saved,) = out.iterdir()
    with Image.open(saved) as img:
        assert img.size == (32, 64)  # test_input.json: 64x64 with its width overridden to 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"input": {"workflow": {"nodes": [], "links": []}}}))
    failed = subprocess.run(
        [sys.executable, "examples/test_local.py", str(bad), "--url", post.url, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "Export (API)" in failed.stderr


def serverless_worker_env(queue: FakeRunPodQueue, volume: Path, **extra: str) -> dict[str, str]:
    """The environment RunPod gives a serverless worker (its job queue: ``queue``), the volume ``volume``."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(
        VOLUME_ROOT=str(volume),
        RUNPOD_ENDPOINT_ID="test-endpoint",
        RUNPOD_POD_ID="test-worker",
        RUNPOD_WEBHOOK_GET_JOB=f"{queue.base}/job-take/$ID?gpu=cpu",
        RUNPOD_WEBHOOK_POST_OUTPUT=f"{queue.base}/done/$ID?gpu=cpu",
        RUNPOD_SKIP_GPU_CHECK="true",
        RUNPOD_MIN_MEMORY_GB="0",
        RUNPOD_MIN_DISK_PERCENT="0",
        **extra,
    )
    return env


def provisioned_volume(path: Path) -> Path:
    """A volume as a successful provisioning leaves it: the gate holds the config's digest."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ".config-sha256").write_text("0" * 64 + "\n")
    return path


def test_worker_loop_runs_max_concurrency_jobs_at_once(worker_env, tmp_path):
    jobs = [
        job(slow_workflow(10, 0.05, color=0xFF0000), job_id="job-red"),
        job(slow_workflow(10, 0.05, color=0x0000FF), job_id="job-blue"),
    ]
    queue = FakeRunPodQueue(jobs)
    env = serverless_worker_env(queue, provisioned_volume(tmp_path / "volume"), **worker_env.env())
    env.update(COMFY_LOG_FILE=str(worker_env.log_path), MAX_CONCURRENCY="2")  # the fitness check passes
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(queue.results) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
    finally:
        stop_process(proc, timeout=15)
        queue.server.shutdown()
    assert set(queue.results) == {"job-red", "job-blue"}, log_path.read_text()
    assert "batch_size=2" in queue.takes[0]  # MAX_CONCURRENCY reached the SDK through concurrency_modifier
    # they overlapped: both prompts were queued before either job was done
    lines = log_path.read_text().splitlines()
    queued = [i for i, line in enumerate(lines) if "Queued prompt" in line]
    done = [i for i, line in enumerate(lines) if "handler: [job-" in line and "Done:" in line]
    assert len(queued) == 2 and len(done) == 2, lines
    assert max(queued) < min(done), lines
    for job_id, color in (("job-red", (255, 0, 0)), ("job-blue", (0, 0, 255))):
        output = queue.results[job_id]["output"]
        assert decode_image(output["images"][0]).getpixel((0, 0)) == color


def test_fitness_check_ends_a_worker_without_a_gate_or_without_comfyui_before_any_job(tmp_path):
    """RunPod's fitness check (handler.worker_ready): the worker exits 1 with a readable reason, and
    takes no job, when provisioning left no gate or ComfyUI does not answer (docs/runpod-guide.md)."""
    queue = FakeRunPodQueue([job(empty_to_save(8, 8, 0), job_id="never-taken")])
    dead_comfy = f"127.0.0.1:{free_port()}"
    cases = {
        "no gate": serverless_worker_env(queue, tmp_path / "empty-volume", COMFY_HOST=dead_comfy),
        "no ComfyUI": serverless_worker_env(queue, provisioned_volume(tmp_path / "volume"), COMFY_HOST=dead_comfy),
    }
    procs = {}
    for name, env in cases.items():
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
    try:
        codes = {name: proc.wait(timeout=90) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            stop_process(proc)
        queue.server.shutdown()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in cases}
    assert codes == {"no gate": 1, "no ComfyUI": 1}, logs
    assert queue.takes == [] and queue.jobs, logs  # no job was asked for
    gate = tmp_path / "empty-volume" / ".config-sha256"
    assert f"Fitness check failed: worker_ready | WorkerUnfit: provisioning left no gate at {gate}" in logs["no gate"]
    assert f"WorkerUnfit: ComfyUI does not answer at http://{dead_comfy}/system_stats" in logs["no ComfyUI"]
    assert all("Worker is unhealthy, exiting." in text for text in logs.values())


# --- audit fixes -------------------------------------------------------------------------------------
def test_partly_rejected_workflow_runs_the_valid_part_and_names_each_rejected_node(worker_env):
    wf = empty_to_save(8, 8, random.randrange(1 << 24), prefix="good_part")
    wf["3"] = {"class_type": "LoadImage", "inputs": {"image": "does-not-exist.png"}}
    wf["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "never"}}
    wf["5"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["1", 0], "upscale_method": "sharpest", "width": 4, "height": 4, "crop": "disabled"},
    }
    wf["7"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "never"}}
    result = run(job(wf))
    assert "error" not in result, result
    assert [e["node_id"] for e in result["images"]] == ["2"]
    assert len(result["errors"]) == 2, result["errors"]
    load, scale = sorted(result["errors"], key=lambda e: "ImageScale" in e)
    assert "node 3 (LoadImage)" in load and "does-not-exist.png" in load and "output node(s) 4 (SaveImage)" in load
    assert "node 5 (ImageScale) input 'upscale_method'" in scale and "'sharpest'" in scale
    assert "'bilinear'" in scale and "output node(s) 7 (SaveImage)" in scale  # with the values ComfyUI offers


def save_and_pass_workflow(color: int, seconds: float = 0.0, source: dict | None = None) -> dict:
    """source (EmptyImage) -> WorkerTestSaveAndPass (an output node whose image is used on) -> SaveImage."""
    wf = empty_to_save(8, 8, color, prefix="after_pass")
    if source is not None:
        wf["1"] = source
    wf["3"] = {
        "class_type": "WorkerTestSaveAndPass",
        "inputs": {"image": ["1", 0], "filename_prefix": "passed", "seconds": seconds},
    }
    wf["2"]["inputs"]["images"] = ["3", 0]
    return wf


def test_output_node_whose_output_is_used_still_saves_a_fresh_file_every_job(worker_env):
    before = output_files(worker_env)
    wf = save_and_pass_workflow(random.randrange(1 << 24))
    first, second = run(job(wf)), run(job(wf))
    for result in (first, second):
        assert "error" not in result, result
        assert result["errors"] == []  # not "could not be delivered": the first job's file, long deleted
        assert sorted(e["node_id"] for e in result["images"]) == ["2", "3"]
    # the save node really ran again (ComfyUI did not answer from its cache) and wrote the second job's file
    entry = worker_env.get_json(f"/history/{second['prompt_id']}")[second["prompt_id"]]
    cached = [data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    assert cached and "1" in cached[0] and "3" not in cached[0]
    assert output_files(worker_env) == before


def test_completion_is_found_by_polling_history_when_the_new_socket_stays_silent(worker_env, monkeypatch):
    wf = slow_workflow(20, 0.05)
    proxy = DroppingProxy(worker_env.port).start()
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{proxy.port}")
    try:
        cutter = cut_once_running(worker_env, proxy, mute=True)  # reconnects succeed, then stay silent
        started = time.monotonic()
        result = run(job(wf, timeout=12))
        elapsed = time.monotonic() - started
        cutter.join()
    finally:
        proxy.stop()
    assert "error" not in result, result
    assert len(result["images"]) == 1
    assert elapsed < 8


def test_outputs_saved_after_a_timeout_are_removed_with_the_inputs(worker_env):
    before_out, before_in = output_files(worker_env), input_files(worker_env)
    # the save node sleeps 1.5 s without checking for interrupts: it saves its file after the timeout
    load = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    wf = save_and_pass_workflow(0, seconds=1.5, source=load)
    result = run(job(wf, timeout=0.7, images=[{"name": "in.png", "image": png_b64((4, 4), (1, 2, 3))}]))
    assert result["error"].startswith("The job timed out after 0.7 s while ComfyUI was running node 3")
    assert result["details"]["stopped"] is True
    assert output_files(worker_env) == before_out
    assert input_files(worker_env) == before_in


def test_progress_is_sent_only_on_serverless(worker_env, monkeypatch):
    from comfy_worker.settings import Settings

    assert Settings.from_env({"RUNPOD_POD_ID": "p"}).send_progress is False  # a pod: no webhook to post to
    assert Settings.from_env({"RUNPOD_ENDPOINT_ID": "e", "RUNPOD_POD_ID": "w"}).send_progress is True
    assert Settings.from_env({}).send_progress is False
    sent: list[dict] = []
    monkeypatch.setattr(handler.runpod.serverless, "progress_update", lambda job, event: sent.append(event))
    monkeypatch.setenv("RUNPOD_POD_ID", "pod-1")
    assert "error" not in run(job(slow_workflow(3, 0.05)))
    assert sent == []
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "endpoint-1")
    assert "error" not in run(job(slow_workflow(3, 0.05)))
    assert sent and sent[0]["status"] == "queued"


def test_unparsable_image_url_names_the_image(worker_env):
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "remote.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "url"}},
    }
    result = run(job(wf, images=[{"name": "remote.png", "url": "http://[bad/x"}]))
    assert "'remote.png'" in result["error"] and "url" in result["error"]
    assert "unexpectedly" not in result["error"]


def test_websocket_handshake_refused_is_a_readable_error(worker_env, monkeypatch):
    proxy = DroppingProxy(worker_env.port)
    proxy.refuse_ws = True  # HTTP works, every websocket upgrade gets 503
    proxy.start()
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{proxy.port}")
    try:
        result = run(job(empty_to_save(8, 8)))
    finally:
        proxy.stop()
    assert "unexpectedly" not in result["error"], result
    assert f"127.0.0.1:{proxy.port}" in result["error"] and "websocket" in result["error"]
    assert "503" in result["error"]
    assert result["refresh_worker"] is True


def test_the_jobs_own_api_key_is_redacted_from_output_and_logs(worker_env, monkeypatch):
    import logging

    from comfy_worker.log_setup import setup_logging

    key = "sk-job-input-7777"
    monkeypatch.setenv("HF_TOKEN", "a")  # a 1-character secret must not mangle every 'a' in messages
    stream = io.StringIO()
    setup_logging(stream=stream)
    try:
        failed = run(job({"1": {"class_type": "WorkerTestApiKey", "inputs": {"fail": True}}}, comfy_org_api_key=key))
        wf = {"1": {"class_type": "WorkerTestApiKey", "inputs": {}}}
        wf["2"] = {"class_type": "LoadImage", "inputs": {"image": f"{key}.png"}}
        wf["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "never"}}
        partial = run(job(wf, comfy_org_api_key=key))
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_comfy_worker", False)]:
            root.removeHandler(h)
    assert failed["error"].startswith("ComfyUI failed in node 1 (WorkerTestApiKey): RuntimeError: the service")
    assert "***" in failed["error"] and "***" in failed["details"]["exception_message"]
    assert len(partial["errors"]) == 1 and "***.png" in partial["errors"][0]
    assert key not in json.dumps(failed) and key not in json.dumps(partial)
    log_text = stream.getvalue()  # the worker's log as setup_logging writes it
    assert "ComfyUI failed in node 1" in log_text and "ComfyUI rejected node 2 (LoadImage)" in log_text
    assert key not in log_text


def test_an_uploaded_image_the_workflow_never_uses_is_noted(worker_env):
    before = input_files(worker_env)
    result = run(job(empty_to_save(8, 8), images=[{"name": "unused.png", "image": png_b64()}]))
    assert "error" not in result, result
    assert len(result["images"]) == 1
    assert len(result["errors"]) == 1 and "'unused.png'" in result["errors"][0]
    assert input_files(worker_env) == before


@pytest.mark.slow
def test_a_job_that_arrives_before_comfyui_is_ready_waits_and_succeeds(comfyui_factory, monkeypatch):
    import support.comfy_process

    private = comfyui_factory(start=False)
    port = free_port()
    monkeypatch.setattr(support.comfy_process, "free_port", lambda: port)  # its address, known before it starts
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("COMFYUI_PATH", str(private.path))
    monkeypatch.setenv("COMFY_PID_FILE", str(private.pid_file))
    monkeypatch.setenv("COMFY_LOG_FILE", str(private.log_path))
    monkeypatch.setenv("COMFY_READY_TIMEOUT", "120")
    results: list[dict] = []
    worker = threading.Thread(target=lambda: results.append(run(job(empty_to_save(8, 8, 0x00FF00)))))
    worker.start()
    time.sleep(1.0)  # the job is waiting for ComfyUI now
    assert worker.is_alive() and not results
    private.start()
    worker.join(60)
    (result,) = results
    assert "error" not in result, result
    assert decode_image(result["images"][0]).getpixel((0, 0)) == (0, 255, 0)


def test_a_job_whose_timeout_ends_while_comfyui_does_not_answer_ends_then_not_after_comfy_ready_timeout(
    tmp_path, monkeypatch
):
    """The wait for ComfyUI (up to COMFY_READY_TIMEOUT) counts against the job's own timeout (here
    COMFY_JOB_TIMEOUT): nothing answers at COMFY_HOST and no PID file says ComfyUI is dead (so the wait
    goes on), and the job ends at its timeout with its timeout error (issue 20 #18)."""
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODE", "serverless")
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("COMFY_PID_FILE", str(tmp_path / "none.pid"))
    monkeypatch.setenv("COMFY_LOG_FILE", str(tmp_path / "comfyui.log"))
    monkeypatch.setenv("COMFY_READY_TIMEOUT", "300")
    monkeypatch.setenv("COMFY_JOB_TIMEOUT", "1.5")
    started = time.monotonic()
    result = run(job(empty_to_save(8, 8)))
    assert 1.5 <= time.monotonic() - started < 1.5 + 3.0, result
    host = os.environ["COMFY_HOST"]
    assert result["error"] == (
        f"The job timed out after 1.5 s while it waited for ComfyUI at {host} to answer; the workflow was not "
        "queued: this worker will be replaced."
    ), result
    assert result["details"] == {"timeout_s": 1.5, "state": "waiting_for_comfyui", "host": host}
    assert result["refresh_worker"] is True


# --- hardening: a hostile or faulty world (each test names the defect it guards against) ------------
def test_a_cancelled_job_interrupts_its_prompt_cleans_up_and_propagates(worker_env):
    before_out, before_in = output_files(worker_env), input_files(worker_env)
    wf = slow_workflow(200, 0.05)
    wf["1"] = {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
    body = job(wf, job_id="cancelled", images=[{"name": "in.png", "image": png_b64((4, 4), (9, 9, 9))}])

    async def go():
        try:
            task = asyncio.create_task(handler.handler(body))
            while not (await asyncio.to_thread(worker_env.get_json, "/queue"))["queue_running"]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            task.cancel()  # what the RunPod SDK does on a cancel request or an endpoint timeout
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - started
        finally:
            await comfy_client.close_shared_session()

    elapsed = asyncio.run(go())
    assert elapsed < 5
    queue = worker_env.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []  # no orphan left running
    assert output_files(worker_env) == before_out and input_files(worker_env) == before_in
    started = time.monotonic()
    assert "error" not in run(job(empty_to_save(8, 8, 0x010203)))
    assert time.monotonic() - started < 3


def test_malformed_and_stray_broadcasts_never_end_a_job(worker_env):
    # a custom node broadcasts string payloads, non-JSON text and job messages naming no prompt (or
    # another one) while a second job waits in the queue; both jobs finish with their own outputs only
    stray = worker_env.path / "output" / f"stray_{random.randrange(1 << 30)}.png"
    Image.new("RGB", (2, 2)).save(stray)
    noisy = slow_workflow(4, 0.05, color=0x00FF00)
    noisy["5"] = {"class_type": "WorkerTestBroadcast", "inputs": {"image": ["3", 0], "report_file": stray.name}}
    noisy["2"]["inputs"]["images"] = ["5", 0]
    quiet = slow_workflow(2, 0.05, color=0x0000FF)

    async def go():
        try:
            first = asyncio.create_task(handler.handler(job(noisy, job_id="noisy")))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(handler.handler(job(quiet, job_id="quiet")))
            return await first, await second
        finally:
            await comfy_client.close_shared_session()

    try:
        first, second = asyncio.run(go())
        for result, color in ((first, (0, 255, 0)), (second, (0, 0, 255))):
            assert "error" not in result, result
            assert [e["node_id"] for e in result["images"]] == ["2"], result["images"]
            assert decode_image(result["images"][0]).getpixel((0, 0)) == color
            assert result["errors"] == []
        assert stray.exists()  # never taken as a job's output, so never deleted
    finally:
        stray.unlink(missing_ok=True)


def test_clean_up_keeps_an_existing_file_a_node_reports(worker_env):
    existing = worker_env.path / "output" / f"keep_me_{random.randrange(1 << 30)}.png"
    Image.new("RGB", (3, 3), (1, 2, 3)).save(existing)
    time.sleep(0.2)  # older than the job's prompt
    try:
        result = run(job({"1": {"class_type": "WorkerTestReportFile", "inputs": {"filename": existing.name}}}))
        assert "error" not in result, result
        assert [e["filename"] for e in result["images"]] == [existing.name]  # delivered, as the node said
        assert existing.exists()  # but not deleted: this job's prompt did not create it
    finally:
        existing.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"overrides": [{"node_id": "1", "field": "inputs", "value": "x"}]}, "sets the node's 'inputs' to str"),
        ({"overrides": [{"node_id": "1", "field": "inputs", "value": None}]}, "sets the node's 'inputs' to NoneType"),
        (
            {"overrides": [{"node_id": "2", "field": "class_type", "value": ["SaveImage"]}]},
            "sets the node's 'class_type' to list",
        ),
        ({"overrides": [{"node_id": "1", "field": "_meta", "value": "t"}]}, "sets the node's '_meta' to str"),
        ({"timeout": float("nan")}, "'timeout' must be a positive number of seconds (finite, such as 120), got nan"),
        ({"timeout": float("inf")}, "'timeout' must be a positive number of seconds (finite, such as 120), got inf"),
    ],
    ids=["inputs-string", "inputs-null", "class_type-list", "meta-string", "timeout-nan", "timeout-infinity"],
)
def test_bad_override_values_and_non_finite_timeouts_are_input_errors(worker_env, extra, needle):
    result = run(job(empty_to_save(8, 8), **extra))
    assert needle in result["error"], result
    assert "unexpectedly" not in result["error"]
    if "overrides" in extra:
        assert result["error"].startswith("overrides[0] on node ")


def test_the_job_timeout_covers_a_stalling_image_download(worker_env):
    before = input_files(worker_env)
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "slow.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    with ImageHost(stall_s=8) as host:
        started = time.monotonic()
        images = [{"name": "fine.png", "image": png_b64()}, {"name": "slow.png", "url": host.url("/stall.png?sig=s1")}]
        result = run(job(wf, timeout=1.5, images=images))
        elapsed = time.monotonic() - started
    assert elapsed < 4, result
    assert result["error"] == (
        f"The job timed out after 1.5 s while its images were prepared ('slow.png': downloading it from "
        f"{host.base}/stall.png?…); the workflow was not queued."
    )
    assert input_files(worker_env) == before


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/big.png", "is larger than MAX_IMAGE_MB (1 MB); send a smaller file"),  # no length: counted while streamed
        ("/long.png", "is larger than MAX_IMAGE_MB (1 MB) (it announces 4.0 MB)"),  # refused before the body
        ("/bomb.png", "is larger than MAX_IMAGE_MB (1 MB); send a smaller file"),  # 4 KB gzip, 4 MB inflated
    ],
    ids=["streamed", "announced", "gzip-bomb"],
)
def test_image_urls_are_capped_by_max_image_mb(worker_env, monkeypatch, path, needle):
    monkeypatch.setenv("MAX_IMAGE_MB", "1")
    before = input_files(worker_env)
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "huge.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    with ImageHost(big_bytes=4 * 1024 * 1024) as host:
        result = run(job(wf, images=[{"name": "huge.png", "url": host.url(path)}]))
    assert result["error"].startswith(f"The image 'huge.png' from {host.base}{path} "), result
    assert needle in result["error"]
    assert input_files(worker_env) == before


def test_secrets_never_reach_the_comfyui_log_tail_nor_the_log(tmp_path, monkeypatch, worker_log):
    # ComfyUI died, and its log holds the Jupyter password and a signed URL: the result carries the tail
    password = "jupyter-pass-31337"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "comfyui.pid").write_text(str(dead.pid))
    (tmp_path / "comfyui.log").write_text(
        f"started with --password {password}\nGET https://cdn.example/m.bin?X-Amz-Signature=sig-in-log failed\n"
    )
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("COMFY_PID_FILE", str(tmp_path / "comfyui.pid"))
    monkeypatch.setenv("COMFY_LOG_FILE", str(tmp_path / "comfyui.log"))
    monkeypatch.setenv("JUPYTER_PASSWORD", password)
    monkeypatch.setenv("COMFY_RESTART", "0")  # the dead ComfyUI fails the job at once (not waited for)
    result = run(job(empty_to_save(8, 8)))
    assert "no longer running" in result["error"]
    tail = result["details"]["comfyui_log_tail"]
    assert "--password ***" in tail and "https://cdn.example/m.bin?…" in tail
    assert password not in json.dumps(result) and "sig-in-log" not in json.dumps(result)
    assert password not in worker_log.getvalue()


def test_a_signed_image_urls_query_never_reaches_the_result_or_the_log(worker_env, worker_log):
    # the host redirects for ever; aiohttp's TooManyRedirects text quotes the last URL, query included
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "signed.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "never"}},
    }
    with ImageHost() as host:
        url = host.url("/loop.png?X-Amz-Signature=sig-first&X-Amz-Credential=cred")
        result = run(job(wf, images=[{"name": "signed.png", "url": url}]))
        fetch_error = asyncio.run(_fetch_error(ImageInput(name="signed.png", url=url)))
    assert result["error"].startswith(f"Could not download image 'signed.png' from {host.base}/loop.png?…: ")
    assert "TooManyRedirects" in result["error"] or "redirect" in result["error"].lower(), result
    # each layer on its own: the download's own error (before the result is scrubbed) ...
    assert fetch_error.startswith(f"Could not download image 'signed.png' from {host.base}/loop.png?…: ")
    assert "sig-" not in fetch_error and "cred" not in fetch_error, fetch_error
    # ... and the final scrub of the result, for a message no layer before it redacted (a node quoting a URL)
    quoted = "GET https://cdn.example/in.png?X-Amz-Signature=sig-node&X-Amz-Credential=cred-node failed"
    failed = run(job({"1": {"class_type": "WorkerTestFail", "inputs": {"message": quoted}}}))
    assert failed["error"] == (
        "ComfyUI failed in node 1 (WorkerTestFail): RuntimeError: GET https://cdn.example/in.png?… failed"
    ), failed
    for text in (json.dumps(result), json.dumps(failed), worker_log.getvalue()):
        assert "sig-" not in text and "cred" not in text, text


async def _fetch_error(image: ImageInput) -> str:
    """The message of the JobError ``handler._fetch`` raises for ``image`` (as it leaves the download)."""
    try:
        await handler._fetch(image, 10)
    except JobError as exc:
        return exc.message
    finally:
        await comfy_client.close_shared_session()
    raise AssertionError("the download did not fail")


@pytest.mark.slow
def test_comfy_args_output_and_input_directories_are_used(comfyui_factory, monkeypatch, tmp_path):
    out_dir, in_dir = tmp_path / "elsewhere-out", tmp_path / "elsewhere-in"
    out_dir.mkdir()
    in_dir.mkdir()
    args = ["--output-directory", str(out_dir), "--input-directory", str(in_dir)]
    private = comfyui_factory(start=False)
    private.extra_args = args
    private.start()
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in private.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMFY_LOG_FILE", str(private.log_path))
    monkeypatch.setenv("COMFY_ARGS", " ".join(args))
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "moved"}},
    }
    result = run(job(wf, images=[{"name": "photo.png", "image": png_b64((4, 4), (255, 0, 0))}]))
    assert "error" not in result, result
    assert decode_image(result["images"][0]).getpixel((1, 1)) == (0, 255, 255)
    assert [p for p in out_dir.rglob("*") if p.is_file()] == []  # delivered from the moved folder, then removed
    assert [p for p in in_dir.rglob("*") if p.is_file()] == []  # the upload removed from the moved input folder


@pytest.mark.parametrize(
    "name", ["BUCKET_SECRET_ACCESS_KEY", "JUPYTER_PASSWORD", "RUNPOD_AI_API_KEY", "AWS_SECRET_ACCESS_KEY"]
)
def test_every_secret_of_the_settings_is_redacted_from_errors_and_the_log(worker_env, monkeypatch, worker_log, name):
    secret = f"{name.lower()}-value-4242"
    monkeypatch.setenv(name, secret)
    result = run(job({"1": {"class_type": "WorkerTestFail", "inputs": {"message": f"bad {secret}"}}}))
    assert result["error"] == "ComfyUI failed in node 1 (WorkerTestFail): RuntimeError: bad ***"
    assert secret not in json.dumps(result)
    assert "RuntimeError: bad ***" in worker_log.getvalue() and secret not in worker_log.getvalue()


# --- promises of docs/api.md ---------------------------------------------------------------------------
def test_a_second_job_queued_behind_a_first_shows_its_queue_time(worker_env):
    async def go():
        try:
            first = asyncio.create_task(handler.handler(job(slow_workflow(10, 0.1), job_id="first")))
            await asyncio.sleep(0.15)
            second = await handler.handler(job(slow_workflow(1, 0.0), job_id="second"))
            return await first, second
        finally:
            await comfy_client.close_shared_session()

    first, second = asyncio.run(go())
    assert "error" not in first and "error" not in second, (first, second)
    assert first["timings"]["execution_ms"] >= 1000 and first["timings"]["queue_ms"] < 300
    assert second["timings"]["queue_ms"] >= 600, second["timings"]  # it waited for the first one
    assert second["timings"]["execution_ms"] < 500
    for t in (first["timings"], second["timings"]):
        assert t["total_ms"] >= t["queue_ms"] + t["execution_ms"]


def test_a_workflow_that_produces_nothing_gets_a_note(worker_env):
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    result = run(job(wf))
    assert result["images"] == [] and result["files"] == [] and result["text"] == []
    assert result["errors"] == [
        "The workflow finished but produced no output files or text (does it have a save node?)."
    ]
    # text alone is an output: no note then
    text_only = run(job({"1": {"class_type": "PreviewAny", "inputs": {"source": "only text"}}}))
    assert text_only["text"] == [{"node_id": "1", "text": "only text"}] and text_only["errors"] == [], text_only


@pytest.mark.parametrize("bad_job", [None, ["not", "a", "job"], "text"], ids=["none", "list", "string"])
def test_a_bug_gives_failed_unexpectedly_and_the_handler_never_raises(worker_env, monkeypatch, worker_log, bad_job):
    # RunPod always sends an object; anything else reaches code that assumes one: the bug path
    monkeypatch.setenv("REFRESH_WORKER", "1")  # "every result" carries it (docs/api.md): a bug's too
    result = run(bad_job)
    assert result["error"].startswith("The handler failed unexpectedly: AttributeError: ")
    assert result["details"] == {"exception_type": "AttributeError"}
    assert result["refresh_worker"] is True  # answered by the job's own path, not only the last resort
    assert "Traceback" in worker_log.getvalue()


def test_a_bug_outside_the_job_still_gets_an_answer_without_secrets(worker_env, monkeypatch, worker_log):
    # the last resort of handler(): a bug before the job's own error handling (here: in _handle itself)
    secret = "jupyter-secret-8080"
    monkeypatch.setenv("JUPYTER_PASSWORD", secret)
    setup_logging(stream=worker_log)  # as a process started with this secret in its environment

    async def broken(job, job_id):
        raise RuntimeError(f"boom near {secret}")

    monkeypatch.setattr(handler, "_handle", broken)
    result = run(job(empty_to_save(8, 8)))
    assert result == {
        "error": "The handler failed unexpectedly: RuntimeError: boom near ***",
        "details": {"exception_type": "RuntimeError"},
    }
    assert "Unexpected error\nTraceback" in worker_log.getvalue()
    assert "boom near ***" in worker_log.getvalue() and secret not in worker_log.getvalue()


AFTER_HANG_LOCAL = "; send the job again; if this repeats, ComfyUI's log (COMFY_LOG_FILE) says why."


@pytest.mark.parametrize(
    ("fault", "needle", "worker_mode", "ending"),
    [
        ("stall_http", "did not answer in time during the job (TimeoutError)", "local", AFTER_HANG_LOCAL),
        ("drop_http", "stopped answering during the job", "local", AFTER_HANG_LOCAL),
        (
            "stall_http",
            "did not answer in time during the job (TimeoutError)",
            "serverless",
            "; this worker will be replaced.",
        ),
    ],
)
def test_comfyui_unreachable_mid_job_is_a_readable_error(worker_env, monkeypatch, fault, needle, worker_mode, ending):
    """The "replaced" wording only in serverless (issue 20): a pod or local box is never replaced."""
    proxy = DroppingProxy(worker_env.port)
    setattr(proxy, fault, b"POST /prompt")  # the websocket and /object_info work; queueing gets no answer
    proxy.start()
    monkeypatch.setenv("COMFY_HOST", f"127.0.0.1:{proxy.port}")
    monkeypatch.setenv("MODE", worker_mode)
    try:
        started = time.monotonic()
        result = run(job(empty_to_save(8, 8), timeout=1.5))
        elapsed = time.monotonic() - started
    finally:
        proxy.stop()
    assert result["error"].startswith(f"ComfyUI at 127.0.0.1:{proxy.port} {needle}"), result
    assert result["error"].endswith(ending), result
    assert result["refresh_worker"] is True and elapsed < 5


def run_test_input(worker_env, body: dict | None, *args: str, cwd: Path = ROOT, **env_extra):
    """``python handler.py --test_input <body> *args`` (the SDK's one-job local test run) in ``cwd``; without a
    ``body``, the SDK reads ``cwd``'s test_input.json."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(worker_env.env(), COMFY_LOG_FILE=str(worker_env.log_path), **env_extra)
    given = ["--test_input", json.dumps(body)] if body is not None else []
    return subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), *given, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_test_input_runs_one_job_and_honours_runpod_log_level(worker_env):
    body = json.loads((ROOT / "test_input.json").read_text())
    quiet = run_test_input(worker_env, body)
    assert quiet.returncode == 0, quiet.stderr + quiet.stdout
    out = quiet.stdout + quiet.stderr
    (line,) = [line for line in out.splitlines() if "Job result:" in line]  # the worker's line, not the SDK's
    assert " handler: [local_test] Job result: {'images': [{" in line and "'type': 'base64'" in line, out
    assert "base64 characters>" in line and "iVBOR" not in line  # a PNG's data is shown by its length
    assert "Retrieved local job" not in out  # the SDK's DEBUG line
    # the one job's shared HTTP session is closed before the loop ends (else aiohttp complains at exit)
    assert "Exception ignored" not in out and "Unclosed" not in out and "Traceback" not in out, out
    loud = run_test_input(worker_env, body, RUNPOD_LOG_LEVEL="DEBUG")
    assert loud.returncode == 0 and "Retrieved local job" in loud.stdout + loud.stderr


def test_test_input_with_s3_shows_the_result_without_any_url_query_or_secret(worker_env, tmp_path):
    """The SDK prints the local run's result raw (signed links with their credentials in the query): the
    result is logged by the worker's redacting log instead, whichever way the run is started."""
    body = {"input": {"workflow": empty_to_save(16, 16, 0x123456, prefix="local_s3")}}
    (tmp_path / "test_input.json").write_text(json.dumps(body))
    with moto_s3_server("local-out") as store:
        bucket_env = store.env("local-out", BUCKET_PREFIX="runs/")
        runs = {
            "--test_input": run_test_input(worker_env, body, **bucket_env),
            "--rp_log_level INFO": run_test_input(worker_env, body, "--rp_log_level", "INFO", **bucket_env),
            "test_input.json": run_test_input(worker_env, None, cwd=tmp_path, **bucket_env),
        }
        keys = store.keys("local-out")
        failing = {"1": {"class_type": "WorkerTestFail", "inputs": {"message": f"denied for {store.secret}"}}}
        failed = run_test_input(worker_env, {"input": {"workflow": failing}}, **bucket_env)
    assert keys and all(key.startswith("runs/local_test/local_s3") for key in keys), keys  # one name, reused
    urls = {f"{store.endpoint}/local-out/{key}" for key in keys}
    for how, done in runs.items():
        out = done.stdout + done.stderr
        assert done.returncode == 0, (how, out)
        assert "Traceback" not in out and "Exception ignored" not in out, (how, out)
        assert "?X-Amz" not in out and "X-Amz-Signature" not in out and "X-Amz-Credential" not in out, (how, out)
        assert store.secret not in out and store.key_id not in out, (how, out)
        (line,) = [line for line in out.splitlines() if "Job result:" in line]
        assert "'type': 's3_url'" in line and any(f"'{url}?…'" in line for url in urls), (how, line)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1, out
    assert "failed with error: ComfyUI failed in node 1 (WorkerTestFail): RuntimeError: denied for ***" in out, out
    assert store.secret not in out


def test_comfy_job_timeout_is_honoured_through_the_environment(worker_env):
    failed = run_test_input(worker_env, {"input": {"workflow": slow_workflow(100, 0.05)}}, COMFY_JOB_TIMEOUT="1")
    assert failed.returncode == 1
    assert (
        "The job timed out after 1 s while ComfyUI was running node 3 (WorkerTestSteps)"
        in failed.stdout + failed.stderr
    )
    queue = worker_env.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
