"""The shape both provisioning CLIs share (download_models.py, install_nodes.py): the common flags,
where the config comes from (``--config`` → ``CONFIG_YML`` → ``$VOLUME_ROOT/config.yml`` →
``$APP_DIR/config.yml``), ``--validate-only``, exit codes, the status words and summary table, and the
parallel runner that honours SIGTERM. Only the two scripts import this module."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from comfy_worker.config_schema import ConfigError, WorkerConfig, load_config, load_config_env
from comfy_worker.exit_codes import EXIT_INVALID, EXIT_OK
from comfy_worker.settings import Settings
from comfy_worker.volume_lock import Interrupted

T = TypeVar("T")


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
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as one JSON list on stdout instead of the table (apply_config.sh --dry-run reads it)",
    )


def load_selected_config(config_path: str | None, settings: Settings) -> tuple[WorkerConfig, str]:
    """The config by precedence (docs/architecture.md), with the name of its source. Raises ConfigError."""
    if config_path:
        return load_config(config_path), config_path
    if settings.config_yml is not None:  # set, even empty: never fall back to another config
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
        print(f"error: {err.source} is invalid ({err.total} problem(s)):", file=sys.stderr)
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


# The last column of both summaries: one word for how an entry ended.
STATUS_OK = "ok"
STATUS_FAILED = "FAILED"
STATUS_FAILED_OPTIONAL = "failed (optional)"


def status_word(ok: bool, optional: bool) -> str:
    if ok:
        return STATUS_OK
    return STATUS_FAILED_OPTIONAL if optional else STATUS_FAILED


def run_parallel(work: Callable[[T], T], items: Sequence[T], parallel: int, stop: threading.Event) -> list[T]:
    """``work(item)`` for every item on up to ``parallel`` threads, in order. SIGTERM and Ctrl-C set
    ``stop`` (which ``work`` must honour: it ends downloads, waits and child processes), let the
    running items wind down, skip those not started and raise ``Interrupted``. A second signal while
    they wind down changes nothing (a container stop may send two: one from tini, one from a parent)."""

    def on_signal(signum, frame):
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, on_signal) for s in signals} if main_thread else {}
    pool = ThreadPoolExecutor(max(1, min(parallel, len(items) or 1)), thread_name_prefix="entry")
    try:
        futures = [pool.submit(work, item) for item in items]
        while not stop.is_set() and wait(futures, timeout=0.05).not_done:
            pass  # wait() returns as soon as the last one is done: a run ends when its work does
        if stop.is_set():
            pool.shutdown(wait=True, cancel_futures=True)
            raise Interrupted("stopped by a signal")
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
