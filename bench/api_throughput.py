"""Throughput of trivial jobs through the worker's HTTP API against the handler called directly, side by side.

Both sides run the same jobs (EmptyImage 8x8 -> SaveImage, a fresh color each, so ComfyUI's cache never
skips the save) on one ComfyUI, at the same concurrency (MAX_CONCURRENCY):
  - direct: ``handler.handler(job)`` in this process, ``--concurrency`` jobs at a time;
  - API: ``python -m comfy_worker.api`` (a real uvicorn, its SQLite store on a temp volume, a bearer
    token) with ``MAX_CONCURRENCY=--concurrency``, fed by ``--concurrency + 4`` clients calling
    ``/runsync`` over keep-alive connections (so its queue never runs dry): everything the API adds
    (HTTP, auth, the store's writes, the queue, the pipe to its job runner) is in its figure.
Rounds alternate direct / API; prints jobs per second of each round, the medians and the ratio API / direct.

    .venv/bin/python bench/api_throughput.py [--jobs 100] [--rounds 9] [--concurrency 1]

Target: >= 0.9x. It starts its own ComfyUI on CPU (tests/support/comfy_process.py) and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TOKEN = "bench-api-token-1234"


def direct_round(jobs: list[dict], concurrency: int) -> float:
    import handler
    from comfy_worker import comfy_client

    async def go():
        gate = asyncio.Semaphore(concurrency)

        async def one(job):
            async with gate:
                result = await handler.handler(job)
                assert "error" not in result and result["images"], result

        try:
            started = time.perf_counter()
            await asyncio.gather(*(one(j) for j in jobs))
            return time.perf_counter() - started
        finally:
            await comfy_client.close_shared_session()

    return len(jobs) / asyncio.run(go())


def api_round(server, jobs: list[dict], clients: int) -> float:
    """``clients`` keep-alive connections (aiohttp, one event loop: the lightest client this machine's
    cores can share with the API and ComfyUI) each sending ``/runsync`` until the jobs are done."""
    import aiohttp

    async def go():
        todo = iter(jobs)
        headers = server.headers(...)

        async def client(http):
            for job in todo:
                async with http.post(f"{server.url}/runsync", json={"input": job["input"]}) as answer:
                    body = await answer.json()
                    assert answer.status == 200 and body["status"] == "COMPLETED", body

        async with aiohttp.ClientSession(headers=headers) as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            return time.perf_counter() - started

    return len(jobs) / asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per round and side")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=1, help="MAX_CONCURRENCY of both sides")
    args = parser.parse_args()

    from support.api_server import ApiServer, tiny_workflow
    from support.comfy_process import ComfyUIProcess, clone_comfyui

    from comfy_worker.log_setup import setup_logging

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, open(Path(tmp) / "direct.log", "w") as direct_log:
        tmp = Path(tmp)
        setup_logging("INFO", direct_log)  # the handler logs here as it does in the API's runner: same lines
        comfy = ComfyUIProcess(clone_comfyui(tmp / "ComfyUI"), tmp / "run").start()
        for name in ("BUCKET_ENDPOINT_URL", "RUNPOD_ENDPOINT_ID", "REFRESH_WORKER"):
            os.environ.pop(name, None)
        os.environ.update(comfy.env(), COMFY_LOG_FILE=str(comfy.log_path))
        server = ApiServer(comfy, tmp / "volume", tmp / "api.log", token=TOKEN, MAX_CONCURRENCY=str(args.concurrency))
        try:
            server.start()
            warm = [{"id": f"warm-{i}", "input": {"workflow": tiny_workflow()}} for i in range(5)]
            direct_round(warm, args.concurrency)
            api_round(server, warm, args.concurrency + 4)
            direct, api = [], []
            for r in range(args.rounds):
                jobs = [{"id": f"bench-{r}-{i}", "input": {"workflow": tiny_workflow()}} for i in range(args.jobs)]
                direct.append(direct_round(jobs, args.concurrency))
                jobs = [{"id": f"bench-{r}-{i}", "input": {"workflow": tiny_workflow()}} for i in range(args.jobs)]
                api.append(api_round(server, jobs, args.concurrency + 4))
                print(f"round {r + 1}: direct {direct[-1]:6.1f} jobs/s   API {api[-1]:6.1f} jobs/s", flush=True)
        finally:
            server.stop()
            comfy.stop()
    d, a = statistics.median(direct), statistics.median(api)
    print(f"\n{args.jobs} trivial jobs x {args.rounds} rounds, concurrency {args.concurrency}")
    print(f"handler called directly: {d:6.1f} jobs/s ({1000 / d:5.1f} ms/job)")
    print(f"through the HTTP API:    {a:6.1f} jobs/s ({1000 / a:5.1f} ms/job)")
    print(f"ratio API / direct: {a / d:.2f}x (target >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
