"""requirements-check.txt: with only its packages (and what they need), the three checks run on a laptop
without torch, ComfyUI or the rest of requirements.txt (issue 21 #5)."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from support.comfy_process import ROOT
from support.wheels import UV

CHECKS = [
    ["download_models.py", "--validate-only", "--config", "config.yml"],
    ["install_nodes.py", "--validate-only", "--config", "config.yml"],
    # --offline: node packs and model URLs from the (empty) cache, never the network (issue 22)
    ["check_workflow.py", "examples/workflow_upscale.json", "--config", "config.yml", "--offline"],
    [
        "check_workflow.py",
        "tests/data/workflow_ui_custom_nodes.json",
        "--config",
        "config.yml",
        "--suggest",
        "--offline",
    ],
]


def listed(path: Path) -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, transitively (markers judged for this interpreter, no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def site_with_only(names: set[str], site: Path) -> Path:
    """A folder holding links to just these distributions' files from the test environment."""
    site.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and top not in ("..", "bin"):
                (site / top).symlink_to(source)
    return site


def test_requirements_check_pins_what_requirements_txt_pins():
    runtime = {r.name.lower(): r.specifier for r in listed(ROOT / "requirements.txt")}
    for req in listed(ROOT / "requirements-check.txt"):
        assert str(req.specifier).startswith("=="), req
        if req.name.lower() in runtime:
            assert req.specifier == runtime[req.name.lower()], req
    assert not {"torch", "runpod", "boto3", "aiohttp"} & {
        r.name.lower() for r in listed(ROOT / "requirements-check.txt")
    }


def test_the_three_checks_run_with_only_requirements_check_txt(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)], check=True, capture_output=True)
    names = closure([r.name for r in listed(ROOT / "requirements-check.txt")])
    assert "torch" not in names and "runpod" not in names
    site = site_with_only(names, tmp_path / "site")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    bare = subprocess.run([str(venv / "bin" / "python"), "-c", "import aiohttp"], env=env, capture_output=True)
    assert bare.returncode != 0  # really without the rest of requirements.txt
    for args in CHECKS:
        done = subprocess.run(
            [str(venv / "bin" / "python"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert "ModuleNotFoundError" not in done.stderr, (args, done.stderr)
        assert done.returncode in (0, 1), (args, done.stdout, done.stderr)  # 1: the workflow needs more
        assert done.stdout.strip(), args
