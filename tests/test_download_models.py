"""download_models.py end to end: the real CLI against nginx, a fault-injecting origin and local fakes of
the Hugging Face resolve endpoint and CivitAI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from support.origins import FaultyOrigin, NginxOrigin, fake_civitai, fake_huggingface, free_port, random_file

from comfy_worker.config_schema import load_config
from comfy_worker.file_names import MAX_NAME_BYTES
from comfy_worker.http_download import MiB

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "download_models.py"
HF_TOKEN = "hf_TESTsecretTOKENvalue123"
CIVITAI_TOKEN = "civitaiSECRETtoken987"


class Box:
    """A volume with a config, and the environment to run download_models.py on it."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.volume = tmp_path / "volume"
        self.models = self.volume / "ComfyUI" / "models"
        self.config = tmp_path / "config.yml"
        self.env = {
            k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "CIVITAI_TOKEN", "HF_ENDPOINT", "CONFIG_YML")
        }
        self.env.update(
            VOLUME_ROOT=str(self.volume),
            COMFYUI_PATH=str(self.volume / "ComfyUI"),
            DOWNLOAD_RETRY_BACKOFF="0.01",
            HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens: no real hub is ever reached
            CIVITAI_BASE_URL=f"http://127.0.0.1:{free_port()}",
            HF_HOME=str(tmp_path / "hf-home"),
            PYTHONUNBUFFERED="1",
        )

    def write(self, models: list[dict]) -> None:
        self.config.write_text(yaml.safe_dump({"models": models}))

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, str(SCRIPT), "--config", str(self.config), *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def lock(self) -> dict:
        return yaml.safe_load((self.volume / "comfy.lock.yml").read_text())


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nginx_bytes(workdir: Path) -> int:
    """Body bytes nginx sent, from its access log (combined format)."""
    log = workdir / "access.log"
    if not log.exists():
        return 0
    return sum(int(m) for m in re.findall(r'" \d{3} (\d+) "', log.read_text()))


def saved_progress(part: Path) -> int:
    """Bytes a parallel download has recorded as on disk in its .part.state."""
    try:
        return sum(json.loads(part.with_name(part.name + ".state").read_text())["done"])
    except (OSError, ValueError):
        return 0


@pytest.fixture
def box(tmp_path):
    return Box(tmp_path)


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "src" / "model.safetensors"
    sha = random_file(path, 5 * MiB + 321, seed=3)
    return path, sha


def test_validate_only_checks_the_config_without_downloading(box):
    box.write([{"url": "https://example.org/a.safetensors", "destination": "checkpoints"}])
    r = box.run("--validate-only")
    assert r.returncode == 0 and "is valid (1 model(s)" in r.stdout
    box.write([{"url": "https://example.org/a.safetensors", "destination": "../etc"}])
    r = box.run("--validate-only")
    assert r.returncode == 2 and "models[0] (https://example.org/a.safetensors): destination" in r.stderr
    assert box.run().returncode == 2  # an invalid config never downloads


def test_downloads_from_nginx_verifies_records_and_skips_next_time_without_network(box, tmp_path):
    www = tmp_path / "www"
    sha = random_file(www / "vae.safetensors", 3 * MiB, seed=4)
    with NginxOrigin(www, tmp_path / "nginx") as ng:
        box.write(
            [
                {"url": f"{ng.url}/vae.safetensors", "destination": "vae", "sha256": sha},
                {"url": f"{ng.url}/vae.safetensors", "destination": "loras/wan", "filename": "copy.safetensors"},
            ]
        )
        r = box.run()
        assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "vae" / "vae.safetensors") == sha
    assert sha_of(box.models / "loras" / "wan" / "copy.safetensors") == sha
    assert sorted(p.name for p in box.models.rglob("*") if p.is_file() and ".locks" not in p.parts) == [
        "copy.safetensors",
        "vae.safetensors",
    ]
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "size", "source", "seconds", "MB/s", "action", "status"]
    assert "downloaded" in r.stdout
    lock = box.lock()["models"]
    assert {(e["destination"], e["filename"], e["sha256"], e["size"]) for e in lock} == {
        ("vae", "vae.safetensors", sha, 3 * MiB),
        ("loras/wan", "copy.safetensors", sha, 3 * MiB),
    }
    # nginx is gone: the recorded files are trusted by size, nothing is fetched
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("present") == 2


def test_lock_file_models_section_is_shaped_like_a_config(box, origin, blob):
    path, sha = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "optional": True}])
    assert box.run().returncode == 0
    entries = box.lock()["models"]
    assert entries == [
        {
            "url": f"{origin.url}/m.safetensors",
            "destination": "checkpoints",
            "filename": "m.safetensors",
            "sha256": sha,
            "size": path.stat().st_size,
            "optional": True,
        }
    ]
    cfg = load_config(box.volume / "comfy.lock.yml")  # the lock file is a config, unchanged
    assert cfg.models[0].sha256 == sha and cfg.models[0].size == path.stat().st_size


@pytest.mark.slow
def test_sigkill_mid_download_then_rerun_resumes_from_the_part(box, tmp_path):
    www = tmp_path / "www"
    size = 80 * MiB
    sha = random_file(www / "unet.safetensors", size, seed=5)
    workdir = tmp_path / "nginx"
    # at most 4 connections at 2 MB/s each (nginx lets each response start with a second's worth at
    # once, so many short ranged requests would take the file in a second): the download takes
    # seconds, and the rerun still long enough for a progress line
    box.env["DOWNLOAD_CONNECTIONS"] = "4"
    with NginxOrigin(www, workdir, limit_rate="2m") as ng:
        box.write([{"url": f"{ng.url}/limited/unet.safetensors", "destination": "unet"}])
        part = box.models / "unet" / "unet.safetensors.part"
        proc = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and saved_progress(part) < 30 * MiB:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = saved_progress(part)
        assert kept >= 30 * MiB
        assert not (box.models / "unet" / "unet.safetensors").exists()
        box.env["DOWNLOAD_LOG_INTERVAL"] = "0.5"
        r = box.run()
        assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "unet" / "unet.safetensors") == sha
    # no terminal: plain progress lines instead of a bar
    assert re.search(r"INFO download_models: unet.safetensors: \d+% [\d.]+ MiB / 80.0 MiB at [\d.]+ MB/s", r.stderr)
    assert f"resumed from {kept / MiB:.1f} MiB" in r.stderr, r.stderr
    # over both runs nginx sent the file once plus what the killed run had not yet recorded (at most
    # half a second of progress and what sat in socket buffers); without a resume it would be size + kept
    assert nginx_bytes(workdir) < size + kept // 2, (nginx_bytes(workdir), size, kept)
    assert not part.exists()


