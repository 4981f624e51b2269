"""Models named in a job (input ``models``): fetched once onto the volume, verified, bounded on disk
(docs/api.md, "Job models").

Each entry (a config.yml model entry: ``url``, ``destination``, ``filename``, ``sha256``, ``size``) becomes
``models/<destination>/<filename>`` before the workflow is queued:

1. Hosts: every URL is checked before it is requested (``HostPolicy``): the entry's URL (and the hub it
   stands for) before anything, then every hop the downloader makes, redirects included (its
   ``headers_for`` is asked about each hop before the request). A host must be in ``JOB_MODEL_HOSTS``
   (default: Hugging Face, CivitAI and their download hosts; ``*.name`` entries match every host under
   ``name``), and a host that is, or resolves to, a loopback, private, link-local or other non-public
   address is refused unless ``JOB_MODEL_HOSTS`` names it exactly; so is a URL whose host requests would
   read otherwise (``_requested_host``). Each new connection's peer address is checked again before
   anything is sent on it (``_PeerCheckedDownloader``: DNS may answer otherwise the second time). A token
   never goes over plain http. Xet files are fetched over the Hub's plain HTTP redirect, so every hop goes
   through that check.
2. In use: the job holds the file's in-use marker (model_use.py) from before it looks at the file until
   the job ends, so no eviction or prune deletes a file a running job uses.
3. Present: a file already there is used when it is the entry's (its sha256, when the entry gives one;
   else the same url recorded for it, by a job or by comfy.lock.yml); any other file under that name (a
   config model, another job's, one put there by hand) is never replaced: the job fails naming the clash.
4. Fetch: under the per-target lock download_models.py uses (``models/.locks/<destination>/<name>.lock``),
   so two jobs, two workers, or a provisioning run never write the same file: the second waits, then
   finds it present. A Hugging Face file in a hub cache on the host (RunPod's cached models) is linked;
   anything else goes through the provisioning downloader (http_download.py: ``.part``, resume, sha256
   while the bytes arrive, tokens only to their own host, Hugging Face / CivitAI resolution), and is
   renamed into place only once verified; a mismatch deletes the part.
5. Bound: the job models are recorded in ``$VOLUME_ROOT/.job-models.json`` (state_files.py describes it)
   with the bytes they take and their last use. Before a download whose size is known (after it, when it
   was not), the least recently used job models that no running job uses and comfy.lock.yml does not
   record (config models) are deleted until everything fits in ``JOB_MODELS_MAX_GB`` (none while
   comfy.lock.yml is damaged). A server that tells no size is cut off past the bound. A download running
   at the same moment (in this job, another job or another worker on the volume) that started first
   counts at the size it will have, so two downloads started together cannot both take the room that is
   left: the later one is refused ("retry later").
6. Cut downloads: a download is recorded in the state file (``downloads``) before its first byte, under
   its target lock; done, it becomes a job model's record, and failed with no part left, it is forgotten.
   A part left by a cut one (the job's timeout, a cancel, a killed worker) is abandoned once nobody holds
   its target lock: it counts in the bound (its bytes and records next to it), and making room deletes
   abandoned parts (with their records, ``discard_part``), oldest first, before any job model. A part
   being downloaded (its lock held) is never touched, nor is this download's own (a part of the same
   url is resumed), nor a part the state file does not record (provisioning's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from filelock import FileLock, Timeout

from comfy_worker import hf_cache, volume_lock
from comfy_worker.config_schema import ModelEntry
from comfy_worker.file_names import MAX_NAME_BYTES, safe_filename, url_filename
from comfy_worker.http_download import (
    ChecksumError,
    Downloader,
    DownloadError,
    Interrupted,
    Probe,
    discard_part,
    fsync_path,
    same_host,
    source_path,
    state_path,
)
from comfy_worker.job_errors import JobError
from comfy_worker.lock_file import atomic_write_text, read_lock_file
from comfy_worker.log_setup import redact_urls, safe_url
from comfy_worker.model_sources import CIVITAI, HUGGINGFACE, ModelSource, Sources, TokenPolicy, hf_file
from comfy_worker.model_use import Uses, unused
from comfy_worker.public_address import (
    HostAllowList,
    address_problem,
    literal_problem,
    normal_host,
    resolved_problem,
    split_host_port,
)
from comfy_worker.settings import DEFAULT_JOB_MODEL_HOSTS, Settings
from comfy_worker.state_files import JOB_MODELS_LOCK, JOB_MODELS_STATE

log = logging.getLogger(__name__)

HOSTS_SETTING = "JOB_MODEL_HOSTS"
GB = 1000**3
FETCHED, PRESENT, LINKED = "fetched", "present", "linked from cache"
DISK_MARGIN = 64 << 20  # kept free beyond a download's remaining bytes, as provisioning does
STOP_WAIT_S = 30.0  # after a timeout or cancel: how long the job waits for its downloads to wind down


# ---- where a job may fetch from ----


class HostRefused(DownloadError):
    """A URL (the entry's, or a hop of it) that JOB_MODEL_HOSTS does not allow: never requested."""


class HostPolicy:
    """JOB_MODEL_HOSTS: ``host``, ``host:port`` and ``*.domain`` entries; ``default`` stands for the
    default list. Entries the variable names exactly (not ``*.``, not ``default``) may be non-public."""

    def __init__(self, entries: tuple[str, ...] | None):
        self.shown = ",".join(entries) if entries is not None else ",".join(DEFAULT_JOB_MODEL_HOSTS)
        exact: list[str] = []  # named by the user: may be a non-public address
        listed: list[str] = []
        self.suffixes: set[tuple[str, int | None]] = set()
        for entry in DEFAULT_JOB_MODEL_HOSTS if entries is None else entries:
            named = entry.strip().lower() != "default"
            for one in (entry.strip(),) if named else DEFAULT_JOB_MODEL_HOSTS:
                host, port = split_host_port(one)
                if host.startswith("*."):
                    self.suffixes.add((host[2:], port))
                else:
                    (exact if named and entries is not None else listed).append(one)
        self.exact = HostAllowList(exact, HOSTS_SETTING)
        self.listed = HostAllowList(listed, HOSTS_SETTING)

    def problem(self, url: str) -> str | None:
        """Why ``url`` may not be requested (one phrase), None when it may."""
        try:
            parts = urlsplit(url)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        except ValueError:
            return "it is not a valid URL"
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return "it is not an http(s) URL with a host"
        host = normal_host(parts.hostname)
        requested = _requested_host(url)
        if requested != (host, parts.port):
            other = f"{requested[0]}:{requested[1] or port}" if requested else "no host it can parse"
            return f"it is not a well-formed URL: the HTTP client would connect to {other}, not {host}:{port}"
        if self.listed_exactly(host, port):
            return None
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        literal = literal_problem(host)
        if literal and literal.startswith("not "):
            return f"{shown} is {literal}"
        if literal:
            return f"{shown} is {'an' if literal[0] in 'aeiou' else 'a'} {literal} address"
        if not self.listed.allows(host, port) and not any(
            host.endswith("." + s) and p in (None, port) for s, p in self.suffixes
        ):
            return f"{shown} is not in {HOSTS_SETTING}"
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except OSError:
            return None  # the request itself fails and says so
        return resolved_problem(host, addresses)

    def listed_exactly(self, host: str, port: int | None) -> bool:
        """Named by the user in JOB_MODEL_HOSTS (host or host:port): may be a non-public address."""
        return self.exact.allows(host, port)


def _requested_host(url: str) -> tuple[str, int | None] | None:
    """The host and port requests will connect to for ``url`` (None when it cannot parse it). Where this
    differs from ``urlsplit``'s reading (``http://127.0.0.1\\@huggingface.co/``), the check would judge one
    host and the request go to another."""
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        parsed = urllib3.util.parse_url(prepared.url)
    except (ValueError, requests.RequestException, urllib3.exceptions.HTTPError):
        return None
    return normal_host(parsed.host or ""), parsed.port


class _PeerCheckedDownloader(Downloader):
    """The provisioning downloader whose every new connection is checked once made, before a byte is sent:
    ``check_peer(host, port, address)`` raises when the address connected to may not be reached. The
    policy's own DNS answer can differ from the one the connection gets (DNS rebinding, a short TTL); the
    connected address cannot. Connections through a proxy (HTTP(S)_PROXY) are not checked: the proxy
    resolves the host."""

    def __init__(self, check_peer: Callable[[str, int, str], None], **kwargs):
        super().__init__(**kwargs)
        self._check_peer = check_peer

    def session(self) -> requests.Session:
        s = super().session()
        if not getattr(s, "peer_checked", False):
            for adapter in s.adapters.values():
                manager = adapter.poolmanager
                manager.pool_classes_by_scheme = {
                    scheme: _peer_checked_pool(pool, self._check_peer)
                    for scheme, pool in manager.pool_classes_by_scheme.items()
                }
            s.peer_checked = True  # type: ignore[attr-defined]
        return s


def _peer_checked_pool(pool_cls, check_peer):
    class PeerChecked(pool_cls.ConnectionCls):
        def _new_conn(self):
            sock = super()._new_conn()
            try:
                check_peer(self.host, self.port, sock.getpeername()[0])
            except BaseException:
                sock.close()
                raise
            return sock

    return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": PeerChecked})


def _same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port (a token host is https unless HF_ENDPOINT / CIVITAI_BASE_URL say otherwise)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return pa.scheme.lower() == pb.scheme.lower() and same_host(a, b)


def refusal(index: int, entry_url: str, url: str, problem: str, policy: HostPolicy) -> str:
    hop = "" if same_host(url, entry_url) else f" (it leads to {safe_url(url)})"
    parts = urlsplit(url)
    host = normal_host(parts.hostname or "?")
    host = f"[{host}]" if ":" in host else host
    try:
        entry = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        entry = host
    return (
        f"models[{index}] ({safe_url(entry_url)}){hop} is refused: {problem}. A job fetches models only from "
        f"the hosts in {HOSTS_SETTING} (now {policy.shown}), never from a loopback, private or link-local "
        f"address unless that host is listed exactly; to allow it, add {entry} to {HOSTS_SETTING} on the "
        "endpoint."
    )


# ---- the state file ----


def _read_state(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The job models and the job-model downloads the state file records (both empty when it is unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    data = data if isinstance(data, dict) else {}
    models, downloads = data.get("models"), data.get("downloads")
    models = models if isinstance(models, dict) else {}
    downloads = downloads if isinstance(downloads, dict) else {}
    return (
        {k: _sane_record(v) for k, v in models.items() if isinstance(v, dict)},
        {k: _sane_download(v) for k, v in downloads.items() if isinstance(v, dict)},
    )


def _number(value) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else 0


def _sane_record(rec: dict) -> dict:
    """A record with a ``size`` and ``last_used`` fit to add and sort (a hand-edited or damaged value
    reads as 0: counted as nothing, evicted first)."""
    return {**rec, "size": int(_number(rec.get("size"))), "last_used": _number(rec.get("last_used"))}


def _sane_download(rec: dict) -> dict:
    """A download record with a ``touched`` fit to sort (a damaged value reads as 0: deleted first)."""
    return {**rec, "started": _number(rec.get("started")), "touched": _number(rec.get("touched"))}


def _write_state(path: Path, models: dict[str, dict], downloads: dict[str, dict]) -> None:
    data = {"version": 1, "models": models, "downloads": downloads}
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _not_downloading(lock_path: Path) -> Iterator[bool]:
    """Yields True while the per-target download lock at ``lock_path`` is held here (nobody downloads that
    target: its part may be deleted now), False when someone holds it (or it cannot be taken). Never waits."""
    lock = FileLock(str(lock_path))
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except (Timeout, OSError, NotImplementedError):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _part_of(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _part_bytes(part: Path) -> int:
    """What a part takes, records next to it included (0 when there is none)."""
    total = 0
    for path in (part, state_path(part), source_path(part)):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


@dataclass
class Report:
    """One job model: where it is and how the job got it (the result's ``models``)."""

    index: int
    path: str  # destination/filename under models/
    status: str  # fetched | present | linked from cache
    bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


class JobModels:
    """Makes one job's models present (run on a thread: the downloader blocks). ``stop`` ends it."""

    def __init__(self, settings: Settings, uses: Uses, stop: threading.Event, on_progress=None):
        self.settings = settings
        self.models_dir = settings.models_dir
        self.state_path = settings.volume_root / JOB_MODELS_STATE
        self.max_bytes = int(settings.job_models_max_gb * GB)
        self.policy = HostPolicy(settings.job_model_hosts)
        self.uses, self.stop = uses, stop
        self.on_progress: Callable[[dict], None] = on_progress or (lambda event: None)
        self.tokens = TokenPolicy(settings)
        self._hop = threading.local()  # ``url``: the URL this thread requests now (for a refusal's message)
        self.downloader = _PeerCheckedDownloader(
            self._check_peer,
            headers_for=self._headers_for,
            connections=settings.download_connections,
            retries=settings.download_retries,
            backoff=settings.download_retry_backoff,
            stop=stop,
        )
        self.sources = Sources(settings, self.downloader, self.tokens)
        self._current: tuple[int, str] = (0, "")  # (index, entry url) of the entry being fetched

    def _headers_for(self, url: str) -> dict[str, str]:
        """The downloader asks this before every request, each redirect hop included."""
        problem = self.policy.problem(url)
        if problem:
            index, entry_url = self._current
            raise HostRefused(refusal(index, entry_url, url, problem, self.policy))
        self._hop.url = url
        headers = self.tokens.headers_for(url)
        bases = (self.settings.hf_endpoint, self.settings.civitai_base_url)
        if headers and urlsplit(url).scheme.lower() != "https" and not any(_same_origin(url, b) for b in bases):
            return {}  # a token never crosses the network in the clear (http://huggingface.co:443/...)
        return headers

    def _check_peer(self, host: str, port: int, address: str) -> None:
        """A new connection, before anything is sent on it: the address it reached must be public unless
        JOB_MODEL_HOSTS names the host exactly (HostRefused)."""
        if self.policy.listed_exactly(host, port):
            return
        kind = address_problem(address)
        if kind:
            index, entry_url = self._current
            url = getattr(self._hop, "url", None) or entry_url
            problem = f"{normal_host(host)} resolved to {address}, a {kind} address, when connected"
            raise HostRefused(refusal(index, entry_url, url, problem, self.policy))

    def check_hosts(self, entries: list[ModelEntry]) -> None:
        """Where each entry is first requested, before any request: the hub a Hugging Face or CivitAI URL is
        fetched through (HF_ENDPOINT, CIVITAI_BASE_URL; huggingface.co and civitai.com by default), the URL
        itself otherwise."""
        for i, entry in enumerate(entries):
            kind = self.sources.kind_of(entry.url)
            url = {HUGGINGFACE: self.settings.hf_endpoint, CIVITAI: self.settings.civitai_base_url}.get(kind, entry.url)
            problem = self.policy.problem(url)
            if problem:
                raise JobError(
                    refusal(i, entry.url, url, problem, self.policy),
                    {"model": i, "url": safe_url(entry.url), "refused": safe_url(url), "setting": HOSTS_SETTING},
                )

    def run(self, entries: list[ModelEntry]) -> list[Report]:
        """Check the hosts of all entries, then make each present in turn; raises JobError."""
        self.check_hosts(entries)
        reports = []
        for i, entry in enumerate(entries):
            self._current = (i, entry.url)
            started = time.monotonic()
            try:
                path, status, size = self._one(i, entry, len(entries))
            except (volume_lock.Interrupted, Interrupted, InterruptedError):
                raise JobError(f"models[{i}] ({safe_url(entry.url)}): stopped.", {"model": i}) from None
            except HostRefused as err:
                raise JobError(str(err), {"model": i, "url": safe_url(entry.url), "setting": HOSTS_SETTING}) from None
            except ChecksumError as err:
                raise JobError(_mismatch(i, entry, err), {"model": i, "url": safe_url(entry.url)}) from None
            except (DownloadError, volume_lock.LockError, OSError) as err:
                raise JobError(
                    f"models[{i}] ({safe_url(entry.url)}) could not be fetched: {_one_line(err)}.",
                    {"model": i, "url": safe_url(entry.url)},
                ) from None
            reports.append(Report(i, path, status, size, time.monotonic() - started))
            log.info("job model %s: %s (%d bytes, %.1f s)", path, status, size, reports[-1].seconds)
        return reports

    # ---- one entry ----

    def _one(self, i: int, entry: ModelEntry, total: int) -> tuple[str, str, int]:
        source = probe = None
        name = entry.filename or self._recorded_name(entry) or self.sources.offline_name(entry.url)
        if name is None:
            source, probe = self._resolve(entry)
            name = source.name or probe.filename or url_filename(source.url) or url_filename(entry.url)
        if not name or safe_filename(name) != name or len(name.encode()) > MAX_NAME_BYTES:
            raise JobError(
                f"models[{i}] ({safe_url(entry.url)}): no usable file name can be told for it; set 'filename'.",
                {"model": i, "url": safe_url(entry.url)},
            )
        rel = f"{entry.destination}/{name}"
        target = self.models_dir / rel
        self.uses.hold(rel, self.stop)  # before looking: no eviction or prune deletes it from now on
        if target.is_file():
            return rel, PRESENT, self._present(i, entry, rel, target)
        lock = volume_lock.acquire(
            self.models_dir / ".locks" / f"{rel}.lock", f"another job or worker fetching {name}", stop=self.stop
        )
        try:
            if target.is_file():  # fetched by another job or worker meanwhile
                return rel, PRESENT, self._present(i, entry, rel, target)
            if self._link_cached(entry, target):
                self._record(rel, entry, self._sha_of_link(entry, target), 0)
                return rel, LINKED, target.stat().st_size
            if source is None:
                source, probe = self._resolve(entry)
            return rel, FETCHED, self._download(i, entry, rel, target, source, probe, total)
        finally:
            lock.release()

    def _recorded_name(self, entry: ModelEntry) -> str | None:
        """The file name an earlier job (or comfy.lock.yml) recorded for this url and destination: a job
        naming a model by url alone finds it again without asking the server."""
        for rel, rec in _read_state(self.state_path)[0].items():
            dest, _, name = rel.rpartition("/")
            if dest == entry.destination and rec.get("url") == entry.url:
                return name
        for rec in read_lock_file(self.settings.lock_file).get("models") or []:
            if isinstance(rec, dict) and rec.get("destination") == entry.destination and rec.get("url") == entry.url:
                return rec.get("filename")
        return None

    def _resolve(self, entry: ModelEntry) -> tuple[ModelSource, Probe]:
        source = self.sources.resolve(entry.url)
        probe = self.downloader.probe(source.url, self.stop)
        return source, probe

    def _present(self, i: int, entry: ModelEntry, rel: str, target: Path) -> int:
        """The size of the file already at ``target`` when it is the entry's; JobError naming the clash
        otherwise (it is never replaced)."""
        size = target.stat().st_size
        job_rec = _read_state(self.state_path)[0].get(rel)
        dest, name = rel.rsplit("/", 1)
        lock_rec = next(
            (
                r
                for r in read_lock_file(self.settings.lock_file).get("models") or []
                if isinstance(r, dict) and r.get("destination") == dest and r.get("filename") == name
            ),
            None,
        )
        whose = (
            "a model of config.yml" if lock_rec else "another job's model" if job_rec else "a file put there by hand"
        )
        shown = safe_url(entry.url)
        details = {"model": i, "url": shown, "path": rel, "clash": whose}
        if entry.size is not None and size != entry.size:
            raise JobError(
                f"models[{i}] ({shown}): models/{rel} is already on the volume ({whose}) with {size} bytes, not the "
                f"entry's size {entry.size}; a job never replaces a file: give the entry another 'filename' or "
                "'destination'.",
                details,
            )
        if entry.sha256:
            known = [r.get("sha256") for r in (job_rec, lock_rec) if r and r.get("sha256") and r.get("size") == size]
            linked = hf_cache.blob_sha256(Path(os.path.realpath(target))) if target.is_symlink() else None
            digest = known[0] if known else linked or hf_cache.sha256_of(target)  # a linked blob is named by it
            if digest != entry.sha256:
                raise JobError(
                    f"models[{i}] ({shown}): models/{rel} is already on the volume ({whose}) with other bytes "
                    f"(sha256 {digest}, the entry asks for {entry.sha256}); a job never replaces a file: give the "
                    "entry another 'filename' or 'destination'.",
                    details,
                )
        elif not any(r and r.get("url") == entry.url for r in (job_rec, lock_rec)):
            raise JobError(
                f"models[{i}] ({shown}): models/{rel} is already on the volume ({whose}, not from this url) and the "
                "entry gives no sha256 to show it is the same file; a job never replaces a file: give the entry "
                "another 'filename' or 'destination', or the file's 'sha256' to use it.",
                details,
            )
        if job_rec:
            self._touch(rel)
        return size

    def _link_cached(self, entry: ModelEntry, target: Path) -> bool:
        file = hf_file(entry.url) if self.sources.kind_of(entry.url) == HUGGINGFACE else None
        found = hf_cache.find(file, self.settings.hf_cache_dirs) if file is not None else None
        if found is None:
            return False
        if entry.size is not None and found.stat().st_size != entry.size:
            return False
        try:
            hf_cache.link_into(found, target, entry.sha256 or hf_cache.blob_sha256(found))
        except hf_cache.CacheMismatch as err:
            log.warning("%s; downloading it instead", err)
            return False
        return True

    def _sha_of_link(self, entry: ModelEntry, target: Path) -> str | None:
        return entry.sha256 or hf_cache.blob_sha256(Path(os.path.realpath(target)))

    def _download(self, i, entry: ModelEntry, rel: str, target: Path, source, probe, total: int) -> int:
        size = entry.size if entry.size is not None else source.size if source.size is not None else probe.size
        part = _part_of(target)
        # recorded before a byte is written: its part is counted, and deletable once abandoned
        self._begin_download(rel, entry, size)
        try:
            return self._fetch_into(i, entry, rel, target, part, source, probe, total, size)
        finally:
            with contextlib.suppress(volume_lock.Interrupted, volume_lock.LockError, OSError):
                self._end_download(rel, part)

    def _fetch_into(self, i, entry: ModelEntry, rel: str, target: Path, part: Path, source, probe, total, size) -> int:
        if size is not None:
            self._make_room(i, entry, rel, size)
            self._check_disk(i, entry, part, size)
        state = {"last": 0.0}
        limit = size if size is not None else self.max_bytes  # a server that sends no length is cut off here

        def progress(done: int, expected: int | None) -> None:
            if done > limit:
                raise _TooBig(done)
            now = time.monotonic()
            if now - state["last"] >= 0.5 or (expected and done >= expected):
                state["last"] = now
                self.on_progress(
                    {"stage": "models", "model": rel, "bytes": done, "total": expected, "models_total": total}
                )

        try:
            result = self.downloader.fetch(
                source.url,
                part,
                expected_size=size,
                expected_sha256=entry.sha256 or source.sha256,
                probe=probe,
                progress=progress,
                stop=self.stop,
                source=entry.url,
            )
        except _TooBig as err:
            discard_part(part)
            shown, bound = safe_url(entry.url), f"JOB_MODELS_MAX_GB={self.settings.job_models_max_gb:g}"
            raise JobError(
                f"models[{i}] ({shown}): the server sent more than the entry's size of {size} bytes; nothing was kept "
                "(check the url and the entry's 'size')."
                if size is not None
                else f"models[{i}] ({shown}): the server sent more than the {self.max_bytes} bytes the job models may "
                f"take ({bound}) without saying the file's size; nothing was kept: raise JOB_MODELS_MAX_GB on the "
                "endpoint, or put the model in config.yml.",
                {"model": i, "url": shown, "bytes": err.args[0], "max_bytes": limit},
            ) from None
        os.replace(part, target)
        fsync_path(target.parent)
        self._record(rel, entry, result.sha256, result.size)
        if size is None:  # now that its size is known: make room for it after the fact
            try:
                self._make_room(i, entry, rel, result.size)
            except JobError as err:  # the file is here and whole: this job uses it
                log.warning("%s", err.message)
        return result.size

    def _check_disk(self, i: int, entry: ModelEntry, part: Path, size: int) -> None:
        """Fail at once when the rest of the file, plus ``DISK_MARGIN``, does not fit on the volume."""
        part.parent.mkdir(parents=True, exist_ok=True)
        need = size - (part.stat().st_size if part.exists() else 0) + DISK_MARGIN
        free = shutil.disk_usage(part.parent).free
        if need > free:
            raise JobError(
                f"models[{i}] ({safe_url(entry.url)}): not enough disk space in {part.parent}: it needs {need} bytes "
                f"free (the file and a {DISK_MARGIN >> 20} MiB margin), {free} are free; free some space or use a "
                "bigger volume (or a lower JOB_MODELS_MAX_GB).",
                {"model": i, "url": safe_url(entry.url), "needed_bytes": need, "free_bytes": free},
            )

    # ---- the state file and the bound ----

    def _state_lock(self):
        return volume_lock.acquire(
            self.settings.volume_root / JOB_MODELS_LOCK, "another job updating the job models", stop=self.stop
        )

    def _record(self, rel: str, entry: ModelEntry, sha256: str | None, size: int) -> None:
        lock = self._state_lock()
        try:
            models, downloads = _read_state(self.state_path)
            now = time.time()
            models[rel] = {"url": entry.url, "sha256": sha256, "size": size, "added": now, "last_used": now}
            downloads.pop(rel, None)
            _write_state(self.state_path, models, downloads)
        finally:
            lock.release()

    def _touch(self, rel: str) -> None:
        lock = self._state_lock()
        try:
            models, downloads = _read_state(self.state_path)
            if rel in models:
                models[rel]["last_used"] = time.time()
                _write_state(self.state_path, models, downloads)
        finally:
            lock.release()

    def _begin_download(self, rel: str, entry: ModelEntry, size: int | None) -> None:
        """Record the download of ``rel`` (its target lock is held) before it starts: should it be cut (a
        timeout, a cancel, a killed worker), its part is known as a job model's and counted in the bound."""
        lock = self._state_lock()
        try:
            models, downloads = _read_state(self.state_path)
            now = time.time()
            started = downloads.get(rel, {}).get("started") or now
            downloads[rel] = {"url": entry.url, "size": size, "started": started, "touched": now}
            _write_state(self.state_path, models, downloads)
        finally:
            lock.release()

    def _end_download(self, rel: str, part: Path) -> None:
        """After a download that did not complete: forget it when no part is left, else note when it was
        last touched (a part left behind is deleted, oldest first, when the bound needs its room)."""
        if not (self.models_dir / rel).is_file() or part.exists():
            lock = self._state_lock()
            try:
                models, downloads = _read_state(self.state_path)
                if rel in downloads:
                    if part.exists():
                        downloads[rel]["touched"] = time.time()
                    else:
                        del downloads[rel]
                    _write_state(self.state_path, models, downloads)
            finally:
                lock.release()

    def _exists(self, rel: str) -> bool:
        path = self.models_dir / rel
        return path.is_file() or path.is_symlink()

    def _make_room(self, i: int, entry: ModelEntry, rel: str, need: int) -> None:
        """Make ``need`` more bytes fit in JOB_MODELS_MAX_GB, counting the job models and the parts their
        cut downloads left; JobError when they cannot. Steps, under the state file's lock:

        1. Forget the records of files deleted by hand (or by prune), and of parts gone with nobody
           downloading them.
        2. Count the job models (not config.yml's), the abandoned parts (a recorded download whose
           target lock is free: nobody fetches it) and the downloads running since before this one at
           their full size, ``rel``'s own part aside (this download resumes it).
        3. Delete abandoned parts, oldest first, then the least recently used job models no running job
           uses, until ``need`` fits (none while comfy.lock.yml is damaged).
        """
        shown = safe_url(entry.url)
        bound = f"JOB_MODELS_MAX_GB={self.settings.job_models_max_gb:g}"
        if need > self.max_bytes:
            raise JobError(
                f"models[{i}] ({shown}) has {need} bytes, more than the job models may take ({bound}); raise "
                "JOB_MODELS_MAX_GB on the endpoint, or put the model in config.yml.",
                {"model": i, "url": shown, "bytes": need, "max_bytes": self.max_bytes},
            )
        lock = self._state_lock()
        try:
            models, downloads = _read_state(self.state_path)
            lock_data = read_lock_file(self.settings.lock_file)
            config = {
                f"{r.get('destination')}/{r.get('filename')}"
                for r in lock_data.get("models") or []
                if isinstance(r, dict)
            }
            for gone in [k for k in models if k != rel and not self._exists(k)]:
                del models[gone]  # deleted by hand (or by prune): no longer taking space
            parts, running = self._other_downloads(downloads, rel, config)
            mine = {k: v for k, v in models.items() if k not in config}  # a file config.yml names is never deleted
            used = sum(int(v.get("size") or 0) for k, v in mine.items() if k != rel) + sum(parts.values())
            used += sum(n for k, n in running.items() if k not in mine)  # what they will take once done
            # a damaged comfy.lock.yml may have lost a config model's record: then nothing is deleted
            if not lock_data.damaged:
                for old in sorted(parts, key=lambda k: downloads[k]["touched"]):
                    if used + need <= self.max_bytes:
                        break
                    if self._delete_part(old):
                        del downloads[old]
                        log.info(
                            "job models: deleted the abandoned partial download of %s to stay within %s", old, bound
                        )
                    used -= parts[old]  # deleted, or being downloaded again now: no longer abandoned
            oldest_first = [] if lock_data.damaged else sorted(mine.items(), key=lambda kv: kv[1].get("last_used") or 0)
            for old, rec in oldest_first:
                if used + need <= self.max_bytes:
                    break
                if old == rel:
                    continue
                with unused(self.models_dir, old) as free:
                    if not free:
                        continue
                    (self.models_dir / old).unlink(missing_ok=True)
                del models[old]
                used -= int(rec.get("size") or 0)
                log.info("job models: deleted %s (least recently used) to stay within %s", old, bound)
            if used + need > self.max_bytes and lock_data.damaged:
                raise JobError(
                    f"models[{i}] ({shown}) needs {need} bytes, more than JOB_MODELS_MAX_GB leaves free, and no job "
                    f"model is deleted to make room while {self.settings.lock_file} is damaged (it could not tell "
                    "config.yml's models); run apply_config.sh (it rewrites the file), or raise JOB_MODELS_MAX_GB.",
                    {"model": i, "url": shown, "bytes": need, "max_bytes": self.max_bytes},
                )
            if used + need > self.max_bytes:
                raise JobError(
                    f"models[{i}] ({shown}) needs {need} bytes but the job models already take {used} of "
                    f"{self.max_bytes} ({bound}) and those left are in use by running jobs; retry later, or raise "
                    "JOB_MODELS_MAX_GB on the endpoint.",
                    {"model": i, "url": shown, "bytes": need, "used_bytes": used, "max_bytes": self.max_bytes},
                )
            _write_state(self.state_path, models, downloads)
        finally:
            lock.release()

    def _download_lock(self, rel: str) -> Path:
        return self.models_dir / ".locks" / f"{rel}.lock"

    def _other_downloads(
        self, downloads: dict[str, dict], rel: str, config: set[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """The recorded downloads other than ``rel`` (this one) and config.yml's targets, as two maps to
        bytes: those nobody runs (their target lock taken without waiting), with the bytes their parts
        take; and those running now (in this job, another job or another worker on the volume) that
        started before this one, with the bytes they take once done (the recorded size, else their
        part's): they are counted in the bound before they finish, so two downloads started together
        cannot both take the room left, and the one started first is never refused for the other.
        Records of abandoned downloads whose part is gone are dropped from ``downloads``."""
        abandoned, running = {}, {}
        mine = downloads.get(rel)
        for other in [k for k in downloads if k != rel and k not in config]:
            part = _part_of(self.models_dir / other)
            with _not_downloading(self._download_lock(other)) as free:
                if not free:
                    # started first (``_sane_download`` made it a number); a tie goes by name, so both agree
                    if mine is None or (downloads[other]["started"], other) < (mine["started"], rel):
                        running[other] = int(_number(downloads[other].get("size"))) or _part_bytes(part)
                    continue
                if not part.exists():
                    del downloads[other]
                    continue
                abandoned[other] = _part_bytes(part)
        return abandoned, running

    def _delete_part(self, rel: str) -> bool:
        """Delete ``rel``'s part and its records when nobody is downloading it (checked again now)."""
        with _not_downloading(self._download_lock(rel)) as free:
            if free:
                discard_part(_part_of(self.models_dir / rel))
            return free


class _TooBig(Exception):
    """Raised from a download's progress: more bytes arrived than the file may have (args: the bytes)."""


def _one_line(err: BaseException) -> str:
    return " ".join(redact_urls(str(err) or type(err).__name__).split()).rstrip(".")


def _mismatch(i: int, entry: ModelEntry, err: ChecksumError) -> str:
    m = re.search(r"got ([0-9a-f]{64}), expected ([0-9a-f]{64})", str(err))
    got, want = (m[1], m[2]) if m else ("?", entry.sha256)
    said = "the entry's sha256" if entry.sha256 else "the sha256 its hub gives"
    return (
        f"models[{i}] ({safe_url(entry.url)}): sha256 mismatch: the downloaded file's sha256 is {got}, {said} is "
        f"{want}; nothing was kept (check the url and the entry's 'sha256')."
    )


async def prepare(
    entries: list[ModelEntry],
    settings: Settings,
    uses: Uses,
    deadline: float,
    timeout: float,
    on_progress=None,
) -> list[dict]:
    """Make the job's models present before ``deadline`` (monotonic); the result's ``models`` list.
    On the deadline or a cancel the downloads are stopped (their parts kept for the next job)."""
    if settings.job_models_max_gb <= 0:
        raise JobError(
            "This endpoint does not take job models (JOB_MODELS_MAX_GB=0): remove 'models' from the input, or put "
            "the models in config.yml, or set JOB_MODELS_MAX_GB on the endpoint.",
            {"setting": "JOB_MODELS_MAX_GB"},
        )
    stop = threading.Event()
    fetcher = JobModels(settings, uses, stop, on_progress)
    future = asyncio.get_running_loop().run_in_executor(None, fetcher.run, entries)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            reports = await asyncio.shield(future)
    except TimeoutError:
        stop.set()
        await _wind_down(future)
        raise JobError(
            f"The job timed out after {timeout:g} s while its models were fetched; the workflow was not queued "
            "(a partial download is kept and resumed by the next job that names it).",
            {"timeout_s": timeout, "state": "models"},
        ) from None
    except BaseException:
        stop.set()
        await _wind_down(future)
        raise
    return [r.as_dict() for r in reports]


async def _wind_down(future) -> None:
    """Wait (bounded) for the stopped fetch, so its locks are released before the job ends."""
    with contextlib.suppress(BaseException):  # its own error (the stop) is not this job's answer
        await asyncio.wait_for(asyncio.shield(future), STOP_WAIT_S)
