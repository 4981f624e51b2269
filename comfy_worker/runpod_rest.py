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
import urllib.parse
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


_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _clean(text: str, limit: int = 400) -> str:
    return _CONTROL.sub(" ", text).strip()[:limit]


def _shown_body(raw: bytes, limit: int = 400) -> str:
    """A body that is not RunPod's JSON, fit for one line: an HTML page (a proxy's, a login page) by its
    title, anything else cleaned and cut."""
    text = raw.decode("utf-8", "replace")
    if text.lstrip()[:1] == "<":
        title = _HTML_TITLE.search(text)
        return "an HTML page" + (f" ({_clean(title.group(1), 120)})" if title and _clean(title.group(1)) else "")
    return _clean(text, limit)


def api_base_url(url: str) -> str:
    """RUNPOD_API_URL as the base the ``/v2/...`` paths go under: a trailing ``/`` or ``/v2`` dropped;
    ValueError naming RUNPOD_API_URL when it is no http(s) URL or carries a query string."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"RUNPOD_API_URL {safe_url(url)!r} is not an API base URL: give one like https://api.runpod.io "
            "(or unset it for RunPod's)"
        )
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v2")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


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
        said = _shown_body(body) or "no detail"
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
        self.api_url = api_base_url(api_url)
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
                self._redact(
                    f"RunPod answered {method} {path} with something that is not JSON: {_shown_body(raw, 200)}"
                )
            ) from None

    def _items(self, path: str, key: str) -> list[dict]:
        """The list ``key`` of a GET's answer, every item an object; RestError for any other shape."""
        answer = self.request("GET", path)
        items = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RestError(f"RunPod answered GET {path} without a list of {key}: is RUNPOD_API_URL RunPod's API?")
        return items

    def _created(self, method: str, path: str, body: dict) -> dict:
        """The object a POST or PATCH answers with (it has an ``id``); RestError for any other shape."""
        answer = self.request(method, path, body)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise RestError(f"RunPod answered {method} {path} without the object's id: is RUNPOD_API_URL RunPod's API?")
        return answer

    def _redact(self, text: str) -> str:
        return redact(text, [self._key])

    def list_endpoints(self) -> list[dict]:
        return self._items("/v2/serverless", "endpoints")

    def list_templates(self) -> list[dict]:
        return self._items("/v2/templates", "templates")

    def list_network_volumes(self) -> list[dict]:
        return self._items("/v2/network-volumes", "networkVolumes")

    def create_template(self, body: dict) -> dict:
        return self._created("POST", "/v2/templates", body)

    def update_template(self, template_id: str, body: dict) -> dict:
        return self._created("PATCH", f"/v2/templates/{template_id}", body)

    def create_endpoint(self, body: dict) -> dict:
        return self._created("POST", "/v2/serverless", body)

    def update_endpoint(self, endpoint_id: str, body: dict) -> dict:
        return self._created("PATCH", f"/v2/serverless/{endpoint_id}", body)

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
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read() if err.fp is not None else b""
            raise RestError(self._redact(error_message(method, safe_url(url), err.code, raw)), err.code) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            cause = getattr(err, "reason", None) or err
            raise RestError(self._redact(f"cannot reach {safe_url(url)}: {cause}")) from None
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise RestError(
                self._redact(
                    f"{method} {safe_url(url)} answered with something that is not JSON: {_shown_body(raw, 200)}"
                )
            ) from None
