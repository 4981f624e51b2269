"""A TCP proxy in front of ComfyUI that holds HTTP requests starting with given bytes (``b"POST /prompt"``)
until the test releases them: a request in flight at the moment the test chooses."""

from __future__ import annotations

import asyncio
import threading
import time

from support.comfy_process import free_port


class HoldingProxy:
    """Forwards every connection to ``127.0.0.1:target_port``; a request starting with ``hold`` is read
    whole (headers and body) and kept until ``release()``, then forwarded even if its client has gone
    meanwhile (as a request already on the wire still reaches the server). The upstream connection of a
    held request stays open until ``stop()``, so the server handles it to the end."""

    def __init__(self, target_port: int, hold: bytes):
        self.target_port = target_port
        self.hold = hold
        self.port = free_port()
        self.held = 0  # requests that reached the proxy and were held
        self.held_bodies: list[bytes] = []  # their bodies, in order
        self.forwarded = 0  # held requests forwarded after the release
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.connections: list[asyncio.StreamWriter] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.released = asyncio.Event()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _whole_request(self, reader, data: bytes) -> bytes:
        """``data`` (the start of a request) completed with the rest of its headers and its body."""
        while b"\r\n\r\n" not in data and (more := await reader.read(65536)):
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length and (more := await reader.read(65536)):
            body += more
        return head + b"\r\n\r\n" + body

    async def _serve(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.connections += [writer, up_writer]
        holding = False

        async def requests():
            nonlocal holding
            try:
                while data := await reader.read(65536):
                    if data.startswith(self.hold):
                        data = await self._whole_request(reader, data)
                        holding = True
                        self.held_bodies.append(data.partition(b"\r\n\r\n")[2])
                        self.held += 1
                        await self.released.wait()
                        self.forwarded += 1
                    up_writer.write(data)
                    await up_writer.drain()
            except (ConnectionError, OSError):
                pass
            if not holding:
                up_writer.transport.abort()

        async def answers():
            try:
                while data := await up_reader.read(65536):
                    if not writer.transport.is_closing():
                        writer.write(data)
            except (ConnectionError, OSError):
                pass
            writer.transport.abort()

        await asyncio.gather(requests(), answers())

    def start(self) -> HoldingProxy:
        self.thread.start()
        self.ready.wait(5)
        return self

    def wait_held(self, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.held < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no request starting with {self.hold!r} reached the proxy in {timeout:g} s")
            time.sleep(0.01)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.released.set)

    async def _shutdown(self):
        self.server.close()
        for w in self.connections:
            w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
