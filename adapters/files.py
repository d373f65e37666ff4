"""Owner-only files: created 0600, refused if they already exist with wider permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["ensure_private_file"]


def ensure_private_file(path: Path, error: type[Exception]) -> None:
    """Create ``path`` with mode 0600 if missing; raise ``error`` if it exists and is open to
    others or owned by someone else."""
    if str(path) == ":memory:":
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(f"{path} is accessible to other users; run `chmod 600 {path}`") from None
        if info.st_uid != os.getuid():
            raise error(f"{path} belongs to another user") from None
        return
    except OSError as exc:
        raise error(f"cannot create {path}: {exc.strerror}") from None
    os.close(fd)