def test_connection_dropped_at_40_percent_is_resumed(box, origin, blob):
    path, sha = blob
    size = path.stat().st_size
    origin.add("/m.safetensors", file=path, drop_after=int(size * 0.4))
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "sha256": sha}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha
    assert origin.sent("/m.safetensors") < size * 1.10


def test_server_ignoring_range_gives_the_correct_file(box, origin, blob):
    path, sha = blob
    origin.add("/m.safetensors", file=path, ignore_range=True, drop_after=2 * MiB)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    (box.models / "checkpoints").mkdir(parents=True)
    (box.models / "checkpoints" / "m.safetensors.part").write_bytes(b"garbage" * 5000)
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha


def test_sha256_mismatch_fails_and_leaves_no_file(box, origin, blob):
    path, _ = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "sha256": "ab" * 32}])
    r = box.run()
    assert r.returncode == 1
    assert "sha256 mismatch" in r.stderr and "FAILED" in r.stdout
    assert not list((box.models / "checkpoints").iterdir())
    assert not (box.volume / "comfy.lock.yml").exists()


def test_size_mismatch_with_the_config_fails_before_downloading(box, origin, blob):
    path, _ = blob
    origin.add("/m.safetensors", file=path)
    size = path.stat().st_size
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "size": size + 1}])
    r = box.run()
    assert r.returncode == 1
    assert f"the server's file has {size} bytes but the config says size: {size + 1}" in r.stderr
    assert not (box.models / "checkpoints").exists() or not list((box.models / "checkpoints").iterdir())


def test_two_503s_then_success(box, origin, blob):
    path, sha = blob
    origin.add("/m.safetensors", file=path, fail_statuses=[503, 503])
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("HTTP 503") == 2
    assert [s.status for s in origin.seen("/m.safetensors")][:3] == [503, 503, 206]
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha


def test_404_on_an_optional_entry_warns_and_exits_0_but_fails_a_required_one(box, origin, blob):
    path, _ = blob
    origin.add("/ok.safetensors", file=path)
    box.write(
        [
            {"url": f"{origin.url}/ok.safetensors", "destination": "checkpoints"},
            {"url": f"{origin.url}/gone.safetensors", "destination": "loras", "optional": True},
        ]
    )
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert re.search(r"WARNING .*models\[1\] gone.safetensors .*404", r.stderr)
    assert "failed (optional)" in r.stdout
    box.write([{"url": f"{origin.url}/gone.safetensors", "destination": "loras"}])
    r = box.run()
    assert r.returncode == 1 and "ERROR" in r.stderr


