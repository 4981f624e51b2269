"""The real image, built from the repo's Dockerfile and run under podman (tests/support/container.py):
a job through the local API of a container provisioning an empty volume, a second container on the
same volume that skips provisioning, ``podman stop`` within 10 s, nothing but the app in the image,
and bake mode (provisioned at build time with tokens as build secrets, which no layer keeps)."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request

import pytest
import yaml
from support import container
from support.comfy_process import free_port, require_upstream
from support.models import UPSCALE_MODEL_NAME
from support.origins import FaultyOrigin, NginxOrigin, fake_huggingface, random_file
from support.start_env import NODE_INIT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(container.unavailable() is not None, reason=f"podman unavailable: {container.unavailable()}"),
]

IMAGE = "localhost/comfy-worker-test:latest"
BAKED = "localhost/comfy-worker-test:baked"
NODE_MOUNT = "/git/ContainerNode.git"
UPSTREAM_MOUNT = "/upstream"
HF_TOKEN = "hf_container_secret_7c1e9a"
CIVITAI_TOKEN = "civitai_container_secret_52bd04"
JUPYTER_SECRET = "jupyter-container-secret-31"
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
    "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALE_MODEL_NAME}},
    "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
    "4": {"class_type": "StartTestPassImage", "inputs": {"image": ["3", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "container_test"}},
}
TIMINGS = container.CACHE / "last-timings.json"


def record(name: str, seconds: float) -> None:
    """Timings for the closing note of a run (kept in .cache/container/last-timings.json)."""
    data = json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}
    data[name] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(data, indent=1))
    print(f"[container] {name}: {seconds:.1f} s")


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def wait_ready(box: container.Container, env: dict[str, str], timeout: float = 600) -> float:
    """Until ComfyUI and the local API answer; seconds since ``podman run``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            status(f"http://127.0.0.1:{env['API_PORT']}/ping") == 200
            and status(f"http://127.0.0.1:{env['COMFY_PORT']}/system_stats") == 200
        ):
            return time.monotonic() - box.started
        if not box.running():
            raise AssertionError(f"the container exited ({box.exit_code()}):\n{box.logs()[-8000:]}")
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout} s:\n{box.logs()[-8000:]}")


