"""Crash-safe file writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through `write(file)` to `<name>.tmp-<pid>` next to `path`, fsync, then rename it over `path`.

    A crash mid-write leaves the previous file (or none) under the final name, never a truncated one; the
    rename is atomic on POSIX filesystems. The temp file is removed if `write` fails.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
