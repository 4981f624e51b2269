"""Local HTTP origins for the downloader's tests and benchmark.

- ``NginxOrigin``: Debian's real nginx serving a folder on 127.0.0.1 (Range support, optional
  ``limit_rate`` per connection under ``/limited/``), with its own config, pid and logs in a temp dir.
- ``FaultyOrigin``: a small threaded Python server whose routes can drop the connection after N bytes
  (once, or on every response: ``trickle``), answer with error statuses first, ignore Range (always, or
  all but the probe's: ``whole_for_ranges``, like replicas whose ETags differ), answer a
  range from another offset, go without a validator or a length, redirect, stream slowly or go silent,
  or refuse (503/429) a body beyond so many at once (``busy_over``); it records every request's
  headers and how many body bytes it sent, so tests can prove what was fetched and who got which token.
- ``fake_huggingface`` / ``fake_civitai``: routes that speak the Hugging Face resolve protocol
  (``HEAD``/``GET /{repo}/resolve/{rev}/{path}``, at the branch and at the commit, with ETag,
  X-Repo-Commit, X-Linked-Size and a redirect to a CDN) and CivitAI's download and model API, so the real client code runs against them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlparse

from support.processes import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def random_file(path: Path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes (fast: a 1 MiB random block with a per-block counter) and
    return their sha256."""
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            piece = (n.to_bytes(8, "little") + block[8:])[: size - written]
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            n += 1
    return digest.hexdigest()


