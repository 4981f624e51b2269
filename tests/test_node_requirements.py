"""node_requirements.py: node requirements installed with the real uv/pip from a local wheel
folder into a small throwaway venv whose "torch" is a fake 1.0.0 dist (the project's .venv and
its real torch are never the target)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from support.wheels import UV, install_offline, installed_version, installer_of, make_venv, make_wheel, wheel_env

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
    # the exact build (===): "==1.0.0" would let a "1.0.0+cpu" build in (PEP 440 ignores local tags)
    assert node_requirements.constraints_text(versions) == "torch===1.0.0\ntorchvision===0.1.0\n"


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
    assert (a.path / "seen.txt").read_text() == "torch===1.0.0\ntorchvision===0.1.0\n"


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


# ---- torch: exact builds, its pinned dependencies, restores (docs/nodes.md) ----


def _set_version(python, name, version, folder):
    """Install ``name==version`` bypassing every constraint (what a careless install.py does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "UV_CONSTRAINT")}
    install_offline(python, folder, [f"{name}=={version}"], env=env)


def test_a_local_build_tag_of_the_same_torch_version_is_refused(tmp_path, wheels, venv):
    make_wheel(wheels, "torch", "1.0.0+cpu")
    a = node(tmp_path, "WantsCpuBuild", "torch==1.0.0+cpu\n")
    result = node_requirements.install([a], venv)
    assert result[a.label].startswith("nodes[0] WantsCpuBuild: requirements.txt cannot be installed"), result
    assert "\u2192" not in result[a.label]  # the resolver refused it: torch was never changed (and restored)
    assert installed_version(venv.python, "torch") == "1.0.0"


def test_torch_changed_to_a_local_build_is_restored_by_a_forced_reinstall(tmp_path, wheels, venv):
    make_wheel(wheels, "torch", "1.0.0+cpu")
    script = (
        "import os, subprocess, sys\n"
        "env = {k: v for k, v in os.environ.items() if k not in ('PIP_CONSTRAINT', 'UV_CONSTRAINT')}\n"
        f"subprocess.run([{str(UV)!r}, 'pip', 'install', '-q', '--python', sys.executable, 'torch==1.0.0+cpu'],"
        " env=env, check=True)\n"
    )
    a = node(tmp_path, "Sneaky", install_py=script)
    result = node_requirements.install([a], venv)
    assert "install.py changed torch 1.0.0 \u2192 1.0.0+cpu; restored torch===1.0.0" in result[a.label], result
    assert installed_version(venv.python, "torch") == "1.0.0"


def test_a_failed_restore_says_so_and_the_changed_torch_is_never_adopted(tmp_path, wheels, venv):
    make_wheel(wheels, "torch", "1.0.0+cpu")
    assert node_requirements.install([node(tmp_path, "First", "tinypkg==1.0\n")], venv)  # records the pins
    assert node_requirements.read_pins(venv) == {"torch": "1.0.0", "torchvision": "0.1.0"}
    _set_version(venv.python, "torch", "1.0.0+cpu", wheels)  # a node changed it ...
    kept = tmp_path / "kept"
    kept.mkdir()
    (wheels / "torch-1.0.0-py3-none-any.whl").rename(kept / "torch-1.0.0-py3-none-any.whl")  # ... and no restore
    b = node(tmp_path, "Second", "tinypkg==2.0\n")
    b.label = "nodes[1] Second"
    result = node_requirements.install([b], venv)
    assert "torch is not the build pinned for this environment: torch 1.0.0 \u2192 1.0.0+cpu" in result[b.label]
    assert "restoring torch===1.0.0 FAILED" in result[b.label] and "install them again by hand" in result[b.label]
    assert installed_version(venv.python, "tinypkg") == "1.0"  # nothing installed on top of a wrong torch
    # the next run still pins the recorded build, and restores it once it can
    assert node_requirements.read_pins(venv)["torch"] == "1.0.0"
    (kept / "torch-1.0.0-py3-none-any.whl").rename(wheels / "torch-1.0.0-py3-none-any.whl")
    assert node_requirements.install([b], venv) == {b.label: None}
    assert installed_version(venv.python, "torch") == "1.0.0" and installed_version(venv.python, "tinypkg") == "2.0"


