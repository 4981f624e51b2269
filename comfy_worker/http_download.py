"""Resumable, verified HTTP(S) downloads into a ``.part`` file, with several connections per big file.

The caller owns the target name, the lock and the final rename; this module only turns a URL into a
complete, verified ``<target>.part`` (see ``Downloader.fetch``).

How the pieces fit:

- Tokens: every request, including each hop of a redirect, gets its headers from ``headers_for(url)``.
  Redirects are followed by hand, so a token meant for one host is never carried to the next one (a
  CivitAI download redirects to a CDN; the CDN never sees ``Authorization``).
- Probe: one ``GET`` with ``Range: bytes=0-0`` (works with pre-signed CDN URLs, unlike ``HEAD``) gives the
  final URL, the size (``Content-Range``), whether ranges work (206), the validator (ETag /
  Last-Modified) and the file name (Content-Disposition).
- Connections are kept open: a body read to its end hands its connection back to the thread's session
  at once (``iter_body``), the probe's one byte is read for the same reason, and a connection thread
  of a parallel download gives its session to the next thread that needs one (the next file's
  workers), so a config of many files from one hub pays a TCP (and TLS) handshake per connection, not
  one per range request or per file.
- Single connection (small files, or a server that does not do ranges): bytes are hashed in memory as
  they arrive and appended to the part. A resume sends ``Range`` + ``If-Range``; a ``200`` answer means
  the server ignored the range (or the file changed), so the part is truncated and the hash restarted.
- Several connections (big files on a server that does ranges): the file is counted in chunks of
  1 MiB (more for files over 4 GiB: at most ``STATE_UNITS`` of them), handed out in order to worker
  threads, one per connection, as runs of consecutive chunks fetched with one range request each: as
  much as a connection receives in ``REQUEST_TIME``, at most ``REQUEST_SIZE``, shorter as the end
  nears, so the connections finish together; once the download settled at one connection, up to
  ``LONE_REQUEST_SIZE`` (fewer round trips). Each worker hands the blocks it receives to a writer
  thread of its own (``part_file.BlockWriter``), which writes them at their offset, with direct I/O
  where the hasher gets the block from memory (``part_file``: the page cache costs more CPU than
  anything else here), and records per chunk how many bytes from the chunk's start are on disk.
  How many connections (``_Ramp``): a download starts with ``start_connections`` (4) and, once they
  all receive, measures the aggregate rate and opens four times as many (``_Ramp.FIRST_STEP``: most
  servers cap each connection, so a bigger first step gets there sooner); when each connection then
  still gets nearly its rate from before the step (a server that caps each connection, as CDNs do)
  it goes straight to ``connections`` (DOWNLOAD_CONNECTIONS), otherwise it doubles while that raises
  the rate by a quarter. A step that did not (measured twice) is undone: back to the count before
  it, and growth ends. When receiving kept ``CPU_BOUND`` of the cores busy and the machine had no
  CPU to spare (or receiving alone kept ``ALONE_FULL`` of the cores busy), the CPU, not the link, is
  the limit (loopback): growth ends at once, and when that is the first measurement the download
  goes down to one connection, the cheapest in CPU (all its blocks are hashed as they arrive, see
  below). Workers above a lowered target end after their current request.
  A server that answers 429/503 to a range request while other connections are running gets one
  connection fewer: that worker gives its run back and ends, and the download never grows again
  (the last connection retries with backoff, as a single one does).
  Hashing during the transfer, in file order: a hasher thread feeds sha256 from two sources. A block
  that starts exactly at the hash frontier (the end of all bytes handed to the hasher so far) as it
  arrives, or once written, is queued for it as it is, a buffer from a pool shared with the workers
  (no copy, no read back; as it arrives, while still in the CPU's cache), and returned to the pool
  once hashed and written; the connection at the frontier waits when that queue holds
  ``HANDOFF_DEPTH`` blocks, like the single connection's reader. A block ahead of the frontier (the
  runs of the other connections) is kept for the hasher too while the blocks kept stay within
  ``HOLD_BYTES`` and the download runs at most ``HOLD_CONNECTIONS`` connections (where the CPU, not
  the link, is the limit), and taken when the frontier reaches it. Any other block goes through the
  page cache and back to the pool at once: when no block is waiting and the part's contiguous
  prefix on disk (including the written part of the chunk at the front) reaches past the frontier,
  the hasher claims that stretch (up to the next kept block) and reads it through a read-only
  ``mmap`` of the part, i.e. from the page cache (blocks beyond what may be kept, a resumed
  prefix). Because runs are handed out in order, the completed region grows from the front, so
  hashing runs during the download on another core instead of as a second pass afterwards; settled
  at one connection, every byte is hashed from the blocks as they arrive. The connection threads
  run at a lower CPU priority than the hasher (``_yield_cpu_to_hasher``), so on a busy machine it
  is not starved behind them; their writer threads start at that priority too (on loopback, a
  2 GiB download took 0.1-0.2 s longer with the writers at normal priority, and as much with them
  at nice 19). The hasher also has the kernel start writing each hashed stretch that went through
  the page cache to the disk (``start_writeback``), so the fsync before ``fetch`` returns has little
  left to write (the single-connection path does the same as it appends).
  Progress per chunk is saved in ``<part>.state`` every half second, so a killed process resumes
  where each chunk stopped. Its format, JSON: ``{"url": the URL without its query, "size": total
  bytes, "chunk": bytes per chunk, "validator": ETag or Last-Modified, "done": [bytes on disk from
  the start of each chunk, one per chunk]}``. Versions before issue 25 wrote 8-32 MiB chunks; such a
  part is resumed in its own chunk size. sha256 state cannot be saved, so after a restart the hasher
  re-reads the already-downloaded prefix while the rest downloads: a resumed file is still verified
  whole.
- Which file a part belongs to: ``<part>.source`` (JSON) records, before the first byte is written,
  the source (the URL the caller names the file by, e.g. the config entry: not a signed CDN link,
  which changes every time), the server's validator (ETag, else Last-Modified) and the total size.
  A part is resumed only when all three match the current probe; otherwise it is deleted and the
  download starts over (see ``_claim_part``).
- Ranges are checked: a ``206`` whose ``Content-Range`` starts elsewhere than asked, or a ``200`` (the
  whole file) to a chunk request (replicas behind a load balancer whose ETags differ, so ``If-Range``
  fails on some), is treated like a server that ignores ranges (start over on one connection, never
  ask it for a range again); one
  whose total differs from the probed size means the file changed on the server: the part is
  deleted and the download fails (the next run starts afresh).
- Retries: 429, 5xx and network errors are retried with exponential backoff; the counter resets
  whenever bytes arrive, so a flaky but progressing server is not given up on quickly, while a dead
  one fails after ``retries`` attempts. A server that keeps dropping the connection after a few
  bytes is given ``4 * retries`` attempts in all (the part is kept, so a later run resumes it).
  The backoff sleep ends at once when the stop event is set.
- Stopping: when the stop event is set, the socket of every response whose body is being read is shut
  down (``_cut_on_stop``, a watcher thread polling every 50 ms while bodies are in flight), so a read
  blocked on a slow or silent server returns at once: ``readinto`` fills a whole 1 MiB buffer before it
  returns, which at 64 KiB/s is 16 s. The bytes that did arrive are still written (the part stays a
  valid prefix, each chunk's count in ``.state`` exact), and any failure once the event is set ends the
  download with ``Interrupted`` instead of a retry. Fast downloads keep their 1 MiB reads untouched: a
  read that returns as soon as a few bytes arrive (``readinto1``) measured the same throughput on
  loopback but 2.5x as many blocks to write, hash and count, and would still wait out a silent server.
  The wait for a response's status line and headers is cut the same way (``_cuttable``: the
  connections of the downloader's sessions register their socket while ``getresponse`` waits), so a
  server that accepted a request but does not answer holds a stop for no longer than the poll; only
  the connect itself is bounded by its 10 s timeout.
- Signed links: a link that the CDN refuses (401/403/410) on another host than the URL asked for is
  renewed by asking that URL again (Hugging Face's resolve URL, CivitAI's download, any redirecting
  site), as often as it helps: the download gives up after ``retries`` renewals in a row without a byte
  of progress. A signed link carries a credential in its query string, so every error text of this
  module goes through ``log_setup.redact_urls`` (also a library's own text, e.g. requests quoting
  ``/path?query``).
- Verification: size always (against the server's size and ``expected_size``), sha256 when expected;
  a mismatch deletes the part and its records and raises ``ChecksumError``. A verified part is fsynced
  before ``fetch`` returns, so the caller can rename and record it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import http.client
import itertools
import json
import logging
import mmap
import os
import queue
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
import urllib3
from requests.adapters import HTTPAdapter

from comfy_worker.file_names import content_disposition_name, safe_filename
from comfy_worker.log_setup import redact_urls
from comfy_worker.part_file import BlockWriter, PartFile, aligned_buffer, skewed, start_writeback, write_at

log = logging.getLogger(__name__)

MiB = 1 << 20
READ_SIZE = 1 * MiB
HASH_READ = 4 * MiB
HASH_SPAN = 8 * MiB  # the most the parallel hasher hashes from the part in one call (see _hasher)
HANDOFF_DEPTH = 8  # the most received blocks waiting for the parallel hasher (see _ParallelFetch._hand_over)
HOLD_BYTES = 64 * MiB  # the most bytes of blocks ahead of the hash frontier kept for the hasher ...
HOLD_CONNECTIONS = 4  # ... while the download runs at most this many connections (see _write)
WRITEBACK = 32 * MiB  # bytes between two start_writeback calls
REQUEST_SIZE = 16 * MiB  # the most one range request of a parallel download asks for ...
REQUEST_TIME = 0.25  # ... and no more than a connection receives in this many seconds (4 MiB until measured)
LONE_REQUEST_SIZE = 256 * MiB  # what one request asks for once the download settled at one connection
STATE_UNITS = 4096  # the most chunks a parallel download counts its progress in (the .state's "done")
REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "comfy-worker-downloader/1"
NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class DownloadError(Exception):
    """A download that cannot succeed (or gave up after retries); the message says why."""


class HttpStatusError(DownloadError):
    def __init__(self, status: int, url: str, message: str):
        self.status = status
        self.url = url
        super().__init__(message)


class ChecksumError(DownloadError):
    pass


class Interrupted(DownloadError):
    """The stop event was set: the download ended on purpose, its part (and records) kept for a resume."""


class SourceChanged(DownloadError):
    """The file on the server is not the one the download started with; the part is worthless."""


class _RangeMismatch(DownloadError):
    """A 206 answer for another range than the one asked for, or a 200 (the whole file) to a chunk
    request: this server cannot be trusted with ranges."""


class RetryableError(Exception):
    """A failure worth another attempt (429, 5xx, network); ``status``: the HTTP status, if any."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        self.retry_after = retry_after
        self.status = status
        super().__init__(message)


