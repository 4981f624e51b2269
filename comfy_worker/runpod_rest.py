"""A small client of RunPod's REST API 2.0.0 (``/v2/serverless``, ``/v2/templates``,
``/v2/network-volumes``), as ``deploy.sh --endpoint`` uses it (comfy_worker/runpod_deploy.py).

Every call authenticates with ``Authorization: Bearer RUNPOD_API_KEY``; the key is never part of a
message this module makes. A failure raises ``RestError`` with one readable line: a refused key (401,
403) names ``RUNPOD_API_KEY``; any other answer with a body gives RunPod's ``title``, ``detail`` and
each of its ``errors`` (they name the field); a network failure gives the URL and the cause.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

from comfy_worker.log_setup import redact, safe_url

TIMEOUT_S = 60
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class RestError(Exception):
    """A request RunPod refused or that never reached it; ``str()`` is the line to show."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _clean(text: str, limit: int = 400) -> str:
    return _CONTROL.sub(" ", text).strip()[:limit]


def error_message(method: str, path: str, status: int, body: bytes) -> str:
    """The one line for an error answer: RunPod's problem document (title, detail, errors) when there is one."""
    try:
        problem = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        title = _clean(str(problem.get("title") or ""))
        detail = _clean(str(problem.get("detail") or ""))
        errors = [_clean(str(e)) for e in problem.get("errors") or [] if e]
        said = ": ".join(p for p in (title, detail) if p) or "no detail"
        if errors:
            said += " (" + "; ".join(errors[:10]) + ")"
    else:
        said = _clean(body.decode("utf-8", "replace")) or "no detail"
    if status in (401, 403):
        what = "refused" if status == 401 else "does not allow this request"
        return (
            f"RunPod {what} with RUNPOD_API_KEY ({status} {said}): set RUNPOD_API_KEY to an API key with "
            "read/write access (RunPod console > Settings > API Keys)"
        )
    return f"RunPod answered {method} {path} with {status}: {said}"


class RunPodRest:
    """``RunPodRest(api_url, api_key)``: one method per operation deploy.sh needs (JSON in, JSON out)."""

    def __init__(self, api_url: str, api_key: str, timeout: float = TIMEOUT_S):
        self.api_url = api_url.rstrip("/")
        self._key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        url = f"{self.api_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read() if err.fp is not None else b""
            raise RestError(self._redact(error_message(method, path, err.code, raw)), err.code) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            cause = getattr(err, "reason", None) or err
            raise RestError(self._redact(f"cannot reach RunPod's API at {safe_url(url)}: {cause}")) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise RestError(
                f"RunPod answered {method} {path} with something that is not JSON: {_clean(raw.decode('utf-8', 'replace'), 200)}"
            ) from None

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])

    def list_endpoints(self) -> list[dict]:
        return (self.request("GET", "/v2/serverless") or {}).get("endpoints") or []

    def list_templates(self) -> list[dict]:
        return (self.request("GET", "/v2/templates") or {}).get("templates") or []

    def list_network_volumes(self) -> list[dict]:
        return (self.request("GET", "/v2/network-volumes") or {}).get("networkVolumes") or []

    def create_template(self, body: dict) -> dict:
        return self.request("POST", "/v2/templates", body)

    def update_template(self, template_id: str, body: dict) -> dict:
        return self.request("PATCH", f"/v2/templates/{template_id}", body)

    def create_endpoint(self, body: dict) -> dict:
        return self.request("POST", "/v2/serverless", body)

    def update_endpoint(self, endpoint_id: str, body: dict) -> dict:
        return self.request("PATCH", f"/v2/serverless/{endpoint_id}", body)

    def post_url(self, url: str, body: dict, timeout: float) -> Any:
        """POST ``body`` to another RunPod URL (an endpoint's ``/runsync``) with the same key."""
        return self._call_url("POST", url, body, timeout)

    def get_url(self, url: str, timeout: float) -> Any:
        """GET another RunPod URL (an endpoint's ``/status/{id}``) with the same key."""
        return self._call_url("GET", url, None, timeout)

    def _call_url(self, method: str, url: str, body: dict | None, timeout: float) -> Any:
        headers = {"Authorization": f"Bearer {self._key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read() if err.fp is not None else b""
            raise RestError(self._redact(error_message(method, safe_url(url), err.code, raw)), err.code) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            cause = getattr(err, "reason", None) or err
            raise RestError(self._redact(f"cannot reach {safe_url(url)}: {cause}")) from None
