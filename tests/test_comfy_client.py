"""comfy_client.py: process liveness from the PID file, readiness, and the HTTP calls on real ComfyUI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from support.aio import arun
from support.comfy_process import free_port

from comfy_worker import comfy_client
from comfy_worker.comfy_client import ComfyClient, log_tail, process_state
from comfy_worker.job_errors import JobError


def test_process_state_alive_zombie_dead_and_unknown(tmp_path):
    pid_file = tmp_path / "p.pid"
    assert process_state(pid_file) == (None, None)  # no file
    pid_file.write_text("not a pid")
    assert process_state(pid_file) == (None, None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pid_file.write_text(f"{proc.pid}\n")
    assert process_state(pid_file) == (True, proc.pid)
    proc.kill()
    deadline = time.monotonic() + 5
    while process_state(pid_file)[0] and time.monotonic() < deadline:  # killed but not reaped: a zombie
        time.sleep(0.02)
    assert process_state(pid_file) == (False, proc.pid)
    proc.wait()
    assert process_state(pid_file) == (False, proc.pid)


def test_log_tail_keeps_the_last_lines(tmp_path):
    log = tmp_path / "comfyui.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, lines=3) == "line 97\nline 98\nline 99"
    assert log_tail(tmp_path / "missing.log") == ""


def test_wait_ready_returns_when_comfyui_answers(comfyui):
    client = ComfyClient(comfyui.host, comfyui.pid_file, comfyui.log_path)
    started = time.monotonic()
    assert arun(lambda: client.wait_ready(10)) is None
    assert time.monotonic() - started < 1  # at once: no wait for a ComfyUI that answers


def test_wait_ready_waits_until_an_http_server_answers(tmp_path):
    import threading

    from support.local_http import QuietHandler

    class Stats(QuietHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/system_stats" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    servers = []
    port = free_port()

    def start_later():
        time.sleep(0.8)
        import http.server

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Stats)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    threading.Thread(target=start_later).start()
    client = ComfyClient(f"127.0.0.1:{port}", tmp_path / "absent.pid", tmp_path / "absent.log")
    started = time.monotonic()
    try:
        arun(lambda: client.wait_ready(10))
        assert 0.7 <= time.monotonic() - started < 3
    finally:
        for server in servers:
            server.shutdown()


def test_object_info_is_read_again_for_an_unknown_class(comfyui):
    client = ComfyClient(comfyui.host, comfyui.pid_file, comfyui.log_path)
    stale = {"SaveImage": True}  # a list read before the test nodes existed
    comfy_client._node_classes[comfyui.host] = stale
    try:
        known = arun(lambda: client.output_node_classes({"SaveImage"}))
        assert known is stale  # every class is listed: no new read
        known = arun(lambda: client.output_node_classes({"SaveImage", "WorkerTestApiKey"}))
        assert known["WorkerTestApiKey"] is True and known["EmptyImage"] is False  # read again from ComfyUI
        assert comfy_client._node_classes[comfyui.host] is known
    finally:
        comfy_client._node_classes.pop(comfyui.host, None)


def test_wait_ready_fails_at_once_when_the_process_is_gone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / "comfyui.pid").write_text(str(proc.pid))
    (tmp_path / "comfyui.log").write_text("Traceback...\nRuntimeError: CUDA out of memory\n")
    client = ComfyClient(f"127.0.0.1:{free_port()}", tmp_path / "comfyui.pid", tmp_path / "comfyui.log")
    started = time.monotonic()
    with pytest.raises(JobError) as info:
        arun(lambda: client.wait_ready(60))
    assert time.monotonic() - started < 2
    assert "no longer running" in info.value.message and info.value.refresh_worker
    assert "CUDA out of memory" in info.value.details["comfyui_log_tail"]


def stats_server_later(port: int, delay: float, servers: list) -> None:
    """After ``delay``, an HTTP server on ``port`` answering ``/system_stats`` (a ComfyUI back up)."""
    import http.server
    import threading

    from support.local_http import QuietHandler

    class Stats(QuietHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/system_stats" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    def start():
        time.sleep(delay)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Stats)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    threading.Thread(target=start, daemon=True).start()


def test_wait_ready_waits_for_a_dead_comfyui_to_be_restarted_where_it_is_restarted(tmp_path):
    """issue 20 #18: on pods and local boxes (COMFY_RESTART) a job sent while the PID file still names the
    dead ComfyUI waits for the supervisor's new one instead of failing at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "comfyui.pid"
    pid_file.write_text(str(dead.pid))
    port = free_port()
    client = ComfyClient(f"127.0.0.1:{port}", pid_file, tmp_path / "comfyui.log", on_death="restarted")
    new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    servers: list = []

    def restart_later():
        time.sleep(0.8)
        pid_file.write_text(str(new.pid))  # the supervisor's new ComfyUI: its PID first, then it answers

    import threading

    threading.Thread(target=restart_later, daemon=True).start()
    stats_server_later(port, 1.2, servers)
    started = time.monotonic()
    try:
        arun(lambda: client.wait_ready(30))
        assert 1.1 <= time.monotonic() - started < 5
    finally:
        new.kill()
        new.wait()
        for server in servers:
            server.shutdown()