class _Shed(Exception):
    """A parallel download's connection that steps back after the server pushed back (429/503)."""


@dataclass
class Probe:
    url: str  # where the bytes are (after redirects)
    status: int
    size: int | None
    ranges: bool
    filename: str | None  # the server's name (Content-Disposition), made safe; None when none is usable
    validator: str | None
    content_type: str | None
    offered_name: str | None = None  # that name as the server sent it, to say what was changed


@dataclass
class Result:
    size: int
    sha256: str
    fetched: int  # bytes received over the network by this call
    resumed_from: int  # bytes already in the part when this call started
    connections: int  # the most connections that were running at once


def same_host(a: str, b: str) -> bool:
    """True when two URLs point at the same host and port (scheme default ports filled in)."""
    pa, pb = urlparse(a), urlparse(b)

    def key(p):
        port = p.port or {"http": 80, "https": 443}.get(p.scheme)
        return ((p.hostname or "").lower(), port)

    return key(pa) == key(pb)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """``(start, total)`` from ``Content-Range: bytes START-END/TOTAL`` (None where absent or ``*``)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", resp.headers.get("Content-Range", ""), re.IGNORECASE)
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _check_range(resp: requests.Response, start: int, size: int | None) -> None:
    """A 206 must hold the bytes asked for, of the file that was probed."""
    got, total = content_range(resp)
    host = urlparse(resp.final_url).netloc  # type: ignore[attr-defined]
    if size is not None and total is not None and total != size:
        raise SourceChanged(
            f"the file changed on the server during the download ({host} now has {total} bytes, "
            f"it had {size}); the partial file was deleted, run again to download the new version"
        )
    if got != start:
        raise _RangeMismatch(f"{host} answered a request for bytes from {start} with bytes from {got}")


class _OneBuffer:
    def __init__(self):
        self.view = memoryview(bytearray(READ_SIZE))

    def take(self, pos: int = 0) -> memoryview:
        return self.view

    def put_back(self, view: memoryview) -> None:
        pass


def _whole(view: memoryview) -> memoryview:
    """The whole buffer that ``view`` (a block sliced from it) came from."""
    return view.obj if isinstance(view.obj, memoryview) else memoryview(view.obj)


class _BufferPool:
    """READ_SIZE buffers shared by the connections of a parallel download, their writers and the
    hasher: a worker takes one per read; the block goes back once written, or once written and hashed
    when it was handed to the hasher as it arrived (``share``: two owners, each gives it back). A
    buffer is made when none is free, so there are never more than the most held at once (a few per
    connection, plus the hasher's HANDOFF_DEPTH, the blocks kept for it and the one it is hashing)."""

    def __init__(self):
        self.free: list[memoryview] = []  # list.append and list.pop are atomic: no lock needed
        self.owners: dict[int, int] = {}  # id of a shared buffer's memory: owners left (2 or 1)
        self.lock = threading.Lock()

    def share(self, view: memoryview) -> None:
        """``view``'s buffer has two owners now: it goes back to the pool after both gave it back."""
        with self.lock:
            self.owners[id(view.obj)] = 2

    def take(self, pos: int = 0) -> memoryview:
        """A buffer for the bytes from file offset ``pos`` on, placed so that direct I/O can write them
        (``part_file.skewed``)."""
        try:
            whole = self.free.pop()
        except IndexError:
            whole = aligned_buffer(READ_SIZE)
        return skewed(whole, pos, READ_SIZE)

    def put_back(self, view: memoryview) -> None:
        with self.lock:
            left = self.owners.pop(id(view.obj), 1) - 1
            if left:
                self.owners[id(view.obj)] = left
                return
        self.free.append(_whole(view))


def _socket_of(resp: requests.Response) -> socket.socket | None:
    """The socket the body of ``resp`` is read from: the one under http.client's reader (the connection
    object lets go of it when the server says ``Connection: close``), else urllib3's connection's."""
    fp = getattr(getattr(getattr(resp.raw, "_fp", None), "fp", None), "raw", None)  # SocketIO
    for sock in (getattr(fp, "_sock", None), getattr(getattr(resp.raw, "connection", None), "sock", None)):
        if isinstance(sock, socket.socket):
            return sock
    return None


class _SocketCutter:
    """Shuts down the socket of each registered response once its stop event is set, so a thread
    blocked reading it wakes up at once (the read returns what arrived, then end of stream). One
    thread, polling every ``POLL`` seconds, alive only while some response is registered."""

    POLL = 0.05

    def __init__(self):
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[socket.socket, threading.Event]] = {}
        self.thread: threading.Thread | None = None
        self.next_key = 0

    def add(self, sock: socket.socket, stop: threading.Event) -> int:
        with self.lock:
            key = self.next_key
            self.next_key += 1
            self.inflight[key] = (sock, stop)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name="dl-cutter")
                self.thread.start()
        return key

    def remove(self, key: int) -> None:
        with self.lock:
            self.inflight.pop(key, None)

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.inflight:
                    self.thread = None
                    return
                for key in [k for k, (_, stop) in self.inflight.items() if stop.is_set()]:
                    sock, _ = self.inflight.pop(key)
                    # the plain socket's shutdown: an SSLSocket's own would drop its state under the reader
                    with suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
            time.sleep(self.POLL)


_CUTTER = _SocketCutter()


@contextmanager
def _cut_on_stop(resp: requests.Response, stop: threading.Event) -> Iterator[None]:
    """While the body of ``resp`` is read: its socket is shut down as soon as ``stop`` is set."""
    sock = _socket_of(resp)
    if sock is None:
        yield
        return
    key = _CUTTER.add(sock, stop)
    try:
        yield
    finally:
        _CUTTER.remove(key)


_WAITING = threading.local()  # ``stop``: the stop event of the request this thread is waiting on


def _cuttable(connection_cls):
    """``connection_cls`` whose wait for a response's status line and headers is cut like a body read:
    its socket is shut down as soon as the stop event of the request (``_WAITING.stop``) is set. A
    server that takes its time to answer (or never does) no longer holds a stop for the read timeout."""

    class Cuttable(connection_cls):
        def getresponse(self, *args, **kwargs):
            stop = getattr(_WAITING, "stop", None)
            sock = getattr(self, "sock", None)
            key = _CUTTER.add(sock, stop) if stop is not None and isinstance(sock, socket.socket) else None
            try:
                return super().getresponse(*args, **kwargs)
            finally:
                if key is not None:
                    _CUTTER.remove(key)

    return Cuttable


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _cuttable(urllib3.connection.HTTPConnection)


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _cuttable(urllib3.connection.HTTPSConnection)


