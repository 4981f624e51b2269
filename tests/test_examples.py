"""The shipped config.yml provides exactly what the example workflow needs, and the example runs on
real ComfyUI (with the 10 KB test model standing in for the 67 MB one)."""

import base64
import json
import posixpath
from pathlib import Path
from urllib.parse import urlparse

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
