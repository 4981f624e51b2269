"""Tiny local HTTP servers for tests that need a peer (a fake RunPod endpoint, an image host...)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not print a line per request."""

    def log_message(self, *args):
        pass


def serve_in_thread(handler_cls: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """``handler_cls`` served on a free 127.0.0.1 port from a daemon thread (call ``shutdown()``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
