"""A git smart-HTTP server on loopback: ``git http-backend`` (git's own CGI program) behind a small
Python server, serving the bare repos of a GitRepoFactory (``remotes/<name>.git``). It stands in for
github.com (or any other host) in tests, records the headers of every request, and can demand a
token the way a private repository does (401 with a Basic challenge, so git asks for credentials).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.local_http import QuietHandler, serve_in_thread


class GitHttpServer:
    def __init__(self, project_root: Path, required_authorization: str | None = None):
        self.project_root = Path(project_root)
        self.required_authorization = required_authorization
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers with lower-case names)
        outer = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer._serve(self, b"")

            def do_POST(self):  # noqa: N802 - http.server API
                outer._serve(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        self._server = serve_in_thread(Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def url(self, repo_name: str) -> str:
        return f"{self.base}{repo_name}.git"

    def authorizations(self) -> list[str | None]:
        return [headers.get("authorization") for _, headers in self.requests]

    def _serve(self, handler: QuietHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.requests.append((handler.path, headers))
        if self.required_authorization and headers.get("authorization") != self.required_authorization:
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="private"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        path, _, query = handler.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "REQUEST_METHOD": handler.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.0",
        }
        env.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, cgi_headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                cgi_headers.append((name, value.strip()))
        handler.send_response(status)
        for name, value in cgi_headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
