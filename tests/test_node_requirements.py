"""node_requirements.py: node requirements installed with the real uv/pip from a local wheel
folder into a small throwaway venv whose "torch" is a fake 1.0.0 dist (the project's .venv and
its real torch are never the target)."""

from __future__ import annotations

import sys

import pytest
from support.wheels import installed_version, installer_of, make_venv, make_wheel, wheel_env

from comfy_worker import node_requirements


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    make_wheel(folder, "torch", "1.0.0")
    make_wheel(folder, "torch", "9.9.9")
    make_wheel(folder, "torchvision", "0.1.0", ["torch==1.0.0"])
    make_wheel(folder, "tinypkg", "1.0")
    make_wheel(folder, "tinypkg", "2.0")
    for key, value in wheel_env(folder).items():
        monkeypatch.setenv(key, value)
    return folder


@pytest.fixture
def venv(tmp_path, wheels):
    python = make_venv(tmp_path / "venv", wheels, ["torch==1.0.0", "torchvision==0.1.0"])
    return node_requirements.target_env(str(python))


def node(tmp_path, name, requirements=None, install_py=None):
    path = tmp_path / "custom_nodes" / name
    path.mkdir(parents=True)
    if requirements is not None:
        (path / "requirements.txt").write_text(requirements)
    if install_py is not None:
        (path / "install.py").write_text(install_py)
    return node_requirements.NodeReqs(f"nodes[0] {name}", path, "c0ffee" * 6 + "abcd")


def test_target_env_is_the_running_python_or_PYTHON(venv):
    assert node_requirements.target_env(None).python == sys.executable and node_requirements.target_env(None).is_current
    assert venv.prefix.name == "venv" and not venv.is_current  # a venv's python symlink is not resolved


def test_constraints_pin_the_installed_torch_packages(venv):
    versions = node_requirements.protected_versions(venv)
    assert versions == {"torch": "1.0.0", "torchvision": "0.1.0"}  # torchaudio is not installed there
    assert node_requirements.constraints_text(versions) == "torch==1.0.0\ntorchvision==0.1.0\n"


def test_requirement_installed_from_local_wheel_folder(tmp_path, venv):
    a = node(tmp_path, "NodeA", "tinypkg==1.0\n")
    assert node_requirements.install([a], venv) == {a.label: None}
    assert installed_version(venv.python, "tinypkg") == "1.0"


def test_node_asking_for_another_torch_is_named_and_others_still_install(tmp_path, venv):
    good = node(tmp_path, "Good", "tinypkg\n")
    bad = node(tmp_path, "WantsTorch9", "torch==9.9.9\n")
    bad.label = "nodes[1] WantsTorch9"
    unpinned = node(tmp_path, "TorchAnyVersion", "torch\n")
    unpinned.label = "nodes[2] TorchAnyVersion"
    result = node_requirements.install([good, bad, unpinned], venv)
    assert result[good.label] is None and result[unpinned.label] is None
    assert result[bad.label].startswith("nodes[1] WantsTorch9: requirements.txt cannot be installed")
    assert "torch==9.9.9" in result[bad.label] and "pinned" in result[bad.label]
    assert installed_version(venv.python, "torch") == "1.0.0"
    assert installed_version(venv.python, "tinypkg") == "2.0"


def test_pip_is_used_when_uv_is_not(tmp_path, wheels):
    env = node_requirements.target_env(str(make_venv(tmp_path / "pipvenv", wheels, ["torch==1.0.0"], pip=True)))
    assert node_requirements.find_uv(env, "pip") is None
    a = node(tmp_path, "NodeA", "tinypkg==1.0\n")
    b = node(tmp_path, "WantsTorch9", "torch==9.9.9\n")
    b.label = "nodes[1] WantsTorch9"
    result = node_requirements.install([a, b], env, installer_mode="pip")
    assert result[a.label] is None and "nodes[1] WantsTorch9" in result[b.label]
    assert installed_version(env.python, "tinypkg") == "1.0"
    assert installed_version(env.python, "torch") == "1.0.0"
    assert installer_of(env.python, "tinypkg") == "pip"  # pip wrote it (uv would write "uv")


def test_install_py_runs_with_the_constraints_in_its_environment(tmp_path, venv):
    script = "import os, pathlib\npathlib.Path('seen.txt').write_text(open(os.environ['PIP_CONSTRAINT']).read())\n"
    a = node(tmp_path, "WithInstallPy", install_py=script)
    assert node_requirements.install([a], venv) == {a.label: None}
    assert (a.path / "seen.txt").read_text() == "torch==1.0.0\ntorchvision==0.1.0\n"


def test_install_py_failure_and_timeout_are_reported_by_name(tmp_path, venv):
    failing = node(tmp_path, "Failing", install_py="raise SystemExit('no GPU here')\n")
    slow = node(tmp_path, "Slow", install_py="import time\ntime.sleep(60)\n")
    slow.label = "nodes[1] Slow"
    result = node_requirements.install([failing, slow], venv, install_py_timeout=1)
    assert "nodes[0] Failing: install.py failed with exit code 1" in result[failing.label]
    assert "no GPU here" in result[failing.label]
    assert result[slow.label].startswith("nodes[1] Slow: install.py did not finish within 1 s")


def test_record_lives_in_the_target_environment(tmp_path, venv):
    assert node_requirements.read_record(venv) == {}
    node_requirements.write_record(venv, {"/vol/custom_nodes/A": "abc", "/vol/custom_nodes/B": "def"})
    node_requirements.write_record(venv, {"/vol/custom_nodes/C": "123"}, forget=["/vol/custom_nodes/A"])
    assert venv.record_path.parent == venv.prefix
    assert node_requirements.read_record(venv) == {"/vol/custom_nodes/B": "def", "/vol/custom_nodes/C": "123"}


def test_installer_caches_go_to_the_volume_unless_the_user_chose_them(tmp_path, monkeypatch):
    monkeypatch.delenv("UV_CACHE_DIR", raising=False)
    monkeypatch.delenv("PIP_CACHE_DIR", raising=False)
    monkeypatch.delenv("UV_LINK_MODE", raising=False)
    cache = tmp_path / "volume" / ".cache" / "node-packages"
    assert node_requirements.cache_env(cache) == {
        "PIP_CACHE_DIR": str(cache / "pip"),
        "UV_CACHE_DIR": str(cache / "uv"),
        "UV_LINK_MODE": "copy",
    }
    monkeypatch.setenv("UV_CACHE_DIR", "/mine")
    assert "UV_CACHE_DIR" not in node_requirements.cache_env(cache)
    assert node_requirements.cache_env(None) == {}
