"""A generated token kept in a 0600 file on the volume (Jupyter's and the API's when none is set).

Many workers may share the volume and start at once: the file is created exclusively (``O_EXCL``)
with its final mode, so exactly one token wins and every worker reads that one; a worker that finds
the file still empty (the creator between open and write) reads it again.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def stored_token(path: Path, nbytes: int = 32) -> tuple[str, bool]:
    """(the token in ``path``, created now). Creates the file (0600) with a new token when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            token = path.read_text(encoding="utf-8").strip()
            if token:
                return token, False
            time.sleep(0.02)  # another worker created it and is writing it now
            continue
        token = secrets.token_urlsafe(nbytes)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        return token, True
    raise OSError(f"{path} stays empty: delete it and start again")
