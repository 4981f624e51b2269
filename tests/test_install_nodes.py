"""install_nodes.py end to end: local bare repos as remotes, a throwaway venv (fake torch 1.0.0)
as the environment requirements go into, a local wheel folder as the package index."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import git
import pytest
import yaml
from support.gitrepos import git as run_git
from support.wheels import installed_version, make_venv, make_wheel, wheel_env

import install_nodes
from comfy_worker import git_versions, node_requirements
from comfy_worker.config_schema import load_config
from comfy_worker.settings import SECRET_ENV_NAMES
from comfy_worker.state_files import NODE_STATE

ROOT = Path(__file__).resolve().parents[1]


def node_source(class_name: str, requirements: str = "") -> dict[str, str]:
    init = (
        f"class {class_name}:\n"
        "    RETURN_TYPES = ('STRING',)\n"
        "    FUNCTION = 'run'\n"
        "    CATEGORY = 'comfy-worker-tests'\n"
        "    @classmethod\n"
        "    def INPUT_TYPES(cls):\n"
        "        return {'required': {}}\n"
        "    def run(self):\n"
        "        return ('ok',)\n"
        f"NODE_CLASS_MAPPINGS = {{'{class_name}': {class_name}}}\n"
    )
    files = {"__init__.py": init}
    if requirements:
        files["requirements.txt"] = requirements
    return files


class Box:
    """A volume, a ComfyUI folder, a venv for requirements, and a way to run install_nodes."""

    def __init__(self, tmp_path: Path, monkeypatch, capsys):
        self.tmp = tmp_path
        self.volume = tmp_path / "volume"
        self.comfyui = self.volume / "ComfyUI"
        self.custom_nodes = self.comfyui / "custom_nodes"
        self.wheels = tmp_path / "wheels"
        make_wheel(self.wheels, "torch", "1.0.0")
        make_wheel(self.wheels, "torch", "9.9.9")
        make_wheel(self.wheels, "tinypkg", "1.0")
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        for key, value in wheel_env(self.wheels).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("VOLUME_ROOT", str(self.volume))
        monkeypatch.setenv("COMFYUI_PATH", str(self.comfyui))
        monkeypatch.delenv("CONFIG_YML", raising=False)
        monkeypatch.delenv("GITHUB_TOKEN", raising=False)
        for cache in ("UV_CACHE_DIR", "PIP_CACHE_DIR", "NODE_PACKAGE_CACHE"):
            monkeypatch.delenv(cache, raising=False)
        self.use_venv("venv")

    def use_venv(self, name: str, pip: bool = False) -> Path:
        """Requirements go into this venv from now on (the real .venv is never the target)."""
        self.python = make_venv(self.tmp / name, self.wheels, ["torch==1.0.0"], pip=pip)
        self.monkeypatch.setenv("PYTHON", str(self.python))
        return self.python

    def config(self, nodes: list[dict]) -> Path:
        path = self.tmp / "config.yml"
        path.write_text(yaml.safe_dump({"nodes": nodes}))
        return path

    def run(self, nodes: list[dict] | Path, *args: str) -> tuple[int, str]:
        config = nodes if isinstance(nodes, Path) else self.config(nodes)
        self.capsys.readouterr()
        rc = install_nodes.main(["--config", str(config), *args])
        out = self.capsys.readouterr()
        return rc, out.out + out.err

    def head(self, name: str) -> str | None:
        return git_versions.read_head(self.custom_nodes / name)

    def lock(self) -> dict:
        return yaml.safe_load((self.volume / "comfy.lock.yml").read_text())


@pytest.fixture
def box(tmp_path, monkeypatch, capsys):
    return Box(tmp_path, monkeypatch, capsys)


@pytest.fixture
def node_repo(git_repos):
    """MyNode: v1.2.0, v1.10.0, v2.0.0-rc1 (pre-release), branch 'dev', main one commit ahead."""
    repo = git_repos.create("MyNode", node_source("MyNodeClass"))
    c = {"v1.2.0": repo.tag("v1.2.0")}
    c["v1.10.0"] = repo.commit({"version.txt": "1.10"})
    repo.tag("v1.10.0")
    c["v2.0.0-rc1"] = repo.commit({"version.txt": "2.0rc1"})
    repo.tag("v2.0.0-rc1")
    repo.branch("dev")
    c["dev"] = c["v2.0.0-rc1"]
    c["main"] = repo.commit({"version.txt": "main"})
    repo.push()
    return repo, c


def node_with_submodule_versions(git_repos):
    """Top: tag v1 has vendor/sub at Sub's first commit (s.txt 'v1'); tag v2 at Sub's second commit
    (s.txt 'v2' and a new file new.txt)."""
    sub = git_repos.create("Sub", {"s.txt": "v1"}).push()
    top = git_repos.create("Top", node_source("TopClass"))
    c = {"v1": top.add_submodule(sub, "vendor/sub")}
    top.tag("v1")
    sub.commit({"s.txt": "v2", "new.txt": "from v2"})
    sub.push()
    run_git(top.work / "vendor/sub", "fetch", "-q", "origin")
    run_git(top.work / "vendor/sub", "checkout", "-q", "origin/main")
    c["v2"] = top.commit(message="sub v2")
    top.tag("v2")
    top.push()
    return top, c


def summary_table(out: str) -> dict[str, dict[str, str]]:
    """The run's summary table: node -> {column: cell}, read by the columns' positions."""
    lines = out.splitlines()
    for i, header in enumerate(lines[:-1]):
        dashes = lines[i + 1]
        if header.startswith("node ") and dashes and set(dashes) <= {"-", " "}:
            spans = [m.span() for m in re.finditer(r"-+", dashes)]
            names = [header[a:b].strip() for a, b in spans]
            rows = {}
            for row in lines[i + 2 :]:
                if not row.strip() or row.startswith(("note:", "error:", "warning:")) or re.match(r"\d+ node", row):
                    break
                cells = [row[a : b if k < len(spans) - 1 else None].strip() for k, (a, b) in enumerate(spans)]
                rows[cells[0]] = dict(zip(names, cells, strict=True))
            return rows
    raise AssertionError(f"no summary table in:\n{out}")


def column(out: str, name: str) -> dict[str, str]:
    """One column of the summary table: node -> cell (e.g. column(out, "action")["MyNode"] == "keep")."""
    return {node: row[name] for node, row in summary_table(out).items()}


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ---- versions ----


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("latest", "v1.10.0"),
        ("nightly", "main"),
        ("v1.2.0", "v1.2.0"),
        ("dev", "dev"),
        ("sha", "v1.2.0"),
        ("short", "v1.2.0"),
    ],
)
def test_each_version_kind_installs_its_commit(box, node_repo, version, expected):
    repo, c = node_repo
    asked = {"sha": c["v1.2.0"], "short": c["v1.2.0"][:10]}.get(version, version)
    rc, out = box.run([{"url": repo.url, "version": asked}])
    assert rc == 0, out
    assert box.head("MyNode") == c[expected]
    assert column(out, "resolves to")["MyNode"].startswith(c[expected][:12])
    assert column(out, "action") == {"MyNode": "clone"}


def test_moving_between_versions(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    for version, expected in (("v1.10.0", "v1.10.0"), ("dev", "dev"), (c["main"], "main"), ("v1.2.0", "v1.2.0")):
        rc, out = box.run([{"url": repo.url, "version": version}])
        assert rc == 0 and column(out, "action") == {"MyNode": "move"}, out
        assert box.head("MyNode") == c[expected]
        assert box.lock()["nodes"][0]["version"] == c[expected]
    assert (box.custom_nodes / "MyNode" / "version.txt").exists() is False  # the v1.2.0 tree exactly


def test_warm_run_keeps_everything_without_network(box, node_repo):
    repo, c = node_repo
    nodes = [{"url": repo.url, "version": v, "name": f"n{i}"} for i, v in enumerate(["latest", "nightly", "dev"])]
    assert box.run(nodes)[0] == 0
    shutil.move(repo.bare, box.tmp / "gone.git")  # the remote is unreachable from now on
    start = time.perf_counter()
    rc, out = box.run(nodes)
    elapsed = time.perf_counter() - start
    assert rc == 0, out
    assert column(out, "action") == {"n0": "keep", "n1": "keep", "n2": "keep"} and elapsed < 1.0


def test_update_refreshes_nightly_and_branches_only_when_asked(box, node_repo):
    repo, c = node_repo
    nodes = [
        {"url": repo.url, "version": "nightly", "name": "Nightly"},
        {"url": repo.url, "version": "v1.2.0", "name": "Tag"},
    ]
    assert box.run(nodes)[0] == 0
    newer = repo.commit({"new.txt": "new"})
    repo.push()
    rc, out = box.run(nodes)
    assert rc == 0 and box.head("Nightly") == c["main"]  # kept as is without --update
    rc, out = box.run(nodes, "--update")
    assert rc == 0, out
    assert box.head("Nightly") == newer and box.head("Tag") == c["v1.2.0"]


def test_folder_moved_by_hand_goes_back_to_the_configured_commit(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.10.0"}])[0] == 0
    git.Repo(box.custom_nodes / "MyNode").git.checkout("-q", c["main"])
    shutil.move(repo.bare, box.tmp / "gone.git")
    rc, out = box.run([{"url": repo.url, "version": "v1.10.0"}])
    assert rc == 0 and box.head("MyNode") == c["v1.10.0"], out


def test_a_move_interrupted_before_the_submodules_is_completed_by_the_next_run(box, git_repos):
    top, c = node_with_submodule_versions(git_repos)
    assert box.run([{"url": top.url, "version": "v1"}])[0] == 0
    node = box.custom_nodes / "Top"
    # a crash between the checkout and the submodule update: HEAD at v2, the submodule still at v1
    git.Repo(node).git.checkout("-q", "--detach", c["v2"])
    assert (node / "vendor/sub/s.txt").read_text() == "v1"
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 0, out
    assert box.head("Top") == c["v2"] and (node / "vendor/sub/s.txt").read_text() == "v2"


def test_a_failed_submodule_update_is_retried_when_the_config_did_not_change(box, git_repos):
    top, c = node_with_submodule_versions(git_repos)
    assert box.run([{"url": top.url, "version": "v2"}])[0] == 0
    node = box.custom_nodes / "Top"
    repo = git.Repo(node)
    repo.git.checkout("-q", "--detach", c["v1"])  # moved back by hand, submodule included
    repo.git.submodule("update", "-q")
    assert (node / "vendor/sub/s.txt").read_text() == "v1"
    # an untracked file in the way of v2's new.txt: the submodule update fails after HEAD moved
    (node / "vendor/sub/new.txt").write_text("untracked, in the way")
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 1 and "nodes[0] Top" in out, out
    (node / "vendor/sub/new.txt").unlink()
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 0, out
    assert (node / "vendor/sub/s.txt").read_text() == "v2"
    assert (node / "vendor/sub/new.txt").read_text() == "from v2"


# ---- local edits ----


def test_local_edit_is_kept_on_a_named_stash_when_moving(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    node = box.custom_nodes / "MyNode"
    (node / "__init__.py").write_text((node / "__init__.py").read_text() + "# my local fix\n")
    rc, out = box.run([{"url": repo.url, "version": "v1.10.0"}])
    assert rc == 0 and box.head("MyNode") == c["v1.10.0"], out
    assert "stash" in out and "__init__.py" in out
    stashes = git.Repo(node).git.stash("list")
    assert "comfy-worker: local edits" in stashes and "before moving to v1.10.0" in stashes
    git.Repo(node).git.stash("pop")
    assert "# my local fix" in (node / "__init__.py").read_text()


def test_local_edit_without_a_version_change_is_left_alone(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    init = box.custom_nodes / "MyNode" / "__init__.py"
    init.write_text("# edited\n")
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    assert init.read_text() == "# edited\n"


def test_local_edit_inside_a_submodule_is_refused_with_the_fix(box, git_repos):
    sub = git_repos.create("Sub", {"s.txt": "v1"}).push()
    top = git_repos.create("Top", node_source("TopClass"))
    first = top.add_submodule(sub, "vendor/sub")
    top.tag("v1")
    top.commit({"x.txt": "x"})
    top.tag("v2")
    top.push()
    assert box.run([{"url": top.url, "version": "v1"}])[0] == 0
    (box.custom_nodes / "Top/vendor/sub/s.txt").write_text("edited in the submodule")
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 1 and box.head("Top") == first
    assert "nodes[0] Top" in out and "submodule" in out and "run again" in out
    assert (box.custom_nodes / "Top/vendor/sub/s.txt").read_text() == "edited in the submodule"


def test_edits_in_the_node_and_in_a_submodule_are_refused_before_anything_is_stashed(box, git_repos):
    top, c = node_with_submodule_versions(git_repos)
    assert box.run([{"url": top.url, "version": "v1"}])[0] == 0
    node = box.custom_nodes / "Top"
    init = node / "__init__.py"
    edited = init.read_text() + "# my local fix\n"
    init.write_text(edited)
    (node / "vendor/sub/s.txt").write_text("edited in the submodule")
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 1 and box.head("Top") == c["v1"], out
    assert "nodes[0] Top" in out and "vendor/sub" in out and "run again" in out
    # the working tree is exactly as it was: nothing stashed, both edits in place
    assert init.read_text() == edited
    assert (node / "vendor/sub/s.txt").read_text() == "edited in the submodule"
    assert git.Repo(node).git.stash("list") == ""


def test_existing_folder_that_is_not_this_checkout_is_refused(box, node_repo, git_repos):
    repo, _ = node_repo
    (box.custom_nodes / "MyNode").mkdir(parents=True)
    (box.custom_nodes / "MyNode" / "mine.py").write_text("x")
    rc, out = box.run([{"url": repo.url}])
    assert rc == 1 and "MyNode exists but is not a git checkout" in out
    other = git_repos.create("Other").push()
    git.Repo.clone_from(other.url, box.custom_nodes / "Other2")
    rc, out = box.run([{"url": repo.url, "name": "Other2"}])
    assert rc == 1 and f"is a checkout of {other.url}, not of {repo.url}" in out


# ---- submodules ----


def test_submodule_is_checked_out(box, git_repos):
    sub = git_repos.create("SubLib", {"lib.py": "VALUE = 1\n"}).push()
    top = git_repos.create("WithSub", node_source("WithSubClass"))
    top.add_submodule(sub, "vendor/sublib")
    top.push()
    rc, out = box.run([{"url": top.url, "version": "nightly"}])
    assert rc == 0, out
    assert (box.custom_nodes / "WithSub/vendor/sublib/lib.py").read_text() == "VALUE = 1\n"


# ---- requirements ----


def test_requirement_installed_from_local_wheel_folder(box, git_repos):
    repo = git_repos.create("NeedsPkg", node_source("NeedsPkgClass", "tinypkg==1.0\n")).push()
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0, out
    assert installed_version(box.python, "tinypkg") == "1.0"
    assert column(out, "requirements") == {"NeedsPkg": "installed"}
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0 and column(out, "requirements") == {"NeedsPkg": "present"}  # nothing installed again


def test_node_asking_for_another_torch_does_not_change_torch_and_is_reported(box, git_repos):
    good = git_repos.create("GoodNode", node_source("GoodClass", "tinypkg\n")).push()
    greedy = git_repos.create("GreedyNode", node_source("GreedyClass", "torch==9.9.9\n")).push()
    rc, out = box.run([{"url": good.url}, {"url": greedy.url}])
    assert rc == 1
    assert "nodes[1] GreedyNode: requirements.txt cannot be installed" in out and "torch==9.9.9" in out
    assert installed_version(box.python, "torch") == "1.0.0"
    assert installed_version(box.python, "tinypkg") == "1.0"
    # optional: the same conflict is a warning and the run succeeds
    rc, out = box.run([{"url": good.url}, {"url": greedy.url, "optional": True}])
    assert rc == 0 and column(out, "status") == {"GoodNode": "ok", "GreedyNode": "failed (optional)"}
    assert installed_version(box.python, "torch") == "1.0.0"


def test_requirements_false_installs_nothing(box, git_repos):
    repo = git_repos.create("NoReqs", node_source("NoReqsClass", "tinypkg==1.0\n")).push()
    rc, out = box.run([{"url": repo.url, "requirements": False}])
    assert rc == 0 and installed_version(box.python, "tinypkg") is None


def test_install_py_that_replaces_torch_fails_the_node_and_torch_is_restored(box, git_repos):
    box.use_venv("pip-venv", pip=True)
    script = (  # bypasses the constraints the way a careless install.py can
        "import os, subprocess, sys\n"
        "env = {k: v for k, v in os.environ.items() if k not in ('PIP_CONSTRAINT', 'UV_CONSTRAINT')}\n"
        "subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'torch==9.9.9'], env=env, check=True)\n"
    )
    sneaky = git_repos.create("SneakyNode", {**node_source("SneakyClass"), "install.py": script}).push()
    good = git_repos.create("GoodNode", node_source("GoodClass", "tinypkg==1.0\n")).push()
    rc, out = box.run([{"url": sneaky.url}, {"url": good.url}])
    assert rc == 1, out
    assert "nodes[0] SneakyNode's install.py changed torch 1.0.0 \u2192 9.9.9; restored" in out
    assert installed_version(box.python, "torch") == "1.0.0"
    assert installed_version(box.python, "tinypkg") == "1.0"
    rc, out = box.run([{"url": sneaky.url, "optional": True}, {"url": good.url}])
    assert rc == 0 and column(out, "status")["SneakyNode"] == "failed (optional)", out
    assert installed_version(box.python, "torch") == "1.0.0"


def test_install_py_and_the_installer_never_see_secrets(box, git_repos, monkeypatch):
    names = [*SECRET_ENV_NAMES, "RUNPOD_AI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"]
    secrets = {name: f"secret-{name.lower()}-0123456789" for name in names}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    # a uv next to the target python is the one used: this one records its environment, then runs the real uv
    dump = box.tmp / "installer-env.txt"
    wrapper = box.python.parent / "uv"
    wrapper.write_text(f"#!/bin/sh\nenv > '{dump}'\nexec '{install_nodes_uv()}' \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("NODES_INSTALLER", "uv")
    script = "import json, os, pathlib\npathlib.Path('env.json').write_text(json.dumps(dict(os.environ)))\n"
    repo = git_repos.create("EnvNode", {**node_source("EnvClass", "tinypkg==1.0\n"), "install.py": script}).push()
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0, out
    seen = json.loads((box.custom_nodes / "EnvNode/env.json").read_text())
    installer = dump.read_text()
    assert "PIP_CONSTRAINT" in seen and "UV_FIND_LINKS=" in installer  # the rest of the environment is kept
    for name, value in secrets.items():
        assert name not in seen and value not in json.dumps(seen)
        assert f"{name}=" not in installer and value not in installer


def test_nodes_whose_requirements_conflict_with_each_other_are_named(box, git_repos):
    make_wheel(box.wheels, "pkgx", "1.0")
    make_wheel(box.wheels, "pkgx", "2.0")
    a = git_repos.create("NodeA", node_source("AClass", "pkgx==1.0\n")).push()
    b = git_repos.create("NodeB", node_source("BClass", "pkgx==2.0\n")).push()
    other = git_repos.create("NodeC", node_source("CClass", "tinypkg==1.0\n")).push()
    nodes = [{"url": a.url}, {"url": b.url}, {"url": other.url}]
    conflict = "nodes[0] NodeA: requirements.txt cannot be installed together with nodes[1] NodeB"
    rc, out = box.run(nodes)
    assert rc == 1 and conflict in out, out
    assert installed_version(box.python, "pkgx") == "2.0" and installed_version(box.python, "tinypkg") == "1.0"
    # the next run tries NodeA again: the conflict is named again, and NodeB keeps its packages
    rc, out = box.run(nodes)
    assert rc == 1 and conflict in out, out
    assert installed_version(box.python, "pkgx") == "2.0"


def test_fresh_container_on_the_same_volume_gets_the_requirements_again(box, git_repos):
    repo = git_repos.create("NeedsPkg", node_source("NeedsPkgClass", "tinypkg==1.0\n")).push()
    assert box.run([{"url": repo.url}])[0] == 0
    head = box.head("NeedsPkg")
    # the installer's cache lives on the volume: the next container reuses the wheels kept there
    assert any((box.volume / ".cache" / "node-packages" / "uv").rglob("tinypkg*"))
    # a new container: same volume, a brand-new environment without the packages; no network
    fresh = box.use_venv("fresh-container-venv")
    shutil.move(repo.bare, box.tmp / "gone.git")
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0, out
    assert column(out, "action") == {"NeedsPkg": "keep"} and box.head("NeedsPkg") == head  # not cloned again
    assert column(out, "requirements") == {"NeedsPkg": "installed"}
    assert installed_version(fresh, "tinypkg") == "1.0"
    assert node_requirements.read_record(node_requirements.target_env(str(fresh))) == {
        str(box.custom_nodes / "NeedsPkg"): head
    }


# ---- failures, dry run, lock file, CLI ----


def test_optional_node_with_a_bad_url_does_not_fail_the_run(box, node_repo, tmp_path):
    repo, c = node_repo
    bad = (tmp_path / "no-such-repo.git").as_uri()
    rc, out = box.run([{"url": repo.url}, {"url": bad, "optional": True}])
    assert rc == 0, out
    assert column(out, "status") == {"MyNode": "ok", "no-such-repo": "failed (optional)"}, out
    assert box.head("MyNode") == c["v1.10.0"]
    rc, out = box.run([{"url": repo.url}, {"url": bad}])
    assert rc == 1 and column(out, "status")["no-such-repo"] == "FAILED" and "nodes[1] no-such-repo" in out


def test_unknown_version_fails_with_suggestions(box, node_repo):
    repo, _ = node_repo
    rc, out = box.run([{"url": repo.url, "version": "v1.10"}])
    assert rc == 1 and "version 'v1.10' is not a tag" in out and "'v1.10.0'" in out
    assert not (box.custom_nodes / "MyNode").exists()


def test_dry_run_shows_version_commit_and_action_and_changes_nothing(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0", "name": "Installed"}])[0] == 0
    nodes = [
        {"url": repo.url, "version": "v1.10.0", "name": "Installed"},
        {"url": repo.url, "version": "latest", "name": "New"},
        {"url": repo.url, "version": "v1.2.0", "name": "Same"},
    ]
    shutil.copytree(box.custom_nodes / "Installed", box.custom_nodes / "Same")
    lock_before = (box.volume / "comfy.lock.yml").read_text()
    rc, out = box.run(nodes, "--dry-run")
    assert rc == 0, out
    table = summary_table(out)
    assert table["Installed"]["version"] == "v1.10.0" and table["Installed"]["action"] == "move"
    assert table["Installed"]["resolves to"].startswith(c["v1.10.0"][:12])
    assert table["New"]["resolves to"].startswith(c["v1.10.0"][:12]) and table["New"]["action"] == "clone"
    assert table["Same"]["resolves to"].startswith(c["v1.2.0"][:12]) and table["Same"]["action"] == "keep"
    assert not (box.custom_nodes / "New").exists() and box.head("Installed") == c["v1.2.0"]
    assert (box.volume / "comfy.lock.yml").read_text() == lock_before


def test_lock_file_is_a_config_that_reproduces_the_commits(box, node_repo, git_repos, monkeypatch):
    repo, c = node_repo
    other = git_repos.create("Other", node_source("OtherClass"))
    other_head = other.commit({"x": "1"})
    other.push()
    nodes = [
        {"url": repo.url, "version": "latest"},
        {"url": other.url, "version": "nightly", "name": "Renamed", "optional": True, "requirements": False},
    ]
    assert box.run(nodes)[0] == 0
    lock_path = box.volume / "comfy.lock.yml"
    cfg = load_config(lock_path)
    assert [(n.url, n.version, n.dir_name()) for n in cfg.nodes] == [
        (repo.url, c["v1.10.0"], "MyNode"),
        (other.url, other_head, "Renamed"),
    ]
    assert cfg.nodes[1].optional and not cfg.nodes[1].requirements
    # upstream moves on; a second box fed the lock file gets exactly the same commits
    repo.commit({"later.txt": "x"})
    repo.tag("v1.11.0")
    repo.push()
    second = box.tmp / "second"
    monkeypatch.setenv("VOLUME_ROOT", str(second))
    rc, out = box.run(
        Path(shutil.copy(lock_path, box.tmp / "lock-as-config.yml")), "--comfyui-dir", str(second / "ComfyUI")
    )
    assert rc == 0, out
    assert git_versions.read_head(second / "ComfyUI/custom_nodes/MyNode") == c["v1.10.0"]
    assert git_versions.read_head(second / "ComfyUI/custom_nodes/Renamed") == other_head


def test_lock_file_records_only_nodes_installed_at_their_commit(box, node_repo, git_repos):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    other = git_repos.create("Other").push()
    git.Repo.clone_from(other.url, box.custom_nodes / "Other2")
    rc, out = box.run([{"url": repo.url, "version": "v9.9"}, {"url": repo.url, "name": "Other2"}])
    assert rc == 1 and "is a checkout of" in out and "'v9.9' is not a tag" in out, out
    # MyNode failed: its record from the last good run stays; Other2 never was this node: left out
    assert box.lock()["nodes"] == [{"url": repo.url, "version": c["v1.2.0"], "name": "MyNode"}]


def test_parallel_clones_many_nodes(box, git_repos, monkeypatch):
    repos = [git_repos.create(f"P{i}", node_source(f"P{i}Class")).push() for i in range(6)]
    active, peak, guard = 0, 0, threading.Lock()
    real_clone = git_versions.clone

    def counting_clone(*args, **kwargs):
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.2)
            return real_clone(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    monkeypatch.setattr(git_versions, "clone", counting_clone)
    rc, out = box.run([{"url": r.url} for r in repos], "--parallel", "6")
    assert rc == 0, out
    assert all(box.head(f"P{i}") == r.head() for i, r in enumerate(repos))
    assert not list(box.custom_nodes.glob(".*partial*"))
    assert peak > 1  # the clones really overlapped


def test_two_runs_at_once_on_one_volume_wait_for_each_other(box, git_repos, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    script = (  # holds the first run inside the volume lock until the test lets it go
        "import pathlib, time\n"
        f"gate = pathlib.Path({str(gate)!r})\n"
        "(gate / 'started').touch()\n"
        "deadline = time.monotonic() + 30\n"
        "while not (gate / 'release').exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
    )
    repo = git_repos.create("SlowNode", {**node_source("SlowClass"), "install.py": script}).push()
    cmd = [sys.executable, str(ROOT / "install_nodes.py"), "--config", str(box.config([{"url": repo.url}]))]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []
    with logs[0].open("w") as out0, logs[1].open("w") as out1:
        procs.append(subprocess.Popen(cmd, stdout=out0, stderr=subprocess.STDOUT, cwd=tmp_path))
        assert wait_for(lambda: (gate / "started").exists(), 60)
        procs.append(subprocess.Popen(cmd, stdout=out1, stderr=subprocess.STDOUT, cwd=tmp_path))
        waited = wait_for(lambda: "waiting for another install_nodes.py" in logs[1].read_text(), 15)
        (gate / "release").touch()
        codes = [p.wait(60) for p in procs]
    first, second = (p.read_text() for p in logs)
    assert codes == [0, 0], (first, second)
    assert waited, second
    assert column(first, "action") == {"SlowNode": "clone"}, first
    assert column(second, "action") == {"SlowNode": "keep"}, second
    assert column(second, "requirements") == {"SlowNode": "present"}, second
    assert box.head("SlowNode") == repo.head()
    assert not list(box.custom_nodes.glob(".*partial*"))


def test_validate_only_and_duplicate_directories(box, node_repo):
    repo, _ = node_repo
    rc, out = box.run([{"url": repo.url}], "--validate-only")
    assert rc == 0 and "is valid (0 model(s), 1 node(s)" in out
    rc, out = box.run([{"url": repo.url}, {"url": repo.url + "/"}])
    assert rc == 2 and "custom_nodes/MyNode is already used by nodes[0]" in out
    assert not box.custom_nodes.exists()


def test_github_token_never_lands_in_git_config_state_lock_or_log(box, node_repo, tmp_path):
    repo, c = node_repo
    token = "ghp_TOKENshouldNEVERappear0123456789"
    config = box.config([{"url": repo.url}])
    env = {**os.environ, "GITHUB_TOKEN": token}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "install_nodes.py"), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    encoded = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    node = box.custom_nodes / "MyNode"
    written = [node / ".git/config", node / ".git" / NODE_STATE, box.volume / "comfy.lock.yml"]
    for text in [proc.stdout, proc.stderr, *(p.read_text() for p in written)]:
        assert token not in text and encoded not in text
    assert box.head("MyNode") == c["v1.10.0"]


@pytest.mark.slow
def test_real_comfyui_loads_an_installed_node(box, git_repos, comfyui_factory):
    repo = git_repos.create("WorkerInstalledNode", node_source("WorkerInstalledNodeClass"))
    repo.tag("v1.0.0")
    repo.push()
    comfy = comfyui_factory(start=False)
    rc, out = box.run([{"url": repo.url}], "--comfyui-dir", str(comfy.path))
    assert rc == 0, out
    comfy.start()
    info = comfy.get_json("/object_info/WorkerInstalledNodeClass")
    assert info["WorkerInstalledNodeClass"]["category"] == "comfy-worker-tests"


def test_force_reinstalls_requirements_and_keeps_the_checkout(box, git_repos):
    repo = git_repos.create("NeedsPkg", node_source("NeedsPkgClass", "tinypkg==1.0\n")).push()
    assert box.run([{"url": repo.url}])[0] == 0
    subprocess.run(
        [str(install_nodes_uv()), "pip", "uninstall", "-q", "--python", str(box.python), "tinypkg"], check=True
    )
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0 and installed_version(box.python, "tinypkg") is None  # the record says present: trusted
    rc, out = box.run([{"url": repo.url}], "--force")
    assert rc == 0 and column(out, "action") == {"NeedsPkg": "keep"}
    assert installed_version(box.python, "tinypkg") == "1.0"


def test_leftovers_of_a_crashed_clone_are_never_taken_for_a_node(box, node_repo):
    repo, c = node_repo
    partial = box.custom_nodes / ".MyNode.partial-deadbeef.disabled"
    (partial / ".git").mkdir(parents=True)
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0 and column(out, "action") == {"MyNode": "clone"}, out
    assert not partial.exists() and box.head("MyNode") == c["v1.10.0"]


def test_changing_the_url_of_an_installed_node_moves_it_to_the_new_remote(box, node_repo, git_repos):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "name": "N"}])[0] == 0
    fork = git_repos.create("MyNodeFork", node_source("ForkClass"))
    fork_head = fork.commit({"fork.txt": "fork"})
    fork.push()
    rc, out = box.run([{"url": fork.url, "name": "N", "version": "nightly"}])
    assert rc == 0 and "origin changed" in out, out
    assert box.head("N") == fork_head
    assert git.Repo(box.custom_nodes / "N").remotes.origin.url == fork.url


def install_nodes_uv() -> Path:
    return Path(sys.executable).parent / "uv"


def test_a_python_that_cannot_run_fails_the_requirements_by_name(box, git_repos, monkeypatch, tmp_path):
    repo = git_repos.create("NeedsPkg", node_source("NeedsPkgClass", "tinypkg==1.0\n")).push()
    monkeypatch.setenv("PYTHON", str(tmp_path / "no-python"))
    rc, out = box.run([{"url": repo.url}])
    assert rc == 1 and "nodes[0] NeedsPkg: requirements not installed: cannot run the python" in out
    assert box.head("NeedsPkg") is not None  # the checkout itself is done


# ---- hardening: folders, names, versions (docs/nodes.md) ----


def test_a_symlinked_node_folder_is_refused_and_never_retargets_its_target(box, node_repo, git_repos):
    repo, c = node_repo
    other = git_repos.create("Other", node_source("OtherClass")).push()
    nodes = [{"url": repo.url, "version": "v1.2.0"}, {"url": other.url}]
    assert box.run(nodes)[0] == 0
    shutil.rmtree(box.custom_nodes / "Other")
    (box.custom_nodes / "Other").symlink_to(box.custom_nodes / "MyNode")
    for _ in range(2):
        rc, out = box.run(nodes)
        assert rc == 1 and "Other is a symbolic link" in out and "remove the link" in out, out
        assert box.head("MyNode") == c["v1.2.0"]
        assert git.Repo(box.custom_nodes / "MyNode").remotes.origin.url == repo.url
    (box.custom_nodes / "Other").unlink()
    (box.custom_nodes / "Other").symlink_to(box.tmp / "nowhere")  # dangling
    rc, out = box.run(nodes)
    assert rc == 1 and "Other is a symbolic link" in out and "unexpected" not in out, out


def test_a_ref_named_like_a_short_sha_wins_on_an_existing_box_as_on_a_fresh_one(box, node_repo):
    repo, c = node_repo
    name = c["main"][:7]  # a tag named like the prefix of another commit
    repo.tag(name, c["v1.2.0"])
    repo.push()
    assert box.run([{"url": repo.url, "version": "v1.10.0"}])[0] == 0  # the clone holds c["main"] too
    rc, out = box.run([{"url": repo.url, "version": name}, {"url": repo.url, "version": name, "name": "Fresh"}])
    assert rc == 0, out
    assert box.head("MyNode") == c["v1.2.0"] and box.head("Fresh") == c["v1.2.0"]
    assert column(out, "action") == {"MyNode": "move", "Fresh": "clone"}


def test_an_ambiguous_short_sha_fails_the_node_listing_both_commits(box, git_repos):
    from support.gitrepos import colliding_commits

    repo = git_repos.create("Ambiguous", node_source("AmbiguousClass"))
    prefix, a, b = colliding_commits(repo)
    repo.push()
    rc, out = box.run([{"url": repo.url, "version": prefix}])
    assert rc == 1 and f"short sha {prefix!r} is ambiguous" in out and a in out and b in out, out
    assert not (box.custom_nodes / "Ambiguous").exists()


@pytest.mark.parametrize(("tail", "derived"), [("/.", "."), ("/..", ".."), ("/.git", ""), ("/-x", "-x")])
def test_folder_names_taken_from_the_url_get_the_name_checks(box, node_repo, tail, derived):
    repo, _ = node_repo
    for args in (["--validate-only"], []):
        rc, out = box.run([{"url": repo.bare.parent.as_uri() + tail}], *args)
        assert rc == 2, out
        assert f"nodes[0] ({repo.bare.parent.as_uri() + tail}): name: the folder name {derived!r} taken" in out
        assert "set 'name'" in out
    assert not box.custom_nodes.exists()
    assert box.run([{"url": repo.bare.parent.as_uri() + tail, "name": "Named"}], "--validate-only")[0] == 0


def test_a_full_sha_already_in_the_clone_needs_no_network(box, node_repo):
    repo, c = node_repo
    assert box.run([{"url": repo.url, "version": "v1.2.0"}])[0] == 0
    shutil.move(repo.bare, box.tmp / "gone.git")
    rc, out = box.run([{"url": repo.url, "version": c["main"]}])
    assert rc == 0 and box.head("MyNode") == c["main"], out
    assert column(out, "action") == {"MyNode": "move"}


# ---- the lock file ----


def test_a_half_finished_move_is_never_recorded_as_done(box, git_repos):
    top, c = node_with_submodule_versions(git_repos)
    assert box.run([{"url": top.url, "version": "v1"}])[0] == 0
    node = box.custom_nodes / "Top"
    (node / "vendor/sub/new.txt").write_text("untracked, in the way of v2's new.txt")
    rc, out = box.run([{"url": top.url, "version": "v2"}])
    assert rc == 1 and "nodes[0] Top" in out, out
    assert box.head("Top") == c["v2"]  # HEAD moved, the submodules did not: half-finished
    assert box.lock()["nodes"] == [{"url": top.url, "version": c["v1"], "name": "Top"}]
    assert json.loads((node / ".git" / NODE_STATE).read_text())["commit"] is None


def test_nodes_removed_from_the_config_leave_the_lock_file(box, node_repo, git_repos):
    repo, c = node_repo
    other = git_repos.create("Other", node_source("OtherClass")).push()
    assert box.run([{"url": repo.url}, {"url": other.url}])[0] == 0
    assert [n["name"] for n in box.lock()["nodes"]] == ["MyNode", "Other"]
    rc, out = box.run([{"url": repo.url}])
    assert rc == 0, out
    assert box.lock()["nodes"] == [{"url": repo.url, "version": c["v1.10.0"], "name": "MyNode"}]
    assert box.head("Other") == other.head()  # left on disk


# ---- submodules, --force ----


def test_force_repairs_submodules(box, git_repos):
    sub = git_repos.create("SubLib", {"lib.py": "VALUE = 1\n"}).push()
    top = git_repos.create("WithSub", node_source("WithSubClass"))
    top.add_submodule(sub, "vendor/sublib")
    top.push()
    assert box.run([{"url": top.url}])[0] == 0
    lib = box.custom_nodes / "WithSub/vendor/sublib/lib.py"
    git.Repo(box.custom_nodes / "WithSub").git.submodule("deinit", "-f", "vendor/sublib")
    assert not lib.exists()
    rc, out = box.run([{"url": top.url}])
    assert rc == 0 and column(out, "action") == {"WithSub": "keep"} and not lib.exists()  # the warm path never looks
    rc, out = box.run([{"url": top.url}], "--force")
    assert rc == 0 and column(out, "action") == {"WithSub": "keep"}, out
    assert lib.read_text() == "VALUE = 1\n"


# ---- install.py and the run: timeouts, SIGTERM, the volume lock ----


def test_INSTALL_PY_TIMEOUT_from_the_environment_is_honoured(box, git_repos, monkeypatch):
    monkeypatch.setenv("INSTALL_PY_TIMEOUT", "1.5")
    repo = git_repos.create("Slow", {**node_source("SlowClass"), "install.py": "import time\ntime.sleep(60)\n"})
    repo.push()
    start = time.monotonic()
    rc, out = box.run([{"url": repo.url}])
    assert rc == 1 and "nodes[0] Slow: install.py did not finish within 1.5 s" in out, out
    assert time.monotonic() - start < 20


def test_a_waiting_run_gives_up_after_a_bound_saying_what_it_waited_for(box, node_repo, monkeypatch):
    from filelock import FileLock

    repo, _ = node_repo
    box.custom_nodes.mkdir(parents=True)
    held = FileLock(str(box.custom_nodes / install_nodes.RUN_LOCK))
    held.acquire()
    monkeypatch.setattr(install_nodes, "LOCK_WAIT_TIMEOUT", 1.0)
    try:
        start = time.monotonic()
        rc, out = box.run([{"url": repo.url}])
    finally:
        held.release()
    assert rc == 1 and time.monotonic() - start < 10, out
    assert "waiting for another install_nodes.py to finish on this volume" in out
    assert "gave up after 1 s waiting for another install_nodes.py" in out and "run install_nodes.py again" in out
    assert not (box.custom_nodes / "MyNode").exists()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_sigterm_stops_the_run_and_everything_install_py_started(box, git_repos, tmp_path):
    pids = tmp_path / "pids"
    script = (
        "import os, pathlib, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"pathlib.Path({str(pids)!r}).write_text(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(120)\n"
    )
    repo = git_repos.create("Hangs", {**node_source("HangsClass"), "install.py": script}).push()
    cmd = [sys.executable, str(ROOT / "install_nodes.py"), "--config", str(box.config([{"url": repo.url}]))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        assert wait_for(lambda: pids.exists() and " " in pids.read_text(), 60)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert time.monotonic() - start < 5 and proc.returncode == 1, out
    assert "interrupted" in out
    assert all(_gone(int(pid)) for pid in pids.read_text().split())
    rc, out = box.run([{"url": repo.url, "requirements": False}])  # the volume lock was released
    assert rc == 0 and column(out, "action") == {"Hangs": "keep"}, out


# ---- the GitHub token, against a git server standing in for github.com ----


def test_github_token_goes_to_the_github_server_and_nowhere_else(box, git_repos, monkeypatch):
    from support.git_http import GitHttpServer

    token = "ghp_TOKENshouldNEVERappear0123456789"
    encoded = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    github = GitHttpServer(git_repos.root / "remotes", required_authorization=f"basic {encoded}")
    elsewhere = GitHttpServer(git_repos.root / "remotes")  # another host, serving a submodule
    try:
        sub = git_repos.create("PublicSub", {"s.txt": "sub"}).push()
        top = git_repos.create("PrivateNode", node_source("PrivateClass"))
        top.add_submodule(sub, "vendor/sub")
        run_git(top.work, "config", "-f", ".gitmodules", "submodule.vendor/sub.url", elsewhere.url("PublicSub"))
        top.commit(message="the submodule lives on another host")
        top.tag("v1.0.0")
        top.push()
        monkeypatch.setattr(git_versions, "GITHUB_PREFIX", github.base)
        monkeypatch.setenv("GITHUB_TOKEN", token)
        rc, out = box.run([{"url": github.url("PrivateNode")}])
        assert rc == 0, out
        node = box.custom_nodes / "PrivateNode"
        assert (node / "vendor/sub/s.txt").read_text() == "sub" and box.head("PrivateNode") == top.head()
        assert github.requests and set(github.authorizations()) == {f"basic {encoded}"}
        assert elsewhere.requests and set(elsewhere.authorizations()) == {None}
        written = [
            node / ".git/config",
            node / ".git/modules/vendor/sub/config",
            node / ".git" / NODE_STATE,
            box.volume / "comfy.lock.yml",
        ]
        for text in [out, *(p.read_text() for p in written)]:
            assert token not in text and encoded not in text
        # the same private repository without a token: git fails at once instead of prompting
        monkeypatch.delenv("GITHUB_TOKEN")
        start = time.monotonic()
        rc, out = box.run([{"url": github.url("PrivateNode"), "name": "NoToken"}])
        assert rc == 1 and "terminal prompts disabled" in out, out
        assert time.monotonic() - start < 10 and not (box.custom_nodes / "NoToken").exists()
    finally:
        github.close()
        elsewhere.close()


def test_a_non_numeric_GIT_CONFIG_COUNT_is_counted_as_zero_by_every_git_process(box, node_repo, monkeypatch):
    """issue 21 (docs/nodes.md was not so): git still received the value ("bogus count") and the node failed
    with a wrong reason. Every git process, local ones included, gets a count it accepts."""
    repo, c = node_repo
    monkeypatch.setenv("GIT_CONFIG_COUNT", "a-dozen")  # a value no other test uses: the warning is once per value
    rc, out = box.run([{"url": repo.url, "version": "v1.10.0"}])
    assert rc == 0, out
    assert box.head("MyNode") == c["v1.10.0"]
    assert "GIT_CONFIG_COUNT='a-dozen' is not a whole number" in out
    rc, out = box.run([{"url": repo.url, "version": "v1.2.0"}])  # a move: fetch, checkout, status, stash
    assert rc == 0, out
    assert box.head("MyNode") == c["v1.2.0"]
