"""start.sh --provision-only on a temp volume: ComfyUI from the local upstream repo, models on a real
nginx (requests counted in its access log) or a fault-injecting origin, nodes in local bare git repos."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from support.comfy_process import ROOT
from support.hf_hub_cache import make_hf_cache
from support.models import UPSCALE_MODEL_NAME
from support.origins import NginxOrigin, random_file
from support.start_env import (
    NODE_INIT,
    read_only_mounts,
    run_fast,
    run_on_read_only_volume,
    run_script,
    start_env,
)
from support.tool_shims import container_python, record_tools, recorded_calls
from support.wheels import make_wheel, wheel_env

from comfy_worker.http_download import MiB
from comfy_worker.lock_file import read_lock_file


@pytest.fixture
def nginx(tmp_path, upscale_model_file):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(upscale_model_file, root / UPSCALE_MODEL_NAME)
    (root / "b.bin").write_bytes(b"b" * 5000)
    with NginxOrigin(root, tmp_path / "nginx") as origin:
        origin.root = root
        yield origin


def requests_to(origin: NginxOrigin, name: str | None = None) -> int:
    log = (origin.workdir / "access.log").read_text() if (origin.workdir / "access.log").exists() else ""
    return sum(1 for line in log.splitlines() if name is None or f"/{name} " in line)


def write_config(env, cfg: dict) -> Path:
    path = Path(env["VOLUME_ROOT"]) / "config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def node_repo(git_repos):
    repo = git_repos.create("StartNode", {"__init__.py": NODE_INIT})
    repo.tag("v1.0.0")
    return repo.push()


def test_cold_then_warm_start(tmp_path, nginx, node_repo):
    env = start_env(tmp_path)
    models = [
        {"url": f"{nginx.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"},
        {"url": f"{nginx.url}/b.bin", "destination": "checkpoints", "sha256": hashlib.sha256(b"b" * 5000).hexdigest()},
    ]
    write_config(env, {"models": models, "nodes": [{"url": node_repo.url, "version": "v1.0.0"}]})
    volume = Path(env["VOLUME_ROOT"])
    mine = {"output/mine.png": b"keep me", "input/in.png": b"in", "user/default/comfy.settings.json": b"{}"}
    for rel, data in mine.items():  # COMFYUI_PATH exists without a checkout: ComfyUI goes in beside them
        (volume / "ComfyUI" / rel).parent.mkdir(parents=True, exist_ok=True)
        (volume / "ComfyUI" / rel).write_bytes(data)

    cold = run_script(env, "start.sh", "--provision-only")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    comfy = volume / "ComfyUI"
    assert (comfy / "main.py").is_file() and all((comfy / rel).read_bytes() == data for rel, data in mine.items())
    assert (comfy / "models" / "upscale_models" / UPSCALE_MODEL_NAME).is_file()
    assert (comfy / "custom_nodes" / "StartNode" / "__init__.py").is_file()
    lock = read_lock_file(volume / "comfy.lock.yml")
    assert lock["comfyui"] == {
        "ref": subprocess.check_output(["git", "-C", str(comfy), "rev-parse", "HEAD"], text=True).strip()
    }
    assert (volume / ".config-sha256").read_text().strip()
    assert "phase comfyui:" in cold.stderr and "summary:" in cold.stdout and "2 fetched" in cold.stdout
    assert not list(volume.glob(".ComfyUI.partial-*"))
    fetched = requests_to(nginx)

    # warm: the origin is gone, the node's remote too: only local checks may run
    nginx.stop()
    shutil.move(node_repo.bare, tmp_path / "moved-away.git")
    started = time.monotonic()
    warm = run_script(env, "start.sh", "--provision-only")
    took = time.monotonic() - started
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "gate matches" in warm.stderr and "2 kept" in warm.stdout
    assert requests_to(nginx) == fetched
    print(f"warm start.sh --provision-only: {took:.2f} s")

    # a deleted model file is fetched again, alone
    nginx.start()
    before = requests_to(nginx)
    (comfy / "models" / "checkpoints" / "b.bin").unlink()
    again = run_script(env, "start.sh", "--provision-only")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (comfy / "models" / "checkpoints" / "b.bin").is_file()
    new_lines = (nginx.workdir / "access.log").read_text().splitlines()[before:]
    assert new_lines and all("/b.bin " in line for line in new_lines)


def test_warm_start_runs_no_git_uv_or_pip_and_sends_no_request(tmp_path, nginx, git_repos):
    """issue 20 (test gap): a warm start touches no network, git or pip, as the tools themselves see
    it: git, uv and pip on PATH (and uv next to $PYTHON, where the installers look first) record each
    call, and the model origin logs each request. The cold start before it shows all three at work."""
    from support.comfy_process import require_upstream

    requirements = subprocess.check_output(["git", "-C", str(require_upstream()), "show", "v0.3.75:requirements.txt"])
    python = container_python(tmp_path / "venv", requirements)
    calls = tmp_path / "tool-calls.log"
    record_tools(python.parent, calls)
    make_wheel(tmp_path / "wheels", "warmpkg", "1.0")
    repo = git_repos.create("ShimNode", {"__init__.py": NODE_INIT, "requirements.txt": "warmpkg\n"})
    repo.tag("v1.0.0")
    repo.push()
    env = start_env(tmp_path, PYTHON=str(python), **wheel_env(tmp_path / "wheels"))
    env["PATH"] = f"{python.parent}:{env['PATH']}"
    models = [{"url": f"{nginx.url}/b.bin", "destination": "checkpoints"}]
    write_config(env, {"models": models, "nodes": [{"url": repo.url, "version": "v1.0.0"}]})

    cold = run_script(env, "start.sh", "--provision-only")
    assert cold.returncode == 0, cold.stdout + cold.stderr
    cold_calls = recorded_calls(calls)
    assert any(c.startswith("git clone") for c in cold_calls), cold_calls
    assert any(c.startswith("uv pip install") for c in cold_calls), cold_calls
    fetched = requests_to(nginx)
    assert fetched >= 1

    calls.unlink()
    for _ in range(2):
        warm = run_script(env, "start.sh", "--provision-only")
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert recorded_calls(calls) == []
        assert requests_to(nginx) == fetched


def test_warm_path_imports_nothing_heavy(tmp_path):
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    code = (
        "import sys; from comfy_worker import provision\n"
        "rc = provision.main([])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'git', 'huggingface_hub', 'pydantic', 'yaml'})\n"
        "print('HEAVY', heavy); sys.exit(rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_apply_config_parses_the_config_once(tmp_path):
    """apply_config.sh names the model files no entry names (model_prune.py) with the config the run
    parsed: a full run and a warm one each parse it once."""
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    code = (
        "import sys; from comfy_worker import config_schema, provision\n"
        "parse, calls = config_schema.load_config_text, []\n"
        "config_schema.load_config_text = lambda *a, **k: calls.append(1) or parse(*a, **k)\n"
        "rc = provision.main(sys.argv[1:])\n"
        "print('PARSED', len(calls)); sys.exit(rc)\n"
    )
    for args in (["--apply", "--force"], ["--apply"]):
        out = subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "PARSED 1" in out.stdout, (args, out.stdout)


def test_config_yml_variants_and_bak(tmp_path):
    env = start_env(tmp_path)
    volume = Path(env["VOLUME_ROOT"])
    volume.mkdir(parents=True)
    (volume / "config.yml").write_text("models: []\n# the user's own\n")
    text = "models: []\nnodes: []\n# from CONFIG_YML ??>>\n"
    b64 = base64.b64encode(text.encode()).decode()
    assert "+" in b64 or "/" in b64  # so the URL-safe alphabet really differs
    variants = {
        "standard": b64,
        "urlsafe": base64.urlsafe_b64encode(text.encode()).decode(),
        "unpadded": b64.rstrip("="),
        "plain": text,
    }
    for name, value in variants.items():
        out = run_script({**env, "CONFIG_YML": value}, "start.sh", "--provision-only")
        assert out.returncode == 0, (name, out.stderr)
        assert (volume / "config.yml").read_text() == text, name
        replaced = "CONFIG_YML is set and differs from" in out.stderr
        assert replaced == (name == "standard"), name  # said loudly, once: only the first run replaced a file
    assert (volume / "config.yml.bak").read_text() == "models: []\n# the user's own\n"
    # issue 21: an edit made on the volume after a start is replaced on the next (warm) start as well, said
    (volume / "config.yml").write_text(text + "# edited in Jupyter since\n")
    out = run_script({**env, "CONFIG_YML": b64}, "start.sh", "--provision-only")
    assert out.returncode == 0 and "CONFIG_YML is set and differs from" in out.stderr, out.stderr
    assert (volume / "config.yml").read_text() == text
    assert (volume / "config.yml.bak").read_text().endswith("# edited in Jupyter since\n")
    out = run_script({**env, "CONFIG_YML": b64}, "start.sh", "--provision-only")
    assert "differs" not in out.stderr and "nothing to do" in out.stderr  # and warm again after that
    bad = run_script({**env, "CONFIG_YML": "!!not base64 and not yaml: ["}, "start.sh", "--provision-only")
    assert bad.returncode == 2 and "CONFIG_YML" in bad.stderr


def test_failed_required_model_leaves_no_gate_and_only_it_is_retried(tmp_path, origin):
    origin.add("/good.bin", body=b"g" * 3000)
    env = start_env(tmp_path)
    write_config(
        env,
        {
            "models": [
                {"url": f"{origin.url}/good.bin", "destination": "checkpoints"},
                {"url": f"{origin.url}/late.bin", "destination": "checkpoints"},
            ]
        },
    )
    first = run_script(env, "start.sh", "--provision-only")
    assert first.returncode == 1, first.stdout + first.stderr
    volume = Path(env["VOLUME_ROOT"])
    assert not (volume / ".config-sha256").exists()
    assert "gate is not written" in first.stderr
    origin.add("/late.bin", body=b"l" * 2000)
    good_gets = len([s for s in origin.seen("/good.bin") if s.method == "GET"])
    second = run_script(env, "start.sh", "--provision-only")
    assert second.returncode == 0, second.stdout + second.stderr
    assert len([s for s in origin.seen("/good.bin") if s.method == "GET"]) == good_gets
    assert (volume / "ComfyUI" / "models" / "checkpoints" / "late.bin").read_bytes() == b"l" * 2000
    assert (volume / ".config-sha256").exists()


def test_four_concurrent_starts_fetch_each_file_once(tmp_path, nginx):
    env = start_env(tmp_path)
    write_config(env, {"models": [{"url": f"{nginx.url}/b.bin", "destination": "checkpoints"}]})
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_script(env, "start.sh", "--provision-only"), range(4)))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr[-2000:] for r in results]
    gets = [line for line in (nginx.workdir / "access.log").read_text().splitlines() if '"GET /b.bin' in line]
    whole = [line for line in gets if '" 200 5000 ' in line]  # besides, the downloader may probe a 1-byte range
    assert len(whole) == 1 and len(gets) <= 2, gets
    assert any("waiting for another worker provisioning this volume" in r.stderr for r in results)


def test_hf_entry_in_cache_is_linked_without_a_request(tmp_path, origin):
    data = b"cached model bytes" * 100
    cache = tmp_path / "hf-cache" / "hub"
    make_hf_cache(cache, "org/model", "unet.safetensors", data)
    env = start_env(tmp_path, HF_HUB_CACHE=str(cache), HF_ENDPOINT=origin.url)
    url = "https://huggingface.co/org/model/resolve/main/unet.safetensors"
    sha = hashlib.sha256(data).hexdigest()
    write_config(env, {"models": [{"url": url, "destination": "unet", "sha256": sha}]})
    out = run_script(env, "start.sh", "--provision-only")
    assert out.returncode == 0, out.stdout + out.stderr
    target = Path(env["VOLUME_ROOT"]) / "ComfyUI" / "models" / "unet" / "unet.safetensors"
    assert target.is_symlink() and target.read_bytes() == data
    assert origin.seen() == []
    assert "linked from cache" in out.stderr and "1 linked from cache" in out.stdout

    # a wrong sha256: refused, never linked (the download from the hub then fails: nothing served)
    target.unlink()
    write_config(env, {"models": [{"url": url, "destination": "unet", "sha256": "0" * 64}]})
    wrong = run_script(env, "start.sh", "--provision-only")
    assert wrong.returncode == 1
    assert "not linked" in wrong.stderr and not target.exists()


def test_comfyui_update_moves_an_existing_checkout_to_another_ref(tmp_path):
    """A second ref (a commit and a tag added to a clone of the upstream repo); without COMFYUI_UPDATE
    the checkout stays where it is (and the log says how to move it), with it the checkout moves; local
    edits are stashed and output/, input/, user/ are kept."""
    from support.comfy_process import clone_comfyui
    from support.gitrepos import git

    upstream = clone_comfyui(tmp_path / "upstream")
    old = git(upstream, "rev-parse", "HEAD")
    (upstream / "NEWS.md").write_text("a newer ComfyUI\n")
    git(upstream, "add", "NEWS.md")
    git(upstream, "commit", "-q", "-m", "newer")
    git(upstream, "tag", "v0.3.76-test")
    new = git(upstream, "rev-parse", "HEAD")
    env = start_env(tmp_path, COMFYUI_REPO=str(upstream), COMFYUI_REF="v0.3.75")
    write_config(env, {"models": [], "nodes": []})
    volume = Path(env["VOLUME_ROOT"])
    comfy = volume / "ComfyUI"
    first = run_script(env, "start.sh", "--provision-only")
    assert first.returncode == 0, first.stderr
    assert git(comfy, "rev-parse", "HEAD") == old
    mine = {"output/mine.png": b"out", "input/in.png": b"in", "user/default/settings.json": b"{}"}
    for rel, data in mine.items():
        (comfy / rel).parent.mkdir(parents=True, exist_ok=True)
        (comfy / rel).write_bytes(data)
    (comfy / "README.md").write_text((comfy / "README.md").read_text() + "\nmy local edit\n")

    kept = run_script({**env, "COMFYUI_REF": "v0.3.76-test"}, "start.sh", "--provision-only")
    assert kept.returncode == 0, kept.stderr
    assert git(comfy, "rev-parse", "HEAD") == old
    assert "set COMFYUI_UPDATE=1 to move it" in kept.stderr

    moved = run_script({**env, "COMFYUI_REF": "v0.3.76-test", "COMFYUI_UPDATE": "1"}, "start.sh", "--provision-only")
    assert moved.returncode == 0, moved.stderr
    assert git(comfy, "rev-parse", "HEAD") == new and (comfy / "NEWS.md").is_file()
    assert read_lock_file(volume / "comfy.lock.yml")["comfyui"] == {"ref": new}
    assert f"ComfyUI updated {new[:12]}" in moved.stdout
    assert all((comfy / rel).read_bytes() == data for rel, data in mine.items())
    assert "my local edit" not in (comfy / "README.md").read_text()
    assert "my local edit" in git(comfy, "stash", "show", "-p")


def test_comfyui_ref_latest_is_the_newest_release_locked_until_apply_config_update(tmp_path):
    """issue 22 #8: `comfyui.ref: latest` is the newest vX.Y.Z tag of COMFYUI_REPO at the first
    provisioning, recorded in comfy.lock.yml; later starts keep it (without asking the remote) when a
    newer release appears; apply_config.sh --update moves to it. Pre-release and other tags never count."""
    from support.comfy_process import clone_comfyui
    from support.gitrepos import git

    upstream = clone_comfyui(tmp_path / "upstream")  # this test's own copy: the shared repo is not touched

    def release(tag: str) -> str:
        (upstream / "NEWS.md").write_text(f"ComfyUI {tag}\n")
        git(upstream, "add", "NEWS.md")
        git(upstream, "commit", "-q", "-m", tag)
        git(upstream, "tag", tag)
        return git(upstream, "rev-parse", "HEAD")

    v76 = release("v0.3.76")
    env = start_env(tmp_path, COMFYUI_REPO=str(upstream))
    write_config(env, {"comfyui": {"ref": "latest"}, "models": [], "nodes": []})
    volume = Path(env["VOLUME_ROOT"])
    comfy, lock = volume / "ComfyUI", volume / "comfy.lock.yml"
    first = run_script(env, "start.sh", "--provision-only")
    assert first.returncode == 0, first.stdout + first.stderr
    assert git(comfy, "rev-parse", "HEAD") == v76
    assert read_lock_file(lock)["comfyui"] == {"ref": "v0.3.76"}
    assert f"ComfyUI cloned {v76[:12]} (v0.3.76)" in first.stdout

    v77 = release("v0.3.77")
    release("v0.4.0-rc1")  # a pre-release above it
    git(upstream, "tag", "nightly-2026")
    warm = run_script(env, "start.sh", "--provision-only")
    assert warm.returncode == 0 and "gate matches" in warm.stderr, warm.stdout + warm.stderr
    away = tmp_path / "away"
    upstream.rename(away)  # a full run without --update asks no remote: the lock file says v0.3.76
    forced = run_script(env, "apply_config.sh", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "ComfyUI 'latest' is v0.3.76, as comfy.lock.yml records" in forced.stderr
    assert git(comfy, "rev-parse", "HEAD") == v76 and read_lock_file(lock)["comfyui"] == {"ref": "v0.3.76"}

    away.rename(upstream)
    dry = run_script(env, "apply_config.sh", "--dry-run", "--update")
    assert dry.returncode == 0 and git(comfy, "rev-parse", "HEAD") == v76, dry.stdout + dry.stderr
    assert f"ComfyUI to v0.3.77 (latest) (--update); now at {v76[:12]}" in dry.stdout
    updated = run_script(env, "apply_config.sh", "--update")
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert git(comfy, "rev-parse", "HEAD") == v77 and (comfy / "NEWS.md").read_text() == "ComfyUI v0.3.77\n"
    assert read_lock_file(lock)["comfyui"] == {"ref": "v0.3.77"}
    assert f"ComfyUI updated {v77[:12]} (v0.3.77)" in updated.stdout
    assert "ComfyUI moved to" in updated.stderr  # a running ComfyUI is restarted for it

    # COMFYUI_REF=latest is the same field: a fresh volume takes the newest release
    (tmp_path / "second").mkdir()
    env2 = start_env(tmp_path / "second", COMFYUI_REPO=str(upstream), COMFYUI_REF="latest")
    write_config(env2, {"models": [], "nodes": []})
    second = run_script(env2, "start.sh", "--provision-only")
    assert second.returncode == 0, second.stdout + second.stderr
    assert read_lock_file(Path(env2["VOLUME_ROOT"]) / "comfy.lock.yml")["comfyui"] == {"ref": "v0.3.77"}


def test_comfyui_ref_latest_without_a_release_tag_is_a_clear_error(tmp_path):
    from support.gitrepos import git

    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q")
    (upstream / "main.py").write_text("")
    git(upstream, "add", "main.py")
    git(upstream, "commit", "-q", "-m", "no release yet")
    git(upstream, "tag", "v1.0.0-beta")
    env = start_env(tmp_path, COMFYUI_REPO=str(upstream), COMFYUI_REF="latest")
    write_config(env, {"models": [], "nodes": []})
    out = run_script(env, "start.sh", "--provision-only")
    assert out.returncode == 1
    assert f"ComfyUI ref 'latest': {upstream} has no release tag (vX.Y.Z); set comfyui.ref" in out.stderr
    assert "Traceback" not in out.stderr


def test_comfyui_path_that_is_not_a_checkout_is_a_clear_error_and_nothing_is_deleted(tmp_path):
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    comfy = Path(env["VOLUME_ROOT"]) / "ComfyUI"
    mine = {"output/mine.png": b"out", "input/in.png": b"in", "user/default/settings.json": b"{}", "notes.txt": b"n"}
    for rel, data in mine.items():
        (comfy / rel).parent.mkdir(parents=True, exist_ok=True)
        (comfy / rel).write_bytes(data)
    subprocess.run(["git", "init", "-q", str(comfy)], check=True)  # another repository, not ComfyUI
    out = run_script(env, "start.sh", "--provision-only")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"COMFYUI_PATH {comfy} holds a .git but no ComfyUI checkout" in out.stderr
    assert "Traceback" not in out.stderr
    assert all((comfy / rel).read_bytes() == data for rel, data in mine.items())
    assert sorted(p.name for p in comfy.iterdir()) == [".git", "input", "notes.txt", "output", "user"]
    assert not (Path(env["VOLUME_ROOT"]) / ".config-sha256").exists()

    a_file = tmp_path / "comfy-file"
    a_file.write_text("not a folder")
    out = run_script({**env, "COMFYUI_PATH": str(a_file)}, "start.sh", "--provision-only")
    assert out.returncode == 1 and f"COMFYUI_PATH {a_file} is a file, not a folder" in out.stderr
    assert a_file.read_text() == "not a folder" and "Traceback" not in out.stderr


@pytest.mark.parametrize("signalled", ["start.sh", "group"])
def test_sigterm_mid_download_ends_the_start_within_3_s_without_nodes_or_gate(tmp_path, origin, node_repo, signalled):
    # "group": what tini -g sends on a container stop; "start.sh": a kill of the script's pid alone
    path = tmp_path / "src" / "slow.safetensors"
    random_file(path, 8 * MiB, seed=5)
    origin.add("/slow.safetensors", file=path, rate=64 * 1024)  # one 1 MiB read would take 16 s
    env = start_env(tmp_path)
    write_config(
        env,
        {
            "models": [{"url": f"{origin.url}/slow.safetensors", "destination": "checkpoints"}],
            "nodes": [{"url": node_repo.url, "version": "v1.0.0"}],
        },
    )
    volume = Path(env["VOLUME_ROOT"])
    proc = subprocess.Popen(
        ["bash", str(ROOT / "start.sh"), "--provision-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and origin.sent("/slow.safetensors") < 128 * 1024:
            time.sleep(0.05)
        assert proc.poll() is None and origin.sent("/slow.safetensors") >= 128 * 1024
        stopped = time.monotonic()
        if signalled == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            pytest.fail("start.sh --provision-only still running 3 s after SIGTERM")
        assert time.monotonic() - stopped < 3
        with pytest.raises(ProcessLookupError):  # nothing of the start is left running on its own
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode not in (0, None), out + err
    assert "phase models: started" in err
    assert "phase nodes" not in err and "gate is not written" in err, err
    assert not (volume / ".config-sha256").exists() and not (volume / ".config-sha256.json").exists()
    assert not (volume / "ComfyUI" / "custom_nodes" / "StartNode").exists()
    part = volume / "ComfyUI" / "models" / "checkpoints" / "slow.safetensors.part"
    # kept for the next start (its size: what had reached the process, which a loaded machine may delay)
    assert part.is_file() and part.with_name(part.name + ".source").is_file()
    assert not part.with_name("slow.safetensors").exists()


def test_apply_config_refuses_to_replace_an_edited_volume_config_with_config_yml(tmp_path):
    env = start_env(tmp_path, CONFIG_YML="models: []\n")
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    edited = Path(env["VOLUME_ROOT"]) / "config.yml"
    edited.write_text("models: []\nnodes: []\n# edited in Jupyter\n")
    out = run_script(env, "apply_config.sh")
    assert out.returncode == 2
    assert "CONFIG_YML is set" in out.stderr and "unset CONFIG_YML" in out.stderr
    assert edited.read_text().endswith("# edited in Jupyter\n")  # the user's edits are still there


def test_a_pod_without_config_yml_gets_the_baked_config_on_the_volume_to_edit(tmp_path):
    # the dry run looks the baked config's model up: found in a hub cache on the host, no network
    make_hf_cache(tmp_path / "hub", "ai-forever/Real-ESRGAN", "RealESRGAN_x2.pth", b"esrgan")
    env = start_env(tmp_path, MODE="pod", HF_HUB_CACHE=str(tmp_path / "hub"))
    dry_run = [sys.executable, "-m", "comfy_worker.provision", "--dry-run"]
    out = subprocess.run(dry_run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    on_volume = Path(env["VOLUME_ROOT"]) / "config.yml"
    assert on_volume.read_text() == (ROOT / "config.yml").read_text() and "edit it there" in out.stderr
    on_volume.write_text("models: []\n# edited\n")  # a later start keeps the user's file
    out = subprocess.run(dry_run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and on_volume.read_text() == "models: []\n# edited\n"
    (tmp_path / "local").mkdir()
    local = start_env(tmp_path / "local")  # local mode edits the repo's config.yml in place: no copy
    subprocess.run(dry_run, env=local, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert not (Path(local["VOLUME_ROOT"]) / "config.yml").exists()


WARM_CONFIG = "models: []\nnodes: []\n# the same config, however it arrives (base64 of it is wrapped)\n"
FULL_CHECK = "this volume is provisioned for this config (gate matches)"


def test_config_yml_in_base64_wrapped_at_76_columns_takes_the_fast_warm_path(tmp_path):
    """issue 20 #9: the warm record is keyed on the decoded config, not on how CONFIG_YML encodes it."""
    env = start_env(tmp_path)
    one_line = base64.b64encode(WARM_CONFIG.encode()).decode()
    first = run_script({**env, "CONFIG_YML": one_line}, "start.sh", "--provision-only")
    assert first.returncode == 0, first.stderr
    wrapped = base64.encodebytes(WARM_CONFIG.encode()).decode()  # `base64 config.yml`: 76 columns
    assert len(wrapped.splitlines()) > 1
    for value in (wrapped, wrapped, WARM_CONFIG):  # every later start is fast: no full check, no volume lock
        again = run_fast({**env, "CONFIG_YML": value}, "start.sh", "--provision-only")
        assert again.returncode == 0, again.stderr
        assert "gate matches" in again.stderr and FULL_CHECK not in again.stderr


