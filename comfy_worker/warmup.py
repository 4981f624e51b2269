"""WARMUP_WORKFLOW: one workflow run after ComfyUI answers and before the handler takes a job, so the
first real job does not pay for loading the models. The file is an API-format workflow or a job JSON
(``{"input": {"workflow": ...}}``). Any failure is a loud warning, never a dead worker."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 600


def load_workflow(path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("input"), dict):
        data = data["input"].get("workflow")
    if not isinstance(data, dict) or not data:
        raise ValueError("it is neither an API-format workflow nor a job JSON with input.workflow")
    return data


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def run_warmup(settings) -> bool:
    path = settings.warmup_workflow
    started = time.monotonic()
    try:
        workflow = load_workflow(path)
        base = f"http://{settings.comfy_host}"
        prompt_id = _post(f"{base}/prompt", {"prompt": workflow, "client_id": f"warmup-{uuid.uuid4().hex}"})[
            "prompt_id"
        ]
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{base}/history/{prompt_id}", timeout=10) as r:
                entry = json.load(r).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "success":
                log.info("warm-up workflow %s done in %.1f s", path, time.monotonic() - started)
                return True
            if status.get("status_str") == "error":
                raise RuntimeError(f"ComfyUI reports an error: {json.dumps(status.get('messages', []))[:500]}")
            time.sleep(0.1)
        raise RuntimeError(f"not finished within {WARMUP_TIMEOUT_S} s")
    except Exception as err:  # noqa: BLE001 - a warm-up never kills the worker
        detail = err.read().decode(errors="replace")[:500] if hasattr(err, "read") else ""
        log.warning("WARNING: the warm-up workflow (WARMUP_WORKFLOW=%s) failed: %s %s", path, err, detail)
        return False