class NginxOrigin:
    """A real nginx serving ``root`` at ``http://127.0.0.1:<port>/`` (and ``/limited/`` with
    ``limit_rate``). Use as a context manager."""

    def __init__(self, root: Path, workdir: Path, limit_rate: str = "20m", workers: int = 1):
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.limit_rate = limit_rate
        self.workers = workers
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        w = self.workdir
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers would otherwise drop to nobody
        temp_paths = "\n".join(
            f"    {name}_temp_path {w / 'tmp' / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""{user}daemon off;
worker_processes {self.workers};
pid {w / "nginx.pid"};
error_log {w / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {w / "access.log"};
{temp_paths}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location /limited/ {{
            alias {self.root}/;
            limit_rate {self.limit_rate};
        }}
    }}
}}
"""

    def start(self) -> NginxOrigin:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [nginx, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "stderr.log", "wb"),  # noqa: SIM115 - the child keeps it
        )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("nginx did not start: " + (self.workdir / "stderr.log").read_text()) from None
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, signal.SIGQUIT)  # nginx's graceful stop
        self.proc = None

    def __enter__(self) -> NginxOrigin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 64  # a download opening 32 connections at once is not kept waiting for a SYN retry

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up mid-transfer is the point here
            super().handle_error(request, client_address)


@dataclass
class Route:
    """What ``FaultyOrigin`` answers on one path. ``body`` or ``file`` is the content."""

    body: bytes | None = None
    file: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    fail_statuses: list[int] = field(default_factory=list)  # answered (and consumed) first, one per request
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int = 1  # ... this many times
    ignore_range: bool = False
    whole_for_ranges: bool = False  # answer the probe (bytes=0-0) with 206, every other range with 200 + the whole file
    range_shift: int = 0  # answer a range starting at N > 0 from N + range_shift (with an honest Content-Range)
    trickle: int | None = None  # send at most this many body bytes per response, then drop the connection
    etag: str | None = '"v1"'  # None: no validator at all
    rate: float | None = None  # bytes per second
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    pause_after: int | None = None  # go silent after this many body bytes (connection open, 30 s at most)
    status: int = 200
    redirect: str | None = None  # answer 302 with this Location
    json_body: object | None = None
    handler: object | None = None  # callable(request_handler) -> bool (True = handled)
    busy_over: int | None = None  # answer busy_status to a body request while this many are being sent
    busy_status: int = 503
    sending: int = 0  # bodies being sent now (counted for busy_over)

    def size(self) -> int:
        return self.file.stat().st_size if self.file is not None else len(self.body or b"")

    def read(self, start: int, end: int) -> bytes:
        if self.file is not None:
            with open(self.file, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return (self.body or b"")[start:end]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0
    at: float = field(default_factory=time.monotonic)  # when the request arrived
    client: tuple[str, int] | None = None  # the connection's (host, port): one per TCP connection
    finished: float | None = None  # when the whole body was sent


class FaultyOrigin:
    """A threaded HTTP/1.1 server on 127.0.0.1 with scripted faults. Use as a context manager."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                origin._serve(self, head=True)

            def do_GET(self):
                origin._serve(self, head=False)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, path: str, route: Route | None = None, **kw) -> Route:
        route = route or Route(**kw)
        self.routes[path] = route
        return route

    def sent(self, path: str) -> int:
        with self.lock:
            return sum(s.sent for s in self.requests if s.path.split("?")[0] == path and s.method == "GET")

    def seen(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.requests if path is None or s.path.split("?")[0] == path]

    def start(self) -> FaultyOrigin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultyOrigin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        seen = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()}, client=h.client_address)
        with self.lock:
            self.requests.append(seen)
        route = self.routes.get(h.path.split("?")[0])
        if route is None:
            seen.status = 404
            self._plain(h, 404, b"not found\n", head)
            return
        if route.handler is not None and route.handler(h, seen, head):
            return
        with self.lock:
            status = route.fail_statuses.pop(0) if route.fail_statuses else None
        if status is not None:
            seen.status = status
            self._plain(h, status, f"scripted {status}\n".encode(), head)
            return
        if route.redirect is not None:
            seen.status = 302
            note = route.body or b""  # e.g. Hugging Face's "Found. Redirecting to ..."
            h.send_response(302)
            h.send_header("Location", route.redirect)
            h.send_header("Content-Length", str(len(note)))
            for k, v in route.headers.items():
                h.send_header(k, v)
            h.end_headers()
            if not head:
                h.wfile.write(note)
            return
        if route.json_body is not None:
            seen.status = route.status
            self._plain(h, route.status, json.dumps(route.json_body).encode(), head, "application/json")
            return
        if route.status != 200:
            seen.status = route.status
            self._plain(h, route.status, b"scripted error\n", head)
            return
        size = route.size()
        start, end = 0, size
        rng = seen.headers.get("range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        partial = bool(m) and not route.ignore_range and not (route.whole_for_ranges and rng != "bytes=0-0")
        if partial:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start > 0 and route.range_shift:
                start = max(0, start + route.range_shift)
            if start >= size:
                seen.status = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        counted = route.busy_over is not None and rng != "bytes=0-0" and not head
        if counted:
            with self.lock:
                busy = route.sending >= route.busy_over
                route.sending += not busy
            if busy:
                seen.status = route.busy_status
                self._plain(h, route.busy_status, b"too many connections\n", head)
                return
        seen.status = 206 if partial else 200
        h.send_response(seen.status)
        if "Content-Type" not in route.headers:
            h.send_header("Content-Type", "application/octet-stream")
        if route.no_length:
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(end - start))
        h.send_header("Accept-Ranges", "none" if route.ignore_range else "bytes")
        if route.etag is not None:
            h.send_header("ETag", route.etag)
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        for k, v in route.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        if counted:
            self._send_counted(h, route, seen, start, end)
        else:
            self._send(h, route, seen, start, end)

    def _send_counted(self, h, route: Route, seen: Seen, start: int, end: int) -> None:
        """Send a body counted in ``route.sending`` until its last piece is about to go out (so a
        client that got the whole body and asks again is never taken for one connection too many)."""
        counted = [True]

        def last_piece():
            with self.lock:
                if counted[0]:
                    route.sending -= 1
                    counted[0] = False

        try:
            self._send(h, route, seen, start, end, last_piece)
        finally:
            last_piece()

    def _send(self, h, route: Route, seen: Seen, start: int, end: int, last_piece=None) -> None:
        pos = start
        began = time.monotonic()
        while pos < end:
            if route.pause_after is not None and pos - start >= route.pause_after:
                time.sleep(30)
                return
            n = min(64 * 1024, end - pos, *([start + route.pause_after - pos] if route.pause_after else []))
            with self.lock:
                drop_at = route.drop_after if route.drops > 0 else None
            if route.trickle is not None:
                drop_at = start + route.trickle
            if drop_at is not None and pos + n > drop_at >= pos:
                n = drop_at - pos
                if n:
                    h.wfile.write(route.read(pos, pos + n))
                    seen.sent += n
                if route.trickle is None:
                    with self.lock:
                        route.drops -= 1
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            if last_piece is not None and pos + n >= end:
                last_piece()
            try:
                h.wfile.write(route.read(pos, pos + n))
            except OSError:
                return
            seen.sent += n
            pos += n
            if pos >= end:
                seen.finished = time.monotonic()
            if route.rate:
                ahead = (pos - start) / route.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    @staticmethod
    def _plain(h, status: int, body: bytes, head: bool, ctype: str = "text/plain") -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


