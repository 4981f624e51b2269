"""webhooks: the API's webhooks against real loopback receivers and a real job store (docs/api.md, "Webhooks")."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest
from support.webhook_receiver import WebhookReceiver

from comfy_worker.job_store import JobStore
from comfy_worker.public_address import HostAllowList, NotPublic
from comfy_worker.settings import Settings
from comfy_worker.webhooks import PublicResolver, Webhooks, retry_delay, submit_problem


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


@pytest.fixture
def receivers():
    made: list[WebhookReceiver] = []

    def make(**kwargs) -> WebhookReceiver:
        made.append(WebhookReceiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def settings(**env) -> Settings:
    return Settings.from_env({"VOLUME_ROOT": "/nonexistent", **env})


def finished(store: JobStore, job_id: str, webhook: str) -> None:
    now = time.time()
    store.add(job_id, json.dumps({"input": {}}), webhook, now)
    store.start(job_id, now)
    store.finish(job_id, "COMPLETED", {"output": {"job": job_id}}, now)


def body_of(job: dict) -> dict:
    return {"id": job["id"], "status": job["status"], **job["result"]}


def row(store: JobStore, job_id: str) -> tuple[int, int, float | None]:
    """(webhook_pending, webhook_attempts, webhook_next) as stored."""
    return tuple(
        store.db.execute(
            "SELECT webhook_pending, webhook_attempts, webhook_next FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    )


def send_until(store: JobStore, config: Settings, done, timeout: float = 30, then: float = 0.0) -> None:
    """Run the webhooks (as the API does from its start) until ``done()``, ``then`` seconds more, and stop."""

    async def go():
        hooks = Webhooks(config, store, body_of)
        hooks.start()
        try:
            deadline = time.monotonic() + timeout
            while not done():
                assert time.monotonic() < deadline, (
                    f"timed out; rows: {store.db.execute('SELECT * FROM jobs').fetchall()}"
                )
                await asyncio.sleep(0.02)
            await asyncio.sleep(then)
        finally:
            await hooks.close()

    asyncio.run(go())


# --- retries -------------------------------------------------------------------------------------------
def test_webhook_retries_reach_several_minutes_by_default():
    """issue 20 #19: the default schedule gave up after about 7 s (1 + 2 + 4)."""
    config = settings()
    delays = [retry_delay(config, attempt) for attempt in range(1, config.webhook_retries + 1)]
    assert 1 + config.webhook_retries == 10
    assert delays[:3] == [1.0, 2.0, 4.0] and max(delays) == 120.0
    assert sum(delays) >= 300, delays


@pytest.mark.parametrize("receiver_kind", ["answers 500", "refuses connections"])
def test_the_default_webhook_retries_make_exactly_ten_attempts_then_give_up(store, receivers, caplog, receiver_kind):
    """issue 20 (the suite's gaps): the exact number of attempts with the default WEBHOOK_RETRIES, also
    against a receiver that refuses connections."""
    caplog.set_level(logging.INFO, logger="comfy_worker.webhooks")
    receiver = receivers(status=500, listen=receiver_kind == "answers 500")
    config = settings(
        WEBHOOK_RETRY_BACKOFF="0.01", WEBHOOK_RETRY_MAX_DELAY="0.04", WEBHOOK_ALLOW_HOSTS=receiver.host_port
    )
    finished(store, "j", f"{receiver.url}/hook")
    send_until(store, config, lambda: row(store, "j")[0] == 0, then=0.3)
    assert row(store, "j")[:2] == (0, 10) and config.webhook_retries == 9
    assert "failed 10 times" in caplog.text and "giving up" in caplog.text
    assert "attempt 10 of 10" in caplog.text and "attempt 11" not in caplog.text
    if receiver_kind == "answers 500":
        assert [status for _, status, _ in receiver.posts] == [500] * 10
    else:
        assert "ClientConnectorError" in caplog.text and receiver.posts == []


def test_a_receiver_refusing_connections_gets_the_webhook_once_it_listens(store, receivers, caplog):
    receiver = receivers(listen=False)
    config = settings(
        WEBHOOK_RETRY_BACKOFF="0.05", WEBHOOK_RETRY_MAX_DELAY="0.2", WEBHOOK_ALLOW_HOSTS=receiver.host_port
    )
    finished(store, "j", f"{receiver.url}/hook?sig=1")

    async def go():
        hooks = Webhooks(config, store, body_of)
        hooks.start()
        try:
            while row(store, "j")[1] < 3:
                await asyncio.sleep(0.01)
            receiver.listen()
            while row(store, "j")[0]:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
        finally:
            await hooks.close()

    asyncio.run(asyncio.wait_for(go(), 30))
    assert receiver.posts == [("/hook?sig=1", 200, {"id": "j", "status": "COMPLETED", "output": {"job": "j"}})]
    assert row(store, "j")[1] >= 3 and caplog.text.count("failed (ClientConnectorError") >= 2  # refused twice


