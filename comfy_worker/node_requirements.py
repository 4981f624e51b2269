"""Python requirements of custom nodes: installed into the environment ComfyUI runs in, with a
constraints file that pins the exact installed builds (``===``) of torch, torchvision, torchaudio and
every package they pin in turn (``nvidia-*``, ``triton``...), so no node can replace them.

- The target environment is the one of ``$PYTHON`` (default: the python running the script).
- ``uv pip install --python <python>`` when uv is found (next to that python, next to ours, or on
  PATH), else ``<python> -m pip install``. ``NODES_INSTALLER=uv|pip`` forces one.
- All changed nodes are installed together first; when that fails, one by one, so a node whose
  requirements conflict is named and the others still get installed.
- When installing them together fails but each node alone succeeds, their requirements conflict
  with each other: every node whose requirements are no longer met afterwards fails, naming the
  node(s) it cannot be installed together with. Nodes already installed earlier are passed to the
  resolver too (``installed=``), so a new node cannot silently break them.
- ``install.py`` runs after the requirements, with a timeout, with ``PIP_CONSTRAINT``/``UV_CONSTRAINT``
  set so a pip call inside it cannot replace torch either. A script that replaces them anyway
  (constraints only bind pip calls that read them) fails its node, and the pinned versions are
  installed back.
- The pinned builds are recorded in the environment's record the first time; a torch found changed
  later (a restore that failed) is restored to the recorded build, never adopted as the new pin.
- Installer options in a node's requirements (``--extra-index-url``, ``--find-links``, ``--pre``...)
  apply to a whole installer run, so such a node is installed in a run of its own; relative paths
  (``./vendor/pkg``, ``-e .``) would resolve against the installer's folder and are refused by name.
- install.py, pip and uv run without any secret (``settings.is_secret_name``) in their
  environment (third-party code runs there), stdin closed, in a session of their own: a timeout or
  SIGTERM (``stop``) kills everything they started (``run_child``). docs/nodes.md has the rules.
- What has been installed is recorded INSIDE the target environment (``<sys.prefix>/comfy-worker-node-
  requirements.json``): the record lives and dies with the packages it describes. A fresh container
  with a fresh environment has no record, so the requirements are installed again, even though the
  node folders on the volume are current.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from comfy_worker.lock_file import atomic_write_text
from comfy_worker.settings import is_secret_name
from comfy_worker.state_files import NODE_REQUIREMENTS_RECORD
from comfy_worker.volume_lock import Interrupted

log = logging.getLogger(__name__)

PROTECTED = ("torch", "torchvision", "torchaudio")
PIP_TIMEOUT = 3600
CHILD_MARK = "COMFY_WORKER_CHILD"  # in the environment of every child: finds its descendants, even in other sessions
POLL_S = 0.1


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment minus the secrets, for every process started here (install.py, pip, uv and
    the target python: all of them run code from the nodes or their packages)."""
    env = {k: v for k, v in os.environ.items() if not is_secret_name(k)}
    env.update(extra or {})
    return env


def cache_env(package_cache: Path | None) -> dict[str, str]:
    """pip's and uv's caches on the volume (unless the user set them): a fresh container reinstalls
    node requirements from wheels already downloaded or built there."""
    if package_cache is None:
        return {}
    wanted = {"PIP_CACHE_DIR": package_cache / "pip", "UV_CACHE_DIR": package_cache / "uv"}
    env = {k: str(v) for k, v in wanted.items() if not os.environ.get(k)}
    if env:
        env.setdefault("UV_LINK_MODE", os.environ.get("UV_LINK_MODE") or "copy")  # the volume is another fs
    return env


class ChildTimeout(Exception):
    """A child process ran past its timeout (it and everything it started were killed)."""


@dataclass
class ChildResult:
    returncode: int
    output: str
    leftovers: int = 0  # processes it left running, killed


