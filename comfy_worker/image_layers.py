"""The size of every layer of a built image, as ``build.sh --sizes`` prints it (docs/image-reference.md).

Reads what ``docker history`` / ``podman history`` print with ``--no-trunc --human=false --format
'{{.Size}}\\t{{.CreatedBy}}'`` (newest layer first; sizes in bytes, or as the engine writes them for
people, "4.83GB" or "4.83 GB": podman's templates ignore ``--human``) on stdin and prints the layers oldest
first: the size and the Dockerfile step that made each one (a build's arguments and the shell that ran it
left out), then the steps that only set metadata (0 B) as one count, then the total. Standard library
only: build.sh runs it with the host's ``python3``.

    podman history --no-trunc --human=false --format '{{.Size}}\\t{{.CreatedBy}}' IMAGE \\
        | python3 -m comfy_worker.image_layers IMAGE
"""

from __future__ import annotations

import re
import sys

STEP_WIDTH = 100
# "/bin/sh -c #(nop) COPY ..." (an instruction) or "[|N ARG=... ]/bin/bash -o pipefail -c <command>" (a RUN)
SHELL = re.compile(r"(?:/bin/sh|/bin/bash)(?: -o pipefail)? -c (#\(nop\) )?")
# what a RUN's command starts with that says nothing about it: its --mount options, a sourced file (the build's CA settings)
NOISE = re.compile(r"^(?:--mount=\S+ )*(?:\. \S+ && )?")


def step(created_by: str) -> str:
    """The Dockerfile step behind a layer, on one line: ``RUN <command>`` or the instruction itself."""
    text = " ".join(created_by.split())
    text = text.removesuffix(" # buildkit")
    match = SHELL.search(text)
    if match is None:
        return text
    rest = text[match.end() :]
    if match.group(1):  # metadata or a COPY/ADD, as the engine wrote it
        return rest
    return "RUN " + NOISE.sub("", rest)


SIZE = re.compile(r"([0-9.]+)\s*([kKMGT]?B)?")
UNITS = {None: 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}  # the engines' decimal units


def size_bytes(text: str) -> int:
    """A layer size as the engine printed it: bytes ("933376") or for people ("933 kB", "4.83GB")."""
    match = SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"a layer size {text.strip()!r}")
    return round(float(match.group(1)) * UNITS[match.group(2)])


def human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def table(history: str) -> list[str]:
    """The lines printed for ``history`` (the engine's output, newest layer first)."""
    layers = []
    for line in history.splitlines():
        size, _, created_by = line.partition("\t")
        if size.strip():
            layers.append((size_bytes(size), step(created_by)))
    layers.reverse()
    lines = [f"{'SIZE':>10}  STEP (oldest first)"]
    for size, what in layers:
        if size:
            lines.append(f"{human(size):>10}  {what[:STEP_WIDTH]}{'…' if len(what) > STEP_WIDTH else ''}")
    empty = sum(1 for size, _ in layers if not size)
    if empty:
        lines.append(f"{'0 B':>10}  {empty} steps that only set metadata (ENV, ARG, EXPOSE, ...)")
    lines.append(f"{human(sum(size for size, _ in layers)):>10}  in all ({len(layers)} layers)")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    history = sys.stdin.read()
    if not history.strip():
        print(f"image_layers: no layers read for {' '.join(argv) or 'the image'}", file=sys.stderr)
        return 1
    try:
        lines = table(history)
    except ValueError as exc:
        print(f"image_layers: not the output of the engine's 'history' ({exc})", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
