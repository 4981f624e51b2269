"""Models named in a job (input ``models``, comfy_worker/job_models.py): a real tiny upscale model served from
loopback (listed in JOB_MODEL_HOSTS), loaded by name by a real workflow on the real ComfyUI (docs/api.md,
"Job models")."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import socket
import sys
import threading
import time
import uuid

import pytest
from filelock import FileLock
from PIL import Image
from support.aio import gather_jobs
from support.api_server import ApiServer
from support.hf_hub_cache import make_hf_cache
from support.models import UPSCALE_MODEL_NAME, make_upscale_model
from support.origins import FaultyOrigin, fake_huggingface

import handler
from comfy_worker import job_models, model_prune
from comfy_worker.config_schema import parse_config
from comfy_worker.job_errors import JobError
from comfy_worker.job_input import parse_job_input
from comfy_worker.lock_file import update_lock_file
from comfy_worker.model_use import Uses, in_use
from comfy_worker.settings import Settings

CLEAN_ENV = ("BUCKET_ENDPOINT_URL", "RUNPOD_ENDPOINT_ID", "RUNPOD_POD_ID", "REFRESH_WORKER", "JOB_MODELS_MAX_GB")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Four real upscale models (other random weights, the same size)."""
    folder = tmp_path_factory.mktemp("job-models")
    return [make_upscale_model(folder / f"m{seed}.safetensors", seed=seed) for seed in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def origin():
    """One model host for the module (each test serves its files under fresh names)."""
    with FaultyOrigin() as served:
        yield served


@pytest.fixture
def env(comfyui, origin, monkeypatch, tmp_path):
    """The handler pointed at the shared ComfyUI, a volume of its own, and ``origin`` as the one job model host;
    the model files the test's jobs put into upscale_models/ are removed afterwards."""
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in comfyui.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMFY_LOG_FILE", str(comfyui.log_path))
    monkeypatch.setenv("VOLUME_ROOT", str(tmp_path / "volume"))
    monkeypatch.setenv("JOB_MODEL_HOSTS", origin.netloc)
    folder = comfyui.path / "models" / "upscale_models"
    before = {p.name for p in folder.iterdir()}
    yield comfyui
    for path in folder.iterdir():
        if path.name not in before:
            path.unlink()


def serve(origin: FaultyOrigin, local, **route) -> tuple[str, str, str]:
    """Serve ``local`` under a fresh name; (url, file name, sha256)."""
    name = f"job-{uuid.uuid4().hex[:8]}.safetensors"
    origin.add(f"/m/{name}", file=local, **route)
    return f"{origin.url}/m/{name}", name, hashlib.sha256(local.read_bytes()).hexdigest()


def upscale_job(name: str, models: list[dict], color: int = 0x336699, job_id: str | None = None, **extra) -> dict:
    """EmptyImage 32x32 -> UpscaleModelLoader(name) -> ImageUpscaleWithModel -> SaveImage: 64x64 when it ran."""
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "job_models"}},
    }
    return {"id": job_id or f"job-{uuid.uuid4().hex[:6]}", "input": {"workflow": workflow, "models": models, **extra}}


def run(*jobs: dict) -> list[dict]:
    return gather_jobs(handler.handler, list(jobs))


def upscaled(result: dict) -> bool:
    assert "error" not in result, result
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["data"])))
    return image.size == (64, 64)


def state(tmp_path) -> dict:
    return json.loads((tmp_path / "volume" / ".job-models.json").read_text())["models"]


def downloads(tmp_path) -> dict:
    return json.loads((tmp_path / "volume" / ".job-models.json").read_text())["downloads"]


def gets(origin: FaultyOrigin, url: str) -> int:
    return len([s for s in origin.seen(url.removeprefix(origin.url)) if s.method == "GET"])


# --- the job runs with the model it names ----------------------------------------------------------


def test_a_job_runs_with_the_model_it_names_and_the_next_job_fetches_nothing(env, origin, model_files, tmp_path):
    url, name, sha = serve(origin, model_files[0])
    size = model_files[0].stat().st_size
    entry = {"url": url, "destination": "upscale_models", "sha256": sha}
    (first,) = run(upscale_job(name, [entry]))
    assert upscaled(first)
    assert first["models"] == [
        {"path": f"upscale_models/{name}", "status": "fetched", "bytes": size, "seconds": first["models"][0]["seconds"]}
    ]
    assert (env.path / "models" / "upscale_models" / name).read_bytes() == model_files[0].read_bytes()
    assert state(tmp_path)[f"upscale_models/{name}"]["sha256"] == sha
    requests_after_first = len(origin.seen(f"/m/{name}"))
    second, third = run(
        upscale_job(name, [entry], color=0x00FF00), upscale_job(name, [{"url": url, "destination": "upscale_models"}])
    )
    assert upscaled(second) and upscaled(third)
    assert second["models"][0]["status"] == third["models"][0]["status"] == "present"
    assert len(origin.seen(f"/m/{name}")) == requests_after_first  # nothing fetched again, not even a probe