def wait_until(check, timeout: float, what: str, box: container.Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{box.logs()[-6000:]}")


def run_job(env: dict[str, str]) -> None:
    """A job through the worker's API; the output is the 64x64 PNG the upscale model made."""
    from PIL import Image

    body = json.dumps({"input": {"workflow": WORKFLOW, "timeout": 120}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{env['API_PORT']}/runsync", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=180) as r:
        answer = json.load(r)
    assert answer["status"] == "COMPLETED", answer
    out = answer["output"]
    assert out["errors"] == [] and len(out["images"]) == 1, out
    image = out["images"][0]
    assert image["type"] == "base64" and image["content_type"] == "image/png"
    png = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert png.format == "PNG" and png.size == (64, 64)


def ports() -> dict[str, str]:
    return {"COMFY_PORT": str(free_port()), "API_PORT": str(free_port()), "JUPYTER_PORT": str(free_port())}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image as users build it, but on the debootstrap base and with the tests' torch."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    seconds = container.build(
        IMAGE, log, {"COMFYUI_REPO": f"file://{UPSTREAM_MOUNT}"}, {require_upstream(): UPSTREAM_MOUNT}
    )
    record("build", seconds)
    return IMAGE


@pytest.fixture
def node_repo(git_repos):
    repo = git_repos.create("ContainerNode", {"__init__.py": NODE_INIT})
    repo.tag("v1.0.0")
    return repo.push()


def test_image_holds_only_the_app_and_its_environment(image):
    listing = container.podman(
        "run", "--rm", "--network", "host", "--entrypoint", "/bin/bash", image, "-c",
        "ls -A /app; python -c 'import torch, comfy_worker.settings; print(torch.__version__)'; "
        "cat /opt/venv/torch-constraints.txt; tini --version; test -e \"$LD_PRELOAD\" && echo tcmalloc",
    ).stdout.split()  # fmt: skip
    for absent in ("tests", ".venv", ".cache", "workspace", ".git", "bench"):
        assert absent not in listing, listing
    for present in ("start.sh", "handler.py", "config.yml", "comfy_worker", "Dockerfile"):
        assert present in listing, listing
    assert "torch==2.11.0" in listing and "tcmalloc" in listing
    inspect = json.loads(container.podman("image", "inspect", image).stdout)[0]
    assert inspect["Config"]["Entrypoint"] == ["/usr/bin/tini", "-g", "--", "/app/start.sh"]
    assert inspect["Healthcheck"]["Test"] == ["CMD", "/opt/venv/bin/python", "/app/scripts/healthcheck.py"]
    # on a base without CUDA (issue 25) the NVIDIA container runtime still gives the GPUs and the driver
    assert {"NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"} <= set(inspect["Config"]["Env"])


def test_the_images_python_code_is_byte_compiled(image):
    """A new container imports torch, the worker's package and the handler from the .pyc files the build
    wrote (valid for the sources, so none is written again): no cold start compiles them (issue 25)."""
    script = (
        "touch /tmp/t0 && python -c 'import torch, torchvision, aiohttp, runpod, comfy_worker.api, handler' && "
        "echo new: && find /opt/venv /app -name '*.pyc' -newer /tmp/t0 | head -5 && "
        "echo app: && ls /app/comfy_worker/__pycache__ | grep -c 'http_download.*pyc'"
    )
    out = container.podman("run", "--rm", "--network", "host", "--entrypoint", "/bin/bash", image, "-c", script).stdout
    assert out.split("new:")[1].split("app:")[0].split() == [], out
    assert out.split("app:")[1].split() == ["1"], out


def test_container_serves_a_job_then_a_second_one_on_the_same_volume_skips_provisioning(
    image, tmp_path, node_repo, upscale_model_file
):
    files = tmp_path / "origin"
    files.mkdir()
    (files / UPSCALE_MODEL_NAME).write_bytes(upscale_model_file.read_bytes())
    volume = tmp_path / "volume"
    volume.mkdir()
    mounts = {volume: "/runpod-volume", require_upstream(): f"{UPSTREAM_MOUNT}:ro", node_repo.bare: f"{NODE_MOUNT}:ro"}
    with NginxOrigin(files, tmp_path / "nginx") as origin:
        cfg = {
            "models": [{"url": f"{origin.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}],
            "nodes": [{"url": f"file://{NODE_MOUNT}", "version": "v1.0.0"}],
        }
        env = {
            "CONFIG_YML": base64.urlsafe_b64encode(yaml.safe_dump(cfg).encode()).decode(),
            "COMFYUI_REPO": f"file://{UPSTREAM_MOUNT}",
            "MODE": "local",
            "ALLOW_CPU": "1",
            "JUPYTER_PASSWORD": JUPYTER_SECRET,
            **ports(),
        }
        with container.Container(image, f"comfy-worker-test-first-{os.getpid()}", env, mounts) as first:
            record("boot (empty volume: provisioning)", wait_ready(first, env))
            run_job(env)
            jupyter = f"http://127.0.0.1:{env['JUPYTER_PORT']}/api/status"
            wait_until(lambda: status(f"{jupyter}?token={JUPYTER_SECRET}") == 200, 120, "JupyterLab", first)
            assert status(f"{jupyter}?token=wrong") == 403
            assert container.podman("healthcheck", "run", first.name, check=False).returncode == 0, first.logs()
            logs = first.logs()
            assert "gate written" in logs and "requirements present" in logs, logs  # preinstalled in the image
            assert first.stop() < 10
            assert first.exit_code() != 137, "podman had to SIGKILL it"
        assert (volume / "ComfyUI" / "models" / "upscale_models" / UPSCALE_MODEL_NAME).is_file()
        assert (volume / ".config-sha256").is_file()

    # the origin is gone: a second container on the same volume must not need it
    env.update(ports())
    with container.Container(image, f"comfy-worker-test-second-{os.getpid()}", env, mounts) as second:
        record("boot (provisioned volume)", wait_ready(second, env))
        logs = second.logs()
        assert "gate matches (.config-sha256): nothing to do" in logs, logs
        assert "summary: ComfyUI kept; models: 1 kept; nodes: 1 kept" in logs, logs
        run_job(env)
        seconds = second.stop()
        record("podman stop", seconds)
        assert seconds < 10 and second.exit_code() != 137, second.logs()[-4000:]
    assert JUPYTER_SECRET not in logs


def test_bake_mode_carries_models_and_nodes_and_no_secret(image, tmp_path, node_repo, upscale_model_file):
    """BAKE=1 provisions at build time (the model from a Hugging Face stand-in that checks the token
    sent as a build secret); the image then starts on an empty volume without provisioning, and no
    layer, image setting or baked file holds a token."""
    secrets = {}
    for name, value in (("HF_TOKEN", HF_TOKEN), ("CIVITAI_TOKEN", CIVITAI_TOKEN)):
        secrets[name] = tmp_path / name
        secrets[name].write_text(value)
    cfg = {
        "models": [
            {
                "url": f"https://huggingface.co/org/tiny/resolve/main/{UPSCALE_MODEL_NAME}",
                "destination": "upscale_models",
            }
        ],
        "nodes": [{"url": f"file://{NODE_MOUNT}", "version": "v1.0.0"}],
    }
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        fake_huggingface(hub, cdn, "org/tiny", {UPSCALE_MODEL_NAME: upscale_model_file})
        seconds = container.build(
            BAKED,
            tmp_path / "bake.log",
            {
                "COMFYUI_REPO": f"file://{UPSTREAM_MOUNT}",
                "BAKE": "1",
                "CONFIG_YML": base64.urlsafe_b64encode(yaml.safe_dump(cfg).encode()).decode(),
                "HF_ENDPOINT": hub.url,
            },
            {require_upstream(): UPSTREAM_MOUNT, node_repo.bare: NODE_MOUNT},
            secrets,
        )
        record("bake build (on the cached image layers)", seconds)
        resolve = [s for s in hub.seen() if "/resolve/" in s.path]
        assert resolve and all(s.headers.get("authorization") == f"Bearer {HF_TOKEN}" for s in resolve)

    history = container.podman("history", "--no-trunc", BAKED).stdout
    inspect = container.podman("image", "inspect", BAKED).stdout
    baked_files = container.podman(
        "run", "--rm", "--network", "host", "--entrypoint", "/bin/bash", BAKED, "-c",
        f"grep -rlF -e {HF_TOKEN} -e {CIVITAI_TOKEN} /workspace /app /root /etc /run /tmp; echo rc=$?",
    ).stdout  # fmt: skip
    build_log = (tmp_path / "bake.log").read_text()
    for secret in (HF_TOKEN, CIVITAI_TOKEN):
        assert secret not in history and secret not in inspect and secret not in build_log
    assert baked_files.strip().endswith("rc=1"), baked_files
    assert json.loads(inspect)[0]["Config"]["Env"].count("VOLUME_ROOT=/workspace") == 1

    volume = tmp_path / "empty-volume"
    volume.mkdir()
    env = {"MODE": "local", "ALLOW_CPU": "1", "ENABLE_JUPYTER": "0", **ports()}
    with container.Container(BAKED, f"comfy-worker-test-baked-{os.getpid()}", env, {volume: "/runpod-volume"}) as baked:
        record("boot (baked image, empty volume)", wait_ready(baked, env))
        logs = baked.logs()
        assert "config from /workspace/config.yml; volume /workspace" in logs, logs
        assert "gate matches (.config-sha256): nothing to do" in logs, logs
        assert "summary: ComfyUI kept; models: 1 kept; nodes: 1 kept" in logs, logs
        assert not any(volume.iterdir())  # the attached volume is left alone
        run_job(env)
        assert baked.stop() < 10


def test_podman_stop_ends_a_container_in_the_middle_of_provisioning(image, tmp_path):
    """SIGTERM reaches the provisioning run too (tini -g), not only the services: no SIGKILL needed."""
    volume = tmp_path / "volume"
    volume.mkdir()
    big = tmp_path / "big.safetensors"
    random_file(big, 64 << 20)
    with FaultyOrigin() as slow:
        slow.add("/big.safetensors", file=big, rate=64 << 10)  # 64 KiB/s per connection: minutes for 64 MiB
        cfg = {"models": [{"url": f"{slow.url}/big.safetensors", "destination": "checkpoints"}]}
        env = {
            "CONFIG_YML": yaml.safe_dump(cfg),
            "COMFYUI_REPO": f"file://{UPSTREAM_MOUNT}",
            "MODE": "local",
            "ALLOW_CPU": "1",
            **ports(),
        }
        mounts = {volume: "/runpod-volume", require_upstream(): f"{UPSTREAM_MOUNT}:ro"}
        with container.Container(image, f"comfy-worker-test-stop-{os.getpid()}", env, mounts) as box:
            wait_until(lambda: slow.sent("/big.safetensors") > 0, 120, "the download", box)
            seconds = box.stop()
            logs = box.logs()
            assert seconds < 10 and box.exit_code() != 137, logs[-4000:]
            assert "phase models: started" in logs and "summary:" not in logs, logs[-4000:]
            record("podman stop while provisioning", seconds)
    assert not (volume / ".config-sha256").exists()
    assert not (volume / "ComfyUI" / "models" / "checkpoints" / "big.safetensors").exists()
