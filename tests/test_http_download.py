"""http_download: resumable, verified downloads into a .part file, against real local servers."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import threading
import time

import pytest
from support.origins import FaultyOrigin, NginxOrigin, random_file

from comfy_worker.http_download import (
    ChecksumError,
    Downloader,
    DownloadError,
    HttpStatusError,
    Interrupted,
    MiB,
    same_host,
    state_path,
)
from comfy_worker.part_file import PartFile


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "src" / "model.bin"
    sha = random_file(path, 6 * MiB + 123, seed=1)
    return path, sha


def fast(**kw) -> Downloader:
    kw.setdefault("backoff", 0.01)
    return Downloader(**kw)


def test_same_host_compares_host_and_port():
    assert same_host("https://huggingface.co/a", "https://huggingface.co:443/b")
    assert not same_host("http://127.0.0.1:8000/a", "http://127.0.0.1:8001/a")
    assert not same_host("https://cdn-lfs.hf.co/x", "https://huggingface.co")


def test_connection_dropped_at_40_percent_resumes_without_refetching(origin, blob, tmp_path):
    path, sha = blob
    size = path.stat().st_size
    origin.add("/m.bin", file=path, drop_after=int(size * 0.4))
    part = tmp_path / "out" / "m.bin.part"
    result = fast().fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.size == size
    assert part.stat().st_size == size
    gets = [s for s in origin.seen("/m.bin") if s.method == "GET"]
    assert gets[-1].headers["range"] == f"bytes={int(size * 0.4)}-"
    assert origin.sent("/m.bin") < size * 1.10  # less than 10 % fetched twice (the 1-byte probe included)


def test_parallel_ranges_from_nginx_give_the_exact_file(tmp_path):
    root = tmp_path / "www"
    sha = random_file(root / "big.bin", 24 * MiB + 7, seed=2)
    with NginxOrigin(root, tmp_path / "nginx") as ng:
        part = tmp_path / "big.bin.part"
        result = fast(connections=4, parallel_min_size=MiB, chunk_size=2 * MiB).fetch(f"{ng.url}/big.bin", part)
        log = (tmp_path / "nginx" / "access.log").read_text()
    assert result.sha256 == sha and result.connections == 4
    assert hashlib.sha256(part.read_bytes()).hexdigest() == sha
    assert log.count('" 206 ') >= 13  # probe + 13 chunks, every one a range request
    assert not state_path(part).exists()


def test_parallel_chunk_dropped_midway_resumes_that_chunk(origin, blob, tmp_path):
    path, sha = blob
    size = path.stat().st_size
    origin.add("/m.bin", file=path, drop_after=3 * MiB + 5, drops=1)
    part = tmp_path / "m.bin.part"
    result = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB).fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha
    assert origin.sent("/m.bin") < size * 1.10


def test_interrupted_parallel_download_resumes_from_the_part_and_its_state(origin, blob, tmp_path):
    path, sha = blob
    size = path.stat().st_size
    stop = threading.Event()

    def hold_the_second_half(h, seen, head):
        # chunks past the middle wait for the stop: however slowly the main thread gets to report
        # progress on a busy machine, the download cannot end before it is stopped
        rng = seen.headers.get("range", "")
        if rng.startswith("bytes=") and int(rng[6:].split("-")[0]) > size // 2:
            stop.wait(30)
        return False

    origin.add("/m.bin", file=path, rate=6 * MiB, handler=hold_the_second_half)
    part = tmp_path / "m.bin.part"
    dl = fast(connections=2, parallel_min_size=MiB, chunk_size=MiB)

    def stop_halfway(done, total):
        if done > size // 2:
            stop.set()

    with pytest.raises(DownloadError):
        dl.fetch(f"{origin.url}/m.bin", part, progress=stop_halfway, stop=stop)
    saved = json.loads(state_path(part).read_text())
    on_disk = sum(saved["done"])
    assert on_disk > size // 3
    first_run = len(origin.seen())
    origin.routes["/m.bin"].rate = None
    result = dl.fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.resumed_from == on_disk
    assert sum(s.sent for s in origin.seen()[first_run:]) <= size - on_disk + 1  # + the 1-byte probe


def test_a_stop_while_the_hasher_is_behind_ends_a_parallel_download_at_once(origin, tmp_path):
    """issue 20 #22: a stop that found the hasher thread behind the workers (bytes on disk not yet
    hashed) left it going round forever, and the main thread waiting for it: the download never ended.
    A resumed part makes that moment certain: the hasher starts by re-reading the whole prefix on disk,
    while a stop already requested ends the workers at once."""
    path = tmp_path / "src" / "big.bin"
    sha = random_file(path, 72 * MiB, seed=22)
    route = origin.add("/big.bin", file=path, rate=32 * MiB)
    part = tmp_path / "big.bin.part"
    dl = fast(connections=2, parallel_min_size=MiB, chunk_size=8 * MiB)
    interrupt(dl, f"{origin.url}/big.bin", part, 48 * MiB)
    route.rate = None
    for _ in range(3):  # each one a fresh hasher re-reading 48+ MiB when the stop lands
        stop = threading.Event()
        stop.set()
        outcome = {}

        def run(stop=stop, outcome=outcome):
            try:
                dl.fetch(f"{origin.url}/big.bin", part, stop=stop)
            except DownloadError as err:
                outcome["error"] = err

        worker = threading.Thread(target=run, daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(15)
        assert not worker.is_alive(), "a stopped parallel download never ended"
        assert time.monotonic() - started < 15
        assert isinstance(outcome.get("error"), Interrupted)
    result = dl.fetch(f"{origin.url}/big.bin", part)
    assert result.sha256 == sha and result.resumed_from >= 48 * MiB


def test_server_ignoring_range_restarts_cleanly(origin, blob, tmp_path):
    path, sha = blob
    origin.add("/m.bin", file=path, ignore_range=True)
    part = tmp_path / "m.bin.part"
    part.write_bytes(b"stale bytes from an older, different file" * 1000)
    result = fast().fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha
    assert hashlib.sha256(part.read_bytes()).hexdigest() == sha


def test_a_200_answer_to_a_resume_truncates_the_part_and_rehashes(origin, blob, tmp_path):
    path, sha = blob
    route = origin.add("/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    dl = fast()
    interrupt(dl, f"{origin.url}/m.bin", part, MiB)  # a part recorded as this file's ...
    part.write_bytes(b"x" * 1000)  # ... holding wrong bytes that a blind resume would keep
    probe = dl.probe(f"{origin.url}/m.bin")  # the server did ranges when probed ...
    route.ignore_range = True  # ... and stops honouring them for the resume
    result = dl.fetch(f"{origin.url}/m.bin", part, probe=probe)
    assert result.sha256 == sha and result.resumed_from == 1000
    assert part.read_bytes() == path.read_bytes()


def test_sha256_mismatch_deletes_the_part(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fast().fetch(f"{origin.url}/m.bin", part, expected_sha256="0" * 64)
    assert not part.exists() and not state_path(part).exists()


def test_wrong_size_fails(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path)
    with pytest.raises(DownloadError, match="bytes but 5 were expected"):
        fast().fetch(f"{origin.url}/m.bin", tmp_path / "m.part", expected_size=5)


def test_503s_and_429_are_retried_with_backoff(origin, blob, tmp_path):
    path, sha = blob
    origin.add("/m.bin", file=path, fail_statuses=[503, 429, 503])
    result = fast(retries=5).fetch(f"{origin.url}/m.bin", tmp_path / "m.part")
    assert result.sha256 == sha
    assert [s.status for s in origin.seen("/m.bin")][:3] == [503, 429, 503]


def test_retries_are_bounded(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path, fail_statuses=[500] * 10)
    with pytest.raises(DownloadError, match="gave up after 3 attempts: HTTP 500"):
        fast(retries=3).fetch(f"{origin.url}/m.bin", tmp_path / "m.part")
    assert len(origin.seen("/m.bin")) == 3


def test_404_is_not_retried(origin, tmp_path):
    with pytest.raises(HttpStatusError, match="404"):
        fast(retries=5).fetch(f"{origin.url}/missing.bin", tmp_path / "m.part")
    assert len(origin.seen("/missing.bin")) == 1


def test_headers_for_each_redirect_hop_come_from_that_hop_only(blob, tmp_path):
    path, sha = blob
    with FaultyOrigin() as site, FaultyOrigin() as cdn:
        cdn.add("/signed/m.bin", file=path)
        site.add("/download/1", redirect=f"{cdn.url}/signed/m.bin?sig=abc")

        def headers_for(url):
            return {"Authorization": "Bearer site-secret"} if same_host(url, site.url) else {}

        result = fast(headers_for=headers_for).fetch(f"{site.url}/download/1", tmp_path / "m.part")
        assert result.sha256 == sha
        assert all(s.headers.get("authorization") == "Bearer site-secret" for s in site.seen())
        assert cdn.seen() and all("authorization" not in s.headers for s in cdn.seen())


def test_an_expired_signed_link_is_renewed_and_the_download_continues(blob, tmp_path):
    path, sha = blob
    size = path.stat().st_size
    with FaultyOrigin() as site, FaultyOrigin() as cdn:
        signed = cdn.add("/signed/m.bin", file=path, drop_after=2 * MiB)
        site.add("/download/1", redirect=f"{cdn.url}/signed/m.bin?expires=soon")

        def expire_link(done, total):
            if done >= 2 * MiB and not signed.fail_statuses and len(site.seen()) == 1:
                signed.fail_statuses.append(403)  # the reconnect after the drop finds the link expired

        result = fast().fetch(f"{site.url}/download/1", tmp_path / "m.part", progress=expire_link)
    assert result.sha256 == sha
    assert len(site.seen()) == 2  # asked once more for a fresh link
    assert [s.status for s in cdn.seen()] == [206, 200, 403, 206, 206]  # probe, drop, expired, probe, rest
    assert cdn.sent("/signed/m.bin") < size * 1.05


def interrupt(dl: Downloader, url: str, part, at: int, **kw) -> None:
    """Start a download and stop it once ``at`` bytes are on disk, as a killed run would leave it."""
    stop = threading.Event()

    def stop_at(done, total):
        if done >= at:
            stop.set()

    with pytest.raises(DownloadError, match="interrupted"):
        dl.fetch(url, part, progress=stop_at, stop=stop, **kw)
    assert part.stat().st_size >= at


@pytest.fixture
def other_blob(tmp_path):
    """Another file of the same size as ``blob``."""
    path = tmp_path / "src" / "other.bin"
    sha = random_file(path, 6 * MiB + 123, seed=7)
    return path, sha


def test_a_part_left_by_another_url_is_not_resumed(origin, blob, other_blob, tmp_path):
    (a, _), (b, sha_b) = blob, other_blob
    origin.add("/a/m.bin", file=a)
    origin.add("/b/m.bin", file=b)  # same name, same size, same ETag: only the url tells them apart
    part = tmp_path / "m.bin.part"
    dl = fast()
    interrupt(dl, f"{origin.url}/a/m.bin", part, 2 * MiB)
    result = dl.fetch(f"{origin.url}/b/m.bin", part)
    assert result.sha256 == sha_b and result.resumed_from == 0
    assert part.read_bytes() == b.read_bytes()


def test_a_part_whose_file_changed_upstream_is_not_resumed(origin, blob, other_blob, tmp_path):
    (a, _), (b, sha_b) = blob, other_blob
    route = origin.add("/m.bin", file=a, etag='"v1"')
    part = tmp_path / "m.bin.part"
    dl = fast()
    interrupt(dl, f"{origin.url}/m.bin", part, 2 * MiB)
    route.file, route.etag = b, '"v2"'  # new content at the same url, same size
    result = dl.fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha_b and result.resumed_from == 0
    assert part.read_bytes() == b.read_bytes()


def test_without_a_validator_a_part_resumes_only_for_the_same_url_and_size(origin, blob, tmp_path):
    a, _ = blob
    bigger = tmp_path / "src" / "bigger.bin"
    sha_big = random_file(bigger, 7 * MiB, seed=8)
    route = origin.add("/m.bin", file=a, etag=None)
    part = tmp_path / "m.bin.part"
    dl = fast()
    interrupt(dl, f"{origin.url}/m.bin", part, 2 * MiB)
    route.file = bigger  # same url, no ETag/Last-Modified, another size
    interrupt(dl, f"{origin.url}/m.bin", part, 3 * MiB)
    result = dl.fetch(f"{origin.url}/m.bin", part)  # same url and size: nothing else to go by, resumed
    assert result.sha256 == sha_big and result.resumed_from >= 3 * MiB
    assert part.read_bytes() == bigger.read_bytes()
    starts = [s.headers.get("range") for s in origin.seen("/m.bin") if s.headers.get("range") != "bytes=0-0"]
    assert starts[:2] == [None, None]  # the part of the smaller file was not resumed


def test_a_parallel_part_left_by_another_url_is_not_resumed(origin, blob, other_blob, tmp_path):
    (a, _), (b, sha_b) = blob, other_blob
    origin.add("/a/m.bin", file=a, rate=6 * MiB)
    origin.add("/b/m.bin", file=b)
    part = tmp_path / "m.bin.part"
    dl = fast(connections=2, parallel_min_size=MiB, chunk_size=MiB)
    interrupt(dl, f"{origin.url}/a/m.bin", part, 2 * MiB)
    assert sum(json.loads(state_path(part).read_text())["done"]) >= 2 * MiB
    result = dl.fetch(f"{origin.url}/b/m.bin", part)
    assert result.sha256 == sha_b and result.resumed_from == 0
    assert part.read_bytes() == b.read_bytes()


def test_the_source_not_the_signed_link_identifies_a_part(origin, blob, tmp_path):
    path, sha = blob
    origin.add("/signed/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    dl = fast()
    source = "https://example.org/models/m.bin"
    interrupt(dl, f"{origin.url}/signed/m.bin?sig=first", part, 2 * MiB, source=source)
    result = dl.fetch(f"{origin.url}/signed/m.bin?sig=second", part, source=source)
    assert result.sha256 == sha and result.resumed_from >= 2 * MiB


def test_a_206_from_another_offset_restarts_cleanly(origin, blob, tmp_path):
    path, sha = blob
    origin.add("/m.bin", file=path, drop_after=2 * MiB, range_shift=-4096)
    part = tmp_path / "m.bin.part"
    result = fast().fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.size == path.stat().st_size
    assert part.read_bytes() == path.read_bytes()


def test_a_parallel_chunk_from_another_offset_falls_back_to_one_connection(origin, blob, tmp_path):
    path, sha = blob
    origin.add("/m.bin", file=path, range_shift=-4096)
    part = tmp_path / "m.bin.part"
    result = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB).fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.connections == 1
    assert part.read_bytes() == path.read_bytes()
    assert not state_path(part).exists()


def test_a_file_that_changed_size_during_a_resume_is_refused(origin, blob, tmp_path):
    path, _ = blob
    bigger = tmp_path / "src" / "bigger.bin"
    random_file(bigger, 7 * MiB, seed=8)
    route = origin.add("/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    dl = fast()
    interrupt(dl, f"{origin.url}/m.bin", part, 2 * MiB)
    probe = dl.probe(f"{origin.url}/m.bin")
    route.file = bigger  # the resume's Content-Range says bytes N-.../7 MiB
    with pytest.raises(DownloadError, match="changed on the server"):
        dl.fetch(f"{origin.url}/m.bin", part, probe=probe)
    assert not part.exists() and not state_path(part).exists()


def test_without_expected_size_the_result_must_have_the_probed_size(origin, blob, tmp_path):
    path, _ = blob
    bigger = tmp_path / "src" / "bigger.bin"
    random_file(bigger, 7 * MiB, seed=8)
    route = origin.add("/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    dl = fast()
    probe = dl.probe(f"{origin.url}/m.bin")
    route.file = bigger
    with pytest.raises(DownloadError, match=f"size mismatch: got {7 * MiB} bytes, expected {path.stat().st_size}"):
        dl.fetch(f"{origin.url}/m.bin", part, probe=probe)
    assert not part.exists()


def test_retries_are_capped_even_while_bytes_trickle_in(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path, trickle=64 * 1024)  # every answer drops after 64 KiB: ~100 needed
    with pytest.raises(DownloadError, match=r"gave up after 8 attempts .*: connection closed at \d+ of"):
        fast(retries=2).fetch(f"{origin.url}/m.bin", tmp_path / "m.part")
    bodies = [s for s in origin.seen("/m.bin") if s.headers.get("range") != "bytes=0-0"]
    assert len(bodies) == 8  # 4 x retries


def test_a_stop_during_the_retry_backoff_ends_the_wait_at_once(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path, fail_statuses=[503] * 5)
    stop = threading.Event()
    outcome = {}

    def run():
        try:
            Downloader(backoff=30).fetch(f"{origin.url}/m.bin", tmp_path / "m.part", stop=stop)
        except DownloadError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not origin.seen("/m.bin") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # now sleeping at least 22 s before the next attempt
    stop.set()
    worker.join(5)
    assert not worker.is_alive()
    assert "interrupted" in outcome["error"]
    assert len(origin.seen("/m.bin")) == 1


def test_a_200_answer_to_a_chunk_request_falls_back_to_one_connection(origin, blob, tmp_path):
    # replicas behind a load balancer with different ETags: If-Range fails, the whole file comes back
    path, sha = blob
    origin.add("/m.bin", file=path, whole_for_ranges=True)
    part = tmp_path / "m.bin.part"
    result = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB).fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.connections == 1
    assert part.read_bytes() == path.read_bytes()
    assert not state_path(part).exists()


def test_a_sha256_mismatch_on_the_parallel_path_deletes_the_part_and_its_records(origin, blob, tmp_path):
    path, _ = blob
    origin.add("/m.bin", file=path)
    part = tmp_path / "m.bin.part"
    dl = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB)
    seen = []
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        dl.fetch(f"{origin.url}/m.bin", part, expected_sha256="ab" * 32, progress=lambda d, t: seen.append(d))
    assert seen and max(seen) == path.stat().st_size  # it really went the parallel way to the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no .part, .part.state, .part.source


def test_an_expired_link_is_renewed_as_often_as_it_helps_and_given_up_when_it_does_not(blob, tmp_path):
    path, sha = blob
    with FaultyOrigin() as site, FaultyOrigin() as cdn:
        signed = cdn.add("/signed/m.bin", file=path, trickle=MiB)  # every answer drops after 1 MiB
        site.add("/download/1", redirect=f"{cdn.url}/signed/m.bin?expires=soon")
        expired_at = set()

        def expire_link(done, total):
            for mark in (2 * MiB, 3 * MiB, 5 * MiB):  # the link expires three times during the download
                if done >= mark and mark not in expired_at:
                    expired_at.add(mark)
                    signed.fail_statuses.append(403)

        # retries=2: the bound counts renewals in a row without progress, not renewals in all
        result = fast(retries=2).fetch(f"{site.url}/download/1", tmp_path / "m.part", progress=expire_link)
        assert result.sha256 == sha
        assert [s.status for s in cdn.seen()].count(403) == 3
        assert len(site.seen("/download/1")) == 4  # the first link and three fresh ones
        assert cdn.sent("/signed/m.bin") < path.stat().st_size * 1.05

        def refuse_every_body(h, seen, head):
            if seen.headers.get("range") != "bytes=0-0":
                seen.status = 403
                cdn._plain(h, 403, b"expired\n", head)
                return True
            return False

        cdn.add("/signed/never.bin", file=path, handler=refuse_every_body)
        site.add("/download/2", redirect=f"{cdn.url}/signed/never.bin?expires=soon")
        with pytest.raises(DownloadError, match=r"kept refusing the download link \(HTTP 403\)") as err:
            fast(retries=3).fetch(f"{site.url}/download/2", tmp_path / "n.part")
        assert "expires" not in str(err.value)
        assert len(site.seen("/download/2")) == 1 + 3  # the first link and three fresh ones, then it gave up


def test_a_signed_link_never_reaches_an_error_text_even_a_librarys(tmp_path):
    # the link points at a port where nothing listens: requests' own error text quotes the path and
    # its query string ("Max retries exceeded with url: /m.bin?X-Amz-Signature=...")
    from support.origins import free_port

    with FaultyOrigin() as site:
        site.add("/download/1", redirect=f"http://127.0.0.1:{free_port()}/m.bin?X-Amz-Signature=SIGNEDsecret42")
        with pytest.raises(DownloadError) as err:
            fast(retries=2).fetch(f"{site.url}/download/1", tmp_path / "m.part")
    assert "Max retries exceeded" in str(err.value) or "Connection" in str(err.value)
    assert "SIGNEDsecret42" not in str(err.value) and "X-Amz-Signature" not in str(err.value)


@pytest.mark.parametrize("server", ["slow", "silent"])
def test_a_stop_cuts_a_blocked_read_at_once_and_a_body_without_length_is_never_taken_as_complete(
    origin, blob, tmp_path, server
):
    # no Content-Length, no ranges: a cut connection looks exactly like the end of such a body.
    # slow: 64 KiB/s, a 1 MiB read blocks 16 s; silent: 1 MiB, then nothing (the next read waits 30 s)
    path, _ = blob
    if server == "slow":
        origin.add("/m.bin", file=path, rate=64 * 1024, ignore_range=True, no_length=True)
    else:
        origin.add("/m.bin", file=path, pause_after=MiB, ignore_range=True, no_length=True)
    part = tmp_path / "m.bin.part"
    stop = threading.Event()
    outcome = {}

    def run():
        try:
            outcome["result"] = fast().fetch(f"{origin.url}/m.bin", part, stop=stop)
        except DownloadError as err:
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    enough = 128 * 1024 if server == "slow" else MiB
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (len(gets := origin.seen("/m.bin")) >= 2 and gets[1].sent >= enough):
        time.sleep(0.02)
    time.sleep(0.2)  # the reader is blocked in its next read
    stop.set()
    worker.join(1.5)
    assert not worker.is_alive(), "a read on the slow server outlived the stop"
    assert "result" not in outcome, "a cut-off body was returned as a complete download"
    assert isinstance(outcome["error"], Interrupted)
    assert enough <= part.stat().st_size <= origin.seen("/m.bin")[1].sent  # what arrived, kept
    assert len(origin.seen("/m.bin")) == 2  # the probe and one body: no retry after the stop


def test_a_stop_on_silent_parallel_connections_keeps_each_chunk_exact_without_a_retry(origin, blob, tmp_path, caplog):
    path, sha = blob
    route = origin.add("/m.bin", file=path, pause_after=MiB)  # every answer: 1 MiB, then silence
    part = tmp_path / "m.bin.part"
    stop = threading.Event()
    outcome = {}

    def dl() -> Downloader:
        return fast(connections=3, parallel_min_size=MiB, chunk_size=2 * MiB)

    def run():
        try:
            dl().fetch(f"{origin.url}/m.bin", part, stop=stop)
        except DownloadError as err:
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(s.sent >= MiB for s in origin.seen("/m.bin")) < 3:
        time.sleep(0.02)
    time.sleep(0.2)  # each worker is blocked in the read after its first 1 MiB
    stop.set()
    worker.join(1.5)
    assert not worker.is_alive()
    assert isinstance(outcome["error"], Interrupted)
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # a stop is not a network error
    assert json.loads(state_path(part).read_text())["done"] == [MiB, MiB, MiB, 0]

    route.pause_after = None
    before = len(origin.seen("/m.bin"))
    result = dl().fetch(f"{origin.url}/m.bin", part)
    assert result.sha256 == sha and result.resumed_from == 3 * MiB
    ranges = sorted(s.headers["range"] for s in origin.seen("/m.bin")[before:])
    assert ranges[:3] == ["bytes=0-0", f"bytes={MiB}-{2 * MiB - 1}", f"bytes={3 * MiB}-{4 * MiB - 1}"]


@pytest.mark.parametrize("connections", [1, 3], ids=["one-connection", "parallel"])
def test_a_stop_while_the_server_has_not_answered_yet_ends_the_download_at_once(origin, blob, tmp_path, connections):
    """issue 20 #22: a stop found a request waiting for the server's status line and headers, a wait
    that only the read timeout (30 s) ended: the stop has to cut it like a body read."""
    path, _ = blob
    release = threading.Event()

    def answer_late(h, seen, head):
        if seen.headers.get("range") != "bytes=0-0":  # the probe is answered; every body waits
            release.wait(60)
        return False

    origin.add("/m.bin", file=path, handler=answer_late)
    stop = threading.Event()
    outcome = {}

    def run():
        try:
            Downloader(connections=connections, parallel_min_size=MiB, chunk_size=MiB, backoff=0.01).fetch(
                f"{origin.url}/m.bin", tmp_path / "m.part", stop=stop
            )
        except DownloadError as err:
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(origin.seen("/m.bin")) < 1 + connections:
            time.sleep(0.02)
        assert len(origin.seen("/m.bin")) == 1 + connections  # the probe, and each connection's request
        time.sleep(0.2)  # each one waits for its answer
        stopped = time.monotonic()
        stop.set()
        worker.join(3)
        assert not worker.is_alive(), "a request waiting for the server's answer outlived the stop"
        assert time.monotonic() - stopped < 3
        assert isinstance(outcome["error"], Interrupted)
        assert len(origin.seen("/m.bin")) == 1 + connections  # no retry after the stop
    finally:
        release.set()


# ---- issue 25: connections that adapt, verification during the transfer ----


def concurrency(seen, until: float | None = None) -> int:
    """The most body requests the origin was sending at once (those that arrived before ``until``).
    A request counts as finished 50 ms before the origin noted it (its handler returns a moment after
    the client got the last byte and may have sent the next request)."""
    bodies = [s for s in seen if s.headers.get("range") != "bytes=0-0" and s.status in (200, 206)]
    if until is not None:
        bodies = [s for s in bodies if s.at < until]
    events = sorted([(s.at, 1) for s in bodies] + [((s.finished or s.at) - 0.05, -1) for s in bodies])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_connections_are_added_while_the_rate_grows_against_a_server_that_caps_each_one(origin, tmp_path):
    """A CDN caps each connection's rate: the download starts with a few connections and adds more
    while that still makes it faster, up to the maximum."""
    path = tmp_path / "src" / "capped.bin"
    sha = random_file(path, 24 * MiB, seed=25)
    origin.add("/capped.bin", file=path, rate=4 * MiB)  # per connection: 8 of them take 32 MiB/s
    part = tmp_path / "capped.bin.part"
    dl = fast(connections=8, start_connections=2, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(f"{origin.url}/capped.bin", part)
    assert result.sha256 == sha and result.connections == 8
    seen = origin.seen("/capped.bin")
    first_body = min(s.at for s in seen if s.headers.get("range") != "bytes=0-0")
    assert concurrency(seen, until=first_body + 0.2) == 2  # a few to start with ...
    assert concurrency(seen) >= 7  # ... 8 at the end (one may be between two requests)


def test_while_connections_are_added_every_request_asks_for_the_same_size(origin, tmp_path):
    """Each step of the ramp is measured with requests of the size the download started with (4 MiB),
    so a server whose responses start faster than they go on (a front-loaded burst) shows each step
    the same rate per connection; the requests are sized to the measured rate only once the ramp is
    done (here 6 MiB/s per connection: 1 MiB requests)."""
    path = tmp_path / "src" / "capped.bin"
    sha = random_file(path, 48 * MiB, seed=31)
    origin.add("/capped.bin", file=path, rate=6 * MiB)
    dl = fast(connections=8, start_connections=1, parallel_min_size=MiB)
    result = dl.fetch(f"{origin.url}/capped.bin", tmp_path / "capped.bin.part")
    assert result.sha256 == sha and result.connections == 8
    bodies = sorted((s for s in origin.seen("/capped.bin") if s.headers["range"] != "bytes=0-0"), key=lambda s: s.at)

    def asked(s) -> int:
        first, last = map(int, s.headers["range"].removeprefix("bytes=").split("-"))
        return last + 1 - first

    assert [asked(s) for s in bodies[:4]] == [4 * MiB] * 4  # 1 connection, then 4: their first requests
    assert asked(bodies[-5]) <= MiB  # sized to the rate afterwards


def test_a_step_that_keeps_each_connections_rate_goes_straight_to_the_maximum(origin, tmp_path, monkeypatch):
    """Going from 2 connections to 8 (``FIRST_STEP``) made the rate 4 times as high (each connection
    capped at 2 MiB/s): the next step opens all 32 at once, not 16 and then 32 after another
    measurement. The ramp's targets are recorded as it sets them (when the server saw each request
    depends on how busy the machine is)."""
    from comfy_worker.http_download import _Ramp

    targets: list[int] = []
    tick = _Ramp.tick

    def recording_tick(self, *args, **kw):
        target = tick(self, *args, **kw)
        if not targets or targets[-1] != target:
            targets.append(target)
        return target

    monkeypatch.setattr(_Ramp, "tick", recording_tick)
    path = tmp_path / "src" / "capped.bin"
    sha = random_file(path, 48 * MiB, seed=32)
    origin.add("/capped.bin", file=path, rate=2 * MiB)  # a 4 MiB request takes 2 s: no connection asks twice
    dl = fast(connections=32, start_connections=2, parallel_min_size=MiB)
    result = dl.fetch(f"{origin.url}/capped.bin", tmp_path / "capped.bin.part")
    assert result.sha256 == sha and result.connections == 32
    assert targets == [2, 8, 32]
    bodies = [s for s in origin.seen("/capped.bin") if s.headers["range"] != "bytes=0-0"]
    assert concurrency(bodies) == 32  # the server had all 32 at once


@pytest.mark.parametrize("status", [503, 429])
def test_a_server_that_refuses_another_connection_gets_one_fewer(origin, tmp_path, status):
    """The server answers 503/429 to a 4th connection at once: the download goes on with 3 instead of
    retrying the 4th (which would fail: it makes no progress) or trying ever more."""
    path = tmp_path / "src" / "busy.bin"
    sha = random_file(path, 16 * MiB, seed=26)
    origin.add("/busy.bin", file=path, rate=4 * MiB, busy_over=3, busy_status=status)
    dl = fast(connections=8, start_connections=1, parallel_min_size=MiB, chunk_size=MiB, retries=3)
    result = dl.fetch(f"{origin.url}/busy.bin", tmp_path / "busy.bin.part")
    assert result.sha256 == sha
    seen = origin.seen("/busy.bin")
    refused = [s for s in seen if s.status == status]
    assert 1 <= len(refused) <= 2  # the ramp's step from 1 to 4 (a 2nd only if two stepped at once): then no more
    after = [s for s in seen if s.at > refused[-1].at]
    assert after and concurrency(after) <= 3
    assert result.connections == 4  # the most that were running at once, the refused one included


def test_each_connection_is_kept_open_for_its_next_range_request(origin, tmp_path):
    """A worker's range requests go over one kept-alive connection: a new one per request would cost a
    TCP (and TLS) handshake and a new slow start every few MiB."""
    path = tmp_path / "src" / "kept.bin"
    sha = random_file(path, 24 * MiB, seed=41)
    origin.add("/kept.bin", file=path, rate=4 * MiB)  # 1 MiB per REQUEST_TIME: many requests each
    dl = fast(connections=3, start_connections=3, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(f"{origin.url}/kept.bin", tmp_path / "kept.bin.part")
    assert result.sha256 == sha and result.connections == 3
    bodies = [s for s in origin.seen("/kept.bin") if s.headers.get("range") != "bytes=0-0"]
    assert len(bodies) >= 9
    assert len({s.client for s in bodies}) <= 3


def test_a_probe_body_that_cannot_be_read_only_costs_its_connection(origin, blob, tmp_path):
    """The probe's byte is read only to keep the connection; a body that fails to decode (a server that
    compresses the probe's answer alone, badly) closes that connection and the download goes on."""
    path, sha = blob

    def broken_probe(h, seen, head):
        if seen.headers.get("range") != "bytes=0-0":
            return False
        seen.status = 206
        h.send_response(206)
        h.send_header("Content-Range", f"bytes 0-0/{path.stat().st_size}")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", "16")
        h.end_headers()
        h.wfile.write(b"this is not gzip")
        return True

    origin.add("/m.bin", file=path, handler=broken_probe)
    result = fast().fetch(f"{origin.url}/m.bin", tmp_path / "m.part")
    assert result.sha256 == sha


