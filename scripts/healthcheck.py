"""The image's HEALTHCHECK (Dockerfile): ComfyUI answers, and in pod/local mode the local API too.

Exit 0 healthy, 1 not. Ports and the mode come from comfy_worker.settings, as for start.sh.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_worker.settings import Settings  # noqa: E402


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    settings = Settings.from_env()
    checks = [f"http://{settings.comfy_host}/system_stats"]
    if settings.mode in ("pod", "local"):
        checks.append(f"http://127.0.0.1:{settings.api_port}/ping")
    failed = [url for url in checks if not answers(url)]
    for url in failed:
        print(f"unhealthy: no answer from {url}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
