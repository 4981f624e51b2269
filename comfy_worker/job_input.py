"""Validation of a RunPod job's ``input`` (and its ``s3Config``) and the workflow edits it asks for
(docs/api.md, "Input").

Every problem becomes a ``JobError`` with one readable sentence that names the culprit and the fix.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from comfy_worker.config_schema import ConfigError, ModelEntry, parse_config
from comfy_worker.job_errors import JobError
from comfy_worker.log_setup import safe_url

KNOWN_KEYS = ("workflow", "images", "overrides", "timeout", "comfy_org_api_key", "models")
JOB_MODEL_KEYS = ("url", "destination", "filename", "sha256", "size")  # a config.yml model entry's, less 'optional'
S3_CONFIG_KEYS = ("accessId", "accessSecret", "bucketName", "endpointUrl")  # RunPod's names, beside "input"
_S3_CONFIG_MEANING = {
    "accessId": "the access key id",
    "accessSecret": "the secret access key",
    "bucketName": "the name of an existing bucket",
    "endpointUrl": "the store's endpoint, such as https://s3.eu-west-1.amazonaws.com",
}
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")  # the characters boto3 accepts in a bucket name
_DATA_URI = re.compile(r"^data:[^;,]*(;[^,]*)?,", re.IGNORECASE)


@dataclass
class ImageInput:
    name: str
    data: bytes | None = None  # decoded base64
    url: str | None = None


@dataclass
class JobInput:
    workflow: dict[str, Any]
    images: list[ImageInput] = field(default_factory=list)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    timeout: float | None = None
    comfy_org_api_key: str | None = field(default=None, repr=False)
    models: list[ModelEntry] = field(default_factory=list)


@dataclass(frozen=True)
class S3Config:
    """RunPod's per-request bucket (the job's top-level ``s3Config``); both keys are secrets of the job."""

    endpoint_url: str
    bucket_name: str
    access_id: str = field(repr=False)
    access_secret: str = field(repr=False)


def job_secrets(job: Any) -> list[str]:
    """The job's own secrets (its Comfy.org key, the keys of its ``s3Config``), read without trusting the
    job's shape: they are redacted even when the job is malformed (and whatever handler ran it)."""
    if not isinstance(job, dict):
        return []
    raw, s3 = job.get("input"), job.get("s3Config")
    found = [raw.get("comfy_org_api_key")] if isinstance(raw, dict) else []
    if isinstance(s3, dict):
        found += [s3.get("accessId"), s3.get("accessSecret")]
    return [value for value in found if isinstance(value, str)]


def parse_job_input(raw: Any) -> JobInput:
    """Check the shape of ``job["input"]`` and return it typed; the workflow is a deep copy."""
    if not isinstance(raw, dict):
        raise JobError(f"The job input must be a JSON object with a 'workflow' key, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise JobError(
            f"Unknown input key(s) {', '.join(map(repr, unknown))}; allowed keys are {', '.join(KNOWN_KEYS)}.",
            {"unknown_keys": unknown},
        )
    workflow = _check_workflow(raw.get("workflow"))
    images = _check_images(raw.get("images"))
    overrides = _check_overrides(raw.get("overrides"))
    timeout = raw.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise JobError(
            f"'timeout' must be a positive number of seconds (finite, such as 120), got {timeout!r}.",
            {"timeout": repr(timeout)},
        )
    key = raw.get("comfy_org_api_key")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise JobError("'comfy_org_api_key' must be a non-empty string.")
    models = _check_models(raw.get("models"))
    return JobInput(workflow, images, overrides, float(timeout) if timeout is not None else None, key, models)


def _check_models(models: Any) -> list[ModelEntry]:
    """``models``: config.yml model entries, checked by the config's own schema (the same messages: the
    entry by index and url, the key at fault, an unknown key with a did-you-mean); never ``optional``."""
    if models is None:
        return []
    if not isinstance(models, list):
        raise JobError(
            f"'models' must be a list of model entries ({{url, destination, filename, sha256, size}}), got "
            f"{type(models).__name__}.",
            {"key": "models"},
        )
    for i, item in enumerate(models):
        if isinstance(item, dict) and "optional" in item:
            raise JobError(
                f"models[{i}]: unknown key 'optional': every model a job names is required; allowed keys: "
                f"{', '.join(JOB_MODEL_KEYS)}.",
                {"key": f"models[{i}].optional", "allowed_keys": list(JOB_MODEL_KEYS)},
            )
    try:
        entries = parse_config({"models": models}, "input.models").models
    except ConfigError as err:
        problems = [
            p.replace(
                "allowed keys: url, destination, filename, sha256, size, optional",
                "allowed keys: " + ", ".join(JOB_MODEL_KEYS),
            )
            for p in err.problems
        ]
        text = "; ".join(problems)
        raise JobError(
            f"input.models is invalid: {text}{'' if text.endswith(('.', '?')) else '.'}",
            {"key": "models", "problems": problems},
        ) from None
    for i, entry in enumerate(entries):
        hidden = next((part for part in entry.destination.split("/") if part.startswith(".")), None)
        if hidden:  # models/.locks holds the download locks and in-use markers every worker relies on
            raise JobError(
                f"input.models is invalid: models[{i}] ({safe_url(entry.url)}): destination: must not name a hidden "
                f"folder ({hidden!r}); a job's models go into ComfyUI's model folders, such as 'loras'.",
                {"key": f"models[{i}].destination"},
            )
    return entries