def test_the_next_file_from_the_same_hosts_reuses_the_open_connections(tmp_path):
    """A redirect's connection serves the next probe, and the connections of one file's workers serve
    the next file's: no new TCP (and TLS) handshake per file for a config of many files from one hub."""
    files = [tmp_path / "src" / f"{name}.bin" for name in ("a", "b")]
    shas = [random_file(path, 6 * MiB, seed=50 + i) for i, path in enumerate(files)]
    with FaultyOrigin() as site, FaultyOrigin() as cdn:
        for path in files:
            cdn.add(f"/signed/{path.name}", file=path, rate=8 * MiB)
            site.add(f"/download/{path.stem}", redirect=f"{cdn.url}/signed/{path.name}?sig=x", body=b"Found.")
        dl = fast(connections=3, start_connections=3, parallel_min_size=MiB, chunk_size=MiB)
        for path, sha in zip(files, shas, strict=True):
            result = dl.fetch(f"{site.url}/download/{path.stem}", tmp_path / f"{path.name}.part")
            assert result.sha256 == sha and result.connections == 3
        assert len(site.seen()) == 2 and len({s.client for s in site.seen()}) == 1
        for path in files:
            bodies = [s for s in cdn.seen(f"/signed/{path.name}") if s.headers.get("range") != "bytes=0-0"]
            assert len(bodies) >= 3
        assert len({s.client for s in cdn.seen()}) <= 4  # the probes' connection and the three workers'


