"""A TCP proxy between the handler and ComfyUI that drops, mutes, refuses, stalls or cuts connections
(a network that misbehaves), and a helper that cuts it once ComfyUI runs a prompt."""

from __future__ import annotations

import asyncio
import threading
import time

from support.comfy_process import free_port


class DroppingProxy:
    """A TCP proxy between the handler and ComfyUI that can cut every open connection and refuse new
    ones for a while (a websocket dropped by the network)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.refuse_until = 0.0
        self.mute_ws = False  # websockets opened from now on get ComfyUI's handshake answer, then nothing
        self.refuse_ws = False  # websocket upgrades are answered with HTTP 503
        self.stall_http: bytes | None = None  # requests starting with these bytes get no answer at all
        self.drop_http: bytes | None = None  # requests starting with these bytes get their connection closed
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer):
        if time.monotonic() < self.refuse_until:
            writer.transport.abort()
            return
        self.connections += 1
        first = await reader.read(65536)
        is_ws = first.startswith(b"GET /ws")
        if is_ws and self.refuse_ws:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.transport.abort()
            return
        if self.stall_http is not None and first.startswith(self.stall_http):
            self.writers.append(writer)
            await asyncio.sleep(3600)
        if self.drop_http is not None and first.startswith(self.drop_http):
            writer.transport.abort()
            return
        mute = is_ws and self.mute_ws
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        up_writer.write(first)

        async def pipe(src, dst, mute=False, requests=False):
            head = b""
            try:
                while data := await src.read(65536):
                    if requests and self.stall_http is not None and data.startswith(self.stall_http):
                        await asyncio.sleep(3600)  # a keep-alive request that never gets an answer
                    if requests and self.drop_http is not None and data.startswith(self.drop_http):
                        break
                    if mute:  # pass the HTTP upgrade answer, swallow every websocket frame after it
                        if head is None:
                            continue
                        head += data
                        if b"\r\n\r\n" not in head:
                            continue
                        data, head = head[: head.index(b"\r\n\r\n") + 4], None
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, requests=True), pipe(up_reader, writer, mute))

    def start(self):
        self.thread.start()
        self.ready.wait(5)
        return self

    def cut(self, refuse_for: float = 0.0, mute: bool = False):
        def do():
            self.refuse_until = time.monotonic() + refuse_for
            self.mute_ws = mute
            for w in self.writers:
                w.transport.abort()
            self.writers.clear()

        self.loop.call_soon_threadsafe(do)

    async def _shutdown(self):
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        for _ in range(10):  # a connection accepted just before the close starts a task after the first round
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def cut_once_running(comfy, proxy, *cut_args, **cut_kwargs) -> threading.Thread:
    """A started thread that cuts ``proxy`` 0.2 s after ComfyUI starts running a prompt."""

    def cut_when_running():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if comfy.get_json("/queue")["queue_running"]:
                time.sleep(0.2)
                proxy.cut(*cut_args, **cut_kwargs)
                return
            time.sleep(0.02)

    cutter = threading.Thread(target=cut_when_running)
    cutter.start()
    return cutter