def test_the_entry_is_checked_by_the_config_schema_with_its_messages(env):
    with pytest.raises(JobError) as err:
        parse_job_input(
            {"workflow": {"1": {"class_type": "X"}}, "models": [{"url": "https://hf.co/x", "destinaton": "loras"}]}
        )
    assert "models[0] (https://hf.co/x): unknown key 'destinaton'; did you mean 'destination'?" in err.value.message
    assert "field 'destination' is required" in err.value.message
    (result,) = run(upscale_job("x", [{"url": "https://huggingface.co/a/b/resolve/main/x.pt", "destination": "../up"}]))
    assert (
        "models[0] (https://huggingface.co/a/b/resolve/main/x.pt): destination: must not contain '..'"
        in result["error"]
    )
    (result,) = run(upscale_job("x", [{"url": "https://hf.co/a", "destination": "loras", "optional": True}]))
    assert result["error"].startswith("models[0]: unknown key 'optional'")


def test_job_models_off_when_the_bound_is_zero(env, origin, model_files, monkeypatch):
    monkeypatch.setenv("JOB_MODELS_MAX_GB", "0")
    url, name, _ = serve(origin, model_files[0])
    (result,) = run(upscale_job(name, [{"url": url, "destination": "upscale_models"}]))
    assert "JOB_MODELS_MAX_GB=0" in result["error"] and origin.seen(f"/m/{name}") == []


# --- verified; a clash is never replaced -----------------------------------------------------------


def test_a_wrong_sha256_fails_that_job_only_and_leaves_no_file(env, origin, model_files):
    url, name, _ = serve(origin, model_files[0])
    wrong = "0" * 64
    bad, good = run(
        upscale_job(name, [{"url": url, "destination": "upscale_models", "sha256": wrong}]),
        upscale_job(UPSCALE_MODEL_NAME, []),
    )
    assert upscaled(good)
    assert bad["error"].startswith(f"models[0] ({url}): sha256 mismatch: the downloaded file's sha256 is ")
    assert wrong in bad["error"] and bad["details"]["model"] == 0
    assert not [p for p in (env.path / "models" / "upscale_models").iterdir() if p.name.startswith(name)]


def test_a_file_of_the_same_name_with_other_bytes_is_never_replaced(env, origin, model_files):
    config_model = env.path / "models" / "upscale_models" / UPSCALE_MODEL_NAME
    before = config_model.read_bytes()
    url, served_name, sha = serve(origin, model_files[0])
    for entry in (
        {"url": url, "destination": "upscale_models", "filename": UPSCALE_MODEL_NAME, "sha256": sha},
        {"url": url, "destination": "upscale_models", "filename": UPSCALE_MODEL_NAME},
    ):
        (result,) = run(upscale_job(UPSCALE_MODEL_NAME, [entry]))
        assert f"models/upscale_models/{UPSCALE_MODEL_NAME} is already on the volume" in result["error"]
        assert "a job never replaces a file" in result["error"]
        assert result["details"]["path"] == f"upscale_models/{UPSCALE_MODEL_NAME}"
    assert config_model.read_bytes() == before and origin.seen(f"/m/{served_name}") == []
    same = hashlib.sha256(before).hexdigest()  # the same bytes: used as they are
    (ok,) = run(upscale_job(UPSCALE_MODEL_NAME, [{**entry, "sha256": same}]))
    assert upscaled(ok) and ok["models"][0]["status"] == "present"


# --- where a job may fetch from --------------------------------------------------------------------


