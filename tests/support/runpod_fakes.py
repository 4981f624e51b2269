"""Stand-ins for RunPod's own HTTP endpoints (job-take, job-done, progress), speaking the protocol the
RunPod SDK uses, so the real SDK runs the worker loop against them."""

from __future__ import annotations

import json
import time

from support.local_http import QuietHandler, serve_in_thread


class ProgressSink:
    """Stands in for RunPod's job-done endpoint (where progress_update posts IN_PROGRESS updates)."""

    def __init__(self):
        self.posts: list[tuple[float, str, dict]] = []  # (time, job id, body)
        sink = self

        class Receive(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                job_id = self.path.split("/done/")[1].split("?")[0]
                sink.posts.append((time.monotonic(), job_id, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = serve_in_thread(Receive)
        self.url = f"http://127.0.0.1:{self.server.server_port}/done/$ID?gpu=test"


class FakeRunPodQueue:
    """Stands in for RunPod's job queue (job-take / job-done / job-stop over HTTP, as the SDK calls them)."""

    def __init__(self, jobs: list[dict]):
        self.jobs = list(jobs)
        self.takes: list[str] = []
        self.results: dict[str, dict] = {}
        queue = self

        class Serve(QuietHandler):
            def do_GET(self):
                if "/job-take" in self.path:
                    queue.takes.append(self.path)
                    count = int(self.path.split("batch_size=")[1].split("&")[0]) if "batch_size=" in self.path else 1
                    batch, queue.jobs = queue.jobs[:count], queue.jobs[count:]
                    if batch:
                        body = json.dumps(batch if "job-take-batch" in self.path else batch[0]).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                time.sleep(0.2)
                self.send_response(204)
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                job_id = self.path.split("/done/")[1].split("?")[0]
                if body.get("status") != "IN_PROGRESS":
                    queue.results[job_id] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = serve_in_thread(Serve)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
