"""A loopback stand-in for the node pack data check_workflow.py fetches (comfy_worker/node_packs.py):
ComfyUI-Manager's extension-node-map.json, github-stats.json and model-list.json, and the Comfy
Registry's ``GET /nodes/{id}``, served from the project's own small files in those formats
(tests/data/packs/README.md) with an ETag and Last-Modified, answering 304 to a matching conditional
request. ``env()`` points the COMFY_*_URL variables at it."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from support.local_http import QuietHandler, serve_in_thread

PACKS = Path(__file__).resolve().parents[1] / "data" / "packs"
LAST_MODIFIED = "Wed, 19 Aug 2026 08:43:25 GMT"


class NodeDataServer:
    def __init__(self, files: dict[str, bytes] | None = None, registry: dict | None = None):
        self.files = (
            files
            if files is not None
            else {
                f"/{name}": (PACKS / name).read_bytes()
                for name in ("extension-node-map.json", "github-stats.json", "model-list.json")
            }
        )
        self.registry = registry if registry is not None else json.loads((PACKS / "registry-nodes.json").read_text())
        self.requests: list[tuple[str, str]] = []  # (path, "200" / "304" / "404" / "503")
        self.down = False
        self._lock = threading.Lock()
        self.server = serve_in_thread(self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _answer(self, path: str) -> bytes | None:
        if path.startswith("/registry/nodes/"):
            node = self.registry.get(path.rsplit("/", 1)[-1])
            return json.dumps(node).encode() if node is not None else None
        return self.files.get(path)

    def _handler(self):
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):
                body = None if outer.down else outer._answer(self.path)
                etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"' if body is not None else None
                if outer.down:
                    code = 503
                elif body is None:
                    code = 404
                elif self.headers.get("If-None-Match") == etag:
                    code = 304
                else:
                    code = 200
                with outer._lock:
                    outer.requests.append((self.path, str(code)))
                self.send_response(code)
                if etag:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", LAST_MODIFIED)
                payload = body if code == 200 else b""
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def env(self) -> dict[str, str]:
        return {
            "COMFY_NODE_MAP_URL": f"{self.url}/extension-node-map.json",
            "COMFY_NODE_STATS_URL": f"{self.url}/github-stats.json",
            "COMFY_MODEL_LIST_URL": f"{self.url}/model-list.json",
            "COMFY_REGISTRY_URL": f"{self.url}/registry",
        }

    def codes(self, path: str) -> list[str]:
        with self._lock:
            return [c for p, c in self.requests if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
