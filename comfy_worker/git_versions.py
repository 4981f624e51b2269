"""The git side of install_nodes.py: what a config ``version`` means for a remote, and moving a
checkout there (GitPython for every git command).

- ``latest``: the newest release tag in version order (v1.10.0 > v1.2.0); pre-releases only when
  there is no release; a repository without version tags gives its default branch head.
- ``nightly``: the default branch head. Otherwise a tag, a branch, or a full or short commit sha.
- ``GITHUB_TOKEN`` is handed to git as an ``http.https://github.com/.extraheader`` config entry in
  the git process environment (GIT_CONFIG_COUNT/KEY/VALUE): git itself sends it only to URLs under
  https://github.com/, and it never appears in a command line, a URL, a log or ``.git/config``.

GitPython is imported lazily: the warm path (nothing changed) reads HEAD from files and never needs it.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:
    from git import Repo

log = logging.getLogger(__name__)

GITHUB_PREFIX = "https://github.com/"  # the only URLs GITHUB_TOKEN is sent to (tests point it at a local server)
HEX_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
FULL_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# Versions whose commit moves upstream: re-resolved only with --update.
MOVING_KINDS = ("latest", "nightly", "branch")
NETWORK_TIMEOUT = 900  # seconds for one clone/fetch/submodule update
LS_REMOTE_TIMEOUT = 120
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "comfy-worker",
    "GIT_AUTHOR_EMAIL": "comfy-worker@localhost",
    "GIT_COMMITTER_NAME": "comfy-worker",
    "GIT_COMMITTER_EMAIL": "comfy-worker@localhost",
}


class VersionError(Exception):
    """A version that does not exist in the repository, or a git operation that failed."""


class LocalEditsError(Exception):
    """The node folder has local edits that a checkout would have to throw away."""


# ---- environment of every git process ----


def is_local_url(url: str) -> bool:
    """file:// URLs and plain paths; not https://, ssh:// or scp-like ``[user@]host:path`` (git's own
    rule: a colon before the first slash makes it ssh, ``example.com:org/repo.git`` included)."""
    if urlparse(url).scheme == "file":
        return True
    if "://" in url:
        return False
    colon, slash = url.find(":"), url.find("/")
    return not (colon > 0 and (slash < 0 or colon < slash))


def github_auth_header(token: str) -> str:
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return f"AUTHORIZATION: basic {basic}"


def git_env(url: str, token: str | None, header_prefix: str | None = None) -> dict[str, str]:
    """Environment for a git process working on ``url``: no prompts, stalled transfers abort, the
    token as an extra header scoped to ``header_prefix`` (git matches it against each request URL,
    so submodules on other hosts never see it), and file:// submodules allowed for local repos
    (the user chose local repositories, so local submodules are expected)."""
    config: list[tuple[str, str]] = []
    if token:
        config.append((f"http.{header_prefix or GITHUB_PREFIX}.extraheader", github_auth_header(token)))
    if is_local_url(url):
        config.append(("protocol.file.allow", "always"))
    env = {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
        "GIT_HTTP_LOW_SPEED_TIME": "60",
    }
    base = _user_config_count(os.environ.get("GIT_CONFIG_COUNT", ""))  # keep entries the user passed this way
    for i, (key, value) in enumerate(config, start=base):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env["GIT_CONFIG_COUNT"] = str(base + len(config))
    return env


@functools.lru_cache(maxsize=8)  # one warning per value, not one per git process
def _user_config_count(raw: str) -> int:
    if not raw.strip():
        return 0
    try:
        count = int(raw)
    except ValueError:
        count = -1
    if count < 0:
        log.warning(
            "GIT_CONFIG_COUNT=%r is not a whole number >= 0; counted as 0 (entries passed that way ignored)", raw
        )
        return 0
    return count


# ---- remote refs and version resolution ----


@dataclass
class RemoteRefs:
    head: str | None = None  # commit of the default branch
    head_branch: str | None = None
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit (peeled)


@dataclass(frozen=True)
class Resolved:
    version: str  # as written in the config
    kind: str  # latest | nightly | tag | branch | commit
    commit: str | None  # full sha; None for a short sha that must be looked up in the clone
    ref: str = ""  # e.g. "tag v1.10.0", "branch main"

    def describe(self) -> str:
        return self.ref or self.kind


def parse_ls_remote(text: str) -> RemoteRefs:
    refs = RemoteRefs()
    tags: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in text.splitlines():
        left, _, name = line.partition("\t")
        if left.startswith("ref: "):
            if name == "HEAD" and left[5:].startswith("refs/heads/"):
                refs.head_branch = left[len("ref: refs/heads/") :]
            continue
        if name == "HEAD":
            refs.head = left
        elif name.startswith("refs/heads/"):
            refs.branches[name[len("refs/heads/") :]] = left
        elif name.startswith("refs/tags/"):
            tag = name[len("refs/tags/") :]
            if tag.endswith("^{}"):
                peeled[tag[:-3]] = left
            else:
                tags[tag] = left
    refs.tags = {t: peeled.get(t, sha) for t, sha in tags.items()}
    if refs.head is None and refs.head_branch in refs.branches:
        refs.head = refs.branches[refs.head_branch]
    return refs


def run_git(
    args: list[str],
    what: str,
    url: str,
    token: str | None,
    cwd: Path | None = None,
    timeout: float = NETWORK_TIMEOUT,
    stop: threading.Event | None = None,
) -> str:
    """A git command that may use the network: stdin closed, its own session, killed at ``timeout``
    or when ``stop`` is set (Interrupted), without secrets in its environment. Its output (stdout
    and stderr); VersionError saying ``what`` failed and git's reason."""
    from comfy_worker.node_requirements import ChildTimeout, child_env, run_child

    try:
        done = run_child(["git", *args], cwd=cwd, env=child_env(git_env(url, token)), timeout=timeout, stop=stop)
    except ChildTimeout:
        raise VersionError(f"{what} did not finish within {timeout:g} s (network too slow or stalled?)") from None
    if done.returncode != 0:
        raise VersionError(f"{what}: {_output_tail(done.output)}")
    return done.output