def test_packages_torch_pins_are_pinned_too(tmp_path, monkeypatch):
    folder = tmp_path / "wheels-deps"
    make_wheel(folder, "torch", "1.0.0", ["tritonx==1.0", "sympyx>=1"])
    make_wheel(folder, "tritonx", "1.0", ["nvlibx==1.0"])
    make_wheel(folder, "nvlibx", "1.0")
    make_wheel(folder, "sympyx", "1.0")
    for version in ("2.0",):
        make_wheel(folder, "tritonx", version)
        make_wheel(folder, "nvlibx", version)
        make_wheel(folder, "sympyx", version)
    for key, value in wheel_env(folder).items():
        monkeypatch.setenv(key, value)
    env = node_requirements.target_env(str(make_venv(tmp_path / "venv", folder, ["torch==1.0.0"])))
    # torch's exact pins, recursively; a package it only bounds (sympyx>=1) stays free
    assert node_requirements.protected_versions(env) == {"torch": "1.0.0", "tritonx": "1.0", "nvlibx": "1.0"}
    a = node(tmp_path, "WantsNewTriton", "tritonx==2.0\n")
    b = node(tmp_path, "WantsNewNvlib", "nvlibx==2.0\n")
    b.label = "nodes[1] WantsNewNvlib"
    c = node(tmp_path, "WantsNewSympy", "sympyx==2.0\n")
    c.label = "nodes[2] WantsNewSympy"
    result = node_requirements.install([a, b, c], env)
    assert result[a.label].startswith("nodes[0] WantsNewTriton: requirements.txt cannot be installed"), result
    assert result[b.label].startswith("nodes[1] WantsNewNvlib: requirements.txt cannot be installed"), result
    assert result[c.label] is None
    assert installed_version(env.python, "tritonx") == "1.0" and installed_version(env.python, "nvlibx") == "1.0"
    assert installed_version(env.python, "sympyx") == "2.0"


# ---- what one node's requirements may do ----


def test_installer_options_of_one_node_do_not_reach_another(tmp_path, wheels, venv):
    other_index = tmp_path / "other-index"
    make_wheel(other_index, "tinypkg", "9.0")  # what B would get from A's --find-links
    make_wheel(other_index, "onlyina", "1.0")
    a = node(tmp_path, "WithOptions", f"--find-links {other_index}\n--pre\nonlyina==1.0\n")
    b = node(tmp_path, "Plain", "tinypkg\n")
    b.label = "nodes[1] Plain"
    assert node_requirements.install([a, b], venv) == {a.label: None, b.label: None}
    assert installed_version(venv.python, "onlyina") == "1.0"
    assert installed_version(venv.python, "tinypkg") == "2.0"  # from the configured index, not A's folder


@pytest.mark.parametrize(
    "line",
    ["./vendor/pkg", "vendor/pkg", "-e .", "--editable=./sub", "pkg @ file:./vendor/pkg", "file:vendor/pkg", "pkg.whl"],
)
def test_relative_paths_in_requirements_are_refused_by_name(tmp_path, venv, line, monkeypatch):
    launch = tmp_path / "launch"  # the folder the run starts from holds a package that must not be installed
    (launch / "vendor" / "pkg").mkdir(parents=True)
    (launch / "vendor" / "pkg" / "setup.py").write_text("raise SystemExit('must never be built')\n")
    monkeypatch.chdir(launch)
    a = node(tmp_path, "Vendored", f"tinypkg==1.0\n{line}\n")
    b = node(tmp_path, "Fine", "tinypkg==1.0\n")
    b.label = "nodes[1] Fine"
    result = node_requirements.install([a, b], venv)
    assert result[a.label].startswith(f"nodes[0] Vendored: requirements.txt line 2 ({line!r}) is a relative path")
    assert "install.py" in result[a.label] and result[b.label] is None