def run_child(
    cmd: list[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    kill_leftovers: bool = False,
) -> ChildResult:
    """Run ``cmd`` with stdin closed, in a session of its own, its output in a temp file (so a
    grandchild that keeps stdout open cannot hold us). On ``timeout`` (ChildTimeout) or ``stop``
    (Interrupted), and with ``kill_leftovers`` also after it exits, every process it started is
    killed: its process group, and any process carrying its mark in the environment (a child that
    starts a session of its own leaves the group, not the environment)."""
    mark = uuid.uuid4().hex
    env = {**(env if env is not None else child_env()), CHILD_MARK: mark}
    deadline = None if timeout is None else time.monotonic() + timeout
    ended: Exception | None = None
    leftovers = 0
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop is not None and stop.is_set():
                    ended = Interrupted(f"stopped while running {Path(cmd[0]).name}")
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    ended = ChildTimeout(f"did not finish within {timeout:g} s")
                    break
        finally:
            if ended is not None or kill_leftovers or proc.returncode is None:
                leftovers = _kill_tree(proc, mark)
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace")
    if ended is not None:
        raise ended
    return ChildResult(proc.returncode, output, leftovers)


def _marked_pids(mark: str) -> list[int]:
    needle = f"{CHILD_MARK}={mark}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_tree(proc: subprocess.Popen, mark: str) -> int:
    """SIGKILL the child's process group and every process with its mark; the number of processes
    other than the child itself that were still there."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        proc.wait()
    killed: set[int] = set()
    for _ in range(5):  # a process forking while we look is caught by the next pass
        pids = [p for p in _marked_pids(mark) if p != proc.pid]
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)
    return len(killed)


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to read its status)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class TargetEnv:
    python: str
    prefix: Path

    @property
    def is_current(self) -> bool:
        return self.python == sys.executable

    @property
    def record_path(self) -> Path:
        return self.prefix / NODE_REQUIREMENTS_RECORD


@dataclass
class NodeReqs:
    """One node whose requirements are to be installed."""

    label: str  # e.g. "nodes[2] ComfyUI-Foo" (used in every message about it)
    path: Path
    commit: str

    @property
    def requirements_file(self) -> Path | None:
        f = self.path / "requirements.txt"
        return f if f.is_file() else None

    @property
    def install_py(self) -> Path | None:
        f = self.path / "install.py"
        return f if f.is_file() else None

    def has_work(self) -> bool:
        return self.requirements_file is not None or self.install_py is not None

    def scan(self) -> tuple[list[str], str | None]:
        """(installer options its requirements set, the reason they are refused or None)."""
        if self.requirements_file is None:
            return [], None
        return scan_requirements(self.requirements_file, self.path, self.label)


_NESTED = {"-r": "requirement", "--requirement": "requirement", "-c": "constraint", "--constraint": "constraint"}
_EDITABLE = ("-e", "--editable")
_ARCHIVE = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) with comments removed and backslash continuations joined, as pip reads them."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s+)#.*$", "", raw)
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            out.append((start, line))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def _relative_path(target: str) -> bool:
    """A local path the installer would resolve against its own working folder."""
    target = target.strip()
    if target.startswith("file:"):
        return not target.startswith("file://")
    if "://" in target or target.startswith(("/", "~")) or re.match(r"^[a-z][\w+.-]*\+[a-z]+:", target):
        return False
    return target.startswith(".") or "/" in target or "\\" in target or target.lower().endswith(_ARCHIVE)


def scan_requirements(
    path: Path, node_dir: Path, label: str, seen: set[Path] | None = None
) -> tuple[list[str], str | None]:
    """Read a node's requirements file (and the files it includes with ``-r``/``-c``, resolved
    against the including file, as the installers do): the installer options it sets (they apply to
    a whole installer run) and, when it names a relative path, why it is refused."""
    seen = seen if seen is not None else set()
    seen.add(path.resolve())
    rel = path.relative_to(node_dir) if path.is_relative_to(node_dir) else path
    options: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return options, f"{label}: cannot read {rel}: {err}"
    fix = (
        "the installer would resolve it against the folder it runs in, not the node's folder, so it is "
        "refused: install that package from the node's install.py (it runs in the node folder), or use a "
        "package name or URL"
    )
    for number, line in _logical_lines(text):
        where = f"{label}: {rel} line {number} ({line[:120]!r})"
        head, _, rest = line.partition(" ")
        name, eq, value = head.partition("=")
        if name in _NESTED or (head[:2] in ("-r", "-c") and len(head) > 2 and not head.startswith("--")):
            if name not in _NESTED:
                name, value = head[:2], head[2:]
            target = (value if eq or value else rest).strip()
            nested = (path.parent / target).resolve()
            if not nested.is_relative_to(node_dir.resolve()):
                return options, f"{where} includes a file outside the node folder; it is refused"
            if nested not in seen and nested.is_file():
                more, refused = scan_requirements(nested, node_dir, label, seen)
                options.extend(o for o in more if o not in options)
                if refused:
                    return options, refused
            continue
        if name in _EDITABLE:
            target = (value if eq else rest).strip()
            if _relative_path(target) or target in (".", ".."):
                return options, f"{where} is a relative path; {fix}"
            continue
        if line.startswith("-"):
            if name not in options:
                options.append(name)
            continue
        spec = re.split(r"\s+--|;", line, maxsplit=1)[0].strip()
        target = spec.split("@", 1)[1] if "@" in spec and "://" not in spec.split("@", 1)[0] else spec
        if _relative_path(target) or target.strip() in (".", ".."):
            return options, f"{where} is a relative path; {fix}"
    return options, None


def target_env(python: str | None) -> TargetEnv:
    """The environment packages go into. Symlinks are not resolved: a venv's python is a symlink
    to the base interpreter, and resolving it would lose the venv."""
    if not python:
        return TargetEnv(sys.executable, Path(sys.prefix))
    found = shutil.which(python) or python
    path = os.path.abspath(found)
    if path == os.path.abspath(sys.executable):
        return TargetEnv(sys.executable, Path(sys.prefix))
    venv = Path(path).parent.parent
    if (venv / "pyvenv.cfg").is_file():  # a venv's sys.prefix is the folder holding pyvenv.cfg
        return TargetEnv(path, venv)
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True, env=child_env()
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"cannot run the python {python!r} (env PYTHON): {err}; point PYTHON at ComfyUI's python"
        ) from None
    return TargetEnv(path, Path(out.stdout.strip()))


_DISTS_CODE = (
    "import importlib.metadata as m, json, os, platform, re, sys\n"
    "dists = {}\n"
    "for d in m.distributions():\n"
    "    name = d.metadata['Name']\n"
    "    if name:\n"
    "        dists.setdefault(re.sub(r'[-_.]+', '-', name).lower(), [name, d.version, d.requires or []])\n"
    "v = sys.implementation.version\n"
    "env = {'implementation_name': sys.implementation.name,\n"
    "       'implementation_version': f'{v.major}.{v.minor}.{v.micro}',\n"
    "       'os_name': os.name, 'platform_machine': platform.machine(),\n"
    "       'platform_release': platform.release(), 'platform_system': platform.system(),\n"
    "       'platform_version': platform.version(), 'python_full_version': platform.python_version(),\n"
    "       'platform_python_implementation': platform.python_implementation(),\n"
    "       'python_version': '.'.join(platform.python_version_tuple()[:2]), 'sys_platform': sys.platform}\n"
    "print(json.dumps({'dists': dists, 'env': env}))\n"
)

_VERSIONS_CODE = (
    "import importlib.metadata as m, json, sys\n"
    "out = {}\n"
    "for n in sys.argv[1:]:\n"
    "    try: out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))\n"
)


def _run_code(env: TargetEnv, code: str, *args: str) -> object:
    out = subprocess.run(
        [env.python, "-c", code, *args], capture_output=True, text=True, check=True, env=child_env(), timeout=120
    )
    return json.loads(out.stdout)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def protected_versions(env: TargetEnv) -> dict[str, str]:
    """The exact installed builds of torch, torchvision and torchaudio in ``env`` and of every package
    they pin (``==``/``===`` in their metadata, markers evaluated for ``env``), recursively: what no
    node may replace."""
    from packaging.requirements import InvalidRequirement, Requirement

    data = _run_code(env, _DISTS_CODE)
    dists, markers = data["dists"], {**data["env"], "extra": ""}
    out: dict[str, str] = {}
    queue = [p for p in PROTECTED if p in dists]
    while queue:
        name, version, requires = dists[queue.pop()]
        if name in out:
            continue
        out[name] = version
        for text in requires:
            try:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate(markers):
                    continue
            except (InvalidRequirement, ValueError, KeyError):
                continue
            exact = any(s.operator in ("==", "===") and "*" not in s.version for s in req.specifier)
            dep = _canonical(req.name)
            if exact and dep in dists and dists[dep][0] not in out:
                queue.append(dep)
    return out


def installed_versions(env: TargetEnv, names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` in ``env`` (missing ones left out)."""
    return _run_code(env, _VERSIONS_CODE, *names) if names else {}


