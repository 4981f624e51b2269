#!/usr/bin/env python3
"""Download the models listed in config.yml (docs/architecture.md): Hugging Face, CivitAI and any HTTP(S) URL.

Each entry becomes ``models/<destination>/<filename>``:

1. The file name is the entry's ``filename``, else the one recorded in comfy.lock.yml for this url,
   else the hub's (Hugging Face path, CivitAI API), else the server's Content-Disposition, else the last
   URL path segment; a name chosen by a server is made safe first (``http_download.safe_filename``:
   no path, no control or bidi characters, no hidden file, none of our own suffixes, short enough that
   it plus our suffixes fits the filesystem's 255 bytes).
2. Whether a present file is kept is decided in one place (``Provisioner.present``): it is kept without
   any network when comfy.lock.yml records it for the same url with the same size and a sha256 (the
   one the config asks for, when it asks); otherwise it is checked against what the config and the
   source say (the expected sha256: the config's, else the hub's; else the expected size) and
   recorded. A changed url downloads it again (the old file stays usable until the new one is
   renamed over it). ``--force`` trusts no record: every present file is hashed against its sha256
   (the entry's, else the source's, else the record's) and replaced when it differs; a file with no
   sha256 to check is downloaded again. A file that could not be verified (below) is checked again
   on every run, and verified as soon as the config or the server says more.
3. Downloads run under a lock per target (``models/.locks/<destination>/<filename>.lock``, filelock,
   waited for through ``volume_lock.acquire``: said in the log, ended by SIGTERM), so two processes
   sharing a volume never write the same file: the second waits, then finds the finished file and
   skips it. A volume without working ``flock`` is reported once, before any download.
   Bytes go to ``<target>.part`` (resumable, see http_download.py: a part is resumed only when it was
   started for the same entry url, not the signed CDN link, which changes every run, and the server
   still has the same version of the file by its ETag/Last-Modified and size), are verified (size;
   sha256 hashed while they arrive), fsynced, renamed into place atomically, the folder fsynced; then
   comfy.lock.yml gets the entry's url, destination, filename, sha256 and size, so the lock file can be
   fed back as a config. When neither a size nor a sha256 is known (a server that sends no length, no
   ``sha256:`` in the config), a cut-off transfer cannot be told from a whole file: the file is kept,
   shown as ``downloaded (unverified)``, recorded with ``sha256: null`` and ``size: null``, and the log
   says how to pin it.

4. A Hugging Face entry whose file already lies in a hub cache on the host (``HF_HUB_CACHE``, RunPod's
   cached models in ``/runpod-volume/huggingface-cache/hub``; ``settings.hf_cache_dirs``) is linked,
   not downloaded, before any network (``Provisioner.link_cached``, comfy_worker/hf_cache.py): under
   the target's lock, after a sha256 check (the entry's, else the blob's name, which is the LFS
   sha256; a mismatch is refused and the entry downloaded instead), a symlink to the cached blob is
   renamed into place and recorded in comfy.lock.yml like a download; the action says
   ``linked from cache``.

Where an entry downloads from, and which token goes to which host: comfy_worker/model_sources.py.
Hugging Face files stored with Xet are fetched by ``hf_hub_download`` when ``hf_xet`` is installed
(hf_xet fetches and verifies content-addressed chunks in parallel; its own ``.incomplete`` file and
lock live in a hidden staging folder ``.<filename>.part.hf`` next to the target, which a later run
resumes; our lock is held around it, SIGTERM ends the wait for it, and the result is renamed into
place, so a half-done Xet download is never mistaken for a model; a sha256 from the config then costs
one read of the finished file, because hf_xet does not expose the bytes as they arrive). Every other
file goes through our own ranged downloader, so it gets the ``.part``/resume/hash-while-downloading
treatment and several connections. ``hf_transfer`` is not used: the pinned huggingface_hub (2.x) no
longer calls it, and our ranged downloader does the same job (parallel ranges) while hashing.

Nothing shown to people (log, summary, errors) carries a URL's query string: signed CDN links and
tokens live there.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

# what the imports below make lives until the exit: no garbage collection while they run (a small
# download's whole run ~8 ms shorter)
gc.disable()
try:
    from comfy_worker import hf_cache, volume_lock
    from comfy_worker.cli import (
        add_common_args,
        format_table,
        human_size,
        run_parallel,
        settings_and_config,
        status_word,
    )
    from comfy_worker.config_schema import ModelEntry
    from comfy_worker.exit_codes import EXIT_FAILED, EXIT_INVALID, EXIT_OK
    from comfy_worker.file_names import MAX_NAME_BYTES, safe_filename, url_filename
    from comfy_worker.http_download import (
        ChecksumError,
        Downloader,
        DownloadError,
        Interrupted,
        MiB,
        Probe,
        discard_part,
        fsync_path,
    )
    from comfy_worker.lock_file import read_lock_file, update_lock_file
    from comfy_worker.log_setup import redact_urls, setup_logging
    from comfy_worker.model_sources import CIVITAI, HUGGINGFACE, ModelSource, Sources, TokenPolicy, hf_file
    from comfy_worker.settings import Settings
except ModuleNotFoundError as missing:  # started with a Python that lacks the project's packages
    from comfy_worker.project_python import run_again

    run_again(missing)
gc.enable()

# run as a script this module is __main__; its log lines still say download_models
log = logging.getLogger(Path(__file__).stem if __name__ == "__main__" else __name__)

DISK_MARGIN = 64 * MiB  # kept free beyond every download's remaining bytes (docs/configuration.md)

# the action column: what happened to an entry (the status column says how it ended)
PRESENT = "present"
PRESENT_UNVERIFIED = "present (unverified)"
DOWNLOADED = "downloaded"
DOWNLOADED_UNVERIFIED = "downloaded (unverified)"
LINKED = "linked from cache"
WOULD_DOWNLOAD = "would download"
WOULD_LINK = "would link from cache"
INTERRUPTED = "interrupted"


@dataclass
class ModelResult:
    """One config entry: where it comes from, where it goes, and how it ended."""

    index: int
    entry: ModelEntry
    kind: str = "http"  # huggingface | civitai | http (known offline)
    source: ModelSource | None = None  # after resolving (network)
    probe: Probe | None = None
    name: str | None = None
    target: Path | None = None
    size: int | None = None
    sha256: str | None = None
    verified: bool = True  # False: neither a size nor a sha256 was known to check the bytes against
    seconds: float = 0.0
    fetched: int = 0
    action: str = ""
    error: str | None = None
    ok: bool = False

    @property
    def label(self) -> str:
        return self.name or self.entry.filename or url_filename(self.entry.url) or self.entry.url_filename()

    @property
    def status(self) -> str:
        return status_word(self.ok, self.entry.optional)


def one_line(text: str) -> str:
    return " ".join(redact_urls(text).split())


class Provisioner:
    def __init__(self, settings: Settings, models_dir: Path, force: bool = False, dry_run: bool = False):
        self.settings = settings
        self.models_dir = models_dir
        self.force = force
        self.dry_run = dry_run
        self.tokens = TokenPolicy(settings)
        self.stop = threading.Event()  # set on SIGTERM: ends downloads, lock waits and retry backoffs
        self.downloader = Downloader(
            headers_for=self.tokens.headers_for,
            connections=settings.download_connections,
            retries=settings.download_retries,
            backoff=settings.download_retry_backoff,
            stop=self.stop,
        )
        self.sources = Sources(settings, self.downloader, self.tokens)
        self.tty = sys.stderr.isatty()
        self._disk_lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._record_lock = threading.Lock()
        self._claimed: dict[str, int] = {}
        self.recorded: list[dict] = []
        self._reload_records()

    # ---- lock file ----

    def _reload_records(self) -> None:
        recorded = read_lock_file(self.settings.lock_file).get("models")
        with self._record_lock:
            self.recorded = [r for r in recorded if isinstance(r, dict)] if isinstance(recorded, list) else []

    def record_for(self, r: ModelResult) -> dict | None:
        """The comfy.lock.yml entry for this result: same target (when known) or same url + destination."""
        for rec in self.recorded:
            if rec.get("destination") != r.entry.destination:
                continue
            if r.name is not None and rec.get("filename") == r.name:
                return rec
            if r.name is None and rec.get("url") == r.entry.url:
                return rec
        return None

    def record(self, r: ModelResult) -> None:
        entry = {
            "url": r.entry.url,
            "destination": r.entry.destination,
            "filename": r.name,
            # an unverified file pins nothing: fed back as a config, it must not vouch for a cut-off file
            "sha256": r.sha256 if r.verified else None,
            "size": r.size if r.verified else None,
        }
        if r.entry.optional:
            entry["optional"] = True

        def same_target(rec) -> bool:
            return rec.get("destination") == entry["destination"] and rec.get("filename") == entry["filename"]

        def merge(old):
            kept = [rec for rec in (old if isinstance(old, list) else []) if isinstance(rec, dict)]
            return [*(rec for rec in kept if not same_target(rec)), entry]

        with self._record_lock:
            update_lock_file(self.settings.lock_file, "models", merge)
            self.recorded = [rec for rec in self.recorded if not same_target(rec)] + [entry]

    # ---- resolving names and sources ----

    def resolve(self, r: ModelResult, need_network: bool) -> None:
        """Fill in the source kind and (when possible) name/size/sha256. Without ``need_network`` only
        what is knowable offline."""
        entry = r.entry
        r.kind = self.sources.kind_of(entry.url)
        if entry.filename:
            r.name = entry.filename
        elif (rec := self.record_for(r)) and safe_filename(rec.get("filename")) == rec.get("filename"):
            r.name = rec["filename"]
        elif name := self.sources.offline_name(entry.url):
            r.name = name
        if not need_network:
            return
        source = self.sources.resolve(entry.url)
        if not (source.kind == HUGGINGFACE and (self.dry_run or (source.hf and source.hf.xet))):
            if r.probe is None:
                r.probe = self.downloader.head(source.url) if self.dry_run else self.downloader.probe(source.url)
            if source.size is None:
                source = replace(source, size=r.probe.size)
        r.source = source
        if r.name is None:
            r.name = self._server_name(r)
        r.size = source.size
        if entry.size is not None:
            if r.size is not None and r.size != entry.size:
                raise DownloadError(f"the server's file has {r.size} bytes but the config says size: {entry.size}")
            r.size = entry.size

    def _server_name(self, r: ModelResult) -> str | None:
        source, probe = r.source, r.probe
        assert source is not None
        if source.name:
            return source.name
        if probe is not None and probe.offered_name:
            if probe.filename != probe.offered_name.strip():
                log.warning(
                    "models[%d]: the server's file name %r is not safe to use as is; %s "
                    "(set 'filename' in the config to choose)",
                    r.index,
                    probe.offered_name,
                    f"saving as {probe.filename!r}" if probe.filename else "using the URL's name instead",
                )
            if probe.filename:
                return probe.filename
        return url_filename(source.url) or url_filename(r.entry.url)

    # ---- the work for one entry ----

    def target_of(self, r: ModelResult) -> Path:
        name = r.name
        if not name or safe_filename(name) is None:
            raise DownloadError(
                f"cannot tell a usable file name for {redact_urls(r.entry.url)}; set 'filename' in the config"
            )
        if len(name.encode()) > MAX_NAME_BYTES:
            raise DownloadError(
                f"the file name is {len(name.encode())} bytes long; with the suffixes of a download in progress "
                f"it would not fit the filesystem's 255-byte limit: set a 'filename' of at most {MAX_NAME_BYTES} bytes"
            )
        return self.models_dir / r.entry.destination / name

    def run(self, r: ModelResult) -> ModelResult:
        started = time.monotonic()
        try:
            self._run(r)
        except (volume_lock.Interrupted, Interrupted):
            r.action, r.error = INTERRUPTED, "interrupted"
        except (DownloadError, volume_lock.LockError) as err:
            r.error = one_line(str(err))
        except Exception as err:  # one broken entry must not take the others down
            log.error("%s: unexpected error\n%s", r.label, redact_urls(traceback.format_exc()))
            r.error = one_line(f"{type(err).__name__}: {err}")
        r.seconds = time.monotonic() - started
        if r.error and r.action != INTERRUPTED:
            level = logging.WARNING if r.entry.optional else logging.ERROR
            log.log(level, "models[%d] %s (%s): %s", r.index, r.label, redact_urls(r.entry.url), r.error)
        return r

    def present(self, r: ModelResult) -> bool:
        """Is the final file there and good? The one answer, offline (``r.source`` unknown: only a
        matching record counts) and after resolving (then checked against the config and the source,
        hashing the file once, and recorded). A record vouches for a file only when its sha256 is the
        one the config asks for (when it asks). With ``--force`` no record vouches: every present file
        is hashed against the sha256 of its entry, else its source's, else its record's, and replaced
        when it differs; a file with no sha256 to check it against is downloaded again."""
        target = r.target
        assert target is not None
        online = r.source is not None
        if not target.is_file() or (self.force and not online):
            return False
        size = target.stat().st_size
        rec = self.record_for(r)
        if rec and rec.get("url") != r.entry.url:
            if online:
                log.info("%s: the url changed since it was downloaded; downloading again", target)
            return False
        want_sha, said_by = self._expected_sha256(r)
        want_size = r.entry.size if r.entry.size is not None else r.size
        if want_size is not None and size != want_size:
            if online:
                log.warning("%s: present with %d bytes but %d are expected; downloading again", target, size, want_size)
            return False
        rec_sha = rec.get("sha256") if rec else None
        vouched = rec and rec.get("size") == size and rec_sha and (not want_sha or rec_sha == want_sha)
        if vouched and not self.force:
            r.size, r.sha256 = size, rec_sha  # vouched for by the record: no hashing
            return True
        if not online:
            return False
        if self.force and not want_sha:
            if not rec_sha:
                log.info("%s: --force: no sha256 to check it against; downloading it again", target)
                return False
            want_sha, said_by = rec_sha, "comfy.lock.yml"
        if want_sha is None and want_size is None:
            if rec is None:
                return False  # nothing tells a whole file from a cut-off one: download it
            # recorded unverified by an earlier run, and nobody knows more now: keep it as it is
            r.size, r.sha256, r.verified = size, None, False
            self._say_unverified(r, target)
            return True
        digest = _sha256_file(target)
        if want_sha and digest != want_sha:
            log.warning(
                "%s: present but its sha256 differs from the expected one (it is %s, %s says %s): the file "
                "changed on the volume or upstream; downloading it again",
                *(target, digest, said_by, want_sha),
            )
            return False
        r.size, r.sha256, r.verified = size, digest, True
        self.record(r)
        return True

    @staticmethod
    def _expected_sha256(r: ModelResult) -> tuple[str | None, str]:
        """The sha256 a file must have, and who says so: the config, else the source (the hub)."""
        if r.entry.sha256:
            return r.entry.sha256, "the config"
        if r.source is not None and r.source.sha256:
            return r.source.sha256, {HUGGINGFACE: "Hugging Face", CIVITAI: "CivitAI"}.get(r.kind, "the server")
        return None, ""

    def _run(self, r: ModelResult) -> None:
        self.resolve(r, need_network=False)
        if r.name:
            r.target = self.target_of(r)
            if self.present(r):
                r.action, r.ok = PRESENT, True
                return
            if self.link_cached(r):
                return
        self.resolve(r, need_network=True)
        r.target = self.target_of(r)
        target = r.target
        with self._record_lock:
            other = self._claimed.setdefault(str(target), r.index)
        if other != r.index:
            raise DownloadError(
                f"models[{other}] already downloads to {target}; give one of them another 'filename' or 'destination'"
            )
        lock = self._target_lock(r)
        try:
            self._reload_records()  # another process may have just finished this very file
            if self.present(r):
                r.action, r.ok = (PRESENT if r.verified else PRESENT_UNVERIFIED), True
                discard_part(target.with_name(target.name + ".part"))  # a leftover of an interrupted --force run
                return
            self._download(r)
        finally:
            lock.release()

    def _target_lock(self, r: ModelResult):
        target = r.target
        assert target is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.models_dir / ".locks" / r.entry.destination / (target.name + ".lock")
        # the lock file is kept after use: deleting a flock file races with waiters
        return volume_lock.acquire(lock_path, f"another process downloading {target.name}", stop=self.stop)

    # ---- Hugging Face files already on the host ----

    def cached_file(self, r: ModelResult) -> Path | None:
        """The blob of a Hugging Face entry in a hub cache on the host, when one holds it (offline)."""
        dirs = self.settings.hf_cache_dirs
        if r.kind != HUGGINGFACE or not any(d.is_dir() for d in dirs):
            return None
        file = hf_file(r.entry.url)
        return hf_cache.find(file, dirs) if file is not None else None

    def link_cached(self, r: ModelResult) -> bool:
        """Link a cached Hugging Face file into place instead of downloading it; record it like a
        download. False when there is none, or it is refused (then the entry is downloaded)."""
        target = r.target
        assert target is not None
        dirs = self.settings.hf_cache_dirs
        if target.is_file() and not hf_cache.is_linked_from(target, dirs):
            return False  # a file of our own is there: checked (and kept or replaced) the ordinary way
        found = self.cached_file(r)
        if found is None:
            return False
        size = found.stat().st_size
        want_sha = r.entry.sha256 or hf_cache.blob_sha256(found)
        lock = self._target_lock(r)
        try:
            self._reload_records()
            if self.present(r):  # another process linked or downloaded it meanwhile
                r.action, r.ok = PRESENT, True
                return True
            if r.entry.size is not None and size != r.entry.size:
                raise hf_cache.CacheMismatch(
                    f"the cached file {found} has {size} bytes, not the entry's size: {r.entry.size}; not linked"
                )
            hf_cache.link_into(found, target, want_sha)
        except hf_cache.CacheMismatch as err:
            level = logging.WARNING if r.entry.optional else logging.ERROR
            log.log(level, "models[%d] %s: %s; downloading it instead", r.index, r.label, err)
            return False
        finally:
            lock.release()
        r.size, r.verified = size, True
        r.sha256 = want_sha.lower() if want_sha else hf_cache.sha256_of(found)  # no LFS name: a small file
        self.record(r)
        r.action, r.ok = LINKED, True
        log.info("%s: linked from cache (%s)", target, found)
        return True

    def _download(self, r: ModelResult) -> None:
        target, source = r.target, r.source
        assert target is not None and source is not None
        part = target.with_name(target.name + ".part")
        want_sha = r.entry.sha256 or source.sha256
        known_size = r.size
        self._reserve_disk(r, part)
        progress = _Progress(r.label, r.size, self.tty, self.settings.download_log_interval)
        try:
            if source.hf is not None and source.hf.xet:
                self._download_xet(r, part, progress)
            else:
                result = self.downloader.fetch(
                    source.url,
                    part,
                    expected_size=r.size,
                    expected_sha256=want_sha,
                    probe=r.probe,
                    progress=progress,
                    stop=self.stop,
                    source=r.entry.url,  # not the signed CDN link: that one changes on every run
                )
                r.size, r.sha256, r.fetched = result.size, result.sha256, result.fetched
                if result.resumed_from:
                    log.info("%s: resumed from %s", target.name, human_size(result.resumed_from))
        finally:
            progress.close()
            with self._disk_lock:
                self._reserved.pop(str(target), None)
        # the part's bytes are fsynced (fetch / _download_xet); the rename is made durable before the record
        os.replace(part, target)
        fsync_path(target.parent)
        r.verified = bool(want_sha) or known_size is not None
        if not r.verified:
            self._say_unverified(r, target)
        self.record(r)
        r.action, r.ok = (DOWNLOADED if r.verified else DOWNLOADED_UNVERIFIED), True

    def _say_unverified(self, r: ModelResult, target: Path) -> None:
        digest = r.sha256 or _sha256_file(target)
        log.warning(
            "%s: unverified: the server sent no length and the config gives no sha256, so a transfer cut "
            "short would go unnoticed; check the file, then pin it in the config with `sha256: %s` "
            "(it is checked again on every run until then)",
            target,
            digest,
        )

    def _download_xet(self, r: ModelResult, part: Path, progress) -> None:
        from huggingface_hub import hf_hub_download

        hf = r.source.hf if r.source else None
        assert hf is not None
        staging = part.parent / f".{part.name}.hf"  # hf_xet's .incomplete and lock: resumed by the next run
        outcome: dict = {}

        def fetch() -> None:
            try:
                outcome["path"] = hf_hub_download(
                    hf.repo_id,
                    hf.path,
                    repo_type=hf.repo_type,
                    revision=hf.revision,
                    local_dir=staging,
                    endpoint=self.settings.hf_endpoint,
                    token=self.settings.hf_token or False,
                )
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = err

        # hf_xet cannot be told to stop: it runs on a daemon thread, and SIGTERM ends the wait for it
        worker = threading.Thread(target=fetch, daemon=True, name="xet")
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if self.stop.is_set():
                raise volume_lock.Interrupted(f"stopped during the Xet download of {hf.path}")
        if "error" in outcome:
            err = outcome["error"]
            raise DownloadError(
                f"Hugging Face (Xet) {hf.repo_id}/{hf.path}: {type(err).__name__}: {redact_urls(str(err))}"
            )
        os.replace(outcome["path"], part)
        shutil.rmtree(staging, ignore_errors=True)  # hf_hub_download's metadata of the file, done with
        size = part.stat().st_size
        if r.size is not None and size != r.size:
            discard_part(part)
            raise DownloadError(f"size mismatch: got {size} bytes, expected {r.size}; the partial file was deleted")
        if r.entry.sha256:
            digest = _sha256_file(part)
            if digest != r.entry.sha256:
                discard_part(part)
                raise ChecksumError(
                    f"sha256 mismatch: got {digest}, expected {r.entry.sha256}; the partial file was deleted "
                    "(if the file was updated upstream, update sha256 in the config)"
                )
            r.sha256 = digest
        else:
            r.sha256 = r.source.sha256 if r.source else None
        fsync_path(part)
        r.size = r.fetched = size
        progress(size, size)

    def _reserve_disk(self, r: ModelResult, part: Path) -> None:
        """Fail at once when the rest of the file, plus ``DISK_MARGIN``, does not fit in what is free
        minus what the downloads running now still need. The message says the whole need, the margin
        included (issue 20 #13: "needs 4.8 MiB more, 59.2 MiB free" read as a contradiction)."""
        if r.size is None:
            return
        have = part.stat().st_size if part.exists() else 0
        need = max(0, r.size - have)
        with self._disk_lock:
            reserved = sum(self._reserved.values())
            free = shutil.disk_usage(part.parent).free - reserved
            if need + DISK_MARGIN > free:
                others = f" after the {human_size(reserved)} the other downloads still need" if reserved else ""
                raise DownloadError(
                    f"not enough disk space in {part.parent}: needs {human_size(need + DISK_MARGIN)} free "
                    f"({human_size(need)} for {(r.target or part).name} + a {DISK_MARGIN // MiB} MiB safety "
                    f"margin), {human_size(max(free, 0))} free{others}; free some space or use a bigger volume"
                )
            self._reserved[str(r.target)] = need

    def check_locking(self) -> None:
        """Raise volume_lock.LockError (readable: what is wrong, what to do) when the models folder's
        filesystem cannot lock, before any entry starts."""
        lock = volume_lock.acquire(self.models_dir / ".locks" / "volume.lock", "the volume check", stop=self.stop)
        lock.release()


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


def shown_url(r: ModelResult) -> str:
    """Where an entry comes from, for people, without any query string: the entry's own URL for
    Hugging Face (its download goes through a signed CDN link); the resolved download URL otherwise
    (e.g. the CivitAI download a model page stands for)."""
    if r.kind == HUGGINGFACE or r.source is None:
        return redact_urls(r.entry.url)
    return r.source.shown_url


def summary(results: list[ModelResult], dry_run: bool) -> str:
    if dry_run:
        headers = ["name", "size", "source", "target", "from", "action", "status"]
        rows = [
            [r.label, human_size(r.size), r.kind, str(r.target or "?"), shown_url(r), r.action or "-", r.status]
            for r in results
        ]
    else:
        headers = ["name", "size", "source", "seconds", "MB/s", "action", "status"]
        rows = []
        for r in results:
            mbs = f"{r.fetched / r.seconds / 1e6:.1f}" if r.fetched and r.seconds > 0 else "-"
            rows.append([r.label, human_size(r.size), r.kind, f"{r.seconds:.1f}", mbs, r.action or "-", r.status])
    lines = [format_table(headers, [[one_line(str(c)) for c in row] for row in rows])]
    for r in results:
        if r.error:
            kind = "warning" if r.entry.optional else "error"
            lines.append(f"{kind}: models[{r.index}] {one_line(r.label)}: {r.error}")
    return "\n".join(lines)


def json_rows(results: list[ModelResult], models_dir: Path) -> list[dict]:
    """``--json``: one object per entry (what ``apply_config.sh --dry-run`` lists)."""
    return [
        {
            "index": r.index,
            "path": str(r.target.relative_to(models_dir)) if r.target else r.entry.planned_path(),
            "size": r.size,
            "action": r.action or None,
            "from": shown_url(r),
            "error": r.error,
            "optional": r.entry.optional,
        }
        for r in results
    ]


def dry_run_one(prov: Provisioner, r: ModelResult) -> ModelResult:
    try:
        prov.resolve(r, need_network=False)
        if r.name and not (target := prov.target_of(r)).is_file() and prov.cached_file(r) is not None:
            r.target, r.action, r.ok = target, WOULD_LINK, True
            return r
        prov.resolve(r, need_network=True)
        r.target = prov.target_of(r)
        present = r.target.is_file() and (r.size is None or r.target.stat().st_size == r.size)
        r.action = PRESENT if present and not prov.force else WOULD_DOWNLOAD
        r.ok = True
    except DownloadError as err:
        r.error = one_line(str(err))
    return r


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    loaded = settings_and_config(args)
    if isinstance(loaded, int):
        return loaded
    settings, cfg = loaded
    for noisy in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    models_dir = Path(args.models_dir) if args.models_dir else settings.models_dir
    prov = Provisioner(settings, models_dir, force=args.force, dry_run=args.dry_run)
    if not args.dry_run and read_lock_file(settings.lock_file).damaged:  # rewritten now, whatever this run records
        update_lock_file(settings.lock_file, "models", lambda current: current or [])
    results = [ModelResult(i, e) for i, e in enumerate(cfg.models)]
    if args.only:
        unknown = [n for n in args.only if not any(matches(r.entry, n, prov.recorded) for r in results)]
        if unknown:
            names = ", ".join(r.entry.filename or r.entry.url_filename() for r in results) or "(none)"
            print(f"error: --only: no model entry named {', '.join(unknown)}; entries: {names}", file=sys.stderr)
            return EXIT_INVALID
        results = [r for r in results if any(matches(r.entry, n, prov.recorded) for n in args.only)]
    if not results:
        print("no models to download")
        return EXIT_OK

    if threading.current_thread() is threading.main_thread():
        # outside run_parallel too (e.g. while checking the lock), a SIGTERM only stops: the exit waits
        # for the downloads to wind down instead of cutting them off mid-write
        signal.signal(signal.SIGTERM, lambda signum, frame: prov.stop.set())
    try:
        if args.dry_run:
            results = run_parallel(lambda r: dry_run_one(prov, r), results, args.parallel, prov.stop)
        else:
            try:
                prov.check_locking()
            except volume_lock.LockError as err:
                print(f"error: {err}", file=sys.stderr)
                return EXIT_FAILED
            results = run_parallel(prov.run, results, args.parallel, prov.stop)
    except volume_lock.Interrupted:  # run_parallel waited for the running entries (their sockets are cut)
        prov.stop.set()
        print("interrupted; partial downloads are kept as .part files and resume on the next run", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(json_rows(results, models_dir)) if args.json else summary(results, dry_run=args.dry_run))
    failed = [r for r in results if not r.ok and not r.entry.optional]
    warned = [r for r in results if not r.ok and r.entry.optional]
    if args.dry_run:
        return EXIT_FAILED if failed else EXIT_OK
    if warned:
        log.warning("%d optional model(s) failed; continuing without them", len(warned))
    if failed:
        log.error("%d required model(s) failed", len(failed))
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    # what the imports made lives until the exit: kept out of every garbage collection, including the
    # one at the exit (measured: a whole run ~35 ms shorter, 15 % of a small download's time)
    gc.freeze()
    sys.exit(main())
