"""Factory for local git repositories with tags, branches and submodules (test fixtures).

Each repo has a work tree (``work``) where commits are made and a bare clone (``bare``) that plays
the remote; ``url`` is its ``file://`` URL. Call ``push()`` after changing refs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str) -> str:
    import os

    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


class TestRepo:
    __test__ = False  # not a pytest class

    def __init__(self, root: Path, name: str):
        self.name = name
        self.work = root / "work" / name
        self.bare = root / "remotes" / f"{name}.git"
        self.work.mkdir(parents=True)
        git(self.work, "init", "-q")
        self.bare.parent.mkdir(parents=True, exist_ok=True)
        git(self.bare.parent, "init", "-q", "--bare", self.bare.name)
        git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(self, files: dict[str, str | bytes] | None = None, message: str = "change") -> str:
        for rel, content in (files or {}).items():
            p = self.work / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self, ref: str = "HEAD") -> str:
        return git(self.work, "rev-parse", f"{ref}^{{commit}}")

    def tag(self, name: str, ref: str = "HEAD", annotated: bool = True) -> str:
        if annotated:
            git(self.work, "tag", "-a", name, "-m", name, ref)
        else:
            git(self.work, "tag", name, ref)
        return self.head(name)

    def branch(self, name: str, start: str = "HEAD") -> None:
        git(self.work, "branch", name, start)

    def checkout(self, ref: str) -> None:
        git(self.work, "checkout", "-q", ref)

    def add_submodule(self, other: TestRepo, path: str) -> str:
        git(self.work, "submodule", "add", "-q", other.url, path)
        return self.commit(message=f"add submodule {path}")

    def push(self) -> TestRepo:
        git(self.work, "push", "-q", "--all", "origin")
        git(self.work, "push", "-q", "--tags", "--force", "origin")
        # make the bare repo's HEAD point at the work repo's default branch
        default = git(self.work, "symbolic-ref", "--short", "HEAD") if self._on_branch() else "main"
        git(self.bare, "symbolic-ref", "HEAD", f"refs/heads/{default}")
        return self

    def _on_branch(self) -> bool:
        try:
            git(self.work, "symbolic-ref", "-q", "HEAD")
            return True
        except subprocess.CalledProcessError:
            return False


class GitRepoFactory:
    def __init__(self, root: Path):
        self.root = root

    def create(self, name: str, files: dict[str, str | bytes] | None = None) -> TestRepo:
        repo = TestRepo(self.root, name)
        repo.commit(files or {"README.md": f"# {name}\n"}, message="initial")
        return repo


def colliding_commits(repo: TestRepo, digits: int = 7) -> tuple[str, str, str]:
    """Two commits (children of HEAD, same tree) whose shas share their first ``digits`` hex digits,
    each on a branch of its own (``collide-a``, ``collide-b``); returns (prefix, sha a, sha b). Found
    by the birthday bound: about 2**(2*digits) ** 0.5 candidate commits are hashed in Python (~20 000
    for 7 digits), only the two chosen are written."""
    import hashlib

    tree = git(repo.work, "rev-parse", "HEAD^{tree}")
    parent = repo.head()
    seen: dict[str, bytes] = {}
    i = 0
    while True:
        body = (
            f"tree {tree}\nparent {parent}\n"
            "author test <test@example.invalid> 1700000000 +0000\n"
            "committer test <test@example.invalid> 1700000000 +0000\n\n"
            f"collision candidate {i}\n"
        ).encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        prefix = sha[:digits]
        if prefix in seen and seen[prefix] != body:
            break
        seen[prefix] = body
        i += 1
    shas = []
    for name, data in (("collide-a", seen[prefix]), ("collide-b", body)):
        written = (
            subprocess.run(
                ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
                cwd=repo.work,
                input=data,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        git(repo.work, "branch", name, written)
        shas.append(written)
    assert shas[0][:digits] == shas[1][:digits] == prefix and shas[0] != shas[1]
    return prefix, shas[0], shas[1]
