"""start.sh with its services (local mode): a real ComfyUI, the worker's HTTP API (comfy_worker.api)
serving handler.py, JupyterLab; warm-up, apply_config.sh, SIGTERM, ComfyUI dying."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from support.comfy_process import ROOT, TEST_NODES, free_port
from support.models import UPSCALE_MODEL_NAME
from support.origins import FaultyOrigin
from support.runpod_fakes import FakeRunPodQueue
from support.start_env import NODE_INIT, run_script, start_env

pytestmark = pytest.mark.slow

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
    "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALE_MODEL_NAME}},
    "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
    "4": {"class_type": "StartTestPassImage", "inputs": {"image": ["3", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "start_test"}},
}
SECRET = "jupyter-secret-token-123"
NODE_V11 = '\nNODE_CLASS_MAPPINGS["StartTestPassImageV11"] = PassImage\n'


def get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def post(url: str, body: dict, timeout: float = 120, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def stop_start(proc: subprocess.Popen) -> None:
    """End a start and everything it started, even when a test failed half-way: the services run in
    their own sessions, so killing the start's group alone would leave them behind."""
    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def start(env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(ROOT / "start.sh")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def box(tmp_path, git_repos, upscale_model_file):
    repo = git_repos.create("StartNode", {"__init__.py": NODE_INIT})
    repo.tag("v1.0.0")
    repo.commit({"__init__.py": NODE_INIT + NODE_V11})
    repo.tag("v1.1.0")
    repo.commit({"__init__.py": "raise ImportError('StartNode v1.2.0 needs a package that is not installed')\n"})
    repo.tag("v1.2.0-broken")
    repo.push()
    with FaultyOrigin() as origin:
        origin.add(f"/{UPSCALE_MODEL_NAME}", file=upscale_model_file)
        origin.add("/extra.bin", body=b"x" * 1234)
        env = start_env(
            tmp_path,
            MODE="local",
            COMFY_PORT=str(free_port()),
            API_PORT=str(free_port()),
            JUPYTER_PORT=str(free_port()),
            JUPYTER_PASSWORD=SECRET,
            WARMUP_WORKFLOW=str(tmp_path / "warmup.json"),
        )
        (tmp_path / "warmup.json").write_text(json.dumps({"input": {"workflow": WORKFLOW}}))
        volume = Path(env["VOLUME_ROOT"])
        volume.mkdir(parents=True)
        cfg = {
            "models": [{"url": f"{origin.url}/{UPSCALE_MODEL_NAME}", "destination": "upscale_models"}],
            "nodes": [{"url": repo.url, "version": "v1.0.0"}],
        }
        (volume / "config.yml").write_text(yaml.safe_dump(cfg))
        yield env, origin, cfg, volume, repo


def test_local_mode_serves_a_job_warm_up_first_jupyter_token_apply_config_and_sigterm(tmp_path, box):
    env, origin, cfg, volume, _ = box
    log = tmp_path / "start.log"
    proc = start(env, log)
    try:
        api = f"http://127.0.0.1:{env['API_PORT']}"
        wait_until(lambda: get(f"{api}/ping") == 200, 240, f"the local API; log:\n{log.read_text()}")
        text = log.read_text()
        assert text.index("warm-up workflow") < text.index("handler started"), text  # "warm-up workflow ... done"
        answer = post(f"{api}/runsync", {"input": {"workflow": WORKFLOW}})
        assert answer["status"] == "COMPLETED", answer
        assert "WARNING: the warm-up" not in text

        jupyter = f"http://127.0.0.1:{env['JUPYTER_PORT']}"
        wait_until(lambda: get(f"{jupyter}/api/status?token={SECRET}") == 200, 60, "Jupyter")
        assert get(f"{jupyter}/api/contents") == 403
        assert get(f"{jupyter}/api/contents?token={SECRET}") == 200
        assert get(f"{jupyter}/api/contents?token=wrong") == 403

        # apply_config.sh adds a model to the running box; ComfyUI keeps its PID
        comfy_pid = Path(env["COMFY_PID_FILE"]).read_text().strip()
        cfg["models"].append({"url": f"{origin.url}/extra.bin", "destination": "checkpoints"})
        (volume / "config.yml").write_text(yaml.safe_dump(cfg))
        applied = run_script(env, "apply_config.sh")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert (volume / "ComfyUI" / "models" / "checkpoints" / "extra.bin").read_bytes() == b"x" * 1234
        assert "no node changed: ComfyUI keeps running" in applied.stderr
        assert Path(env["COMFY_PID_FILE"]).read_text().strip() == comfy_pid and psutil.pid_exists(int(comfy_pid))

        # SIGTERM: every child gone within 10 s
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=max(0.1, 10 - (time.monotonic() - started)))
        assert alive == [] and time.monotonic() - started < 10
    finally:
        stop_start(proc)
    text = log.read_text() + Path(env["COMFY_LOG_FILE"]).read_text()
    assert SECRET not in text