def test_volume_at_another_mount_path_takes_the_fast_warm_path(tmp_path):
    """issue 20 #9: the warm record does not depend on where the volume is mounted."""
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    elsewhere = tmp_path / "mounted" / "elsewhere"
    elsewhere.parent.mkdir()
    os.rename(env["VOLUME_ROOT"], elsewhere)
    moved = {**env, "VOLUME_ROOT": str(elsewhere)}
    for _ in range(2):
        out = run_fast(moved, "start.sh", "--provision-only")
        assert out.returncode == 0, out.stderr
        assert "gate matches" in out.stderr and FULL_CHECK not in out.stderr


def test_a_full_check_finding_the_gate_matching_refreshes_the_warm_record(tmp_path):
    """issue 20 #9: a record the source does not match (an older version's) is rewritten by the full
    check that finds the gate matching, so the start after it is fast again."""
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    record_path = Path(env["VOLUME_ROOT"]) / ".config-sha256.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "source": "0" * 64}))
    full = run_script(env, "start.sh", "--provision-only")
    assert full.returncode == 0, full.stderr
    assert FULL_CHECK in full.stderr and "warm record refreshed" in full.stderr
    assert json.loads(record_path.read_text()) == record
    fast = run_fast(env, "start.sh", "--provision-only")
    assert fast.returncode == 0 and FULL_CHECK not in fast.stderr, fast.stderr


