"""Waiting for a lock on the shared volume: said out loud, bounded, and ended by SIGTERM.

Several workers may share one volume; a lock file (``filelock``, an ``flock`` underneath) lets one of
them work on a target while the others wait. ``acquire`` is the one way this project waits for such a
lock: it tries without blocking first, and when another process holds the lock it logs once what it
waits for, then polls in short steps so that a ``stop`` event (set on SIGTERM) ends the wait within a
fraction of a second, and ``timeout`` (when given) bounds it. A filesystem without working ``flock``
is reported as such, with what to do, instead of as an unexpected error.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

POLL_S = 0.2


class Interrupted(Exception):
    """The wait (or the work) was ended by a stop request (SIGTERM)."""


class LockError(Exception):
    """The lock cannot be taken: the filesystem cannot lock, or the wait timed out. Readable."""


def acquire(
    path: Path,
    what: str,
    stop: threading.Event | None = None,
    timeout: float | None = None,
) -> FileLock:
    """The lock at ``path``, held (call ``.release()``). ``what`` names the holder's work for the
    waiting message ("another process downloading x.safetensors"). Raises ``Interrupted`` when
    ``stop`` is set while waiting, ``LockError`` on timeout or a filesystem without locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    started = time.monotonic()
    said = False
    while True:
        try:
            lock.acquire(timeout=0 if not said else POLL_S)
            return lock
        except Timeout:
            pass
        except (NotImplementedError, OSError) as err:
            raise LockError(
                f"cannot lock {path}: the filesystem there does not support file locks (flock) "
                f"({type(err).__name__}: {err}); put the volume on a filesystem that does "
                "(local disk, ext4, xfs, NFSv4 with locking) or point VOLUME_ROOT at one"
            ) from None
        if not said:
            log.info("waiting for %s (lock %s)", what, path)
            said = True
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped while waiting for {what}")
        if timeout is not None and time.monotonic() - started >= timeout:
            raise LockError(f"gave up after {timeout:g} s waiting for {what} (lock {path})")
