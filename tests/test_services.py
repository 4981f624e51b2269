"""services: the GPU check and the commands per mode (the running services: tests/test_start.py)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support.comfy_process import free_port

from comfy_worker import services
from comfy_worker.settings import Settings


def test_serverless_without_cuda_fails_fast_unless_allow_cpu(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MODE": "serverless", "VOLUME_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env["COMFY_PID_FILE"] = str(tmp_path / "c.pid")
    out = subprocess.run(
        [sys.executable, "-m", "comfy_worker.services"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "no CUDA device" in out.stderr and "ALLOW_CPU=1" in out.stderr


def test_cuda_detection(tmp_path):
    (tmp_path / "dev").mkdir()
    assert not services.has_cuda_device({}, dev=str(tmp_path / "dev"), proc=str(tmp_path / "none"))
    (tmp_path / "dev" / "nvidia0").touch()
    assert services.has_cuda_device({}, dev=str(tmp_path / "dev"), proc=str(tmp_path / "none"))
    assert not services.has_cuda_device({"CUDA_VISIBLE_DEVICES": ""}, dev=str(tmp_path / "dev"))


def test_commands_per_mode():
    pod = Settings.from_env({"MODE": "pod", "COMFY_ARGS": "--preview-method auto", "API_PORT": "8001"})
    assert services.comfy_command(pod, cpu=True)[2:] == [
        "--listen",
        "0.0.0.0",
        "--port",
        "8188",
        "--cpu",
        "--preview-method",
        "auto",
    ]
    assert services.handler_command(pod)[1:] == ["-m", "comfy_worker.api", "--host", "0.0.0.0", "--port", "8001"]
    local_api = services.handler_command(Settings.from_env({"MODE": "local"}))
    assert local_api[1:] == ["-m", "comfy_worker.api", "--host", "127.0.0.1", "--port", "8000"]
    serverless = Settings.from_env({"MODE": "serverless"})
    assert (
        services.handler_command(serverless)[1].endswith("handler.py")
        and len(services.handler_command(serverless)) == 2
    )
    local = Settings.from_env({"MODE": "local", "JUPYTER_AUTH": "none"})
    assert "--IdentityProvider.token=" in services.jupyter_command(local)
    assert "--ServerApp.ip=127.0.0.1" in services.jupyter_command(local)


def test_generated_jupyter_token_is_0600_and_reused(tmp_path):
    s = Settings.from_env({"VOLUME_ROOT": str(tmp_path)})
    token, generated = services.jupyter_token(s)
    assert generated and (tmp_path / ".jupyter-token").stat().st_mode & 0o777 == 0o600
    assert services.jupyter_token(s) == (token, False)


def test_a_preloaded_handler_runs_only_on_the_go_byte(tmp_path):
    """The handler process imports while ComfyUI boots and runs handler.py as __main__ (with its
    arguments) only once the supervisor sends the go byte; closed without it, it exits and runs nothing."""
    script = tmp_path / "fake_handler.py"
    script.write_text(
        "import sys\nprint('imported', flush=True)\nif __name__ == '__main__':\n    print('RUN', sys.argv[1:], flush=True)\n"
    )
    cmd = services.preloaded([sys.executable, str(script), "--rp_serve_api", "x"])
    root = Path(__file__).resolve().parents[1]
    go = subprocess.run(cmd, input=services.GO, capture_output=True, text=False, cwd=root, timeout=60)
    assert go.returncode == 0, go.stderr
    assert go.stdout.decode().splitlines() == ["imported", "imported", "RUN ['--rp_serve_api', 'x']"]
    closed = subprocess.run(cmd, input=b"", capture_output=True, cwd=root, timeout=60)
    assert closed.returncode == 0 and closed.stdout.decode().splitlines() == ["imported"]


def test_the_preloaded_api_listens_only_after_the_go_byte_and_stops_on_sigterm(tmp_path):
    """pod/local: the API process imports FastAPI, uvicorn and handler.py while ComfyUI boots and listens
    only on the go byte; closed without it, it exits and never listens."""
    port = free_port()
    env = {**os.environ, "VOLUME_ROOT": str(tmp_path), "API_PORT": str(port), "MODE": "local"}
    env.pop("API_TOKEN", None)
    cmd = services.preloaded(services.handler_command(Settings.from_env(env)))
    root = Path(__file__).resolve().parents[1]
    closed = subprocess.run(cmd, input=b"", capture_output=True, cwd=root, env=env, timeout=60)
    assert closed.returncode == 0 and not (tmp_path / ".api").exists(), closed.stderr

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root, env=env)
    try:
        time.sleep(1)
        assert not answers(f"http://127.0.0.1:{port}/ping") and proc.poll() is None
        proc.stdin.write(services.GO)
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while not answers(f"http://127.0.0.1:{port}/ping"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert b"API on http://127.0.0.1:" in proc.stderr.read()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_custom_nodes_that_fail_to_import_are_named_from_the_real_comfyui_log(comfyui_factory, tmp_path):
    proc = comfyui_factory(start=False)
    broken = proc.path / "custom_nodes" / "BrokenNode"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import a_module_that_is_not_installed_anywhere\n")
    proc.start()
    log_text = proc.log_path.read_text(errors="replace")
    assert services.import_failures(log_text) == ["BrokenNode"]


WORKER_SECRETS = {
    "API_TOKEN": "api-secret-1",
    "JUPYTER_PASSWORD": "jupyter-secret-2",
    "JUPYTER_TOKEN": "jupyter-secret-3",
    "BUCKET_ACCESS_KEY_ID": "s3-id-4",
    "BUCKET_SECRET_ACCESS_KEY": "s3-secret-5",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-6",
    "AWS_SESSION_TOKEN": "aws-session-7",
    "RUNPOD_AI_API_KEY": "runpod-key-8",
    "GITHUB_TOKEN": "github-token-9",
    "COMFY_ORG_API_KEY": "comfy-org-10",
}
NODE_TOKENS = {"HF_TOKEN": "hf-token-a", "CIVITAI_TOKEN": "civitai-token-b"}


def test_comfyui_is_started_without_the_workers_own_secrets(tmp_path, monkeypatch):
    """issue 20 (in passing): ComfyUI (and every custom node in it) inherited API_TOKEN, Jupyter's
    token, the S3 keys and RUNPOD_AI_API_KEY. The supervisor's own start of ComfyUI (a main.py that
    writes its environment) shows only the model-download tokens reach it."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(
        "import json, os, sys\nopen(os.path.join(os.getcwd(), 'env.json'), 'w').write(json.dumps(dict(os.environ)))\n"
    )
    for name, value in {**WORKER_SECRETS, **NODE_TOKENS, "COMFY_TEST_PLAIN": "plain"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    monkeypatch.setenv("COMFY_LOG_FILE", str(tmp_path / "comfyui.log"))
    monkeypatch.setenv("COMFY_PID_FILE", str(tmp_path / "comfyui.pid"))
    supervisor = services.Supervisor(Settings.from_env())
    proc = supervisor.start_comfy()
    assert proc.wait(60) == 0, (tmp_path / "comfyui.log").read_text()
    seen = json.loads((comfy / "env.json").read_text())
    assert sorted(set(WORKER_SECRETS) & set(seen)) == []
    assert not any(v in (comfy / "env.json").read_text() for v in WORKER_SECRETS.values())
    assert {k: seen.get(k) for k in NODE_TOKENS} == NODE_TOKENS
    assert seen["COMFY_TEST_PLAIN"] == "plain"  # the rest of the environment is kept
