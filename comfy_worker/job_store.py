"""The API's jobs and their results in SQLite on the volume (docs/architecture.md, "The API's job store").

One row per job: its request, its status (RunPod's words: ``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``,
``FAILED``, ``CANCELLED``, ``TIMED_OUT``), when it was accepted, started and finished, how often it was
started, its result and whether its webhook is still owed. The request is ``{"input"}`` plus RunPod's
``policy`` and ``s3Config`` when given; it is emptied once the job is final, with ``secure_delete`` on, and
the WAL is checkpointed and truncated within ``WAL_FLUSH_DELAY_S`` of that (in a thread of its own: the
checkpoint's fsyncs take ~13 ms), so keys sent in a request stay on the volume only while the job needs
them. Every file of the store is 0600 from its creation (results hold outputs and inputs). A job may carry
the client's ``Idempotency-Key`` (unique among the rows). Its webhook's delivery is scheduled here
(``webhook_attempts``, ``webhook_next``), so retries go on across restarts (webhooks.py sends them). The
file shrinks again: ``auto_vacuum=INCREMENTAL`` (a store from an older version is vacuumed once to get it),
and ``expire`` hands the freed pages back. A result larger than ``max_result_mb`` is not kept: the job
ends ``FAILED`` saying so (``MAX_STORED_RESULT_MB``). Stdlib ``sqlite3`` in WAL mode with
``synchronous=NORMAL``: every committed write survives the process dying (SIGKILL, OOM kill, a crash);
a power cut or kernel crash may lose the last moments (``FULL``, an fsync per write, cost 0.6x of the
throughput of trivial jobs: bench/api_throughput.py).

Only one process uses a store at a time (an exclusive ``flock`` on ``<db>.lock``, held while it is open),
so the status changes below are the whole truth:

- ``start`` moves ``IN_QUEUE`` -> ``IN_PROGRESS`` (one attempt more);
- ``finish`` moves ``IN_PROGRESS`` -> a final status only once: a job is never finished twice;
- ``recover`` (at open) puts the jobs a dead process left ``IN_PROGRESS`` back to ``IN_QUEUE``.

A store from the previous version is migrated at open (the missing columns added).

The methods are blocking and not thread-safe: the API calls them from its event loop (each is well under a
millisecond: no fsync per commit). Only the WAL checkpoint runs in a thread, on a connection of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

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
    webhook_pending INTEGER NOT NULL DEFAULT 0,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next REAL,
    idempotency_key TEXT,
    request_digest TEXT
);
"""
# columns added since the first version: (name, declaration) for ALTER TABLE on an older store
ADDED_COLUMNS = (
    ("webhook_attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("webhook_next", "REAL"),
    ("idempotency_key", "TEXT"),
    ("request_digest", "TEXT"),
)
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_webhook ON jobs (webhook_next) WHERE webhook_pending = 1;
"""
JOB_COLUMNS = (
    "id, status, webhook, created, started, finished, attempts, webhook_pending"  # a job as read, but its result
)
WAL_FLUSH_DELAY_S = 1.0  # a wiped request leaves the WAL this soon; at most one checkpoint (~13 ms) per delay
AUTO_VACUUM_INCREMENTAL = 2


class StoreBusy(RuntimeError):
    """Another process has this store open."""


def oversized_result(size: int, max_result_mb: float) -> dict:
    """The result kept instead of one over ``MAX_STORED_RESULT_MB``."""
    mb = size / 1024 / 1024
    return {
        "error": f"The job's result is {mb:.1f} MB, more than MAX_STORED_RESULT_MB ({max_result_mb:g} MB) that "
        "the API keeps for /status, so its outputs were not kept. Send the outputs to S3 (s3Config in the "
        "request, or the BUCKET_* settings) so the result holds URLs, or raise MAX_STORED_RESULT_MB.",
        "output": {"details": {"result_mb": round(mb, 2), "max_stored_result_mb": max_result_mb}},
    }


class JobStore:
    def __init__(self, path: Path, max_result_mb: float | None = None):
        self.path = Path(path)
        self.max_result_bytes = None if max_result_mb is None else int(max_result_mb * 1024 * 1024)
        self.max_result_mb = max_result_mb
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
        self._flush_lock = threading.Lock()  # guards _flush_timer and the checkpoint connection
        self._flush_timer: threading.Timer | None = None
        self._flusher: sqlite3.Connection | None = None
        self._closed = False
        try:
            self.db = self._connect()
            self._migrate()
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a WAL a killed process left: no old request in it
        except sqlite3.DatabaseError as exc:
            os.close(self._lock)
            raise RuntimeError(f"the job store {self.path} cannot be opened ({exc})") from None
        for suffix in ("", "-wal", "-shm"):  # also the files an older version created 0644
            with contextlib.suppress(OSError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    def _connect(self) -> sqlite3.Connection:
        """A connection in WAL mode; the database, its ``-wal`` and ``-shm`` are created 0600 (umask)."""
        old = os.umask(0o077)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA auto_vacuum={AUTO_VACUUM_INCREMENTAL}")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA secure_delete=ON")  # an emptied request is overwritten, not left in free pages
            db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back after a burst
            db.executescript(SCHEMA)  # the first write: -wal and -shm exist from here on
        finally:
            os.umask(old)
        return db

    def _migrate(self) -> None:
        """A store of an older version: its missing columns added, and incremental auto-vacuum (VACUUM once)."""
        have = {row["name"] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in ADDED_COLUMNS:
            if name not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
        self.db.executescript(INDEXES)
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
            log.info("job store %s: switching to incremental auto-vacuum (VACUUM, once)", self.path)
            self.db.execute(f"PRAGMA auto_vacuum={AUTO_VACUUM_INCREMENTAL}")
            self.db.execute("VACUUM")

    def close(self) -> None:
        with self._flush_lock:
            self._closed = True
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if self._flusher is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._flusher.close()
                self._flusher = None
        with contextlib.suppress(sqlite3.Error):
            self.db.close()  # the last connection: SQLite checkpoints and removes -wal and -shm
        with contextlib.suppress(OSError):
            os.close(self._lock)

    # -- the WAL --
    def _wiped(self) -> None:
        """A request was emptied: checkpoint and truncate the WAL soon (the old request is in its frames)."""
        with self._flush_lock:
            if self._flush_timer is None:
                self._flush_timer = threading.Timer(WAL_FLUSH_DELAY_S, self.flush_wal)
                self._flush_timer.daemon = True
                self._flush_timer.start()

    def flush_wal(self) -> bool:
        """Copy the WAL into the database and truncate it (on the checkpoint connection); False when a
        reader kept it from finishing (tried again later)."""
        with self._flush_lock:
            self._flush_timer = None
            if self._closed:
                return True
            try:
                if self._flusher is None:
                    self._flusher = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False, timeout=30
                    )
                busy = self._flusher.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.Error as exc:
                log.warning("job store %s: WAL checkpoint failed (%s); tried again after the next job", self.path, exc)
                return False
        if busy:
            self._wiped()
        return not busy

    # -- writes --
    def add(
        self, job_id: str, request: str, webhook: str | None, now: float, key: str | None = None, digest: str = ""
    ) -> None:
        """A queued job, ``request`` its JSON text (encoded once by the API, and sent as it is to the job
        runner); ``key`` (the client's ``Idempotency-Key``) is taken from any older job that had it
        (``by_key`` found none still valid), ``digest`` is the request's fingerprint kept beside it."""
        if key is not None:
            self.db.execute("UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key = ?", (key,))
        self.db.execute(
            "INSERT INTO jobs (id, status, request, webhook, created, idempotency_key, request_digest) "
            "VALUES (?, 'IN_QUEUE', ?, ?, ?, ?, ?)",
            (job_id, request, webhook, now, key, digest if key is not None else None),
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
        """``IN_PROGRESS`` -> ``status`` with ``result``; False (nothing changed) when it was not running.
        A result over ``max_result_mb`` is replaced by an error saying so (the job ends ``FAILED``)."""
        return self.complete(job_id, status, result, now) is not None

    def complete(self, job_id: str, status: str, result: dict, now: float) -> dict | None:
        """``finish``, returning the job as ``get`` reads it from then on (None: it was not running), plus
        ``result_json``, its result as stored: the API answers the job's waiters with these, without reading
        back, decoding and encoding again what it just wrote (committed before this returns)."""
        assert status in FINAL
        text = json.dumps(result)
        if self.max_result_bytes is not None and len(text) > self.max_result_bytes:
            log.warning("job %s: its result (%d bytes) is over MAX_STORED_RESULT_MB: not kept", job_id, len(text))
            status, result = "FAILED", oversized_result(len(text), self.max_result_mb)
            text = json.dumps(result)
        rows = self.db.execute(
            "UPDATE jobs SET status = ?, result = ?, finished = ?, webhook_pending = (webhook IS NOT NULL), "
            f"request = '{{}}' WHERE id = ? AND status = 'IN_PROGRESS' RETURNING {JOB_COLUMNS}",
            (status, text, now, job_id),
        ).fetchall()  # stepped to its end: the statement, and with it the transaction, is over
        if not rows:
            return None
        self._wiped()
        job = dict(rows[0])  # RETURNING gives a REAL column's whole number as an int: as get() reads them
        job.update({k: float(job[k]) for k in ("created", "started", "finished") if job[k] is not None})
        return {**job, "result": result, "result_json": text}

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
            done = [r["id"] for r in self.db.execute(f"{update} RETURNING id", values).fetchall()]
        else:
            done = [
                job_id
                for job_id in job_ids
                if self.db.execute(f"{update} AND id = ? RETURNING id", (*values, job_id)).fetchone()
            ]
        if done:
            self._wiped()
        return done

    def webhook_sent(self, job_id: str) -> None:
        """The webhook is settled: delivered, refused or given up (never sent again)."""
        self.db.execute("UPDATE jobs SET webhook_pending = 0 WHERE id = ?", (job_id,))

    def webhook_attempt(self, job_id: str, retry_at: float) -> int:
        """One attempt more (counted before it is made), the next one due at ``retry_at`` should this
        one never report back (the process killed meanwhile); returns the attempts made, this one included."""
        row = self.db.execute(
            "UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_next = ? "
            "WHERE id = ? AND webhook_pending = 1 RETURNING webhook_attempts",
            (retry_at, job_id),
        ).fetchone()
        return row[0] if row else 0

    def webhook_retry_at(self, job_id: str, at: float) -> None:
        self.db.execute("UPDATE jobs SET webhook_next = ? WHERE id = ? AND webhook_pending = 1", (at, job_id))

    def expire(self, before: float) -> int:
        """Forget finished jobs that finished before ``before``; returns how many. Their pages go back to
        the file system (incremental vacuum) and the WAL is truncated soon after."""
        placeholders = ",".join("?" * len(FINAL))
        gone = self.db.execute(
            f"DELETE FROM jobs WHERE status IN ({placeholders}) AND finished < ?", (*FINAL, before)
        ).rowcount
        if gone:
            self.db.executescript("PRAGMA incremental_vacuum;")  # as a script: run to the end, every free page
            self._wiped()
        return gone

    # -- reads --
    def get(self, job_id: str) -> dict | None:
        """The job's row without its request (``queued_request`` reads that), its result parsed."""
        row = self.db.execute(f"SELECT {JOB_COLUMNS}, result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["result"] = json.loads(job["result"]) if job["result"] else {}
        return job

    def queued_request(self, job_id: str) -> tuple[str, float] | None:
        """(request as JSON text, created) of a queued job (read back after a restart); None when it is not
        queued."""
        row = self.db.execute(
            "SELECT request, created FROM jobs WHERE id = ? AND status = 'IN_QUEUE'", (job_id,)
        ).fetchone()
        return (row["request"], row["created"]) if row else None

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE status = 'IN_QUEUE' ORDER BY seq")]

    def pending_webhooks(self) -> list[str]:
        return [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE webhook_pending = 1 ORDER BY seq")]

    def due_webhooks(self, now: float) -> list[str]:
        """Jobs whose webhook is owed and due (never tried, or its next attempt's time has come). Read through
        the index of owed webhooks: the finished jobs kept for RESULT_TTL_S cost nothing here (without
        ``INDEXED BY`` SQLite scans the whole table to avoid sorting by ``seq``)."""
        return [
            r["id"]
            for r in self.db.execute(
                "SELECT id FROM jobs INDEXED BY jobs_by_webhook WHERE webhook_pending = 1 "
                "AND (webhook_next IS NULL OR webhook_next <= ?) ORDER BY seq",
                (now,),
            )
        ]

    def next_webhook_at(self) -> float | None:
        """When the next owed webhook is due (0 for one never tried); None when none is owed."""
        return self.db.execute("SELECT MIN(COALESCE(webhook_next, 0)) FROM jobs WHERE webhook_pending = 1").fetchone()[
            0
        ]

    def by_key(self, key: str, since: float) -> tuple[str, str] | None:
        """(id, request digest) of the job given ``key`` as its ``Idempotency-Key``, unless it finished
        before ``since`` (its result expired)."""
        row = self.db.execute(
            "SELECT id, request_digest FROM jobs WHERE idempotency_key = ? AND (finished IS NULL OR finished >= ?)",
            (key, since),
        ).fetchone()
        return (row["id"], row["request_digest"]) if row else None

    def counts(self) -> dict[str, int]:
        """{status: jobs}, plus ``retried``: jobs started more than once."""
        counts = {
            r["status"]: r["n"] for r in self.db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        }
        counts["retried"] = self.db.execute("SELECT COUNT(*) FROM jobs WHERE attempts > 1").fetchone()[0]
        return counts
