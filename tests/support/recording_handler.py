"""A job function for API tests that need no ComfyUI (``--handler recording_handler:handler``).

The input says what to do: ``record`` (a file: the job's id is appended to it the moment the handler
starts, so a test sees exactly which jobs reached a handler), ``sleep`` (seconds, cancellable) and
``value`` (given back as ``{"echo": value}``)."""

from __future__ import annotations

import asyncio
from pathlib import Path


async def handler(job: dict) -> dict:
    inp = job["input"]
    if "record" in inp:
        with Path(inp["record"]).open("a") as f:
            f.write(f"{job['id']}\n")
    await asyncio.sleep(inp.get("sleep", 0))
    return {"echo": inp.get("value")}


def ran(record: Path) -> list[str]:
    """The ids of the jobs the handler started, in order."""
    return record.read_text().split() if record.exists() else []
