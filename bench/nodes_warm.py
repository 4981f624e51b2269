#!/usr/bin/env python3
"""Benchmark: 30 custom nodes installed at their versions, then re-run with nothing changed.

The warm run must do no git network access (the remotes are moved away before it, so any access
would fail the run) and take under 0.2 s. Printed side by side: the cold install, the warm run as
a whole process (interpreter start and imports included) and the warm run's own work in-process
(with a count of the processes it spawned: must be 0), and the ratios.

    .venv/bin/python bench/nodes_warm.py [--nodes 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.gitrepos import GitRepoFactory  # noqa: E402
from support.wheels import make_venv, make_wheel, wheel_env  # noqa: E402

VERSIONS = ["latest", "nightly", "v1.0.0", "dev", "sha"]
WARM_LIMIT = 0.2


def make_repos(root: Path, count: int) -> list[dict]:
    factory = GitRepoFactory(root / "git")
    nodes = []
    for i in range(count):
        files = {"__init__.py": f"NODE_CLASS_MAPPINGS = {{}}  # node {i}\n"}
        if i % 3 == 0:
            files["requirements.txt"] = "benchpkg\n"
        repo = factory.create(f"BenchNode{i:02d}", files)
        first = repo.tag("v1.0.0")
        repo.commit({"CHANGELOG.md": "1.1\n"})
        repo.tag("v1.1.0")
        repo.branch("dev")
        repo.commit({"NEXT.md": "next\n"})
        repo.push()
        version = VERSIONS[i % len(VERSIONS)]
        nodes.append({"url": repo.url, "version": first if version == "sha" else version})
    return nodes


def timed_process(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def warm_in_process(config: Path, repeat: int) -> tuple[float, int]:
    """Median time of the warm run's work (config load + node checks + lock), and the number of
    processes spawned during all the runs."""
    import install_nodes
    from comfy_worker.cli import load_or_report
    from comfy_worker.settings import Settings

    spawned = 0
    real_popen_init = subprocess.Popen.__init__

    def counting_init(self, *args, **kwargs):
        nonlocal spawned
        spawned += 1
        real_popen_init(self, *args, **kwargs)

    subprocess.Popen.__init__ = counting_init
    times = []
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            settings = Settings.from_env()
            cfg, _ = load_or_report(str(config), settings)
            ctx = install_nodes.Context(settings.custom_nodes_dir, settings.github_token)
            results = install_nodes.run(cfg, settings, ctx)
            install_nodes.write_lock(settings, results)
            times.append(time.perf_counter() - start)
            assert all(r.ok and r.action == install_nodes.KEEP for r in results), [r.error for r in results]
    finally:
        subprocess.Popen.__init__ = real_popen_init
    return statistics.median(times), spawned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nodes-warm-") as tmp:
        root = Path(tmp)
        print(f"creating {args.nodes} local node repos ...", flush=True)
        nodes = make_repos(root, args.nodes)
        wheels = root / "wheels"
        make_wheel(wheels, "torch", "1.0.0")
        make_wheel(wheels, "benchpkg", "1.0")
        python = make_venv(root / "venv", wheels, ["torch==1.0.0"])
        config = root / "config.yml"
        import yaml

        config.write_text(yaml.safe_dump({"nodes": nodes}))
        env = {
            **os.environ,
            **wheel_env(wheels),
            "VOLUME_ROOT": str(root / "volume"),
            "COMFYUI_PATH": str(root / "volume" / "ComfyUI"),
            "PYTHON": str(python),
        }
        env.pop("CONFIG_YML", None)
        cmd = [sys.executable, str(ROOT / "install_nodes.py"), "--config", str(config)]

        cold = timed_process([*cmd, "--parallel", "4"], env)
        shutil.move(root / "git" / "remotes", root / "remotes-unreachable")  # any git network access now fails
        warm_proc = statistics.median(timed_process(cmd, env) for _ in range(args.repeat))
        os.environ.update({k: v for k, v in env.items() if k not in os.environ or os.environ[k] != v})
        warm_work, spawned = warm_in_process(config, args.repeat)

    print(f"\n{args.nodes} nodes (versions: {', '.join(VERSIONS)}; every 3rd node has a requirements.txt)")
    print(f"{'run':<44}{'seconds':>10}{'cold / this':>14}")
    print(f"{'cold install (clone + requirements)':<44}{cold:>10.3f}{1:>14.1f}")
    print(f"{'warm, whole process (python start+imports)':<44}{warm_proc:>10.3f}{cold / warm_proc:>14.1f}")
    print(f"{'warm, the run itself (in-process)':<44}{warm_work:>10.4f}{cold / warm_work:>14.1f}")
    print(
        f"processes spawned by {args.repeat} in-process warm runs: {spawned} (git network access: none; remotes moved away)"
    )
    ok = warm_work < WARM_LIMIT and spawned == 0
    print(f"{'PASS' if ok else 'FAIL'}: warm run {warm_work * 1000:.1f} ms (limit {WARM_LIMIT * 1000:.0f} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
