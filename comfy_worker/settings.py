"""Every environment variable comfy-worker reads, in one place (docs/env.md lists them all).

``Settings.from_env()`` reads ``os.environ`` (or a given mapping) at call time; nothing else in the
project looks at ``os.environ`` for configuration. Secrets are excluded from ``repr``; the one list of
secret variables (``is_secret_name``) serves log redaction, returned errors and the environment of
child processes alike.

``python -m comfy_worker.settings --export`` prints the resolved paths and ports as shell
``export`` lines, so the shell scripts take their defaults from here instead of computing them again.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from comfy_worker.public_address import HostAllowList

APP_DIR = Path(__file__).resolve().parents[1]  # the repo (or /app in the image): scripts + baked config.yml
DEFAULT_COMFYUI_REF = "v0.3.75"  # the ComfyUI release the tests run
DEFAULT_COMFYUI_REPO = "https://github.com/comfyanonymous/ComfyUI.git"
MANAGER_DATA = "https://raw.githubusercontent.com/Comfy-Org/ComfyUI-Manager/main"  # ComfyUI-Manager's data files
DEFAULT_NODE_MAP_URL = f"{MANAGER_DATA}/extension-node-map.json"
DEFAULT_NODE_STATS_URL = f"{MANAGER_DATA}/github-stats.json"
DEFAULT_MODEL_LIST_URL = f"{MANAGER_DATA}/model-list.json"
DEFAULT_REGISTRY_URL = "https://api.comfy.org"
DEFAULT_RUNPOD_API_URL = "https://api.runpod.io"  # RunPod's REST API 2.0.0 (deploy.sh --endpoint)
# Where a job's ``models`` may download from by default (JOB_MODEL_HOSTS): the Hugging Face Hub and its
# download hosts (LFS and Xet CDNs under hf.co, legacy ones under huggingface.co), CivitAI and its storage
# (its own hosts, Cloudflare R2 buckets). ``*.name`` matches every host under ``name``.
DEFAULT_JOB_MODEL_HOSTS = (
    "huggingface.co",
    "*.huggingface.co",
    "hf.co",
    "*.hf.co",
    "civitai.com",
    "*.civitai.com",
    "civitai.red",
    "*.civitai.red",
    "*.r2.cloudflarestorage.com",
)
DEFAULT_JOB_MODELS_MAX_GB = 50.0
SECRET_ENV_NAMES = (
    "HF_TOKEN",
    "CIVITAI_TOKEN",
    "GITHUB_TOKEN",
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
    "COMFY_ORG_API_KEY",
    "JUPYTER_PASSWORD",
    "JUPYTER_TOKEN",
    "API_TOKEN",
    "RUNPOD_AI_API_KEY",
    "RUNPOD_API_KEY",
)
SECRET_PREFIXES = ("AWS_",)  # boto3's own credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...)


# The only secrets ComfyUI's process (and so every custom node in it) is given: nodes that download
# models need them. Every other secret is the worker's own and is removed from ComfyUI's environment:
# API_TOKEN, JUPYTER_PASSWORD, JUPYTER_TOKEN, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, AWS_*,
# RUNPOD_AI_API_KEY, RUNPOD_API_KEY, GITHUB_TOKEN and COMFY_ORG_API_KEY (the handler sends that one with each job).
COMFYUI_SECRETS = ("HF_TOKEN", "CIVITAI_TOKEN")


def is_secret_name(name: str) -> bool:
    """Is the environment variable ``name`` a secret (never logged, returned or passed to node code)?"""
    return name in SECRET_ENV_NAMES or name.startswith(SECRET_PREFIXES)


def comfyui_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment ComfyUI runs with: ``env`` (default ``os.environ``) without the worker's own
    secrets; of the secrets only ``COMFYUI_SECRETS`` stay (docs/configuration-guide.md, "Secrets")."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if not is_secret_name(k) or k in COMFYUI_SECRETS}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from None


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise ValueError(f"environment variable {name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _hosts(raw: str, name: str) -> tuple[str, ...]:
    """The comma-separated ``host`` or ``host:port`` entries of variable ``name``, blanks dropped."""
    entries = tuple(item.strip() for item in raw.split(",") if item.strip())
    HostAllowList(entries, f"environment variable {name}")  # a malformed entry: ValueError naming it
    return entries


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


RUNPOD_VOLUME = Path("/runpod-volume")
RUNPOD_HF_CACHE = "huggingface-cache"  # RunPod's cached models: mounted under /runpod-volume, never written to
MODES = ("serverless", "pod", "local")


def is_user_volume(path: Path) -> bool:
    """Is ``path`` (``/runpod-volume``) a writable volume of the user's, not just the mount point of
    RunPod's model cache (which exists even without a network volume)? A mount point of its own, or
    a folder holding anything besides ``huggingface-cache``, counts; it must be writable."""
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return False
    if os.path.ismount(path):
        return True
    try:
        return any(child.name != RUNPOD_HF_CACHE for child in path.iterdir())
    except OSError:
        return False


def default_volume_root(env: Mapping[str, str]) -> Path:
    if env.get("VOLUME_ROOT"):
        return Path(env["VOLUME_ROOT"])
    if is_user_volume(RUNPOD_VOLUME):
        return RUNPOD_VOLUME
    if Path("/workspace").is_dir():
        return Path("/workspace")
    return APP_DIR / "workspace"


def default_mode(env: Mapping[str, str]) -> str:
    """MODE, else serverless on a RunPod endpoint, pod on a RunPod pod, else local (docs/env.md)."""
    raw = env.get("MODE", "").strip().lower()
    if raw:
        if raw not in MODES:
            raise ValueError(f"environment variable MODE must be one of {', '.join(MODES)}, got {raw!r}")
        return raw
    if env.get("RUNPOD_ENDPOINT_ID"):
        return "serverless"
    if env.get("RUNPOD_POD_ID"):
        return "pod"
    return "local"


def hf_cache_dirs(env: Mapping[str, str]) -> tuple[Path, ...]:
    """Hugging Face hub caches to link models from: HF_HUB_CACHE when set, then RunPod's cached models."""
    dirs = [Path(env["HF_HUB_CACHE"])] if env.get("HF_HUB_CACHE") else []
    dirs.append(RUNPOD_VOLUME / RUNPOD_HF_CACHE / "hub")
    return tuple(dict.fromkeys(dirs))