@pytest.mark.skipif(
    not read_only_mounts(), reason="needs unshare -rm (a private mount namespace) for a read-only mount"
)
def test_read_only_volume_at_another_path_starts_warm(tmp_path):
    """issue 20 #9: a read-only volume mounted at another path starts on the fast path; with a record
    it cannot refresh, the full check still starts it (with a warning), never taking the lock."""
    env = start_env(tmp_path, CONFIG_YML=base64.b64encode(WARM_CONFIG.encode()).decode())
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    volume = Path(env["VOLUME_ROOT"])
    before = snapshot(volume)
    read_only = {**env, "VOLUME_ROOT": str(tmp_path / "ro" / "volume")}
    wrapped = {**read_only, "CONFIG_YML": base64.encodebytes(WARM_CONFIG.encode()).decode()}
    for variant in (read_only, wrapped):
        out = run_on_read_only_volume(variant, volume, "start.sh", "--provision-only")
        assert out.returncode == 0, out.stderr
        assert "gate matches" in out.stderr and FULL_CHECK not in out.stderr
    assert snapshot(volume) == before

    record_path = volume / ".config-sha256.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "source": "0" * 64}))
    out = run_on_read_only_volume(read_only, volume, "start.sh", "--provision-only")
    assert out.returncode == 0, out.stderr
    assert FULL_CHECK in out.stderr and "cannot refresh the warm record" in out.stderr
    assert "Read-only file system" in out.stderr and "Traceback" not in out.stderr


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file, folder and link under ``root``: its bytes (or link target), mode and mtime."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            seen[str(path.relative_to(root))] = ("link", os.readlink(path), st.st_mtime_ns)
        elif path.is_file():
            seen[str(path.relative_to(root))] = ("file", st.st_mode, st.st_mtime_ns, path.read_bytes())
        else:  # a folder's mtime moves when anything is created or removed in it, a temp file too
            seen[str(path.relative_to(root))] = ("dir", st.st_mode, st.st_mtime_ns)
    return seen


