"""The OPAQUE server setup file (CRY-5): created once, owner-only, never silently regenerated.

Layout: ``MAGIC (8) || length (u32 BE) || setup || SHA3-256(everything before)``.
The checksum catches a flipped bit or a truncated or extended file, which the
OPAQUE library would otherwise accept as a different (wrong) server identity.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from pathlib import Path

from keymgmt_proto import ServerSetup

__all__ = ["SetupFileError", "create_server_setup_file", "load_server_setup_file"]

_MAGIC = b"KMSETUP1"
_DIGEST = 32


class SetupFileError(Exception):
    """The setup file is missing, unreadable, too open, corrupt, or already exists."""


def _encode(setup: ServerSetup) -> bytes:
    raw = setup.to_bytes()
    body = _MAGIC + struct.pack(">I", len(raw)) + raw
    return body + hashlib.sha3_256(body).digest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_server_setup_file(path: str | os.PathLike[str]) -> ServerSetup:
    """Generate a new setup and write it to ``path`` (mode 0600). Refuses to overwrite.

    The file appears whole or not at all: it is written and synced under a temporary
    name, then linked into place (which fails if ``path`` exists)."""
    path = Path(path)
    if path.exists():
        raise SetupFileError(f"{path} already exists; refusing to overwrite the server setup")
    setup = ServerSetup.generate()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise SetupFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        try:
            _write_all(fd, _encode(setup))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise SetupFileError(f"{path} already exists; refusing to overwrite the server setup") from None
        except OSError as exc:
            raise SetupFileError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return setup


def load_server_setup_file(path: str | os.PathLike[str]) -> ServerSetup:
    """Load the setup; SetupFileError (never a new setup) if anything is wrong."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SetupFileError(f"{path} does not exist; create it once with `keymgmt-server init`") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SetupFileError(f"{path} is accessible to other users; run `chmod 600 {path}`")
    if info.st_uid != os.getuid():
        raise SetupFileError(f"{path} belongs to another user")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SetupFileError(f"cannot read {path}: {exc.strerror}") from None
    if not data.startswith(_MAGIC):
        raise SetupFileError(f"{path} is not a keymgmt server setup file")
    header = len(_MAGIC) + 4
    if len(data) < header + _DIGEST:
        raise SetupFileError(f"{path} is corrupt (truncated)")
    (length,) = struct.unpack(">I", data[len(_MAGIC) : header])
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if len(body) != header + length or not hmac.compare_digest(hashlib.sha3_256(body).digest(), digest):
        raise SetupFileError(f"{path} is corrupt (checksum mismatch)")
    try:
        return ServerSetup.from_bytes(body[header:])
    except ValueError:
        raise SetupFileError(f"{path} is corrupt") from None