def test_an_unlisted_host_and_a_link_local_address_are_refused_with_no_request_sent(env, origin, model_files):
    with FaultyOrigin() as other:
        url, name, _ = serve(other, model_files[0])
        (unlisted,) = run(upscale_job(name, [{"url": url, "destination": "upscale_models"}]))
        assert f"models[0] ({url}) is refused: 127.0.0.1:{other.port} is a loopback address" in unlisted["error"]
        assert f"add 127.0.0.1:{other.port} to JOB_MODEL_HOSTS" in unlisted["error"]
        assert unlisted["details"]["setting"] == "JOB_MODEL_HOSTS"
        origin.add("/hop", redirect=url)  # a listed host that redirects to an unlisted one
        (hop,) = run(
            upscale_job(name, [{"url": f"{origin.url}/hop", "destination": "upscale_models", "filename": name}])
        )
        assert f"(it leads to {url}) is refused" in hop["error"] and "JOB_MODEL_HOSTS" in hop["error"]
        assert other.seen() == []
    metadata = "http://169.254.169.254/latest/m.safetensors"
    (link_local,) = run(upscale_job("m.safetensors", [{"url": metadata, "destination": "upscale_models"}]))
    assert (
        "169.254.169.254:80 is a link-local address" in link_local["error"] and "JOB_MODEL_HOSTS" in link_local["error"]
    )
    origin.add("/to-metadata", redirect=metadata)
    started = time.monotonic()
    (hop,) = run(
        upscale_job(
            "m.safetensors",
            [{"url": f"{origin.url}/to-metadata", "destination": "upscale_models", "filename": "m.safetensors"}],
        )
    )
    assert "(it leads to http://169.254.169.254/latest/m.safetensors) is refused" in hop["error"]
    assert "link-local" in hop["error"] and time.monotonic() - started < 5  # refused, not a connect timeout


def prepare_models(models: list[dict], timeout: float = 60) -> list[dict]:
    """job_models.prepare for ``models`` with the environment's settings, outside a handler (fast)."""
    settings = Settings.from_env()
    uses = Uses(settings.models_dir)
    entries = parse_job_input(upscale_job("x", models)["input"]).models
    try:
        return asyncio.run(job_models.prepare(entries, settings, uses, time.monotonic() + timeout, timeout))
    finally:
        uses.release()


def test_a_hop_whose_host_the_http_client_reads_otherwise_is_refused_with_no_request_sent(env, origin, model_files):
    with FaultyOrigin() as other:
        url, name, _ = serve(other, model_files[0])
        # urlsplit reads the listed origin after the '@'; requests would connect to ``other`` before the '\'
        tricky = f"http://{other.netloc}\\@{origin.netloc}/m/{name}"
        with pytest.raises(JobError, match=r"models\[0\] .*: url: must not contain credentials"):
            parse_job_input(upscale_job(name, [{"url": tricky, "destination": "upscale_models"}])["input"])
        origin.add("/bent-hop", redirect=tricky)
        with pytest.raises(JobError) as err:
            prepare_models([{"url": f"{origin.url}/bent-hop", "destination": "upscale_models", "filename": name}])
        assert f"the HTTP client would connect to {other.netloc}, not {origin.netloc}" in err.value.message
        assert "JOB_MODEL_HOSTS" in err.value.message and other.seen() == []


def test_a_listed_name_that_resolves_anew_to_loopback_is_refused_once_connected(env, origin, monkeypatch):
    """DNS rebinding: the policy's lookup answers a public address, the connection's own lookup loopback."""
    monkeypatch.setenv("JOB_MODEL_HOSTS", "*.rebind.test")
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        if host != "files.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        checking = sys._getframe(1).f_globals["__name__"] == "comfy_worker.job_models"  # else: connecting
        lookups.append("check" if checking else "connect")
        address = "93.184.216.34" if checking else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://files.rebind.test:{origin.port}/m/rebind.safetensors"
    with pytest.raises(JobError) as err:
        prepare_models([{"url": url, "destination": "upscale_models", "filename": "rebind.safetensors"}])
    assert "files.rebind.test resolved to 127.0.0.1, a loopback address, when connected" in err.value.message
    assert "JOB_MODEL_HOSTS" in err.value.message and "check" in lookups and "connect" in lookups
    assert origin.seen("/m/rebind.safetensors") == []


def test_a_token_is_never_sent_over_plain_http_to_its_hosts_https_port(env, origin, model_files, monkeypatch):
    """HF_TOKEN belongs to https://<HF_ENDPOINT>; a job naming http:// on that host and port gets no token."""
    monkeypatch.setenv("HF_ENDPOINT", f"https://{origin.netloc}")
    monkeypatch.setenv("HF_TOKEN", "hf_job_models_secret")
    url, name, sha = serve(origin, model_files[0])
    (report,) = prepare_models([{"url": url, "destination": "upscale_models", "sha256": sha}])
    assert report["status"] == "fetched"
    seen = origin.seen(f"/m/{name}")
    assert seen and all("authorization" not in s.headers for s in seen)


