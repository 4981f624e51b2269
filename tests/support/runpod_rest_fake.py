"""A loopback stand-in for RunPod's REST API 2.0.0 (``/v2/serverless``, ``/v2/templates``,
``/v2/network-volumes``) and for an endpoint's queue URLs (``/v2/<id>/runsync``, ``/status``), speaking
the shapes of RunPod's OpenAPI document. Every request body is checked against that document's schema
for its operation (tests/data/runpod_rest_v2.json, JSON Schema 2020-12): an invalid body is answered
422 with RunPod's problem document and recorded in ``invalid``. Every request is recorded in
``requests`` (method, path, headers, raw body) so tests can assert what was, and was not, sent."""

from __future__ import annotations

import functools
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

from support.local_http import QuietHandler

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "runpod_rest_v2.json"
POOLS = (
    "AMPERE_16", "AMPERE_24", "ADA_24", "ADA_32_PRO", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO",
    "BLACKWELL_96", "HOPPER_141", "BLACKWELL_180",
)  # fmt: skip
CREATED_AT = "2026-12-01T12:00:00Z"
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    doc = json.loads(SCHEMA_FILE.read_text())
    registry = referencing.Registry().with_resource("urn:runpod-rest", DRAFT202012.create_resource(doc))
    return jsonschema.Draft202012Validator({"$ref": f"urn:runpod-rest#/components/schemas/{name}"}, registry=registry)


def _path(err: jsonschema.ValidationError) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)


def schema_errors(name: str, value) -> list[str]:
    """``value`` against schema ``name`` of the document: one line per violation, as RunPod words them."""
    return [f"{_path(e)}: {e.message}" for e in _validator(name).iter_errors(value)]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, errors: list[str] | None = None):
        super().__init__(detail)
        self.doc = {"title": title, "status": status, "detail": detail, **({"errors": errors} if errors else {})}
        self.status = status


