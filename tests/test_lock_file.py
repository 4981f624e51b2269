"""comfy.lock.yml (docs/architecture.md): sections kept apart under concurrent writers, and a damaged
file (any shape) read as sane sections with a warning, then rewritten by the next write, also end
to end through download_models.py and install_nodes.py."""

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import yaml

from comfy_worker.lock_file import read_lock_file, update_lock_file

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# comfy.lock.yml"
GOOD_MODEL = {"url": "https://e.example/m.bin", "destination": "vae", "filename": "m.bin", "sha256": None, "size": 5}
GOOD_NODE = {"url": "https://github.com/a/b.git", "version": "abc", "name": "b"}


def _write_section(args):
    path, section, i = args
    if section == "models":
        record = {"url": f"https://e.example/{i}", "destination": "vae"}
    else:
        record = {"url": f"https://github.com/a/{i}.git", "version": f"v{i}"}
    update_lock_file(Path(path), section, [record])


def test_lock_file_sections_survive_concurrent_writers(tmp_path):
    path = tmp_path / "comfy.lock.yml"
    update_lock_file(path, "comfyui", {"ref": "abc"})
    jobs = [(str(path), "models" if i % 2 else "nodes", i) for i in range(16)]
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_write_section, jobs))
    data = read_lock_file(path)
    assert data["comfyui"] == {"ref": "abc"}
    assert set(data) == {"comfyui", "models", "nodes"}
    assert yaml.safe_load(path.read_text()) == data
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".comfy.lock.yml.*"))
    assert path.stat().st_mode & 0o777 == 0o644


def test_damaged_lock_file_is_rewritten_not_fatal(tmp_path, caplog):
    path = tmp_path / "comfy.lock.yml"
    path.write_text("models: [unclosed\n")
    assert read_lock_file(path) == {}
    assert "ignoring unreadable" in caplog.text
    update_lock_file(path, "nodes", [{"url": "https://github.com/a/b.git", "version": "abc"}])
    assert read_lock_file(path) == {"nodes": [{"url": "https://github.com/a/b.git", "version": "abc"}]}
    path.write_text("- just\n- a list\n")
    assert read_lock_file(path) == {}


DAMAGED = {
    "models_is_a_number": ("models: 5\n", {}, "section 'models' (an int, not a list)"),
    "models_is_true": ("models: true\n", {}, "section 'models' (a bool, not a list)"),
    "nodes_is_a_string": ('nodes: "x"\n', {}, "section 'nodes' (a str, not a list)"),
    "filename_is_a_number": (
        yaml.safe_dump({"models": [{**GOOD_MODEL, "filename": 5}, GOOD_MODEL]}),
        {"models": [GOOD_MODEL]},
        "models[0] ('filename' is an int)",
    ),
    "filename_is_a_list": (
        yaml.safe_dump({"models": [{**GOOD_MODEL, "filename": ["a", "b"]}]}),
        {"models": []},
        "models[0] ('filename' is a list)",
    ),
    "size_is_a_bool_and_record_not_a_mapping": (
        yaml.safe_dump({"models": [{**GOOD_MODEL, "size": True}, 7], "nodes": [GOOD_NODE, {"url": "u"}]}),
        {"models": [], "nodes": [GOOD_NODE]},
        "models[0] ('size' is a bool); models[1] (is an int, not a mapping); nodes[1] (has no 'version')",
    ),
    "version_is_a_number": (
        yaml.safe_dump({"nodes": [{**GOOD_NODE, "version": 1234567}]}),
        {"nodes": []},
        "nodes[0] ('version' is an int)",
    ),
    "comfyui_is_a_list": ("comfyui: [1]\nnodes: []\n", {"nodes": []}, "section 'comfyui'"),
}


@pytest.mark.parametrize("text,expected,warning", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_sections_and_records_are_left_out_with_a_warning(tmp_path, caplog, text, expected, warning):
    path = tmp_path / "comfy.lock.yml"
    path.write_text(text)
    data = read_lock_file(path)
    assert data == expected and data.damaged
    assert all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for k, v in data.items() if k != "comfyui")
    assert f"ignoring damaged parts of {path}: {warning}" in caplog.text
    assert "it will be rewritten without them" in caplog.text


@pytest.mark.parametrize(
    "data,warning",
    [
        (b"\x00\xff\xfe binary \x80\x81 junk", "ignoring unreadable"),
        (b"- a top-level\n- list\n", "not a mapping but a list"),
        (b"just a sentence\n", "not a mapping but a str"),
        (b"models: " + b"1" * 5000 + b"\n", "ignoring unreadable"),  # an int Python refuses to convert
        (b"[" * 3000 + b"]" * 3000, "ignoring unreadable"),
    ],
    ids=["binary", "list", "scalar", "huge_int", "deep"],
)
def test_unreadable_or_wrong_shaped_files_count_as_empty(tmp_path, caplog, data, warning):
    path = tmp_path / "comfy.lock.yml"
    path.write_bytes(data)
    result = read_lock_file(path)
    assert result == {} and result.damaged
    assert warning in caplog.text


