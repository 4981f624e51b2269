"""Which model files running jobs are using, across every worker sharing the volume.

A job that uses a model file (one it named in its input ``models``) holds a *shared* ``flock`` on that
file's in-use marker, ``models/.locks/<destination>/<filename>.use``, from before it checks the file
until the job ends. Whoever wants to delete a model file (the job models' eviction, ``apply_config.sh
--prune``) first takes the marker *exclusively* without waiting: when that fails, some job uses the file
and it is kept. The kernel drops a process's locks when it dies, so a crashed worker never pins a file.
Marker files are kept after use (deleting a lock file races with its next user); they are empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

POLL_S = 0.05


def marker(models_dir: Path, rel: str) -> Path:
    """The in-use marker of ``models/<rel>`` (``rel`` is ``destination/filename``)."""
    return models_dir / ".locks" / f"{rel}.use"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


class Uses:
    """The in-use markers one job holds (shared); ``release()`` drops them all, and any taken later."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def hold(self, rel: str, stop: threading.Event) -> None:
        """Hold ``rel``'s marker (shared), waiting while a deletion holds it; ended by ``stop``."""
        fd = _open(marker(self.models_dir, rel))
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if stop.wait(POLL_S):
                        raise InterruptedError("stopped while waiting for a model being deleted") from None
            with self._lock:
                if not self._closed and rel not in self._fds:
                    self._fds[rel], fd = fd, -1
        finally:
            if fd >= 0:
                os.close(fd)

    def release(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)  # closing the last descriptor drops the flock


@contextlib.contextmanager
def unused(models_dir: Path, rel: str):
    """Yields True while ``rel`` is held exclusively (no job uses it: delete it now), False when a job
    uses it (keep it). Never waits."""
    fd = _open(marker(models_dir, rel))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def in_use(models_dir: Path, rel: str) -> bool:
    """Is ``models/<rel>`` used by a running job right now? (A file without a marker never was.)"""
    if not marker(models_dir, rel).exists():
        return False
    with unused(models_dir, rel) as free:
        return not free