def fake_huggingface(
    hub: FaultyOrigin, cdn: FaultyOrigin, repo: str, files: dict[str, Path], rev: str = "main", xet: bool = False
):
    """Serve ``files`` (path in repo -> local file) the way huggingface.co does: the resolve URL on ``hub``
    answers 302 to ``cdn`` (an LFS object) with X-Linked-Size / X-Linked-Etag (the sha256) / X-Repo-Commit.
    ``xet``: the files are said to be stored with Xet (X-Xet-Hash, X-Xet-Refresh-Route), so the
    downloader hands them to huggingface_hub's ``hf_hub_download``; with ``HF_HUB_DISABLE_XET=1`` in its
    environment, that fetches them over plain HTTP from the resolve URL (no Xet storage server here)."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for name, local in files.items():
        sha = hashlib.sha256(local.read_bytes()).hexdigest()
        cdn_path = f"/repos/{sha}"
        cdn.add(cdn_path, file=local, headers={"Content-Disposition": f'attachment; filename="{Path(name).name}"'})
        location = f"{cdn.url}{cdn_path}?X-Amz-Signature=fake"
        for revision in (rev, commit):  # the hub also resolves a file at its exact commit
            hub.add(
                f"/{repo}/resolve/{revision}/{quote(name)}",
                redirect=location,
                headers={
                    "X-Repo-Commit": commit,
                    "X-Linked-Size": str(local.stat().st_size),
                    "X-Linked-Etag": f'"{sha}"',
                    "ETag": f'"{sha}"',
                    **(
                        {"X-Xet-Hash": sha, "X-Xet-Refresh-Route": f"/api/models/{repo}/xet-read-token/{commit}"}
                        if xet
                        else {}
                    ),
                },
            )
    return commit


def fake_civitai(api: FaultyOrigin, cdn: FaultyOrigin, model_id: int, versions: list[tuple[int, str, Path]]):
    """CivitAI: ``/api/download/models/<version>`` answers 307 to a signed CDN URL whose answer carries the
    real file name in Content-Disposition; ``/api/v1/models/<id>`` lists the versions (newest first)."""
    model_versions = []
    for version_id, name, local in versions:
        data = local.read_bytes()
        cdn_path = f"/file/{version_id}"
        cdn.add(cdn_path, file=local, headers={"Content-Disposition": f'attachment; filename="{name}"'})
        api.add(f"/api/download/models/{version_id}", redirect=f"{cdn.url}{cdn_path}?token-free-signature=1")
        model_versions.append(
            {
                "id": version_id,
                "name": f"v{version_id}",
                "files": [
                    {"name": "extra.yaml", "primary": False, "downloadUrl": "https://civitai.com/nope"},
                    {
                        "name": name,
                        "primary": True,
                        "sizeKB": len(data) / 1024,
                        "hashes": {"SHA256": hashlib.sha256(data).hexdigest().upper()},
                        "downloadUrl": f"https://civitai.com/api/download/models/{version_id}",
                    },
                ],
            }
        )
    api.add(f"/api/v1/models/{model_id}", json_body={"id": model_id, "modelVersions": model_versions})


def host_of(url: str) -> str:
    return urlparse(url).netloc