def test_two_processes_on_the_same_target_download_once(box, origin, blob, tmp_path):
    path, sha = blob
    size = path.stat().st_size
    waiting = threading.Event()

    def hold_the_body(h, seen, head):
        # the download's body waits until the other process has said it waits for the lock, so the
        # two runs overlap however slowly the machine starts them
        if not head and seen.headers.get("range") != "bytes=0-0":
            waiting.wait(60)
        return False

    origin.add("/m.safetensors", file=path, handler=hold_the_body)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "filename": "m.safetensors"}])
    logs = [tmp_path / f"run{i}.err" for i in range(2)]
    procs = []
    for i in range(2):
        with open(tmp_path / f"run{i}.out", "w") as out, open(logs[i], "w") as err:
            procs.append(subprocess.Popen(box.argv(), env=box.env, stdout=out, stderr=err, text=True))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        "waiting for another process downloading m.safetensors" in f.read_text() for f in logs
    ):
        time.sleep(0.05)
    waiting.set()
    for p in procs:
        p.wait(60)
    outs = [((tmp_path / f"run{i}.out").read_text(), logs[i].read_text()) for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = [o[0] for o in outs]
    assert sorted("downloaded" in s for s in stdout) == [False, True]
    assert any("present" in s for s in stdout)
    assert any("waiting for another process downloading m.safetensors" in o[1] for o in outs)
    assert origin.sent("/m.safetensors") < size * 1.05
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha


def test_tokens_reach_only_their_own_hosts(box, blob, tmp_path):
    path, sha = blob
    other = tmp_path / "src" / "other.bin"
    random_file(other, 1000, seed=9)
    with (
        FaultyOrigin() as hub,
        FaultyOrigin() as hf_cdn,
        FaultyOrigin() as civitai,
        FaultyOrigin() as civitai_cdn,
        FaultyOrigin() as elsewhere,
    ):
        fake_huggingface(hub, hf_cdn, "org/repo", {"unet/model.safetensors": path})
        fake_civitai(civitai, civitai_cdn, 77, [(1001, "civ_model.safetensors", path)])
        elsewhere.add("/other.bin", file=other)
        box.env.update(
            HF_ENDPOINT=hub.url, CIVITAI_BASE_URL=civitai.url, HF_TOKEN=HF_TOKEN, CIVITAI_TOKEN=CIVITAI_TOKEN
        )
        box.write(
            [
                {"url": "https://huggingface.co/org/repo/resolve/main/unet/model.safetensors", "destination": "unet"},
                {"url": "https://civitai.com/api/download/models/1001", "destination": "loras"},
                {"url": "https://civitai.com/models/77", "destination": "checkpoints"},
                {"url": f"{elsewhere.url}/other.bin", "destination": "misc"},
            ]
        )
        r = box.run()
        assert r.returncode == 0, r.stderr + r.stdout
        # (huggingface_hub also fetches its own registry from the hub, without any token)
        resolve = [s for s in hub.seen() if "/resolve/" in s.path]
        assert resolve and all(s.headers.get("authorization") == f"Bearer {HF_TOKEN}" for s in resolve)
        assert {s.headers.get("authorization") for s in hub.seen()} <= {f"Bearer {HF_TOKEN}", None}
        assert {s.headers.get("authorization") for s in civitai.seen()} == {f"Bearer {CIVITAI_TOKEN}"}
        for server in (hf_cdn, civitai_cdn, elsewhere):
            assert server.seen()
            assert all("authorization" not in s.headers for s in server.seen()), server.seen()
            assert not any(HF_TOKEN in str(s) or CIVITAI_TOKEN in str(s) for s in server.seen())
    for secret in (HF_TOKEN, CIVITAI_TOKEN):
        assert secret not in r.stdout + r.stderr
        assert secret not in (box.volume / "comfy.lock.yml").read_text()
    assert sha_of(box.models / "loras" / "civ_model.safetensors") == sha
    assert sha_of(box.models / "checkpoints" / "civ_model.safetensors") == sha


def test_hugging_face_through_hf_endpoint_runs_huggingface_hub(box, blob):
    path, sha = blob
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        commit = fake_huggingface(hub, cdn, "org/repo", {"split files/model.safetensors": path})
        box.env["HF_ENDPOINT"] = hub.url
        box.write(
            [
                {
                    "url": "https://huggingface.co/org/repo/blob/main/split%20files/model.safetensors",
                    "destination": "unet",
                }
            ]
        )
        r = box.run()
        assert r.returncode == 0, r.stderr
        head = next(s for s in hub.seen() if "/resolve/" in s.path)
    assert head.method == "HEAD" and head.path == "/org/repo/resolve/main/split%20files/model.safetensors"
    assert "hf_hub/" in head.headers["user-agent"]  # the real huggingface_hub made the metadata call
    assert commit
    target = box.models / "unet" / "model.safetensors"
    assert sha_of(target) == sha
    assert "huggingface" in r.stdout
    entry = box.lock()["models"][0]
    assert entry["sha256"] == sha and entry["filename"] == "model.safetensors"


def test_hugging_face_lfs_sha256_is_verified_even_without_one_in_the_config(box, blob, tmp_path):
    path, _ = blob
    impostor = tmp_path / "src" / "impostor.bin"
    random_file(impostor, path.stat().st_size, seed=11)
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        fake_huggingface(hub, cdn, "org/repo", {"model.safetensors": path})
        cdn.routes[next(iter(cdn.routes))].file = impostor  # the CDN serves other bytes than the hub's sha256
        box.env["HF_ENDPOINT"] = hub.url
        box.write([{"url": "https://huggingface.co/org/repo/resolve/main/model.safetensors", "destination": "unet"}])
        r = box.run()
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr
    assert not (box.models / "unet" / "model.safetensors").exists()


def test_civitai_model_page_with_version_id_uses_content_disposition_name(box, blob):
    path, sha = blob
    with FaultyOrigin() as civitai, FaultyOrigin() as cdn:
        fake_civitai(civitai, cdn, 5, [(501, "Realistic Vision V6.safetensors", path)])
        box.env["CIVITAI_BASE_URL"] = civitai.url
        box.write([{"url": "https://civitai.com/models/5/realistic?modelVersionId=501", "destination": "checkpoints"}])
        r = box.run()
        assert r.returncode == 0, r.stderr
        assert [s.path.split("?")[0] for s in civitai.seen()] == ["/api/download/models/501"]
    assert sha_of(box.models / "checkpoints" / "Realistic Vision V6.safetensors") == sha


def test_dry_run_shows_what_where_and_size_and_writes_nothing(box, origin, blob):
    path, _ = blob
    origin.add("/m.safetensors", file=path)
    box.write(
        [
            {"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"},
            {"url": f"{origin.url}/m.safetensors", "destination": "vae", "filename": "v.safetensors"},
        ]
    )
    r = box.run("--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["name", "size", "source", "target", "from", "action", "status"]
    assert "5.0 MiB" in r.stdout and r.stdout.count("would download") == 2
    assert str(box.models / "vae" / "v.safetensors") in r.stdout
    assert f"{origin.url}/m.safetensors" in r.stdout
    assert {s.method for s in origin.seen()} == {"HEAD"}
    assert not box.volume.exists()


def test_only_selects_entries_and_rejects_unknown_names(box, origin, blob):
    path, _ = blob
    origin.add("/a.safetensors", file=path)
    origin.add("/b.safetensors", file=path)
    box.write(
        [
            {"url": f"{origin.url}/a.safetensors", "destination": "checkpoints"},
            {"url": f"{origin.url}/b.safetensors", "destination": "checkpoints"},
        ]
    )
    r = box.run("--only", "b.safetensors")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (box.models / "checkpoints").iterdir()] == ["b.safetensors"]
    r = box.run("--only", "c.safetensors")
    assert r.returncode == 2 and "no model entry named c.safetensors" in r.stderr


def test_a_file_whose_size_changed_is_replaced(box, origin, blob):
    path, sha = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    assert box.run().returncode == 0
    target = box.models / "checkpoints" / "m.safetensors"
    target.write_bytes(b"corrupted by hand")  # size no longer matches the record
    r = box.run()
    assert r.returncode == 0 and "downloaded" in r.stdout and sha_of(target) == sha


def test_not_enough_disk_space_fails_up_front(box, origin):
    def huge(h, seen, head):
        seen.status = 206
        h.send_response(206)
        h.send_header("Content-Range", "bytes 0-0/1000000000000000")
        h.send_header("Content-Length", "1")
        h.end_headers()
        h.wfile.write(b"x")
        return True

    origin.add("/huge.safetensors", handler=huge)
    box.write([{"url": f"{origin.url}/huge.safetensors", "destination": "checkpoints"}])
    r = box.run()
    assert r.returncode == 1 and "not enough disk space" in r.stderr
    assert len(origin.seen()) == 1  # only the probe; not one byte of the body was requested


def test_entries_download_in_parallel(box, origin, blob):
    path, _ = blob
    for name in ("a", "b", "c"):
        origin.add(f"/{name}.safetensors", file=path, rate=8 * MiB)  # about 0.65 s each
    box.write([{"url": f"{origin.url}/{n}.safetensors", "destination": "loras"} for n in ("a", "b", "c")])
    r = box.run("--parallel", "3")
    assert r.returncode == 0, r.stderr
    bodies = [s for s in origin.seen() if s.method == "GET" and s.sent > 1]
    assert len(bodies) == 3
    assert max(s.at for s in bodies) < min(s.finished for s in bodies)  # all three were in flight at once
    for n in ("a", "b", "c"):
        (box.models / "loras" / f"{n}.safetensors").unlink()
    r = box.run("--parallel", "1")
    assert r.returncode == 0, r.stderr
    bodies = [s for s in origin.seen() if s.method == "GET" and s.sent > 1][3:]
    assert sorted(s.at for s in bodies)[1] > sorted(s.finished for s in bodies)[0]  # one after the other


def test_two_entries_resolving_to_the_same_file_are_refused(box, origin, blob):
    path, _ = blob
    same = {"Content-Disposition": 'attachment; filename="same.safetensors"'}
    origin.add("/a", file=path, headers=same)
    origin.add("/b", file=path, headers=same)
    box.write([{"url": f"{origin.url}/{n}", "destination": "loras"} for n in ("a", "b")])
    r = box.run("--parallel", "1")
    assert r.returncode == 1
    assert "models[0] already downloads to" in r.stderr and "another 'filename'" in r.stderr


def test_a_changed_url_downloads_again_even_with_the_same_size(box, origin, tmp_path):
    v1, v2 = tmp_path / "v1.bin", tmp_path / "v2.bin"
    random_file(v1, MiB, seed=21)
    sha2 = random_file(v2, MiB, seed=22)
    origin.add("/v1/model.safetensors", file=v1)
    origin.add("/v2/model.safetensors", file=v2)
    box.write([{"url": f"{origin.url}/v1/model.safetensors", "destination": "unet"}])
    assert box.run().returncode == 0
    box.write([{"url": f"{origin.url}/v2/model.safetensors", "destination": "unet"}])
    r = box.run()
    assert r.returncode == 0 and "downloaded" in r.stdout
    assert sha_of(box.models / "unet" / "model.safetensors") == sha2
    assert box.lock()["models"][0]["url"].endswith("/v2/model.safetensors")


def test_missing_hugging_face_file_fails_with_a_clear_error(box):
    with FaultyOrigin() as hub:
        box.env["HF_ENDPOINT"] = hub.url
        box.write([{"url": "https://huggingface.co/org/repo/resolve/main/nope.safetensors", "destination": "unet"}])
        r = box.run()
    assert r.returncode == 1
    assert "Hugging Face org/repo/nope.safetensors@main: HTTP 404 (check the repo, revision and file path)" in r.stderr


@pytest.mark.slow
def test_sigterm_keeps_the_part_for_the_next_run(box, tmp_path):
    www = tmp_path / "www"
    sha = random_file(www / "clip.safetensors", 72 * MiB, seed=6)
    with NginxOrigin(www, tmp_path / "nginx", limit_rate="2m") as ng:
        box.write([{"url": f"{ng.url}/limited/clip.safetensors", "destination": "clip"}])
        part = box.models / "clip" / "clip.safetensors.part"
        proc = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and saved_progress(part) < 8 * MiB:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 1
        assert "interrupted; partial downloads are kept" in err
        kept = saved_progress(part)
        assert kept >= 8 * MiB and part.exists()
        r = box.run()
    assert r.returncode == 0, r.stderr
    assert f"resumed from {kept / MiB:.1f} MiB" in r.stderr
    assert sha_of(box.models / "clip" / "clip.safetensors") == sha


@pytest.mark.skipif(not shutil.which("script"), reason="needs script(1) from util-linux for a pseudo-terminal")
def test_progress_bar_on_a_terminal(box, origin, blob):
    path, _ = blob
    origin.add("/m.safetensors", file=path, rate=4 * MiB)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    command = f"stty cols 100 rows 30; {shlex.join(box.argv())}"
    r = subprocess.run(
        ["script", "-qec", command, "/dev/null"], env=box.env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout
    assert re.search(r"m\.safetensors:\s+\d+%\|.+\| [\d.]+M/5\.00M", r.stdout)  # a tqdm bar
    assert "downloaded" in r.stdout


def test_a_login_page_instead_of_a_model_is_an_error_not_a_file(box):
    with FaultyOrigin() as civitai:
        civitai.add(
            "/api/download/models/9",
            body=b"<html><body>Please log in</body></html>",
            headers={"Content-Type": "text/html; charset=utf-8"},
        )
        box.env["CIVITAI_BASE_URL"] = civitai.url
        box.write([{"url": "https://civitai.com/api/download/models/9", "destination": "loras", "filename": "x.pt"}])
        r = box.run()
    assert r.returncode == 1
    assert "answered with a web page instead of a file" in r.stderr and "token" in r.stderr
    assert not (box.models / "loras" / "x.pt").exists()


def test_models_dir_option_moves_the_downloads(box, origin, blob, tmp_path):
    path, sha = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "vae"}])
    r = box.run("--models-dir", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    assert sha_of(tmp_path / "elsewhere" / "vae" / "m.safetensors") == sha
    assert not (box.models / "vae").exists()


def test_a_part_left_by_another_url_is_not_resumed(box, origin, blob, tmp_path):
    path, _ = blob
    other = tmp_path / "src" / "new" / "m.safetensors"
    sha_new = random_file(other, path.stat().st_size, seed=12)
    origin.add("/old/m.safetensors", file=path, rate=2 * MiB)
    origin.add("/new/m.safetensors", file=other)  # same file name, same size, same ETag
    box.write([{"url": f"{origin.url}/old/m.safetensors", "destination": "checkpoints"}])
    part = box.models / "checkpoints" / "m.safetensors.part"
    proc = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < MiB):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 1
    assert part.stat().st_size >= MiB  # an interrupted download of the old url
    box.write([{"url": f"{origin.url}/new/m.safetensors", "destination": "checkpoints"}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert "resumed from" not in r.stderr
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha_new


def test_sigterm_during_a_retry_backoff_stops_at_once(box, origin, blob):
    path, _ = blob
    origin.add("/m.safetensors", file=path, fail_statuses=[503] * 5)
    box.env["DOWNLOAD_RETRY_BACKOFF"] = "30"  # the first retry would wait 22 to 37 s
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    proc = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not origin.seen():
        time.sleep(0.05)
    time.sleep(0.3)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("download_models.py kept sleeping in its retry backoff after SIGTERM")
    assert proc.returncode == 1 and "interrupted" in err
    assert time.monotonic() - stopped < 10
    assert len(origin.seen()) == 1


def test_dry_run_never_prints_a_signed_download_link(box, blob):
    path, _ = blob
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        fake_huggingface(hub, cdn, "org/repo", {"model.safetensors": path})
        box.env["HF_ENDPOINT"] = hub.url
        url = "https://huggingface.co/org/repo/resolve/main/model.safetensors"
        box.write([{"url": url, "destination": "unet"}])
        r = box.run("--dry-run")
    assert r.returncode == 0, r.stderr
    assert url in r.stdout and "5.0 MiB" in r.stdout
    assert "Signature" not in r.stdout + r.stderr and "?" not in r.stdout
    assert cdn.url not in r.stdout


def test_a_bad_environment_value_is_a_one_line_error_and_exit_2(box):
    box.write([{"url": "https://example.org/a.safetensors", "destination": "checkpoints"}])
    box.env["DOWNLOAD_CONNECTIONS"] = "x"
    r = box.run()
    assert r.returncode == 2
    assert r.stderr.strip() == "error: environment variable DOWNLOAD_CONNECTIONS must be a whole number, got 'x'"


# ---- hardening (issue 9) and test honesty (issue 15) ----


def test_an_expired_hugging_face_cdn_link_is_renewed_through_the_hub(box, blob):
    path, sha = blob
    size = path.stat().st_size
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        commit = fake_huggingface(hub, cdn, "org/repo", {"model.safetensors": path})
        route = next(iter(cdn.routes.values()))
        route.drop_after = 2 * MiB

        def expire_once_dropped(h, seen, head):
            bodies = [s for s in cdn.seen() if s.headers.get("range") not in (None, "bytes=0-0")]
            if len(bodies) == 1 and seen is bodies[0]:  # the reconnect after the drop: the link has expired
                seen.status = 403
                cdn._plain(h, 403, b"Request has expired\n", head)
                return True
            return False

        route.handler = expire_once_dropped
        box.env["HF_ENDPOINT"] = hub.url
        box.write([{"url": "https://huggingface.co/org/repo/resolve/main/model.safetensors", "destination": "unet"}])
        r = box.run()
        assert r.returncode == 0, r.stderr
        assert [s.status for s in cdn.seen()].count(403) == 1
        renewals = [s for s in hub.seen() if s.method == "GET" and f"/resolve/{commit}/" in s.path]
        assert len(renewals) == 2  # the first link and a fresh one, both for the resolved commit
        assert cdn.sent(next(iter(cdn.routes))) < size * 1.05
    assert sha_of(box.models / "unet" / "model.safetensors") == sha
    assert "may need a token" not in r.stderr


def test_a_signed_link_never_reaches_the_log_the_summary_or_the_lock_file(box, tmp_path):
    dead = free_port()
    with FaultyOrigin() as site:
        site.add("/download/7", redirect=f"http://127.0.0.1:{dead}/m.bin?X-Amz-Signature=SIGNEDsecret42&Expires=1")
        box.env["DOWNLOAD_RETRIES"] = "2"
        box.write([{"url": f"{site.url}/download/7", "destination": "loras", "filename": "m.safetensors"}])
        r = box.run()
    assert r.returncode == 1
    assert "Max retries exceeded" in r.stderr  # requests' own text, which quotes the link's path and query
    assert f"127.0.0.1:{dead}" in r.stdout + r.stderr  # the culprit is still named
    for text in (r.stdout, r.stderr):
        assert "SIGNEDsecret42" not in text and "X-Amz-Signature" not in text


def test_the_file_and_its_folder_are_fsynced_before_the_rename_and_the_record(box, origin, blob, monkeypatch):
    import download_models

    path, sha = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "vae"}])
    for k, v in box.env.items():
        monkeypatch.setenv(k, v)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert download_models.main(["--config", str(box.config)]) == 0
    target = box.models / "vae" / "m.safetensors"
    part = str(target) + ".part"
    rename = events.index(("replace", part, str(target)))
    assert ("fsync", part) in events[:rename]  # the bytes, before the rename
    record = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("comfy.lock.yml"))
    assert ("fsync", str(target.parent)) in events[rename:record]  # the rename, before the record
    assert sha_of(target) == sha