def parse_s3_config(raw: Any) -> S3Config | None:
    """Check the job's top-level ``s3Config`` (None when absent). No value is ever echoed: the keys are
    secrets, and the endpoint may carry some."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise JobError(
            f"'s3Config' must be a JSON object with {', '.join(S3_CONFIG_KEYS)}, got {type(raw).__name__}.",
            {"key": "s3Config", "allowed_keys": list(S3_CONFIG_KEYS)},
        )
    unknown = sorted(str(k) for k in raw if k not in S3_CONFIG_KEYS)
    if unknown:
        raise JobError(
            f"Unknown s3Config key(s) {', '.join(map(repr, unknown))}; allowed keys are {', '.join(S3_CONFIG_KEYS)}.",
            {"unknown_keys": unknown, "allowed_keys": list(S3_CONFIG_KEYS)},
        )
    values = {key: _s3_string(raw, key) for key in S3_CONFIG_KEYS}
    _check_endpoint(values["endpointUrl"])
    if not _BUCKET_NAME.match(values["bucketName"]):
        raise JobError(
            "s3Config.bucketName is not a valid bucket name: use only letters, digits, '.', '-' and '_' "
            "(no '/', no spaces), such as my-outputs.",
            {"key": "s3Config.bucketName"},
        )
    return S3Config(values["endpointUrl"], values["bucketName"], values["accessId"], values["accessSecret"])


def _s3_string(raw: dict, key: str) -> str:
    """``raw[key]``, a non-empty string without surrounding whitespace; the error names the key, not the value."""
    value = raw.get(key)
    if value is None:
        problem = "is missing"
    elif not isinstance(value, str):
        problem = f"is not a string (got {type(value).__name__})"
    elif not value.strip():
        problem = "is empty"
    elif value != value.strip():
        problem = "starts or ends with whitespace (a stray space or line break?)"
    else:
        return value
    raise JobError(
        f"s3Config.{key} {problem}: it must be a non-empty string, {_S3_CONFIG_MEANING[key]}.",
        {"key": f"s3Config.{key}"},
    )


def _check_endpoint(url: str) -> None:
    """An http(s) URL with a host and no query string, fragment or credentials (the URL is not echoed)."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        problem = f"it cannot be parsed ({exc})"
    else:
        if parts.scheme.lower() not in ("http", "https"):
            problem = "it is not an http:// or https:// URL"
        elif not parts.hostname:
            problem = "it has no host name"
        elif "?" in url or "#" in url:
            problem = "it has a query string or fragment"
        elif "@" in parts.netloc:
            problem = "it carries user:password@ credentials (they belong in accessId and accessSecret)"
        elif any(c.isspace() or ord(c) < 32 for c in url):
            problem = "it contains spaces or control characters"
    if problem:
        raise JobError(
            f"s3Config.endpointUrl is not a usable S3 endpoint: {problem}; send the endpoint alone, such as "
            "https://s3.eu-west-1.amazonaws.com or https://<account id>.r2.cloudflarestorage.com.",
            {"key": "s3Config.endpointUrl"},
        )


def _check_workflow(workflow: Any) -> dict[str, Any]:
    if workflow is None:
        raise JobError("The job input has no 'workflow': send a ComfyUI API-format workflow under input.workflow.")
    if not isinstance(workflow, dict):
        raise JobError(f"'workflow' must be a JSON object (ComfyUI API format), got {type(workflow).__name__}.")
    if "nodes" in workflow and "links" in workflow:
        raise JobError(
            "The workflow is in ComfyUI's UI format; export it in API format with Workflow > Export (API) "
            "and send that JSON as input.workflow.",
            {"format": "ui"},
        )
    if not workflow:
        raise JobError("'workflow' is empty: it must contain at least one node.")
    bad = [str(k) for k, v in workflow.items() if not isinstance(v, dict) or not isinstance(v.get("class_type"), str)]
    if bad:
        raise JobError(
            f"Workflow node(s) {', '.join(bad[:10])} have no 'class_type'; is this an API-format workflow "
            "(Workflow > Export (API))?",
            {"nodes_without_class_type": bad},
        )
    no_inputs = [k for k, v in workflow.items() if not isinstance(v.get("inputs", {}), dict)]
    if no_inputs:
        raise JobError(f"Workflow node(s) {', '.join(no_inputs[:10])} have 'inputs' that is not an object.")
    bad_meta = [k for k, v in workflow.items() if not isinstance(v.get("_meta", {}), dict)]
    if bad_meta:
        raise JobError(f"Workflow node(s) {', '.join(bad_meta[:10])} have '_meta' that is not an object.")
    return copy.deepcopy(workflow)


