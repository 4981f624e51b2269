"""``deploy.sh --endpoint NAME``: a config (or a workflow) to a live RunPod serverless endpoint, through
RunPod's REST API 2.0.0 (comfy_worker/runpod_rest.py; the guide: docs/runpod-guide.md).

``python -m comfy_worker.runpod_deploy --endpoint NAME --image REF --config FILE [options]``:

1. the options are checked (nothing secret may be copied from this machine: ``--env`` refuses a
   secret's name or a local secret's value, tokens go by ``--env-secret VAR=secret``, which sets
   ``VAR`` to ``{{ RUNPOD_SECRET_secret }}``), and ``RUNPOD_API_KEY`` must be set (not for --dry-run);
2. ``--from-workflow W.json`` (repeatable): the workflow checker judges the workflows against the config;
   when every model and node pack they need is resolved, the config with the suggested entries added
   is written next to the first workflow (``W.config.yml``) and deployed; otherwise each unresolved
   class or model is named and the run ends (exit 1) before any request;
3. the config is validated as ``--validate-only`` does and becomes ``env.CONFIG_YML`` (base64);
4. ``--check-only`` ends here (deploy.sh runs it before a build); ``--dry-run`` prints the requests
   instead of sending them;
5. the serverless template ``NAME (comfy-worker)`` is created or updated (image, env), then the
   endpoint NAME is created, or updated in place with what changed (never a second one of that name);
6. the endpoint's id, its ``/run`` and ``/runsync`` URLs and a curl line are printed; ``--smoke`` sends
   a job through ``/runsync`` and prints the latency and the result's shape.

Exit 0 deployed, 1 RunPod refused or could not be reached (or --smoke failed, or the workflow is not
resolved), 2 bad options, config or environment.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from comfy_worker.exit_codes import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from comfy_worker.log_setup import redact
from comfy_worker.runpod_rest import RestError, RunPodRest, api_base_url
from comfy_worker.settings import Settings, is_secret_name

FLASHBOOT_MODES = ("FLASHBOOT", "OFF", "PRIORITY_FLASHBOOT")
DEFAULT_POOLS = ("ADA_24", "AMPERE_24")  # 24 GB cards: SDXL, FLUX.1 at fp8 (docs/runpod-guide.md)
# RunPod's serverless GPU pools as its docs list them (references/gpu-types, flash's GpuGroup); the API
# names no set (GET /v2/catalog/gpus, ``pool``), so another id is sent with a warning, not refused
KNOWN_POOLS = (
    "AMPERE_16", "AMPERE_24", "ADA_24", "ADA_32_PRO", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO",
    "BLACKWELL_96", "HOPPER_141", "BLACKWELL_180",
)  # fmt: skip
RUNPOD_DEFAULT_WORKERS = {"min": 0, "max": 3}  # what RunPod sets on create when workers are not given
DEFAULT_MIN_CUDA = "12.8"  # the image's torch is built for CUDA 12.8
DEFAULT_DISK_GB = 20
SCALING = {"type": "QUEUE_DELAY", "queueDelay": 4}
TEMPLATE_SUFFIX = " (comfy-worker)"
SMOKE_TIMEOUT_S = 900.0
SMOKE_POLL_S = 5.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_CUDA = re.compile(r"^\d+\.\d+$")
_POOL = re.compile(r"^[A-Z][A-Z0-9_]*$")
# a name that says it holds a credential (OPENAI_API_KEY, MY_PASSWORD, HUGGING_FACE_HUB_TOKEN, ...): --env
# refuses it like the worker's own secrets, since a plain env value shows in the console and in the API
_CREDENTIAL_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)")
_MIN_SECRET_LEN = 8  # a local secret's value this long found in a body stops the run


class DeployError(Exception):
    """The run ends with these lines on stderr and ``code``."""

    def __init__(self, lines: str | list[str], code: int = EXIT_FAILED):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.code = code
        super().__init__("; ".join(self.lines))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy.sh --endpoint", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True, metavar="NAME", help="the serverless endpoint to create or update")
    p.add_argument("--image", metavar="REF", help="the image, best by digest (REPO@sha256:...)")
    p.add_argument("--config", required=True, metavar="FILE", help="the config.yml shipped as CONFIG_YML")
    p.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="POOL",
        type=str.upper,
        help="a GPU pool (repeatable), e.g. ADA_24",
    )
    p.add_argument("--cuda", action="append", default=[], metavar="X.Y", help="an allowed CUDA version (repeatable)")
    p.add_argument("--network-volume", metavar="ID|NAME", help="the network volume, by id or name")
    p.add_argument("--flashboot", choices=FLASHBOOT_MODES, default="FLASHBOOT", type=str.upper)
    p.add_argument("--workers-min", type=int, metavar="N")
    p.add_argument("--workers-max", type=int, metavar="N")
    p.add_argument("--idle-timeout", type=int, metavar="S", help="seconds an idle worker stays (1-3600)")
    p.add_argument("--execution-timeout", type=int, metavar="S", help="seconds a job may run before RunPod ends it")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a plain setting (repeatable)")
    p.add_argument("--env-secret", action="append", default=[], metavar="VAR=secret", help="VAR from a RunPod secret")
    p.add_argument("--from-workflow", action="append", default=[], metavar="W.json", help="deploy what W.json needs")
    p.add_argument("--dry-run", action="store_true", help="print the requests, send none")
    p.add_argument("--check-only", action="store_true", help="check the options and the workflows, then stop")
    p.add_argument("--smoke", action="store_true", help="after deploying, send a job through /runsync")
    p.add_argument("--smoke-request", metavar="FILE", help="the job JSON --smoke sends (default: a tiny warm-up)")
    return p


# --- what to deploy ---------------------------------------------------------------------------------
@dataclass
class Desired:
    name: str
    image: str
    env: dict[str, str]
    flashboot: str
    pools: list[str] = field(default_factory=list)  # empty: not given
    cuda: list[str] = field(default_factory=list)
    volume: str | None = None  # as given (id or name); volume_id once resolved
    volume_id: str | None = None
    workers: dict[str, int] = field(default_factory=dict)
    timeout_ms: int | None = None

    @property
    def template_name(self) -> str:
        return self.name + TEMPLATE_SUFFIX


def option_problems(args: argparse.Namespace) -> list[str]:
    """Every bad option, one line each (names the option and the fix)."""
    problems = []
    if not args.endpoint.strip():
        problems.append("--endpoint needs a name")
    for pool in args.gpu:
        if not _POOL.match(pool):
            problems.append(f"--gpu {pool!r}: give a RunPod GPU pool id, e.g. --gpu ADA_24 ({', '.join(KNOWN_POOLS)})")
    for v in args.cuda:
        if not _CUDA.match(v):
            problems.append(f"--cuda {v!r}: give a CUDA version as MAJOR.MINOR, e.g. --cuda 12.8")
    for opt, value, low, high in (
        ("--workers-min", args.workers_min, 0, None),
        ("--workers-max", args.workers_max, 0, None),
        ("--idle-timeout", args.idle_timeout, 1, 3600),
        ("--execution-timeout", args.execution_timeout, 1, None),
    ):
        if value is not None and (value < low or (high is not None and value > high)):
            problems.append(f"{opt} {value}: must be {low}" + (f" to {high}" if high else " or more"))
    if None not in (args.workers_min, args.workers_max) and args.workers_min > args.workers_max:
        problems.append(f"--workers-min {args.workers_min} is above --workers-max {args.workers_max}")
    for opt, items in (("--env", args.env), ("--env-secret", args.env_secret)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not _ENV_NAME.match(name):
                problems.append(f"{opt} {name or item!r}: write {opt} NAME=VALUE (NAME: letters, digits, _)")
            elif name == "CONFIG_YML":
                problems.append(f"{opt} CONFIG_YML: deploy.sh sets CONFIG_YML from --config; pass the file there")
            elif opt == "--env" and (is_secret_name(name) or _CREDENTIAL_NAME.search(name.upper())):
                problems.append(
                    f"--env {name}=...: {name} is a secret and is never copied from this machine: store it as a "
                    f"RunPod secret (console > Settings > Secrets) and pass --env-secret {name}=<secret name>"
                )
            elif opt == "--env-secret" and not _SECRET_NAME.match(value):
                problems.append(f"--env-secret {name}={value!r}: name the RunPod secret (letters, digits, _ . -)")
    names = [item.partition("=")[0] for item in (*args.env, *args.env_secret)]
    for name in sorted({n for n in names if n and names.count(n) > 1}):
        problems.append(f"{name} is given more than once (--env, --env-secret): give it once")
    if args.smoke_request:
        problems += smoke_request_problems(Path(args.smoke_request))
    return problems


def smoke_request_problems(path: Path) -> list[str]:
    """--smoke-request FILE is checked before anything is deployed: a JSON object (a job: ``{"input": ...}``)."""
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return [f"--smoke-request {path}: {err.strerror or err}"]
    except ValueError as err:
        return [f'--smoke-request {path}: not JSON ({err}): give a job as RunPod takes it, {{"input": {{...}}}}']
    if not isinstance(job, dict) or "input" not in job:
        return [f'--smoke-request {path}: not a job: give a JSON object with "input", as RunPod takes it']
    return []


def config_env(config: Path, args: argparse.Namespace) -> dict[str, str]:
    env = {"CONFIG_YML": base64.b64encode(config.read_bytes()).decode("ascii")}
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    for item in args.env_secret:
        name, _, secret = item.partition("=")
        env[name] = "{{ RUNPOD_SECRET_" + secret + " }}"
    return env


def desired(args: argparse.Namespace, config: Path) -> Desired:
    workers = {
        key: value
        for key, value in (("min", args.workers_min), ("max", args.workers_max), ("idleTimeout", args.idle_timeout))
        if value is not None
    }
    return Desired(
        name=args.endpoint.strip(),
        image=args.image or "",
        env=config_env(config, args),
        flashboot=args.flashboot,
        pools=list(dict.fromkeys(args.gpu)),
        cuda=list(dict.fromkeys(args.cuda)),
        volume=args.network_volume,
        workers=workers,
        timeout_ms=args.execution_timeout * 1000 if args.execution_timeout is not None else None,
    )


def check_no_local_secret(body: dict, settings: Settings) -> None:
    """Refuse a request body that holds the value of a secret variable of this machine (in the config
    too: ``CONFIG_YML`` is base64, so it is looked into decoded)."""
    text = json.dumps(body)
    config_yml = (body.get("env") or {}).get("CONFIG_YML")
    if config_yml:
        text += base64.b64decode(config_yml).decode("utf-8", "replace")
    for name, value in settings.secret_items():
        if len(value) >= _MIN_SECRET_LEN and value in text:
            raise DeployError(
                f"the request would carry the value of this machine's {name}: secrets are never copied; "
                f"store it as a RunPod secret and pass --env-secret VAR=<secret name>",
                EXIT_INVALID,
            )


# --- the request bodies -----------------------------------------------------------------------------
def template_create_body(want: Desired) -> dict:
    return {
        "name": want.template_name,
        "image": want.image,
        "env": want.env,
        "disk": DEFAULT_DISK_GB,
        "serverless": True,
        "category": "NVIDIA",
        "startSsh": False,
        "startJupyter": False,
    }


def template_update_body(want: Desired, current: dict) -> dict:
    body = {}
    if current.get("image") != want.image:
        body["image"] = want.image
    if (current.get("env") or {}) != want.env:
        body["env"] = want.env
    return body


def gpu_create(want: Desired) -> dict:
    gpu: dict = {"pools": want.pools or list(DEFAULT_POOLS)}
    if want.cuda:
        gpu["allowedCudaVersions"] = want.cuda
    else:
        gpu["minCudaVersion"] = DEFAULT_MIN_CUDA
    return gpu


def endpoint_create_body(want: Desired, template_id: str) -> dict:
    body = {
        "name": want.name,
        "type": "QUEUE",
        "templateId": template_id,
        "image": want.image,
        "env": want.env,
        "scaling": dict(SCALING),
        "flashboot": want.flashboot,
        "gpu": gpu_create(want),
    }
    if want.volume_id:
        body["networkVolumes"] = [want.volume_id]
    if want.workers:
        body["workers"] = dict(want.workers)
    if want.timeout_ms is not None:
        body["timeout"] = want.timeout_ms
    return body


def endpoint_changes(want: Desired, current: dict) -> tuple[dict, list[str]]:
    """The PATCH body for what differs from ``current`` (options not given stay as they are) and one
    line per change. Env values are never shown (only which names changed)."""
    body: dict = {}
    lines: list[str] = []
    if current.get("image") != want.image:
        body["image"] = want.image
        lines.append(f"image: {current.get('image')} -> {want.image}")
    if (current.get("env") or {}) != want.env:
        body["env"] = want.env
        lines += env_changes(current.get("env") or {}, want.env)
    if current.get("flashboot") != want.flashboot:
        body["flashboot"] = want.flashboot
        lines.append(f"flashboot: {current.get('flashboot')} -> {want.flashboot}")
    gpu_now = current.get("gpu") or {}
    gpu: dict = {}
    if want.pools and list(gpu_now.get("pools") or []) != want.pools:
        gpu["pools"] = want.pools
        lines.append(f"GPU pools: {', '.join(gpu_now.get('pools') or []) or 'none'} -> {', '.join(want.pools)}")
    if want.cuda and (list(gpu_now.get("allowedCudaVersions") or []) != want.cuda or gpu_now.get("minCudaVersion")):
        gpu.update(allowedCudaVersions=want.cuda, minCudaVersion="")  # a set replaces a floor
        lines.append(f"CUDA versions: {_cuda_shown(gpu_now)} -> {', '.join(want.cuda)}")
    if gpu:
        body["gpu"] = gpu
    if want.volume_id and list(current.get("networkVolumes") or []) != [want.volume_id]:
        body["networkVolumes"] = [want.volume_id]
        lines.append(f"network volume: {', '.join(current.get('networkVolumes') or []) or 'none'} -> {want.volume_id}")
    workers_now = current.get("workers") or {}
    changed_workers = {k: v for k, v in want.workers.items() if workers_now.get(k) != v}
    if changed_workers:  # the whole block, so that no PATCH semantics can reset what was not given
        body["workers"] = merged_workers(want, current)
        lines += [f"workers {k}: {workers_now.get(k)} -> {v}" for k, v in changed_workers.items()]
    if want.timeout_ms is not None and current.get("timeout") != want.timeout_ms:
        body["timeout"] = want.timeout_ms
        lines.append(f"execution timeout: {_seconds(current.get('timeout'))} -> {_seconds(want.timeout_ms)}")
    return body, lines


def merged_workers(want: Desired, current: dict | None) -> dict:
    """The endpoint's workers block once ``want``'s are applied (to RunPod's defaults on create);
    DeployError when its min would be above its max (RunPod would refuse it after the template is written)."""
    now = (current or {}).get("workers") or RUNPOD_DEFAULT_WORKERS
    merged = {k: v for k, v in {**now, **want.workers}.items() if k in ("min", "max", "idleTimeout")}
    low, high = merged.get("min"), merged.get("max")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        now_said = (
            f"the endpoint {want.name!r} has {_shown_workers(now)}"
            if current
            else (f"RunPod's default for a new one is {_shown_workers(now)}")
        )
        raise DeployError(
            f"error: the endpoint's workers would be min {low}, max {high} ({now_said}): give --workers-min and "
            "--workers-max together, the minimum at most the maximum",
            EXIT_INVALID,
        )
    return merged


def _shown_workers(workers: dict) -> str:
    return f"min {workers.get('min')}, max {workers.get('max')}"


def env_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per variable added, removed or changed; never a value."""
    lines = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            lines.append(f"env {name}: removed")
        elif name not in old:
            lines.append(f"env {name}: added")
        elif old[name] != new[name]:
            lines.append(f"env {name}: changed" + (" (the config)" if name == "CONFIG_YML" else ""))
    return lines


def _cuda_shown(gpu: dict) -> str:
    if gpu.get("allowedCudaVersions"):
        return ", ".join(gpu["allowedCudaVersions"])
    return f"{gpu['minCudaVersion']} or newer" if gpu.get("minCudaVersion") else "any"


def _seconds(ms) -> str:
    return f"{ms // 1000} s" if isinstance(ms, int) else "unset"


# --- the run against RunPod ---------------------------------------------------------------------------
@dataclass
class Outcome:
    endpoint: dict
    action: str  # created | updated | unchanged
    changes: list[str]
    template_id: str
    template_action: str


LEGACY_FLASHBOOT_SUFFIX = " -fb"  # RunPod once marked a FlashBoot endpoint by this suffix on its name


def _one_named(items: list[dict], name: str, what: str, fix: str, *aliases: str) -> dict | None:
    found = [i for i in items if i.get("name") in (name, *aliases)]
    if len(found) > 1:
        ids = ", ".join(str(i.get("id")) for i in found)
        raise DeployError(f"{len(found)} {what}s are named {name!r} ({ids}): {fix}")
    return found[0] if found else None


def resolve_volume(client: RunPodRest, given: str) -> str:
    """The id of the network volume ``given`` (an id, else a unique name)."""
    volumes = client.list_network_volumes()
    if any(v.get("id") == given for v in volumes):
        return given
    named = [v for v in volumes if v.get("name") == given]
    if len(named) == 1:
        return named[0]["id"]
    if named:
        ids = ", ".join(f"{v['id']} in {v.get('dataCenter')}" for v in named)
        raise DeployError(f"--network-volume {given}: {len(named)} volumes have that name ({ids}): give the id")
    known = ", ".join(f"{v.get('name')} ({v.get('id')})" for v in volumes) or "none"
    raise DeployError(f"--network-volume {given}: no network volume has that id or name (yours: {known})")


def upsert_template(client: RunPodRest, want: Desired) -> tuple[str, str]:
    """(template id, created | updated | unchanged)."""
    fix = "delete or rename all but one in the console (Templates)"
    current = _one_named(client.list_templates(), want.template_name, "template", fix)
    if current is None:
        return client.create_template(template_create_body(want))["id"], "created"
    if not current.get("serverless"):
        raise DeployError(
            f"the template {want.template_name!r} ({current.get('id')}) is a pod template: rename it in the "
            "console (Templates), then deploy again"
        )
    body = template_update_body(want, current)
    if not body:
        return current["id"], "unchanged"
    client.update_template(current["id"], body)
    return current["id"], "updated"


def deploy(client: RunPodRest, want: Desired, settings: Settings) -> Outcome:
    """Look up, then create or update: the template first, the endpoint second. An endpoint refused
    after the template was written is said (the next run reuses the template)."""
    fix = "deploy.sh updates one endpoint in place: delete or rename the others in the console"
    current = _one_named(client.list_endpoints(), want.name, "endpoint", fix, want.name + LEGACY_FLASHBOOT_SUFFIX)
    if current is not None and current.get("type") == "LOAD_BALANCER":
        raise DeployError(
            f"the endpoint {want.name!r} ({current['id']}) is a load-balancing endpoint; this worker "
            "takes jobs from a queue: choose another --endpoint name"
        )
    if want.workers:
        merged_workers(want, current)  # a min above the max is refused before anything is written
    if want.volume:
        want.volume_id = resolve_volume(client, want.volume)
    template_id, template_action = upsert_template(client, want)
    try:
        if current is None:
            body = endpoint_create_body(want, template_id)
            check_no_local_secret(body, settings)
            return Outcome(client.create_endpoint(body), "created", [], template_id, template_action)
        body, lines = endpoint_changes(want, current)
        if not body:
            return Outcome(current, "unchanged", [], template_id, template_action)
        check_no_local_secret(body, settings)
        if "image" in body or "env" in body:  # the template's container settings go with a container change
            body = {"templateId": template_id, **body}
        updated = client.update_endpoint(current["id"], body)
        return Outcome(updated, "updated", lines, template_id, template_action)
    except RestError as err:
        if template_action == "unchanged":
            raise
        raise DeployError(
            [
                str(err),
                f"the template {want.template_name!r} ({template_id}) was {template_action}, the endpoint "
                f"{want.name!r} was not: fix the above and run again (the template is reused)",
            ]
        ) from None


def request_urls(endpoint: dict) -> tuple[str, str]:
    urls = endpoint.get("requestUrls") or {}
    base = f"https://api.runpod.ai/v2/{endpoint['id']}"
    return urls.get("run") or f"{base}/run", urls.get("runSync") or f"{base}/runsync"


def report(outcome: Outcome, want: Desired) -> None:
    ep = outcome.endpoint
    head = f"endpoint {want.name}: {outcome.action} (id {ep['id']})"
    print(head + (f", {len(outcome.changes)} change(s):" if outcome.changes else ""))
    for line in outcome.changes:
        print(f"  {line}")
    print(f"template {want.template_name}: {outcome.template_action} (id {outcome.template_id})")
    print(f"image: {want.image}; flashboot {want.flashboot}")
    run, runsync = request_urls(ep)
    print(f"run:     {run}")
    print(f"runsync: {runsync}")
    print("try it (the key is read from your shell, never written here):")
    print(
        f'  curl -s -X POST {runsync} -H "Authorization: Bearer $RUNPOD_API_KEY" '
        "-H 'Content-Type: application/json' -d @examples/quickstart.json"
    )


# --- --dry-run ------------------------------------------------------------------------------------
def _shown_body(body: dict) -> str:
    shown = json.loads(json.dumps(body))
    env = shown.get("env") or {}
    if "CONFIG_YML" in env:
        env["CONFIG_YML"] = f"<base64 of the config, {len(env['CONFIG_YML'])} characters>"
    return json.dumps(shown, indent=2)


def dry_run(want: Desired, api_url: str) -> None:
    """The requests a run would send, none sent (nothing secret in them: no key, secrets by reference)."""
    print(f"dry run: no request is sent to {api_url}")
    print(f"GET {api_url}/v2/serverless      (an endpoint named {want.name!r} is updated in place, else created)")
    print(f"GET {api_url}/v2/templates       (the template {want.template_name!r}, the same way)")
    if want.volume:
        print(f"GET {api_url}/v2/network-volumes (the id of the network volume {want.volume!r})")
        want.volume_id = want.volume_id or f"<id of {want.volume}>"
    print(f"POST {api_url}/v2/templates  (when there is none; else PATCH /v2/templates/<id> with image and env)")
    print(_shown_body(template_create_body(want)))
    print(f"POST {api_url}/v2/serverless (when there is none; else PATCH /v2/serverless/<id> with what differs)")
    print(_shown_body(endpoint_create_body(want, "<template id>")))


# --- --smoke --------------------------------------------------------------------------------------
def _kind(item) -> str:
    """``base64 png`` for ``{"type": "base64", "filename": "x.png"}``; the type name of anything else."""
    if not isinstance(item, dict):
        return type(item).__name__
    ext = str(item.get("filename") or "").rpartition(".")[2] if "." in str(item.get("filename") or "") else ""
    return " ".join(p for p in (str(item.get("type") or ""), ext.lower()) if p) or "object"


def result_shape(output) -> str:
    """What a job's output holds, without its data: ``images: 1 (base64 png)``."""
    if not isinstance(output, dict):
        return type(output).__name__
    parts = []
    for key, value in output.items():
        if isinstance(value, list):
            kinds = sorted({_kind(v) for v in value})
            parts.append(f"{key}: {len(value)}" + (f" ({', '.join(kinds)})" if kinds else ""))
        elif isinstance(value, dict):
            parts.append(f"{key}: {{{', '.join(sorted(value))}}}")
        else:
            parts.append(f"{key}: {type(value).__name__}")
    return "; ".join(parts) or "empty"


def _job(answer) -> dict:
    return answer if isinstance(answer, dict) else {"status": f"not a job's status: {type(answer).__name__}"}


def smoke(client: RunPodRest, endpoint: dict, request_file: Path) -> int:
    """One job through ``/runsync`` (polling ``/status`` while it is queued): latency and shape."""
    job = json.loads(request_file.read_text(encoding="utf-8"))
    _, runsync = request_urls(endpoint)
    print(f"smoke: sending {request_file.name} to {runsync}", flush=True)
    start = time.monotonic()
    answer = _job(client.post_url(runsync, job, timeout=SMOKE_TIMEOUT_S))
    status_url = (endpoint.get("requestUrls") or {}).get("status") or runsync.rsplit("/", 1)[0] + "/status/{job_id}"
    while answer.get("status") in ("IN_QUEUE", "IN_PROGRESS") and time.monotonic() - start < SMOKE_TIMEOUT_S:
        time.sleep(SMOKE_POLL_S)
        answer = _job(client.get_url(status_url.replace("{job_id}", str(answer.get("id"))), timeout=60))
    took = time.monotonic() - start
    status = answer.get("status")
    output = answer.get("output")
    error = answer.get("error") or (output.get("error") if isinstance(output, dict) else None)
    if status != "COMPLETED" or error:
        print(f"smoke: FAILED after {took:.1f} s: status {status}: {error or 'no output'}", file=sys.stderr)
        return EXIT_FAILED
    print(f"smoke: COMPLETED in {took:.1f} s; output: {result_shape(output)}")
    return EXIT_OK


# --- --from-workflow --------------------------------------------------------------------------------
def workflow_config(workflows: list[str], config: Path, settings: Settings, keep: bool = True) -> Path:
    """The config with what the workflows need added, written next to the first workflow as
    ``W.config.yml`` (``keep``; else, for --dry-run and deploy.sh's check before a build, into a temporary
    file removed at exit, so nothing is left or said twice); DeployError naming each unresolved class or
    model when something is not."""
    from comfy_worker import workflow_check

    merged, problems, unresolved = workflow_check.config_for_workflows(workflows, config, settings)
    if problems:
        lines = [f"--from-workflow: not deployed, the workflow needs what cannot be resolved ({len(problems)}):"]
        lines += [f"  {p}" for p in problems]
        lines += [f"  not resolved: {u}" for u in unresolved]
        lines.append("add these to the config (--config) by hand, or fix the workflow; nothing was sent to RunPod")
        raise DeployError(lines)
    first = Path(workflows[0])
    out = first.with_name(first.name.removesuffix(first.suffix) + ".config.yml")
    what = f"({config.name} plus what {', '.join(Path(w).name for w in workflows)} needs)"
    if not keep:
        fd, temp = tempfile.mkstemp(prefix="comfy-worker-", suffix=".config.yml")
        os.close(fd)
        atexit.register(Path(temp).unlink, missing_ok=True)
        Path(temp).write_text(merged, encoding="utf-8")
        return Path(temp)
    from comfy_worker.lock_file import atomic_write_text

    atomic_write_text(out, merged)
    print(f"--from-workflow: wrote {out} {what}")
    return out


# --- the command ----------------------------------------------------------------------------------
def validated_config(path: Path, settings: Settings, say_ok: bool) -> None:
    """The config loaded as ``--validate-only`` loads it (its messages on stderr when it is invalid);
    ``say_ok`` prints its ``ok:`` line (deploy.sh printed it already for ``--config``)."""
    from comfy_worker.cli import load_or_report, validate_only

    loaded = load_or_report(str(path), settings)
    if loaded is None:
        raise DeployError(f"{path} is invalid (see above): fix it, then deploy again", EXIT_INVALID)
    if say_ok:
        validate_only(*loaded)


def run(args: argparse.Namespace, settings: Settings) -> int:
    problems = option_problems(args)
    if not args.image and not args.check_only:
        problems.append("--image REF is required (or -t IMAGE to build and push one)")
    try:
        api_url = api_base_url(settings.runpod_api_url)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise DeployError([f"error: {p}" for p in problems], EXIT_INVALID)
    if not settings.runpod_api_key and not args.dry_run:
        raise DeployError(
            "error: RUNPOD_API_KEY is not set: export RUNPOD_API_KEY=<an API key with read/write access, "
            "RunPod console > Settings > API Keys> (or use --dry-run)",
            EXIT_INVALID,
        )
    config = Path(args.config)
    validated_config(config, settings, say_ok=False)
    if args.from_workflow:
        config = workflow_config(args.from_workflow, config, settings, keep=not (args.dry_run or args.check_only))
        validated_config(config, settings, say_ok=True)
    want = desired(args, config)
    check_no_local_secret({"env": want.env}, settings)
    if args.check_only:
        return EXIT_OK
    # said once, here: deploy.sh -t runs --check-only before the build and this run after the push
    unknown = [pool for pool in want.pools if pool not in KNOWN_POOLS]
    if unknown:
        print(
            f"warning: --gpu {', '.join(unknown)}: not among RunPod's documented GPU pools ({', '.join(KNOWN_POOLS)}); "
            "RunPod refuses a pool id it does not know (its ids: GET /v2/catalog/gpus, 'pool')",
            file=sys.stderr,
        )
    if args.dry_run:
        dry_run(want, api_url)
        return EXIT_OK
    client = RunPodRest(api_url, settings.runpod_api_key or "")
    if "@sha256:" not in want.image:
        print(
            f"warning: --image {want.image} is a tag: workers may pull different builds; deploy by digest "
            "(REPO@sha256:..., what deploy.sh -t prints) to pin it",
            file=sys.stderr,
        )
    outcome = deploy(client, want, settings)
    report(outcome, want)
    if args.smoke or args.smoke_request:
        request = Path(args.smoke_request) if args.smoke_request else settings.app_dir / "examples" / "quickstart.json"
        return smoke(client, outcome.endpoint, request)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    secrets = [v for _, v in settings.secret_items()]
    try:
        return run(args, settings)
    except (DeployError, RestError) as err:
        lines = err.lines if isinstance(err, DeployError) else [f"error: {err}"]
        code = err.code if isinstance(err, DeployError) else EXIT_FAILED
        for line in lines:
            print(redact(line if line.startswith(("error:", " ")) else f"error: {line}", secrets), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
