#!/usr/bin/env python3
"""Install the custom nodes listed in config.yml (SPEC §6).

Status: only --validate-only is implemented so far; installing comes with its own issue.
"""

from __future__ import annotations

import argparse
import sys

from cli_common import EXIT_INVALID, add_common_args, load_or_report, validate_only
from settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Install the custom nodes listed in config.yml.")
    add_common_args(parser)
    parser.add_argument("--comfyui-dir", metavar="DIR", help="ComfyUI checkout (default $COMFYUI_PATH)")
    parser.add_argument("--update", action="store_true", help="refresh nodes that follow a branch or nightly")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    loaded = load_or_report(args.config, settings)
    if loaded is None:
        return EXIT_INVALID
    cfg, source = loaded
    if args.validate_only:
        return validate_only(cfg, source)
    print("error: installing is not implemented yet; use --validate-only", file=sys.stderr)
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