class _CuttableAdapter(HTTPAdapter):
    """requests' adapter whose connections' header waits end on a stop (``_cuttable``)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def iter_body(resp: requests.Response, buffers=None, pos: int = 0):
    """The response body as memoryviews of buffers from ``buffers`` (``take(pos)``/``put_back()``,
    ``pos`` the file offset the block is for; default: one reused buffer, so consume each block before
    the next). Reads with ``readinto`` on the underlying http.client response: no copies, and a
    connection that drops midway still hands over every byte that arrived (urllib3's ``read(amt)``
    would discard the partial block)."""
    buffers = buffers or _OneBuffer()
    fp = getattr(resp.raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or resp.headers.get("Content-Encoding", "identity") != "identity":
        for data in resp.iter_content(READ_SIZE):
            view = buffers.take(pos)
            view[: len(data)] = data
            pos += len(data)
            yield view[: len(data)]
        return
    while True:
        view = buffers.take(pos)
        try:
            n = fp.readinto(view)
        except BaseException:
            buffers.put_back(view)
            raise
        if not n:
            buffers.put_back(view)
            break
        pos += n
        if fp.length == 0:  # the last byte: back to the pool before the caller stops reading
            _release(resp)
            yield view[:n]
            return
        yield view[:n]
    if fp.length in (None, 0):
        _release(resp)


SMALL_BODY = 64 * 1024  # the most bytes read from an answer nobody needs, to keep its connection open


def _read_small_body(resp: requests.Response, stop: threading.Event) -> None:
    """Read the body of an answer whose bytes are not needed (the probe's: one byte, or a small file
    from a server that ignores ranges) when it says it has at most SMALL_BODY bytes, so its connection
    serves the next request instead of being closed with bytes unread; a longer or unsized body is left
    unread (the connection closes)."""
    length = resp.headers.get("Content-Length", "")
    if not length.isdigit() or int(length) > SMALL_BODY:
        return
    with suppress(*NETWORK_ERRORS, OSError), _cut_on_stop(resp, stop):
        resp.content  # noqa: B018 - read to its end, the response then hands the connection back


def _release(resp: requests.Response) -> None:
    """A response whose body was read to its end: its connection goes back to the pool for the next
    request (closing the response would close the connection: a new TCP connection and, for HTTPS, a
    new TLS handshake per range request)."""
    resp._content_consumed = True
    resp.raw.release_conn()


class _HashPipe:
    """sha256 on its own thread for a sequential download: the reader fills a free buffer, writes it,
    and hands it over; the hasher returns it when done. Hashing overlaps receiving and writing (two
    cores) without copying the bytes."""

    def __init__(self, depth: int = 6):
        self.digest = hashlib.sha256()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.full: queue.Queue = queue.Queue()
        for _ in range(depth):
            self.free.put(memoryview(bytearray(READ_SIZE)))
        self.thread = threading.Thread(target=self._run, daemon=True, name="dl-hash")
        self.thread.start()

    def take(self, pos: int = 0) -> memoryview:
        return self.free.get()

    def put_back(self, view: memoryview) -> None:
        self.free.put(_whole(view))

    def feed(self, block: memoryview) -> None:
        self.full.put(block)

    def _run(self) -> None:
        while (block := self.full.get()) is not None:
            self.digest.update(block)
            self.put_back(block)
            self.full.task_done()
        self.full.task_done()

    def hexdigest(self) -> str:
        self.full.join()
        return self.digest.hexdigest()

    def reset(self) -> None:
        self.full.join()
        self.digest = hashlib.sha256()

    def close(self) -> None:
        self.full.put(None)
        self.thread.join()


def _describe(status: int, url: str) -> str:
    host = urlparse(url).netloc
    if status in (401, 403):
        return f"HTTP {status} from {host}: access denied; the file may need a token (HF_TOKEN / CIVITAI_TOKEN)"
    if status == 404:
        return f"HTTP 404 from {host}: not found; check the url"
    return f"HTTP {status} from {host}"


class Downloader:
    """Downloads URLs into ``.part`` files. Thread-safe: one instance can serve many entries at once."""

    def __init__(
        self,
        headers_for: Callable[[str], dict[str, str]] | None = None,
        connections: int = 32,
        parallel_min_size: int = 64 * MiB,
        chunk_size: int | None = None,
        retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 30.0,
        stop: threading.Event | None = None,
        start_connections: int = 4,
    ):
        """``connections``: the most ranged connections one big file gets; a download starts with
        ``start_connections`` and adds more while that makes it faster (see ``_Ramp``). ``stop``: when
        set, waits between retries end at once (the default for calls given none)."""
        self.stop = stop or threading.Event()
        self.headers_for = headers_for or (lambda url: {})
        self.connections = max(1, connections)
        self.start_connections = max(1, start_connections)
        self.parallel_min_size = parallel_min_size
        self.chunk_size = chunk_size
        self.retries = max(1, retries)
        self.backoff = backoff
        self.timeout = timeout
        self._local = threading.local()
        self._idle_sessions: list[requests.Session] = []  # given back by threads that ended (give_back_session)

    # ---- HTTP plumbing ----

    def session(self) -> requests.Session:
        """The calling thread's session: one given back by a thread before it (its connections kept
        open for the next file from the same host), else a new one."""
        s = getattr(self._local, "session", None)
        if s is None and self._idle_sessions:
            with suppress(IndexError):  # list.pop is atomic; another thread may have taken the last one
                s = self._local.session = self._idle_sessions.pop()
        if s is None:
            s = requests.Session()
            s.mount("http://", _CuttableAdapter())
            s.mount("https://", _CuttableAdapter())
            s.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            self._local.session = s
        return s

    def give_back_session(self) -> None:
        """The calling thread (a connection of a parallel download, about to end) is done with its
        session: the next thread that needs one takes it over, with its open connections."""
        s = getattr(self._local, "session", None)
        if s is not None:
            self._local.session = None
            self._idle_sessions.append(s)

    def open(
        self,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        stop: threading.Event | None = None,
    ) -> requests.Response:
        """Send one request, following redirects by hand with per-host headers. Returns a 2xx response
        (streaming, caller closes). Raises RetryableError / HttpStatusError. ``stop`` (default: the
        downloader's) cuts the wait for the answer's headers."""
        for _ in range(10):
            hop_headers = dict(headers or {})
            hop_headers.update(self.headers_for(url))
            _WAITING.stop = stop or self.stop
            try:
                resp = self.session().request(
                    method, url, headers=hop_headers, stream=True, allow_redirects=False, timeout=(10, self.timeout)
                )
            except NETWORK_ERRORS as err:
                raise RetryableError(f"{urlparse(url).netloc}: {type(err).__name__}: {redact_urls(str(err))}") from None
            finally:
                _WAITING.stop = None
            if resp.status_code in REDIRECTS and resp.headers.get("Location"):
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status_code < 300 or resp.status_code == 416:
                resp.final_url = url  # type: ignore[attr-defined]
                return resp
            status, retry_after = resp.status_code, _retry_after(resp)
            resp.close()
            if status == 429 or status >= 500 or status == 408:
                raise RetryableError(f"HTTP {status} from {urlparse(url).netloc}", retry_after, status)
            raise HttpStatusError(status, url, _describe(status, url))
        raise DownloadError(f"too many redirects starting at {urlparse(url).netloc}")

    def with_retries(
        self,
        what: str,
        fn: Callable[[], object],
        progress_made: Callable[[], int] | None = None,
        stop: threading.Event | None = None,
    ):
        """Call ``fn`` until it succeeds; RetryableError/network errors are retried with backoff.
        ``progress_made`` (a byte counter) resets the attempt count when it moved, up to an overall cap
        of ``4 * retries`` attempts. ``stop`` (default: the downloader's) ends a backoff wait at once."""
        stop = stop or self.stop
        attempt = total = 0
        last = progress_made() if progress_made else 0
        while True:
            try:
                return fn()
            except Exception as err:
                if stop.is_set():  # a cut connection, or any failure after the stop: never a retry
                    raise Interrupted(f"{what}: interrupted") from None
                if isinstance(err, RetryableError):
                    failure, retry_after = redact_urls(str(err)), err.retry_after
                elif isinstance(err, NETWORK_ERRORS):
                    failure, retry_after = f"{type(err).__name__}: {redact_urls(str(err))}", None
                else:
                    raise
            now = progress_made() if progress_made else 0
            if now != last:
                attempt, last = 0, now
            attempt += 1
            total += 1
            if attempt >= self.retries:
                raise DownloadError(f"{what}: gave up after {total} attempts: {failure}")
            if total >= 4 * self.retries:
                raise DownloadError(
                    f"{what}: gave up after {total} attempts (bytes kept arriving, but the connection kept "
                    f"failing before the end): {failure}"
                )
            delay = min(60.0, self.backoff * (2 ** (attempt - 1)) * (0.75 + random.random() / 2))
            if retry_after is not None:
                delay = max(delay, min(retry_after, 60.0 * max(self.backoff, 0.01)))
            log.warning("%s: %s; retry %d/%d in %.1f s", what, failure, attempt, self.retries - 1, delay)
            if stop.wait(delay):
                raise Interrupted(f"{what}: interrupted")

    def _probe_once(self, url: str, method: str, stop: threading.Event | None = None) -> Probe:
        headers = {"Range": "bytes=0-0"} if method == "GET" else {}
        resp = self.open(url, method, headers, stop)
        try:
            size = None
            cr = resp.headers.get("Content-Range", "")
            m = re.search(r"/(\d+)\s*$", cr)
            if m:
                size = int(m.group(1))
            elif resp.status_code == 200 and resp.headers.get("Content-Length", "").isdigit():
                size = int(resp.headers["Content-Length"])
            ranges = resp.status_code == 206 or (
                method == "HEAD" and resp.headers.get("Accept-Ranges", "").lower() == "bytes"
            )
            return Probe(
                url=resp.final_url,  # type: ignore[attr-defined]
                status=resp.status_code,
                size=size,
                ranges=ranges,
                filename=safe_filename(offered := content_disposition_name(resp.headers.get("Content-Disposition"))),
                offered_name=offered,
                validator=resp.headers.get("ETag") or resp.headers.get("Last-Modified"),
                content_type=resp.headers.get("Content-Type"),
            )
        finally:
            _read_small_body(resp, stop or self.stop)
            resp.close()

    def probe(self, url: str, stop: threading.Event | None = None) -> Probe:
        """Where the bytes are, how many, whether ranges work, and the server's file name."""
        return self.with_retries(f"probe {urlparse(url).netloc}", lambda: self._probe_once(url, "GET", stop), stop=stop)

    def head(self, url: str) -> Probe:
        """Like ``probe`` but with HEAD (for --dry-run); falls back to the ranged GET when HEAD is refused."""
        try:
            return self.with_retries(f"HEAD {urlparse(url).netloc}", lambda: self._probe_once(url, "HEAD"))
        except HttpStatusError as err:
            if err.status in (403, 405, 501):
                return self.probe(url)
            raise

    # ---- the download ----

    def fetch(
        self,
        url: str,
        part: Path,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        probe: Probe | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        stop: threading.Event | None = None,
        source: str | None = None,
    ) -> Result:
        """Download ``url`` into ``part`` (resuming what is there), verify it and return its size and
        sha256. ``progress(bytes_on_disk, total)`` is called as bytes land. The part is deleted when
        the content is wrong; it is kept (for a later resume) when the transfer merely failed.
        ``source`` names the file for resuming (default ``url``): pass the stable URL the user gave
        when ``url`` is a signed link that changes from run to run; a part is resumed only for the
        same source, validator and size (see ``_claim_part``)."""
        stop = stop or self.stop
        probe = probe or self.probe(url, stop)
        if probe.content_type and probe.content_type.startswith("text/html") and (probe.size or 0) < 10 * MiB:
            raise DownloadError(
                f"{urlparse(probe.url).netloc} answered with a web page instead of a file "
                "(often a login page: the file may need a token)"
            )
        size = probe.size
        if expected_size is not None and size is not None and size != expected_size:
            raise DownloadError(f"the server's file has {size} bytes but {expected_size} were expected")
        size = size if size is not None else expected_size
        report = progress or (lambda done, total: None)
        reached = [0]  # the most bytes on disk so far: a renewal that led to progress resets the count

        def progress(done: int, total: int | None) -> None:
            reached[0] = max(reached[0], done)
            report(done, total)

        part.parent.mkdir(parents=True, exist_ok=True)
        identity = {"source": source or url, "validator": probe.validator, "size": size}
        _claim_part(part, identity)
        use_parallel = probe.ranges and size is not None and size >= self.parallel_min_size and self.connections > 1
        renewals, renewed_at = 0, -1
        try:
            while True:
                try:
                    if use_parallel:
                        assert size is not None
                        result = _ParallelFetch(self, probe, part, size, progress, stop).run()
                    else:
                        result = self._fetch_single(probe, part, size, progress, stop)
                    break
                except _RangeMismatch as err:
                    if not use_parallel:
                        raise
                    log.warning("%s; downloading over one connection instead", err)
                    use_parallel = False
                    probe = replace(probe, ranges=False)
                    discard_part(part)
                    _claim_part(part, identity)
                except HttpStatusError as err:
                    # a signed CDN link (what CivitAI, the Hub and many sites redirect to) can expire
                    # mid-download, more than once for a big file: ask the original URL for a fresh
                    # one and carry on from the part, until the fresh links stop helping
                    if err.status not in (401, 403, 410) or same_host(probe.url, url):
                        raise
                    if reached[0] > renewed_at:
                        renewals, renewed_at = 0, reached[0]
                    renewals += 1
                    if renewals > self.retries:
                        raise DownloadError(
                            f"{urlparse(probe.url).netloc} kept refusing the download link (HTTP {err.status}) "
                            f"although {urlparse(url).netloc} gave a fresh one {renewals - 1} times in a row "
                            "without any progress; the partial file is kept, run again later"
                        ) from None
                    log.info(
                        "%s refused the download link (HTTP %d); asking %s for a new one",
                        *(urlparse(probe.url).netloc, err.status, urlparse(url).netloc),
                    )
                    fresh = self.probe(url, stop)
                    if fresh.size != probe.size or fresh.validator != probe.validator:
                        raise SourceChanged(
                            f"the file changed on the server during the download ({urlparse(url).netloc}); "
                            "the partial file was deleted, run again to download the new version"
                        ) from None
                    probe = replace(fresh, ranges=probe.ranges)
        except SourceChanged:
            discard_part(part)
            raise
        want = expected_size if expected_size is not None else size
        if want is not None and result.size != want:
            discard_part(part)
            raise DownloadError(f"size mismatch: got {result.size} bytes, expected {want}")
        if expected_sha256 and result.sha256 != expected_sha256.lower():
            discard_part(part)
            raise ChecksumError(
                f"sha256 mismatch: got {result.sha256}, expected {expected_sha256.lower()}; the partial file "
                "was deleted (if the file was updated upstream, update sha256 in the config)"
            )
        fsync_path(part)  # the bytes are on disk before anyone renames or records them
        state_path(part).unlink(missing_ok=True)
        source_path(part).unlink(missing_ok=True)
        return result

    def _fetch_single(self, probe: Probe, part: Path, size: int | None, progress, stop) -> Result:
        state = state_path(part)
        prefix = 0
        if part.exists():
            prefix = _contiguous_prefix(part, state) if state.exists() else part.stat().st_size
            if not probe.ranges or (size is not None and prefix > size):
                prefix = 0
        state.unlink(missing_ok=True)
        pipe = _HashPipe()
        try:
            return self._fetch_single_into(probe, part, size, progress, stop, prefix, pipe)
        finally:
            pipe.close()

    def _fetch_single_into(self, probe, part, size, progress, stop, prefix: int, pipe: _HashPipe) -> Result:
        with open(part, "a+b") as f:
            f.truncate(prefix)
            f.seek(0)
            remaining = prefix
            while remaining:
                block = f.read(min(HASH_READ, remaining))
                if not block:
                    break
                pipe.digest.update(block)
                remaining -= len(block)
        resumed_from = prefix
        conn = _Connection(pos=prefix)
        if size is not None and prefix == size:
            return Result(size, pipe.hexdigest(), 0, resumed_from, 0)

        def attempt() -> None:
            headers = {}
            if conn.pos > 0 and conn.ranges:
                headers["Range"] = f"bytes={conn.pos}-"
                if probe.validator and not probe.validator.startswith("W/"):
                    headers["If-Range"] = probe.validator
            resp = self.open(probe.url, "GET", headers, stop)
            with resp, _cut_on_stop(resp, stop), open(part, "r+b") as f:
                if resp.status_code == 416 and size is not None and conn.pos == size:
                    return
                if resp.status_code == 206:
                    try:
                        _check_range(resp, conn.pos, size)
                    except _RangeMismatch as err:
                        if "Range" not in headers:
                            raise
                        # never trust this server with a range again: the whole file, from the start
                        log.warning("%s; starting over without ranges", err)
                        conn.ranges = False
                        conn.restart(f, pipe)
                        raise RetryableError(str(err)) from None
                if conn.pos > 0 and resp.status_code == 200:
                    log.info("%s ignored the Range request; starting over", urlparse(probe.url).netloc)
                    conn.restart(f, pipe)
                elif resp.status_code not in (200, 206):
                    raise DownloadError(f"unexpected HTTP {resp.status_code} from {urlparse(probe.url).netloc}")
                fd = f.fileno()
                flushed = conn.pos
                for block in iter_body(resp, pipe):
                    n = len(block)
                    try:
                        write_at(fd, block, conn.pos)
                    except BaseException:
                        pipe.put_back(block)
                        raise
                    pipe.feed(block)
                    conn.pos += n
                    conn.fetched += n
                    if conn.pos - flushed >= WRITEBACK:
                        start_writeback(fd, flushed, conn.pos - flushed)
                        flushed = conn.pos
                    progress(conn.pos, size)
                    if stop.is_set():
                        raise Interrupted("interrupted")
            if stop.is_set() and (size is None or conn.pos < size):
                raise Interrupted("interrupted")  # a cut connection looks like the end of a body without a length
            if size is not None and conn.pos < size:
                raise RetryableError(f"connection closed at {conn.pos} of {size} bytes")

        self.with_retries(f"download {urlparse(probe.url).netloc}", attempt, lambda: conn.pos, stop)
        return Result(conn.pos, pipe.hexdigest(), conn.fetched, resumed_from, 1)


@dataclass
class _Connection:
    """Where a single-connection download stands: the next byte to write (= bytes in the part and in
    the hash), the bytes this call received, and whether the server may still be asked for a range."""

    pos: int
    fetched: int = 0
    ranges: bool = True

    def restart(self, f, pipe: _HashPipe) -> None:
        """Back to byte 0: the part emptied and the hash restarted."""
        pipe.reset()
        self.pos = 0
        f.truncate(0)


WORKER_NICENESS = 10


def _yield_cpu_to_hasher() -> None:
    """Give the calling connection thread a lower CPU priority (nice +WORKER_NICENESS for this thread
    only; Linux schedules threads one by one): on a busy machine, dozens of connection threads woken
    at once by a burst would otherwise take the hasher's share, so it fell behind the transfer and
    finished seconds after the last byte. Raising one's own niceness needs no privilege."""
    with suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS))


