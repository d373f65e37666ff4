"""Owner-only files (created 0600, refused if they exist with wider permissions) and the
shared set-up of the project's SQLite files."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

__all__ = ["BUSY_TIMEOUT_MS", "enable_wal", "ensure_private_file"]


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


BUSY_TIMEOUT_MS = 5000
"""How long a SQLite connection waits for another one's write lock."""


def enable_wal(db: sqlite3.Connection, path: Path, error: type[Exception]) -> None:
    """Put the SQLite file behind ``db`` in WAL mode (``":memory:"`` stays in memory).

    SQLite answers "database is locked" at once, without waiting on busy_timeout, when
    another connection holds the file during the switch (several processes opening a new
    file together), so this retries for up to BUSY_TIMEOUT_MS.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
            continue
        if mode not in ("wal", "memory"):
            raise error(f"{path}: SQLite refused WAL mode (journal_mode={mode})")
        return
