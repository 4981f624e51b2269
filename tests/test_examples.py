"""The shipped config.yml provides exactly what the example workflow needs, and the example runs on
real ComfyUI (with the 10 KB test model standing in for the 67 MB one)."""

import base64
import json
import posixpath
import urllib.error
import urllib.request
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


def test_example_workflow_runs_on_real_comfyui(comfyui):
    body = json.loads(EXAMPLE.read_text())["input"]
    workflow = body["workflow"]
    workflow["2"]["inputs"]["model_name"] = "tiny_compact_x2.safetensors"
    image = body["images"][0]
    (comfyui.path / "input" / image["name"]).write_bytes(base64.b64decode(image["image"]))
    req = urllib.request.Request(
        f"{comfyui.url}/prompt",
        data=json.dumps({"prompt": workflow}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "prompt_id" in json.load(r)
    except urllib.error.HTTPError as err:
        raise AssertionError(err.read().decode()) from None
