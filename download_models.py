#!/usr/bin/env python3
"""Download the models listed in config.yml (SPEC §5).

Status: only --validate-only is implemented so far; downloading comes with its own issue.
"""

from __future__ import annotations

import argparse
import sys

from cli_common import EXIT_INVALID, add_common_args, load_or_report, validate_only
from settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download the models listed in config.yml.")
    add_common_args(parser)
    parser.add_argument("--models-dir", metavar="DIR", help="models folder (default $COMFYUI_PATH/models)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these entries (file name or url)")
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
    print("error: downloading is not implemented yet; use --validate-only", file=sys.stderr)
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