def test_webhook_retries_go_on_after_a_restart_on_schedule_and_a_delivered_one_is_never_sent_again(
    store, receivers, tmp_path
):
    """issue 20 #19: retries were an in-memory loop: a restart started the count again (or, for a webhook
    given up meanwhile, never sent it); the schedule is in the store now."""
    receiver = receivers(listen=False)
    slow = settings(WEBHOOK_RETRY_BACKOFF="60", WEBHOOK_ALLOW_HOSTS=receiver.host_port)
    finished(store, "j", f"{receiver.url}/hook")
    send_until(store, slow, lambda: row(store, "j")[1] == 1, then=0.3)  # refused; next attempt in 60 s
    pending, attempts, due = row(store, "j")
    assert (pending, attempts) == (1, 1) and 55 < due - time.time() <= 60

    store.close()  # the API stops; the next one opens the store again
    again = JobStore(tmp_path / "jobs.sqlite3")
    try:
        receiver.listen()
        send_until(again, slow, lambda: True, then=0.5)
        assert receiver.posts == [] and row(again, "j")[:2] == (1, 1)  # not before its time
        again.webhook_retry_at("j", time.time())  # as if the minute had passed
        send_until(again, slow, lambda: row(again, "j")[0] == 0)
        assert [status for _, status, _ in receiver.posts] == [200] and row(again, "j")[1] == 2
        send_until(again, slow, lambda: True, then=0.5)  # another start: delivered once, never again
        assert len(receiver.posts) == 1
    finally:
        again.close()


# --- only public hosts, no redirects -------------------------------------------------------------------
def test_a_webhook_to_a_non_public_host_is_refused_when_sent_and_not_retried(store, receivers, caplog):
    """issue 20 #4: a webhook to 127.0.0.1 (ComfyUI's /interrupt, the API) was delivered. A store from
    before the check may still hold one: it is refused at delivery, logged, not retried."""
    caplog.set_level(logging.INFO, logger="comfy_worker.webhooks")
    receiver = receivers()
    finished(store, "literal", f"{receiver.url}/interrupt")
    finished(store, "name", f"http://localhost:{receiver.port}/interrupt")
    config = settings(WEBHOOK_RETRY_BACKOFF="0.01")
    send_until(store, config, lambda: not store.pending_webhooks(), then=0.3)
    assert receiver.posts == []
    assert row(store, "literal")[:2] == (0, 1) and row(store, "name")[:2] == (0, 1)
    assert "is refused: 127.0.0.1 is a loopback address" in caplog.text
    assert f"set WEBHOOK_ALLOW_HOSTS=127.0.0.1:{receiver.port}" in caplog.text and "not retried" in caplog.text

    finished(store, "allowed", f"{receiver.url}/ok")  # the setting opens exactly that host and port
    send_until(store, settings(WEBHOOK_ALLOW_HOSTS=receiver.host_port), lambda: not store.pending_webhooks())
    assert [(path, status) for path, status, _ in receiver.posts] == [("/ok", 200)]


def test_submit_problem_refuses_obvious_non_public_hosts_unless_allowed():
    none = HostAllowList([], "WEBHOOK_ALLOW_HOSTS")
    for url in (
        "http://127.0.0.1:8188/interrupt",
        "http://[::1]/x",
        "https://169.254.169.254/latest",
        "http://10.0.0.7/x",
        "http://localhost:8000/run",
    ):
        problem = submit_problem(url, none)
        assert problem and problem.startswith("The webhook http") and "WEBHOOK_ALLOW_HOSTS=" in problem, url
    assert "WEBHOOK_ALLOW_HOSTS=[::1]:80 " in submit_problem("http://[::1]/x", none)
    assert "?sig" not in submit_problem("http://127.0.0.1/x?sig=secret", none)  # no query string shown
    assert submit_problem("https://hooks.example.com/x", none) is None  # a name: checked when resolved
    assert submit_problem("http://127.0.0.1:9000/x", HostAllowList(["127.0.0.1:9000"], "X")) is None
    assert submit_problem("http://127.0.0.1:9001/x", HostAllowList(["127.0.0.1:9000"], "X")) is not None


def test_a_name_resolving_to_a_non_public_address_is_refused_when_connecting(receivers):
    """issue 20 #4: the check is in the resolver aiohttp connects with, so the addresses checked are the
    ones connected to (a DNS answer cannot change in between)."""
    receiver = receivers()

    async def post(allow: list[str]):
        connector = aiohttp.TCPConnector(resolver=PublicResolver(HostAllowList(allow, "X")), use_dns_cache=False)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"http://localhost:{receiver.port}/x", json={}) as resp,
        ):
            return resp.status

    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        asyncio.run(post([]))
    assert isinstance(refused.value.os_error, NotPublic) and "localhost resolves to 127.0.0.1" in str(
        refused.value.os_error
    )
    assert receiver.posts == []
    assert asyncio.run(post([f"localhost:{receiver.port}"])) == 200


def test_a_webhook_redirect_is_not_followed(store, receivers, caplog):
    """issue 20 #4: redirects were followed, so an allowed or public host could send the POST anywhere."""
    caplog.set_level(logging.INFO, logger="comfy_worker.webhooks")
    target = receivers()
    bouncer = receivers(status=307, location=f"{target.url}/interrupt")
    config = settings(WEBHOOK_RETRY_BACKOFF="0.01", WEBHOOK_ALLOW_HOSTS=f"{bouncer.host_port},{target.host_port}")
    finished(store, "j", f"{bouncer.url}/hook")
    send_until(store, config, lambda: not store.pending_webhooks(), then=0.3)
    assert [status for _, status, _ in bouncer.posts] == [307] and target.posts == []
    assert (
        "answered HTTP 307 (a redirect to http://127.0.0.1" in caplog.text and "do not follow redirects" in caplog.text
    )
