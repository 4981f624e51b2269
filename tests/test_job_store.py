"""job_store: the API's jobs in SQLite on the volume (a real file, real processes for kill and lock)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from support.comfy_process import ROOT

from comfy_worker.job_store import JobStore, StoreBusy


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / ".api" / "jobs.sqlite3")
    yield s
    s.close()


def test_a_job_moves_queued_running_final_and_is_finished_only_once(store):
    store.add("a", {"input": {"x": 1}}, None, 100.0)
    assert store.queued_ids() == ["a"] and store.get("a")["status"] == "IN_QUEUE"
    assert store.finish("a", "COMPLETED", {"output": 1}, 101.0) is False  # never finished while queued
    assert store.queued_request("a") == ({"input": {"x": 1}}, 100.0)
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
        store.add(name, {"input": name}, None, 1.0)
    store.start("a", 2.0)
    store.close()
    again = JobStore(tmp_path / ".api" / "jobs.sqlite3")
    try:
        assert again.recover() == 1
        assert again.queued_ids() == ["a", "b", "c"]
        assert again.queued_request("a") == ({"input": "a"}, 1.0)
        assert again.start("a", 3.0) and again.finish("a", "COMPLETED", {}, 4.0)
        assert again.counts()["retried"] == 1
    finally:
        again.close()


def test_cancel_purge_webhooks_and_expiry(store):
    store.add("q1", {"input": 1}, "http://hook", 1.0)
    store.add("q2", {"input": 2}, None, 1.0)
    store.add("run", {"input": 3}, None, 1.0)
    store.start("run", 2.0)
    assert store.cancel_queued(["q1", "run", "nope"], 3.0) == ["q1"]  # a running job is not "queued"
    assert store.pending_webhooks() == ["q1"]
    store.webhook_sent("q1")
    assert store.pending_webhooks() == []
    store.add("old", {"input": 4, "policy": {"ttl": 10000}}, None, 1.0)
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
        store.add(job_id, {"input": workflow, "s3Config": {"accessSecret": secret}}, None, 1.0)
    assert store.queued_request("done")[0]["s3Config"]["accessSecret"] == secret
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
        s.add("kept", {{"input": 1}}, None, 1.0)
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