def _no_length(body: bytes):
    """A server that sends no Content-Length, ignores ranges and closes the connection after ``body``."""

    def handler(h, seen, head):
        seen.status = 200
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        if not head:
            h.wfile.write(body)
            seen.sent = len(body)
        h.close_connection = True
        return True

    return handler


def test_a_body_without_a_length_is_kept_unverified_and_checked_again_later(box, origin, blob):
    path, sha = blob
    whole = path.read_bytes()
    route = origin.add("/m.safetensors", handler=_no_length(whole[: len(whole) // 2]))  # cut short
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "loras"}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("m.safetensors"))
    assert row.split()[-3:] == ["downloaded", "(unverified)", "ok"]
    assert "unverified" in r.stderr and "sha256: " in r.stderr  # how to pin it
    assert box.lock()["models"][0]["sha256"] is None and box.lock()["models"][0]["size"] is None
    r = box.run()  # nobody knows more: kept as it is, still said to be unverified
    assert r.returncode == 0 and "present (unverified)" in r.stdout
    route.handler = _no_length(whole)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "loras", "sha256": sha}])
    r = box.run()  # the config now knows the sha256: the cut-off file is found out and replaced
    assert r.returncode == 0, r.stderr
    assert "downloaded" in r.stdout and "unverified" not in r.stdout
    assert sha_of(box.models / "loras" / "m.safetensors") == sha
    assert box.lock()["models"][0]["sha256"] == sha


