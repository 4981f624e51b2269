"""The git repo factory the node tests build on: tags, branches and submodules reach the bare remote."""

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