@dataclass(frozen=True)
class Settings:
    volume_root: Path
    comfyui_path: Path
    app_dir: Path
    comfy_host: str
    comfy_port: int
    api_port: int
    jupyter_port: int
    comfy_args: str
    comfyui_repo: str
    comfyui_ref: str | None  # env COMFYUI_REF; None = use config / default
    job_timeout: float
    max_response_mb: float
    refresh_worker: bool
    concurrency: int
    bucket_endpoint_url: str | None
    bucket_name: str
    bucket_region: str | None
    bucket_prefix: str
    s3_url_expires: int
    send_progress: bool = False  # RUNPOD_ENDPOINT_ID set: serverless, where progress updates have a webhook
    sdk_job_queue: bool = False  # RUNPOD_WEBHOOK_GET_JOB set: the RunPod SDK takes jobs from RunPod's queue
    sdk_realtime: bool = False  # RUNPOD_REALTIME_PORT set (not 0): the RunPod SDK serves its realtime API
    python: str | None = None  # env PYTHON: the interpreter whose environment gets node requirements
    nodes_installer: str = "auto"  # env NODES_INSTALLER: auto (uv if found, else pip) | uv | pip
    install_py_timeout: float = 600.0  # env INSTALL_PY_TIMEOUT: seconds for a node's install.py
    node_package_cache: Path | None = None  # env NODE_PACKAGE_CACHE: pip/uv cache for node requirements
    comfy_pid_file: Path = Path("/tmp/comfyui.pid")
    comfy_log_file: Path = Path("/tmp/comfyui.log")
    comfy_ready_timeout: float = 300.0
    max_image_mb: float = 100.0  # env MAX_IMAGE_MB: cap on one input image downloaded from a URL
    runpod_log_level: str = "INFO"  # the RunPod SDK's own log (its DEBUG level logs every job output)
    hf_endpoint: str = "https://huggingface.co"  # env HF_ENDPOINT: Hugging Face Hub base URL (tests: a local fake)
    civitai_base_url: str = "https://civitai.com"  # env CIVITAI_BASE_URL: CivitAI base URL (tests: a local fake)
    download_connections: int = 32  # env DOWNLOAD_CONNECTIONS: the most range connections per big file
    download_retries: int = 5  # env DOWNLOAD_RETRIES: attempts per request without progress
    download_retry_backoff: float = 1.0  # env DOWNLOAD_RETRY_BACKOFF: first retry delay in seconds (doubles)
    download_log_interval: float = 10.0  # env DOWNLOAD_LOG_INTERVAL: seconds between progress lines (no TTY)
    mode: str = "local"  # env MODE (else RUNPOD_ENDPOINT_ID -> serverless, RUNPOD_POD_ID -> pod): which services run
    allow_cpu: bool = False  # env ALLOW_CPU: serverless may run without a CUDA device
    comfyui_update: bool = False  # env COMFYUI_UPDATE: move an existing ComfyUI checkout to the ref
    comfy_restart: bool = True  # env COMFY_RESTART: restart ComfyUI when it exits (default 0 in serverless)
    warmup_workflow: Path | None = None  # env WARMUP_WORKFLOW: workflow or job JSON run once before the first job
    jupyter_auth: str = "token"  # env JUPYTER_AUTH: token | none
    api_auth: str = "token"  # env API_AUTH: token | none (the worker's HTTP API, comfy_worker/api.py)
    runsync_wait_s: float = 90.0  # env RUNSYNC_WAIT_S: how long /runsync waits before answering like /status
    max_queue_depth: int = 100  # env MAX_QUEUE_DEPTH: jobs waiting in the API's queue; beyond: 429
    max_request_mb: float = 20.0  # env MAX_REQUEST_MB: largest request body the API reads; beyond: 413
    result_ttl_s: float = 1800.0  # env RESULT_TTL_S: seconds a finished job's result stays readable
    webhook_retries: int = 9  # env WEBHOOK_RETRIES: further attempts after a failed webhook POST
    webhook_retry_backoff: float = 1.0  # env WEBHOOK_RETRY_BACKOFF: first retry delay in seconds (doubles)
    webhook_retry_max_delay: float = 120.0  # env WEBHOOK_RETRY_MAX_DELAY: the longest delay between attempts
    webhook_allow_hosts: tuple[
        str, ...
    ] = ()  # env WEBHOOK_ALLOW_HOSTS: host[:port] webhooks may reach though not public
    max_stored_result_mb: float = 20.0  # env MAX_STORED_RESULT_MB: largest result the API's store keeps
    enable_jupyter: bool = True  # env ENABLE_JUPYTER: JupyterLab (default on in pod/local, off in serverless)
    node_map_url: str = DEFAULT_NODE_MAP_URL  # env COMFY_NODE_MAP_URL: class -> node pack (check_workflow.py)
    node_stats_url: str = DEFAULT_NODE_STATS_URL  # env COMFY_NODE_STATS_URL: stars of each node pack
    model_list_url: str = DEFAULT_MODEL_LIST_URL  # env COMFY_MODEL_LIST_URL: model file -> URL, folder
    registry_url: str = DEFAULT_REGISTRY_URL  # env COMFY_REGISTRY_URL: the Comfy Registry API (cnr_id -> repo)
    user_cache_dir: Path = Path.home() / ".cache"  # env XDG_CACHE_HOME: check_workflow.py's cache of those
    hf_cache_dirs: tuple[Path, ...] = ()  # env HF_HUB_CACHE + RunPod's cached models: linked, not downloaded
    # env JOB_MODEL_HOSTS: where a job's models may come from; None = DEFAULT_JOB_MODEL_HOSTS
    job_model_hosts: tuple[str, ...] | None = None
    job_models_max_gb: float = DEFAULT_JOB_MODELS_MAX_GB  # env JOB_MODELS_MAX_GB: disk bound of job models; 0 = off
    jupyter_password: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    config_yml: str | None = field(default=None, repr=False)
    bucket_access_key_id: str | None = field(default=None, repr=False)
    bucket_secret_access_key: str | None = field(default=None, repr=False)
    comfy_org_api_key: str | None = field(default=None, repr=False)
    hf_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)
    github_token: str | None = field(default=None, repr=False)
    runpod_api_url: str = DEFAULT_RUNPOD_API_URL  # env RUNPOD_API_URL: RunPod's REST API (deploy.sh --endpoint)
    runpod_api_key: str | None = field(default=None, repr=False)  # env RUNPOD_API_KEY: deploy.sh --endpoint
    secret_list: tuple[str, ...] = field(default=(), repr=False)
    secret_names: tuple[str, ...] = field(default=(), repr=False)  # the names of secret_list, in its order

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        volume_root = default_volume_root(env)
        comfy_port = _int(env, "COMFY_PORT", 8188)
        mode = default_mode(env)
        return cls(
            volume_root=volume_root,
            comfyui_path=Path(env.get("COMFYUI_PATH") or volume_root / "ComfyUI"),
            app_dir=Path(env.get("APP_DIR") or APP_DIR),
            comfy_host=env.get("COMFY_HOST") or f"127.0.0.1:{comfy_port}",
            comfy_port=comfy_port,
            api_port=_int(env, "API_PORT", 8000),
            jupyter_port=_int(env, "JUPYTER_PORT", 8888),
            comfy_args=env.get("COMFY_ARGS", ""),
            comfyui_repo=env.get("COMFYUI_REPO") or DEFAULT_COMFYUI_REPO,
            comfyui_ref=env.get("COMFYUI_REF") or None,
            job_timeout=_float(env, "COMFY_JOB_TIMEOUT", 600.0),
            max_response_mb=_float(env, "MAX_RESPONSE_MB", 18.0),
            refresh_worker=_flag(env, "REFRESH_WORKER"),
            concurrency=max(1, _int(env, "MAX_CONCURRENCY", 1)),
            send_progress=bool(env.get("RUNPOD_ENDPOINT_ID")),
            sdk_job_queue=env.get("RUNPOD_WEBHOOK_GET_JOB") is not None,
            sdk_realtime=_int(env, "RUNPOD_REALTIME_PORT", 0) != 0,
            bucket_endpoint_url=env.get("BUCKET_ENDPOINT_URL") or None,
            bucket_name=env.get("BUCKET_NAME") or "comfyui-outputs",
            bucket_region=env.get("BUCKET_REGION") or None,
            bucket_prefix=env.get("BUCKET_PREFIX", ""),
            s3_url_expires=_int(env, "S3_URL_EXPIRES", 3600),
            python=env.get("PYTHON") or None,
            nodes_installer=_choice(env, "NODES_INSTALLER", ("auto", "uv", "pip")),
            install_py_timeout=_float(env, "INSTALL_PY_TIMEOUT", 600.0),
            node_package_cache=Path(env.get("NODE_PACKAGE_CACHE") or volume_root / ".cache" / "node-packages"),
            comfy_pid_file=Path(env.get("COMFY_PID_FILE") or "/tmp/comfyui.pid"),
            comfy_log_file=Path(env.get("COMFY_LOG_FILE") or "/tmp/comfyui.log"),
            comfy_ready_timeout=_float(env, "COMFY_READY_TIMEOUT", 300.0),
            max_image_mb=_float(env, "MAX_IMAGE_MB", 100.0),
            runpod_log_level=(env.get("RUNPOD_LOG_LEVEL") or env.get("RUNPOD_DEBUG_LEVEL") or "INFO").upper(),
            hf_endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            civitai_base_url=(env.get("CIVITAI_BASE_URL") or "https://civitai.com").rstrip("/"),
            download_connections=max(1, _int(env, "DOWNLOAD_CONNECTIONS", 32)),
            download_retries=max(1, _int(env, "DOWNLOAD_RETRIES", 5)),
            download_retry_backoff=max(0.0, _float(env, "DOWNLOAD_RETRY_BACKOFF", 1.0)),
            download_log_interval=max(0.1, _float(env, "DOWNLOAD_LOG_INTERVAL", 10.0)),
            mode=mode,
            allow_cpu=_flag(env, "ALLOW_CPU"),
            comfyui_update=_flag(env, "COMFYUI_UPDATE"),
            comfy_restart=_flag(env, "COMFY_RESTART") if env.get("COMFY_RESTART") else mode != "serverless",
            warmup_workflow=Path(env["WARMUP_WORKFLOW"]) if env.get("WARMUP_WORKFLOW") else None,
            jupyter_auth=_choice(env, "JUPYTER_AUTH", ("token", "none")),
            api_auth=_choice(env, "API_AUTH", ("token", "none")),
            runsync_wait_s=max(0.0, _float(env, "RUNSYNC_WAIT_S", 90.0)),
            max_queue_depth=max(0, _int(env, "MAX_QUEUE_DEPTH", 100)),
            max_request_mb=max(0.001, _float(env, "MAX_REQUEST_MB", 20.0)),
            result_ttl_s=max(1.0, _float(env, "RESULT_TTL_S", 1800.0)),
            webhook_retries=max(0, _int(env, "WEBHOOK_RETRIES", 9)),
            webhook_retry_backoff=max(0.0, _float(env, "WEBHOOK_RETRY_BACKOFF", 1.0)),
            webhook_retry_max_delay=max(0.0, _float(env, "WEBHOOK_RETRY_MAX_DELAY", 120.0)),
            webhook_allow_hosts=_hosts(env.get("WEBHOOK_ALLOW_HOSTS", ""), "WEBHOOK_ALLOW_HOSTS"),
            max_stored_result_mb=max(0.001, _float(env, "MAX_STORED_RESULT_MB", 20.0)),
            enable_jupyter=_flag(env, "ENABLE_JUPYTER") if env.get("ENABLE_JUPYTER") else mode != "serverless",
            node_map_url=env.get("COMFY_NODE_MAP_URL") or DEFAULT_NODE_MAP_URL,
            node_stats_url=env.get("COMFY_NODE_STATS_URL") or DEFAULT_NODE_STATS_URL,
            model_list_url=env.get("COMFY_MODEL_LIST_URL") or DEFAULT_MODEL_LIST_URL,
            registry_url=(env.get("COMFY_REGISTRY_URL") or DEFAULT_REGISTRY_URL).rstrip("/"),
            user_cache_dir=Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache"),
            hf_cache_dirs=hf_cache_dirs(env),
            job_model_hosts=(
                _hosts(env["JOB_MODEL_HOSTS"], "JOB_MODEL_HOSTS") if env.get("JOB_MODEL_HOSTS", "").strip() else None
            ),
            job_models_max_gb=max(0.0, _float(env, "JOB_MODELS_MAX_GB", DEFAULT_JOB_MODELS_MAX_GB)),
            jupyter_password=env.get("JUPYTER_PASSWORD") or None,
            api_token=env.get("API_TOKEN") or None,
            config_yml=env.get("CONFIG_YML"),  # set but empty is kept: an error, not "unset"
            bucket_access_key_id=env.get("BUCKET_ACCESS_KEY_ID") or None,
            bucket_secret_access_key=env.get("BUCKET_SECRET_ACCESS_KEY") or None,
            comfy_org_api_key=env.get("COMFY_ORG_API_KEY") or None,
            hf_token=env.get("HF_TOKEN") or None,
            civitai_token=env.get("CIVITAI_TOKEN") or None,
            github_token=env.get("GITHUB_TOKEN") or None,
            runpod_api_url=(env.get("RUNPOD_API_URL") or DEFAULT_RUNPOD_API_URL).rstrip("/"),
            runpod_api_key=env.get("RUNPOD_API_KEY") or None,
            secret_list=tuple(secret_values(env)),
            secret_names=tuple(n for n, _ in secret_items(env)),
        )

    def effective_comfyui_ref(self, config_ref: str | None) -> str:
        return self.comfyui_ref or config_ref or DEFAULT_COMFYUI_REF

    @property
    def models_dir(self) -> Path:
        return self.comfyui_path / "models"

    @property
    def comfy_on_death(self) -> str:
        """What follows ComfyUI's death: ``replaced`` (serverless: RunPod replaces the worker), ``restarted``
        (pod/local with COMFY_RESTART: the supervisor starts it again) or ``stopped`` (COMFY_RESTART=0)."""
        if self.mode == "serverless":
            return "replaced"
        return "restarted" if self.comfy_restart else "stopped"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.comfyui_path / "custom_nodes"

    @property
    def lock_file(self) -> Path:
        return self.volume_root / "comfy.lock.yml"

    def secrets(self) -> list[str]:
        """The values of every secret variable that was set when these settings were read."""
        return list(self.secret_list)

    def secret_items(self) -> list[tuple[str, str]]:
        """(name, value) of every secret variable that was set when these settings were read."""
        return list(zip(self.secret_names, self.secret_list, strict=True))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of every secret env var that is set (for log redaction and returned errors)."""
    return [v for _, v in secret_items(env)]


def secret_items(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(name, value) of every secret env var that is set (4 characters or more)."""
    env = os.environ if env is None else env
    return [(n, v) for n, v in env.items() if is_secret_name(n) and v and len(v) >= 4]


def shell_exports(settings: Settings) -> str:
    """The defaults the shell scripts use, as ``export NAME=value`` lines (no secret among them)."""
    values = {
        "VOLUME_ROOT": settings.volume_root,
        "COMFYUI_PATH": settings.comfyui_path,
        "APP_DIR": settings.app_dir,
        "COMFY_HOST": settings.comfy_host,
        "COMFY_PORT": settings.comfy_port,
        "API_PORT": settings.api_port,
        "JUPYTER_PORT": settings.jupyter_port,
        "COMFY_PID_FILE": settings.comfy_pid_file,
        "COMFY_LOG_FILE": settings.comfy_log_file,
        "MODE": settings.mode,
    }
    return "".join(f"export {name}={shlex.quote(str(value))}\n" for name, value in values.items())


def main(argv: list[str]) -> int:
    if argv != ["--export"]:
        print("usage: python -m comfy_worker.settings --export", file=sys.stderr)
        return 2
    try:
        print(shell_exports(Settings.from_env()), end="")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