def test_the_default_hosts_are_hugging_face_and_civitai_with_their_download_hosts():
    policy = job_models.HostPolicy(None)
    for url in (
        "https://huggingface.co/org/repo/resolve/main/x.safetensors",
        "https://cas-bridge.xethub.hf.co/xet-bridge-us/abc",
        "https://cdn-lfs-us-1.hf.co/repos/ab/cd",
        "https://civitai.com/api/download/models/1",
        "https://civitai-delivery-worker-prod.5ac0637cfd0766c97916cefa3764fbdf.r2.cloudflarestorage.com/model/x",
    ):
        assert policy.problem(url) in (None,) or "resolves" not in policy.problem(url), url
        assert "not in JOB_MODEL_HOSTS" not in (policy.problem(url) or ""), url
    assert policy.problem("https://example.com/x") == "example.com:443 is not in JOB_MODEL_HOSTS"
    assert policy.problem("http://10.0.0.5/x") == "10.0.0.5:80 is a private address"
    assert policy.problem("http://x.localhost/x") == "x.localhost:80 is a loopback address"
    listed = job_models.HostPolicy(("default", "10.0.0.5:9000", "*.example.com"))
    assert listed.problem("http://10.0.0.5:9000/x") is None  # listed exactly: a private address is fine
    assert listed.problem("http://10.0.0.5:9001/x") == "10.0.0.5:9001 is a private address"
    assert listed.problem("https://cdn-lfs.hf.co/x") is None or "resolves" in listed.problem("https://cdn-lfs.hf.co/x")
    defaults = Settings.from_env({})
    assert defaults.job_model_hosts is None and defaults.job_models_max_gb == 50
    assert Settings.from_env({"JOB_MODEL_HOSTS": " a.com , *.b.com:8443 "}).job_model_hosts == ("a.com", "*.b.com:8443")
    with pytest.raises(ValueError, match="JOB_MODEL_HOSTS"):
        Settings.from_env({"JOB_MODEL_HOSTS": "host:port"})


def test_every_spelling_of_a_non_public_address_and_every_look_alike_host_is_refused():
    policy = job_models.HostPolicy(None)
    for url, problem in (
        ("http://2130706433/", "2130706433:80 is a loopback address"),
        ("http://0x7f000001/", "0x7f000001:80 is a loopback address"),
        ("http://127.1/", "127.1:80 is a loopback address"),
        ("http://127.0.0.1./", "127.0.0.1:80 is a loopback address"),
        ("http://0.0.0.0/", "0.0.0.0:80 is an unspecified address"),
        ("http://[::ffff:127.0.0.1]/", "[::ffff:127.0.0.1]:80 is a loopback address"),
        ("http://[::ffff:169.254.169.254]/", "[::ffff:169.254.169.254]:80 is a link-local address"),
        ("http://[fd00::1]:8080/", "[fd00::1]:8080 is a private address"),
        ("http://100.64.0.1/", "100.64.0.1:80 is not globally routable"),
        ("https://HuggingFace.CO@127.0.0.1/x", "127.0.0.1:443 is a loopback address"),
        ("https://evilhuggingface.co/x", "evilhuggingface.co:443 is not in JOB_MODEL_HOSTS"),
        ("https://huggingface.co.evil.com/x", "huggingface.co.evil.com:443 is not in JOB_MODEL_HOSTS"),
        (
            "http://127.0.0.1:1\\@huggingface.co/x",
            "the HTTP client would connect to 127.0.0.1:1, not huggingface.co:80",
        ),
    ):
        assert problem in (policy.problem(url) or ""), url


