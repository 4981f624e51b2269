"""comfyui_checkout: ComfyUI cloned from the local upstream repo into a temp volume; a clone killed
with SIGKILL while git was fetching (from a loopback server that never answers) leaves its partial
folder, which the next ensure (under the provisioning lock) removes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from support.comfy_process import ROOT, require_upstream
from support.processes import descendants

from comfy_worker import comfyui_checkout
from comfy_worker.settings import Settings

REF = "v0.3.75"
CLONE = (
    "import sys; from comfy_worker import comfyui_checkout; from comfy_worker.settings import Settings\n"
    "comfyui_checkout.ensure(Settings.from_env(), sys.argv[1])\n"
)


def settings_for(volume, repo: str) -> Settings:
    return Settings.from_env({"VOLUME_ROOT": str(volume), "COMFYUI_REPO": repo, "PATH": os.environ["PATH"]})


def kill_while_cloning(volume, env: dict[str, str]) -> None:
    """Start ensure() in a child, wait until git is inside its clone, SIGKILL the child and git."""
    proc = subprocess.Popen([sys.executable, "-c", CLONE, REF], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    try:
        while not list(volume.glob(".ComfyUI.partial-*/ComfyUI/.git")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "git never started its clone"
            time.sleep(0.05)
        tree = [proc.pid, *descendants(proc.pid)]
        assert len(tree) > 1, "git is not running"
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_a_comfyui_clone_killed_by_sigkill_is_cleaned_up_by_the_next_start(tmp_path):
    """issue 20 #14: `.ComfyUI.partial-*` (a whole clone) was left for good after a SIGKILL while
    cloning; the next ensure removes it, and nothing else beside ComfyUI."""
    volume = tmp_path / "volume"
    silent = socket.create_server(("127.0.0.1", 0))  # accepts the connection in the kernel, never answers
    try:
        repo = f"http://127.0.0.1:{silent.getsockname()[1]}/ComfyUI.git"
        env = {**os.environ, "VOLUME_ROOT": str(volume), "COMFYUI_REPO": repo}
        kill_while_cloning(volume, env)
    finally:
        silent.close()
    left = list(volume.glob(".ComfyUI.partial-*"))
    assert len(left) == 1 and left[0].is_dir()
    other = volume / ".other.partial-keep"
    other.mkdir()

    result = comfyui_checkout.ensure(settings_for(volume, str(require_upstream())), REF)
    assert result.action == "cloned" and comfyui_checkout.is_checkout(volume / "ComfyUI")
    assert not list(volume.glob(".ComfyUI.partial-*"))
    assert other.is_dir()


def test_a_leftover_partial_is_removed_also_when_comfyui_is_already_there(tmp_path):
    """issue 20 #14: another worker finished the clone after this one was killed: the kept checkout's
    start still removes the dead clone."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(
        ["git", "clone", "-q", "--branch", REF, str(require_upstream()), str(volume / "ComfyUI")],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    dead = volume / ".ComfyUI.partial-abc123"
    (dead / "ComfyUI" / ".git").mkdir(parents=True)
    (dead / "ComfyUI" / ".git" / "HEAD").write_text("ref: refs/heads/master\n")

    result = comfyui_checkout.ensure(settings_for(volume, str(require_upstream())), REF)
    assert result.action == "kept"
    assert not dead.exists()


def test_latest_is_the_newest_release_tag_unless_the_lock_file_records_one(tmp_path):
    """`latest`: the highest vX.Y.Z tag by version (v0.3.10 > v0.3.9); pre-releases and other tags never
    count; a release comfy.lock.yml records is kept (no remote asked) unless update; other refs pass."""
    from support.gitrepos import git

    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    for tag in ("v0.3.9", "v0.3.10", "v0.4.0-rc1", "v0.4.0.dev1", "v1", "latest-build", "0.5.0"):
        git(repo, "commit", "-q", "--allow-empty", "-m", tag)
        git(repo, "tag", tag)
    settings = settings_for(tmp_path / "volume", str(repo))
    assert comfyui_checkout.newest_release(settings) == "v0.3.10"
    assert comfyui_checkout.resolve_ref(settings, "latest", None, update=False) == ("v0.3.10", "v0.3.10")
    gone = settings_for(tmp_path / "volume", str(tmp_path / "no-such-repo"))
    assert comfyui_checkout.resolve_ref(gone, "latest", {"ref": "v0.3.9"}, update=False) == ("v0.3.9", "v0.3.9")
    assert comfyui_checkout.resolve_ref(settings, "latest", {"ref": "v0.3.9"}, update=True)[1] == "v0.3.10"
    commit = {"ref": "0123456789abcdef0123456789abcdef01234567"}  # a fixed ref's record: not a release
    assert comfyui_checkout.resolve_ref(settings, "latest", commit, update=False)[1] == "v0.3.10"
    assert comfyui_checkout.resolve_ref(gone, "v0.3.75", {"ref": "v0.3.9"}, update=True) == ("v0.3.75", None)
