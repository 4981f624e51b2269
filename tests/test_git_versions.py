"""git_versions.py: what a config version means for a real (local) remote, reading HEAD without
git, and the GitHub token header that git sends to github.com only."""

from __future__ import annotations

import base64
import logging

import git
import pytest
from support.local_http import QuietHandler, serve_in_thread

from comfy_worker import git_versions


@pytest.fixture
def versioned(git_repos):
    """A remote with tags v1.2.0 < v1.10.0 < v2.0.0-rc1 (pre-release), a 'release' non-version tag,
    a branch 'dev', and a default branch one commit ahead of everything."""
    repo = git_repos.create("VersionedNode", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    c = {"v1.2.0": repo.tag("v1.2.0")}
    repo.commit({"a.txt": "1"})
    c["v1.10.0"] = repo.tag("v1.10.0")
    repo.commit({"b.txt": "2"})
    c["v2.0.0-rc1"] = repo.tag("v2.0.0-rc1", annotated=False)
    c["release"] = repo.tag("release")
    repo.branch("dev")
    c["dev"] = repo.head("dev")
    c["main"] = repo.commit({"c.txt": "3"})
    repo.push()
    return repo, c


def test_release_order_is_by_version_not_by_text():
    assert git_versions.newest_release_tag(["v1.2.0", "v1.10.0", "v1.9.9"]) == "v1.10.0"
    assert git_versions.newest_release_tag(["1.2", "1.10", "release", "nightly-2024"]) == "1.10"


def test_pre_releases_only_count_when_there_is_no_release():
    assert git_versions.newest_release_tag(["v1.2.0", "v2.0.0-rc1", "v2.0.0b1", "v2.1.0.dev3"]) == "v1.2.0"
    assert git_versions.newest_release_tag(["v2.0.0-rc1", "v2.0.0b1"]) == "v2.0.0-rc1"
    assert git_versions.newest_release_tag(["stable", "foo"]) is None


def test_ls_remote_lists_default_branch_branches_and_peeled_tags(versioned):
    repo, c = versioned
    refs = git_versions.ls_remote(repo.url, None)
    assert refs.head_branch == "main" and refs.head == c["main"]
    assert refs.branches == {"main": c["main"], "dev": c["dev"]}
    # annotated tags are peeled to the commit they point at
    assert refs.tags["v1.10.0"] == c["v1.10.0"] and refs.tags["v2.0.0-rc1"] == c["v2.0.0-rc1"]


@pytest.mark.parametrize(
    ("version", "kind", "expected"),
    [
        ("latest", "latest", "v1.10.0"),  # v1.10.0 over v1.2.0, the v2.0.0-rc1 pre-release ignored
        ("nightly", "nightly", "main"),
        ("v1.2.0", "tag", "v1.2.0"),
        ("release", "tag", "release"),
        ("dev", "branch", "dev"),
    ],
)
def test_each_version_kind_resolves_to_its_commit(versioned, version, kind, expected):
    repo, c = versioned
    resolved = git_versions.resolve_version(version, git_versions.ls_remote(repo.url, None), repo.url)
    assert (resolved.kind, resolved.commit) == (kind, c[expected])


def test_commit_shas_full_and_short(versioned):
    repo, c = versioned
    refs = git_versions.ls_remote(repo.url, None)
    full = git_versions.resolve_version(c["v1.2.0"], refs, repo.url)
    assert (full.kind, full.commit) == ("commit", c["v1.2.0"])
    short = git_versions.resolve_version(c["v1.2.0"][:8], refs, repo.url)
    assert (short.kind, short.commit) == ("commit", None)  # looked up in the clone


def test_latest_without_version_tags_is_the_default_branch(git_repos):
    repo = git_repos.create("NoTags")
    repo.tag("stable")
    head = repo.commit({"x": "1"})
    repo.push()
    resolved = git_versions.resolve_version("latest", git_versions.ls_remote(repo.url, None), repo.url)
    assert resolved.commit == head and "no release tags" in resolved.describe()


def test_unknown_version_names_the_repo_and_suggests(versioned):
    repo, _ = versioned
    with pytest.raises(git_versions.VersionError) as err:
        git_versions.resolve_version("v1.10", git_versions.ls_remote(repo.url, None), repo.url)
    assert repo.url in str(err.value) and "'v1.10.0'" in str(err.value)


def test_unreachable_remote_is_a_clear_error(tmp_path):
    with pytest.raises(git_versions.VersionError, match="cannot list the refs"):
        git_versions.ls_remote((tmp_path / "missing.git").as_uri(), None)


def test_read_head_without_git_for_detached_branch_and_packed_refs(versioned, tmp_path):
    repo, c = versioned
    assert git_versions.read_head(repo.work) == c["main"]  # on a branch, loose ref
    git.Repo(repo.work).git.pack_refs("--all")
    assert git_versions.read_head(repo.work) == c["main"]  # packed ref
    repo.checkout(c["dev"])
    assert git_versions.read_head(repo.work) == c["dev"]  # detached
    assert git_versions.read_head(tmp_path) is None
    assert git_versions.comfyui_commit(repo.work) == c["dev"]


def test_clone_checkout_and_short_sha_in_clone(versioned, tmp_path):
    repo, c = versioned
    clone = git_versions.clone(repo.url, tmp_path / "clone", None)
    resolved = git_versions.resolve_version(c["v1.2.0"][:9], git_versions.ls_remote(repo.url, None), repo.url)
    commit = git_versions.commit_in_clone(clone, repo.url, None, resolved)
    git_versions.checkout(clone, commit, repo.url, None)
    assert commit == c["v1.2.0"] and git_versions.read_head(tmp_path / "clone") == c["v1.2.0"]
    missing = git_versions.Resolved("deadbeef1", "commit", None)
    with pytest.raises(git_versions.VersionError, match="does not exist"):
        git_versions.commit_in_clone(clone, repo.url, None, missing)


def test_submodules_are_checked_out_recursively(git_repos, tmp_path):
    inner = git_repos.create("Inner", {"inner.txt": "inner"}).push()
    middle = git_repos.create("Middle", {"middle.txt": "middle"})
    middle.add_submodule(inner, "deps/inner")
    middle.push()
    top = git_repos.create("Top")
    head = top.add_submodule(middle, "vendor/middle")
    top.push()
    clone = git_versions.clone(top.url, tmp_path / "top", None)
    git_versions.checkout(clone, head, top.url, None)
    assert (tmp_path / "top/vendor/middle/middle.txt").read_text() == "middle"
    assert (tmp_path / "top/vendor/middle/deps/inner/inner.txt").read_text() == "inner"


def test_local_edits_go_to_a_named_stash(versioned, tmp_path):
    repo, c = versioned
    clone = git_versions.clone(repo.url, tmp_path / "n", None)
    git_versions.checkout(clone, c["main"], repo.url, None)
    (tmp_path / "n" / "__init__.py").write_text("# my fix\n")
    (tmp_path / "n" / "untracked.txt").write_text("mine")
    note = git_versions.stash_local_edits(clone, tmp_path / "n", "comfy-worker: before v1.2.0")
    assert "__init__.py" in note and "comfy-worker: before v1.2.0" in note
    assert "comfy-worker: before v1.2.0" in clone.git.stash("list")
    assert git_versions.local_edits(clone) == [] and (tmp_path / "n" / "untracked.txt").exists()
    assert git_versions.stash_local_edits(clone, tmp_path / "n", "nothing") == ""


def test_stash_takes_deleted_and_renamed_files_and_leaves_a_submodule_at_another_commit(git_repos, tmp_path):
    sub = git_repos.create("Sub", {"s.txt": "one"}).push()
    top = git_repos.create("Top", {"a.txt": "a", "b.txt": "b"})
    first = top.add_submodule(sub, "vendor/sub")
    sub.commit({"s.txt": "two"})
    sub.push()
    top.push()
    clone = git_versions.clone(top.url, tmp_path / "n", None)
    git_versions.checkout(clone, first, top.url, None)
    work = tmp_path / "n"
    git.Repo(work / "vendor/sub").git.checkout("-q", sub.head())  # only at another commit: not an edit
    (work / "a.txt").unlink()
    clone.git.mv("b.txt", "c.txt")
    assert git_versions.worktree_changes(clone) == (["a.txt", "c.txt", "b.txt"], [])
    note = git_versions.stash_local_edits(clone, work, "comfy-worker: test")
    assert "a.txt" in note and "comfy-worker: test" in clone.git.stash("list")
    assert (work / "a.txt").exists() and (work / "b.txt").exists() and not (work / "c.txt").exists()
    assert (work / "vendor/sub/s.txt").read_text() == "two"  # untouched; the checkout moves it
    (work / "vendor/sub/s.txt").write_text("edited")
    assert git_versions.worktree_changes(clone) == ([], ["vendor/sub"])


# ---- the GitHub token ----


def _config_pairs(env: dict[str, str]) -> dict[str, str]:
    return {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(int(env["GIT_CONFIG_COUNT"]))}


def test_git_env_scopes_the_token_header_to_github(monkeypatch):
    monkeypatch.delenv("GIT_CONFIG_COUNT", raising=False)
    pairs = _config_pairs(git_versions.git_env("https://github.com/org/node.git", "ghp_secret123"))
    value = pairs["http.https://github.com/.extraheader"]
    assert value == "AUTHORIZATION: basic " + base64.b64encode(b"x-access-token:ghp_secret123").decode()
    assert list(pairs) == ["http.https://github.com/.extraheader"]  # nothing else for an https URL
    assert _config_pairs(git_versions.git_env("https://github.com/org/node.git", None)) == {}
    local = _config_pairs(git_versions.git_env("file:///srv/node.git", None))
    assert local == {"protocol.file.allow": "always"}


def test_git_env_keeps_config_entries_passed_by_the_user(monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    env = git_versions.git_env("https://github.com/o/n.git", "tok")
    assert env["GIT_CONFIG_COUNT"] == "2" and env["GIT_CONFIG_KEY_1"].endswith(".extraheader")


def test_a_non_numeric_GIT_CONFIG_COUNT_counts_as_zero_with_a_warning(monkeypatch, caplog, versioned):
    repo, c = versioned
    monkeypatch.setenv("GIT_CONFIG_COUNT", "lots")
    with caplog.at_level(logging.WARNING):
        env = git_versions.git_env(repo.url, None)
    assert _config_pairs(env) == {"protocol.file.allow": "always"}
    assert "GIT_CONFIG_COUNT" in caplog.text and "'lots'" in caplog.text
    assert git_versions.ls_remote(repo.url, None).head == c["main"]  # git runs fine with the count it is given


class _RecordingHandler(QuietHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(404)
        self.end_headers()


@pytest.fixture
def recording_server():
    _RecordingHandler.seen = []
    server = serve_in_thread(_RecordingHandler)
    yield f"http://127.0.0.1:{server.server_address[1]}/", _RecordingHandler.seen
    server.shutdown()
    server.server_close()


def test_git_sends_the_header_only_to_the_configured_host(recording_server):
    base, seen = recording_server
    url = base + "org/node.git"
    # scoped to github.com (the real setting): this host never sees it
    with pytest.raises(git.GitCommandError):
        git.cmd.Git().ls_remote(url, env=git_versions.git_env(url, "tok-abc"))
    assert seen and all("authorization" not in h for h in seen)
    # the same mechanism scoped to this host: git does send it, so the scoping is what protects it
    seen.clear()
    with pytest.raises(git.GitCommandError):
        git.cmd.Git().ls_remote(url, env=git_versions.git_env(url, "tok-abc", header_prefix=base))
    assert seen[0]["authorization"] == "basic " + base64.b64encode(b"x-access-token:tok-abc").decode()


# ---- which URLs are local, which names win ----


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("file:///srv/node.git", True),
        ("/srv/nodes/node.git", True),
        ("./nodes/node", True),
        ("relative/dir:with-colon", True),  # the slash comes first: a path, as for git
        ("https://github.com/org/node.git", False),
        ("ssh://git@example.com/org/node.git", False),
        ("git@example.com:org/node.git", False),
        ("example.com:org/node.git", False),  # scp-style without user@ is ssh too
        ("example.com:node.git", False),
    ],
)
def test_scp_style_urls_are_remote_and_get_no_file_protocol(url, local, monkeypatch):
    monkeypatch.delenv("GIT_CONFIG_COUNT", raising=False)
    assert git_versions.is_local_url(url) is local
    pairs = _config_pairs(git_versions.git_env(url, None))
    assert ("protocol.file.allow" in pairs) is local


def test_a_name_that_is_both_a_tag_and_a_branch_means_the_tag(git_repos):
    repo = git_repos.create("Both")
    tagged = repo.tag("stable")
    repo.branch("stable-branch-source")
    moved = repo.commit({"later.txt": "x"})
    repo.branch("stable")  # a branch of the same name, one commit later
    repo.push()
    refs = git_versions.ls_remote(repo.url, None)
    assert refs.tags["stable"] == tagged and refs.branches["stable"] == moved
    resolved = git_versions.resolve_version("stable", refs, repo.url)
    assert (resolved.kind, resolved.commit) == ("tag", tagged)


def test_an_ambiguous_short_sha_is_an_error_listing_both_commits(git_repos, tmp_path):
    from support.gitrepos import colliding_commits

    repo = git_repos.create("Ambiguous")
    prefix, a, b = colliding_commits(repo)
    repo.push()
    clone = git_versions.clone(repo.url, tmp_path / "clone", None)
    resolved = git_versions.resolve_version(prefix, git_versions.ls_remote(repo.url, None), repo.url)
    with pytest.raises(git_versions.VersionError) as err:
        git_versions.commit_in_clone(clone, repo.url, None, resolved)
    assert f"short sha {prefix!r} is ambiguous" in str(err.value) and a in str(err.value) and b in str(err.value)
    assert git_versions.has_commit(clone, a[:12]) == a  # more digits: one commit


def test_network_git_commands_end_at_once_when_stopped(tmp_path):
    import socket
    import threading
    import time

    from comfy_worker.volume_lock import Interrupted

    listener = socket.socket()  # accepts the connection, never answers: git waits forever
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/org/node.git"
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            git_versions.clone(url, tmp_path / "clone", None, stop)
    finally:
        listener.close()
    assert time.monotonic() - start < 5