def test_hugging_face_entries_resolve_through_the_hub_and_cached_models_are_linked(
    env, origin, model_files, monkeypatch, tmp_path
):
    with FaultyOrigin() as cdn:
        name = f"hf-{uuid.uuid4().hex[:8]}.safetensors"
        fake_huggingface(origin, cdn, "org/upscalers", {name: model_files[1]})
        monkeypatch.setenv("HF_ENDPOINT", origin.url)
        url = f"https://huggingface.co/org/upscalers/resolve/main/{name}"
        (refused,) = run(upscale_job(name, [{"url": url, "destination": "upscale_models"}]))
        assert f"(it leads to http://127.0.0.1:{cdn.port}/repos/" in refused["error"]  # the CDN is not listed
        assert "Signature" not in refused["error"] and cdn.seen() == []  # no signed query shown, no request sent
        monkeypatch.setenv("JOB_MODEL_HOSTS", f"{origin.netloc},{cdn.netloc}")
        (result,) = run(upscale_job(name, [{"url": url, "destination": "upscale_models"}]))
        assert upscaled(result) and result["models"][0]["status"] == "fetched"  # verified by the hub's sha256
        assert len(cdn.seen()) >= 1

    cache = tmp_path / "hub"
    cached = f"cached-{uuid.uuid4().hex[:8]}.safetensors"
    make_hf_cache(cache, "org/cached", cached, model_files[2].read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    entry = {"url": f"https://huggingface.co/org/cached/resolve/main/{cached}", "destination": "upscale_models"}
    seen = len(origin.seen())
    (linked,) = run(upscale_job(cached, [entry]))
    assert upscaled(linked) and linked["models"][0]["status"] == "linked from cache"
    assert (env.path / "models" / "upscale_models" / cached).is_symlink() and len(origin.seen()) == seen


def test_a_model_linked_from_the_cache_is_not_hashed_again_by_the_next_job(
    env, origin, model_files, monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_ENDPOINT", origin.url)  # the hub a Hugging Face entry is checked against
    cache, data = tmp_path / "hub", model_files[3].read_bytes()
    cached = f"cached-{uuid.uuid4().hex[:8]}.safetensors"
    make_hf_cache(cache, "org/cached", cached, data)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    entry = {
        "url": f"https://huggingface.co/org/cached/resolve/main/{cached}",
        "destination": "upscale_models",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    hashed = []
    real_sha256_of = job_models.hf_cache.sha256_of
    monkeypatch.setattr(job_models.hf_cache, "sha256_of", lambda path: hashed.append(path) or real_sha256_of(path))
    assert prepare_models([entry])[0]["status"] == "linked from cache" and len(hashed) == 1  # checked once, linking
    assert prepare_models([entry])[0]["status"] == "present" and len(hashed) == 1  # its blob's name is its sha256


# --- shared: fetched once --------------------------------------------------------------------------


def test_two_concurrent_jobs_fetch_one_new_file_once(env, origin, model_files):
    size = model_files[1].stat().st_size
    url, name, sha = serve(origin, model_files[1])
    entry = {"url": url, "destination": "upscale_models", "sha256": sha}
    first, second = run(upscale_job(name, [entry], color=1), upscale_job(name, [entry], color=2))
    assert upscaled(first) and upscaled(second)
    assert sorted(r["models"][0]["status"] for r in (first, second)) == ["fetched", "present"]
    transfers = [s for s in origin.seen(f"/m/{name}") if s.method == "GET" and s.headers.get("range") != "bytes=0-0"]
    assert len(transfers) == 1 and transfers[0].sent == size  # each job may probe for the name (1 byte)


def test_the_download_time_counts_against_the_timeout(env, origin, model_files):
    url, name, _ = serve(origin, model_files[2], pause_after=100)  # goes silent after 100 bytes
    started = time.monotonic()
    (result,) = run(upscale_job(name, [{"url": url, "destination": "upscale_models"}], timeout=1))
    assert result["error"].startswith("The job timed out after 1 s while its models were fetched")
    assert result["details"]["state"] == "models" and time.monotonic() - started < 5
    folder = env.path / "models" / "upscale_models"
    assert not (folder / name).exists() and (folder / f"{name}.part").stat().st_size >= 100  # kept to resume


def test_progress_updates_go_out_while_a_model_downloads(env, origin, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * (2 << 20))
    url, name, _ = serve(origin, big, rate=2 << 20)  # about 1 s
    events: list[dict] = []
    settings = Settings.from_env()
    uses = Uses(settings.models_dir)
    entries = parse_job_input(upscale_job(name, [{"url": url, "destination": "upscale_models"}])["input"]).models

    async def prepare():
        return await job_models.prepare(entries, settings, uses, time.monotonic() + 60, 60, events.append)

    try:
        (report,) = asyncio.run(prepare())
    finally:
        uses.release()
    assert report["status"] == "fetched" and report["bytes"] == 2 << 20
    assert all(e["stage"] == "models" and e["model"] == f"upscale_models/{name}" for e in events)
    assert len(events) >= 2 and events[0]["bytes"] < 2 << 20 and events[-1]["bytes"] == 2 << 20


# --- bounded on disk -------------------------------------------------------------------------------


def test_past_the_bound_the_least_recently_used_job_model_goes_and_config_models_stay(
    env, origin, model_files, monkeypatch, tmp_path
):
    size = model_files[0].stat().st_size
    served = [serve(origin, f) for f in model_files]
    entries = [{"url": url, "destination": "upscale_models", "sha256": sha} for url, _, sha in served]
    (a, b, c, d) = (name for _, name, _ in served)
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(2.5 * size / 1e9))
    for name, entry in ((a, entries[0]), (b, entries[1]), (a, entries[0]), (c, entries[2])):
        (result,) = run(upscale_job(name, [entry]))
        assert upscaled(result)
    assert not (folder / b).exists()  # the least recently used: a was used again after b
    assert (
        (folder / a).is_file()
        and (folder / c).is_file()
        and set(state(tmp_path)) == {f"upscale_models/{n}" for n in (a, c)}
    )

    # a becomes a config model (download_models.py records it in comfy.lock.yml): never deleted by a job
    update_lock_file(
        tmp_path / "volume" / "comfy.lock.yml",
        "models",
        [{"url": served[0][0], "destination": "upscale_models", "filename": a, "sha256": served[0][2], "size": size}],
    )
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(1.5 * size / 1e9))
    running = Uses(folder.parent)
    running.hold(f"upscale_models/{c}", threading.Event())  # a running job uses c
    try:
        (refused,) = run(upscale_job(d, [entries[3]]))
        assert "in use by running jobs" in refused["error"] and "JOB_MODELS_MAX_GB" in refused["error"]
        assert (folder / c).is_file() and not (folder / d).exists()
    finally:
        running.release()
    (result,) = run(upscale_job(d, [entries[3]]))
    assert upscaled(result)
    assert (folder / a).is_file() and (folder / d).is_file() and not (folder / c).exists()
    assert (folder / UPSCALE_MODEL_NAME).is_file()


def test_a_server_that_sends_no_length_is_cut_off_at_the_bound_or_at_the_entrys_size(
    env, origin, monkeypatch, tmp_path
):
    endless = tmp_path / "endless.bin"
    endless.write_bytes(b"\x02" * (4 << 20))
    url, name, _ = serve(origin, endless, no_length=True, ignore_range=True)  # its size is never told
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str((512 << 10) / 1e9))
    with pytest.raises(JobError) as err:
        prepare_models([{"url": url, "destination": "upscale_models", "filename": name}])
    assert f"the server sent more than the {512 << 10} bytes the job models may take" in err.value.message
    assert "JOB_MODELS_MAX_GB" in err.value.message
    assert not [p for p in folder.iterdir() if p.name.startswith(name)]  # not the file, not a part
    monkeypatch.setenv("JOB_MODELS_MAX_GB", "1")
    with pytest.raises(JobError) as err:
        prepare_models([{"url": url, "destination": "upscale_models", "filename": name, "size": 1000}])
    assert "the server sent more than the entry's size of 1000 bytes; nothing was kept" in err.value.message
    assert not [p for p in folder.iterdir() if p.name.startswith(name)]


