"""job_store: the API's jobs in SQLite on the volume (a real file, real processes for kill and lock)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from support.comfy_process import ROOT

from comfy_worker.job_store import JobStore, StoreBusy


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / ".api" / "jobs.sqlite3")
    yield s
    s.close()


def test_a_job_moves_queued_running_final_and_is_finished_only_once(store):
    store.add("a", json.dumps({"input": {"x": 1}}), None, 100.0)
    assert store.queued_ids() == ["a"] and store.get("a")["status"] == "IN_QUEUE"
    assert store.finish("a", "COMPLETED", {"output": 1}, 101.0) is False  # never finished while queued
    assert store.queued_request("a") == ('{"input": {"x": 1}}', 100.0)
    assert store.start("a", 102.0) is True
    assert store.start("a", 103.0) is False  # not queued any more: not started twice
    assert store.queued_request("a") is None
    assert store.finish("a", "COMPLETED", {"output": 1}, 104.0) is True
    assert store.finish("a", "FAILED", {"error": "again"}, 105.0) is False
    job = store.get("a")
    assert (job["status"], job["result"], job["started"], job["finished"], job["attempts"]) == (
        "COMPLETED",
        {"output": 1},
        102.0,
        104.0,
        1,
    )
    assert store.counts() == {"COMPLETED": 1, "retried": 0}


def test_recover_requeues_what_was_running_and_keeps_the_order(store, tmp_path):
    for name in "abc":
        store.add(name, json.dumps({"input": name}), None, 1.0)
    store.start("a", 2.0)
    store.close()
    again = JobStore(tmp_path / ".api" / "jobs.sqlite3")
    try:
        assert again.recover() == 1
        assert again.queued_ids() == ["a", "b", "c"]
        assert again.queued_request("a") == ('{"input": "a"}', 1.0)
        assert again.start("a", 3.0) and again.finish("a", "COMPLETED", {}, 4.0)
        assert again.counts()["retried"] == 1
    finally:
        again.close()


def test_cancel_purge_webhooks_and_expiry(store):
    store.add("q1", json.dumps({"input": 1}), "http://hook", 1.0)
    store.add("q2", json.dumps({"input": 2}), None, 1.0)
    store.add("run", json.dumps({"input": 3}), None, 1.0)
    store.start("run", 2.0)
    assert store.cancel_queued(["q1", "run", "nope"], 3.0) == ["q1"]  # a running job is not "queued"
    assert store.pending_webhooks() == ["q1"]
    store.webhook_sent("q1")
    assert store.pending_webhooks() == []
    store.add("old", json.dumps({"input": 4, "policy": {"ttl": 10000}}), None, 1.0)
    assert store.cancel_queued(["old"], 3.5, "TIMED_OUT", {"error": "expired"}) == ["old"]
    assert (store.get("old")["status"], store.get("old")["result"]) == ("TIMED_OUT", {"error": "expired"})
    assert store.cancel_queued(None, 4.0) == ["q2"]
    store.finish("run", "COMPLETED", {}, 10.0)
    assert store.expire(before=5.0) == 3  # q1, old, q2 finished at 3, 3.5 and 4; "run" at 10 stays
    assert store.get("q1") is None and store.get("run")["status"] == "COMPLETED"


def test_a_final_jobs_request_is_emptied_and_its_keys_leave_the_file(store):
    secret = "s3-secret-key-5d1f0e"
    for job_id in ("done", "dropped"):
        workflow = {"x": "node " * 2000}  # a request over a page: its overflow pages are freed when emptied
        store.add(job_id, json.dumps({"input": workflow, "s3Config": {"accessSecret": secret}}), None, 1.0)
    assert json.loads(store.queued_request("done")[0])["s3Config"]["accessSecret"] == secret
    store.start("done", 2.0)
    store.finish("done", "COMPLETED", {"output": {"ok": True}}, 3.0)
    store.cancel_queued(["dropped"], 3.0)
    raw = store.db.execute("SELECT request FROM jobs").fetchall()
    assert [row[0] for row in raw] == ["{}", "{}"]
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for path in store.path.parent.iterdir():
        assert secret.encode() not in path.read_bytes(), path


def test_an_accepted_job_survives_the_process_being_killed(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    code = textwrap.dedent(f"""
        import os
        from comfy_worker.job_store import JobStore
        s = JobStore({str(path)!r})
        s.add("kept", '{{"input": 1}}', None, 1.0)
        s.start("kept", 2.0)
        os.kill(os.getpid(), 9)
    """)
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30)
    assert killed.returncode == -9
    store = JobStore(path)
    try:
        assert store.get("kept")["status"] == "IN_PROGRESS"
        assert store.recover() == 1 and store.queued_ids() == ["kept"]
    finally:
        store.close()


def test_one_process_per_store(store, tmp_path):
    code = f"from comfy_worker.job_store import JobStore; JobStore({str(store.path)!r})"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert other.returncode == 1 and "in use by another API process (pid" in other.stderr
    with pytest.raises(StoreBusy):  # also within one process: a second open is refused
        JobStore(store.path)
    assert store.path.stat().st_mode & 0o777 == 0o600


def store_files(store: JobStore) -> list:
    return sorted(store.path.parent.glob(f"{store.path.name}*"))


def test_every_store_file_is_0600_and_no_file_keeps_a_final_jobs_secrets(tmp_path):
    """issue 20 #2: ``-wal`` and ``-shm`` were created 0644, and the WAL kept a COMPLETED job's
    ``s3Config`` keys and ``comfy_org_api_key`` (the request was emptied in the database only)."""
    secrets = ["AKIA-access-id-81c2", "s3-secret-key-5d1f0e", "comfy-org-key-9b7a44"]
    old = os.umask(0o022)  # what a shell usually has: files 0644 unless the store says otherwise
    try:
        store = JobStore(tmp_path / ".api" / "jobs.sqlite3")
    finally:
        os.umask(old)
    try:
        request = {
            "input": {"workflow": {"x": "node " * 2000}, "comfy_org_api_key": secrets[2]},
            "s3Config": {"accessId": secrets[0], "accessSecret": secrets[1]},
        }
        for job_id in ("done", "dropped", "waiting"):
            store.add(job_id, json.dumps(request), None, 1.0)
        assert {path.name: path.stat().st_mode & 0o777 for path in store_files(store)} == {
            name: 0o600 for name in ("jobs.sqlite3", "jobs.sqlite3-shm", "jobs.sqlite3-wal", "jobs.sqlite3.lock")
        }
        store.start("done", 2.0)
        store.finish("done", "COMPLETED", {"output": {"ok": True}}, 3.0)
        store.cancel_queued(["dropped", "waiting"], 3.0)

        def leaked():
            return [(path.name, s) for path in store_files(store) for s in secrets if s.encode() in path.read_bytes()]

        deadline = time.monotonic() + 15
        while leaked():
            assert time.monotonic() < deadline, leaked()
            time.sleep(0.05)
    finally:
        store.close()


OLD_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, request TEXT NOT NULL,
    webhook TEXT, created REAL NOT NULL, started REAL, finished REAL, attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT, webhook_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
"""


