"""volume_lock.acquire: a wait that is said, bounded, ended by the stop event, and a clear error naming
the real cause (read-only, full, not permitted, or a filesystem without flock). The holder is another
real process; the read-only and full filesystems are real tmpfs mounts in a private mount namespace."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import subprocess
import sys
import threading
import time

import pytest
from support import mounts

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


ACQUIRE = (
    "import sys; from pathlib import Path; from comfy_worker import volume_lock\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        volume_lock.acquire(Path(p), 'x').release(); print('locked', p)\n"
    "    except volume_lock.LockError as err:\n"
    "        print(err)\n"
)

needs_mount = pytest.mark.skipif(mounts.mount_unavailable() is not None, reason=str(mounts.mount_unavailable()))


@needs_mount
def test_a_read_only_volume_is_reported_as_read_only_not_as_missing_flock(tmp_path):
    """issue 20 #11: a real read-only tmpfs (its own mount namespace): the lock file in an existing folder
    and in one still to create both say read-only and how to fix it, never flock."""
    ro = tmp_path / "ro"
    r = mounts.in_private_mount(ro, "ro", ACQUIRE, str(ro / "x.lock"), str(ro / "locks" / "x.lock"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    for line in lines:
        assert f"the filesystem at {ro} is mounted read-only" in line, line
        assert "mount the volume writable" in line and "VOLUME_ROOT" in line, line
        assert "flock" not in line, line


@needs_mount
def test_a_full_volume_is_reported_as_full_not_as_missing_flock(tmp_path):
    """issue 20 #11: a real tmpfs without a free inode: ENOSPC says no space, with df to look."""
    full = tmp_path / "full"
    r = mounts.in_private_mount(full, "nr_inodes=1,size=64k", ACQUIRE, str(full / "x.lock"))
    assert r.returncode == 0, r.stderr
    assert f"no space left on the filesystem at {full}" in r.stdout, r.stdout
    assert f"df -h {full}" in r.stdout and "flock" not in r.stdout, r.stdout


def test_a_folder_the_user_cannot_write_is_reported_as_permission_not_as_missing_flock(tmp_path):
    """issue 20 #11: a real folder without write permission (root runs without its override
    capabilities): EACCES names the user and the folder to make writable."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = mounts.without_write_permission(ACQUIRE, str(locked / "x.lock"), str(locked / "sub" / "x.lock"))
    finally:
        locked.chmod(0o755)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    for line in lines:
        assert f"permission denied for user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})" in line, line
        assert f"make {locked} writable" in line and "writable for that user" in line, line
        assert "flock" not in line, line