def test_a_small_file_uses_one_connection_for_its_probe_and_its_body(origin, blob, tmp_path):
    path, sha = blob  # 6 MiB: under the 64 MiB from which a file is split
    origin.add("/m.bin", file=path, rate=16 * MiB)
    result = fast(connections=8).fetch(f"{origin.url}/m.bin", tmp_path / "m.part")
    assert result.sha256 == sha and result.connections == 1
    bodies = [s for s in origin.seen("/m.bin") if s.headers.get("range") != "bytes=0-0"]
    assert len(bodies) == 1 and "range" not in bodies[0].headers
    assert len({s.client for s in origin.seen("/m.bin")}) == 1  # the probe's connection is kept for it


def test_the_sha256_is_computed_while_the_pieces_arrive(origin, tmp_path, monkeypatch):
    """The hash follows the completed prefix of the part as the connections fill it, and the last
    requests are short, so when the last byte lands only a small tail is left to hash (a pass over
    the whole file after the transfer, or 8 chunks finishing together, would leave most of it)."""
    from comfy_worker import http_download

    path = tmp_path / "src" / "big.bin"
    size = 64 * MiB  # where files start to be split
    sha = random_file(path, size, seed=27)
    origin.add("/big.bin", file=path, rate=8 * MiB)  # 8 connections: about a second
    last_write = [0.0]
    hashed: list[tuple[float, int]] = []
    write = PartFile.write

    def recording_write(self, data, pos, direct=True):
        write(self, data, pos, direct)
        last_write[0] = time.monotonic()

    real_sha256 = hashlib.sha256

    class RecordingSha256:
        def __init__(self):
            self.digest = real_sha256()

        def update(self, data):
            self.digest.update(data)
            hashed.append((time.monotonic(), len(data)))

        def hexdigest(self):
            return self.digest.hexdigest()

    monkeypatch.setattr(PartFile, "write", recording_write)
    monkeypatch.setattr(http_download.hashlib, "sha256", RecordingSha256)
    dl = fast(connections=8, start_connections=8)
    result = dl.fetch(f"{origin.url}/big.bin", tmp_path / "big.bin.part", expected_sha256=sha)
    assert result.sha256 == sha and result.connections == 8
    assert sum(n for _, n in hashed) == size  # one pass over the file, no second one
    after_last_byte = sum(n for t, n in hashed if t > last_write[0])
    assert after_last_byte <= size // 8, f"{after_last_byte / MiB:.0f} MiB of 64 hashed after the last byte"


