"""Running the async client code from plain tests."""

import asyncio

from comfy_worker import comfy_client


def arun(coro_fn):
    """Run ``coro_fn()`` in a fresh event loop and close the shared HTTP session afterwards."""

    async def go():
        try:
            return await coro_fn()
        finally:
            await comfy_client.close_shared_session()

    return asyncio.run(go())


def gather_jobs(handler_fn, jobs: list[dict]) -> list:
    """Run ``handler_fn`` on every job at once (one event loop), returning their results in order."""
    return arun(lambda: asyncio.gather(*(handler_fn(job) for job in jobs)))
