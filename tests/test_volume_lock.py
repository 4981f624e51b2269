"""volume_lock.acquire: a wait that is said, bounded, ended by the stop event, and a clear error on a
filesystem without flock. The holder is another real process."""

from __future__ import annotations

import errno
import fcntl
import logging
import subprocess
import sys
import threading
import time

import pytest

from comfy_worker import volume_lock


@pytest.fixture
def held(tmp_path):
    """A lock held by another process until the fixture ends."""
    path = tmp_path / "locks" / "m.lock"
    path.parent.mkdir()
    code = "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield path
    proc.kill()
    proc.wait()


def test_a_stop_ends_the_wait_within_a_fraction_of_a_second(held, caplog):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(volume_lock.Interrupted, match="another process downloading m"):
        volume_lock.acquire(held, "another process downloading m", stop=stop)
    assert time.monotonic() - started < 1.5
    assert "waiting for another process downloading m" in caplog.text


def test_a_timeout_bounds_the_wait(held):
    with pytest.raises(volume_lock.LockError, match="gave up after 0.5 s waiting for x"):
        volume_lock.acquire(held, "x", timeout=0.5)


def test_a_free_lock_is_taken_at_once(tmp_path):
    lock = volume_lock.acquire(tmp_path / "a" / "b.lock", "x")
    assert lock.is_locked
    lock.release()


def test_a_filesystem_without_flock_is_a_readable_error(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(volume_lock.LockError, match=r"does not support file locks \(flock\).*VOLUME_ROOT"):
        volume_lock.acquire(tmp_path / "x.lock", "x")