def check_file_name(name: Any, what: str = "image name") -> str:
    if not isinstance(name, str) or not name.strip():
        raise JobError(f"Every image needs a non-empty 'name' (a plain file name such as input.png), got {name!r}.")
    if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 for c in name) or len(name) > 200:
        raise JobError(
            f"The {what} {name!r} is not a plain file name: use a name without '/', '\\' or '..' "
            "(for example input.png).",
            {"name": name},
        )
    return name


def decode_base64(text: str, name: str) -> bytes:
    """Decode base64 (standard or URL-safe, padding optional, data-URI prefix allowed)."""
    payload = _DATA_URI.sub("", text.strip(), count=1)
    payload = re.sub(r"\s+", "", payload)
    payload += "=" * (-len(payload) % 4)
    try:
        if "-" in payload or "_" in payload:
            data = base64.b64decode(payload, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(
            f"The image {name!r} is not valid base64: send the file's bytes base64-encoded "
            "(a data:image/png;base64, prefix is allowed) or give a 'url' instead.",
            {"name": name},
        ) from None
    if not data:
        raise JobError(f"The image {name!r} is empty.", {"name": name})
    return data


def _check_images(images: Any) -> list[ImageInput]:
    if images is None:
        return []
    if not isinstance(images, list):
        raise JobError("'images' must be a list of {name, image} or {name, url} objects.")
    result: list[ImageInput] = []
    seen: set[str] = set()
    for i, item in enumerate(images):
        if not isinstance(item, dict):
            raise JobError(f"images[{i}] must be an object with 'name' and 'image' (base64) or 'url'.")
        name = check_file_name(item.get("name"))
        if name in seen:
            raise JobError(f"The image name {name!r} appears more than once; image names must be unique.")
        seen.add(name)
        extra = sorted(set(item) - {"name", "image", "url"})
        if extra:
            raise JobError(f"images[{i}] ({name}) has unknown key(s) {', '.join(extra)}; use 'image' or 'url'.")
        has_image, has_url = item.get("image") is not None, item.get("url") is not None
        if has_image == has_url:
            raise JobError(f"The image {name!r} needs exactly one of 'image' (base64) or 'url'.")
        if has_url:
            url = item["url"]
            if not isinstance(url, str) or not re.match(r"^https?://", url, re.IGNORECASE):
                raise JobError(f"The image {name!r} has url {url!r}; only http:// and https:// URLs are supported.")
            _check_url(url, name)
            result.append(ImageInput(name, url=url))
        else:
            if not isinstance(item["image"], str):
                raise JobError(f"The image {name!r} must be a base64 string.")
            result.append(ImageInput(name, data=decode_base64(item["image"], name)))
    return result


def _check_url(url: str, name: str) -> None:
    """Reject a URL the HTTP client could not use (the URL itself is not echoed: it may carry a signature)."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
        if not parts.hostname:
            problem = "it has no host name"
    except ValueError as exc:
        problem = str(exc)
    if problem is None and any(c.isspace() or ord(c) < 32 for c in url):
        problem = "it contains spaces or control characters"
    if problem:
        raise JobError(
            f"The image {name!r} has a url that is not a valid URL ({problem}); send a full http(s)://host/path URL.",
            {"name": name},
        )


def _check_overrides(overrides: Any) -> list[dict[str, Any]]:
    if overrides is None:
        return []
    if not isinstance(overrides, list):
        raise JobError("'overrides' must be a list of {node_id | title, field, value} objects.")
    for i, o in enumerate(overrides):
        if not isinstance(o, dict):
            raise JobError(f"overrides[{i}] must be an object with node_id or title, field and value.")
        if ("node_id" in o) == ("title" in o):
            raise JobError(f"overrides[{i}] needs exactly one of 'node_id' or 'title'.")
        if not isinstance(o.get("field"), str) or not o["field"].strip():
            raise JobError(
                f"overrides[{i}] needs a 'field', a dot path such as inputs.text or inputs.loras.0.strength."
            )
        if "value" not in o:
            raise JobError(f"overrides[{i}] ({o['field']}) has no 'value'.")
        extra = sorted(set(o) - {"node_id", "title", "field", "value"})
        if extra:
            raise JobError(f"overrides[{i}] has unknown key(s) {', '.join(extra)}.")
    return overrides


def _node_label(workflow: dict, node_id: str) -> str:
    node = workflow[node_id]
    title = (node.get("_meta") or {}).get("title")
    return f"{node_id} ({node['class_type']}{', ' + repr(title) if title else ''})"


def _target_nodes(workflow: dict, override: dict, index: int) -> list[str]:
    if "node_id" in override:
        node_id = str(override["node_id"])
        if node_id not in workflow:
            valid = [_node_label(workflow, k) for k in workflow]
            raise JobError(
                f"overrides[{index}]: the workflow has no node {node_id!r}; valid node ids are {', '.join(valid)}.",
                {"override": index, "node_id": node_id, "valid_node_ids": list(workflow)},
            )
        return [node_id]
    title = override["title"]
    matches = [k for k, v in workflow.items() if (v.get("_meta") or {}).get("title") == title]
    if not matches:
        titles = sorted({t for v in workflow.values() if (t := (v.get("_meta") or {}).get("title"))})
        raise JobError(
            f"overrides[{index}]: no node has the title {title!r}; valid titles are "
            f"{', '.join(map(repr, titles)) or '(none: the workflow has no _meta.title)'}.",
            {"override": index, "title": title, "valid_titles": titles},
        )
    if len(matches) > 1:
        raise JobError(
            f"overrides[{index}]: the title {title!r} matches nodes {', '.join(matches)}; use 'node_id' to pick one.",
            {"override": index, "title": title, "matching_node_ids": matches},
        )
    return matches


def _set_path(node: dict, path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    target: Any = node
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        walked = ".".join(parts[:depth]) or "the node"
        if isinstance(target, dict):
            # a new key is fine inside the node (an optional input absent from the export), not on the node
            if last and (depth > 0 or part in target):
                target[part] = value
                return
            if part not in target:
                hint = ""
                if depth == 0 and part in (node.get("inputs") or {}):
                    hint = f" (did you mean inputs.{path}?)"
                raise JobError(
                    f"{where}: {walked} has no key {part!r}{hint}; it has {', '.join(map(repr, target)) or 'no keys'}.",
                    {"field": path, "missing": part, "available": list(target)},
                )
            target = target[part]
        elif isinstance(target, list):
            if not re.fullmatch(r"-?\d+", part) or not -len(target) <= int(part) < len(target):
                raise JobError(
                    f"{where}: {walked} is a list of {len(target)} item(s), so {part!r} is not a valid index.",
                    {"field": path, "missing": part, "length": len(target)},
                )
            if last:
                target[int(part)] = value
                return
            target = target[int(part)]
        else:
            raise JobError(
                f"{where}: {walked} is a {type(target).__name__} value, not an object or list, so it has no {part!r}.",
                {"field": path, "missing": part},
            )


def _check_node_shape(node: dict, field: str, where: str) -> None:
    """After an override: the node must still be a node (class_type a name, inputs and _meta objects)."""
    problems = {
        "class_type": (isinstance(node.get("class_type"), str) and node["class_type"].strip(), "a node class name"),
        "inputs": (isinstance(node.get("inputs", {}), dict), "an object of input values"),
        "_meta": (isinstance(node.get("_meta", {}), dict), "an object"),
    }
    for key, (ok, what) in problems.items():
        if not ok:
            value = node.get(key)
            hint = " (set one input with a field such as inputs.seed)" if key == "inputs" else ""
            raise JobError(
                f"{where}: field {field!r} sets the node's {key!r} to {type(value).__name__} {value!r:.60}, "
                f"but it must be {what}{hint}.",
                {"field": field, "key": key, "value_type": type(value).__name__},
            )


def apply_overrides(workflow: dict[str, Any], overrides: list[dict[str, Any]]) -> None:
    """Apply ``overrides`` in place and in order (the workflow is the job's own copy): when two set the
    same field, the later one wins."""
    for i, override in enumerate(overrides):
        for node_id in _target_nodes(workflow, override, i):
            where = f"overrides[{i}] on node {_node_label(workflow, node_id)}"
            _set_path(workflow[node_id], override["field"], override["value"], where)
            _check_node_shape(workflow[node_id], override["field"], where)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def rename_references(workflow: dict[str, Any], renames: dict[str, str]) -> int:
    """Replace string input values equal to an uploaded name (or ``name [input]``) by the stored name.

    Returns the number of replaced values. Links (``["node", 0]``) are never touched.
    """
    lookup = dict(renames)
    lookup.update({f"{old} [input]": f"{new} [input]" for old, new in renames.items()})
    count = 0

    def walk(value: Any) -> Any:
        nonlocal count
        if isinstance(value, str) and value in lookup:
            count += 1
            return lookup[value]
        if isinstance(value, list) and not _is_link(value):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    for node in workflow.values():
        inputs = node.get("inputs")
        if isinstance(inputs, dict):
            node["inputs"] = {k: walk(v) for k, v in inputs.items()}
    return count