def _machine_cpu() -> tuple[float, float] | None:
    """The machine's CPU time so far, busy and in all (``/proc/stat``, in clock ticks); None where
    there is no such file."""
    try:
        with open("/proc/stat", "rb") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = sum(ticks[3:5])  # idle, iowait
    return float(sum(ticks) - idle), float(sum(ticks))


def _cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _allocate(fd: int, size: int) -> None:
    """Give the file its full size up front: real blocks via fallocate(2) where the file system has it
    (scattered parallel writes into a sparse file are markedly slower on ext4, and the space is then
    really reserved), else a sparse ftruncate. Not ``os.posix_fallocate``: where the file system lacks
    fallocate, glibc emulates it by writing every block, a full extra pass over a network volume."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        if fallocate(fd, 0, 0, size) == 0:
            return
        if ctypes.get_errno() == errno.ENOSPC:
            raise DownloadError(f"not enough disk space for {size} bytes")
    except (AttributeError, OSError):
        pass
    os.ftruncate(fd, size)


def state_path(part: Path) -> Path:
    return part.with_name(part.name + ".state")


def source_path(part: Path) -> Path:
    return part.with_name(part.name + ".source")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_part(part: Path) -> None:
    """Delete a part and the records kept next to it."""
    part.unlink(missing_ok=True)
    state_path(part).unlink(missing_ok=True)
    source_path(part).unlink(missing_ok=True)


def _write_json(path: Path, data: object) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename (readers never see half a file). No fsync:
    these records describe a .part whose bytes are not fsynced either."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _claim_part(part: Path, identity: dict) -> None:
    """Keep what is in ``part`` only when it was written for this very file: the same source URL,
    validator (ETag / Last-Modified) and total size as recorded in ``<part>.source`` when the part was
    started. Anything else (a part from another URL that gives the same file name, a file replaced
    upstream, a part without a record) is deleted, and the identity recorded for the new start.
    A server without any validator cannot tell two versions of a file apart: then a part is resumed
    when the source URL and the size match (a replaced file of exactly the same size would go
    unnoticed unless a sha256 is given), and never when the size is unknown too."""
    record = source_path(part)
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        recorded = None
    resumable = recorded == identity and (identity["validator"] is not None or identity["size"] is not None)
    if resumable:
        return
    if part.exists():
        log.info("%s: the partial file is from another source or version; starting over", part.name)
    discard_part(part)
    _write_json(record, identity)


def _load_state(state: Path) -> dict | None:
    try:
        data = json.loads(state.read_text())
        if isinstance(data, dict) and isinstance(data.get("done"), list):
            return data
    except (OSError, ValueError):
        pass
    return None


def _contiguous_prefix(part: Path, state: Path) -> int:
    """Bytes from the start of a parallel part that are known to be on disk."""
    data = _load_state(state)
    if not data:
        return 0
    chunk, total, pos = int(data["chunk"]), int(data["size"]), 0
    for k, done in enumerate(data["done"]):
        pos = k * chunk + int(done)
        if pos < min((k + 1) * chunk, total):
            break
    return min(pos, part.stat().st_size)


@dataclass
class _Hashing:
    """What the hasher thread of a parallel download shares with the main thread: the order to stop
    (set under the fetch's condition) and, once the whole file went through it, the sha256."""

    abort: bool = False
    sha256: str | None = None


class _Ramp:
    """How many connections a parallel download wants. It starts with ``start``; once every connection it has
    is receiving (or ``SETTLE_MOST`` passed), it measures the aggregate rate over ``WINDOW`` and steps
    up, up to ``most``. After the first measurement it multiplies by ``FIRST_STEP``. After each later
    one it compares the rate per connection with the one measured before the step: when each connection
    still gets about as much as before (``SAME``), the server caps each connection (as CDNs do) and the
    link had room for all of them, so it goes straight to ``most``; otherwise it doubles while the step raised the
    aggregate rate by ``GAIN``. Judging by the rate per connection, not by one short window's aggregate
    gain, keeps a capped server that front-loads each response (nginx sends a tenth of a second's worth
    at once) from passing for a saturated link. A step that did not pay is measured once more (a busy
    machine makes one window a rough measure); when it still does not (the link or the CPU is the limit:
    on loopback one connection is as fast as two), the target goes back to the count measured before the
    step (``measured_with``) and growth ends for good; the connections above it end after their current
    request. Growth also ends, without a second measurement, when receiving kept ``CPU_BOUND`` of the
    machine's cores busy (the process's CPU time, less what the hasher spent reading bytes back, e.g. a
    resumed prefix) and the whole machine was busy (``MACHINE_FULL``; with room to spare, the link is
    the limit; or receiving alone kept ``ALONE_FULL`` busy: time waiting for the disk counts as idle),
    at one connection when that was the first measurement: then the CPU is the limit, and a rate
    window on a busy machine is too rough a measure to tell (on loopback, one made 2 connections
    look like a gain over 1, and then like a per-connection cap). And it ends when the server pushes
    back (``hold``). While growing, requests keep the size they started with (see
    ``_ParallelFetch._run_most``), so both measurements see the same share of each response's
    front-loaded start."""

    SETTLE = 0.1  # seconds after a step before measuring, at least ...
    SETTLE_MOST = 2.0  # ... and at most, when some connection has not received a byte yet
    WINDOW = 0.2  # seconds the rate is measured over (a few 1 MiB reads per connection at 20 MB/s)
    # after the first measurement: this many times the connections (later steps double). One step of 4
    # instead of two of 2 reaches a per-connection cap a measurement sooner (a capped 512 MiB download:
    # 1.35 s instead of 1.49 s); where the link is the limit, the count goes back to the one measured.
    FIRST_STEP = 4
    GAIN = 1.25
    SAME = 0.7  # each connection still got this share of its rate before the step (and not more than
    # 1 / SAME times it: then the measurement before was the odd one, e.g. connections still starting)
    CPU_WINDOW = 0.1  # seconds the CPU use is measured over (steadier than the rate: a shorter window)
    CPU_BOUND = 0.3  # the download kept this share of the machine's cores busy ...
    MACHINE_FULL = 0.85  # ... and the whole machine was this busy: the CPU is the limit (else the link) ...
    ALONE_FULL = 0.6  # ... or the download alone kept this share busy (time spent waiting for the disk
    # counts as idle in /proc/stat, so a machine busy receiving and writing directly can look half idle)

    def __init__(self, start: int, most: int, now: float, cores: int | None = None):
        """``start`` connections, at most ``most``, on a machine with ``cores`` (default: this
        process's)."""
        self.most = max(1, most)
        self.cores = cores or _cores()
        self.target = max(1, min(start, self.most))
        self.growing = self.target < self.most
        self.rate: float | None = None  # bytes/s last measured ...
        self.measured_with = self.target  # ... with this many connections
        self.since = now  # when the current target was set
        self.mark: tuple[float, int, float] | None = None  # (time, bytes, cpu) where the measurement began
        self.misses = 0  # measurements in a row at this target that showed no gain

    def tick(
        self,
        now: float,
        fetched: int,
        receiving: int,
        cpu: float = 0.0,
        machine: tuple[float, float] | None = None,
    ) -> int:
        """The target after another look at ``fetched`` (bytes received so far), ``receiving``
        (connections that have received bytes), ``cpu`` (CPU seconds the download used so far) and
        ``machine`` (the machine's busy and total CPU time so far, ``_machine_cpu``; None: unknown)."""
        if not self.growing:
            return self.target
        if self.mark is None:
            settled = receiving >= self.target or now - self.since >= self.SETTLE_MOST
            if now - self.since >= self.SETTLE and settled:
                self.mark = (now, fetched, cpu, machine)
            return self.target
        began, at, cpu_at, machine_at = self.mark
        if now - began < self.CPU_WINDOW:
            return self.target
        rate = (fetched - at) / (now - began)
        busy = (cpu - cpu_at) / (now - began) / self.cores
        full = machine is not None and machine_at is not None and machine[1] > machine_at[1]
        full = full and (machine[0] - machine_at[0]) / (machine[1] - machine_at[1]) >= self.MACHINE_FULL
        if busy >= self.CPU_BOUND and (full or busy >= self.ALONE_FULL):  # more connections would only cost CPU
            measured = self.target
            if self.rate is None:
                self.target = 1  # the cheapest: one connection's blocks are all hashed as they arrive
            elif rate < self.rate * self.GAIN:
                self.target = self.measured_with  # the step did not pay
            self.growing = False
            log.debug(
                "ramp: %d connection(s) gave %.0f MB/s and kept %.0f %% of the CPU busy: settled at %d",
                *(measured, rate / 1e6, 100 * busy, self.target),
            )
            return self.target
        if now - began < self.WINDOW:
            return self.target
        if self.rate is None:
            step = self.FIRST_STEP
        elif (
            self.SAME * self.rate / self.measured_with
            <= rate / self.target
            <= self.rate / self.measured_with / self.SAME
        ):
            step = self.most  # capped per connection: as many as allowed at once
        elif rate >= self.rate * self.GAIN:
            step = 2
        else:
            self.misses += 1
            log.debug(
                "ramp: %d connection(s) gave %.0f MB/s (CPU %.0f %%), no gain", self.target, rate / 1e6, 100 * busy
            )
            if self.misses >= 2:  # twice: the step did not pay, back to where it started
                self.target, self.growing = self.measured_with, False
                log.debug("ramp: settled at %d connection(s)", self.target)
            self.since, self.mark = now, None  # measured again from here
            return self.target
        self.misses = 0
        log.debug("ramp: %d connection(s) gave %.0f MB/s (CPU %.0f %%)", self.target, rate / 1e6, 100 * busy)
        self.rate, self.measured_with = rate, self.target
        self.target = min(self.most, self.target * step)
        self.growing = self.target < self.most
        self.since, self.mark = now, None
        return self.target

    def hold(self, most: int) -> None:
        """The server refused another connection: at most ``most`` from now on, and no more growth."""
        self.most = max(1, min(self.most, most))
        self.target = min(self.target, self.most)
        self.growing = False

    @property
    def lone(self) -> bool:
        """Growth ended at one connection: each request may be much bigger (see ``_run_most``)."""
        return not self.growing and self.target == 1


class _ParallelFetch:
    """One file over several ranged connections; see the module docstring.

    Workers are threads, one per connection, each taking runs of chunks in file order until none is
    left. The main thread starts them as ``_Ramp`` says and reports progress; a worker whose request
    the server answers 429/503 while others are still running steps back (``_Shed``): its run goes
    back to the pool for the others, and the download carries on with one connection fewer."""

    def __init__(self, dl: Downloader, probe: Probe, part: Path, size: int, progress, stop: threading.Event):
        self.dl, self.probe, self.part, self.size = dl, probe, part, size
        self.progress, self.stop = progress, stop
        self.state = state_path(part)
        # the unit of progress: 1 MiB, or more so that a file has at most STATE_UNITS of them
        self.chunk = dl.chunk_size or max(1, -(-size // STATE_UNITS // MiB)) * MiB
        saved = _load_state(self.state) if self.state.exists() and self.part.exists() else None
        if not dl.chunk_size and saved and self._same_file(saved) and isinstance(saved.get("chunk"), int):
            self.chunk = max(1, saved["chunk"])  # a part started by an older version: resumed in its chunks
        self.n = (size + self.chunk - 1) // self.chunk
        self.fixed_runs = bool(dl.chunk_size)  # the caller set the chunk size: one chunk per request
        self.cond = threading.Condition()
        self.local = threading.local()
        self.next_chunk = 0
        self.returned: list[tuple[int, int]] = []  # runs given back by a worker that stepped back, taken first
        self.running = 0  # workers started that have not yet taken their last run
        self.alive = 0  # workers whose thread has not yet ended (their writer's last write done)
        self.finished = threading.Event()  # set when the last worker ended
        self.peak = 0
        self.receiving = 0  # workers that have received bytes
        self.fetched = 0
        self.error: BaseException | None = None
        self.done = self._resume_point(saved)
        self.resumed_from = sum(self.done)
        self.hashing = _Hashing()
        self.buffers = _BufferPool()
        self.hash_frontier = 0  # the end of all the bytes handed to the hasher (as blocks, or claimed on disk)
        self.handoff: deque[tuple[int, memoryview]] = deque()  # (offset, block) waiting for the hasher
        self.held: dict[int, memoryview] = {}  # offset: a block ahead of the frontier, kept for the hasher
        self.held_bytes = 0  # their bytes, and those of blocks being written to be kept
        self.hashed_from_buffers = 0  # bytes the hasher got as the blocks a worker had received ...
        self.hashed_from_cache = 0  # ... and bytes it read back from the part (through the page cache)
        self.cache_cpu = 0.0  # CPU seconds the hasher spent reading back (not a cost of receiving)

    def _chunk_len(self, k: int) -> int:
        return min(self.chunk, self.size - k * self.chunk)

    def _same_file(self, data: dict) -> bool:
        return data.get("size") == self.size and data.get("validator") == self.probe.validator

    def _resume_point(self, data: dict | None) -> list[int]:
        if data and self._same_file(data) and data.get("chunk") == self.chunk and len(data["done"]) == self.n:
            return [min(int(d), self._chunk_len(k)) for k, d in enumerate(data["done"])]
        done = [0] * self.n
        if self.part.exists() and not self.state.exists():
            # a single-connection part: its bytes are a prefix
            prefix = min(self.part.stat().st_size, self.size)
            for k in range(self.n):
                done[k] = max(0, min(self._chunk_len(k), prefix - k * self.chunk))
        elif self.part.exists():
            self.part.unlink()
        return done

    def _save_state(self) -> None:
        with self.cond:
            done = list(self.done)
        payload = {
            "url": self.probe.url.split("?")[0],
            "size": self.size,
            "chunk": self.chunk,
            "validator": self.probe.validator,
            "done": done,
        }
        _write_json(self.state, payload)

    def _work_left(self) -> bool:
        """Under ``cond``: a chunk remains to be handed out (and nothing ended the download)."""
        while self.next_chunk < self.n and self.done[self.next_chunk] >= self._chunk_len(self.next_chunk):
            self.next_chunk += 1
        ended = self.error is not None or self.stop.is_set()
        return not ended and (bool(self.returned) or self.next_chunk < self.n)

    def _take(self) -> tuple[int, int] | None:
        """The next run of chunks ``(first, end)`` for a worker, fetched with one request: up to
        ``_run_most`` chunks that nothing was written to yet, fewer as the end nears (at most a share
        of what is left per connection), so that the connections finish together and the last ones
        in flight are short (all that the hasher has left when the last byte lands). None (and the
        worker counted as finished) when none is left."""
        with self.cond:
            if not self._work_left() or self.running > self.ramp.target:  # done, or one too many
                self._worker_ends()
                return None
            if self.returned:
                return self.returned.pop(0)
            first = self.next_chunk
            most = 1 if self.fixed_runs else self._run_most()
            share = self.n - first if self.ramp.lone else (self.n - first) // (2 * max(1, self.ramp.target))
            end = first + 1
            while end < self.n and end - first < min(most, share) and self.done[end] == 0:
                end += 1
            self.next_chunk = end
            return first, end

    def _worker_ends(self) -> None:
        """Under ``cond``: one worker fewer (it takes no more runs; its writer may still be writing)."""
        self.running -= 1
        self._check_finished()
        self.cond.notify_all()

    def _check_finished(self) -> None:
        """Under ``cond``: set ``finished`` when no worker runs and every worker's thread ended."""
        if self.running == 0 and self.alive == 0:
            self.finished.set()

    def _run_most(self) -> int:
        """Chunks per request: what one connection receives in REQUEST_TIME at the rate the ramp
        measured (4 MiB before it did, and while it is still growing, so that its measurements
        compare like with like), between 1 MiB and REQUEST_SIZE. Short requests where each
        connection is slow keep the front of the file moving, so the hasher is never held up long
        behind one connection while the others fill the file further on. Once the download settled
        at one connection, LONE_REQUEST_SIZE: nothing to keep in step, and fewer round trips."""
        if self.ramp.lone:
            return max(1, LONE_REQUEST_SIZE // self.chunk)
        measured = self.ramp.rate and not self.ramp.growing  # while growing: the size it started with
        per_connection = self.ramp.rate / self.ramp.measured_with if measured else 4 * MiB / REQUEST_TIME
        size = min(REQUEST_SIZE, max(MiB, int(per_connection * REQUEST_TIME)))
        return max(1, size // self.chunk)

    def _shed(self, run: tuple[int, int]) -> bool:
        """After a 429/503 for ``run``: step back when another connection is still running (the run
        goes back to the pool, the ramp holds at one connection fewer); False for the last one,
        which retries with backoff as a single connection would."""
        with self.cond:
            self.ramp.hold(self.running - 1)
            if self.running <= self.ramp.most:
                return False
            self.returned.append(run)
            self.returned.sort()
            self._worker_ends()
        log.info(
            "%s pushed back (429/503): going on with %d connection(s)", urlparse(self.probe.url).netloc, self.ramp.most
        )
        return True

    def _attempt(self, run: tuple[int, int], retry: bool) -> None:
        try:
            self._fetch_run(*run, retry=retry)
        except RetryableError as err:
            if err.status in (429, 503):
                self.local.writer.drain()  # the run goes back as far as it is on disk
                if self._shed(run):
                    raise _Shed from None
            raise

    def _worker(self) -> None:
        """One connection: runs until none is left, its blocks written by its own ``BlockWriter``;
        the thread ends only after the writer wrote everything it was given."""
        self.local.first = True
        _yield_cpu_to_hasher()  # before the writer is made: a thread starts at its creator's priority
        writer = self.local.writer = BlockWriter(self._write, self.buffers.put_back)
        taking = True  # counted in ``running`` until _take or _shed ends it
        try:
            while (run := self._take()) is not None:
                tries = itertools.count()
                self.dl.with_retries(
                    f"download {urlparse(self.probe.url).netloc} chunk {run[0]}",
                    lambda run=run, tries=tries: self._attempt(run, next(tries) > 0),
                    lambda run=run: sum(self.done[run[0] : run[1]]),
                    self.stop,
                )
            taking = False
        except _Shed:
            taking = False
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self._fail(err)
        self.dl.give_back_session()  # its connections serve the next file's workers
        try:
            writer.close()
        except BaseException as err:  # noqa: BLE001
            self._fail(err)
        with self.cond:
            if taking:
                self._worker_ends()
            self.alive -= 1
            self._check_finished()
            self.cond.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = err
            self.cond.notify_all()

    def _fetch_run(self, first: int, end_chunk: int, retry: bool = False) -> None:
        """Fetch chunks ``first`` to ``end_chunk`` (exclusive) with one range request, from where they
        stand on disk (bytes land in order, so what is done of a run is a prefix of it), handing each
        block to this connection's writer (which counts it in ``done`` once written: ``_write``). A
        retry first waits for the writer, so it asks for the bytes after those written; a new run
        does not (nothing of its chunks is waiting to be written), which keeps the next request from
        waiting on the last block's write."""
        writer: BlockWriter = self.local.writer
        if retry:
            writer.drain()
        k = first
        while k < end_chunk and self.done[k] >= self._chunk_len(k):
            k += 1
        if k >= end_chunk:
            return
        pos = k * self.chunk + self.done[k]
        end = min(self.size, end_chunk * self.chunk)
        headers = {"Range": f"bytes={pos}-{end - 1}"}
        if self.probe.validator and not self.probe.validator.startswith("W/"):
            headers["If-Range"] = self.probe.validator
        resp = self.dl.open(self.probe.url, "GET", headers, self.stop)
        with resp, _cut_on_stop(resp, self.stop):
            if resp.status_code == 200:
                # e.g. replicas behind a load balancer whose ETags differ, so If-Range fails on some
                raise _RangeMismatch(
                    f"{urlparse(self.probe.url).netloc} answered a request for chunk {k} with the whole file (200)"
                )
            if resp.status_code != 206:
                raise DownloadError(
                    f"{urlparse(self.probe.url).netloc} answered {resp.status_code} to a range request "
                    "(the file changed on the server, or it stopped honouring ranges)"
                )
            _check_range(resp, pos, self.size)
            for block in iter_body(resp, self.buffers, pos):
                block = block[: end - pos]  # what arrived is written and counted, also when stopping
                start, pos = pos, pos + len(block)
                with self.cond:
                    self.fetched += len(block)
                    if self.local.first:
                        self.local.first = False
                        self.receiving += 1
                    # to the hasher while the bytes are still in the CPU's cache (hashing blocks 12 MiB
                    # old, as when they went through the writer first, was a quarter slower here)
                    if self._hand_over(start, block):
                        self.buffers.share(block)  # the hasher's and the writer's
                        self.cond.notify_all()  # the hasher may be waiting for it
                writer.put(start, block)
                if pos >= end:
                    break
                if self.stop.is_set() or self.error is not None:
                    raise Interrupted("interrupted")
        if pos < end:
            raise RetryableError(f"connection closed at byte {pos} of chunks {first}-{end_chunk - 1}")

    def _write(self, start: int, block: memoryview) -> None:
        """On a connection's writer thread: write ``block`` at ``start``, hand it to the hasher when it
        is at the frontier by now (``_hand_over``; a block behind the frontier was handed over as it
        arrived, in ``_fetch_run``), keep it for the hasher or give it back to the pool, and count it
        in ``done``.

        The hasher gets every block from memory that it can, so the page cache would only cost CPU
        and the block is written with direct I/O: a block at the hash frontier, and, while the
        download runs at most HOLD_CONNECTIONS connections, one ahead of it as long as the blocks kept
        for the hasher (``held``) stay within HOLD_BYTES (the runs of the other connections ahead of
        the front, at most a few requests each). That is where the CPU is the limit (loopback, a fast
        link on a small machine); with many connections the link is, and there a 512 MiB download
        capped per connection took 0.1-0.15 s longer with blocks kept than through the page cache.
        A block not kept goes through the page cache, where the hasher finds it when the frontier
        gets there (a read from the disk would double the disk's traffic)."""
        n = len(block)
        with self.cond:
            handed = start < self.hash_frontier  # as it arrived: the hasher has its own share of the buffer
            # a block at the frontier stays there until it is handed over (nothing else covers its bytes)
            at_front = start == self.hash_frontier
            few = self.ramp.target <= HOLD_CONNECTIONS
            keep = not handed and not at_front and few and self.held_bytes + n <= HOLD_BYTES
            self.held_bytes += n if keep else 0
        self.file.write(block, start, handed or at_front or keep)
        end = start + n
        with self.cond:
            taken = False  # the hasher took this thread's share of the buffer
            if not handed:
                taken = self._hand_over(start, block)  # before the block counts as on disk (see there)
                if keep and not taken and start > self.hash_frontier:
                    self.held[start] = block
                    taken = True
                elif keep:  # handed over after all (or bytes the hasher has already: never kept behind it)
                    self.held_bytes -= n
            k = start // self.chunk
            while k < self.n and k * self.chunk < end:
                self.done[k] = max(self.done[k], min(end - k * self.chunk, self._chunk_len(k)))
                k += 1
            self.cond.notify_all()
        if not taken:
            self.buffers.put_back(block)

    def _hand_over(self, start: int, block: memoryview) -> bool:
        """Under ``cond``, for a block at ``start`` not yet counted in ``done`` (on its connection's thread
        as it arrives, or on its writer's once written): hand it to the hasher as it is (no copy, no
        read back from the part) when it begins exactly where the bytes already handed to the hasher
        end (the hash frontier); else (False) it is kept or read back from the part later. When the
        hasher's queue is full, the thread at the frontier waits for room, as the single connection's
        reader waits for a free buffer (``_HashPipe``): the hasher empties its queue without waiting
        for anything, so this cannot deadlock, and the frontier cannot move past ``start`` meanwhile
        (the hasher claims only bytes counted in ``done``). Without that wait, a hasher that fell
        behind a fast connection for a moment would read everything after from the part, which costs
        it a third more CPU per byte: on a busy machine it then never caught up again. Only the
        frontier's connection (or writer) ever waits."""
        if start != self.hash_frontier:
            return False
        while len(self.handoff) >= HANDOFF_DEPTH and not self._hashing_ends():
            self.cond.wait(0.5)
        if self._hashing_ends():
            return False
        self.handoff.append((start, block))
        self.hash_frontier += len(block)
        return True

    def _hashing_ends(self) -> bool:
        """Under ``cond``: the hasher stops (or stopped) taking blocks."""
        return self.hashing.abort or self.error is not None or self.stop.is_set()

    def _next_to_hash(self) -> tuple[int, memoryview | None, int] | None:
        """Under ``cond``: what the hasher hashes next, in file order: ``(offset, block, length)``, the
        oldest block handed over, or the block kept (``held``) that starts at the frontier; else, when
        the part's contiguous prefix on disk (including the written part of the chunk at the front)
        reaches past the frontier, ``(offset, None, length)``: that stretch, up to the next kept block,
        claimed to be read back from the part (a resumed prefix, or blocks that were not kept). None
        when there is nothing yet."""
        if self.handoff:
            if len(self.handoff) >= HANDOFF_DEPTH:
                self.cond.notify_all()  # the thread at the frontier may be waiting for room
            start, block = self.handoff.popleft()
            return start, block, len(block)
        start = self.hash_frontier
        if (block := self.held.pop(start, None)) is not None:
            self.held_bytes -= len(block)
            self.hash_frontier += len(block)
            return start, block, len(block)
        k = start // self.chunk
        while k < self.n - 1 and self.done[k] >= self.chunk:
            k += 1
        avail = k * self.chunk + self.done[k]
        if self.held:
            avail = min(avail, min(self.held))
        if avail <= start:
            return None
        self.hash_frontier = avail
        return start, None, avail - start

    def _hasher(self, view: memoryview) -> None:
        """Hash the part in file order as it fills (``_next_to_hash``), and have the kernel start
        writing each hashed stretch to the disk (``start_writeback``: what direct I/O did not write
        already), so neither the hash nor the final fsync is left for after the last byte. Ends as
        soon as the main thread aborts it or a worker failed, also with bytes on disk still to hash
        (issue 20 #22: it used to go round forever then, and the main thread's join with it, when a
        stop found it behind the workers); blocks still queued are dropped then."""
        hashing = self.hashing
        digest = hashlib.sha256()
        pos = flushed = 0
        try:
            while pos < self.size:
                with self.cond:
                    while True:
                        if self.error is not None or hashing.abort:
                            return
                        if (item := self._next_to_hash()) is not None:
                            break
                        self.cond.wait(0.5)
                start, block, length = item
                if start != pos:
                    raise RuntimeError(f"the hasher was handed bytes from {start}, it is at {pos}")
                if block is not None:
                    digest.update(block)
                    self.buffers.put_back(block)
                    self.hashed_from_buffers += length
                else:
                    for at in range(start, start + length, HASH_SPAN):
                        if hashing.abort:
                            return
                        began = time.thread_time()
                        self._hash_back(digest, view[at : min(start + length, at + HASH_SPAN)])
                        self.cache_cpu += time.thread_time() - began
                    self.hashed_from_cache += length
                pos += length
                if pos - flushed >= WRITEBACK or pos == self.size:
                    start_writeback(self.file.fd, flushed, pos - flushed)
                    flushed = pos
            if pos == self.size:
                hashing.sha256 = digest.hexdigest()
        except BaseException as err:  # noqa: BLE001
            with self.cond:
                self.error = self.error or err
                self.cond.notify_all()

    @staticmethod
    def _hash_back(digest, stretch: memoryview) -> None:
        """Hash a stretch read back from the part (through the page cache, or from the disk where it
        was written directly: a resumed prefix)."""
        with stretch:
            digest.update(stretch)

    def _start_workers(self, workers: list[threading.Thread]) -> None:
        """Start workers up to the ramp's target, while there is a chunk for them."""
        with self.cond:
            if not self._work_left():
                self._check_finished()  # nothing was left to start (a complete part), or a stop
                return
            if self.ramp.target <= self.running:
                return
            want = min(self.ramp.target - self.running, self.n - self.next_chunk + len(self.returned))
            self.running += want
            self.alive += want
            self.peak = max(self.peak, self.running)
        for _ in range(want):
            w = threading.Thread(target=self._worker, daemon=True, name=f"dl-{len(workers)}")
            workers.append(w)
            w.start()

    def _drive(self, workers: list[threading.Thread]) -> None:
        """Until every worker finished: report progress, save the state every half second, and set
        the number of connections as the ramp says (more are started here; those above a lowered
        target end after their current request, in ``_take``)."""
        last_save = time.monotonic()
        self._start_workers(workers)
        while not self.finished.wait(0.05):
            now = time.monotonic()
            # measured only while the ramp still decides, and outside the lock (/proc/stat is a file read)
            growing = self.ramp.growing
            cpu = time.process_time() - self.cache_cpu if growing else 0.0  # a resumed prefix's hash left out
            machine = _machine_cpu() if growing else None
            with self.cond:  # the workers read the ramp's target under it (_take)
                on_disk = sum(self.done)
                self.ramp.tick(now, self.fetched, self.receiving, cpu, machine)
            self.progress(on_disk, self.size)
            if now - last_save > 0.5:
                self._save_state()
                last_save = now
            self._start_workers(workers)
        for w in workers:
            w.join()

    def run(self) -> Result:
        """Allocate the part, start the hasher and the first workers, drive them to the end, and hand
        back the size and sha256 (or the first worker's error)."""
        self.file = PartFile(self.part)
        hashing = self.hashing
        mapped = view = hasher = None
        workers: list[threading.Thread] = []
        self.ramp = _Ramp(self.dl.start_connections, self.dl.connections, time.monotonic())
        try:
            self._save_state()
            if os.fstat(self.file.fd).st_size < self.size:
                _allocate(self.file.fd, self.size)  # lets the hasher map the whole file
            # the hasher reads back what was not handed to it through a map of the part, without a copy
            mapped = mmap.mmap(self.file.fd, self.size, prot=mmap.PROT_READ)
            view = memoryview(mapped)
            hasher = threading.Thread(target=self._hasher, args=(view,), daemon=True, name="dl-hash")
            hasher.start()
            try:
                self._drive(workers)
            except BaseException:
                self.stop.set()
                raise
            finally:
                self._save_state()
            with self.cond:
                complete = sum(self.done) == self.size
                if not complete or self.error is not None:
                    hashing.abort = True
                self.cond.notify_all()
            hasher.join()
            if self.error is not None:
                raise self.error
            if not complete or hashing.sha256 is None:
                if self.stop.is_set():
                    raise Interrupted("interrupted")
                raise DownloadError("download stopped before the end")
            self.progress(self.size, self.size)
            log.debug(
                "%s: sha256 of %d bytes from the received blocks, %d read back from the part; "
                "%d bytes written directly",
                *(self.part.name, self.hashed_from_buffers, self.hashed_from_cache, self.file.direct_bytes),
            )
        finally:
            if hasher is not None and hasher.is_alive():
                with self.cond:
                    hashing.abort = True
                    self.cond.notify_all()
                hasher.join()
            if view is not None:
                view.release()
            if mapped is not None:
                mapped.close()
            self.file.close()
        return Result(self.size, hashing.sha256, self.fetched, self.resumed_from, self.peak)