def test_a_nested_requirements_file_is_read_from_the_node_folder(tmp_path, venv):
    a = node(tmp_path, "Nested", "-r extra/more.txt\n")
    (a.path / "extra").mkdir()
    (a.path / "extra" / "more.txt").write_text("--extra-index-url https://example.invalid/simple\n./local\n")
    options, refused = a.scan()
    assert options == ["--extra-index-url"]
    assert refused.startswith("nodes[0] Nested: extra/more.txt line 2 ('./local') is a relative path")
    outside = node(tmp_path, "Outside", "-r ../Nested/requirements.txt\n")
    assert "includes a file outside the node folder" in outside.scan()[1]


# ---- install.py: children, stdin, stop ----


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


_ESCAPING_CHILD = (
    "import pathlib, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "pathlib.Path('child.pid').write_text(str(child.pid))\n"
    "print('spawned', flush=True)\n"
)


def test_install_py_children_cannot_outlive_the_timeout(tmp_path, venv):
    # a grandchild in a session of its own that keeps stdout open, and an install.py that hangs
    hangs = node(tmp_path, "Hangs", install_py=_ESCAPING_CHILD + "time.sleep(120)\n")
    start = time.monotonic()
    result = node_requirements.install([hangs], venv, install_py_timeout=2)
    assert time.monotonic() - start < 15
    assert "install.py did not finish within 2 s" in result[hangs.label]
    assert _gone(int((hangs.path / "child.pid").read_text()))


def test_install_py_that_exits_leaves_no_process_behind(tmp_path, venv):
    exits = node(tmp_path, "Exits", install_py=_ESCAPING_CHILD)
    start = time.monotonic()
    assert node_requirements.install([exits], venv, install_py_timeout=60) == {exits.label: None}
    assert time.monotonic() - start < 15  # not held by the grandchild's open stdout
    assert _gone(int((exits.path / "child.pid").read_text()))


def test_install_py_stdin_is_closed(tmp_path, venv):
    read_fd, write_fd = os.pipe()  # our stdin: a pipe nobody writes to (a prompt would wait forever)
    saved = os.dup(0)
    os.dup2(read_fd, 0)
    try:
        prompt = node(tmp_path, "Prompts", install_py="answer = input('continue? [y/N] ')\n")
        start = time.monotonic()
        result = node_requirements.install([prompt], venv, install_py_timeout=30)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_fd, write_fd):
            os.close(fd)
    assert time.monotonic() - start < 15
    assert "install.py failed" in result[prompt.label] and "EOFError" in result[prompt.label]


def test_stop_ends_install_py_and_everything_it_started(tmp_path, venv):
    from comfy_worker.volume_lock import Interrupted

    hangs = node(tmp_path, "Hangs", install_py=_ESCAPING_CHILD + "time.sleep(120)\n")
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    start = time.monotonic()
    with pytest.raises(Interrupted):
        node_requirements.install([hangs], venv, install_py_timeout=600, stop=stop)
    assert time.monotonic() - start < 10
    assert _gone(int((hangs.path / "child.pid").read_text()))


def test_secrets_never_reach_install_py_or_the_installer(tmp_path, venv, monkeypatch):
    from comfy_worker.settings import SECRET_ENV_NAMES

    names = [*SECRET_ENV_NAMES, "RUNPOD_AI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"]
    for name in names:
        monkeypatch.setenv(name, f"value-of-{name}-0123456789")
    dump = "import json, os, pathlib\npathlib.Path('env.json').write_text(json.dumps(dict(os.environ)))\n"
    a = node(tmp_path, "Dumps", install_py=dump)
    assert node_requirements.install([a], venv) == {a.label: None}
    seen = (a.path / "env.json").read_text()
    for name in names:
        assert name not in seen and f"value-of-{name}" not in seen
    assert node_requirements.child_env().keys().isdisjoint(names)