def test_wait_ready_fails_when_a_dead_comfyui_is_not_restarted_within_the_grace(tmp_path, monkeypatch):
    """issue 20 #18: waiting for a restart is bounded: a dead process still named after RESTART_GRACE_S means
    nothing restarts ComfyUI."""
    monkeypatch.setattr(comfy_client, "RESTART_GRACE_S", 0.5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "comfyui.pid").write_text(str(dead.pid))
    client = ComfyClient(f"127.0.0.1:{free_port()}", tmp_path / "comfyui.pid", tmp_path / "c.log", "restarted")
    started = time.monotonic()
    with pytest.raises(JobError) as info:
        arun(lambda: client.wait_ready(60))
    assert 0.5 <= time.monotonic() - started < 3
    assert info.value.message == (
        f"ComfyUI (process {dead.pid}) is no longer running and nothing restarted it within 0.5 s; start the "
        "worker again (start.sh restarts ComfyUI when COMFY_RESTART=1)."
    )


@pytest.mark.parametrize(
    ("on_death", "ending"),
    [
        ("replaced", "; this worker will be replaced."),
        ("restarted", "; ComfyUI is being restarted: send the job again, it runs once ComfyUI is back."),
        (
            "stopped",
            "; the worker stops (COMFY_RESTART=0): start it again, or set COMFY_RESTART=1 to have ComfyUI restarted.",
        ),
    ],
)
def test_a_dead_comfyui_error_says_replaced_only_in_serverless(tmp_path, on_death, ending):
    """issue 20 (also seen): on pods and local boxes, which restart ComfyUI, the error never promises a
    replacement; a PID file naming another process than the job's (ComfyUI restarted under it) counts as dead."""
    job_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    job_proc.wait()
    restarted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pid_file = tmp_path / "comfyui.pid"
    try:
        pid_file.write_text(str(job_proc.pid))
        client = ComfyClient("127.0.0.1:1", pid_file, tmp_path / "c.log", on_death)
        client.note_process()
        pid_file.write_text(str(restarted.pid))
        with pytest.raises(JobError) as info:
            client.check_alive("its websocket closed during the job")
    finally:
        restarted.kill()
        restarted.wait()
    assert info.value.message == (
        f"ComfyUI (process {job_proc.pid}) is no longer running (its websocket closed during the job){ending}"
    )
    assert info.value.details["pid"] == job_proc.pid and info.value.details["new_pid"] == restarted.pid


def test_wait_ready_without_pid_file_waits_for_the_timeout(tmp_path):
    client = ComfyClient(f"127.0.0.1:{free_port()}", tmp_path / "absent.pid", tmp_path / "absent.log")
    started = time.monotonic()
    with pytest.raises(JobError, match="did not answer within 1 s"):
        arun(lambda: client.wait_ready(1))
    assert 1 <= time.monotonic() - started < 3


def test_upload_queue_history_and_view_on_real_comfyui(comfyui):
    client = ComfyClient(comfyui.host, comfyui.pid_file, comfyui.log_path)
    prompt_id = "client-test-" + str(time.time_ns())
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "client_test"}},
    }

    async def go():
        stored = await client.upload_input("client-test-upload.bin", b"\x00\x01")
        rejected = await client.queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}}, "x", "c", {})
        answer = await client.queue_prompt(workflow, prompt_id, "client", {})
        for _ in range(100):
            entry = await client.history(prompt_id)
            if entry:
                break
            await asyncio.sleep(0.05)
        image = entry["outputs"]["2"]["images"][0]
        data = await client.view(image["filename"], image["subfolder"], image["type"])
        return stored, rejected, answer, image, data

    stored, rejected, answer, image, data = arun(go)
    try:
        assert stored == {"name": "client-test-upload.bin", "subfolder": "", "type": "input"}
        assert (comfyui.path / "input" / "client-test-upload.bin").read_bytes() == b"\x00\x01"
        assert rejected["rejected"]["error"]["type"] == "invalid_prompt"
        assert answer["prompt_id"] == prompt_id
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        (comfyui.path / "input" / "client-test-upload.bin").unlink(missing_ok=True)
        (comfyui.path / "output" / image["subfolder"] / image["filename"]).unlink(missing_ok=True)


def test_one_keep_alive_session_per_event_loop():
    async def two():
        first = comfy_client.shared_session()
        assert comfy_client.shared_session() is first
        await comfy_client.close_shared_session()
        return first

    a = asyncio.run(two())
    b = asyncio.run(two())
    assert a is not b and a.closed and b.closed