@pytest.mark.parametrize("source", ["config", "hub"])
def test_a_present_file_of_the_right_size_but_wrong_sha256_is_downloaded_again(box, origin, blob, tmp_path, source):
    path, sha = blob
    target = box.models / "unet" / "model.safetensors"
    target.parent.mkdir(parents=True)
    random_file(target, path.stat().st_size, seed=99)  # same size, other bytes, no lock record
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        if source == "hub":  # the sha256 comes from the hub only (the LFS ETag), not the config
            fake_huggingface(hub, cdn, "org/repo", {"model.safetensors": path})
            box.env["HF_ENDPOINT"] = hub.url
            box.write(
                [{"url": "https://huggingface.co/org/repo/resolve/main/model.safetensors", "destination": "unet"}]
            )
        else:
            origin.add("/model.safetensors", file=path)
            box.write([{"url": f"{origin.url}/model.safetensors", "destination": "unet", "sha256": sha}])
        r = box.run()
    assert r.returncode == 0, r.stderr
    assert "sha256 differs" in r.stderr and "downloaded" in r.stdout
    assert sha_of(target) == sha
    assert box.lock()["models"][0]["sha256"] == sha


def test_sigterm_while_waiting_for_another_process_lock_stops_at_once(box, origin, blob, tmp_path):
    path, sha = blob
    route = origin.add("/m.safetensors", file=path, rate=1 * MiB)  # about 5 s: the first process holds the lock
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "filename": "m.safetensors"}])
    first = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = box.models / "checkpoints" / "m.safetensors.part"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (part.exists() and part.stat().st_size > 0):
        time.sleep(0.05)
    err_log = tmp_path / "second.err"
    with open(err_log, "w") as err:
        second = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.DEVNULL, stderr=err)
        while time.monotonic() < deadline and "waiting for another process" not in err_log.read_text():
            time.sleep(0.05)
        assert "waiting for another process downloading m.safetensors" in err_log.read_text()
        stopped = time.monotonic()
        second.send_signal(signal.SIGTERM)
        try:
            assert second.wait(5) == 1
        except subprocess.TimeoutExpired:
            second.kill()
            pytest.fail("download_models.py kept waiting for the lock after SIGTERM")
    assert time.monotonic() - stopped < 5
    assert "interrupted" in err_log.read_text()
    assert first.poll() is None and part.exists()  # the other process's download goes on, resumable
    route.rate = None  # the rest at full speed: the lock was held long enough
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert sha_of(box.models / "checkpoints" / "m.safetensors") == sha