def test_the_connection_threads_yield_the_cpu_to_the_hasher(origin, tmp_path, monkeypatch):
    """On a busy machine dozens of connection threads woken at once would take the hasher's share of
    the CPU and leave it seconds behind the last byte: they run at a lower priority (a higher nice
    value) than the hasher, and the calling thread's own priority is left as it was."""
    from comfy_worker import http_download

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    receivers: set[int] = set()
    writers: set[int] = set()
    hashers: set[int] = set()
    iter_body = http_download.iter_body
    write = PartFile.write
    real_sha256 = hashlib.sha256

    def recording_write(self, data, pos, direct=True):
        writers.add(niceness())
        write(self, data, pos, direct)

    def recording_iter_body(*args, **kwargs):
        for block in iter_body(*args, **kwargs):
            receivers.add(niceness())
            yield block

    class RecordingSha256:
        def __init__(self):
            self.digest = real_sha256()

        def update(self, data):
            hashers.add(niceness())
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    path = tmp_path / "src" / "big.bin"
    sha = random_file(path, 8 * MiB, seed=33)
    origin.add("/big.bin", file=path)
    monkeypatch.setattr(http_download, "iter_body", recording_iter_body)
    monkeypatch.setattr(PartFile, "write", recording_write)
    monkeypatch.setattr(http_download.hashlib, "sha256", RecordingSha256)
    before = niceness()
    result = fast(connections=4, parallel_min_size=MiB, chunk_size=MiB).fetch(f"{origin.url}/big.bin", tmp_path / "p")
    assert result.sha256 == sha and result.connections > 1
    assert niceness() == before and hashers == {before}
    assert min(receivers) > before, f"connection threads at nice {receivers}, the hasher at {before}"
    assert writers == receivers, f"writer threads at nice {writers}, their connections at {receivers}"


