"""A loopback webhook receiver for the API's webhooks (tests/test_api.py, tests/test_webhooks.py).

It records every POST (path, status answered, JSON body). ``fail_first`` POSTs per path get 500,
``status`` answers all the others (a 3xx with ``location``). With ``listen=False`` its port is bound but
not listening, so connections to it are refused, until ``listen()``: the same port starts answering
(no race for a free port in between).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer

from support.local_http import QuietHandler


class WebhookReceiver:
    def __init__(self, fail_first: int = 0, status: int = 200, location: str | None = None, listen: bool = True):
        self.posts: list[tuple[str, int, dict]] = []  # (path, status answered, body)
        self.lock = threading.Lock()
        self.fail_first, self.status, self.location = fail_first, status, location
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.host_port = f"127.0.0.1:{self.port}"  # for WEBHOOK_ALLOW_HOSTS
        self.server: ThreadingHTTPServer | None = None
        if listen:
            self.listen()

    def listen(self) -> None:
        receiver = self

        class Receive(QuietHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    seen = sum(1 for p, _, _ in receiver.posts if p == self.path)
                    status = 500 if seen < receiver.fail_first else receiver.status
                    receiver.posts.append((self.path, status, body))
                self.send_response(status)
                if receiver.location and 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(self.sock.getsockname(), Receive, bind_and_activate=False)
        server.socket.close()
        server.socket = self.sock
        server.server_name, server.server_port = "127.0.0.1", self.port
        server.daemon_threads = True
        server.server_activate()  # listen(): connections are accepted from here on
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        else:
            self.sock.close()