def cut_download(origin: FaultyOrigin, local, folder) -> tuple[str, str, str]:
    """A job model download cut by the job's timeout (the server goes silent after 3/4 of the file): its
    part is left, recorded in the state file; (url, file name, sha256)."""
    url, name, sha = serve(origin, local, pause_after=local.stat().st_size * 3 // 4)
    with pytest.raises(JobError) as err:
        prepare_models([{"url": url, "destination": "upscale_models", "sha256": sha}], timeout=1)
    assert err.value.message.startswith("The job timed out after 1 s while its models were fetched")
    assert (folder / f"{name}.part").stat().st_size == local.stat().st_size * 3 // 4
    assert (folder / f"{name}.part.source").is_file() and not (folder / name).exists()
    return url, name, sha


def test_a_part_left_by_a_cut_download_counts_in_the_bound_and_is_deleted_before_any_job_model(
    env, origin, model_files, monkeypatch, tmp_path
):
    size = model_files[0].stat().st_size
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(2.5 * size / 1e9))
    (url_b, b, sha_b), (url_c, c, sha_c) = serve(origin, model_files[1]), serve(origin, model_files[2])
    prepare_models([{"url": url_b, "destination": "upscale_models", "sha256": sha_b}])
    url_a, a, _ = cut_download(origin, model_files[0], folder)
    record = downloads(tmp_path)[f"upscale_models/{a}"]
    assert record["url"] == url_a and record["size"] == size and record["touched"] >= record["started"] > 0
    # b, the part (3/4) and c would pass 2.5 files: the abandoned part goes (with its records), b stays
    (report,) = prepare_models([{"url": url_c, "destination": "upscale_models", "sha256": sha_c}])
    assert report["status"] == "fetched"
    assert not [p for p in folder.iterdir() if p.name.startswith(a)]
    assert (folder / b).is_file() and (folder / c).is_file()
    assert set(state(tmp_path)) == {f"upscale_models/{b}", f"upscale_models/{c}"} and downloads(tmp_path) == {}


