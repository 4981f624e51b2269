#!/usr/bin/env python3
"""Download the models listed in config.yml (SPEC §5): Hugging Face, CivitAI and any HTTP(S) URL.

Each entry becomes ``models/<destination>/<filename>``:

1. The file name is the entry's ``filename``, else the one recorded in comfy.lock.yml for this url,
   else the server's Content-Disposition, else the last URL path segment (never a path).
2. A present file is kept without any network when comfy.lock.yml records it for the same url with
   the same size (and the sha256 the config asks for); otherwise it is checked once (the expected
   sha256 when known, else the server's size) and recorded. A changed url, or ``--force``, downloads
   it again (the old file stays usable until the new one is renamed over it).
3. Downloads run under a lock per target (``models/.locks/<destination>/<filename>.lock``, filelock),
   so two processes sharing a volume never write the same file: the second waits, then finds the
   finished file and skips it.
   Bytes go to ``<target>.part`` (resumable, see http_download.py: a part is resumed only when it was
   started for the same entry url, not the signed CDN link, which changes every run, and the server
   still has the same version of the file by its ETag/Last-Modified and size), are verified (size;
   sha256 hashed while they arrive) and renamed into place atomically; then comfy.lock.yml gets the entry's url,
   destination, filename, sha256 and size, so the lock file can be fed back as a config.

Sources:

- Hugging Face (``https://huggingface.co/<repo>/resolve/<rev>/<path>``, also ``/blob/``, datasets and
  spaces): ``huggingface_hub`` resolves the file (its HEAD on the resolve URL gives the commit, the size,
  the LFS sha256 and the CDN location; ``HF_ENDPOINT`` moves the hub, e.g. to a local fake in tests).
  Files stored with Xet are fetched by ``hf_hub_download`` when ``hf_xet`` is installed (hf_xet fetches
  and verifies content-addressed chunks in parallel; its own ``.incomplete`` file and lock live in a
  hidden staging folder next to the target, our lock is held around it and the result is renamed into
  place, so a half-done Xet download is never mistaken for a model; a sha256 from the config then
  costs one read of the finished file, because hf_xet does not expose the bytes as they arrive).
  Every other file (LFS on the CDN, or Xet without hf_xet) goes through our own ranged downloader
  against the CDN location, so it gets the ``.part``/resume/hash-while-downloading treatment and
  several connections. ``hf_transfer`` is not used: the pinned huggingface_hub (2.x) no longer calls it,
  and our ranged downloader does the same job (parallel ranges) while hashing. The hub's LFS ETag is the file's sha256, so Hugging Face
  files are verified even when the config gives no sha256.
- CivitAI: ``/api/download/models/<versionId>`` directly; ``/models/<id>?modelVersionId=<v>`` becomes
  that; a bare ``/models/<id>`` asks ``/api/v1/models/<id>`` for the newest version's primary file (and
  its SHA256). ``CIVITAI_BASE_URL`` moves the site (tests).
- Anything else: plain HTTP(S).

Tokens: ``HF_TOKEN`` goes only to the Hugging Face host(s) (huggingface.co, hf.co, ``HF_ENDPOINT``), and
``CIVITAI_TOKEN`` only to the CivitAI host(s) (civitai.com, ``CIVITAI_BASE_URL``), as
``Authorization: Bearer``. Redirects are followed by hand and every hop gets headers for its own host,
so a CDN behind a redirect never receives a token.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from filelock import FileLock

from comfy_worker.cli import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    add_common_args,
    format_table,
    human_size,
    settings_and_config,
)
from comfy_worker.config_schema import ModelEntry
from comfy_worker.http_download import (
    Downloader,
    DownloadError,
    MiB,
    Probe,
    RetryableError,
    discard_part,
    safe_filename,
    same_host,
    url_filename,
)
from comfy_worker.lock_file import read_lock_file, update_lock_file
from comfy_worker.log_setup import setup_logging
from comfy_worker.settings import Settings

log = logging.getLogger("download_models")

HF_HOSTS = ("https://huggingface.co", "https://hf.co")
CIVITAI_HOSTS = ("https://civitai.com", "https://www.civitai.com")
HF_PATH = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<path>.+)$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DISK_MARGIN = 64 * MiB


# ---- which host gets which token ----


class TokenPolicy:
    """Headers for a URL: a token only for its own service's host (compared by host and port)."""

    def __init__(self, settings: Settings):
        self.hf_hosts = (*HF_HOSTS, settings.hf_endpoint)
        self.civitai_hosts = (*CIVITAI_HOSTS, settings.civitai_base_url)
        self.hf_token = settings.hf_token
        self.civitai_token = settings.civitai_token

    def is_hf(self, url: str) -> bool:
        return any(same_host(url, h) for h in self.hf_hosts)

    def is_civitai(self, url: str) -> bool:
        return any(same_host(url, h) for h in self.civitai_hosts)

    def headers_for(self, url: str) -> dict[str, str]:
        if self.hf_token and self.is_hf(url):
            return {"Authorization": f"Bearer {self.hf_token}"}
        if self.civitai_token and self.is_civitai(url):
            return {"Authorization": f"Bearer {self.civitai_token}"}
        return {}


