"""Which node pack provides a node class, and where a model file comes from, from the ecosystem's own
data: ComfyUI-Manager's ``extension-node-map.json`` (repository URL -> ``[[classes], {nodename_pattern,
preemptions, ...}]``), ``github-stats.json`` (URL -> stars, author account age), ``model-list.json``
(``{"models": [{filename, url, save_path, ...}]}``) and the Comfy Registry (``GET /nodes/{id}`` ->
``{"repository": ...}``). Fetched from the URLs settings.py names, cached under ``$XDG_CACHE_HOME``
(else ``~/.cache``) and revalidated with ETag/Last-Modified once a day; offline, the cache alone
answers. Without network and cache every answer is "not known" and ``problems`` says why.
docs/check_workflow.md, "Where the node packs come from".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from comfy_worker.log_setup import safe_url

log = logging.getLogger(__name__)

TTL_S = 24 * 3600  # a cached answer younger than this is used without asking again
TIMEOUT_S = 15.0  # per request: a machine without network waits at most this per source
CORE_REPO = "https://github.com/comfyanonymous/ComfyUI"  # the map's entry for ComfyUI's own classes
IMPACT_PACK = "https://github.com/ltdrdata/ComfyUI-Impact-Pack"
COMPONENT_RE = re.compile(r"^## .+ \[[0-9a-fA-F]{4,}\]$")  # an Impact Pack component: "## name [2c8c61]"

# Nodes the frontend handles itself (isVirtualNode): never sent to /prompt, so the server needs no
# pack for them. Class -> the pack whose frontend draws them (None: ComfyUI's own frontend).
FRONTEND_ONLY_PACKS: dict[str, str | None] = {
    "Note": None,
    "MarkdownNote": None,
    "PrimitiveNode": None,
    "Reroute": None,
    "SetNode": "https://github.com/kijai/ComfyUI-KJNodes",
    "GetNode": "https://github.com/kijai/ComfyUI-KJNodes",
    **{
        f"{name} (rgthree)": "https://github.com/rgthree/rgthree-comfy"
        for name in (
            "Fast Muter",
            "Fast Bypasser",
            "Fast Groups Muter",
            "Fast Groups Bypasser",
            "Fast Actions Button",
            "Label",
            "Node Collector",
            "Mute / Bypass Relay",
            "Mute / Bypass Repeater",
            "Power Conductor",
            "Random Unmuter",
            "Reroute",
            "Bookmark",
        )
    },
}


def repo_key(url: str) -> str:
    """``host/owner/repo`` of a git URL (https, ssh or scp form), lower-case, without ``.git``: two
    spellings of one repository compare equal."""
    text = url.strip().lower()
    text = re.sub(r"^[a-z+]+://(?:[^@/]+@)?", "", text)
    text = re.sub(r"^[^@/]+@([^:/]+):", r"\1/", text)
    text = text.strip("/")
    return text[:-4] if text.endswith(".git") else text


def _norm_class(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def cache_dir(user_cache_dir: Path) -> Path:
    """Where the answers are cached: ``$XDG_CACHE_HOME`` (settings.user_cache_dir)/comfy-worker/node-packs."""
    return Path(user_cache_dir) / "comfy-worker" / "node-packs"


class DataCache:
    """GET JSON documents through a cache on disk: fresh for ``ttl`` seconds, then revalidated
    (If-None-Match / If-Modified-Since); a failed request falls back to what the cache holds."""

    def __init__(self, directory: Path, offline: bool = False, ttl: float = TTL_S, timeout: float = TIMEOUT_S):
        self.directory, self.offline, self.ttl, self.timeout = directory, offline, ttl, timeout
        self.problems: list[str] = []
        self.sources: dict[str, str] = {}  # what -> "network", "cache", "stale cache"
        self.unreachable: list[tuple[str, str, str]] = []  # (what, URL shown, reason): not fetched, not cached

    def _paths(self, url: str) -> tuple[Path, Path]:
        digest = hashlib.sha256(url.encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json", self.directory / f"{digest}.meta.json"

    def _read(self, url: str) -> tuple[Any, dict] | None:
        body, meta = self._paths(url)
        try:
            return json.loads(body.read_text(encoding="utf-8")), json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically: a reader sees the old file or the new one, never half of it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _store(self, url: str, body: bytes | None, meta: dict) -> None:
        body_path, meta_path = self._paths(url)
        try:
            if body is not None:
                self._write(body_path, body)
            self._write(meta_path, json.dumps(meta).encode())
        except OSError as err:
            log.warning("cannot cache %s in %s (%s)", safe_url(url), self.directory, err.strerror or err)

    def get(self, url: str, what: str, missing_ok: bool = False) -> Any:
        """The JSON at ``url`` (``what`` names it in problems), or None when it cannot be had."""
        cached = self._read(url)
        if cached and (self.offline or time.time() - float(cached[1].get("fetched_at", 0)) < self.ttl):
            self.sources.setdefault(what, "cache")
            return cached[0]
        if self.offline:
            self.problems.append(f"{what} is not in the cache ({self.directory}) and --offline fetches nothing")
            return None
        headers = {"User-Agent": "comfy-worker-check-workflow", "Accept": "application/json"}
        if cached and cached[1].get("etag"):
            headers["If-None-Match"] = cached[1]["etag"]
        if cached and cached[1].get("last_modified"):
            headers["If-Modified-Since"] = cached[1]["last_modified"]
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout) as resp:
                raw = resp.read()
                meta = {"etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}
            data = json.loads(raw)
        except urllib.error.HTTPError as err:
            if err.code == 304 and cached:
                self._store(url, None, {**cached[1], "fetched_at": time.time()})
                self.sources[what] = "cache (revalidated)"
                return cached[0]
            if err.code == 404 and missing_ok:
                return None
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = str(getattr(err, "reason", None) or err)
        else:
            self._store(url, raw, {**meta, "fetched_at": time.time()})
            self.sources[what] = "network"
            return data
        if cached:
            log.warning("cannot fetch %s (%s): using the cached copy", safe_url(url), reason)
            self.sources[what] = "stale cache"
            return cached[0]
        self.problems.append(f"cannot fetch {what} from {safe_url(url)} ({reason}) and it is not cached")
        self.unreachable.append((what, safe_url(url), reason))
        return None


@dataclass
class Choice:
    """The pack chosen for a class and the candidates it was chosen from."""

    repo: str | None
    candidates: list[str] = field(default_factory=list)
    why: str = ""


class NodePacks:
    """Answers from the node map, the stats, the model list and the registry (any may be missing)."""

    def __init__(self, node_map: Any, stats: Any, model_list: Any, cache: DataCache | None = None, registry=""):
        self.cache, self.registry = cache, registry.rstrip("/")
        self.by_class: dict[str, list[str]] = {}
        self.by_key: dict[str, list[str]] = {}
        self.preempts: dict[str, set[str]] = {}  # class -> repos that claim it first
        self.patterns: list[tuple[re.Pattern, str]] = []
        self.core: set[str] = set()
        self.classes_of: dict[str, set[str]] = {}
        self.available = isinstance(node_map, dict)
        for url, value in (node_map if isinstance(node_map, dict) else {}).items():
            self._add_pack(url, value)
        self.stats = stats if isinstance(stats, dict) else {}
        self.models: dict[str, dict] = {}
        for entry in (model_list or {}).get("models") or [] if isinstance(model_list, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
                name = entry["filename"].lower()
                if name not in self.models or _placed(entry) and not _placed(self.models[name]):
                    self.models[name] = entry  # a file listed twice: the entry with a models folder wins

    def _add_pack(self, url: str, value: Any) -> None:
        if not (isinstance(value, list) and value and isinstance(value[0], list)):
            return
        classes = {c for c in value[0] if isinstance(c, str)}
        meta = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
        if repo_key(url) == repo_key(CORE_REPO):
            self.core |= classes
            return
        self.classes_of[url] = classes
        for c in classes:
            self.by_class.setdefault(c, []).append(url)
            self.by_key.setdefault(_norm_class(c), []).append(url)
        for c in meta.get("preemptions") or []:
            if isinstance(c, str):
                self.preempts.setdefault(c, set()).add(url)
        if isinstance(meta.get("nodename_pattern"), str):
            try:
                self.patterns.append((re.compile(meta["nodename_pattern"]), url))
            except re.error:
                log.debug("bad nodename_pattern of %s", url)

    @classmethod
    def load(cls, urls: dict[str, str], cache: DataCache) -> NodePacks:
        """``urls``: node_map, stats, model_list, registry (settings.py's node_map_url...)."""
        node_map = cache.get(urls["node_map"], "the node map (extension-node-map.json)")
        stats = cache.get(urls["stats"], "the node pack stats (github-stats.json)") if node_map else None
        models = cache.get(urls["model_list"], "the model list (model-list.json)")
        return cls(node_map, stats, models, cache, urls["registry"])

    def candidates(self, class_type: str) -> list[str]:
        """Every pack that claims the class: by name, by ``nodename_pattern``, else by the name
        without punctuation (the map drops characters such as ``&``)."""
        found = list(self.by_class.get(class_type, []))
        found += [url for pattern, url in self.patterns if url not in found and pattern.search(class_type)]
        if not found:
            found = list(dict.fromkeys(self.by_key.get(_norm_class(class_type), [])))
        return found

    def _rank(self, url: str, class_type: str, workflow_classes: set[str]) -> tuple:
        stats = self.stats.get(url) if isinstance(self.stats.get(url), dict) else {}
        covered = len(workflow_classes & self.classes_of.get(url, set()))
        return (
            url in self.preempts.get(class_type, ()),
            _number(stats.get("stars")),
            _number(stats.get("author_account_age_days")),
            covered,
        )

    def choose(self, class_type: str, workflow_classes: set[str], prefer: set[str] = frozenset()) -> Choice:
        """The pack for a class: one of ``prefer`` (repo keys: the config's nodes) when it claims it,
        else the one that preempts it, else the most starred (the original, not a fork or a bundle
        that copied it), then the older author account, then the one covering most of the
        workflow's classes."""
        found = self.candidates(class_type)
        if not found:
            return Choice(None)
        preferred = [u for u in found if repo_key(u) in prefer]
        if preferred:
            return Choice(preferred[0], found, "config")
        best = max(found, key=lambda u: self._rank(u, class_type, workflow_classes))
        return Choice(best, found, "node-map")

    def is_core(self, class_type: str) -> bool:
        return class_type in self.core

    def registry_repo(self, cnr_id: str) -> str | None:
        """The git URL the Comfy Registry gives for a pack id (``GET /nodes/{id}`` -> repository)."""
        if not self.cache or not self.registry:
            return None
        data = self.cache.get(f"{self.registry}/nodes/{quote(cnr_id, safe='')}", f"registry pack {cnr_id!r}", True)
        repo = data.get("repository") if isinstance(data, dict) else None
        return repo.strip() if isinstance(repo, str) and repo.strip().startswith(("https://", "http://")) else None

    def model(self, filename: str) -> dict | None:
        """model-list.json's entry for a file name (url, save_path, type), if it has one."""
        return self.models.get(filename.replace("\\", "/").rsplit("/", 1)[-1].lower())


def _placed(entry: dict) -> bool:
    """Does a model-list entry name a models folder ('animatediff_models'), not an old custom_nodes
    path ('AnimateDiff')? Folder names are lower case."""
    top = str(entry.get("save_path") or "").strip("/").split("/", 1)[0]
    return top == "default" or (top.islower() and top != "custom_nodes")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else -1.0
