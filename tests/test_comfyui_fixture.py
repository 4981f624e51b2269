"""Smoke test: the real ComfyUI fixture runs EmptyImage -> SaveImage over HTTP + websocket."""

import json
import urllib.request
import uuid

from websockets.sync.client import connect


def test_empty_image_to_save_image_over_websocket(comfyui):
    client_id = uuid.uuid4().hex
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}},
    }
    with connect(f"ws://{comfyui.host}/ws?clientId={client_id}", open_timeout=10) as ws:
        body = json.dumps({"prompt": workflow, "client_id": client_id}).encode()
        req = urllib.request.Request(f"{comfyui.url}/prompt", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            prompt_id = json.load(r)["prompt_id"]
        seen = []
        while True:
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes):
                continue
            msg = json.loads(msg)
            seen.append(msg["type"])
            data = msg.get("data", {})
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    assert "execution_start" in seen
    history = comfyui.get_json(f"/history/{prompt_id}")[prompt_id]
    image = history["outputs"]["2"]["images"][0]
    png = comfyui.path / "output" / image["subfolder"] / image["filename"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (64, 48)


def test_upscale_model_is_visible(comfyui):
    info = comfyui.get_json("/object_info/UpscaleModelLoader")
    spec = info["UpscaleModelLoader"]["input"]["required"]["model_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # 0.3.75 uses the COMBO form
    assert "tiny_compact_x2.safetensors" in options
