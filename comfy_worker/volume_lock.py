"""Waiting for a lock on the shared volume: said out loud, bounded, and ended by SIGTERM.

Several workers may share one volume; a lock file (``filelock``, an ``flock`` underneath) lets one of
them work on a target while the others wait. ``acquire`` is the one way this project waits for such a
lock: it tries without blocking first, and when another process holds the lock it logs once what it
waits for, then polls in short steps so that a ``stop`` event (set on SIGTERM) ends the wait within a
fraction of a second, and ``timeout`` (when given) bounds it. A lock that cannot be taken is reported
with its real cause and what to do: a read-only filesystem, a full one, a permission the worker's user
lacks, or (only then) a filesystem without working ``flock``.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

POLL_S = 0.2


class Interrupted(Exception):
    """The wait (or the work) was ended by a stop request (SIGTERM)."""


class LockError(Exception):
    """The lock cannot be taken (read-only, full, not permitted, no flock) or the wait timed out. Readable."""


# errnos that mean the filesystem itself cannot lock (as opposed to: cannot write the lock file)
NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def explain(path: Path, err: BaseException) -> str:
    """Why the lock file ``path`` could not be created or locked, and the fix: one line."""
    where = next((d for d in path.parents if d.exists()), path.parent)  # the folder that must be writable
    code = getattr(err, "errno", None)
    detail = f"({type(err).__name__}: {err})"
    if code == errno.EROFS:
        return (
            f"cannot lock {path}: the filesystem at {where} is mounted read-only {detail}; mount the volume "
            "writable (a RunPod network volume is; check the container's -v/--mount flags for ':ro'), or "
            "point VOLUME_ROOT at a writable directory"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"cannot lock {path}: no space left on the filesystem at {where} (bytes, inodes or quota) "
            f"{detail}; free some space there (df -h {where}; df -i {where}) or use a bigger volume"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"cannot lock {path}: permission denied for {_user()} {detail}; make {where} writable for that "
            f"user (e.g. chown -R {os.geteuid()} {where}), or run the worker as the volume's owner, or point "
            "VOLUME_ROOT at a directory that user can write"
        )
    if isinstance(err, NotImplementedError) or code in NO_FLOCK:
        return (
            f"cannot lock {path}: the filesystem there does not support file locks (flock) {detail}; put the "
            "volume on a filesystem that does (local disk, ext4, xfs, NFSv4 with locking) or point "
            "VOLUME_ROOT at one"
        )
    return f"cannot create or lock {path} {detail}; check that {where} is a writable directory on a healthy volume"


def acquire(
    path: Path,
    what: str,
    stop: threading.Event | None = None,
    timeout: float | None = None,
) -> FileLock:
    """The lock at ``path``, held (call ``.release()``). ``what`` names the holder's work for the
    waiting message ("another process downloading x.safetensors"). Raises ``Interrupted`` when
    ``stop`` is set while waiting, ``LockError`` on timeout or when the lock cannot be taken at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LockError(explain(path, err)) from None
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
            raise LockError(explain(path, err)) from None
        if not said:
            log.info("waiting for %s (lock %s)", what, path)
            said = True
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped while waiting for {what}")
        if timeout is not None and time.monotonic() - started >= timeout:
            raise LockError(f"gave up after {timeout:g} s waiting for {what} (lock {path})")
