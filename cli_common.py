"""Pieces shared by download_models.py and install_nodes.py: where the config comes from,
``--validate-only``, exit codes, the summary table and the comfy.lock.yml sections."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml
from filelock import FileLock

from config_schema import ConfigError, WorkerConfig, load_config, load_config_env
from settings import Settings

log = logging.getLogger("comfy-worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: env CONFIG_YML, else $VOLUME_ROOT/config.yml, else $APP_DIR/config.yml)",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    parser.add_argument("--validate-only", action="store_true", help="only check the config and exit")
    parser.add_argument("--parallel", type=int, default=4, metavar="N", help="entries worked on at once (default 4)")
    parser.add_argument("--force", action="store_true", help="redo entries even when they look complete")


def load_selected_config(config_path: str | None, settings: Settings) -> tuple[WorkerConfig, str]:
    """The config by SPEC §4.1 precedence, with the name of its source. Raises ConfigError."""
    if config_path:
        return load_config(config_path), config_path
    if settings.config_yml:
        return load_config_env(settings.config_yml), "CONFIG_YML"
    for candidate in (settings.volume_root / "config.yml", settings.app_dir / "config.yml"):
        if candidate.is_file():
            return load_config(candidate), str(candidate)
    raise ConfigError(
        [f"no config found: pass --config, set CONFIG_YML, or create {settings.volume_root / 'config.yml'}"]
    )


def load_or_report(config_path: str | None, settings: Settings) -> tuple[WorkerConfig, str] | None:
    """Load the config; on error print one line per problem to stderr and return None."""
    try:
        return load_selected_config(config_path, settings)
    except ConfigError as err:
        print(f"error: {err.source} is invalid ({len(err.problems)} problem(s)):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def settings_and_config(args: argparse.Namespace) -> tuple[Settings, WorkerConfig] | int:
    """The settings and the selected config, or the exit code when the run ends here (a malformed
    env var or an invalid config: 2, one line each; ``--validate-only``: 0 after the summary line)."""
    try:
        settings = Settings.from_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    loaded = load_or_report(args.config, settings)
    if loaded is None:
        return EXIT_INVALID
    cfg, source = loaded
    if args.validate_only:
        return validate_only(cfg, source)
    return settings, cfg


def validate_only(cfg: WorkerConfig, source: str) -> int:
    print(f"ok: {source} is valid ({len(cfg.models)} model(s), {len(cfg.nodes)} node(s), ComfyUI {cfg.comfyui_ref()})")
    return EXIT_OK


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are meant to be read by others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_lock_file(path: Path, section: str, value: object) -> None:
    """Replace one section (``comfyui``, ``models`` or ``nodes``) of comfy.lock.yml, keeping the
    others; safe when several processes update it at once. ``value`` may be a function of the
    section's current value (read under the same lock), for merging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = read_lock_file(path)
        data[section] = value(data.get(section)) if callable(value) else value
        header = "# comfy.lock.yml: what this volume holds, exactly. Usable as a config.yml to reproduce it.\n"
        atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def read_lock_file(path: Path) -> dict:
    """comfy.lock.yml as a dict; a damaged file counts as empty (it is a record, rewritten by the
    next successful run), with a warning."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("ignoring unreadable %s (%s); it will be rewritten", path, type(err).__name__)
        return {}
    if data is not None and not isinstance(data, dict):
        log.warning("ignoring %s: not a mapping; it will be rewritten", path)
        return {}
    return data or {}