# ---- one entry ----


@dataclass
class Job:
    index: int
    entry: ModelEntry
    source: str = "http"
    name: str | None = None
    target: Path | None = None
    size: int | None = None
    sha256: str | None = None
    seconds: float = 0.0
    fetched: int = 0
    status: str = "pending"
    error: str | None = None
    ok: bool = False
    download_url: str | None = None
    probe: Probe | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.entry.filename or self.entry.url_filename()


def source_of(url: str, tokens: TokenPolicy) -> str:
    if tokens.is_hf(url) and HF_PATH.match(urlparse(url).path):
        return "huggingface"
    if tokens.is_civitai(url):
        return "civitai"
    return "http"


def rebase(url: str, base: str, hosts: tuple[str, ...]) -> str:
    """Point a URL written for the public site (huggingface.co, civitai.com) at the configured base."""
    p = urlparse(url)
    if any(same_host(url, h) for h in hosts):
        b = urlparse(base)
        return p._replace(scheme=b.scheme, netloc=b.netloc, path=b.path.rstrip("/") + p.path).geturl()
    return url


class Provisioner:
    def __init__(self, settings: Settings, models_dir: Path, force: bool = False, dry_run: bool = False):
        self.settings = settings
        self.models_dir = models_dir
        self.force = force
        self.dry_run = dry_run
        self.tokens = TokenPolicy(settings)
        self.stop = threading.Event()  # set on SIGTERM: also ends any retry backoff wait at once
        self.downloader = Downloader(
            headers_for=self.tokens.headers_for,
            connections=settings.download_connections,
            retries=settings.download_retries,
            backoff=settings.download_retry_backoff,
            stop=self.stop,
        )
        self.tty = sys.stderr.isatty()
        self._disk_lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._record_lock = threading.Lock()
        self._claimed: dict[str, int] = {}
        self.recorded: list[dict] = []
        self._reload_records()

    # ---- lock file ----

    def _reload_records(self) -> None:
        recorded = read_lock_file(self.settings.lock_file).get("models") or []
        with self._record_lock:
            self.recorded = [r for r in recorded if isinstance(r, dict)]

    def record_for(self, job: Job) -> dict | None:
        """The comfy.lock.yml entry for this job: same target (when known) or same url + destination."""
        for r in self.recorded:
            if r.get("destination") != job.entry.destination:
                continue
            if job.name is not None and r.get("filename") == job.name:
                return r
            if job.name is None and r.get("url") == job.entry.url:
                return r
        return None

    def record(self, job: Job) -> None:
        entry = {
            "url": job.entry.url,
            "destination": job.entry.destination,
            "filename": job.name,
            "sha256": job.sha256,
            "size": job.size,
        }
        if job.entry.optional:
            entry["optional"] = True

        def merge(old):
            kept = [
                r
                for r in (old or [])
                if isinstance(r, dict)
                and not (r.get("destination") == entry["destination"] and r.get("filename") == entry["filename"])
            ]
            return [*kept, entry]

        with self._record_lock:
            update_lock_file(self.settings.lock_file, "models", merge)
            self.recorded = [
                r
                for r in self.recorded
                if not (r.get("destination") == entry["destination"] and r.get("filename") == entry["filename"])
            ] + [entry]

    # ---- resolving names and sources ----

    def resolve(self, job: Job, need_network: bool) -> None:
        """Fill in source, download URL and (when possible) name/size/sha256. Without ``need_network``
        only what is knowable offline."""
        entry = job.entry
        job.source = source_of(entry.url, self.tokens)
        if entry.filename:
            job.name = entry.filename
        elif (rec := self.record_for(job)) and safe_filename(rec.get("filename")):
            job.name = rec["filename"]
        elif job.source == "huggingface":
            job.name = url_filename(entry.url)
        if not need_network:
            return
        if job.source == "huggingface":
            self._resolve_hf(job)
        elif job.source == "civitai":
            self._resolve_civitai(job)
        else:
            job.download_url = entry.url
        if job.source != "huggingface" or not (self.dry_run or job.extra.get("xet")):
            if job.probe is None:
                job.probe = (
                    self.downloader.head(job.download_url) if self.dry_run else self.downloader.probe(job.download_url)
                )
            if job.size is None:
                job.size = job.probe.size
        if job.name is None:
            job.name = (job.probe and job.probe.filename) or url_filename(job.download_url) or entry.url_filename()
        want_size = entry.size
        if want_size is not None:
            if job.size is not None and job.size != want_size:
                raise DownloadError(f"the server's file has {job.size} bytes but the config says size: {want_size}")
            job.size = want_size

    def _resolve_hf(self, job: Job) -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        m = HF_PATH.match(urlparse(job.entry.url).path)
        assert m is not None
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(m["type"] or "", "model")
        repo_id, revision, path = unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"])
        endpoint = self.settings.hf_endpoint
        url = hf_hub_url(repo_id, path, repo_type=repo_type, revision=revision, endpoint=endpoint)
        what = f"Hugging Face {repo_id}/{path}@{revision}"

        def metadata():
            try:
                return get_hf_file_metadata(url, token=self.settings.hf_token or False, endpoint=endpoint)
            except HfHubHTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status is None or status in (408, 429) or status >= 500:
                    raise RetryableError(f"{what}: HTTP {status}") from None
                hint = {401: " (gated or private: set HF_TOKEN)", 403: " (gated: accept the terms, set HF_TOKEN)"}
                hint[404] = " (check the repo, revision and file path)"
                raise DownloadError(f"{what}: HTTP {status}{hint.get(status, '')}") from None
            except (OSError, *_hf_transport_errors()) as err:  # network errors of huggingface_hub's client
                raise RetryableError(f"{what}: {type(err).__name__}: {err}") from None

        meta = self.downloader.with_retries(what, metadata)
        job.size = meta.size
        etag = (meta.etag or "").lower()
        job.extra["hub_sha256"] = etag if SHA256_RE.match(etag) else None
        job.extra["hf"] = (repo_id, repo_type, meta.commit_hash or revision, path)
        job.download_url = meta.location
        if meta.xet_file_data is not None and _has_hf_xet():
            job.extra["xet"] = True

    def _resolve_civitai(self, job: Job) -> None:
        base = self.settings.civitai_base_url
        hosts = (*CIVITAI_HOSTS, base)
        p = urlparse(job.entry.url)
        version = parse_qs(p.query).get("modelVersionId", [None])[0]
        if p.path.startswith("/api/download/models/"):
            job.download_url = rebase(job.entry.url, base, hosts)
            return
        m = re.match(r"^/models/(\d+)", p.path)
        if m and version:
            job.download_url = f"{base}/api/download/models/{quote(version)}"
            return
        if not m:
            job.download_url = rebase(job.entry.url, base, hosts)
            return
        api = f"{base}/api/v1/models/{m[1]}"

        def fetch():
            resp = self.downloader.open(api, "GET", {"Accept": "application/json"})
            with resp:
                return resp.json()

        try:
            data = self.downloader.with_retries(f"CivitAI model {m[1]}", fetch)
        except ValueError:
            raise DownloadError(f"CivitAI: {api} did not return JSON") from None
        versions = data.get("modelVersions") or []
        if not versions:
            raise DownloadError(f"CivitAI model {m[1]} has no versions to download")
        files = versions[0].get("files") or []
        primary = next((f for f in files if f.get("primary")), files[0] if files else None)
        if not primary or not primary.get("downloadUrl"):
            raise DownloadError(f"CivitAI model {m[1]}: the newest version has no downloadable file")
        job.download_url = rebase(primary["downloadUrl"], base, hosts)
        if not job.name and safe_filename(primary.get("name")):
            job.name = safe_filename(primary["name"])
        sha = str((primary.get("hashes") or {}).get("SHA256") or "").lower()
        job.extra["hub_sha256"] = sha if SHA256_RE.match(sha) else None
        log.info("CivitAI model %s: newest version %s, file %s", m[1], versions[0].get("id"), primary.get("name"))

    # ---- the work for one entry ----

    def target_of(self, job: Job) -> Path:
        name = safe_filename(job.name)
        if not name:
            raise DownloadError(f"cannot tell a file name for {job.entry.url}; set 'filename' in the config")
        return self.models_dir / job.entry.destination / name

    def run(self, job: Job) -> Job:
        started = time.monotonic()
        try:
            self._run(job)
        except DownloadError as err:
            job.error = str(err)
        except Exception as err:  # one broken entry must not take the others down
            log.exception("%s: unexpected error", job.label)
            job.error = f"{type(err).__name__}: {err}"
        job.seconds = time.monotonic() - started
        if job.error:
            job.status = "failed (optional)" if job.entry.optional else "FAILED"
            level = logging.WARNING if job.entry.optional else logging.ERROR
            log.log(level, "models[%d] %s (%s): %s", job.index, job.label, job.entry.url, job.error)
        return job

    def _present(self, job: Job) -> bool:
        """Is the final file there and good? (cheap when comfy.lock.yml vouches for it)"""
        target = job.target
        assert target is not None
        if self.force or not target.is_file():
            return False
        size = target.stat().st_size
        rec = self.record_for(job)
        want_sha = job.entry.sha256
        if (
            rec
            and rec.get("url") == job.entry.url
            and rec.get("size") == size
            and (not want_sha or rec.get("sha256") == want_sha)
        ):
            job.size, job.sha256 = size, rec.get("sha256")
            return True
        return False

    def _check_existing(self, job: Job) -> bool:
        """A present file without a matching record: verify it once, then record it."""
        target = job.target
        assert target is not None
        if self.force or not target.is_file():
            return False
        size = target.stat().st_size
        want_sha = job.entry.sha256 or job.extra.get("hub_sha256")
        rec = self.record_for(job)
        if rec and rec.get("url") != job.entry.url:
            log.info("%s: the url changed since it was downloaded; downloading again", target)
            return False
        if job.size is not None and job.size != size:
            log.warning("%s: present with %d bytes but the server has %d; downloading again", target, size, job.size)
            return False
        if job.size is None and not want_sha:
            return False
        digest = _sha256_file(target)
        if want_sha and digest != want_sha:
            log.warning("%s: present but its sha256 differs from the expected one; downloading again", target)
            return False
        job.size, job.sha256 = size, digest
        self.record(job)
        return True

    def _run(self, job: Job) -> None:
        self.resolve(job, need_network=False)
        if job.name:
            job.target = self.target_of(job)
            if self._present(job):
                job.status, job.ok = "present", True
                return
        self.resolve(job, need_network=True)
        job.target = self.target_of(job)
        target = job.target
        with self._record_lock:
            other = self._claimed.setdefault(str(target), job.index)
        if other != job.index:
            raise DownloadError(
                f"models[{other}] already downloads to {target}; give one of them another 'filename' or 'destination'"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.models_dir / ".locks" / job.entry.destination / (target.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path))  # kept after use: deleting a flock file races with waiters
        try:
            lock.acquire(timeout=1)
        except Exception:
            log.info("%s: another process is downloading it; waiting", target.name)
            lock.acquire()
        try:
            self._reload_records()  # another process may have just finished this very file
            if self._present(job) or self._check_existing(job):
                job.status, job.ok = "present", True
                discard_part(target.with_name(target.name + ".part"))  # a leftover of an interrupted --force run
                return
            self._download(job)
        finally:
            lock.release()

    def _download(self, job: Job) -> None:
        target = job.target
        assert target is not None
        part = target.with_name(target.name + ".part")
        want_sha = job.entry.sha256 or job.extra.get("hub_sha256")
        self._reserve_disk(job, part)
        progress = self._progress(job)
        try:
            if job.extra.get("xet"):
                self._download_xet(job, part, progress)
            else:
                result = self.downloader.fetch(
                    job.download_url,
                    part,
                    expected_size=job.size,
                    expected_sha256=want_sha,
                    probe=job.probe,
                    progress=progress,
                    stop=self.stop,
                    source=job.entry.url,  # not the signed CDN link: that one changes on every run
                )
                job.size, job.sha256, job.fetched = result.size, result.sha256, result.fetched
                if result.resumed_from:
                    log.info("%s: resumed from %s", target.name, human_size(result.resumed_from))
        finally:
            progress.close()
            with self._disk_lock:
                self._reserved.pop(str(target), None)
        os.replace(part, target)
        self.record(job)
        job.status, job.ok = "downloaded", True

    def _download_xet(self, job: Job, part: Path, progress) -> None:
        from huggingface_hub import hf_hub_download

        repo_id, repo_type, revision, path = job.extra["hf"]
        staging = part.parent / f".{part.name}.hf"
        got = hf_hub_download(
            repo_id,
            path,
            repo_type=repo_type,
            revision=revision,
            local_dir=staging,
            endpoint=self.settings.hf_endpoint,
            token=self.settings.hf_token or False,
        )
        os.replace(got, part)
        shutil.rmtree(staging, ignore_errors=True)
        size = part.stat().st_size
        if job.size is not None and size != job.size:
            part.unlink()
            raise DownloadError(f"size mismatch: got {size} bytes, expected {job.size}")
        if job.entry.sha256:
            digest = _sha256_file(part)
            if digest != job.entry.sha256:
                part.unlink()
                raise DownloadError(f"sha256 mismatch: got {digest}, expected {job.entry.sha256}")
            job.sha256 = digest
        else:
            job.sha256 = job.extra.get("hub_sha256")
        job.size = job.fetched = size
        progress(size, size)

    def _reserve_disk(self, job: Job, part: Path) -> None:
        if job.size is None:
            return
        have = part.stat().st_size if part.exists() else 0
        need = max(0, job.size - have)
        with self._disk_lock:
            free = shutil.disk_usage(part.parent).free - sum(self._reserved.values())
            if need + DISK_MARGIN > free:
                raise DownloadError(
                    f"not enough disk space in {part.parent}: needs {human_size(need)} more, "
                    f"{human_size(max(free, 0))} free; free some space or use a bigger volume"
                )
            self._reserved[str(job.target)] = need

    def _progress(self, job: Job):
        return _Progress(job.label, job.size, self.tty, self.settings.download_log_interval)


