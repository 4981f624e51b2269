#!/usr/bin/env python3
"""Benchmark: the start of a worker, side by side in one run, for a config of 50 models and 30 nodes.

- cold provisioning: ``start.sh --provision-only`` on an empty volume (ComfyUI cloned from the local
  upstream repo, 50 small models from a real nginx, 30 nodes from local bare repos, every 3rd with a
  requirements.txt);
- warm provisioning: the whole ``start.sh --provision-only`` process again (target < 0.5 s; the origin
  and the node remotes are taken away first, so any network or git access would fail it);
- a fresh container on the warm volume: a new Python environment (the node packages are gone and are
  reinstalled by uv with its cache on the volume, ``NODE_PACKAGE_CACHE``; the package "index" is a
  local find-links folder here, so the cache saves no download in this setup);
- warm time-to-first-job: ``start.sh`` in local mode until a job (``EmptyImage → SaveImage``) has
  completed through the local API, against ComfyUI's own boot time on the same machine
  (``python main.py --cpu`` until it answers; target ≤ 1.1×).

The Python environment of the "container" is a fresh venv that sees the project's packages (torch,
ComfyUI's requirements) through a ``.pth`` file, as an image that bakes them in: ComfyUI's
requirements record is written into it, so only the node packages are installed into it.

    .venv/bin/python bench/warm_start.py [--models 50] [--nodes 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import yaml  # noqa: E402
from support.comfy_process import free_port, require_upstream  # noqa: E402
from support.gitrepos import GitRepoFactory  # noqa: E402
from support.hermetic import isolate_installers  # noqa: E402
from support.origins import NginxOrigin, random_file  # noqa: E402
from support.tool_shims import container_python  # noqa: E402
from support.wheels import make_wheel, wheel_env  # noqa: E402

from comfy_worker.state_files import NODE_REQUIREMENTS_RECORD  # noqa: E402

WARM_LIMIT_S = 0.5
TTFJ_LIMIT = 1.1
JOB = {"input": {"workflow": {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
}}}  # fmt: skip


def make_nodes(root: Path, count: int) -> list[dict]:
    factory = GitRepoFactory(root / "git")
    nodes = []
    for i in range(count):
        files = {"__init__.py": f"NODE_CLASS_MAPPINGS = {{}}  # bench node {i}\n"}
        if i % 3 == 0:
            files["requirements.txt"] = "benchpkg\n"
        repo = factory.create(f"BenchNode{i:02d}", files)
        repo.tag("v1.0.0")
        repo.push()
        nodes.append({"url": repo.url, "version": "v1.0.0"})
    return nodes


def run(cmd: list[str], env: dict[str, str], what: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return took, proc


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def comfyui_boot(python: Path, comfyui: Path, log: Path) -> float:
    """``python main.py --cpu`` from start until /system_stats answers."""
    port = free_port()
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not answers(f"http://127.0.0.1:{port}/system_stats"):
            if proc.poll() is not None or time.perf_counter() - started > 300:
                sys.exit(f"ComfyUI did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        stop(proc)


def time_to_first_job(env: dict[str, str], log: Path) -> float:
    """``start.sh`` (local mode) from start until one job has completed through the local API."""
    port = free_port()
    env = {**env, "MODE": "local", "API_PORT": str(port), "COMFY_PORT": str(free_port()), "ENABLE_JUPYTER": "0"}
    body = json.dumps(JOB).encode()
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "start.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            if proc.poll() is not None or time.perf_counter() - started > 300:
                sys.exit(f"start.sh did not serve a job:\n{log.read_text()[-3000:]}")
            req = urllib.request.Request(f"http://127.0.0.1:{port}/runsync", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.load(r)
            except OSError:
                time.sleep(0.05)
                continue
            if answer.get("status") != "COMPLETED":
                sys.exit(f"the job did not complete: {answer}\n{log.read_text()[-3000:]}")
            return time.perf_counter() - started
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    isolate_installers(os.environ)
    upstream = require_upstream()
    requirements = subprocess.run(
        ["git", "-C", str(upstream), "show", "v0.3.75:requirements.txt"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        root = Path(tmp)
        print(f"setting up {args.models} models on nginx and {args.nodes} node repos ...", flush=True)
        www = root / "www"
        models = []
        for i in range(args.models):
            sha = random_file(www / f"model-{i:02d}.safetensors", 4096 + i, seed=i)
            models.append(
                {"url": f"MODELS/model-{i:02d}.safetensors", "destination": ["checkpoints", "loras"][i % 2]}
                | ({"sha256": sha} if i % 2 else {})
            )
        nodes = make_nodes(root, args.nodes)
        wheels = root / "wheels"
        make_wheel(wheels, "benchpkg", "1.0")
        python = container_python(root / "venv", requirements)
        volume = root / "volume"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "HF_", "CONFIG_YML", "MODE"))}
        env.update(wheel_env(wheels))
        env.update(
            PATH=f"{python.parent}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
            PYTHON=str(python),
            VOLUME_ROOT=str(volume),
            COMFYUI_REPO=str(upstream),
            COMFY_PID_FILE=str(root / "comfyui.pid"),
            COMFY_LOG_FILE=str(root / "comfyui.log"),
            DOWNLOAD_RETRIES="1",
        )
        provision = ["bash", str(ROOT / "start.sh"), "--provision-only"]

        with NginxOrigin(www, root / "nginx") as origin:
            for m in models:
                m["url"] = m["url"].replace("MODELS", origin.url)
            volume.mkdir()
            (volume / "config.yml").write_text(yaml.safe_dump({"models": models, "nodes": nodes}))
            print("cold provisioning ...", flush=True)
            cold, cold_out = run(provision, env, "cold provisioning")
        # nothing is reachable any more: a warm start must not need it
        shutil.move(root / "git" / "remotes", root / "remotes-unreachable")
        warm_runs = []
        for _ in range(max(5, args.repeat)):
            took, warm_out = run(provision, env, "warm provisioning")
            warm_runs.append(took)
        warm = statistics.median(warm_runs)
        if "gate matches" not in warm_out.stderr:
            sys.exit(f"the warm run did not take the warm path:\n{warm_out.stderr[-3000:]}")

        print("fresh container on the warm volume (new Python environment) ...", flush=True)
        fresh_python = container_python(root / "venv2", requirements)
        fresh_env = {
            **env,
            "PYTHON": str(fresh_python),
            "PATH": env["PATH"].replace(str(python.parent), str(fresh_python.parent)),
        }
        cache = volume / ".cache" / "node-packages"
        cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
        fresh, fresh_out = run(provision, fresh_env, "fresh container")
        reinstalled = len(
            json.loads((fresh_python.parent.parent / NODE_REQUIREMENTS_RECORD).read_text()).get("nodes", {})
        )
        has_pkg = subprocess.run([str(fresh_python), "-c", "import importlib.metadata as m; print(m.version('benchpkg'))"],
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
        after_fresh, _ = run(provision, fresh_env, "warm provisioning after the fresh container")

        print("ComfyUI boot vs warm time-to-first-job ...", flush=True)
        boots, firsts = [], []
        for i in range(args.repeat):  # interleaved, so both see the same machine state
            boots.append(comfyui_boot(fresh_python, volume / "ComfyUI", root / f"boot-{i}.log"))
            firsts.append(time_to_first_job(fresh_env, root / f"start-{i}.log"))
        boot, first = statistics.median(boots), statistics.median(firsts)
        start_log = (root / f"start-{args.repeat - 1}.log").read_text()

    summary = [line for line in cold_out.stdout.splitlines() if line.startswith("summary:")]
    print(f"\n{args.models} models (4 KiB, nginx), {args.nodes} nodes (local bare repos, every 3rd with a requirement)")
    print(f"cold {summary[-1] if summary else ''}")
    print(f"\n{'run':<62}{'seconds':>9}{'ratio':>16}")
    print(f"{'cold provisioning (start.sh --provision-only)':<62}{cold:>9.3f}{'1.0':>16}")
    print(f"{'warm provisioning (start.sh --provision-only, median of ' + str(len(warm_runs)) + ')':<62}{warm:>9.3f}"
          f"{f'cold/warm {cold / warm:.0f}×':>16}")  # fmt: skip
    print(f"{'fresh container on the warm volume (node packages reinstalled)':<62}{fresh:>9.3f}"
          f"{f'cold/this {cold / fresh:.1f}×':>16}")  # fmt: skip
    print(f"{'  then warm again in that container':<62}{after_fresh:>9.3f}")
    print(f"{'ComfyUI boot (python main.py --cpu until it answers), median':<62}{boot:>9.3f}{'1.0':>16}")
    print(f"{'warm time-to-first-job (start.sh local until a job completed)':<62}{first:>9.3f}"
          f"{f'this/boot {first / boot:.2f}×':>16}")  # fmt: skip
    print(f"\nwarm runs: {', '.join(f'{t:.3f}' for t in warm_runs)} s")
    print(f"fresh container: {reinstalled} node(s) with requirements reinstalled from the wheel cache; "
          f"benchpkg {has_pkg or 'MISSING'} in the new environment; the volume's package cache "
          f"({cache.relative_to(volume)}) held {cached} bytes")  # fmt: skip
    print(f"boots: {', '.join(f'{t:.2f}' for t in boots)} s; first jobs: {', '.join(f'{t:.2f}' for t in firsts)} s")
    phases = [ln.split("[start] ", 1)[-1] for ln in start_log.splitlines() if "[start]" in ln]
    print("last start.sh's own lines:\n  " + "\n  ".join(phases[-12:]))
    ok = warm < WARM_LIMIT_S and first / boot <= TTFJ_LIMIT and has_pkg
    print(
        f"{'PASS' if ok else 'FAIL'}: warm {warm:.3f} s (limit {WARM_LIMIT_S} s); "
        f"time-to-first-job {first / boot:.2f}× boot (limit {TTFJ_LIMIT}×)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