def test_a_resumed_part_is_hashed_whole_and_a_damaged_prefix_deletes_it(origin, tmp_path):
    path = tmp_path / "src" / "big.bin"
    sha = random_file(path, 12 * MiB, seed=28)
    route = origin.add("/big.bin", file=path, rate=8 * MiB)
    part = tmp_path / "big.bin.part"
    dl = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB)
    interrupt(dl, f"{origin.url}/big.bin", part, 3 * MiB)
    with open(part, "r+b") as f:  # a byte of the kept prefix goes bad
        f.seek(100)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    route.rate = None
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        dl.fetch(f"{origin.url}/big.bin", part, expected_sha256=sha)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no .part, .part.state, .part.source
    assert dl.fetch(f"{origin.url}/big.bin", part, expected_sha256=sha).resumed_from == 0


def test_a_part_counted_in_bigger_chunks_by_an_older_version_is_resumed(origin, tmp_path):
    path = tmp_path / "src" / "big.bin"
    sha = random_file(path, 72 * MiB, seed=29)
    route = origin.add("/big.bin", file=path, rate=24 * MiB)
    part = tmp_path / "big.bin.part"
    interrupt(fast(connections=3, chunk_size=8 * MiB), f"{origin.url}/big.bin", part, 12 * MiB)
    saved = json.loads(state_path(part).read_text())
    assert saved["chunk"] == 8 * MiB and len(saved["done"]) == 9  # what versions before issue 25 wrote
    route.rate = None
    result = fast().fetch(f"{origin.url}/big.bin", part)  # 1 MiB chunks for a new part
    assert result.sha256 == sha and result.resumed_from == sum(saved["done"]) >= 12 * MiB