def test_a_store_of_the_previous_version_is_migrated_and_keeps_its_jobs(tmp_path):
    """issue 20 #20/#21/#19: new columns (Idempotency-Key, webhook schedule) and incremental auto-vacuum,
    which SQLite only takes on a new file or with a VACUUM."""
    path = tmp_path / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(OLD_SCHEMA)
        old.execute(
            "INSERT INTO jobs (id, status, request, webhook, created, finished, result, webhook_pending) "
            "VALUES ('hooked', 'COMPLETED', '{}', 'http://hook', 1, 2, '{\"output\": 1}', 1)"
        )
        old.execute(
            "INSERT INTO jobs (id, status, request, created) VALUES ('queued', 'IN_QUEUE', '{\"input\": 1}', 3)"
        )
        assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = JobStore(path)
    try:
        assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert store.get("hooked")["result"] == {"output": 1} and store.queued_request("queued") == (
            '{"input": 1}',
            3.0,
        )
        assert store.due_webhooks(time.time()) == ["hooked"]  # owed before the upgrade: sent after it
        store.add("keyed", json.dumps({"input": 2}), None, 4.0, key="k-1", digest="d")
        assert store.by_key("k-1", since=0) == ("keyed", "d")
    finally:
        store.close()
    JobStore(path).close()  # opened again: nothing left to migrate


def test_expired_jobs_give_their_space_back_to_the_file_system(store):
    """issue 20 #21: expiring every row left the file (and the WAL) at its largest size."""
    output = {"images": [{"data": "A" * 4000}]}
    for i in range(1500):
        store.add(f"j{i}", json.dumps({"input": {"n": i}}), None, 1.0)
        store.start(f"j{i}", 1.0)
        store.finish(f"j{i}", "COMPLETED", {"output": output}, 2.0)
    store.flush_wal()
    full = sum(path.stat().st_size for path in store_files(store))
    assert full > 6_000_000
    assert store.expire(before=3.0) == 1500
    deadline = time.monotonic() + 15
    while (size := sum(path.stat().st_size for path in store_files(store))) > full / 10:
        assert time.monotonic() < deadline, (full, size)
        time.sleep(0.05)