def comfy_pid(env) -> int:
    return int(Path(env["COMFY_PID_FILE"]).read_text())


def comfy_answers(env) -> bool:
    try:
        return get(f"http://127.0.0.1:{env['COMFY_PORT']}/system_stats", timeout=2) == 200
    except OSError:  # nothing listens yet
        return False


def object_info(env) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{env['COMFY_PORT']}/object_info", timeout=30) as r:
        return json.load(r)


def serverless(env: dict, queue: FakeRunPodQueue) -> dict:
    """A serverless start that takes jobs from a local stand-in of RunPod's queue (the real SDK's worker loop)."""
    env = {k: v for k, v in env.items() if k != "MODE"}
    return {
        **env,
        "RUNPOD_ENDPOINT_ID": "test-endpoint",
        "RUNPOD_POD_ID": "test-worker",
        "ALLOW_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "WARMUP_WORKFLOW": "",
        "RUNPOD_WEBHOOK_GET_JOB": f"{queue.base}/job-take/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{queue.base}/done/$ID?gpu=cpu",
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "RUNPOD_MIN_MEMORY_GB": "0",
        "RUNPOD_MIN_DISK_PERCENT": "0",
    }


def test_serverless_takes_the_first_job_only_after_comfyui_answers(tmp_path, box):
    env, _, _, _, _ = box
    queue = FakeRunPodQueue([{"id": "job-1", "input": {"workflow": WORKFLOW}}])
    env = serverless(env, queue)
    log = tmp_path / "start.log"
    proc = start(env, log)
    answered_before_first_take = None
    try:
        deadline = time.monotonic() + 240
        while "job-1" not in queue.results:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            if answered_before_first_take is None and queue.takes:
                answered_before_first_take = comfy_answers(env)  # the take is already there: is ComfyUI up?
            if answered_before_first_take is None and comfy_answers(env):
                answered_before_first_take = True
            time.sleep(0.1)
        assert answered_before_first_take is True, log.read_text()
        result = queue.results["job-1"]
        images = result["output"]["images"]
        assert "error" not in result["output"] and not result["output"]["errors"], result
        assert [i["filename"] for i in images] == ["start_test_00001_.png"] and images[0]["data"], result
        text = log.read_text()
        assert "mode serverless" in text and "Jupyter started" not in text
        assert text.index("ComfyUI answers") < text.index("handler started"), text
        # RunPod's fitness check (handler.worker_ready) ran and passed before the first job was asked for
        assert "Fitness check: the provisioning gate is on the volume and ComfyUI answers" in text
        assert "All fitness checks passed" in text
    finally:
        stop_start(proc)
        queue.server.shutdown()


def test_a_failed_required_entry_ends_a_serverless_start_but_pod_and_local_start_with_a_warning_and_comfyui_killed_ends_one(
    tmp_path, box
):
    """A required model that fails ends a serverless start (exit 1, no job taken) while pod and local start,
    warned, and serve jobs. The local start runs with COMFY_RESTART=0: ComfyUI killed ends it, non-zero."""
    env, origin, cfg, volume, _ = box
    cfg["models"].append({"url": f"{origin.url}/missing.safetensors", "destination": "checkpoints"})
    (volume / "config.yml").write_text(yaml.safe_dump(cfg))
    queue = FakeRunPodQueue([{"id": "job-1", "input": {"workflow": WORKFLOW}}])
    log = tmp_path / "start-serverless.log"
    proc = start(serverless(env, queue), log)
    try:
        assert proc.wait(120) == 1, log.read_text()
        text = log.read_text()
        assert "provisioning failed in serverless mode: this worker takes no jobs half-provisioned" in text
        assert queue.takes == [] and not Path(env["COMFY_PID_FILE"]).exists()
        assert "ComfyUI started" not in text
    finally:
        stop_start(proc)
        queue.server.shutdown()

    env = {**env, "ENABLE_JUPYTER": "0", "WARMUP_WORKFLOW": ""}
    for mode in ("local", "pod"):
        log = tmp_path / f"start-{mode}.log"
        proc = start({**env, "MODE": mode, **({"COMFY_RESTART": "0"} if mode == "local" else {})}, log)
        try:
            api = f"http://127.0.0.1:{env['API_PORT']}"
            wait_until(lambda: get(f"{api}/ping") == 200, 240, f"the local API; log:\n{log.read_text()}")  # noqa: B023
            text = log.read_text()
            assert "WARNING: provisioning is incomplete" in text and "missing.safetensors" in text
            token = None
            if mode == "pod":  # listening on 0.0.0.0: the API asks for the token it generated on the volume
                token = (volume / ".api-token").read_text().strip()
                assert text.count(token) == 1 and "API token (saved in" in text
                with pytest.raises(urllib.error.HTTPError, match="401"):
                    post(f"{api}/runsync", {"input": {"workflow": WORKFLOW}})
            answer = post(f"{api}/runsync", {"input": {"workflow": WORKFLOW}}, token=token)
            assert answer["status"] == "COMPLETED" and answer["output"]["images"], answer
            if mode == "local":  # COMFY_RESTART=0: ComfyUI killed ends the start, non-zero
                os.kill(int(Path(env["COMFY_PID_FILE"]).read_text()), signal.SIGKILL)
                assert proc.wait(20) != 0
                assert "ComfyUI exited" in log.read_text()
        finally:
            stop_start(proc)