# ---- issue 25: the ramp drops back, the hasher takes the received blocks as they are ----


def ramp_targets(
    rate_of, start: int | None = None, most: int = 32, cores_busy=lambda n: 0.1, machine_busy=None, seconds=5.0
) -> tuple[list[int], object]:
    """The targets a new ramp goes through on a 2-core machine where ``rate_of(connections)`` bytes/s
    arrive and receiving them keeps ``cores_busy(connections)`` cores busy, and the whole machine
    ``machine_busy(connections)`` of its CPU (default: the download's share), looked at every 50 ms (as
    ``_ParallelFetch._drive`` does), with every connection receiving; ``start``: the downloader's default."""
    from comfy_worker.http_download import _Ramp

    machine_busy = machine_busy or (lambda n: cores_busy(n) / 2)
    now = fetched = cpu = busy = 0.0
    ramp = _Ramp(start or Downloader().start_connections, most, now, cores=2)
    targets = [ramp.target]
    while now < seconds:
        now += 0.05
        fetched += rate_of(ramp.target) * 0.05
        cpu += cores_busy(ramp.target) * 0.05
        busy += machine_busy(ramp.target) * 0.05
        if ramp.tick(now, int(fetched), ramp.target, cpu, (busy, now)) != targets[-1]:
            targets.append(ramp.target)
    return targets, ramp


def test_the_ramp_opens_all_connections_behind_a_server_that_caps_each_one():
    targets, ramp = ramp_targets(lambda n: n * 20e6, start=1)  # each connection gets 20 MB/s, however many
    assert targets == [1, 4, 32] and not ramp.growing  # FIRST_STEP, then all at once
    assert ramp_targets(lambda n: n * 20e6)[0] == [4, 16, 32]  # from the default start
    # 16 x 40 MB/s keep a third of the cores busy receiving, but the machine has room: the link is the limit
    busy = {"cores_busy": lambda n: n * 0.045, "machine_busy": lambda n: 0.4}
    assert ramp_targets(lambda n: n * 40e6, **busy)[0] == [4, 16, 32]