def test_apply_config_dry_run_lists_each_model_node_and_the_restart_and_changes_nothing(tmp_path, nginx, git_repos):
    """issue 20 #8 (issue 21 #3): with a node moving v1 -> v2, a node added and models added,
    ``apply_config.sh --dry-run`` lists each model it would fetch, link or keep, each node it would
    clone, move (old -> new version and commit) or keep, and that ComfyUI would restart; the volume
    is byte-identical afterwards (no file, record, lock or checkout written)."""
    moving = git_repos.create("MovingNode", {"__init__.py": NODE_INIT})
    moving.tag("v1.0.0")
    moving.commit({"__init__.py": NODE_INIT + "\n# v2\n"})
    moving.tag("v2.0.0")
    moving.push()
    kept, added = git_repos.create("KeptNode", {"__init__.py": NODE_INIT}), git_repos.create("AddedNode", {})
    for repo in (kept, added):
        repo.tag("v1.0.0")
        repo.push()
    data = b"cached model bytes" * 100
    make_hf_cache(tmp_path / "hf-cache" / "hub", "org/model", "unet.safetensors", data)
    env = start_env(tmp_path, HF_HUB_CACHE=str(tmp_path / "hf-cache" / "hub"))
    models = [{"url": f"{nginx.url}/b.bin", "destination": "checkpoints"}]
    nodes = [{"url": moving.url, "version": "v1.0.0"}, {"url": kept.url, "version": "v1.0.0"}]
    write_config(env, {"models": models, "nodes": nodes})
    first = run_script(env, "start.sh", "--provision-only")
    assert first.returncode == 0, first.stdout + first.stderr

    models += [
        {"url": f"{nginx.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"},
        {"url": "https://huggingface.co/org/model/resolve/main/unet.safetensors", "destination": "unet"},
    ]
    nodes[0]["version"] = "v2.0.0"
    nodes.append({"url": added.url, "version": "v1.0.0"})
    write_config(env, {"models": models, "nodes": nodes})
    volume = Path(env["VOLUME_ROOT"])
    before = snapshot(volume)
    out = run_script(env, "apply_config.sh", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert snapshot(volume) == before
    listed = [" ".join(line.split()) for line in out.stdout.splitlines()]
    old, new = moving.head("v1.0.0")[:12], moving.head("v2.0.0")[:12]
    for expected in (
        "keep models[0] checkpoints/b.bin (4.9 KiB)",
        f"would fetch models[1] upscale_models/{UPSCALE_MODEL_NAME}",
        "would link from cache models[2] unet/unet.safetensors",
        f"would move nodes[0] MovingNode from v1.0.0 ({old}) to v2.0.0 ({new})",
        f"keep nodes[1] KeptNode at v1.0.0 ({kept.head('v1.0.0')[:12]})",
        f"would clone nodes[2] AddedNode at v1.0.0 ({added.head('v1.0.0')[:12]})",
        f"ComfyUI would be restarted once it has no job running or waiting, to load: MovingNode {old} -> {new}; "
        "AddedNode added",
    ):
        assert any(line.startswith(expected) for line in listed), (expected, out.stdout)
    assert "no node changed" not in out.stderr

    unchanged = run_script(env, "apply_config.sh", "--dry-run", "--no-restart")
    assert "ComfyUI would NOT be restarted (--no-restart)" in unchanged.stdout
    nodes[0]["version"] = "v1.0.0"  # back to what the volume holds: no node would change
    write_config(env, {"models": models[:1], "nodes": nodes[:2]})
    same = run_script(env, "apply_config.sh", "--dry-run")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "ComfyUI would keep running: no node would change" in same.stdout
    assert "gate matches" in same.stdout


def test_apply_config_update_moves_latest_branch_and_tag_nodes_and_force_resolves_again(tmp_path, git_repos):
    """issue 21 #4: after upstream moved, plain apply_config.sh keeps every node; `--dry-run --update`
    shows the moves and changes nothing; `--update` moves the `latest`, branch and tag nodes to what
    they name now (a commit pin stays); `--force` resolves every entry again, as docs/nodes.md says."""
    from support.gitrepos import git

    repos = {name: git_repos.create(name, {"__init__.py": NODE_INIT}) for name in ("Latest", "Branch", "Tag", "Pinned")}
    for repo in repos.values():
        repo.tag("v1.0.0")
        repo.push()
    pinned = repos["Pinned"].head()
    versions = {"Latest": "latest", "Branch": "main", "Tag": "v1.0.0", "Pinned": pinned}
    git(repos["Branch"].work, "branch", "-M", "main")
    repos["Branch"].push()
    env = start_env(tmp_path)
    write_config(env, {"nodes": [{"url": repos[n].url, "version": v} for n, v in versions.items()]})
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    volume = Path(env["VOLUME_ROOT"])
    before = {n: r.head() for n, r in repos.items()}

    moved = {}
    for name, repo in repos.items():  # upstream moves on: a new release, a new commit, a re-pointed tag
        moved[name] = repo.commit({"__init__.py": NODE_INIT + f"\n# {name} moved\n"})
    repos["Latest"].tag("v1.1.0")
    git(repos["Tag"].work, "tag", "-f", "-a", "v1.0.0", "-m", "re-pointed")
    for repo in repos.values():
        repo.push()

    def heads() -> dict[str, str]:
        return {n: git(volume / "ComfyUI" / "custom_nodes" / n, "rev-parse", "HEAD") for n in repos}

    kept = run_script(env, "apply_config.sh")
    assert kept.returncode == 0 and heads() == before, kept.stdout + kept.stderr
    snap = snapshot(volume)
    dry = run_script(env, "apply_config.sh", "--dry-run", "--update")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert snapshot(volume) == snap
    listed = [" ".join(line.split()) for line in dry.stdout.splitlines()]
    for i, (name, version) in enumerate(versions.items()):
        if name == "Pinned":
            expected = f"keep nodes[{i}] Pinned at {pinned} ({pinned[:12]})"
        else:
            old, new = before[name][:12], moved[name][:12]
            expected = f"would move nodes[{i}] {name} from {version} ({old}) to {version} ({new})"
        assert any(line.startswith(expected) for line in listed), (expected, dry.stdout)

    updated = run_script(env, "apply_config.sh", "--update")
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert heads() == {**moved, "Pinned": pinned}
    assert "nodes changed (Latest " in updated.stderr
    recorded = {n["name"]: n["version"] for n in read_lock_file(volume / "comfy.lock.yml")["nodes"]}
    assert recorded == heads()

    newest = repos["Latest"].commit({"__init__.py": NODE_INIT + "\n# newest\n"})
    repos["Latest"].tag("v1.2.0")
    repos["Latest"].push()
    forced = run_script(env, "apply_config.sh", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert heads()["Latest"] == newest


def test_a_warm_record_that_cannot_be_written_fails_no_start(tmp_path):
    """issue 20 #9: every entry is ready, the record beside the gate cannot be written (here a folder
    stands in its way): the start succeeds, says so, and the next one checks in full again."""
    env = start_env(tmp_path)
    write_config(env, {"models": [], "nodes": []})
    (Path(env["VOLUME_ROOT"]) / ".config-sha256.json").mkdir(parents=True)
    for _ in range(2):
        out = run_script(env, "start.sh", "--provision-only")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "every entry is ready, but the gate" in out.stderr and "Traceback" not in out.stderr


def test_apply_config_names_model_files_no_entry_names_and_prune_removes_them(tmp_path, nginx):
    """issue 21 #10: removing an entry left its file, silently, and ComfyUI kept listing it."""
    env = start_env(tmp_path)
    cfg = {
        "models": [
            {"url": f"{nginx.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"},
            {"url": f"{nginx.url}/b.bin", "destination": "loras", "filename": "b.safetensors"},
        ]
    }
    write_config(env, cfg)
    assert run_script(env, "start.sh", "--provision-only").returncode == 0
    models = Path(env["VOLUME_ROOT"]) / "ComfyUI" / "models"
    removed, kept = models / "loras" / "b.safetensors", models / "upscale_models" / UPSCALE_MODEL_NAME
    by_hand = models / "loras" / "mine.safetensors"
    by_hand.write_bytes(b"put here by the user")
    assert removed.is_file() and kept.is_file()

    cfg["models"].pop()
    write_config(env, cfg)
    said = run_script(env, "apply_config.sh")
    assert said.returncode == 0, said.stdout + said.stderr
    assert "models/loras/b.safetensors is on the volume but no config entry names it any more" in said.stderr
    assert "apply_config.sh --prune removes it" in said.stderr and "mine.safetensors" not in said.stderr
    assert removed.is_file()  # only said

    pruned = run_script(env, "apply_config.sh", "--prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert "pruned models/loras/b.safetensors" in pruned.stderr
    assert not removed.exists() and kept.is_file() and by_hand.is_file()
    recorded = [r["filename"] for r in read_lock_file(Path(env["VOLUME_ROOT"]) / "comfy.lock.yml")["models"]]
    assert recorded == [UPSCALE_MODEL_NAME]
    again = run_script(env, "apply_config.sh")
    assert "no config entry names it" not in again.stderr


def test_apply_config_force_hashes_the_models_and_replaces_a_corrupted_one(tmp_path, origin):
    """issue 20 #5: a model whose bytes changed on the volume (same size) stayed "present ok" even with
    `apply_config.sh --force`: the lock-file record vouched for it. --force now reaches download_models.py,
    which hashes the file against its sha256 and downloads it again."""
    data = b"m" * 4000
    sha = hashlib.sha256(data).hexdigest()
    origin.add("/m.bin", body=data)
    env = start_env(tmp_path)
    write_config(env, {"models": [{"url": f"{origin.url}/m.bin", "destination": "checkpoints", "sha256": sha}]})
    first = run_script(env, "start.sh", "--provision-only")
    assert first.returncode == 0, first.stdout + first.stderr
    target = Path(env["VOLUME_ROOT"]) / "ComfyUI" / "models" / "checkpoints" / "m.bin"
    target.write_bytes(b"x" * 4000)  # same size, other bytes
    plain = run_script(env, "apply_config.sh")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert target.read_bytes() == b"x" * 4000  # without --force the record is trusted: no hashing
    forced = run_script(env, "apply_config.sh", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "present but its sha256 differs from the expected one" in forced.stderr
    assert target.read_bytes() == data