def held_workflow(release: Path, max_seconds: float = 120) -> dict:
    """A job that runs in ComfyUI until the file ``release`` exists."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "WorkerTestWaitFile",
            "inputs": {"image": ["1", 0], "path": str(release), "max_seconds": max_seconds},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "held"}},
    }


def comfy_queue(env) -> tuple[list, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{env['COMFY_PORT']}/queue", timeout=5) as r:
        data = json.load(r)
    return data["queue_running"], data["queue_pending"]


def job_status(api: str, job_id: str) -> dict:
    with urllib.request.urlopen(f"{api}/status/{job_id}", timeout=10) as r:
        return json.load(r)


def final_status(api: str, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(api, job_id)
        if status["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {status['status']} after {timeout:g} s: it hangs")


def set_node_version(cfg: dict, volume: Path, version: str) -> None:
    cfg["nodes"][0]["version"] = version
    (volume / "config.yml").write_text(yaml.safe_dump(cfg))


def test_comfyui_restarted_when_it_exits_and_by_apply_config_after_the_running_job_only_when_nodes_changed(
    tmp_path, box
):
    """One start (COMFY_RESTART=1) walks every way ComfyUI is restarted: killed, it is started again; a node
    change restarts it once its running job is done (issue 20 #6: the job completes, the restart comes after
    it, the wait is said and bounded: past it, no restart, and the next apply_config.sh does it); --no-restart
    leaves it running; --now restarts at once and the cut job ends, it never hangs; apply_config.sh returns
    once the new ComfyUI answers with the node loaded, or names a node that failed to import (issue 21 #9)."""
    env, _, cfg, volume, repo = box
    env = {**env, "COMFY_RESTART": "1", "ENABLE_JUPYTER": "0", "WARMUP_WORKFLOW": ""}
    shutil.copytree(TEST_NODES, volume / "ComfyUI" / "custom_nodes" / "comfy_worker_test_nodes")
    old, new = repo.head("v1.0.0")[:12], repo.head("v1.1.0")[:12]
    log = tmp_path / "start.log"
    proc = start(env, log)
    try:
        api = f"http://127.0.0.1:{env['API_PORT']}"
        wait_until(lambda: get(f"{api}/ping") == 200, 240, f"the local API; log:\n{log.read_text()}")

        # COMFY_RESTART=1: ComfyUI killed -> a new ComfyUI answers, the start keeps running
        killed = comfy_pid(env)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: comfy_pid(env) != killed and comfy_answers(env), 120, f"a new ComfyUI; {log.read_text()}")
        assert proc.poll() is None and "restarting ComfyUI (COMFY_RESTART=1)" in log.read_text()
        assert post(f"{api}/runsync", {"input": {"workflow": WORKFLOW}})["status"] == "COMPLETED"

        # a node moved: the restart waits for the running job, which completes; only then does ComfyUI
        # restart, and apply_config.sh returns once the new ComfyUI answers with the new version loaded
        first = comfy_pid(env)
        assert "StartTestPassImageV11" not in object_info(env)
        job = post(f"{api}/run", {"input": {"workflow": held_workflow(tmp_path / "release-1")}})["id"]
        wait_until(lambda: comfy_queue(env)[0], 60, "the held job running in ComfyUI")
        prompt = comfy_queue(env)[0][0][1]
        set_node_version(cfg, volume, "v1.1.0")
        said = tmp_path / "apply.err"
        with said.open("w") as err:
            applying = subprocess.Popen(["bash", str(ROOT / "apply_config.sh")], env=env, stderr=err, text=True)
        try:
            wait_until(
                lambda: "waiting for them to finish" in said.read_text() or applying.poll() is not None,
                120,
                "apply_config.sh waiting",
            )
            time.sleep(1)  # were it not waiting, ComfyUI would be going down by now
            assert applying.poll() is None, said.read_text()
            assert comfy_pid(env) == first and comfy_queue(env)[0]
            (tmp_path / "release-1").touch()
            assert applying.wait(120) == 0, said.read_text()
        finally:
            if applying.poll() is None:
                applying.kill()
        text = said.read_text()
        assert f"ComfyUI has jobs: 1 running (prompt {prompt}), 0 waiting; waiting for them to finish" in text
        assert "at most 900 s; apply_config.sh --now restarts at once" in text
        assert f"nodes changed (StartNode {old} -> {new}): ComfyUI is being restarted" in text
        # issue 21 #9: apply_config.sh returns once the new ComfyUI answers with the node loaded
        assert "ComfyUI answers again" in text and "every custom node imported" in text
        assert final_status(api, job, 60)["status"] == "COMPLETED"
        assert comfy_pid(env) not in (killed, first) and comfy_answers(env)
        assert "StartTestPassImageV11" in object_info(env) and proc.poll() is None

        # bounded: past --max-wait ComfyUI is not restarted (exit 1, said); the job completes, and the
        # next apply_config.sh, with nothing changed any more, does the restart that is still due
        second = comfy_pid(env)
        job = post(f"{api}/run", {"input": {"workflow": held_workflow(tmp_path / "release-2")}})["id"]
        wait_until(lambda: comfy_queue(env)[0], 60, "the held job running in ComfyUI")
        set_node_version(cfg, volume, "v1.0.0")
        bounded = run_script(env, "apply_config.sh", "--max-wait", "1")
        assert bounded.returncode == 1, bounded.stdout + bounded.stderr
        assert "ComfyUI still has jobs after 1 s" in bounded.stderr
        assert "ComfyUI was NOT restarted" in bounded.stderr and "apply_config.sh --now" in bounded.stderr
        (tmp_path / "release-2").touch()
        assert final_status(api, job, 60)["status"] == "COMPLETED" and comfy_pid(env) == second
        due = run_script(env, "apply_config.sh", "--dry-run")
        assert "ComfyUI would be restarted once it has no job running or waiting, to load: still due" in due.stdout
        again = run_script(env, "apply_config.sh")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"still due from an earlier run: StartNode {new} -> {old}): ComfyUI is being restarted" in again.stderr
        wait_until(lambda: comfy_pid(env) != second and comfy_answers(env), 120, "the restarted ComfyUI")
        assert "StartTestPassImageV11" not in object_info(env)
        after = run_script(env, "apply_config.sh")
        assert "no node changed: ComfyUI keeps running" in after.stderr

        # --now: no wait; the cut job ends (it does not hang until its timeout)
        third = comfy_pid(env)
        job = post(f"{api}/run", {"input": {"workflow": held_workflow(tmp_path / "never")}})["id"]
        wait_until(lambda: comfy_queue(env)[0], 60, "the held job running in ComfyUI")
        set_node_version(cfg, volume, "v1.1.0")
        now = run_script(env, "apply_config.sh", "--now")
        assert now.returncode == 0, now.stdout + now.stderr
        assert "--now: ComfyUI is restarted at once" in now.stderr
        wait_until(lambda: comfy_pid(env) != third and comfy_answers(env), 120, "the restarted ComfyUI")
        assert final_status(api, job, 90)["status"] == "FAILED"

        # --no-restart: the node moves back, ComfyUI keeps running (and the log says a restart is due)
        fourth = comfy_pid(env)
        restarts = log.read_text().count("restarting ComfyUI (asked by apply_config.sh)")
        set_node_version(cfg, volume, "v1.0.0")
        kept = run_script(env, "apply_config.sh", "--no-restart")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert f"nodes changed (StartNode {new} -> {old}): restart ComfyUI" in kept.stderr
        assert "--no-restart given" in kept.stderr
        time.sleep(2)  # a restart asked by SIGHUP would have stopped the old process by now
        assert comfy_pid(env) == fourth and psutil.pid_exists(fourth) and comfy_answers(env)
        assert log.read_text().count("restarting ComfyUI (asked by apply_config.sh)") == restarts

        # issue 21 #9: a node that fails to import is named in apply_config.sh's own output, exit 1
        set_node_version(cfg, volume, "v1.2.0-broken")
        broken = run_script(env, "apply_config.sh")
        assert broken.returncode == 1, broken.stdout + broken.stderr
        assert "custom node StartNode failed to import in ComfyUI" in broken.stderr
        assert "every custom node imported" not in broken.stderr and comfy_answers(env) and proc.poll() is None
    finally:
        stop_start(proc)


@pytest.mark.parametrize("script", ["start.sh", "deploy.sh", "build.sh", "apply_config.sh"])
def test_help_prints_text_not_comment_lines(script):
    """issue 21: ``start.sh --help`` printed its raw comment lines."""
    done = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip()
    assert not [line for line in done.stdout.splitlines() if line.startswith("#")], done.stdout
