"""The API's webhooks: a job's final status POSTed to the URL its request gave (docs/api.md, "Webhooks").

- Only public hosts: a webhook whose host is, or resolves to, a loopback, private, link-local or otherwise
  non-public address is refused (public_address.py), unless ``WEBHOOK_ALLOW_HOSTS`` names it. An obvious
  one (an IP literal, ``localhost``) is refused when the job is sent (``submit_problem``: a 400); a name is
  checked when it is resolved for the connection itself (``PublicResolver``), so a DNS answer that
  changes between a check and the connection cannot slip through. A refused webhook is logged, not retried.
- Redirects are not followed (each hop would need the same check, and a POST is not meant to move): a 3xx
  is logged as the reason the webhook was not delivered.
- Retries over minutes: attempt ``n`` that fails is tried again after ``WEBHOOK_RETRY_BACKOFF * 2**(n-1)``
  s, at most ``WEBHOOK_RETRY_MAX_DELAY``, ``1 + WEBHOOK_RETRIES`` attempts in all (by default 10 over about
  6 minutes). The schedule lives in the job store (attempts made, next attempt's time), so it goes on after
  a restart; an attempt is counted before it is made and a 2xx settles the webhook at once, so it is never
  POSTed again after a 2xx (only a kill between the receiver's 2xx and that write could repeat it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

from comfy_worker.job_store import JobStore
from comfy_worker.log_setup import safe_url
from comfy_worker.public_address import HostAllowList, NotPublic, literal_problem, resolved_problem
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 30.0
MAX_SENDING = 32  # webhooks in flight at once (a restart may find many owed): the others wait their turn
ALLOW_SETTING = "WEBHOOK_ALLOW_HOSTS"


def allow_list(settings: Settings) -> HostAllowList:
    return HostAllowList(settings.webhook_allow_hosts, ALLOW_SETTING)


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first POST)."""
    return min(settings.webhook_retry_backoff * 2 ** (attempt - 1), settings.webhook_retry_max_delay)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def refusal(url: str, problem: str) -> str:
    host, port = host_port(url)
    shown = f"[{host}]" if ":" in host else host
    return (
        f"The webhook {safe_url(url)} is refused: {problem}. Webhooks only reach public hosts (so a job cannot "
        f"reach services on the worker or its network); to allow this one, set {ALLOW_SETTING}={shown}:{port} "
        "(comma-separated host or host:port entries)."
    )


def submit_problem(url: str | None, allowed: HostAllowList) -> str | None:
    """Why a job's webhook is refused as written (an IP literal or ``localhost`` that is not public and not
    allowed), None when it may be sent (a name is checked again when it is resolved)."""
    if not url:
        return None
    host, port = host_port(url)
    if allowed.allows(host, port):
        return None
    problem = literal_problem(host)
    return refusal(url, f"{host} is a {problem} address") if problem else None


class PublicResolver(AbstractResolver):
    """aiohttp's resolver that refuses (``NotPublic``) a host resolving to any non-public address, unless
    it is allowed. aiohttp does not ask a resolver about IP literals: ``submit_problem`` covers those."""

    def __init__(self, allowed: HostAllowList):
        self.allowed = allowed
        self.inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        results = await self.inner.resolve(host, port, family)
        if not self.allowed.allows(host, port):
            problem = resolved_problem(host, [r["host"] for r in results])
            if problem:
                raise NotPublic(problem)
        return results

    async def close(self) -> None:
        await self.inner.close()


class Webhooks:
    """Sends the webhooks the store says are owed, each when due, until delivered or given up."""

    def __init__(self, settings: Settings, store: JobStore, body_of: Callable[[dict], dict]):
        self.settings, self.store, self.body_of = settings, store, body_of
        self.allowed = allow_list(settings)
        self.attempts = 1 + settings.webhook_retries
        self.wake = asyncio.Event()
        self.sending: dict[str, asyncio.Task] = {}
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=PublicResolver(self.allowed), use_dns_cache=False)
        self.session = aiohttp.ClientSession(connector=connector)
        self.task = asyncio.create_task(self.loop())

    def notify(self) -> None:
        """A job's webhook became owed (the loop picks it up now)."""
        self.wake.set()

    async def close(self) -> None:
        tasks = [t for t in (self.task, *self.sending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            self.start_due()
            due = self.store.next_webhook_at()
            wait = 3600.0 if due is None else min(3600.0, max(0.0, due - time.time()))
            if len(self.sending) >= MAX_SENDING:
                wait = 3600.0  # until one of them is done (sent() wakes the loop)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()

    def start_due(self) -> None:
        """An attempt for each due webhook not in flight (up to MAX_SENDING at once), counted before it is made."""
        now = time.time()
        for job_id in self.store.due_webhooks(now):
            if len(self.sending) >= MAX_SENDING:
                return
            if job_id not in self.sending:
                attempt = self.store.webhook_attempt(job_id, now + ATTEMPT_TIMEOUT_S + retry_delay(self.settings, 1))
                task = asyncio.create_task(self.send(job_id, attempt))
                self.sending[job_id] = task
                task.add_done_callback(lambda _, job_id=job_id: self.sent(job_id))

    def sent(self, job_id: str) -> None:
        self.sending.pop(job_id, None)
        self.wake.set()

    async def send(self, job_id: str, attempt: int) -> None:
        """One attempt (counted already): settled when delivered, refused or the last; else scheduled again."""
        job = self.store.get(job_id)
        if job is None or not job["webhook"] or not job["webhook_pending"]:
            return
        url = job["webhook"]
        problem = submit_problem(url, self.allowed)  # a store from before this check may hold one
        if problem:
            return self.settle(job_id, problem)
        try:
            timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S)
            body = self.body_of(job)
            async with self.session.post(url, json=body, timeout=timeout, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    self.store.webhook_sent(job_id)
                    log.info("job %s: webhook %s delivered", job_id, safe_url(url))
                    return
                if 300 <= resp.status < 400:
                    return self.settle(
                        job_id,
                        f"The webhook {safe_url(url)} answered HTTP {resp.status} (a redirect to "
                        f"{safe_url(resp.headers.get('Location', '?'))}): webhooks do not follow redirects; give "
                        "the final URL.",
                    )
                failure = f"HTTP {resp.status}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, NotPublic):
                return self.settle(job_id, refusal(url, str(exc.os_error)))
            failure = f"{type(exc).__name__}: {safe_url(str(exc))}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = f"{type(exc).__name__}: {safe_url(str(exc)) or 'no answer in time'}"
        self.failed(job_id, url, attempt, failure)

    def failed(self, job_id: str, url: str, attempt: int, failure: str) -> None:
        if attempt >= self.attempts:
            log.error(
                "job %s: webhook %s failed %d times (%s); giving up", job_id, safe_url(url), self.attempts, failure
            )
            self.store.webhook_sent(job_id)
            return
        delay = retry_delay(self.settings, attempt)
        self.store.webhook_retry_at(job_id, time.time() + delay)
        log.warning(
            "job %s: webhook %s failed (%s); attempt %d of %d in %.1f s",
            job_id,
            safe_url(url),
            failure,
            attempt + 1,
            self.attempts,
            delay,
        )
        self.wake.set()

    def settle(self, job_id: str, reason: str) -> None:
        """A webhook that will never be delivered: logged, not tried again."""
        log.error("job %s: %s Not sent, not retried.", job_id, reason)
        self.store.webhook_sent(job_id)