def _output_tail(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return " / ".join(lines[-5:]) if lines else "(no output)"


def ls_remote(url: str, token: str | None, stop: threading.Event | None = None) -> RemoteRefs:
    out = run_git(
        ["ls-remote", "--symref", url, "HEAD", "refs/heads/*", "refs/tags/*"],
        f"cannot list the refs of {url}",
        url,
        token,
        timeout=LS_REMOTE_TIMEOUT,
        stop=stop,
    )
    return parse_ls_remote(out)


def release_version(tag: str) -> Version | None:
    """The version a tag names (``v1.10.0`` -> 1.10.0), or None when it is not a version."""
    text = tag[1:] if tag[:1] in ("v", "V") else tag
    if not text[:1].isdigit():
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def newest_release_tag(tags: dict[str, str] | list[str]) -> str | None:
    """The highest version tag, preferring final releases over pre-releases (rc, beta, alpha, dev)."""
    versions = [(v, t) for t in tags if (v := release_version(t)) is not None]
    finals = [(v, t) for v, t in versions if not (v.is_prerelease or v.is_devrelease)]
    pool = finals or versions
    return max(pool)[1] if pool else None


def resolve_version(version: str, refs: RemoteRefs, url: str) -> Resolved:
    if version == "latest":
        tag = newest_release_tag(refs.tags)
        if tag:
            return Resolved(version, "latest", refs.tags[tag], f"tag {tag}")
        return _default_branch(version, "latest", refs, url)
    if version == "nightly":
        return _default_branch(version, "nightly", refs, url)
    if version in refs.tags:
        return Resolved(version, "tag", refs.tags[version], f"tag {version}")
    if version in refs.branches:
        return Resolved(version, "branch", refs.branches[version], f"branch {version}")
    if HEX_RE.match(version):
        sha = version.lower()
        return Resolved(version, "commit", sha if len(sha) == 40 else None, f"commit {sha[:12]}")
    raise VersionError(_unknown_version(version, refs, url))


def _default_branch(version: str, kind: str, refs: RemoteRefs, url: str) -> Resolved:
    if not refs.head:
        raise VersionError(f"{url} has no default branch (an empty repository?)")
    note = f"branch {refs.head_branch}" if refs.head_branch else "default branch"
    if kind == "latest":
        note += " (no release tags)"
    return Resolved(version, kind, refs.head, note)


def _unknown_version(version: str, refs: RemoteRefs, url: str) -> str:
    import difflib

    names = list(refs.tags) + list(refs.branches)
    close = difflib.get_close_matches(version, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    newest = sorted(refs.tags, key=lambda t: (release_version(t) or Version("0"), t))[-5:]
    return (
        f"version {version!r} is not a tag, branch or commit sha of {url}{hint} "
        f"(newest tags: {', '.join(newest) or 'none'}; branches: {', '.join(list(refs.branches)[:5]) or 'none'}; "
        f"or use 'latest' / 'nightly')"
    )


# ---- reading a checkout without spawning git ----


def git_dir(work: Path) -> Path | None:
    dot = work / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # "gitdir: <path>" (worktrees, submodules)
        text = dot.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            target = Path(text[len("gitdir:") :].strip())
            return target if target.is_absolute() else (work / target).resolve()
    return None


def read_head(work: str | Path) -> str | None:
    """The commit checked out in ``work``, read from .git/HEAD and the refs files (no process)."""
    gdir = git_dir(Path(work))
    if gdir is None:
        return None
    try:
        head = (gdir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not head.startswith("ref: "):
        return head if FULL_SHA_RE.match(head) else None
    ref = head[5:].strip()
    try:
        sha = (gdir / ref).read_text(encoding="utf-8").strip()
        return sha if FULL_SHA_RE.match(sha) else None
    except OSError:
        pass
    try:
        for line in (gdir / "packed-refs").read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and FULL_SHA_RE.match(sha):
                return sha
    except OSError:
        pass
    return None


def comfyui_commit(path: str | Path) -> str | None:
    """The commit of a ComfyUI checkout (for the ``comfyui`` section of comfy.lock.yml)."""
    return read_head(path)


def same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.strip().rstrip("/")
        u = u[:-4] if u.endswith(".git") else u
        return u.rstrip("/").lower()

    return norm(a) == norm(b)


# ---- changing a checkout (GitPython) ----


def _git_error(err: Exception) -> str:
    stderr = getattr(err, "stderr", "") or ""
    lines = [ln.strip() for ln in str(stderr).replace("stderr:", "").strip().strip("'").splitlines() if ln.strip()]
    return " / ".join(lines[-5:]) if lines else str(err)


def open_repo(work: Path) -> Repo:
    """GitPython's Repo for ``work``; its git processes get a ``GIT_CONFIG_COUNT`` git accepts (a
    non-numeric one from the user would make every local git command fail with "bogus count")."""
    import git

    repo = git.Repo(work)
    raw = os.environ.get("GIT_CONFIG_COUNT", "")
    if raw.strip() and str(_user_config_count(raw)) != raw:
        repo.git.update_environment(GIT_CONFIG_COUNT=str(_user_config_count(raw)))
    return repo


def origin_url(repo: Repo) -> str | None:
    try:
        return repo.remotes.origin.url
    except (AttributeError, ValueError):
        return None


def has_commit(repo: Repo, sha: str) -> str | None:
    """The full sha of ``sha`` (full or short) when the object database has that commit. A short
    sha is only ever a sha prefix here (ref names are matched before, from the remote's refs); one
    that matches several commits is a VersionError listing them."""
    import git

    if len(sha) < 40 and HEX_RE.match(sha):
        try:
            objects = repo.git.rev_parse(f"--disambiguate={sha.lower()}").split()
        except git.GitCommandError:
            return None
        commits = [o for o in objects if _object_type(repo, o) == "commit"]
        if len(commits) > 1:
            raise VersionError(
                f"short sha {sha!r} is ambiguous: it matches the commits {', '.join(sorted(commits))}; "
                "write more digits (or the full sha) in 'version'"
            )
        return commits[0] if commits else None
    try:
        return repo.git.rev_parse("--verify", "--quiet", f"{sha}^{{commit}}").strip() or None
    except git.GitCommandError:
        return None


def _object_type(repo: Repo, sha: str) -> str:
    import git

    try:
        return repo.git.cat_file("-t", sha).strip()
    except git.GitCommandError:
        return ""


def fetch(repo: Repo, url: str, token: str | None, sha: str | None = None, stop: threading.Event | None = None) -> None:
    """Fetch branches and tags from origin; a commit that no ref reaches is fetched by its full sha."""
    work = Path(repo.git_dir)
    what = f"fetching {url} failed"
    run_git(["--git-dir", str(work), "fetch", "--force", "--tags", "--prune", "origin"], what, url, token, stop=stop)
    if sha and len(sha) == 40 and not has_commit(repo, sha):
        run_git(["--git-dir", str(work), "fetch", "origin", sha], what, url, token, stop=stop)


def clone(url: str, dest: Path, token: str | None, stop: threading.Event | None = None) -> Repo:
    """A full clone of ``url`` into ``dest`` without a checkout (checkout() picks the commit)."""

    run_git(["clone", "--no-checkout", "--", url, str(dest)], f"cloning {url} failed", url, token, stop=stop)
    return open_repo(dest)


def commit_in_clone(
    repo: Repo, url: str, token: str | None, resolved: Resolved, stop: threading.Event | None = None
) -> str:
    """The full commit for ``resolved`` in ``repo``, fetching when the clone does not have it yet."""
    wanted = resolved.commit or resolved.version
    found = has_commit(repo, wanted)
    if found is None:
        fetch(repo, url, token, resolved.commit, stop)
        found = has_commit(repo, wanted)
    if found is None:
        raise VersionError(f"commit {resolved.version!r} does not exist in {url}")
    return found


def worktree_changes(repo: Repo) -> tuple[list[str], list[str]]:
    """(tracked files changed in the work tree or index, submodules with changed tracked content).
    Untracked files survive a checkout and are not listed; a submodule that is only at another
    commit is not an edit either (its commits stay in its own repository; the checkout moves it)."""
    # GIT_OPTIONAL_LOCKS=0: a status never rewrites the index (a dry run changes no byte of a node)
    out = repo.git.status(
        "--porcelain=v2", "-z", "--untracked-files=no", "--ignore-submodules=none", env={"GIT_OPTIONAL_LOCKS": "0"}
    )
    files: list[str] = []
    submodules: list[str] = []
    fields = iter(out.split("\0"))
    for item in fields:
        kind = item[:1]
        if kind not in ("1", "2", "u"):
            continue
        parts = item.split(" ", {"1": 8, "2": 9, "u": 10}[kind])
        sub, path = parts[2], parts[-1]
        paths = [path, next(fields, "")] if kind == "2" else [path]  # a rename: new path, then the old one
        if sub.startswith("S"):
            if sub[2] == "M":
                submodules.append(path)
        else:
            files.extend(p for p in paths if p)
    return files, submodules


def local_edits(repo: Repo) -> list[str]:
    """Tracked files changed in the work tree or index, submodules with edits included."""
    files, submodules = worktree_changes(repo)
    return files + [f"{s} (submodule)" for s in submodules]


def stash_local_edits(repo: Repo, work: Path, message: str) -> str:
    """Keep tracked local edits on a named stash. Edits inside a submodule cannot be kept that way:
    LocalEditsError, raised before anything is stashed, so the folder stays exactly as it was."""
    import git

    files, submodules = worktree_changes(repo)
    if submodules:
        where = "; ".join(f"git -C {work / s} status" for s in submodules[:3])
        raise LocalEditsError(
            f"{work} has local edits inside submodules ({', '.join(submodules[:5])}); nothing was changed or "
            f"stashed, they are not thrown away: commit or discard them ({where}), then run again"
        )
    if not files:
        return ""
    try:
        repo.git.stash("push", "-m", message, env=GIT_IDENTITY)
    except git.GitCommandError as err:
        raise LocalEditsError(
            f"{work} has local edits ({', '.join(files[:5])}) that could not be stashed: {_git_error(err)}; "
            f"commit or remove them (git -C {work} status), then run again"
        ) from None
    note = f"local edits to {', '.join(files[:5])} kept on stash {message!r} (git -C {work} stash list)"
    left = worktree_changes(repo)[0]
    if left:
        raise LocalEditsError(f"{work} still has local edits ({', '.join(left[:5])}) after {note}; run again")
    return note


def checkout(repo: Repo, commit: str, url: str, token: str | None, stop: threading.Event | None = None) -> None:
    """Detached checkout of ``commit`` plus its submodules (recursive)."""
    import git

    work = Path(repo.working_tree_dir or ".")
    what = f"checking out {commit[:12]} in {work} failed"
    try:
        repo.git.checkout("-q", "--detach", commit)
        if (work / ".gitmodules").exists():
            repo.git.submodule("sync", "--recursive", env=git_env(url, token))
    except git.GitCommandError as err:
        raise VersionError(f"{what}: {_git_error(err)}") from None
    if (work / ".gitmodules").exists():
        run_git(["submodule", "update", "--init", "--recursive"], what, url, token, cwd=work, stop=stop)


def set_origin(repo: Repo, url: str) -> None:
    repo.remotes.origin.set_url(url)
