"""Custom handlers for ``python -m comfy_worker.api --handler leaky_handlers:<name>`` that quote secrets in
their error, as a careless handler might: the worker's API_TOKEN, the job's ``s3Config`` keys and its
Comfy.org key, and a signed URL (tests/test_api.py checks the API redacts them whatever handler ran)."""

from __future__ import annotations

import os


def _leak(job: dict) -> str:
    s3 = job.get("s3Config") or {}
    key = (job.get("input") or {}).get("comfy_org_api_key")
    return (
        f"token {os.environ.get('API_TOKEN')} rejected with id {s3.get('accessId')} and key "
        f"{s3.get('accessSecret')} (comfy key {key}) at https://bucket.example/out.png?X-Amz-Signature=sig123"
    )


async def returns_secrets(job: dict) -> dict:
    """Answers with an error (and details) quoting the secrets."""
    return {"error": _leak(job), "details": {"why": _leak(job)}}


async def raises_secrets(job: dict) -> dict:
    """Raises an exception whose message quotes the secrets."""
    raise RuntimeError(_leak(job))