def test_a_running_download_is_never_deleted_and_counts_at_its_full_size(
    env, origin, model_files, monkeypatch, tmp_path
):
    """A download another job (or worker) is running counts in the bound at the size the file will have,
    not at what its part holds so far: two downloads started together cannot both take the room left."""
    size = model_files[0].stat().st_size
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(1.5 * size / 1e9))
    _, a, _ = cut_download(origin, model_files[0], folder)
    url_b, b, sha_b = serve(origin, model_files[1])
    entry_b = {"url": url_b, "destination": "upscale_models", "sha256": sha_b}
    downloading = FileLock(str(folder.parent / ".locks" / "upscale_models" / f"{a}.lock"))
    downloading.acquire()  # another job downloads a now (its target lock)
    try:
        with pytest.raises(JobError) as err:
            prepare_models([entry_b])
    finally:
        downloading.release()
    # a (the whole file once done) and b would pass 1.5 files: b waits, a's part is left alone
    assert "in use by running jobs; retry later" in err.value.message
    assert err.value.details["used_bytes"] == size
    assert not (folder / b).exists()
    assert (folder / f"{a}.part").stat().st_size == size * 3 // 4 and (folder / f"{a}.part.source").is_file()
    assert set(downloads(tmp_path)) == {f"upscale_models/{a}"}
    (report,) = prepare_models([entry_b])  # nobody downloads a any more: its part is abandoned, and goes
    assert report["status"] == "fetched" and (folder / b).is_file()
    assert not (folder / f"{a}.part").exists() and downloads(tmp_path) == {}


def test_of_two_downloads_started_together_only_the_later_one_is_refused(
    env, origin, model_files, monkeypatch, tmp_path
):
    """Each counts only the downloads running since before it: the two never refuse each other."""
    size = model_files[0].stat().st_size
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(1.5 * size / 1e9))
    url_b, b, sha_b = serve(origin, model_files[1])
    state_file = tmp_path / "volume" / ".job-models.json"
    later = {"url": "https://example.com/a.bin", "size": size, "started": time.time() + 3600, "touched": time.time()}
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"version": 1, "models": {}, "downloads": {"upscale_models/a.bin": later}}))
    downloading = FileLock(str(folder.parent / ".locks" / "upscale_models" / "a.bin.lock"))
    downloading.acquire()  # a started after b: it is the one to make room, b goes on
    try:
        (report,) = prepare_models([{"url": url_b, "destination": "upscale_models", "sha256": sha_b}])
    finally:
        downloading.release()
    assert report["status"] == "fetched" and (folder / b).is_file()


def test_a_part_of_the_same_url_is_resumed_not_deleted_when_there_is_room(
    env, origin, model_files, monkeypatch, tmp_path
):
    size = model_files[0].stat().st_size
    folder = env.path / "models" / "upscale_models"
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(2.2 * size / 1e9))
    url_b, b, sha_b = serve(origin, model_files[1])
    prepare_models([{"url": url_b, "destination": "upscale_models", "sha256": sha_b}])
    url_a, a, sha_a = cut_download(origin, model_files[0], folder)
    origin.routes[f"/m/{a}"].pause_after = None  # the server answers in full now
    (report,) = prepare_models([{"url": url_a, "destination": "upscale_models", "sha256": sha_a}])
    assert report["status"] == "fetched" and (folder / a).read_bytes() == model_files[0].read_bytes()
    last = [s for s in origin.seen(f"/m/{a}") if s.method == "GET"][-1]
    assert last.headers.get("range") == f"bytes={size * 3 // 4}-" and last.sent == size - size * 3 // 4
    assert (folder / b).is_file() and downloads(tmp_path) == {}  # its own part is not counted against it