class RunPodRestFake:
    """``RunPodRestFake(api_key, volumes=[...])``; ``url`` for RUNPOD_API_URL; ``close()``."""

    def __init__(self, api_key: str, volumes: list[dict] | None = None):
        self.api_key = api_key
        self.volumes = list(volumes or [])
        self.templates: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.requests: list[Request] = []
        self.invalid: list[str] = []  # request bodies (and our own answers) that broke the schema
        # (method, path) -> (status, content type, raw body): what a broken API or a proxy answers instead
        self.raw_answers: dict[tuple[str, str], tuple[int, str, bytes]] = {}
        self.job_answer = {
            "status": "COMPLETED",
            "output": {"images": [{"type": "base64", "filename": "a.png", "data": PNG_1PX}]},
        }
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # a short poll: close() (shutdown) returns at once, not after serve_forever's default 0.5 s
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sent(self, method: str, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    # --- the operations ---------------------------------------------------------------------------
    def _checked(self, name: str, body) -> dict:
        errors = schema_errors(name, body)
        if errors:
            self.invalid += [f"{name}: {e}" for e in errors]
            raise Problem(422, "Unprocessable Entity", "Request validation failed.", errors)
        return body

    def _answer(self, name: str, value: dict) -> dict:
        self.invalid += [f"answer {name}: {e}" for e in schema_errors(name, value)]
        return value

    def _template(self, template_id: str) -> dict:
        if template_id not in self.templates:
            raise Problem(404, "Not Found", "template not found")
        return self.templates[template_id]

    def create_template(self, body: dict) -> dict:
        self._checked("CreateTemplateRequest", body)
        if any(t["name"] == body["name"] for t in self.templates.values()):
            raise Problem(400, "Bad Request", f"a template named {body['name']!r} already exists")
        tid = uuid.uuid4().hex[:10]
        template = {
            "id": tid, "args": "", "disk": 10, "mounts": {}, "ports": [], "env": {}, "registry": None,
            "serverless": False, "public": False, "category": "NVIDIA", "startSsh": True, "startJupyter": True,
            "allowedCudaVersions": [], **body,
        }  # fmt: skip
        self.templates[tid] = template
        return self._answer("Template", template)

    def update_template(self, tid: str, body: dict) -> dict:
        self._checked("UpdateTemplateRequest", body)
        self._template(tid).update(body)
        return self._answer("Template", self.templates[tid])

    def _check_compute(self, body: dict) -> None:
        for i, pool in enumerate((body.get("gpu") or {}).get("pools") or []):
            if pool not in POOLS:
                raise Problem(
                    422, "Unprocessable Entity", "Request validation failed.",
                    [f"$.gpu.pools[{i}]: {pool!r} is not a serverless GPU pool"],
                )  # fmt: skip
        known = {v["id"] for v in self.volumes}
        for vid in body.get("networkVolumes") or []:
            if vid not in known:
                raise Problem(400, "Bad Request", f"network volume {vid} not found")

    def _apply_template(self, body: dict) -> dict:
        """A templateId's container settings, the body's own fields winning (env merged per key)."""
        if "templateId" not in body:
            return dict(body)
        template = self._template(body["templateId"])
        if not template["serverless"]:
            raise Problem(422, "Unprocessable Entity", "the template is not a serverless template")
        merged = {k: template[k] for k in ("image", "args", "disk", "ports", "registry")}
        merged.update({k: v for k, v in body.items() if k != "templateId"})
        merged["env"] = {**template["env"], **(body.get("env") or {})}
        return merged

    def create_endpoint(self, body: dict) -> dict:
        self._checked("CreateEndpointRequest", body)
        self._check_compute(body)
        fields = self._apply_template(body)
        eid = uuid.uuid4().hex[:8]
        gpu = {"count": 1, "allowedCudaVersions": [], "minCudaVersion": None, **fields.pop("gpu", {})}
        endpoint = {
            "id": eid, "args": "", "disk": 20, "ports": [], "env": {}, "registry": None, "dataCenterIds": [],
            "networkVolumes": [], "timeout": 300000, "flashboot": "OFF", "createdAt": CREATED_AT,
            **fields, "gpu": gpu, "workers": {"min": 0, "max": 3, "idleTimeout": 10, **(fields.get("workers") or {})},
            "requestUrls": self._urls(eid),
        }  # fmt: skip
        self.endpoints[eid] = endpoint
        return self._answer("Endpoint", endpoint)

    def update_endpoint(self, eid: str, body: dict) -> dict:
        self._checked("UpdateEndpointRequest", body)
        if eid not in self.endpoints:
            raise Problem(404, "Not Found", "endpoint not found")
        self._check_compute(body)
        fields = self._apply_template(body)
        endpoint = self.endpoints[eid]
        for key, value in fields.items():
            if key == "gpu":
                gpu = endpoint["gpu"]
                gpu.update(value)
                if value.get("minCudaVersion") == "":
                    gpu["minCudaVersion"] = None
            elif key == "workers":
                endpoint["workers"].update(value)
            else:
                endpoint[key] = value
        return self._answer("Endpoint", endpoint)

    def _urls(self, eid: str) -> dict:
        base = f"{self.url}/v2/{eid}"
        return {
            "run": f"{base}/run", "runSync": f"{base}/runsync", "status": f"{base}/status/{{job_id}}",
            "stream": f"{base}/stream/{{job_id}}", "cancel": f"{base}/cancel/{{job_id}}",
            "retry": f"{base}/retry/{{job_id}}", "purgeQueue": f"{base}/purge-queue", "health": f"{base}/health",
        }  # fmt: skip

    # --- HTTP -------------------------------------------------------------------------------------
    def route(self, method: str, path: str, body) -> tuple[int, object]:
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["v2", "serverless"]:
            if len(parts) == 2 and method == "GET":
                return 200, self._answer("ListEndpointsResponse", {"endpoints": list(self.endpoints.values())})
            if len(parts) == 2 and method == "POST":
                return 201, self.create_endpoint(body)
            if len(parts) == 3 and method == "PATCH":
                return 200, self.update_endpoint(parts[2], body)
        if parts[:2] == ["v2", "templates"]:
            if len(parts) == 2 and method == "GET":
                return 200, self._answer("ListTemplatesResponse", {"templates": list(self.templates.values())})
            if len(parts) == 2 and method == "POST":
                return 201, self.create_template(body)
            if len(parts) == 3 and method == "PATCH":
                return 200, self.update_template(parts[2], body)
        if parts == ["v2", "network-volumes"] and method == "GET":
            return 200, self._answer("ListNetworkVolumesResponse", {"networkVolumes": self.volumes})
        if len(parts) >= 3 and parts[0] == "v2" and parts[1] in self.endpoints:
            if parts[2] == "runsync" and method == "POST":
                return 200, {"id": "job-1", **self.job_answer}
            if parts[2] == "status" and method == "GET":
                return 200, {"id": parts[3], **self.job_answer}
        raise Problem(404, "Not Found", f"no route {method} {path}")

    def answer_http(self, method: str, path: str, authorization: str | None, raw: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request: a configured raw answer, else the API's."""
        if (method, path) in self.raw_answers:
            return self.raw_answers[(method, path)]
        try:
            if authorization != f"Bearer {self.api_key}":
                raise Problem(401, "Unauthorized", "invalid bearer token")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise Problem(400, "Bad Request", "the body is not JSON") from None
            status, answer = self.route(method, path, body)
            return status, "application/json", json.dumps(answer).encode()
        except Problem as problem:
            return problem.status, "application/problem+json", json.dumps(problem.doc).encode()

    def _handler(self):
        fake = self

        class Handler(QuietHandler):
            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    fake.requests.append(Request(self.command, self.path, dict(self.headers), raw))
                    status, ctype, data = fake.answer_http(
                        self.command, self.path, self.headers.get("Authorization"), raw
                    )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _serve

        return Handler
