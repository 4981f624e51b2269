"""Per-job overhead of handler.py against a minimal direct ComfyUI client, side by side on one ComfyUI.

Both sides run the same workflows, alternating run by run (a fresh color each run, so ComfyUI's cache
never skips the work):
  - 512x512 EmptyImage -> SaveImage
  - a batch of four 1024x1024 images
The direct client does the least a caller can do: open a websocket, POST /prompt, wait for the end,
GET /history, GET /view per image. The handler does a whole RunPod job (validation, websocket, outputs
read from disk, base64, clean-up). Prints the median of each and the ratio handler / direct.

    .venv/bin/python bench/handler_overhead.py [--runs 30] [--comfy-host H --comfyui-path P]

Without --comfy-host it starts its own ComfyUI on CPU (tests/support/comfy_process.py) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

SCENARIOS = {"512x512 x1": (512, 1), "1024x1024 x4": (1024, 4)}


def workflow(size: int, batch: int, color: int) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }


class DirectClient:
    """The minimal client: websocket + POST /prompt + /history + /view (one keep-alive HTTP session)."""

    def __init__(self, host: str, session: aiohttp.ClientSession):
        self.host = host
        self.session = session

    async def run(self, wf: dict) -> list[tuple[dict, bytes]]:
        client_id = uuid.uuid4().hex
        async with connect(f"ws://{self.host}/ws?clientId={client_id}", max_size=None) as ws:
            async with self.session.post(
                f"http://{self.host}/prompt", json={"prompt": wf, "client_id": client_id}
            ) as resp:
                prompt_id = (await resp.json())["prompt_id"]
            while True:
                msg = await ws.recv()
                if isinstance(msg, str):
                    msg = json.loads(msg)
                    data = msg.get("data", {})
                    if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
        async with self.session.get(f"http://{self.host}/history/{prompt_id}") as resp:
            history = (await resp.json())[prompt_id]
        results = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                async with self.session.get(f"http://{self.host}/view", params=image) as resp:
                    results.append((image, await resp.read()))
        return results


async def bench(host: str, comfyui_path: Path, runs: int, warmup: int) -> None:
    os.environ.update({"COMFY_HOST": host, "COMFYUI_PATH": str(comfyui_path)})
    import handler
    from comfy_worker import comfy_client

    session = aiohttp.ClientSession()
    direct = DirectClient(host, session)
    rng = random.Random(1)

    async def time_direct(wf):
        start = time.perf_counter()
        results = await direct.run(wf)
        elapsed = time.perf_counter() - start
        for image, _ in results:  # untimed: keep the output folder the same size for both sides
            (comfyui_path / "output" / image["subfolder"] / image["filename"]).unlink(missing_ok=True)
        return elapsed

    async def time_handler(wf):
        start = time.perf_counter()
        result = await handler.handler({"id": f"bench-{uuid.uuid4().hex[:8]}", "input": {"workflow": wf}})
        elapsed = time.perf_counter() - start
        if "error" in result:
            raise RuntimeError(result["error"])
        return elapsed

    print(f"ComfyUI {host}; {runs} alternating runs per side per scenario ({warmup} warm-up)")
    print(f"{'scenario':<14} {'direct ms':>10} {'handler ms':>11} {'ratio':>6}")
    try:
        for name, (size, batch) in SCENARIOS.items():
            times: dict[str, list[float]] = {"direct": [], "handler": []}
            for i in range(warmup + runs):
                order = [("direct", time_direct), ("handler", time_handler)]
                if i % 2:
                    order.reverse()
                for side, fn in order:
                    elapsed = await fn(workflow(size, batch, rng.randrange(1 << 24)))
                    if i >= warmup:
                        times[side].append(elapsed)
            d = statistics.median(times["direct"]) * 1000
            h = statistics.median(times["handler"]) * 1000
            print(f"{name:<14} {d:>10.1f} {h:>11.1f} {h / d:>6.2f}")
    finally:
        await session.close()
        await comfy_client.close_shared_session()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--comfy-host", help="use a running ComfyUI (host:port) instead of starting one")
    parser.add_argument("--comfyui-path", type=Path, help="its folder (to read outputs from disk)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.comfy_host:
        if not args.comfyui_path:
            parser.error("--comfy-host needs --comfyui-path")
        asyncio.run(bench(args.comfy_host, args.comfyui_path, args.runs, args.warmup))
        return 0
    from support.comfy_process import ComfyUIProcess, clone_comfyui

    with tempfile.TemporaryDirectory(prefix="bench-comfyui-") as tmp:
        path = clone_comfyui(Path(tmp) / "ComfyUI")
        proc = ComfyUIProcess(path, Path(tmp) / "run").start()
        os.environ["COMFY_PID_FILE"] = str(proc.pid_file)
        os.environ["COMFY_LOG_FILE"] = str(proc.log_path)
        try:
            asyncio.run(bench(proc.host, path, args.runs, args.warmup))
        finally:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