class _Progress:
    """A tqdm bar on a terminal, a log line every ``interval`` seconds otherwise."""

    def __init__(self, name: str, total: int | None, tty: bool, interval: float):
        self.name, self.total, self.interval = name, total, interval
        self.started = self.last_log = time.monotonic()
        self.done = 0
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name[:40], leave=False)

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if self.bar is None and now - self.last_log >= self.interval:
            self.last_log = now
            rate = done / max(now - self.started, 1e-6) / 1e6
            pct = f"{100 * done / total:.0f}% " if total else ""
            log.info("%s: %s%s / %s at %.1f MB/s", self.name, pct, human_size(done), human_size(total), rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hf_transport_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2  # huggingface_hub's HTTP client

        return (httpx2.TransportError,)
    except ImportError:
        return ()


def _has_hf_xet() -> bool:
    try:
        import hf_xet  # noqa: F401
    except ImportError:
        return False
    return True


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- CLI ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download the models listed in config.yml.")
    add_common_args(parser)
    parser.add_argument("--models-dir", metavar="DIR", help="models folder (default $COMFYUI_PATH/models)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these entries (file name or url)")
    return parser


def matches(entry: ModelEntry, name: str, recorded: list[dict]) -> bool:
    names = {entry.url, entry.url_filename(), entry.planned_path(), entry.filename or ""}
    names |= {
        str(r.get("filename"))
        for r in recorded
        if r.get("url") == entry.url and r.get("destination") == entry.destination
    }
    return name in names


def shown_url(job: Job) -> str:
    """Where an entry comes from, for people: the entry's own URL for Hugging Face, whose download
    location is a signed CDN link (a short-lived credential); the resolved download URL otherwise
    (e.g. the CivitAI download a model page stands for)."""
    if job.source == "huggingface" or not job.download_url:
        return job.entry.url
    return job.download_url


def summary(jobs: list[Job], dry_run: bool) -> str:
    rows = []
    for j in jobs:
        mbs = f"{j.fetched / j.seconds / 1e6:.1f}" if j.fetched and j.seconds > 0 else "-"
        status = j.status if not j.error else f"{j.status}: {j.error}"
        rows.append([j.label, human_size(j.size), j.source, f"{j.seconds:.1f}", mbs, status])
    if dry_run:
        rows = [[j.label, human_size(j.size), j.source, str(j.target or "?"), shown_url(j), j.status] for j in jobs]
        return format_table(["name", "size", "source", "target", "from", "action"], rows)
    return format_table(["name", "size", "source", "seconds", "MB/s", "status"], rows)


def dry_run_job(prov: Provisioner, job: Job) -> Job:
    try:
        prov.resolve(job, need_network=True)
        job.target = prov.target_of(job)
        present = job.target.is_file() and (job.size is None or job.target.stat().st_size == job.size)
        job.status = "present" if present and not prov.force else "would download"
        job.ok = True
    except DownloadError as err:
        job.error = str(err)
        job.status = "failed (optional)" if job.entry.optional else "FAILED"
    return job


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = settings_and_config(args)
    if isinstance(loaded, int):
        return loaded
    settings, cfg = loaded
    setup_logging()
    for noisy in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    models_dir = Path(args.models_dir) if args.models_dir else settings.models_dir
    prov = Provisioner(settings, models_dir, force=args.force, dry_run=args.dry_run)
    jobs = [Job(i, e) for i, e in enumerate(cfg.models)]
    if args.only:
        unknown = [n for n in args.only if not any(matches(j.entry, n, prov.recorded) for j in jobs)]
        if unknown:
            names = ", ".join(j.entry.filename or j.entry.url_filename() for j in jobs) or "(none)"
            print(f"error: --only: no model entry named {', '.join(unknown)}; entries: {names}", file=sys.stderr)
            return EXIT_INVALID
        jobs = [j for j in jobs if any(matches(j.entry, n, prov.recorded) for n in args.only)]
    if not jobs:
        print("no models to download")
        return EXIT_OK

    if args.dry_run:
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            jobs = list(pool.map(lambda j: dry_run_job(prov, j), jobs))
        print(summary(jobs, dry_run=True))
        return EXIT_FAILED if any(j.error and not j.entry.optional for j in jobs) else EXIT_OK

    def on_signal(signum, frame):
        prov.stop.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    pool = ThreadPoolExecutor(max(1, args.parallel), thread_name_prefix="entry")
    try:
        futures = [pool.submit(prov.run, j) for j in jobs]
        while not all(f.done() for f in futures):
            time.sleep(0.1)
    except KeyboardInterrupt:
        prov.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        print("interrupted; partial downloads are kept as .part files and resume on the next run", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    print(summary(jobs, dry_run=False))
    failed = [j for j in jobs if not j.ok and not j.entry.optional]
    warned = [j for j in jobs if not j.ok and j.entry.optional]
    if warned:
        log.warning("%d optional model(s) failed; continuing without them", len(warned))
    if failed:
        log.error("%d required model(s) failed", len(failed))
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
