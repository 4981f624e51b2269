"""The API's jobs and their results in SQLite on the volume (docs/architecture.md, "The API's job store").

One row per job: its request, its status (RunPod's words: ``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``,
``FAILED``, ``CANCELLED``, ``TIMED_OUT``), when it was accepted, started and finished, how often it was
started, its result and whether its webhook is still owed. The request is ``{"input"}`` plus RunPod's
``policy`` and ``s3Config`` when given; it is emptied once the job is final, with ``secure_delete`` on, so
keys sent in a request stay on the volume only while the job needs them. Stdlib ``sqlite3`` in WAL mode with
``synchronous=NORMAL``: every committed write survives the process dying (SIGKILL, OOM kill, a crash);
a power cut or kernel crash may lose the last moments (``FULL``, an fsync per write, cost 0.6x of the
throughput of trivial jobs: bench/api_throughput.py).

Only one process uses a store at a time (an exclusive ``flock`` on ``<db>.lock``, held while it is open),
so the status changes below are the whole truth:

- ``start`` moves ``IN_QUEUE`` -> ``IN_PROGRESS`` (one attempt more);
- ``finish`` moves ``IN_PROGRESS`` -> a final status only once: a job is never finished twice;
- ``recover`` (at open) puts the jobs a dead process left ``IN_PROGRESS`` back to ``IN_QUEUE``.

The methods are blocking and not thread-safe: the API calls them from its event loop (each is well under a
millisecond: no fsync per commit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from pathlib import Path

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    webhook TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    webhook_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""


class StoreBusy(RuntimeError):
    """Another process has this store open."""


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock)
            raise StoreBusy(
                f"the job store {self.path} is in use by another API process (pid {holder}); one API serves one volume"
            ) from None
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, f"{os.getpid()}\n".encode(), 0)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA secure_delete=ON")  # an emptied request is overwritten, not left in free pages
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            os.close(self._lock)
            raise RuntimeError(f"the job store {self.path} cannot be opened ({exc})") from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)  # results may hold outputs and inputs

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock)

    # -- writes --
    def add(self, job_id: str, request: dict, webhook: str | None, now: float) -> None:
        self.db.execute(
            "INSERT INTO jobs (id, status, request, webhook, created) VALUES (?, 'IN_QUEUE', ?, ?, ?)",
            (job_id, json.dumps(request), webhook, now),
        )

    def recover(self) -> int:
        """Jobs a stopped or killed process left running go back to the queue; returns how many."""
        return self.db.execute(
            "UPDATE jobs SET status = 'IN_QUEUE', started = NULL WHERE status = 'IN_PROGRESS'"
        ).rowcount

    def start(self, job_id: str, now: float) -> bool:
        """``IN_QUEUE`` -> ``IN_PROGRESS`` (one attempt more); False when it was no longer queued."""
        return (
            self.db.execute(
                "UPDATE jobs SET status = 'IN_PROGRESS', started = ?, attempts = attempts + 1 "
                "WHERE id = ? AND status = 'IN_QUEUE'",
                (now, job_id),
            ).rowcount
            == 1
        )

    def finish(self, job_id: str, status: str, result: dict, now: float) -> bool:
        """``IN_PROGRESS`` -> ``status`` with ``result``; False (nothing changed) when it was not running."""
        assert status in FINAL
        return (
            self.db.execute(
                "UPDATE jobs SET status = ?, result = ?, finished = ?, webhook_pending = (webhook IS NOT NULL), "
                "request = '{}' WHERE id = ? AND status = 'IN_PROGRESS'",
                (status, json.dumps(result), now, job_id),
            ).rowcount
            == 1
        )

    def requeue(self, job_id: str) -> bool:
        """A running job stopped by a shutdown goes back to the queue (it runs again after the restart)."""
        return (
            self.db.execute(
                "UPDATE jobs SET status = 'IN_QUEUE', started = NULL WHERE id = ? AND status = 'IN_PROGRESS'", (job_id,)
            ).rowcount
            == 1
        )

    def cancel_queued(
        self, job_ids: list[str] | None, now: float, status: str = "CANCELLED", result: dict | None = None
    ) -> list[str]:
        """Queued jobs (these, or all when None) end as ``status`` (``CANCELLED``, or ``TIMED_OUT`` for a
        job past its ``policy.ttl``) with ``result``; returns the ids that were queued."""
        assert status in FINAL
        update = (
            "UPDATE jobs SET status = ?, finished = ?, result = ?, webhook_pending = (webhook IS NOT NULL), "
            "request = '{}' WHERE status = 'IN_QUEUE'"
        )
        values = (status, now, json.dumps(result or {}))
        if job_ids is None:
            return [r["id"] for r in self.db.execute(f"{update} RETURNING id", values).fetchall()]
        done = []
        for job_id in job_ids:
            if self.db.execute(f"{update} AND id = ? RETURNING id", (*values, job_id)).fetchone():
                done.append(job_id)
        return done

    def webhook_sent(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET webhook_pending = 0 WHERE id = ?", (job_id,))

    def expire(self, before: float) -> int:
        """Forget finished jobs that finished before ``before``; returns how many."""
        placeholders = ",".join("?" * len(FINAL))
        return self.db.execute(
            f"DELETE FROM jobs WHERE status IN ({placeholders}) AND finished < ?", (*FINAL, before)
        ).rowcount

    # -- reads --
    def get(self, job_id: str) -> dict | None:
        """The job's row without its request (``queued_request`` reads that), its result parsed."""
        row = self.db.execute(
            "SELECT id, status, webhook, created, started, finished, attempts, result, webhook_pending "
            "FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["result"] = json.loads(job["result"]) if job["result"] else {}
        return job

    def queued_request(self, job_id: str) -> tuple[dict, float] | None:
        """(request, created) of a queued job (read back after a restart); None when it is not queued."""
        row = self.db.execute(
            "SELECT request, created FROM jobs WHERE id = ? AND status = 'IN_QUEUE'", (job_id,)
        ).fetchone()
        return (json.loads(row["request"]), row["created"]) if row else None

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE status = 'IN_QUEUE' ORDER BY seq")]

    def pending_webhooks(self) -> list[str]:
        return [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE webhook_pending = 1 ORDER BY seq")]

    def counts(self) -> dict[str, int]:
        """{status: jobs}, plus ``retried``: jobs started more than once."""
        counts = {
            r["status"]: r["n"] for r in self.db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        }
        counts["retried"] = self.db.execute("SELECT COUNT(*) FROM jobs WHERE attempts > 1").fetchone()[0]
        return counts