def test_server_chosen_file_names_are_made_safe(box, origin, blob):
    path, _ = blob
    names = {
        "/a": "attachment; filename*=UTF-8''evil%0A2026-01-01 00:00:00 INFO fake.safetensors",
        "/b": 'attachment; filename=".bashrc"',
        "/c": 'attachment; filename="x.part"',
        "/d": "attachment; filename*=UTF-8''%E2%80%AEsrotnesfas.exe",
        "/e": f'attachment; filename="{"n" * 240}.safetensors"',
    }
    for route, cd in names.items():
        origin.add(route, file=path, headers={"Content-Disposition": cd})
    box.write([{"url": f"{origin.url}{route}", "destination": f"m{route[1]}"} for route in names])
    r = box.run()
    assert r.returncode == 0, r.stderr
    files = {p.parent.name: p.name for p in box.models.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert files["ma"] == "evil2026-01-01 00:00:00 INFO fake.safetensors"
    assert files["mb"] == "bashrc"
    assert files["mc"] == "c"  # a name ending in our own suffix is refused: the URL's name instead
    assert files["md"] == "srotnesfas.exe"
    assert files["me"].endswith(".safetensors") and len(files["me"].encode()) <= MAX_NAME_BYTES
    assert "\u202e" not in r.stdout + r.stderr
    assert not re.search(r"^2026-01-01 00:00:00 INFO fake", r.stderr, re.MULTILINE)  # no injected log line
    table = r.stdout.splitlines()
    assert len(table) == 2 + len(names)  # one row per entry: no name broke the table
    assert "is not safe to use as is" in r.stderr and "'x.part'" in r.stderr


def test_a_volume_without_working_flock_is_one_clear_error(box, origin, blob, tmp_path):
    path, _ = blob
    origin.add("/a.safetensors", file=path)
    origin.add("/b.safetensors", file=path)
    box.write([{"url": f"{origin.url}/{n}.safetensors", "destination": "loras"} for n in "ab"])
    site = tmp_path / "noflock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import errno, fcntl, os\n"
        "def flock(fd, op):\n"
        "    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
        "fcntl.flock = flock\n"
    )
    box.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), box.env.get("PYTHONPATH")]))
    r = box.run()
    assert r.returncode == 1
    assert r.stderr.count("does not support file locks (flock)") == 1, r.stderr
    assert "put the volume on a filesystem that does" in r.stderr
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    assert not [s for s in origin.seen() if s.method == "GET"]  # nothing was downloaded


def test_download_retries_and_connections_are_honoured_from_the_environment(box, origin, tmp_path):
    big = tmp_path / "src" / "big.safetensors"
    sha = random_file(big, 64 * MiB, seed=31)  # the documented multipart threshold: exactly 64 MiB
    origin.add("/big.safetensors", file=big, rate=48 * MiB)
    origin.add("/flaky.safetensors", file=big, fail_statuses=[503] * 10)
    box.env["DOWNLOAD_CONNECTIONS"] = "3"
    box.write([{"url": f"{origin.url}/big.safetensors", "destination": "unet"}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "unet" / "big.safetensors") == sha
    bodies = [s for s in origin.seen("/big.safetensors") if s.headers.get("range") != "bytes=0-0"]
    # The origin notes a request finished when its handler returns, a moment after the client got the
    # last byte and may have sent the next request: overlaps under 50 ms are that, not a 4th connection.
    events = sorted([(s.at, 1) for s in bodies] + [((s.finished or s.at) - 0.05, -1) for s in bodies])
    peak = max(sum(d for _, d in events[: i + 1]) for i in range(len(events)))
    # exactly 3 connections at a time (requests of up to 16 MiB, ~330 ms each, and shorter ones near the end)
    assert peak == 3 and len(bodies) >= 4

    box.env["DOWNLOAD_RETRIES"] = "2"
    box.write([{"url": f"{origin.url}/flaky.safetensors", "destination": "unet"}])
    r = box.run()
    assert r.returncode == 1 and "gave up after 2 attempts" in r.stderr
    assert len(origin.seen("/flaky.safetensors")) == 2


def test_hugging_face_files_in_a_hub_cache_are_linked_without_a_request_and_a_wrong_sha256_is_refused(box, tmp_path):
    """RunPod's cached models: an entry found in a hub cache on the host is linked (zero requests to the
    hub or its CDN, which serve the very same files, so a download would have succeeded), checked
    against the entry's sha256 or else the blob's LFS name, and recorded like a download."""
    from support.hf_hub_cache import make_hf_cache

    files = {name: tmp_path / "hub-files" / name for name in ("a.safetensors", "b.safetensors", "c.safetensors")}
    for i, path in enumerate(files.values()):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * (3000 + i))
    data = {name: path.read_bytes() for name, path in files.items()}
    cache = tmp_path / "runpod-volume" / "huggingface-cache" / "hub"
    make_hf_cache(cache, "org/repo", "a.safetensors", data["a.safetensors"])
    make_hf_cache(cache, "org/repo", "b.safetensors", data["b.safetensors"])
    # a damaged blob: its content is not the sha256 its LFS name says
    make_hf_cache(
        cache, "org/repo", "c.safetensors", b"damaged", blob=hashlib.sha256(data["c.safetensors"]).hexdigest()
    )
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        fake_huggingface(hub, cdn, "org/repo", files)
        box.env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache))
        url = "https://huggingface.co/org/repo/resolve/main/{}".format
        box.write(
            [
                {"url": url("a.safetensors"), "destination": "unet", "sha256": sha_of(files["a.safetensors"])},
                {"url": url("b.safetensors"), "destination": "loras"},  # checked against the blob's LFS name
            ]
        )
        out = box.run()
        assert out.returncode == 0, out.stdout + out.stderr
        assert hub.seen() == [] and cdn.seen() == []
        for name, dest in (("a.safetensors", "unet"), ("b.safetensors", "loras")):
            target = box.models / dest / name
            assert target.is_symlink() and target.read_bytes() == data[name]
            assert f"{target}: linked from cache" in out.stderr
        assert out.stdout.count("linked from cache") == 2
        recorded = {m["filename"]: m for m in box.lock()["models"]}
        assert recorded["b.safetensors"] == {
            "url": url("b.safetensors"),
            "destination": "loras",
            "filename": "b.safetensors",
            "sha256": sha_of(files["b.safetensors"]),
            "size": 3001,
        }

        # the next run keeps them by their record: no hashing, no request
        again = box.run()
        assert again.returncode == 0 and hub.seen() == [] and cdn.seen() == []
        assert "linked from cache" not in again.stdout and again.stdout.count("present") == 2

        # a wrong sha256 in the config: the cached file is refused, never linked; the hub's file fails it too
        box.write([{"url": url("a.safetensors"), "destination": "vae", "sha256": "0" * 64}])
        wrong = box.run()
        assert wrong.returncode == 1
        assert "not linked" in wrong.stderr and "downloading it instead" in wrong.stderr
        assert "sha256 mismatch" in wrong.stdout + wrong.stderr
        assert not (box.models / "vae" / "a.safetensors").exists()
        assert not (box.models / "vae" / "a.safetensors").is_symlink()

        # a damaged blob (content differs from its LFS name): refused, downloaded from the hub instead
        box.write([{"url": url("c.safetensors"), "destination": "vae"}])
        damaged = box.run()
        assert damaged.returncode == 0, damaged.stdout + damaged.stderr
        target = box.models / "vae" / "c.safetensors"
        assert not target.is_symlink() and target.read_bytes() == data["c.safetensors"]
        assert "not linked" in damaged.stderr and [s.path for s in cdn.seen() if s.method == "GET"]