def test_no_job_model_is_deleted_while_comfy_lock_yml_is_damaged(env, origin, model_files, monkeypatch, tmp_path):
    """A damaged comfy.lock.yml may have lost the record of a config model a job fetched first: keep them all."""
    size = model_files[0].stat().st_size
    (url_a, a, sha_a), (url_b, b, sha_b) = serve(origin, model_files[0]), serve(origin, model_files[1])
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(1.5 * size / 1e9))
    prepare_models([{"url": url_a, "destination": "upscale_models", "sha256": sha_a}])
    (tmp_path / "volume" / "comfy.lock.yml").write_text("models: [{destination: upscale_models, filename: \n")
    with pytest.raises(JobError) as err:
        prepare_models([{"url": url_b, "destination": "upscale_models", "sha256": sha_b}])
    assert "no job model is deleted to make room while" in err.value.message and "comfy.lock.yml" in err.value.message
    folder = env.path / "models" / "upscale_models"
    assert (folder / a).is_file() and not (folder / b).exists()
    assert set(state(tmp_path)) == {f"upscale_models/{a}"}


def test_a_state_file_with_damaged_values_is_survived(env, origin, model_files, monkeypatch, tmp_path):
    size = model_files[0].stat().st_size
    (url_a, a, sha_a), (url_b, b, sha_b) = serve(origin, model_files[0]), serve(origin, model_files[1])
    monkeypatch.setenv("JOB_MODELS_MAX_GB", str(1.5 * size / 1e9))
    prepare_models([{"url": url_a, "destination": "upscale_models", "sha256": sha_a}])
    path = tmp_path / "volume" / ".job-models.json"
    damaged = json.loads(path.read_text())
    damaged["models"][f"upscale_models/{a}"].update(size="big", last_used="yesterday")
    path.write_text(json.dumps(damaged))
    (report,) = prepare_models([{"url": url_b, "destination": "upscale_models", "sha256": sha_b}])
    assert report["status"] == "fetched" and set(state(tmp_path)) == {f"upscale_models/{a}", f"upscale_models/{b}"}
    path.write_text("{not json")  # unreadable: read as empty, rewritten by the next job model
    (url_c, c, sha_c) = serve(origin, model_files[2])
    assert prepare_models([{"url": url_c, "destination": "upscale_models", "sha256": sha_c}])[0]["status"] == "fetched"
    assert set(state(tmp_path)) == {f"upscale_models/{c}"}


def test_prune_never_removes_a_model_a_running_job_uses(env, tmp_path, caplog):
    settings = Settings.from_env()
    folder = settings.models_dir / "upscale_models"
    name = f"job-{uuid.uuid4().hex[:8]}.safetensors"
    (folder / name).write_bytes(b"weights")
    update_lock_file(
        settings.lock_file, "models", [{"url": "https://hf.co/x", "destination": "upscale_models", "filename": name}]
    )
    uses = Uses(settings.models_dir)
    uses.hold(f"upscale_models/{name}", threading.Event())
    try:
        with caplog.at_level(logging.INFO):
            model_prune.report_or_prune(settings, parse_config({}), prune=True)
        assert (folder / name).is_file() and "in use by a running job" in caplog.text
    finally:
        uses.release()
    assert not in_use(settings.models_dir, f"upscale_models/{name}")
    model_prune.report_or_prune(settings, parse_config({}), prune=True)
    assert not (folder / name).exists()


# --- the pod API -----------------------------------------------------------------------------------


def test_the_same_input_through_the_pod_api(env, origin, model_files, tmp_path):
    url, name, sha = serve(origin, model_files[3])
    server = ApiServer(
        env, tmp_path / "volume", tmp_path / "api.log", token=None, API_AUTH="none", JOB_MODEL_HOSTS=origin.netloc
    )
    server.start()
    try:
        job = upscale_job(name, [{"url": url, "destination": "upscale_models", "sha256": sha}])
        answer = server.post("/runsync", {"input": job["input"]}).json()
        assert answer["status"] == "COMPLETED", answer
        assert upscaled(answer["output"]) and answer["output"]["models"][0]["status"] == "fetched"
        bad = server.post(
            "/runsync", {"input": {**job["input"], "models": [{"url": url, "destination": "x", "sha": sha}]}}
        ).json()
        assert "unknown key 'sha'; did you mean 'sha256'?" in json.dumps(bad)
    finally:
        server.proc.terminate()
        server.proc.wait(30)
