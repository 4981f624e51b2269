"""The git repo factory the node tests build on: tags, branches and submodules reach the bare remote."""

import os
import subprocess


def ls_remote(url: str) -> dict[str, str]:
    out = subprocess.run(["git", "ls-remote", url], check=True, capture_output=True, text=True).stdout
    return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines())}


def test_tags_branches_and_default_branch_reach_the_remote(git_repos):
    repo = git_repos.create("node-a", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    first = repo.head()
    repo.tag("v1.0.0")
    second = repo.commit({"x.py": "x = 1\n"})
    repo.tag("v1.1.0", annotated=False)
    repo.branch("feature", first)
    repo.push()
    refs = ls_remote(repo.url)
    assert refs["HEAD"] == second and refs["refs/heads/main"] == second
    assert refs["refs/heads/feature"] == first
    assert refs["refs/tags/v1.0.0^{}"] == first  # annotated tag peels to the commit
    assert refs["refs/tags/v1.1.0"] == second


def test_submodule_is_recorded(git_repos, tmp_path):
    lib = git_repos.create("lib", {"lib.py": "VALUE = 42\n"}).push()
    node = git_repos.create("node-b")
    node.add_submodule(lib, "vendor/lib")
    node.push()
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "-c", "protocol.file.allow=always", "clone", "-q", "--recurse-submodules", node.url, str(clone)],
        check=True,
    )
    assert (clone / "vendor" / "lib" / "lib.py").read_text() == "VALUE = 42\n"


def test_colliding_commits_share_a_short_sha(git_repos):
    from support.gitrepos import colliding_commits

    repo = git_repos.create("collide")
    prefix, a, b = colliding_commits(repo)
    assert a != b and a[:7] == b[:7] == prefix
    out = subprocess.run(
        ["git", "rev-parse", "--verify", f"{prefix}^{{commit}}"], cwd=repo.work, capture_output=True, text=True
    )
    assert out.returncode != 0 and "ambiguous" in out.stderr


def test_git_http_server_serves_clones_and_can_demand_a_token(git_repos, tmp_path):
    from support.git_http import GitHttpServer

    repo = git_repos.create("served", {"a.txt": "a"}).push()
    server = GitHttpServer(git_repos.root / "remotes", required_authorization="Basic c2VjcmV0")
    try:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        denied = subprocess.run(["git", "ls-remote", server.url("served")], capture_output=True, text=True, env=env)
        assert denied.returncode != 0
        authorized = ["git", "-c", "http.extraheader=Authorization: Basic c2VjcmV0", "clone", "-q"]
        subprocess.run([*authorized, server.url("served"), str(tmp_path / "c")], check=True, env=env)
        assert (tmp_path / "c" / "a.txt").read_text() == "a"
        assert server.authorizations()[-1] == "Basic c2VjcmV0"
        assert (
            repo.head()
            == subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=tmp_path / "c", capture_output=True, text=True
            ).stdout.strip()
        )
    finally:
        server.close()