def test_a_result_over_max_stored_result_mb_is_not_kept_and_the_job_says_why(tmp_path):
    """issue 20 #21: any result was kept whole (base64 outputs of many MB per job)."""
    store = JobStore(tmp_path / "jobs.sqlite3", max_result_mb=0.01)
    try:
        for job_id, size in (("small", 100), ("big", 20_000)):
            store.add(job_id, json.dumps({"input": {}}), "http://hook", 1.0)
            store.start(job_id, 1.0)
            assert store.finish(job_id, "COMPLETED", {"output": {"data": "A" * size}}, 2.0)
        assert store.get("small")["status"] == "COMPLETED"
        big = store.get("big")
        assert big["status"] == "FAILED" and big["webhook_pending"] == 1
        assert big["result"]["error"].startswith("The job's result is 0.0 MB, more than MAX_STORED_RESULT_MB (0.01 MB)")
        assert "Send the outputs to S3" in big["result"]["error"]
        assert big["result"]["output"]["details"]["max_stored_result_mb"] == 0.01
    finally:
        store.close()


def test_an_idempotency_key_finds_its_job_until_the_result_expires_then_it_may_be_used_again(store):
    store.add("first", json.dumps({"input": 1}), None, 1.0, key="key-1", digest="d1")
    assert store.by_key("key-1", since=0) == ("first", "d1") and store.by_key("other", since=0) is None
    store.start("first", 2.0)
    store.finish("first", "COMPLETED", {}, 3.0)
    assert store.by_key("key-1", since=2.5) == ("first", "d1")  # its result still readable
    assert store.by_key("key-1", since=3.5) is None  # expired (not swept yet): the key is free again
    store.add("second", json.dumps({"input": 2}), None, 4.0, key="key-1", digest="d2")  # no unique-index conflict
    assert store.by_key("key-1", since=3.5) == ("second", "d2")
    with pytest.raises(sqlite3.IntegrityError):  # one job per key, enforced by the store itself
        store.db.execute("UPDATE jobs SET idempotency_key = 'key-1' WHERE id = 'first'")


def sqlite_steps(store: JobStore, call) -> int:
    """How many SQLite virtual-machine steps ``call()`` took on the store's connection (a measure of the
    rows it visited that does not depend on the machine's speed or load)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store.db.set_progress_handler(count, 1)
    try:
        call()
    finally:
        store.db.set_progress_handler(None, 1)
    return steps


def test_finding_due_webhooks_costs_the_same_with_thousands_of_finished_jobs_kept(store):
    """issue 25: the webhook loop's query scanned the whole table (to avoid a sort by seq), once per finished
    job: the API slowed down with every result kept for RESULT_TTL_S. It now reads the owed webhooks' index."""
    store.add("hooked", json.dumps({"input": 1}), "http://hook", 1.0)
    store.start("hooked", 1.0)
    store.finish("hooked", "COMPLETED", {}, 2.0)
    few = sqlite_steps(store, lambda: store.due_webhooks(time.time()))
    for i in range(3000):
        store.add(f"j{i}", json.dumps({"input": i}), None, 1.0)
        store.start(f"j{i}", 1.0)
        store.finish(f"j{i}", "COMPLETED", {"output": i}, 2.0)
    many = sqlite_steps(store, lambda: store.due_webhooks(time.time()))
    assert store.due_webhooks(time.time()) == ["hooked"]
    assert many < few + 50, (few, many)


def test_complete_returns_the_final_job_as_get_reads_it_and_its_result_as_stored(tmp_path):
    """issue 25: the API read back and decoded every result it had just written to answer the job's waiter;
    ``complete`` hands it the job as the store now has it (also a result replaced for its size)."""
    store = JobStore(tmp_path / "jobs.sqlite3", max_result_mb=0.01)
    try:
        for job_id, result in (("small", {"output": {"n": 1}}), ("big", {"output": {"data": "A" * 20_000}})):
            store.add(job_id, json.dumps({"input": {}}), "http://hook" if job_id == "big" else None, 1.25)
            store.start(job_id, 2.0)
            final = store.complete(job_id, "COMPLETED", result, 3.5)
            stored = store.get(job_id)
            assert {k: v for k, v in final.items() if k != "result_json"} == stored
            assert json.loads(final["result_json"]) == stored["result"]
            assert store.complete(job_id, "FAILED", {"error": "again"}, 4.0) is None  # finished once only
        assert store.get("big")["status"] == "FAILED" and "MAX_STORED_RESULT_MB" in store.get("big")["result"]["error"]
    finally:
        store.close()