def constraints_text(versions: dict[str, str]) -> str:
    """Exact builds (``===``): ``==2.7.0`` would let ``2.7.0+cpu`` in (PEP 440 ignores the local tag)."""
    return "".join(f"{name}==={version}\n" for name, version in sorted(versions.items()))


def find_uv(env: TargetEnv, mode: str = "auto") -> str | None:
    if mode == "pip":
        return None
    for candidate in (Path(env.python).parent / "uv", Path(sys.executable).parent / "uv"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("uv")
    if found is None and mode == "uv":
        raise RuntimeError("NODES_INSTALLER=uv but no uv executable was found (next to python or on PATH)")
    return found


def install_command(
    env: TargetEnv,
    uv: str | None,
    constraints: Path,
    files: list[Path],
    specs: list[str] = (),
    dry_run: bool = False,
    reinstall: list[str] = (),
) -> list[str]:
    """``reinstall``: names to install again even when the installed version seems to fit (a forced
    reinstall of exactly ``specs``, without their dependencies)."""
    args = [arg for f in files for arg in ("-r", str(f))] + list(specs) + (["--dry-run"] if dry_run else [])
    if reinstall:
        args += ["--no-deps"] + (
            [a for n in reinstall for a in ("--reinstall-package", n)] if uv else ["--force-reinstall"]
        )
    if uv:
        return [uv, "pip", "install", "--python", env.python, "-c", str(constraints), *args]
    return [
        env.python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-c",
        str(constraints),
        *args,
    ]


def _summary(output: str, lines: int = 6) -> str:
    kept = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith("Using Python")]
    return " / ".join(kept[-lines:]) or "(no output)"


