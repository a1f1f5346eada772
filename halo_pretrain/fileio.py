"""Files that are either whole or absent, and their SHA-256: one implementation for data prep,
training and checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["write_atomic", "fsync_dir", "fsync_file", "sha256_file"]

_READ_BLOCK = 1 << 22


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where the filesystem refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file, fsync and a rename: a crash leaves the old
    file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in blocks (memory stays flat whatever its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
