"""A loopback image host for jobs that give images by URL: a good file, and the ways a real host
misbehaves (stalls, redirect loops, oversized or compressed-bomb bodies)."""

from __future__ import annotations

import contextlib
import gzip
import time

from support.local_http import QuietHandler, serve_in_thread


class ImageHost:
    """``/ok.png`` serves ``png``; ``/stall.png`` answers nothing for ``stall_s``; ``/loop.png`` redirects
    to itself (with a signed-looking query) for ever; ``/big.png`` streams ``big_bytes`` without a length;
    ``/long.png`` announces ``big_bytes`` in Content-Length; ``/bomb.png`` is ``big_bytes`` of zeros gzip'd."""

    def __init__(self, png: bytes = b"", big_bytes: int = 4 * 1024 * 1024, stall_s: float = 30.0):
        self.png = png
        self.big_bytes = big_bytes
        self.stall_s = stall_s
        self.requests: list[str] = []
        host = self
        bomb = gzip.compress(b"\0" * big_bytes, compresslevel=9)

        class Serve(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                host.requests.append(self.path)
                path = self.path.split("?")[0]
                if path == "/ok.png":
                    self._send(200, host.png, {"Content-Type": "image/png"})
                elif path == "/stall.png":
                    time.sleep(host.stall_s)
                    self._send(200, host.png)
                elif path == "/loop.png":
                    n = len(host.requests)
                    self._send(302, b"", {"Location": f"/loop.png?X-Amz-Signature=sig-loop-{n}&n={n}"})
                elif path == "/big.png":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = b"\0" * 65536
                    try:
                        for _ in range(host.big_bytes // len(chunk)):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                    self.close_connection = True
                elif path == "/long.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(host.big_bytes))
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        self.wfile.write(b"\0" * 1024)
                    self.close_connection = True
                elif path == "/bomb.png":
                    self._send(200, bomb, {"Content-Type": "image/png", "Content-Encoding": "gzip"})
                else:
                    self._send(404, b"not found")

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = serve_in_thread(Serve)
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def __enter__(self) -> ImageHost:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