@pytest.mark.parametrize("connections", [1, 8], ids=["one-connection", "parallel"])
def test_sigterm_on_a_slow_server_stops_within_3_s_and_the_next_run_resumes(box, origin, tmp_path, connections):
    # 64 KiB/s per connection: one 1 MiB read would block for 16 s if nothing cut it short
    size = 8 * MiB if connections == 1 else 64 * MiB  # 64 MiB: the parallel path's threshold
    path = tmp_path / "src" / "slow.safetensors"
    sha = random_file(path, size, seed=21)
    route = origin.add("/slow.safetensors", file=path, rate=64 * 1024)
    box.env["DOWNLOAD_CONNECTIONS"] = str(connections)
    box.write([{"url": f"{origin.url}/slow.safetensors", "destination": "checkpoints"}])
    part = box.models / "checkpoints" / "slow.safetensors.part"
    proc = subprocess.Popen(box.argv(), env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def first_chunk_sent() -> int:  # the bytes sent for the file's start (no Range, or bytes=0-N but the probe)
        return sum(
            s.sent
            for s in origin.seen("/slow.safetensors")
            if s.headers.get("range", "bytes=0-").startswith("bytes=0-") and s.headers.get("range") != "bytes=0-0"
        )

    deadline = time.monotonic() + 30
    # on a busy machine the server may answer the first chunk's request after others: wait for its bytes too
    while time.monotonic() < deadline and (
        origin.sent("/slow.safetensors") < 192 * 1024 or first_chunk_sent() < 64 * 1024
    ):
        time.sleep(0.05)
    time.sleep(0.5)  # what was sent has reached the process (it sits in a read of 1 MiB)
    assert proc.poll() is None
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("download_models.py still running 3 s after SIGTERM")
    assert time.monotonic() - stopped < 3
    assert proc.returncode == 1, err
    assert "interrupted; partial downloads are kept" in err
    assert "Traceback" not in err and "retry" not in err  # a stop is not a network error to retry
    assert part.is_file() and part.with_name(part.name + ".source").is_file()
    if connections == 1:
        kept = part.stat().st_size  # a prefix: every byte that arrived was written
    else:
        kept = saved_progress(part)
        chunk0 = json.loads(part.with_name(part.name + ".state").read_text())["done"][0]
        assert chunk0 > 0
    assert kept > 0
    assert not (box.models / "checkpoints" / "slow.safetensors").exists()

    route.rate = None
    before = len(origin.seen("/slow.safetensors"))
    r = box.run()
    assert r.returncode == 0, r.stderr
    assert sha_of(box.models / "checkpoints" / "slow.safetensors") == sha
    second = origin.seen("/slow.safetensors")[before:]  # (the first run's answers may still add a piece)
    ranges = [s.headers.get("range") for s in second]
    resumed_at = kept if connections == 1 else chunk0  # the file's (or its first chunk's) bytes kept
    assert any(rng and rng.startswith(f"bytes={resumed_at}-") for rng in ranges), ranges
    assert sum(s.sent for s in second) == size - kept + 1  # the rest, and the probe's byte


# ---- hardening, part three (issue 20) ----


def _corrupt_in_place(path: Path) -> str:
    """Change a few bytes of ``path`` without changing its size (bit rot, a bad write); its new sha256."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00rot\x00")
    return sha_of(path)


@pytest.mark.parametrize("pinned_by", ["config", "record"])
def test_a_corrupted_model_is_hashed_and_replaced_by_force(box, origin, blob, pinned_by):
    """issue 20 #5: a model whose bytes changed on the volume (same size) stayed "present ok" even with
    --force: the lock-file record vouched for it. --force hashes every present file whose entry (or,
    without one there, whose record) has a sha256, and replaces a mismatch."""
    path, sha = blob
    size = path.stat().st_size
    origin.add("/m.safetensors", file=path)
    entry = {"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}
    if pinned_by == "config":
        entry["sha256"] = sha
    box.write([entry])
    assert box.run().returncode == 0
    assert box.lock()["models"][0]["sha256"] == sha
    target = box.models / "checkpoints" / "m.safetensors"
    rotten = _corrupt_in_place(target)
    assert box.run().stdout.count("present") == 1  # an ordinary run trusts the record: no hashing
    before = origin.sent("/m.safetensors")
    r = box.run("--force")
    assert r.returncode == 0, r.stderr
    said_by = "the config" if pinned_by == "config" else "comfy.lock.yml"
    assert f"{target}: present but its sha256 differs from the expected one (it is {rotten}, {said_by} says {sha})" in (
        r.stderr
    )
    assert "downloaded" in r.stdout
    assert sha_of(target) == sha and origin.sent("/m.safetensors") - before >= size
    assert box.lock()["models"][0]["sha256"] == sha
    before = origin.sent("/m.safetensors")
    r = box.run("--force")  # a good file is hashed and kept: no byte of it is fetched again
    assert r.returncode == 0 and "present" in r.stdout and "downloaded" not in r.stdout
    assert origin.sent("/m.safetensors") - before <= 1  # at most the probe's byte


def test_force_downloads_a_file_without_any_sha256_again(box, origin):
    """issue 20 #5: with nothing to hash a file against (a server without a length, no sha256 anywhere),
    --force cannot check it, so it downloads it again."""
    data = b"no length, no sha256" * 1000
    origin.add("/m.safetensors", handler=_no_length(data))
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "loras"}])
    assert box.run().returncode == 0
    before = origin.sent("/m.safetensors")
    r = box.run("--force")
    assert r.returncode == 0, r.stderr
    assert "no sha256 to check it against; downloading it again" in r.stderr
    assert "downloaded" in r.stdout and origin.sent("/m.safetensors") - before >= len(data)


def test_a_config_sha256_that_differs_from_the_records_is_never_satisfied_by_the_record(box, origin, blob, tmp_path):
    """issue 20 #5: the config now pins another sha256 than the one recorded (a new version upstream at
    the same url, same size): the record cannot vouch for the file, which is hashed and replaced."""
    path, sha = blob
    newer = tmp_path / "src" / "newer.safetensors"
    sha_new = random_file(newer, path.stat().st_size, seed=44)
    route = origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "sha256": sha}])
    assert box.run().returncode == 0
    route.file, route.etag = newer, '"v2"'
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints", "sha256": sha_new}])
    r = box.run()
    assert r.returncode == 0, r.stderr
    target = box.models / "checkpoints" / "m.safetensors"
    assert f"(it is {sha}, the config says {sha_new})" in r.stderr and "downloaded" in r.stdout
    assert sha_of(target) == sha_new and box.lock()["models"][0]["sha256"] == sha_new


def test_a_sha256_mismatch_on_the_xet_path_deletes_the_part_and_its_records(box, blob):
    """issue 20 (test gap): the Xet download path (``_download_xet``: hf_hub_download into a staging
    folder, renamed to the .part, checked) and its clean-up on a sha256 mismatch. The fake hub says the
    file is stored with Xet; HF_HUB_DISABLE_XET=1 makes huggingface_hub fetch it over plain HTTP from the
    loopback hub, as nothing here speaks Xet's storage protocol: everything of ours runs for real."""
    path, sha = blob
    url = "https://huggingface.co/org/repo/resolve/main/model.safetensors"
    unet = box.models / "unet"
    with FaultyOrigin() as hub, FaultyOrigin() as cdn:
        fake_huggingface(hub, cdn, "org/repo", {"model.safetensors": path}, xet=True)
        box.env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
        box.write([{"url": url, "destination": "unet", "sha256": "ab" * 32}])
        r = box.run()
        assert r.returncode == 1, r.stdout + r.stderr
        bodies = [s for s in cdn.seen() if s.method == "GET"]
        assert bodies and all("hf_hub/" in s.headers["user-agent"] for s in bodies)  # hf_hub_download fetched it
        assert f"models[0] model.safetensors ({url}): sha256 mismatch: got {sha}, expected {'ab' * 32}" in r.stderr
        assert "the partial file was deleted" in r.stderr
        assert sorted(p.name for p in unet.iterdir()) == []  # no .part, no staging folder, no file
        assert not (box.volume / "comfy.lock.yml").exists() or not box.lock().get("models")

        box.write([{"url": url, "destination": "unet", "sha256": sha}])  # the right sha256: the same path succeeds
        r = box.run()
        assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in unet.iterdir()) == ["model.safetensors"]
    assert sha_of(unet / "model.safetensors") == sha and box.lock()["models"][0]["sha256"] == sha


