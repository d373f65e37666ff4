"""The OPAQUE server setup file (CRY-5): created once, owner-only, never silently regenerated."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from keymgmt_proto import ServerSetup

__all__ = ["SetupFileError", "create_server_setup_file", "load_server_setup_file"]

_MAGIC = b"KMSETUP1"


class SetupFileError(Exception):
    """The setup file is missing, unreadable, too open, corrupt, or already exists."""


def create_server_setup_file(path: str | os.PathLike[str]) -> ServerSetup:
    """Generate a new setup and write it to ``path`` (mode 0600). Refuses to overwrite."""
    path = Path(path)
    setup = ServerSetup.generate()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise SetupFileError(f"{path} already exists; refusing to overwrite the server setup") from None
    except OSError as exc:
        raise SetupFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.write(fd, _MAGIC + setup.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    return setup


def load_server_setup_file(path: str | os.PathLike[str]) -> ServerSetup:
    """Load the setup; SetupFileError (never a new setup) if anything is wrong."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SetupFileError(f"{path} does not exist; create it once with `keymgmt-server init`") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SetupFileError(f"{path} is readable by others; run `chmod 600 {path}`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SetupFileError(f"cannot read {path}: {exc.strerror}") from None
    if not data.startswith(_MAGIC):
        raise SetupFileError(f"{path} is not a keymgmt server setup file")
    try:
        return ServerSetup.from_bytes(data[len(_MAGIC) :])
    except ValueError:
        raise SetupFileError(f"{path} is corrupt") from None
