"""Tiny wheels and throwaway virtualenvs for tests of requirement installs (no registry needed).

``make_wheel`` writes a valid pure-python wheel by hand (the format is a zip with METADATA, WHEEL
and RECORD); ``make_venv`` creates a small venv with uv in a fraction of a second. Tests point uv
and pip at the wheel folder with ``wheel_env`` (UV_/PIP_ NO_INDEX + FIND_LINKS), so the real
installers run offline and the project's .venv (with the real torch) is never touched.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

UV = Path(sys.executable).parent / "uv"


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, name: str, version: str, requires: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    dist_info = f"{norm}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires or []
    )
    files = {
        f"{norm}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: comfy-worker-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_digest(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def wheel_env(folder: Path) -> dict[str, str]:
    """Env vars that make uv and pip install only from ``folder``."""
    return {
        "UV_NO_INDEX": "1",
        "UV_FIND_LINKS": str(folder),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(folder),
        "UV_NO_PROGRESS": "1",
    }


_VENV_TEMPLATES: dict[tuple, Path] = {}


def make_venv(path: Path, wheels: Path, packages: list[str] = (), pip: bool = False) -> Path:
    """A venv at ``path`` (its python returned) with ``packages`` installed from ``wheels``.
    ``pip=True`` uses the stdlib venv module (slower) so the venv has pip for the pip fallback.

    The first venv of a kind (same packages, same wheels' names and metadata, same ``pip``) is made in
    a template folder of this test process; each call gets a copy of it, its own from then on."""
    key = (tuple(packages), pip, _wheel_metadata(wheels) if packages else ())
    template = _VENV_TEMPLATES.get(key)
    if template is None or not (template / "bin" / "python").exists():
        template = Path(tempfile.mkdtemp(prefix="venv-template-")) / "venv"
        atexit.register(shutil.rmtree, template.parent, True)
        _create_venv(template, wheels, packages, pip)
        _VENV_TEMPLATES[key] = template
    shutil.copytree(template, path, symlinks=True)
    for script in (path / "bin").iterdir():  # activate scripts, pip's launchers: they name the venv's path
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if str(template).encode() in data:
                script.write_bytes(data.replace(str(template).encode(), str(path).encode()))
    return path / "bin" / "python"


def _wheel_metadata(wheels: Path) -> tuple:
    found = []
    for wheel in sorted(Path(wheels).glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            found.append((wheel.name, *(z.read(n) for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    return tuple(found)


def _create_venv(path: Path, wheels: Path, packages: list[str], pip: bool) -> Path:
    if pip:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    else:
        subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    if packages:
        install_offline(python, wheels, packages)
    return python


def install_offline(python: Path, wheels: Path, packages: list[str], env: dict[str, str] | None = None) -> None:
    """``uv pip install`` of ``packages`` into ``python``'s environment, only from ``wheels``."""
    cmd = [str(UV), "pip", "install", "-q", "--python", str(python), "--no-index", "--find-links", str(wheels)]
    subprocess.run([*cmd, *packages], check=True, capture_output=True, env=env)


def installed_version(python: Path, name: str) -> str | None:
    code = "import importlib.metadata as m, sys\ntry: print(m.version(sys.argv[1]))\nexcept m.PackageNotFoundError: print('')"
    out = subprocess.run([str(python), "-c", code, name], check=True, capture_output=True, text=True).stdout.strip()
    return out or None


def installer_of(python: Path, name: str) -> str | None:
    """The tool that installed ``name`` (the dist-info INSTALLER file: "uv" or "pip")."""
    code = (
        "import importlib.metadata as m, sys\nprint((m.distribution(sys.argv[1]).read_text('INSTALLER') or '').strip())"
    )
    out = subprocess.run([str(python), "-c", code, name], check=True, capture_output=True, text=True).stdout.strip()
    return out or None