def _conflict_message(node: NodeReqs, output: str, pinned: dict[str, str]) -> str:
    message = f"{node.label}: requirements.txt cannot be installed: {_summary(output)}"
    if any(name in output for name in pinned):
        pins = ", ".join(f"{k}=={v}" for k, v in sorted(pinned.items()))
        message += f" (the installed {pins} are pinned and never replaced; pin this node to a version that fits)"
    return message


def _run_pip(
    cmd: list[str],
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> tuple[bool, str]:
    start = time.monotonic()
    try:
        done = run_child(cmd, cwd=cwd, env=child_env(extra_env), timeout=PIP_TIMEOUT, stop=stop)
    except ChildTimeout:
        return False, f"the installer did not finish within {PIP_TIMEOUT} s"
    log.debug("%s finished in %.1f s with %s", cmd[0], time.monotonic() - start, done.returncode)
    return done.returncode == 0, done.output


def run_install_py(
    node: NodeReqs,
    env: TargetEnv,
    constraints: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> str | None:
    """Run the node's install.py (stdin closed, its own session); an error message, or None when it
    succeeded. Whatever it started is killed at the timeout, and when it exits."""
    env_vars = child_env({**(extra_env or {}), "PIP_CONSTRAINT": str(constraints), "UV_CONSTRAINT": str(constraints)})
    try:
        done = run_child(
            [env.python, "install.py"], cwd=node.path, env=env_vars, timeout=timeout, stop=stop, kill_leftovers=True
        )
    except ChildTimeout:
        return (
            f"{node.label}: install.py did not finish within {timeout:g} s and was stopped, with every process it "
            "started (INSTALL_PY_TIMEOUT)"
        )
    if done.leftovers:
        log.warning("%s: install.py left %d process(es) running; they were stopped", node.label, done.leftovers)
    if done.returncode != 0:
        return f"{node.label}: install.py failed with exit code {done.returncode}: {_summary(done.output)}"
    return None


@dataclass
class _Installer:
    """One installation run: the target, the installer, the constraints file and the pinned versions."""

    env: TargetEnv
    uv: str | None
    constraints: Path
    pinned: dict[str, str]
    extra_env: dict[str, str]
    stop: threading.Event | None = None
    restore_failed: bool = field(default=False, init=False)

    def pip(self, nodes: list[NodeReqs], cwd: Path | None = None, dry_run: bool = False) -> tuple[bool, str]:
        files = [n.requirements_file for n in nodes]
        cmd = install_command(self.env, self.uv, self.constraints, files, dry_run=dry_run)
        return _run_pip(cmd, cwd, self.extra_env, self.stop)

    def satisfied(self, node: NodeReqs) -> bool:
        """Whether the node's requirements are met as installed now (the installer's dry run would
        change nothing). A dry run that fails says nothing: counted as met."""
        ok, output = self.pip([node], node.path, dry_run=True)
        if not ok:
            log.debug("%s: dry run failed, requirements not checked: %s", node.label, _summary(output))
        return not ok or not re.search(r"^\s*Would (install|uninstall)", output, re.MULTILINE)

    def guard(self) -> str | None:
        """None when the pinned packages are exactly the pinned builds; else what changed, after a
        forced reinstall of the pinned builds (``restore_failed`` says whether that worked)."""
        now = installed_versions(self.env, list(self.pinned))
        changed = {k: v for k, v in self.pinned.items() if now.get(k) != v}
        if not changed:
            return None
        what = ", ".join(f"{k} {v} \u2192 {now.get(k) or 'removed'}" for k, v in sorted(changed.items()))
        pins = [f"{k}==={v}" for k, v in sorted(changed.items())]
        cmd = install_command(self.env, self.uv, self.constraints, [], specs=pins, reinstall=sorted(changed))
        ok, output = _run_pip(cmd, extra_env=self.extra_env, stop=self.stop)
        after = installed_versions(self.env, list(changed))
        if ok and all(after.get(k) == v for k, v in changed.items()):
            log.error("%s changed during a node install; restored %s", what, ", ".join(pins))
            return f"{what}; restored {', '.join(pins)}"
        self.restore_failed = True
        reason = _summary(output, 3) if not ok else "still " + ", ".join(f"{k} {after.get(k)}" for k in sorted(changed))
        log.error("%s changed during a node install; restoring %s failed: %s", what, ", ".join(pins), reason)
        return (
            f"{what}; restoring {', '.join(pins)} FAILED ({reason}): install them again by hand "
            f"({self.env.python} -m pip install --force-reinstall --no-deps {' '.join(pins)})"
        )


def install(
    nodes: list[NodeReqs],
    env: TargetEnv,
    installer_mode: str = "auto",
    install_py_timeout: float = 600,
    installed: list[NodeReqs] = (),
    package_cache: Path | None = None,
    stop: threading.Event | None = None,
) -> dict[str, str | None]:
    """Install the requirements of ``nodes`` into ``env``, then run their install.py; label -> error
    message (None = installed). ``installed``: nodes whose requirements are already installed; they
    join the resolver run, and get an error here when a conflicting node replaced their packages.
    ``stop`` (set on SIGTERM) ends the running installer or install.py at once: Interrupted."""
    results: dict[str, str | None] = {n.label: None for n in nodes}
    options: dict[str, list[str]] = {}
    for node in nodes:
        found, refused = node.scan()
        options[node.label] = found
        results[node.label] = refused
    context = []
    for node in installed:
        if node.requirements_file is not None:
            found, refused = node.scan()
            if not refused and not found:  # a node with installer options joins no other node's run
                context.append(node)
    results.update({n.label: None for n in context})
    pinned = pinned_builds(env)
    uv = find_uv(env, installer_mode)
    with tempfile.TemporaryDirectory(prefix="comfy-worker-constraints-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(pinned), encoding="utf-8")
        run = _Installer(env, uv, constraints, pinned, cache_env(package_cache), stop)
        if drift := run.guard():  # a restore that failed in an earlier run (or a change by hand)
            message = f"torch is not the build pinned for this environment: {drift}"
            if run.restore_failed:
                for node in nodes:
                    results[node.label] = results[node.label] or f"{node.label}: requirements not installed: {message}"
                return results
            log.warning("%s", message)
        with_reqs = [n for n in nodes if n.requirements_file is not None and results[n.label] is None]
        if with_reqs:
            log.info(
                "installing requirements of %d node(s) with %s (pinned: %s)",
                len(with_reqs),
                "uv" if uv else "pip",
                ", ".join(f"{k}=={v}" for k, v in sorted(pinned.items())) or "nothing installed to pin",
            )
            shared = [n for n in with_reqs if not options[n.label]]
            if shared:
                _install_requirements(run, shared, context, results)
            for node in with_reqs:
                if options[node.label]:
                    _install_alone(run, node, options[node.label], results)
        for node in nodes:
            if results[node.label] is None and node.install_py is not None:
                log.info("%s: running install.py", node.label)
                failed = run_install_py(node, env, constraints, install_py_timeout, run.extra_env, stop)
                if changed := run.guard():  # constraints bind only pip calls that read them
                    failed = "; ".join(filter(None, [f"{node.label}'s install.py changed {changed}", failed]))
                results[node.label] = failed
    return results


def pinned_builds(env: TargetEnv) -> dict[str, str]:
    """What the constraints pin: the builds recorded for ``env`` when it first got node requirements
    (a torch changed since is never adopted), plus what torch pins now that the record lacks."""
    recorded = read_pins(env)
    pinned = {**protected_versions(env), **recorded}
    if pinned != recorded:
        write_record(env, {}, pins=pinned)
    return pinned


def _install_alone(run: _Installer, node: NodeReqs, options: list[str], results: dict[str, str | None]) -> None:
    log.info(
        "%s: requirements.txt sets installer options (%s); installed in a run of its own, so they apply to no "
        "other node",
        node.label,
        ", ".join(options),
    )
    ok, output = run.pip([node], node.path)
    if not ok:
        results[node.label] = _conflict_message(node, output, run.pinned)
    elif changed := run.guard():
        results[node.label] = f"{node.label}'s requirements.txt changed {changed}"


def _install_requirements(
    run: _Installer, with_reqs: list[NodeReqs], context: list[NodeReqs], results: dict[str, str | None]
) -> None:
    together = with_reqs + context
    ok, output = run.pip(together)
    if ok and (changed := run.guard()):  # the constraints make this impossible; checked all the same
        ok, output = False, f"the installer changed {changed}"
    if ok:
        return
    if len(together) > 1:
        log.warning("installing all requirements together failed; trying node by node to find the culprit")
    for node in with_reqs:
        if len(together) > 1:
            ok, output = run.pip([node], node.path)
            if ok and (changed := run.guard()):
                results[node.label] = f"{node.label}'s requirements.txt changed {changed}"
                continue
        if not ok:
            results[node.label] = _conflict_message(node, output, run.pinned)
    for node in context:  # nodes installed before keep their packages: a conflicting newcomer loses
        if results[node.label] is None and not run.satisfied(node):
            ok, output = run.pip([node], node.path)
            if not ok:
                results[node.label] = _conflict_message(node, output, run.pinned)
            elif changed := run.guard():
                results[node.label] = f"{node.label}'s requirements.txt changed {changed}"
    # each alone worked but not all together: they conflict with each other, and the node installed
    # last won. Name every node whose requirements are not met now, and whom it conflicts with.
    alone_ok = [n for n in together if results[n.label] is None]
    if len(alone_ok) < 2:
        return
    broken = [n for n in alone_ok if not run.satisfied(n)]
    if broken:
        log.warning("the requirements of %s cannot all be installed together", ", ".join(n.label for n in alone_ok))
    for node in broken:
        partners, reason = [], ""
        for other in alone_ok:
            if other is not node:
                fits, out = run.pip([node, other], node.path, dry_run=True)
                if not fits:
                    partners.append(other.label)
                    reason = reason or _summary(out, 3)
        with_whom = ", ".join(partners) or "the other nodes' requirements"
        results[node.label] = (
            f"{node.label}: requirements.txt cannot be installed together with {with_whom}"
            f"{f' ({reason})' if reason else ''}; installed one after the other, this node's requirements are "
            "no longer met: pin versions that fit together, or keep only one of them"
        )


# ---- the record of what is installed, kept inside the target environment ----


def record_key(node_path: Path) -> str:
    return str(Path(node_path).absolute())


def read_record(env: TargetEnv) -> dict[str, str]:
    """node folder -> commit whose requirements are installed in ``env``."""
    try:
        data = json.loads(env.record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("nodes", {}) if isinstance(data, dict) else {}


def read_pins(env: TargetEnv) -> dict[str, str]:
    """The builds pinned for ``env`` (name -> version), recorded when it first got node requirements."""
    try:
        data = json.loads(env.record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    pins = data.get("pinned") if isinstance(data, dict) else None
    if not isinstance(pins, dict):
        return {}
    return {k: v for k, v in pins.items() if isinstance(k, str) and isinstance(v, str)}


def write_record(
    env: TargetEnv, done: dict[str, str], forget: list[str] = (), pins: dict[str, str] | None = None
) -> None:
    """Add ``done`` (folder -> commit) to the record, drop ``forget``, set ``pins`` when given; safe
    with concurrent writers."""
    path = env.record_path
    try:
        with FileLock(str(path) + ".lock", timeout=60):
            nodes = read_record(env)
            nodes.update(done)
            for key in forget:
                nodes.pop(key, None)
            data = {"python": env.python, "nodes": nodes, "pinned": read_pins(env) if pins is None else pins}
            atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as err:
        log.warning("cannot write %s (%s); node requirements will be installed again next time", path, err)
