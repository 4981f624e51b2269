"""--validate-only of download_models.py and install_nodes.py, where the config comes from
(docs/config-reference.md: --config, CONFIG_YML, the volume's, the image's) and the errors of each source, and
the shared CLI pieces (summary table, sizes). comfy.lock.yml: tests/test_lock_file.py."""

import base64
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from comfy_worker.cli import format_table, human_size, run_parallel

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["download_models.py", "install_nodes.py"]

INVALID = textwrap.dedent(
    """\
    models:
      - url: https://huggingface.co/org/repo/resolve/main/model.safetensors
        destination: ../checkpoints
        sha265: abc
    nodes:
      - url: https://github.com/org/Node.git
        version: --upload-pack=evil
    """
)


def run(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    clean_env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "VOLUME_ROOT": "/nonexistent-volume", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=clean_env, cwd=cwd
    )


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("config", ["config.yml", "config.example.yml"])
def test_shipped_configs_validate(script, config):
    result = run(script, "--validate-only", "--config", str(ROOT / config))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"ok: {ROOT / config} is valid (")
    assert "ComfyUI v0.3.75" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_invalid_config_exits_2_with_one_line_per_problem(script, tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(INVALID)
    result = run(script, "--validate-only", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: {path} is invalid (3 problem(s)):"
    url = "https://huggingface.co/org/repo/resolve/main/model.safetensors"
    assert lines[1:] == [
        f"  models[0] ({url}): destination: must not contain '..' ('../checkpoints'); "
        "everything stays inside ComfyUI's folders",
        f"  models[0] ({url}): unknown key 'sha265'; did you mean 'sha256'?",
        "  nodes[0] (https://github.com/org/Node.git): version: must not begin with '-' "
        "('--upload-pack=evil' would be read as a command-line option)",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_yml_env_is_used_when_no_config_flag(script):
    encoded = base64.b64encode(b"models:\n  - url: https://e.example/a.bin\n    destination: vae\n").decode()
    result = run(script, "--validate-only", env={"CONFIG_YML": encoded})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: CONFIG_YML is valid (1 model(s), 0 node(s)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_undecodable_config_yml_fails_and_does_not_fall_back(script, tmp_path):
    (tmp_path / "config.yml").write_text("models: []\n")  # a valid file that must NOT be used instead
    result = run(script, "--validate-only", env={"CONFIG_YML": "@@@ not base64 @@@", "VOLUME_ROOT": str(tmp_path)})
    assert result.returncode == 2
    assert "CONFIG_YML is invalid" in result.stderr
    assert "neither a YAML mapping" in result.stderr


def test_volume_config_wins_over_app_config(tmp_path):
    volume, app = tmp_path / "volume", tmp_path / "app"
    volume.mkdir()
    app.mkdir()
    (app / "config.yml").write_text("models: []\n")
    env = {"VOLUME_ROOT": str(volume), "APP_DIR": str(app)}
    assert f"ok: {app / 'config.yml'} is valid" in run("install_nodes.py", "--validate-only", env=env).stdout
    (volume / "config.yml").write_text("nodes:\n  - url: https://github.com/a/b.git\n")
    result = run("install_nodes.py", "--validate-only", env=env)
    assert result.stdout.startswith(f"ok: {volume / 'config.yml'} is valid (0 model(s), 1 node(s)")


def test_no_config_anywhere_is_a_clear_error(tmp_path):
    result = run("download_models.py", "--validate-only", env={"VOLUME_ROOT": str(tmp_path), "APP_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "no config found: pass --config, set CONFIG_YML, or create" in result.stderr


def test_format_table_aligns_columns():
    table = format_table(["name", "size"], [["a.safetensors", "1.0 GiB"], ["b", "12 B"]])
    assert table.splitlines() == [
        "name           size",
        "-------------  -------",
        "a.safetensors  1.0 GiB",
        "b              12 B",
    ]


def test_human_size():
    assert human_size(None) == "?"
    assert human_size(512) == "512 B"
    assert human_size(10 * 1024) == "10.0 KiB"
    assert human_size(3 * 1024**3) == "3.0 GiB"


@pytest.mark.parametrize("script", SCRIPTS)
def test_malformed_env_var_is_one_line_and_exit_2(script):
    result = run(script, "--validate-only", "--config", str(ROOT / "config.yml"), env={"COMFY_PORT": "eighty"})
    assert result.returncode == 2
    assert result.stderr == "error: environment variable COMFY_PORT must be a whole number, got 'eighty'\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_utf8_config_is_invalid_exit_2_naming_file_and_offset(script, tmp_path):
    path = tmp_path / "config.yml"
    path.write_bytes(b"# caf\xe9\nmodels: []\n")
    result = run(script, "--validate-only", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {path} is invalid (1 problem(s)):",
        f"  {path} is not UTF-8 text: byte 0xe9 at byte offset 5 (line 1) cannot be decoded; save it as UTF-8",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_duplicate_keys_exit_2_with_both_lines(script, tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("nodes:\n  - url: https://github.com/a/b.git\nnodes:\n  - url: https://github.com/a/c.git\n")
    result = run(script, "--validate-only", "--config", str(path))
    assert result.returncode == 2
    assert "  duplicate key 'nodes' at line 3 (first at line 1)" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_config_yml_is_an_error_and_does_not_fall_back(script, tmp_path):
    (tmp_path / "config.yml").write_text("models: []\n")  # a valid file that must NOT be used instead
    result = run(script, "--validate-only", env={"CONFIG_YML": "", "VOLUME_ROOT": str(tmp_path)})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: CONFIG_YML is invalid (1 problem(s)):\n  the value is empty;")


@pytest.mark.parametrize("script", SCRIPTS)
def test_alias_bomb_config_yml_gives_a_short_message_fast(script):
    lines = ["models:", "- url: &a [x,x,x,x,x,x,x,x,x]", "  destination: vae"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines += [f"- url: &{name} [{','.join(['*' + prev] * 9)}]", "  destination: vae"]
    started = time.monotonic()
    result = run(script, "--validate-only", env={"CONFIG_YML": "\n".join(lines)})
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert len(result.stderr) < 2000, len(result.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_yml_syntax_error_gives_line_and_column(script):
    result = run(script, "--validate-only", env={"CONFIG_YML": "models:\n\t- url: x\n"})
    assert result.returncode == 2
    assert "Read as YAML, it is not valid YAML at line 2, column 1" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_token_in_a_model_url_is_rejected_masked(script, tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(
        "models:\n  - url: https://civitai.com/api/download/models/1?token=SeCrEt1234\n    destination: loras\n"
    )
    result = run(script, "--validate-only", "--config", str(path))
    assert result.returncode == 2
    assert "SeCrEt1234" not in result.stderr
    assert "(token=***)" in result.stderr and "CIVITAI_TOKEN" in result.stderr


RUN_PARALLEL_SCRIPT = """
import sys, threading, time
from comfy_worker.cli import run_parallel
from comfy_worker.volume_lock import Interrupted

stop = threading.Event()

def work(item):
    sys.stdout.write(f"started {item}\\n")  # one write: two threads print at once
    sys.stdout.flush()
    stop.wait()
    time.sleep(0.5)  # winding down after the stop, while a second signal arrives
    return item

try:
    run_parallel(work, [1, 2, 3, 4], 2, stop)
except Interrupted as err:
    print("interrupted:", err, flush=True)
    sys.exit(3)
"""


def test_run_parallel_stops_on_sigterm_and_a_second_one_changes_nothing(tmp_path):
    script = tmp_path / "par.py"
    script.write_text(RUN_PARALLEL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    started = [proc.stdout.readline(), proc.stdout.readline()]
    assert all(line.startswith("started") for line in started)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # as tini -g and a parent both forward a container stop
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 3, err
    assert "interrupted: stopped by a signal" in out and "Traceback" not in err
    assert "started 3" not in out  # items not started are skipped


def test_run_parallel_returns_as_soon_as_the_last_item_is_done():
    """No polling delay at the end of a run (download_models.py's time for a small file is mostly
    fixed costs like this)."""
    stop = threading.Event()
    start = time.monotonic()
    for _ in range(10):
        assert run_parallel(lambda item: time.sleep(0.01) or item, [1, 2], 2, stop) == [1, 2]
    assert time.monotonic() - start < 0.4  # ten runs of 10 ms items; polling every 50 ms took over 0.5 s