def test_the_ramp_settles_back_at_one_connection_when_more_do_not_pay():
    """On loopback the CPU, not the link, is the limit: four connections bring no more than one (and
    cost CPU), so the download goes back to one and stays there."""
    targets, ramp = ramp_targets(lambda n: 1e9, start=1)
    assert targets == [1, 4, 1] and not ramp.growing and ramp.lone


def test_the_ramp_settles_at_the_last_step_that_paid():
    targets, ramp = ramp_targets(lambda n: 100e6 if n == 1 else 130e6, start=1)  # 4 pay (+30 %), 8 do not
    assert targets == [1, 4, 8, 4] and not ramp.growing and not ramp.lone


def test_the_ramp_stays_at_one_connection_when_receiving_keeps_the_cpu_busy():
    """One connection on loopback keeps most of a 2-core machine busy (receiving, writing, hashing):
    a second one cannot make it faster, so none is tried (measured here: one window that made a
    second connection look like a gain, a busy moment, was enough to open 32 of them)."""
    loopback = {"cores_busy": lambda n: 1.2, "machine_busy": lambda n: 1.0}  # the server takes the rest
    targets, ramp = ramp_targets(lambda n: 0.6e9 * (1 + 0.6 * (n > 1)), start=1, **loopback)
    assert targets == [1] and not ramp.growing and ramp.lone
    targets, ramp = ramp_targets(lambda n: 0.9e9, **loopback)  # from the default start: down to one
    assert targets == [4, 1] and ramp.lone


def test_a_download_that_alone_keeps_most_cores_busy_is_cpu_bound_though_the_machine_looks_half_idle():
    """Waiting for direct writes counts as idle time in /proc/stat: on loopback the machine then looked
    80 % busy while receiving alone kept 1.5 of its 2 cores busy, and the ramp went to 8 connections and
    settled at 4, a third slower than one."""
    loopback = {"cores_busy": lambda n: 1.5, "machine_busy": lambda n: 0.8}
    targets, ramp = ramp_targets(lambda n: 0.75e9, **loopback)
    assert targets == [4, 1] and ramp.lone


def test_a_step_that_pays_but_keeps_the_cpu_busy_is_the_last_one():
    targets, ramp = ramp_targets(
        lambda n: 0.2e9 * n, start=1, cores_busy=lambda n: 0.35 * n, machine_busy=lambda n: 0.9
    )
    assert targets == [1, 4] and not ramp.growing


