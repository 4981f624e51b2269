"""settings: every env var read in one place, with the documented defaults (docs/env.md)."""

from pathlib import Path

import pytest

from comfy_worker.settings import APP_DIR, Settings, secret_values


def test_defaults_for_a_local_box():
    s = Settings.from_env({})
    assert s.mode == "local"
    assert s.comfy_host == "127.0.0.1:8188"
    assert (s.api_port, s.jupyter_port) == (8000, 8888)
    assert s.job_timeout == 600 and s.max_response_mb == 18
    assert s.bucket_endpoint_url is None and s.bucket_name == "comfyui-outputs"
    assert s.comfyui_path == s.volume_root / "ComfyUI"
    assert s.effective_comfyui_ref(None) == "v0.3.75"
    if not Path("/runpod-volume").is_dir() and not Path("/workspace").is_dir():
        assert s.volume_root == APP_DIR / "workspace"


def test_mode_follows_runpod_variables():
    assert Settings.from_env({"RUNPOD_ENDPOINT_ID": "e"}).mode == "serverless"
    assert Settings.from_env({"RUNPOD_POD_ID": "p"}).mode == "pod"
    assert Settings.from_env({"RUNPOD_POD_ID": "p", "MODE": "local"}).mode == "local"


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


def test_secrets_are_not_in_repr():
    s = Settings.from_env({"HF_TOKEN": "hf_secret_value", "BUCKET_SECRET_ACCESS_KEY": "s3secret"})
    assert "hf_secret_value" not in repr(s) and "s3secret" not in repr(s)
    assert set(s.secrets()) == {"hf_secret_value", "s3secret"}
    assert set(secret_values({"HF_TOKEN": "hf_secret_value", "OTHER": "x"})) == {"hf_secret_value"}


def test_docs_env_table_lists_exactly_the_variables_settings_reads():
    import re

    root = Path(__file__).resolve().parents[1]
    source = (root / "comfy_worker" / "settings.py").read_text()
    read = set(re.findall(r'env(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'_(?:int|float|flag|choice)\(env, "([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source[source.index("SECRET_ENV_NAMES") :].split(")")[0]))
    doc = (root / "docs" / "env.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", doc, re.M))
    documented |= set(re.findall(r"^\| `[A-Z_]+`, `([A-Z][A-Z0-9_]+)`", doc, re.M))
    assert read - documented == set(), "read by settings.py but missing from docs/env.md"
    assert documented - read == set(), "documented in docs/env.md but never read by settings.py"
