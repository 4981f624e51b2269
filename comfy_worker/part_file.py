"""The bytes of a parallel download's ``.part`` file: written with direct I/O where they can be, by a
writer thread per connection.

Why direct I/O. Measured on these machines (ext4 on a virtual disk, 2 cores), 2 GiB written through
the page cache cost 2.2-5 s of kernel CPU (page allocation, dirty accounting, writeback), and the
fsync a verified download ends with has to get it all to the disk anyway; with ``O_DIRECT`` the same
2 GiB cost 0.1 s of CPU and 1.0-1.3 s of waiting for the disk. A loopback download on 2 cores is
CPU-bound (the server, the receiving and the sha256 share them): in one process, 2 GiB verified
went from 2.16-2.19 s to 1.9-2.1 s. The waiting is done by a writer thread per connection
(``BlockWriter``), so the connection goes on receiving meanwhile. Bytes written directly are not in
the page cache afterwards, so the caller writes directly only what it does not read back (the
hasher got those blocks from memory; see ``http_download._ParallelFetch._write``).

How (``PartFile``):

- The part is opened twice: plain, and with ``O_DIRECT``. Direct I/O needs the file offset, the
  length and the memory address aligned to the device's block (``ALIGN``, 4 KiB). A block received at
  file offset ``pos`` is read into its buffer at ``pos % ALIGN`` (``aligned_buffer``, ``skewed``), so
  the block's page-aligned middle is aligned in memory too and goes out in one direct ``pwrite``; the
  unaligned head and tail (under a page each, only where a request starts or ends off a page) go
  through the plain descriptor. The two never share a page, and the kernel writes out and drops its
  cached pages of a range around a direct write of it, so a later read of the part sees the disk.
- A file system without ``O_DIRECT`` (the open fails), or one refusing a direct write (``EINVAL``: a
  bigger block size, some network and FUSE file systems), gets plain writes, for the rest of the file.

``BlockWriter`` keeps one connection's blocks in order (its queue is FIFO, one thread), so what a
connection wrote of a chunk is always a prefix of it; ``drain`` waits for the blocks given so far (a
retry asks the server from where the writes, not the reads, stand), and an error of a write (a full
disk) is raised in the connection's thread at its next ``put``, ``drain`` or ``close``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ALIGN = 4096  # offsets, lengths and addresses of direct I/O are multiples of this
WRITE_PIECE = 64 * 1024
WRITER_DEPTH = 4  # blocks one connection may have waiting for its writer


def aligned_buffer(size: int) -> memoryview:
    """A page-aligned buffer of ``size`` bytes plus ``ALIGN`` of room for ``skewed`` (anonymous mmap)."""
    return memoryview(mmap.mmap(-1, size + ALIGN))


def skewed(whole: memoryview, pos: int, size: int) -> memoryview:
    """``size`` bytes of ``whole`` starting at ``pos % ALIGN``: bytes read into it for file offset
    ``pos`` sit at addresses that are aligned exactly where their file offsets are."""
    skew = pos % ALIGN
    return whole[skew : skew + size]


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``, in WRITE_PIECE slices: the kernel's dirty-page
    throttling punishes big single writes (measured here: 2 GiB in 1 MiB writes took up to 3x longer
    than in 64 KiB writes right after another program had written a large file)."""
    end = len(data)
    done = 0
    while done < end:
        done += os.pwrite(fd, data[done : min(end, done + WRITE_PIECE)], offset + done)


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes at ``offset`` to the disk now, without waiting
    for it (sync_file_range(2) with SYNC_FILE_RANGE_WRITE, where there is one). Done as a download
    goes, it leaves the final fsync little to wait for: otherwise a 2 GiB file written through the
    page cache is still all there when the transfer ends, and the fsync writes it all out then
    (about 2 s here)."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class PartFile:
    """A part opened for writing blocks at their offsets; see the module docstring. ``fd`` is the
    plain descriptor (for fallocate, the hasher's map, fsync, writeback)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.dfd: int | None = None
        if hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError as err:
                log.debug("%s: no direct I/O here (%s); writing through the page cache", path.name, err)
        self.direct_bytes = 0  # bytes written with direct I/O (the rest went through the page cache)

    @property
    def direct(self) -> bool:
        return self.dfd is not None

    def write(self, data: memoryview, pos: int, direct: bool = True) -> None:
        """Write ``data`` at file offset ``pos``: with ``direct``, its aligned middle directly when
        ``data`` sits in memory as ``skewed`` puts it; the rest (or all of it) through the page cache."""
        end = pos + len(data)
        first = -(-pos // ALIGN) * ALIGN
        last = end // ALIGN * ALIGN
        dfd = self.dfd
        if not direct or dfd is None or last <= first or _address(data) % ALIGN != pos % ALIGN:
            write_at(self.fd, data, pos)
            return
        if first > pos:
            write_at(self.fd, data[: first - pos], pos)
        middle = data[first - pos : last - pos]
        done = 0
        try:
            while done < len(middle):
                done += os.pwrite(dfd, middle[done:], first + done)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            log.debug("%s: a direct write was refused (%s); writing through the page cache", self.path.name, err)
            self._stop_direct()
            write_at(self.fd, middle[done:], first + done)
        self.direct_bytes += done
        if end > last:
            write_at(self.fd, data[last - pos :], last)

    def _stop_direct(self) -> None:
        dfd, self.dfd = self.dfd, None
        if dfd is not None:
            os.close(dfd)

    def close(self) -> None:
        self._stop_direct()
        os.close(self.fd)


def _address(view: memoryview) -> int:
    """Where ``view``'s first byte is in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else -1


class BlockWriter:
    """Hands one connection's blocks to ``write(pos, block)`` on a thread of its own, in the order
    given; ``write`` takes over the block. A block not written (after an error, or when ``write``
    raised) goes to ``dropped(block)``. The thread starts at its creator's CPU priority."""

    def __init__(self, write: Callable[[int, memoryview], None], dropped: Callable[[memoryview], None]):
        self.write, self.dropped = write, dropped
        self.blocks: queue.Queue = queue.Queue(maxsize=WRITER_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="dl-write")
        self.thread.start()

    def put(self, pos: int, block: memoryview) -> None:
        """Queue ``block`` for ``pos`` (waits while WRITER_DEPTH blocks are queued); raises an earlier
        write's error instead, the block going to ``dropped``."""
        if self.error is not None:
            self.dropped(block)
            raise self.error
        self.blocks.put((pos, block))

    def drain(self) -> None:
        """Wait until every block given so far is written (or dropped); raise a write's error."""
        self.blocks.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, end the thread, raise a write's error."""
        self.blocks.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.blocks.get()) is not None:
            pos, block = item
            try:
                if self.error is not None:
                    self.dropped(block)
                    continue
                try:
                    self.write(pos, block)
                except BaseException as err:  # noqa: BLE001 - raised in the connection's thread
                    self.error = err
                    self.dropped(block)
            finally:
                self.blocks.task_done()
        self.blocks.task_done()
