#!/usr/bin/env python3
"""Benchmark download_models.py against curl, side by side in one run, from a real nginx on loopback.

(a) 512 MiB behind ``limit_rate 20m`` per connection (how CDNs cap one connection): download_models.py
    (several ranged connections) vs curl (one connection). Target: ours at least 6x faster.
(b) 2 GiB, no cap: download_models.py including its sha256 verification vs curl alone.
    Target: ours at most 1.25x curl's time.

Both sides write to the same disk; each timing is the full command (process start to exit), and the
page cache is flushed (sync, then a pause) between runs; (b) runs several times, alternating who goes first, and
compares the best run of each (the machine is shared, so single runs are noisy). Files live in a temp
dir that is removed afterwards.

    python bench/download.py [--small]   (--small: 64 MiB / 256 MiB, for a quick check)
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.origins import NginxOrigin, random_file  # noqa: E402

MiB = 1 << 20


def settle() -> None:
    """Let the previous run's writes and deletes finish (page cache flushed, ext4's deferred work on
    freed blocks done) so no run pays for the one before it."""
    os.sync()
    time.sleep(2)
    os.sync()


def timed(cmd: list[str], env: dict | None = None) -> float:
    settle()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def ours(url: str, sha: str, work: Path, name: str) -> float:
    """download_models.py end to end (config with sha256, so it verifies); returns seconds."""
    config = work / f"{name}.yml"
    config.write_text(f"models:\n  - url: {url}\n    destination: bench\n    sha256: {sha}\n")
    volume = work / "volume"
    env = dict(os.environ, VOLUME_ROOT=str(volume), COMFYUI_PATH=str(volume / "ComfyUI"))
    env.pop("CONFIG_YML", None)
    seconds = timed([sys.executable, str(ROOT / "download_models.py"), "--config", str(config), "--force"], env)
    target = volume / "ComfyUI" / "models" / "bench" / url.rsplit("/", 1)[-1]
    assert target.stat().st_size > 0
    shutil.rmtree(volume)
    return seconds


def curl(url: str, work: Path) -> float:
    out = work / "curl.out"
    seconds = timed(["curl", "-sS", "--fail", "-o", str(out), url])
    out.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small files for a quick check")
    parser.add_argument("--repeat", type=int, default=4, help="runs per side for (b); the best counts")
    args = parser.parse_args()
    size_a = (64 if args.small else 512) * MiB
    size_b = (256 if args.small else 2048) * MiB
    if not shutil.which("curl") or not shutil.which("nginx"):
        print("needs curl and nginx (scripts/setup_env.sh installs nginx-light)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    need = 2 * (size_a + size_b) + 256 * MiB
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"not enough disk in {work}: need {need / 2**30:.1f} GiB, have {free / 2**30:.1f} GiB", file=sys.stderr)
        shutil.rmtree(work)
        return 2
    try:
        www = work / "www"
        print(f"creating {size_a // MiB} MiB and {size_b // MiB} MiB of random data in {work} ...", flush=True)
        sha_a = random_file(www / "capped.bin", size_a, seed=1)
        sha_b = random_file(www / "big.bin", size_b, seed=2)
        with NginxOrigin(www, work / "nginx", limit_rate="20m") as ng:
            url_a = f"{ng.url}/limited/capped.bin"
            url_b = f"{ng.url}/big.bin"
            print(f"(a) {size_a // MiB} MiB, limit_rate 20m per connection", flush=True)
            curl_a = curl(url_a, work)
            ours_a = ours(url_a, sha_a, work, "a")
            print(f"    curl {curl_a:6.2f} s   download_models.py {ours_a:6.2f} s", flush=True)
            print(f"(b) {size_b // MiB} MiB, no cap (ours verifies sha256, curl does not)", flush=True)
            curl_b, ours_b = [], []
            for i in range(max(1, args.repeat)):  # alternate who goes first; the best run of each counts
                if i % 2:
                    ours_b.append(ours(url_b, sha_b, work, "b"))
                    curl_b.append(curl(url_b, work))
                else:
                    curl_b.append(curl(url_b, work))
                    ours_b.append(ours(url_b, sha_b, work, "b"))
            print(
                f"    curl {' '.join(f'{t:.2f}' for t in curl_b)} s   "
                f"download_models.py {' '.join(f'{t:.2f}' for t in ours_b)} s",
                flush=True,
            )
        speedup = curl_a / ours_a
        ratio = min(ours_b) / min(curl_b)
        median = statistics.median(ours_b) / statistics.median(curl_b)
        print()
        print(f"(a) capped 20m/connection: ours is {speedup:.1f}x faster than curl (target >= 6x)")
        print(
            f"(b) uncapped incl. sha256: ours takes {ratio:.2f}x curl's time, best runs "
            f"(target <= 1.25x); medians: {median:.2f}x"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
