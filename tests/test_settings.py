"""settings: every env var read in one place, with the documented defaults (docs/env.md)."""

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_worker.settings import APP_DIR, Settings, is_secret_name, secret_values

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_for_a_local_box():
    s = Settings.from_env({})
    assert s.comfy_host == "127.0.0.1:8188"
    assert (s.api_port, s.jupyter_port) == (8000, 8888)
    assert s.job_timeout == 600 and s.max_response_mb == 18
    assert s.bucket_endpoint_url is None and s.bucket_name == "comfyui-outputs"
    assert s.comfyui_path == s.volume_root / "ComfyUI"
    assert s.effective_comfyui_ref(None) == "v0.3.75"
    if not Path("/runpod-volume").is_dir() and not Path("/workspace").is_dir():
        assert s.volume_root == APP_DIR / "workspace"


def test_paths_and_overrides():
    s = Settings.from_env(
        {"VOLUME_ROOT": "/v", "COMFY_PORT": "9000", "COMFYUI_REF": "master", "COMFY_JOB_TIMEOUT": "5"}
    )
    assert s.comfyui_path == Path("/v/ComfyUI") and s.lock_file == Path("/v/comfy.lock.yml")
    assert s.comfy_host == "127.0.0.1:9000"
    assert s.effective_comfyui_ref("v0.3.70") == "master"
    assert s.job_timeout == 5


def test_bad_number_names_the_variable():
    with pytest.raises(ValueError, match="COMFY_PORT must be a whole number, got 'abc'"):
        Settings.from_env({"COMFY_PORT": "abc"})


def test_webhook_allow_hosts_is_a_host_list_and_a_malformed_entry_names_the_variable():
    settings = Settings.from_env({"WEBHOOK_ALLOW_HOSTS": " hooks.internal , 127.0.0.1:9000,,[::1]:80 "})
    assert settings.webhook_allow_hosts == ("hooks.internal", "127.0.0.1:9000", "[::1]:80")
    assert Settings.from_env({}).webhook_allow_hosts == ()
    with pytest.raises(ValueError, match=r"environment variable WEBHOOK_ALLOW_HOSTS: 'host:http': the port must"):
        Settings.from_env({"WEBHOOK_ALLOW_HOSTS": "ok.example, host:http"})


def test_secrets_are_not_in_repr():
    s = Settings.from_env({"HF_TOKEN": "hf_secret_value", "BUCKET_SECRET_ACCESS_KEY": "s3secret"})
    assert "hf_secret_value" not in repr(s) and "s3secret" not in repr(s)
    assert set(s.secrets()) == {"hf_secret_value", "s3secret"}
    assert set(secret_values({"HF_TOKEN": "hf_secret_value", "OTHER": "x"})) == {"hf_secret_value"}


def test_every_secret_is_one_list_for_logs_errors_and_child_processes():
    env = {
        "JUPYTER_PASSWORD": "jupyter-pass",
        "RUNPOD_AI_API_KEY": "rp-key-123",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "HF_TOKEN": "hf_value",
        "COMFY_PORT": "8188",
    }
    assert set(Settings.from_env(env).secrets()) == {"jupyter-pass", "rp-key-123", "aws-secret", "hf_value"}
    assert set(secret_values(env)) == set(Settings.from_env(env).secrets())
    assert is_secret_name("AWS_SESSION_TOKEN") and is_secret_name("API_TOKEN") and not is_secret_name("COMFY_PORT")


def export(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comfy_worker.settings", "--export"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
    )


def test_export_prints_the_defaults_the_shell_uses(tmp_path):
    volume = tmp_path / "my volume"
    out = export({"VOLUME_ROOT": str(volume), "COMFY_PORT": "9001", "HF_TOKEN": "hf_dont_print"})
    assert out.returncode == 0, out.stderr
    values = dict(re.findall(r"^export (\w+)=(.*)$", out.stdout, re.M))
    assert values["VOLUME_ROOT"] == f"'{volume}'"  # quoted for the shell
    assert values["COMFYUI_PATH"] == f"'{volume}/ComfyUI'"
    assert values["COMFY_PORT"] == "9001" and values["COMFY_HOST"] == "127.0.0.1:9001"
    assert values["APP_DIR"] == str(ROOT) and values["API_PORT"] == "8000"
    assert "hf_dont_print" not in out.stdout
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1"; printf %s "$COMFYUI_PATH"', "_", out.stdout], capture_output=True, text=True
    )
    assert shell.stdout == f"{volume}/ComfyUI"


def test_export_with_a_malformed_variable_exits_2_naming_it():
    out = export({"API_PORT": "eighty"})
    assert out.returncode == 2 and "API_PORT must be a whole number" in out.stderr and not out.stdout


def _fields_moved_by(name: str) -> set[str]:
    """The Settings fields that an env var changes (found by setting it, not by reading the source)."""
    base = dataclasses.asdict(Settings.from_env({}))
    moved: set[str] = set()
    for sample in ("7", "1", "pip", "none", "x-sample"):
        try:
            changed = dataclasses.asdict(Settings.from_env({name: sample}))
        except ValueError:
            continue
        moved |= {k for k in base if base[k] != changed[k]}
    return moved - {"secret_list"}


def _readers_of(field: str) -> set[str]:
    """``field`` and the Settings methods and properties that read it (e.g. effective_comfyui_ref)."""
    names = {field}
    for name, member in vars(Settings).items():
        func = member.fget if isinstance(member, property) else member
        if callable(func) and not name.startswith("__") and f"self.{field}" in inspect.getsource(func):
            names.add(name)
    return names


def _code_outside_settings() -> str:
    files = [
        *ROOT.glob("*.py"),
        *ROOT.glob("comfy_worker/*.py"),
        *ROOT.glob("*.sh"),
        *ROOT.glob("scripts/*.sh"),
        ROOT / ".ci" / "run",
    ]
    return "\n".join(f.read_text() for f in files if f.name != "settings.py" and f.is_file())


def test_docs_promise_only_variables_the_code_uses():
    """A documented variable must change a setting that code outside settings.py reads (or be one
    of the secrets, which are redacted wherever they are set)."""
    doc = (ROOT / "docs" / "env.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", doc, re.M))
    documented |= set(re.findall(r"^\| `[A-Z_]+`, `([A-Z][A-Z0-9_]+)`", doc, re.M))
    code = _code_outside_settings()
    unused = []
    for name in sorted(documented):
        if is_secret_name(name):
            continue
        fields = _fields_moved_by(name)
        readers = set().union(*(_readers_of(f) for f in fields)) if fields else set()
        used = any(re.search(rf"[sS]ettings(?:\.from_env\(\))?\.{r}\b", code) for r in readers)
        if not used and f"${name}" not in code:
            unused.append(f"{name} (moves {sorted(fields) or 'nothing'})")
    assert unused == [], "documented in docs/env.md but no code uses them"


def test_docs_env_table_lists_exactly_the_variables_settings_reads():
    root = ROOT
    source = (root / "comfy_worker" / "settings.py").read_text()
    read = set(re.findall(r'env(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'_(?:int|float|flag|choice)\(env, "([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source[source.index("SECRET_ENV_NAMES") :].split(")")[0]))
    doc = (root / "docs" / "env.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", doc, re.M))
    documented |= set(re.findall(r"^\| `[A-Z_]+`, `([A-Z][A-Z0-9_]+)`", doc, re.M))
    assert read - documented == set(), "read by settings.py but missing from docs/env.md"
    assert documented - read == set(), "documented in docs/env.md but never read by settings.py"
