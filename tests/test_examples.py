"""The shipped config.yml provides exactly what the example workflow needs, the example runs on real
ComfyUI (with the 10 KB test model standing in for the 67 MB one), and the example clients say what the
API answered."""

import base64
import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from support.api_server import ApiServer, tiny_workflow
from support.comfy_process import free_port

from comfy_worker.config_schema import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "workflow_upscale.json"
LOADER_FOLDERS = {"UpscaleModelLoader": ("model_name", "upscale_models")}


def test_default_config_provides_every_model_of_the_example_workflow():
    workflow = json.loads(EXAMPLE.read_text())["input"]["workflow"]
    needed = {
        (LOADER_FOLDERS[n["class_type"]][1], n["inputs"][LOADER_FOLDERS[n["class_type"]][0]])
        for n in workflow.values()
        if n["class_type"] in LOADER_FOLDERS
    }
    cfg = load_config(ROOT / "config.yml")
    provided = {(m.destination, m.filename or posixpath.basename(urlparse(m.url).path)) for m in cfg.models}
    assert needed and needed == provided
    assert cfg.nodes == []


def test_example_workflow_runs_on_real_comfyui(comfyui, monkeypatch):
    """The example body, sent as is through the handler (the 10 KB model standing in), to its output."""
    import asyncio
    import io

    from PIL import Image

    import handler
    from comfy_worker import comfy_client

    for name, value in comfyui.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("BUCKET_ENDPOINT_URL", raising=False)
    body = json.loads(EXAMPLE.read_text())
    body["input"]["workflow"]["2"]["inputs"]["model_name"] = "tiny_compact_x2.safetensors"
    given = Image.open(io.BytesIO(base64.b64decode(body["input"]["images"][0]["image"])))
    # files only: ComfyUI creates the folder input/3d itself the first time /object_info is asked
    inputs_before = sorted(p.name for p in (comfyui.path / "input").iterdir() if p.is_file())

    async def go():
        try:
            return await handler.handler({"id": "example", **body})
        finally:
            await comfy_client.close_shared_session()

    result = asyncio.run(go())
    assert "error" not in result, result
    (entry,) = result["images"]
    upscaled = Image.open(io.BytesIO(base64.b64decode(entry["data"])))
    assert upscaled.size == (given.width * 2, given.height * 2)
    assert sorted(p.name for p in (comfyui.path / "input").iterdir() if p.is_file()) == inputs_before  # left clean


def run_example(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "API_TOKEN"}
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_example_clients_print_the_apis_own_error_for_a_missing_or_wrong_token(comfyui, tmp_path):
    """issue 21 #8: client.py and test_local.py against a pod's API (a token required): no token or a wrong
    one prints the API's own sentence and exits 1, no traceback; test_local.py --token (or API_TOKEN) works."""
    request = tmp_path / "tiny.json"
    request.write_text(json.dumps({"input": {"workflow": tiny_workflow(size=16)}}))
    server = ApiServer(comfyui, tmp_path / "volume", tmp_path / "api.log", token="example-token-4242").start()
    try:
        out = tmp_path / "out"
        refused = [
            run_example("client.py", str(request), "--url", server.url, "--out", str(out)),
            run_example("test_local.py", str(request), "--url", server.url, "--token", "wrong", "--out", str(out)),
        ]
        for done in refused:
            assert done.returncode == 1, done.stderr
            assert "the API answered 401" in done.stderr and "Authorization: Bearer <API_TOKEN>" in done.stderr
            assert "Traceback" not in done.stderr, done.stderr
        ok = run_example("test_local.py", str(request), "--url", server.url, "--out", str(out))
        assert ok.returncode == 1 and "401" in ok.stderr  # no token anywhere
        ok = run_example(
            "test_local.py",
            str(request),
            "--url",
            server.url,
            "--out",
            str(out),
            env={"API_TOKEN": "example-token-4242"},
        )
        assert ok.returncode == 0, ok.stderr
        assert [p.suffix for p in out.iterdir()] == [".png"]
    finally:
        server.stop()


def test_example_client_names_an_api_it_cannot_reach(tmp_path):
    """issue 21 #8: nothing listening: one line naming the URL, exit 1, no traceback."""
    request = tmp_path / "tiny.json"
    request.write_text(json.dumps({"input": {"workflow": tiny_workflow()}}))
    url = f"http://127.0.0.1:{free_port()}"
    done = run_example("client.py", str(request), "--url", url)
    assert done.returncode == 1 and f"cannot reach {url}/run" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