def _can_mount_tmpfs() -> bool:
    """A private tmpfs in a user and mount namespace (``unshare -rm``): a small filesystem of an exact
    size, without root on the host."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare(1) and user namespaces to mount a small tmpfs")
def test_the_disk_space_error_says_the_whole_need_with_the_safety_margin(box, origin, blob, tmp_path):
    """issue 20 #13: "needs 5.0 MiB more, 60.0 MiB free" contradicted itself; the message says the whole
    need, the 64 MiB margin included. On a real 60 MiB filesystem, and one of 70 MiB where it fits."""
    path, sha = blob
    origin.add("/m.safetensors", file=path)
    box.write([{"url": f"{origin.url}/m.safetensors", "destination": "checkpoints"}])
    models = tmp_path / "small-disk"
    models.mkdir()

    def run_on_tmpfs(mib: int) -> subprocess.CompletedProcess:
        command = f"mount -t tmpfs -o size={mib}m tmpfs {shlex.quote(str(models))} && exec " + shlex.join(
            [*box.argv("--models-dir", str(models)), "--parallel", "1"]
        )
        return subprocess.run(
            ["unshare", "-rm", "sh", "-c", command], env=box.env, capture_output=True, text=True, timeout=120
        )

    r = run_on_tmpfs(60)
    assert r.returncode == 1
    assert (
        f"not enough disk space in {models / 'checkpoints'}: needs 69.0 MiB free (5.0 MiB for m.safetensors "
        "+ a 64 MiB safety margin), 60.0 MiB free; free some space or use a bigger volume" in r.stderr
    ), r.stderr
    assert len(origin.seen()) == 1  # only the probe
    r = run_on_tmpfs(70)
    assert r.returncode == 0, r.stderr
    assert "downloaded" in r.stdout


def test_dry_run_names_an_unreachable_hugging_face_file_once(box):
    """issue 25: the label came twice ("Hugging Face X@main: Hugging Face X@main: ConnectError...") in
    the retry warnings and the dry run's line; HF_ENDPOINT here is a port where nothing listens."""
    box.env["DOWNLOAD_RETRIES"] = "2"
    box.write([{"url": "https://huggingface.co/org/repo/resolve/main/m.safetensors", "destination": "unet"}])
    r = box.run("--dry-run")
    label = "Hugging Face org/repo/m.safetensors@main"
    assert r.returncode == 1, r.stdout + r.stderr
    failures = [line for line in (r.stdout + r.stderr).splitlines() if label in line]
    assert failures and all(line.count(label) == 1 for line in failures), failures
    assert any("gave up after 2 attempts" in line for line in failures)


def test_importing_the_script_leaves_garbage_collection_on():
    """The script runs its imports without garbage collection (start-up time): a process that imports it
    as a module (a test, a tool) gets collection back once the imports are done."""
    code = "import gc, download_models; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
