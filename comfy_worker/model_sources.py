"""Where a model URL really downloads from: Hugging Face, CivitAI, or plain HTTP(S).

``Sources.resolve(url)`` asks the resolvers in order (Hugging Face, CivitAI, then plain HTTP, which takes
every URL) and returns a ``ModelSource``: the URL to download, and what the hub already says about the
file (name, size, sha256) and which file of the hub it is (``HfFile`` / the CivitAI version).

- Hugging Face (``https://huggingface.co/<repo>/resolve/<rev>/<path>``, also ``/blob/``, datasets and
  spaces): ``huggingface_hub`` resolves the file (its HEAD on the resolve URL gives the commit, the size,
  the LFS sha256 and whether it is stored with Xet; ``HF_ENDPOINT`` moves the hub, e.g. to a local fake
  in tests). The download URL is the resolve URL pinned to that commit: it redirects to a signed CDN
  link, so when that link expires mid-download the downloader asks the hub again for a fresh one. The
  hub's LFS ETag is the file's sha256, so Hugging Face files are verified even without a ``sha256:``.
- CivitAI: ``/api/download/models/<versionId>`` directly; ``/models/<id>?modelVersionId=<v>`` becomes
  that; a bare ``/models/<id>`` asks ``/api/v1/models/<id>`` for the newest version's primary file (its
  name and SHA256). ``CIVITAI_BASE_URL`` moves the site (tests).
- Anything else: the URL itself.

Tokens (``TokenPolicy``): ``HF_TOKEN`` goes only to the Hugging Face host(s) (huggingface.co, hf.co,
``HF_ENDPOINT``), ``CIVITAI_TOKEN`` only to the CivitAI host(s) (civitai.com, ``CIVITAI_BASE_URL``), as
``Authorization: Bearer``. The downloader follows redirects by hand and asks for every hop's headers,
so a CDN behind a redirect never receives a token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlparse

from comfy_worker.file_names import safe_filename, url_filename
from comfy_worker.http_download import Downloader, DownloadError, RetryableError, same_host
from comfy_worker.log_setup import redact_urls
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

HF_HOSTS = ("https://huggingface.co", "https://hf.co")
CIVITAI_HOSTS = ("https://civitai.com", "https://www.civitai.com")
HF_PATH = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>.+?)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<path>.+)$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

HUGGINGFACE, CIVITAI, HTTP = "huggingface", "civitai", "http"


@dataclass(frozen=True)
class HfFile:
    """One file of a Hugging Face repo, at an exact commit."""

    repo_id: str
    repo_type: str  # model | dataset | space
    revision: str  # the commit the hub resolved the entry's revision to (as written in the URL: ``hf_file``)
    path: str
    xet: bool = False  # stored with Xet and hf_xet is installed: fetched by hf_hub_download


def hf_file(url: str) -> HfFile | None:
    """The file a Hugging Face URL names, offline: repo, type, the revision as written, the path (the
    ``HF_PATH`` of the URL's path; whether the host is a Hugging Face one is ``TokenPolicy.is_hf``'s)."""
    m = HF_PATH.match(urlparse(url).path)
    if m is None:
        return None
    repo_type = {"datasets": "dataset", "spaces": "space"}.get(m["type"] or "", "model")
    return HfFile(unquote(m["repo"]), repo_type, unquote(m["rev"]), unquote(m["path"]))


@dataclass(frozen=True)
class ModelSource:
    """Where one entry's bytes come from and what its hub says about them."""

    kind: str  # huggingface | civitai | http
    url: str  # what the downloader fetches (never a signed link: those are found anew on every request)
    name: str | None = None  # the hub's file name, when it names one
    size: int | None = None
    sha256: str | None = None  # the hub's own sha256 (Hugging Face LFS ETag, CivitAI SHA256)
    hf: HfFile | None = None
    civitai_version: str | None = None

    @property
    def shown_url(self) -> str:
        """The download URL fit to show (without query string)."""
        return redact_urls(self.url)


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


def rebase(url: str, base: str, hosts: tuple[str, ...]) -> str:
    """Point a URL written for the public site (huggingface.co, civitai.com) at the configured base."""
    p = urlparse(url)
    if any(same_host(url, h) for h in hosts):
        b = urlparse(base)
        return p._replace(scheme=b.scheme, netloc=b.netloc, path=b.path.rstrip("/") + p.path).geturl()
    return url


