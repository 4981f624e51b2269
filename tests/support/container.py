"""The real image under podman (tests/test_container.py), with the settings these machines need
(what podman needs here): runc, a containers.conf without default ulimits and with the
cgroupfs manager, host networking for builds and containers.

- ``ensure_base_image``: a Debian bookworm minbase made by debootstrap stands in for the CUDA base
  image (no Docker Hub here). The rootfs tarball is cached in ``.cache/container/`` (git-ignored) and
  the imported image is reused while podman still has it.
- ``build``: ``podman build`` of the repo's real Dockerfile on that base, the host's CA bundle mounted
  and passed as ``PIP_CERT``, the host's uv cache mounted over the Dockerfile's cache mount (so torch
  comes from wheels already on disk) and the torch the tests use chosen through ``TORCH_PACKAGES``.
- ``Container``: ``podman run -d`` with ``--network host``, its log, ``stop`` timed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "container"
BASE_IMAGE = "localhost/comfy-worker-base:bookworm"
BASE_TARBALL = CACHE / "bookworm-minbase.tar"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TEST_TORCH = "torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"  # what scripts/setup_env.sh installs
CONTAINERS_CONF = """[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def unavailable() -> str | None:
    """Why podman cannot run here (None when it can)."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup_env.sh installs it as root)"
    if not BASE_TARBALL.is_file() and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (scripts/setup_env.sh installs it as root)"
    return None


def podman_env() -> dict[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    if not conf.is_file() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["podman", "--runtime", "runc", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def cache_lock(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base_image() -> str:
    """The debootstrap bookworm base as a podman image (made once, then reused)."""
    with cache_lock("base"):
        if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return BASE_IMAGE
        if not BASE_TARBALL.is_file():
            work = Path(tempfile.mkdtemp(prefix="rootfs.", dir=CACHE))
            try:
                subprocess.run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        "bookworm",
                        str(work / "rootfs"),
                        "http://deb.debian.org/debian",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=900,
                )
                partial = BASE_TARBALL.with_suffix(".tar.part")
                with open(partial, "wb") as out:
                    subprocess.run(["tar", "-C", str(work / "rootfs"), "-c", "."], stdout=out, check=True)
                partial.replace(BASE_TARBALL)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        with open(BASE_TARBALL, "rb") as tarball:
            podman("import", "-", BASE_IMAGE, stdin=tarball)
    return BASE_IMAGE


def uv_cache_dir() -> Path | None:
    """The host's uv cache (where scripts/setup_env.sh left the torch wheels), if any."""
    path = Path(os.environ.get("UV_CACHE_DIR") or Path.home() / ".cache" / "uv")
    return path if path.is_dir() else None


def build(
    tag: str,
    log: Path,
    build_args: dict[str, str] | None = None,
    volumes: dict[Path, str] | None = None,
    secrets: dict[str, Path] | None = None,
    options: tuple[str, ...] = (),
    timeout: float = 2400,
) -> float:
    """``podman build`` of the repo's Dockerfile (context: the repo) on the debootstrap base; returns
    the seconds it took. ``volumes``: host path -> container path, mounted read-only into RUN steps."""
    args = {
        "BASE_IMAGE": ensure_base_image(),
        "PIP_CERT": "/etc/host-ca.crt",
        "TORCH_PACKAGES": TEST_TORCH,
        **(build_args or {}),
    }
    cmd = ["build", "--network", "host", "--format", "docker", "-t", tag, "-f", str(ROOT / "Dockerfile")]
    for name, value in args.items():
        cmd += ["--build-arg", f"{name}={value}"]
    cmd += ["-v", f"{HOST_CA}:/etc/host-ca.crt:ro"]
    if (uv := uv_cache_dir()) is not None:
        cmd += ["-v", f"{uv}:/root/.cache/uv"]
    for host, inside in (volumes or {}).items():
        cmd += ["-v", f"{host}:{inside}:ro"]
    for sid, src in (secrets or {}).items():
        cmd += ["--secret", f"id={sid},src={src}"]
    cmd += list(options)
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    started = time.monotonic()
    with cache_lock("build"), open(log, "w") as out:
        proc = subprocess.run(
            ["podman", "--runtime", "runc", *cmd, str(ROOT)],
            env=podman_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise AssertionError(f"podman build failed ({proc.returncode}); log tail:\n{log.read_text()[-6000:]}")
    seconds = time.monotonic() - started
    if previous and podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip() != previous:
        podman("rmi", previous, check=False)  # the image this tag named before (GBs of torch after a change)
    return seconds


class Container:
    """One ``podman run -d --network host`` of ``image``; ``env`` and read-only/writable mounts."""

    def __init__(self, image: str, name: str, env: dict[str, str], volumes: dict[Path, str]):
        self.image = image
        self.name = name
        self.env = env
        self.volumes = volumes
        self.started: float | None = None

    def start(self) -> Container:
        podman("rm", "-f", "-i", self.name, check=False)
        cmd = ["run", "-d", "--name", self.name, "--network", "host"]
        for key, value in self.env.items():
            cmd += ["-e", f"{key}={value}"]
        for host, inside in self.volumes.items():
            cmd += ["-v", f"{host}:{inside}"]
        self.started = time.monotonic()
        podman(*cmd, self.image)
        return self

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def running(self) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def stop(self, timeout: int = 10) -> float:
        """``podman stop -t timeout``; the seconds it took."""
        started = time.monotonic()
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 60)
        return time.monotonic() - started

    def remove(self) -> None:
        podman("rm", "-f", "-i", self.name, check=False)

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
