"""What ``deploy.sh`` checks in the config it ships before anything is built (docs/image-reference.md).

``python -m comfy_worker.deploy_check --config FILE``:

1. the config is validated exactly as ``download_models.py --validate-only`` does (same loader, same
   messages); an invalid one exits 2 and deploy.sh prints nothing to paste;
2. every source a RunPod worker can never reach is warned about by entry: a model or node URL whose
   host is ``localhost``, a loopback, private, link-local or otherwise non-public address written as
   an IP, a ``*.local``/``*.localhost``/``*.internal`` name, and nodes given as ``file://`` or a
   local path (those exist only on this machine). Names are not resolved: what this machine's DNS
   says is not what a RunPod host sees. Warnings do not stop the deploy (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

from comfy_worker import public_address
from comfy_worker.cli import settings_and_config, validate_only
from comfy_worker.config_schema import WorkerConfig, _display_url

log = logging.getLogger(__spec__.name if __name__ == "__main__" else __name__)

LOCAL_SUFFIXES = (".local", ".localhost", ".internal", ".lan", ".home.arpa")


def host_problem(host: str | None) -> str | None:
    """Why a worker on RunPod cannot reach ``host``, or None when it may (as written: no DNS lookup)."""
    if not host:
        return None
    name = host.lower().rstrip(".")
    if name.endswith(LOCAL_SUFFIXES) and not name.endswith(".localhost"):
        return f"{host} is a name of this machine's local network"
    problem = public_address.literal_problem(name)
    if problem == "loopback":
        return f"{host} is a loopback address (the worker itself, not this machine)"
    if problem:
        return f"{host} is a {problem} address, not reachable from RunPod"
    return None


def source_problem(url: str, git: bool) -> str | None:
    parts = urlsplit(url)
    if git and parts.scheme == "file":
        return "a file:// repository exists only on this machine"
    if git and not parts.scheme and "@" not in url.split("/", 1)[0] and ":" not in url.split("/", 1)[0]:
        return "a local path exists only on this machine"
    if git and not parts.scheme:  # scp-like git@host:org/repo
        return host_problem(url.split("@", 1)[-1].split(":", 1)[0])
    return host_problem(parts.hostname)


def unreachable_sources(cfg: WorkerConfig) -> list[str]:
    """One warning per model or node whose source a RunPod worker cannot reach."""
    warnings = []
    for kind, entries, git in (("models", cfg.models, False), ("nodes", cfg.nodes, True)):
        for i, entry in enumerate(entries):
            problem = source_problem(entry.url, git)
            if problem:
                warnings.append(
                    f"{kind}[{i}] ({_display_url(entry.url)}): {problem}; a RunPod worker cannot fetch it: "
                    "host it where the worker can reach it (Hugging Face, CivitAI, a public URL or git host)"
                )
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_worker.deploy_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, metavar="PATH", help="the config.yml deploy.sh ships")
    args = parser.parse_args(argv)
    args.validate_only = False  # the same loading and messages as --validate-only, then the warnings
    loaded = settings_and_config(args)
    if isinstance(loaded, int):
        return loaded
    _, cfg = loaded
    rc = validate_only(cfg, args.config)
    for warning in unreachable_sources(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
