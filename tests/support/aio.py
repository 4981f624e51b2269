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
