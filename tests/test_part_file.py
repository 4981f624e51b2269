"""part_file: the parallel download's writes, direct where they can be, in order per connection."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from comfy_worker import part_file
from comfy_worker.part_file import ALIGN, BlockWriter, PartFile, aligned_buffer, skewed

MiB = 1 << 20


def blocks_of(data: bytes, cuts: list[int]):
    """``data`` cut at ``cuts``, each piece in a pooled-style buffer placed for its offset."""
    edges = [0, *cuts, len(data)]
    for start, end in zip(edges, edges[1:], strict=False):
        view = skewed(aligned_buffer(end - start), start, end - start)
        view[:] = data[start:end]
        yield start, view


def test_blocks_at_any_offset_land_exactly_and_their_aligned_middles_go_direct(tmp_path):
    """Blocks that start and end off a page (a request resumed mid-chunk, a connection cut short)
    are written whole: the page-aligned middle directly, the head and tail through the page cache."""
    data = random.Random(1).randbytes(3 * MiB + 123)
    cuts = [1, 4095, 4096, 700_001, MiB, 2 * MiB + 17, 3 * MiB]
    path = tmp_path / "x.part"
    f = PartFile(path)
    try:
        assert f.direct, "the test machine's /tmp should take O_DIRECT (ext4, xfs, tmpfs >= 6.6)"
        for start, view in reversed(list(blocks_of(data, cuts))):  # any order, as connections finish
            f.write(view, start)
        os.fsync(f.fd)
    finally:
        f.close()
    assert path.read_bytes() == data
    assert 2 * MiB < f.direct_bytes < len(data)  # the middles; never the unaligned ends


def test_a_block_not_placed_for_its_offset_or_not_meant_to_be_direct_goes_through_the_page_cache(tmp_path):
    data = random.Random(2).randbytes(MiB)
    path = tmp_path / "x.part"
    f = PartFile(path)
    try:
        f.write(memoryview(bytearray(data[:4096])), 8192 + 100)  # a bytearray: any address
        (start, view), *_ = blocks_of(data, [])
        f.write(view, 16 * 4096, direct=False)
    finally:
        f.close()
    assert f.direct_bytes == 0
    assert path.read_bytes()[8192 + 100 : 8192 + 100 + 4096] == data[:4096]
    assert path.read_bytes()[16 * 4096 :] == data


def test_a_file_system_without_direct_io_gets_plain_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(part_file.os, "open", no_direct)
    data = random.Random(3).randbytes(2 * MiB)
    path = tmp_path / "x.part"
    f = PartFile(path)
    try:
        assert not f.direct
        for start, view in blocks_of(data, [MiB]):
            f.write(view, start)
    finally:
        f.close()
    assert path.read_bytes() == data and f.direct_bytes == 0


def test_a_refused_direct_write_is_done_through_the_page_cache_and_direct_io_ends(tmp_path, monkeypatch):
    """Some network and FUSE file systems open with O_DIRECT but refuse the writes (EINVAL): the
    refused bytes and all later ones go through the page cache."""
    path = tmp_path / "x.part"
    f = PartFile(path)
    real_pwrite = os.pwrite
    direct_fd = f.dfd

    def refusing(fd, data, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(part_file.os, "pwrite", refusing)
    data = random.Random(4).randbytes(2 * MiB + 5)
    try:
        for start, view in blocks_of(data, [MiB]):
            f.write(view, start)
        assert not f.direct
    finally:
        f.close()
    assert path.read_bytes() == data and f.direct_bytes == 0


def test_another_write_error_is_raised(tmp_path, monkeypatch):
    path = tmp_path / "x.part"
    f = PartFile(path)
    monkeypatch.setattr(part_file.os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    try:
        (start, view), *_ = blocks_of(b"x" * MiB, [])
        with pytest.raises(OSError, match="No space"):
            f.write(view, start)
    finally:
        f.close()


def test_the_writer_keeps_the_order_and_drain_waits_for_every_block():
    written: list[int] = []

    def slow_write(pos, block):
        time.sleep(0.01)
        written.append(pos)

    writer = BlockWriter(slow_write, lambda block: None)
    for pos in range(10):
        writer.put(pos, memoryview(b"x"))
    writer.drain()
    assert written == list(range(10))
    writer.close()


def test_a_write_error_reaches_the_connection_and_the_blocks_after_it_are_dropped():
    dropped: list[int] = []
    failing = threading.Event()

    def write(pos, block):
        if pos == 2:
            failing.set()
            raise OSError(errno.ENOSPC, "No space left on device")

    writer = BlockWriter(write, lambda block: dropped.append(block[0]))
    for pos in range(4):
        writer.put(pos, memoryview(bytes([pos])))
    with pytest.raises(OSError, match="No space"):
        writer.drain()
    assert dropped == [2, 3]
    with pytest.raises(OSError, match="No space"):
        writer.put(4, memoryview(bytes([4])))
    assert dropped == [2, 3, 4]
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert not writer.thread.is_alive()


def test_aligned_buffers_put_each_byte_where_its_file_offset_is_aligned():
    whole = aligned_buffer(MiB)
    for pos in (0, 1, 4095, 4096, 123_457):
        view = skewed(whole, pos, MiB)
        assert len(view) == MiB
        assert (part_file._address(view) - pos) % ALIGN == 0