@pytest.fixture
def fetches(monkeypatch):
    """Every ``_ParallelFetch`` the test makes, to read its counters afterwards."""
    from comfy_worker import http_download

    made = []

    class Recorded(http_download._ParallelFetch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(http_download, "_ParallelFetch", Recorded)
    return made


def test_connections_above_a_lowered_target_end_and_the_last_one_feeds_the_hasher_its_blocks(
    origin, tmp_path, monkeypatch, fetches
):
    """Three connections run until the ramp settles at one: the two others end after their current
    request, and from then on the hasher takes each block the remaining connection received as it is
    (no read back from the part); the sha256 is the file's."""
    from comfy_worker import http_download

    dropped_at = []

    class SettlesAtOne(http_download._Ramp):
        def tick(self, now, fetched, receiving, cpu=0.0, machine=None):
            if fetched >= 6 * MiB and not dropped_at:
                self.target, self.growing = 1, False
                dropped_at.append(time.monotonic())
            return self.target

    monkeypatch.setattr(http_download, "_Ramp", SettlesAtOne)
    path = tmp_path / "src" / "big.bin"
    size = 24 * MiB
    sha = random_file(path, size, seed=34)
    origin.add("/big.bin", file=path, rate=16 * MiB)  # per connection: one request (2 MiB) takes 1/8 s
    dl = fast(connections=3, start_connections=3, parallel_min_size=MiB, chunk_size=2 * MiB)
    result = dl.fetch(f"{origin.url}/big.bin", tmp_path / "big.bin.part", expected_sha256=sha)
    assert result.sha256 == sha and result.connections == 3
    seen = origin.seen("/big.bin")
    assert concurrency(seen) == 3
    later = [s for s in seen if s.at > dropped_at[0] + 0.3]  # requests after the others' last one ended
    assert len(later) >= 3 and concurrency(later) == 1
    (fetch,) = fetches
    assert fetch.hashed_from_buffers + fetch.hashed_from_cache == size
    assert fetch.hashed_from_cache <= 12 * MiB, f"{fetch.hashed_from_cache / MiB:.0f} MiB read back from the part"


def test_a_resumed_parallel_download_hashes_the_kept_prefix_from_the_part(origin, tmp_path, fetches):
    path = tmp_path / "src" / "big.bin"
    size = 12 * MiB
    sha = random_file(path, size, seed=35)
    route = origin.add("/big.bin", file=path, rate=8 * MiB)
    part = tmp_path / "big.bin.part"
    dl = fast(connections=3, parallel_min_size=MiB, chunk_size=MiB)
    interrupt(dl, f"{origin.url}/big.bin", part, 3 * MiB)
    route.rate = None
    result = dl.fetch(f"{origin.url}/big.bin", part, expected_sha256=sha)
    assert result.sha256 == sha and result.resumed_from >= 3 * MiB
    resumed = fetches[-1]
    assert resumed.hashed_from_cache >= result.resumed_from  # read back: not received by this call
    assert resumed.hashed_from_buffers + resumed.hashed_from_cache == size  # the whole file, once


def test_several_connections_write_directly_and_the_hasher_gets_every_block_from_memory(origin, tmp_path, fetches):
    """Blocks of the connections ahead of the hash frontier are kept for the hasher (within
    HOLD_BYTES) instead of being read back from the part, so every block can bypass the page cache
    (direct I/O); the part on disk is the file."""
    path = tmp_path / "src" / "big.bin"
    size = 24 * MiB
    sha = random_file(path, size, seed=39)
    origin.add("/big.bin", file=path, rate=8 * MiB)  # per connection
    part = tmp_path / "big.bin.part"
    dl = fast(connections=4, start_connections=4, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(f"{origin.url}/big.bin", part, expected_sha256=sha)
    assert result.sha256 == sha and result.connections == 4
    (fetch,) = fetches
    assert fetch.hashed_from_buffers == size and fetch.hashed_from_cache == 0
    assert fetch.file.direct_bytes == size  # 1 MiB blocks at 1 MiB offsets: all aligned
    assert hashlib.sha256(part.read_bytes()).hexdigest() == sha
    assert not [t for t in threading.enumerate() if t.name in ("dl-write", "dl-hash")]


@pytest.mark.parametrize(
    ("connections", "hold_bytes"),
    [(4, 0), (8, 64 * MiB)],
    ids=["beyond-what-may-be-kept", "more-connections-than-HOLD_CONNECTIONS"],
)
def test_blocks_ahead_of_the_frontier_not_kept_go_through_the_page_cache_and_are_read_back(
    origin, tmp_path, monkeypatch, fetches, connections, hold_bytes
):
    """A block ahead of the frontier is kept for the hasher only within HOLD_BYTES, and only while
    the download runs at most HOLD_CONNECTIONS connections (past that the link, not the CPU, is the
    limit): any other goes through the page cache and is read back."""
    from comfy_worker import http_download

    monkeypatch.setattr(http_download, "HOLD_BYTES", hold_bytes)
    path = tmp_path / "src" / "big.bin"
    size = 24 * MiB
    sha = random_file(path, size, seed=40)

    def first_chunk_late(h, seen, head):
        # the chunks after the first are written while the frontier still waits at byte 0, so none of
        # them can reach the hasher as the frontier's block, however fast it hashes
        if seen.headers.get("range", "").startswith("bytes=0-") and seen.headers["range"] != "bytes=0-0":
            time.sleep(0.5)
        return False

    origin.add("/big.bin", file=path, rate=8 * MiB, handler=first_chunk_late)
    dl = fast(connections=connections, start_connections=connections, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(f"{origin.url}/big.bin", tmp_path / "big.bin.part", expected_sha256=sha)
    assert result.sha256 == sha and result.connections == connections
    (fetch,) = fetches
    assert not fetch.held and fetch.hashed_from_cache > 0
    assert fetch.hashed_from_buffers + fetch.hashed_from_cache == size
    assert 0 < fetch.file.direct_bytes < size


def test_a_retry_asks_for_the_bytes_after_those_written_though_the_writer_was_behind(
    origin, blob, tmp_path, monkeypatch
):
    """The connection drops while its writer still holds blocks it received: the retry waits for them
    to be written and asks for what follows, so no byte is fetched twice (counted from the part's
    records, the request would start a few blocks early)."""
    from comfy_worker.part_file import PartFile

    real_write = PartFile.write

    def slow_disk(self, data, pos, direct=True):
        time.sleep(0.1)
        real_write(self, data, pos, direct)

    monkeypatch.setattr(PartFile, "write", slow_disk)
    path, sha = blob
    size = path.stat().st_size
    origin.add("/m.bin", file=path, drop_after=2 * MiB + 5, drops=1)  # the first response over 2 MiB
    dl = fast(connections=2, start_connections=2, parallel_min_size=MiB)
    result = dl.fetch(f"{origin.url}/m.bin", tmp_path / "m.bin.part", expected_sha256=sha)
    assert result.sha256 == sha
    assert origin.sent("/m.bin") <= size + 1  # the probe's byte, and every other byte once


def test_a_failing_write_ends_the_download_with_its_error_and_leaves_no_thread(origin, tmp_path, monkeypatch):
    """A full disk on a connection's writer thread: the download stops with that error, promptly,
    and every connection, writer and hasher thread has ended."""
    from comfy_worker.part_file import PartFile

    real_write = PartFile.write
    calls = itertools.count()

    def full_disk(self, data, pos, direct=True):
        if next(calls) >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data, pos, direct)

    monkeypatch.setattr(PartFile, "write", full_disk)
    path = tmp_path / "src" / "big.bin"
    random_file(path, 24 * MiB, seed=41)
    origin.add("/big.bin", file=path, rate=8 * MiB)
    dl = fast(connections=4, start_connections=4, parallel_min_size=MiB, chunk_size=MiB)
    began = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        dl.fetch(f"{origin.url}/big.bin", tmp_path / "big.bin.part")
    assert time.monotonic() - began < 5
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name.startswith("dl-")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dl-") and t.name != "dl-cutter"]


def test_a_sha256_mismatch_found_in_the_received_blocks_deletes_the_part(origin, tmp_path, fetches):
    path = tmp_path / "src" / "big.bin"
    random_file(path, 8 * MiB, seed=36)
    origin.add("/big.bin", file=path)
    part = tmp_path / "big.bin.part"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fast(connections=1 + 1, parallel_min_size=MiB).fetch(f"{origin.url}/big.bin", part, expected_sha256="0" * 64)
    assert fetches[0].hashed_from_buffers > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no .part, .part.state, .part.source


def test_a_connection_faster_than_the_hasher_waits_for_it_instead_of_leaving_it_to_read_back(
    origin, tmp_path, monkeypatch, fetches
):
    """The hasher takes a while per block (a busy machine): the connection at the front waits for room
    in its queue, as the single connection's reader does, so every byte is hashed from the blocks as
    they arrived; otherwise the hasher, once behind, read all the rest back from the part, at a third
    more CPU per byte, and never caught up."""
    from comfy_worker import http_download

    real_sha256 = hashlib.sha256

    class SlowSha256:
        def __init__(self):
            self.digest = real_sha256()

        def update(self, data):
            time.sleep(0.005)
            self.digest.update(data)

        def hexdigest(self):
            return self.digest.hexdigest()

    path = tmp_path / "src" / "big.bin"
    size = 24 * MiB
    sha = random_file(path, size, seed=37)
    origin.add("/big.bin", file=path)
    monkeypatch.setattr(http_download.hashlib, "sha256", SlowSha256)
    dl = fast(connections=4, start_connections=1, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(f"{origin.url}/big.bin", tmp_path / "big.bin.part", expected_sha256=sha)
    assert result.sha256 == sha and result.connections == 1
    assert fetches[0].hashed_from_buffers == size and fetches[0].hashed_from_cache == 0


def test_reading_back_a_resumed_prefix_does_not_pass_for_a_cpu_bound_link(origin, tmp_path, monkeypatch):
    """After a restart the hasher re-reads the part's prefix (seconds of CPU for a big file) while the
    rest downloads: that is no cost of receiving, so a capped server still gets its connections
    (counted as the download's CPU, it made the ramp settle at one)."""
    from comfy_worker import http_download

    hash_back = http_download._ParallelFetch._hash_back

    def slow_to_read_back(digest, stretch):  # 40 ms of CPU per MiB read back from the part
        began = time.thread_time()
        while time.thread_time() - began < 0.04 * len(stretch) / MiB:
            pass
        hash_back(digest, stretch)

    path = tmp_path / "src" / "big.bin"
    sha = random_file(path, 24 * MiB, seed=38)
    url = f"{origin.url}/big.bin"
    route = origin.add("/big.bin", file=path, rate=16 * MiB)
    part = tmp_path / "big.bin.part"
    interrupt(fast(connections=2, start_connections=2, parallel_min_size=MiB, chunk_size=MiB), url, part, 8 * MiB)
    route.rate = 4 * MiB  # per connection
    monkeypatch.setattr(http_download, "HASH_SPAN", MiB)
    monkeypatch.setattr(http_download._ParallelFetch, "_hash_back", staticmethod(slow_to_read_back))
    ticks = itertools.count()  # a machine without CPU to spare: only the download's own CPU use decides
    monkeypatch.setattr(http_download, "_machine_cpu", lambda: (float(next(ticks)),) * 2)
    dl = fast(connections=8, start_connections=1, parallel_min_size=MiB, chunk_size=MiB)
    result = dl.fetch(url, part, expected_sha256=sha)
    assert result.sha256 == sha and 8 * MiB <= result.resumed_from <= 16 * MiB
    assert result.connections >= 4  # 1, 2, then 8 (or 4, then 8): not stuck at 1 or 2