def test_unknown_fields_and_sections_of_newer_writers_are_kept(tmp_path, caplog):
    path = tmp_path / "comfy.lock.yml"
    data = {"comfyui": {"ref": "abc"}, "models": [{**GOOD_MODEL, "verified": False}], "extra": {"k": [1]}}
    path.write_text(yaml.safe_dump(data))
    result = read_lock_file(path)
    assert result == data and not result.damaged
    assert "ignoring" not in caplog.text


def test_the_next_write_rewrites_a_damaged_file_without_the_damage(tmp_path):
    path = tmp_path / "comfy.lock.yml"
    path.write_text(yaml.safe_dump({"models": [{**GOOD_MODEL, "filename": [1]}, GOOD_MODEL], "nodes": "x"}))
    update_lock_file(path, "models", lambda old: [*old, {**GOOD_MODEL, "filename": "n.bin"}])
    assert yaml.safe_load(path.read_text()) == {"models": [GOOD_MODEL, {**GOOD_MODEL, "filename": "n.bin"}]}


# ---- end to end: both scripts recover from a damaged lock file and rewrite it ----

DAMAGED_FILES = {
    "models_is_a_number": "models: 5\nnodes: x\n",
    "models_is_true": "models: true\n",
    "records_of_wrong_types": yaml.safe_dump(
        {
            "models": [
                {**GOOD_MODEL, "destination": "vae", "filename": 5},
                {**GOOD_MODEL, "destination": "vae", "filename": ["a", "b"]},
                "junk",
            ],
            "nodes": [{"url": 5, "version": []}],
        }
    ),
    "top_level_list": "- 1\n- 2\n",
    "binary": "\x00\x01 \udcff",
}


def _write_damaged(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


def _run(script: str, config: Path, volume: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(volume), "VOLUME_ROOT": str(volume), "DOWNLOAD_RETRIES": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=volume,
        timeout=120,
    )


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("text", DAMAGED_FILES.values(), ids=DAMAGED_FILES.keys())
def test_download_models_recovers_from_a_damaged_lock_file_and_rewrites_it(tmp_path, file_server, text):
    served, base = file_server
    body = b"model bytes"
    (served / "m.bin").write_bytes(body)
    volume = tmp_path / "volume"
    target = volume / "ComfyUI" / "models" / "vae" / "m.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(body)  # present: verified, then recorded (the write that rewrites the file)
    sha = hashlib.sha256(body).hexdigest()
    config = tmp_path / "config.yml"
    config.write_text(f"models:\n  - url: {base}/m.bin\n    destination: vae\n    sha256: {sha}\n")
    lock = volume / "comfy.lock.yml"
    _write_damaged(lock, text)

    result = _run("download_models.py", config, volume)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "WARNING comfy_worker.lock_file: ignoring" in result.stderr and str(lock) in result.stderr
    data = yaml.safe_load(lock.read_text())
    assert lock.read_text().startswith(HEADER)
    assert data["models"] == [
        {"url": f"{base}/m.bin", "destination": "vae", "filename": "m.bin", "sha256": sha, "size": len(body)}
    ]
    assert read_lock_file(lock) == data  # sane now: no warning on the next read

    empty = tmp_path / "empty.yml"
    empty.write_text("models: []\n")
    _write_damaged(lock, text)
    result = _run("download_models.py", empty, volume)  # nothing to record: rewritten all the same
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert read_lock_file(lock).damaged is False


INSTALL_NODES_CASES = [pytest.param(text, id=name) for name, text in DAMAGED_FILES.items()]


@pytest.mark.parametrize("text", INSTALL_NODES_CASES)
def test_install_nodes_recovers_from_a_damaged_lock_file_and_rewrites_it(tmp_path, text):
    volume = tmp_path / "volume"
    volume.mkdir()
    config = tmp_path / "config.yml"
    config.write_text("nodes: []\n")
    lock = volume / "comfy.lock.yml"
    _write_damaged(lock, text)

    result = _run("install_nodes.py", config, volume)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "WARNING comfy_worker.lock_file: ignoring" in result.stderr and str(lock) in result.stderr
    assert lock.read_text().startswith(HEADER)
    data = yaml.safe_load(lock.read_text())
    assert data["nodes"] == []
    assert read_lock_file(lock) == data