class HuggingFaceResolver:
    kind = HUGGINGFACE

    def __init__(self, settings: Settings, tokens: TokenPolicy, downloader: Downloader):
        self.settings, self.tokens, self.downloader = settings, tokens, downloader

    def matches(self, url: str) -> bool:
        return self.tokens.is_hf(url) and HF_PATH.match(urlparse(url).path) is not None

    def offline_name(self, url: str) -> str | None:
        return url_filename(url)

    def resolve(self, url: str) -> ModelSource:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        named = hf_file(url)
        assert named is not None
        repo_id, repo_type, revision, path = named.repo_id, named.repo_type, named.revision, named.path
        endpoint = self.settings.hf_endpoint
        resolve_url = hf_hub_url(repo_id, path, repo_type=repo_type, revision=revision, endpoint=endpoint)
        what = f"Hugging Face {repo_id}/{path}@{revision}"

        def metadata():  # a retryable failure's text leaves out ``what``: with_retries puts it in front
            try:
                return get_hf_file_metadata(resolve_url, token=self.settings.hf_token or False, endpoint=endpoint)
            except HfHubHTTPError as err:
                status = err.response.status_code if err.response is not None else None
                if status is None or status in (408, 429) or status >= 500:
                    raise RetryableError(f"HTTP {status}") from None
                hint = {401: " (gated or private: set HF_TOKEN)", 403: " (gated: accept the terms, set HF_TOKEN)"}
                hint[404] = " (check the repo, revision and file path)"
                raise DownloadError(f"{what}: HTTP {status}{hint.get(status, '')}") from None
            except (OSError, *_hf_transport_errors()) as err:  # network errors of huggingface_hub's client
                raise RetryableError(f"{type(err).__name__}: {redact_urls(str(err))}") from None

        meta = self.downloader.with_retries(what, metadata)
        etag = (meta.etag or "").lower()
        commit = meta.commit_hash or revision
        hf = HfFile(repo_id, repo_type, commit, path, xet=meta.xet_file_data is not None and _has_hf_xet())
        return ModelSource(
            kind=HUGGINGFACE,
            # pinned to the commit: a renewed CDN link is for the very same file
            url=hf_hub_url(repo_id, path, repo_type=repo_type, revision=commit, endpoint=endpoint),
            name=url_filename(url),
            size=meta.size,
            sha256=etag if SHA256_RE.match(etag) else None,
            hf=hf,
        )


class CivitaiResolver:
    kind = CIVITAI

    def __init__(self, settings: Settings, tokens: TokenPolicy, downloader: Downloader):
        self.settings, self.tokens, self.downloader = settings, tokens, downloader
        self.base = settings.civitai_base_url
        self.hosts = (*CIVITAI_HOSTS, self.base)

    def matches(self, url: str) -> bool:
        return self.tokens.is_civitai(url)

    def offline_name(self, url: str) -> str | None:
        return None  # the name comes from the API or the download's Content-Disposition

    def resolve(self, url: str) -> ModelSource:
        p = urlparse(url)
        version = parse_qs(p.query).get("modelVersionId", [None])[0]
        if p.path.startswith("/api/download/models/"):
            version_id = p.path.rsplit("/", 1)[-1] or None
            return ModelSource(CIVITAI, rebase(url, self.base, self.hosts), civitai_version=version_id)
        m = re.match(r"^/models/(\d+)", p.path)
        if m and version:
            return ModelSource(CIVITAI, f"{self.base}/api/download/models/{quote(version)}", civitai_version=version)
        if not m:
            return ModelSource(CIVITAI, rebase(url, self.base, self.hosts))
        api = f"{self.base}/api/v1/models/{m[1]}"

        def fetch():
            resp = self.downloader.open(api, "GET", {"Accept": "application/json"})
            with resp:
                return resp.json()

        try:
            data = self.downloader.with_retries(f"CivitAI model {m[1]}", fetch)
        except ValueError:
            raise DownloadError(f"CivitAI: {redact_urls(api)} did not return JSON") from None
        versions = data.get("modelVersions") or []
        if not versions:
            raise DownloadError(f"CivitAI model {m[1]} has no versions to download")
        files = versions[0].get("files") or []
        primary = next((f for f in files if f.get("primary")), files[0] if files else None)
        if not primary or not primary.get("downloadUrl"):
            raise DownloadError(f"CivitAI model {m[1]}: the newest version has no downloadable file")
        sha = str((primary.get("hashes") or {}).get("SHA256") or "").lower()
        name = safe_filename(primary.get("name"))
        log.info("CivitAI model %s: newest version %s, file %r", m[1], versions[0].get("id"), name)
        return ModelSource(
            CIVITAI,
            rebase(primary["downloadUrl"], self.base, self.hosts),
            name=name,
            sha256=sha if SHA256_RE.match(sha) else None,
            civitai_version=str(versions[0].get("id")) if versions[0].get("id") is not None else None,
        )


class HttpResolver:
    kind = HTTP

    def matches(self, url: str) -> bool:
        return True

    def offline_name(self, url: str) -> str | None:
        return None  # the server's Content-Disposition may name it

    def resolve(self, url: str) -> ModelSource:
        return ModelSource(HTTP, url)


class Sources:
    """The resolvers, tried in order; plain HTTP last (it takes every URL)."""

    def __init__(self, settings: Settings, downloader: Downloader, tokens: TokenPolicy | None = None):
        self.tokens = tokens or TokenPolicy(settings)
        self.resolvers = (
            HuggingFaceResolver(settings, self.tokens, downloader),
            CivitaiResolver(settings, self.tokens, downloader),
            HttpResolver(),
        )

    def resolver_for(self, url: str):
        return next(r for r in self.resolvers if r.matches(url))

    def kind_of(self, url: str) -> str:
        return self.resolver_for(url).kind

    def offline_name(self, url: str) -> str | None:
        """The file name when the URL alone tells it (Hugging Face), else None."""
        return self.resolver_for(url).offline_name(url)

    def resolve(self, url: str) -> ModelSource:
        return self.resolver_for(url).resolve(url)


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
