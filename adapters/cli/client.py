"""``keymgmt``: the asset owner's command line.

Every command opens a TLS 1.3 connection to the key server, logs in with OPAQUE
(the password comes from a prompt, or from stdin when it is not a terminal or
with ``--password-stdin``, or from ``--password-file``; never from the command
line), does its work in one request session and logs out. Everything that can be
checked locally (arguments, files, the server address, the event loop) is checked
first: bad input is one line and exit code 2, with no connection made and no
password asked.

Exit codes (also in the README; docs/operations.md names the exceptions behind each):

    0  success
    1  any other error (also an unexpected one: KEYMGMT_DEBUG=1 shows its traceback)
    2  usage error
    3  login failed (wrong password or unknown account), or throttled
    4  no such key
    5  request refused (invalid input, account name taken or not allowed)
    6  cannot reach the key server (connection or TLS failure)
    7  the session ended (expired, request limit)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import hmac
import importlib
import importlib.metadata
import json
import os
import ssl
import sys
import tempfile
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import anyio
import platformdirs
import shtab

from keymgmt_proto import (
    MAX_SECRET_SIZE,
    PORTABLE_LONG_HEADER_SIZE,
    AuditEntry,
    AuditType,
    Context,
    ErrorCode,
    LabeledKey,
    Op,
    check_label,
    decode_portable,
    encode_portable,
)

from ..client.async_client import (
    MAX_PASSWORD_SIZE,
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    KeymgmtClient,
    KeymgmtError,
    KeySession,
    LabelConflictError,
    NotFoundError,
    RateLimitedError,
    RegistrationError,
    RequestRefusedError,
    SessionEndedError,
    ThrottledError,
    UserRateLimitedError,
    audit_to_json,
)
from ..client.connect import CertificateNotTrustedError, tls_connector, ws_connector
from ..client.localstore import LocalStore, LocalStoreError
from ..tls import PKIError, client_context

__all__ = ["CLI_COMMANDS", "ENVIRONMENT", "EXIT_CODES", "default_local_store", "main"]

EXIT_CODES: dict[type[BaseException], int] = {
    AuthenticationError: 3,
    ThrottledError: 3,
    NotFoundError: 4,
    LabelConflictError: 1,
    RequestRefusedError: 5,
    RegistrationError: 5,
    ConnectionLostError: 6,
    PKIError: 6,
    SessionEndedError: 7,
    IntegrityError: 1,
    KeymgmtError: 1,
    LocalStoreError: 2,
}
CONTEXTS = {"null": Context.NULL, "local-only": Context.LOCAL_ONLY, "export": Context.EXPORT}
AUDIT_TYPES = {"all": AuditType.ALL, "system": AuditType.SYSTEM_ONLY, "key": AuditType.KEY_ONLY}
BACKENDS = ("asyncio", "trio")
#: Password attempts ``register`` allows at a prompt (a mismatch or a rejected weak one).
REGISTER_TRIES = 3
#: zxcvbn scores 0..4; below this ``register`` warns (3: "safely unguessable").
STRONG_SCORE = 3
#: The protocol's limit on an account name (docs/protocol.md; the core refuses a longer one).
ACCOUNT_NAME_MAX = 255

#: Environment variables and what they set; each command's --help lists those it reads.
ENVIRONMENT: Mapping[str, str] = MappingProxyType(
    {
        "KEYMGMT_SERVER": "key server HOST:PORT (--server)",
        "KEYMGMT_CA": "CA certificate file that signs the server's (--ca)",
        "KEYMGMT_ACCOUNT": "account name (--account)",
        "KEYMGMT_PASSWORD_FILE": "file whose first line is the password (--password-file)",
        "KEYMGMT_LOCAL_STORE": "local ciphertext cache (--local-store)",
        "KEYMGMT_BACKEND": "event loop: asyncio or trio (--backend)",
        "KEYMGMT_DEBUG": "1: print the traceback of an unexpected error",
    }
)


class UsageError(Exception):
    """Bad arguments or input (exit code 2)."""


class _Cancelled(Exception):
    """The user declined a confirmation (exit code 1)."""


#: The command that runs each operation of ``keymgmt_proto.OPERATIONS`` (every command
#: fetches the storage key first; generate and import both reserve a key id and store).
CLI_COMMANDS: Mapping[Op, str] = MappingProxyType(
    {
        Op.RETRIEVE_STORAGE_KEY: "retrieve",
        Op.CREATE_KEY_ID: "generate",
        Op.STORE_SECRET: "import",
        Op.RETRIEVE: "retrieve",
        Op.AUDIT: "audit",
        Op.LIST_KEYS: "list",
        Op.DELETE_KEY: "delete",
        Op.CHANGE_PASSWORD_START: "passwd",
        Op.CHANGE_PASSWORD_FINISH: "passwd",
        Op.DELETE_ACCOUNT: "delete-account",
        Op.RENAME_KEY: "rename",
    }
)


def default_local_store() -> Path:
    """Where the local ciphertext cache lives: ``~/.keymgmt/local.db`` if it exists (the
    place before platformdirs; kept so nothing moves), else ``local.db`` in the user data
    directory (``$XDG_DATA_HOME/keymgmt`` or ``~/.local/share/keymgmt`` on Linux)."""
    legacy = Path.home() / ".keymgmt" / "local.db"
    if legacy.exists():
        return legacy
    return Path(platformdirs.user_data_dir("keymgmt", appauthor=False)) / "local.db"


def _version() -> str:
    try:
        return importlib.metadata.version("keymgmt")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the CLI's one line (``keymgmt: error: ...``, exit 2)
    instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _epilog(example: str, extra_env: Mapping[str, str] = MappingProxyType({})) -> str:
    env = {**ENVIRONMENT, **extra_env}
    width = max(len(name) for name in env)
    lines = ["example:", *(f"  {line}" for line in example.splitlines()), "", "environment:"]
    lines += [f"  {name:{width}}  {meaning}" for name, meaning in env.items()]
    return "\n".join(lines)


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The connection and output options, accepted before or after the command. The
    top-level parser holds the defaults; a command's copy only overrides them."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    env = os.environ
    parser.add_argument(
        "--server",
        default=default(env.get("KEYMGMT_SERVER", "127.0.0.1:7443")),
        metavar="HOST:PORT",
        help="key server (env KEYMGMT_SERVER; default 127.0.0.1:7443); wss://HOST:PORT: its WebSocket "
        "listener, which must allow the origin https://HOST:PORT",
    )
    parser.add_argument(
        "--ca",
        default=default(env.get("KEYMGMT_CA") or None),
        metavar="FILE",
        help="CA certificate that signs the server's (env KEYMGMT_CA; default: the system store)",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument(
        "--server-name",
        default=default(None),
        metavar="NAME",
        help="name to verify in the server's certificate (default: the host of --server)",
    )
    parser.add_argument(
        "--account",
        default=default(env.get("KEYMGMT_ACCOUNT")),
        metavar="NAME",
        help="account name, e.g. an email address (env KEYMGMT_ACCOUNT)",
    )
    parser.add_argument(
        "--local-store",
        default=default(env.get("KEYMGMT_LOCAL_STORE") or None),
        metavar="FILE",
        help=f"local ciphertext cache (env KEYMGMT_LOCAL_STORE; default {default_local_store()}); "
        "a retrieve answered from it reaches no server and leaves no audit entry",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument(
        "--no-local-store",
        action="store_true",
        default=default(False),
        help="use no local cache: every retrieve goes to the server (and is audited there)",
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        default=default(False),
        help="read the password from the first line of stdin",
    )
    parser.add_argument(
        "--password-file",
        default=default(env.get("KEYMGMT_PASSWORD_FILE") or None),
        metavar="FILE",
        help="read the password from the first line of FILE (env KEYMGMT_PASSWORD_FILE)",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument(
        "--backend",
        default=default(env.get("KEYMGMT_BACKEND") or "asyncio"),
        metavar="{asyncio,trio}",
        help="event loop to run on (env KEYMGMT_BACKEND; default asyncio; trio needs the trio package)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the result as JSON (times in ISO 8601 UTC, e.g. 2026-11-30T04:00:00Z)",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the raw bytes to FILE (created 0600; - for stdout) instead of hex on stdout",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument("--force", action="store_true", help="let -o FILE replace an existing file")


_KEY_HELP = "key id (32 hex digits), or the key's label"
_LABEL_HELP = "a name for the key, unique among yours (1..64 bytes; sealed: the server cannot read it)"


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="keymgmt",
        description="Store, retrieve and audit end-to-end encrypted secrets on a keymgmt key server.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 login failed, 4 no such key, 5 refused, "
        "6 cannot reach the server, 7 session ended\n\n"
        + _epilog(
            "export KEYMGMT_SERVER=127.0.0.1:7443 KEYMGMT_CA=srv/ca.pem KEYMGMT_ACCOUNT=alice\n"
            'keymgmt register\nKEY_ID=$(keymgmt generate)\nkeymgmt retrieve "$KEY_ID"'
        ),
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"keymgmt {_version()}")
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script and exit")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, description: str, example: str, env: Mapping[str, str] | None = None
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_epilog(example, env or {}),
            formatter_class=formatter,
        )
        _add_common(p, top=False)
        return p

    reg = command(
        "register",
        "create the account (asks for a new password)",
        "Create the account. At a terminal the password is asked twice (again on a mismatch,\n"
        f"{REGISTER_TRIES} tries), and a weak one (zxcvbn) is refused unless you confirm it; from\n"
        "stdin or --password-file a weak password is warned about. A key server that requires\n"
        "invitations wants one: --token-file FILE or KEYMGMT_INVITATION (--token works but puts\n"
        "it on the command line, visible to other users).",
        "keymgmt --account alice@example.org register --token-file invitation.txt",
        {"KEYMGMT_INVITATION": "the invitation itself (instead of --token-file)"},
    )
    invitation = reg.add_mutually_exclusive_group()
    invitation.add_argument("--token", help="the invitation itself (visible in ps: prefer --token-file)")
    invitation.add_argument(
        "--token-file", metavar="FILE", help="a file holding the invitation"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    gen = command(
        "generate",
        "generate and store a random 32-byte secret; prints its key id",
        "Generate a random 32-byte secret on this machine, store it (encrypted) on the key\n"
        "server and in the local cache, and print its key id. --label names it (sealed here:\n"
        "the server cannot read it); later commands take the label in place of the key id.",
        "KEY_ID=$(keymgmt generate --label 'backup key')",
    )
    gen.add_argument("--label", help=_LABEL_HELP)
    imp = command(
        "import",
        "store a secret of 1..65536 bytes; prints its key id",
        "Store a secret of 1..65536 bytes and print its key id. The secret comes from --file\n"
        "(its raw bytes; - for stdin), from stdin when stdin is not a terminal, or else from a\n"
        "prompt that does not echo (hex; a terminal line holds a few KiB at most: give a large\n"
        "secret with --file). When the secret comes from stdin, give the password with\n"
        "--password-file or at the prompt.",
        "KEY_ID=$(keymgmt import --file secret.bin)",
    )
    source = imp.add_mutually_exclusive_group()
    source.add_argument(
        "--file", metavar="FILE", help="a file holding the secret's raw bytes (- = stdin)"
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    source.add_argument(
        "--hex",
        help="the secret as hex; avoid it: a command line is visible to other users (ps) and kept "
        "in shell history",
    )
    imp.add_argument("--label", help=_LABEL_HELP)
    imp.add_argument(
        "--portable",
        action="store_true",
        help="the input is already in the portable form (`len || secret`, or the long form "
        "`00 01 || len u32 || secret` for more than 255 bytes)",
    )
    ret = command(
        "retrieve",
        "print a secret (hex), or write it raw with -o FILE",
        "Retrieve a secret. The context says what for, and is audited with the retrieve:\n"
        "local-only (the default) prints the secret as hex (or writes its raw bytes with -o);\n"
        "export prints the portable form; null only checks that it can be retrieved and prints\n"
        "'retrievable'. A secret in the local cache is not fetched again: that retrieve reaches\n"
        "no server and leaves no audit entry (--no-local-store fetches it).",
        'keymgmt retrieve "$KEY_ID" -o secret.bin',
    )
    ret.add_argument("key", metavar="KEY", help=_KEY_HELP)
    ret.add_argument(
        "--context",
        choices=list(CONTEXTS),
        default="local-only",
        help="local-only (default): the secret; export: the portable form; null: check only",
    )
    _output_options(ret)
    exp = command(
        "export",
        "print a secret in the portable form (hex), or write it raw with -o FILE",
        "Print a secret in the portable form (hex): `len || secret`, or the long form\n"
        "`00 01 || len u32 || secret` for more than 255 bytes; `import --portable` reads it.",
        'keymgmt export "$KEY_ID" -o key.portable',
    )
    exp.add_argument("key", metavar="KEY", help=_KEY_HELP)
    _output_options(exp)
    command(
        "list",
        "list your keys and their labels",
        "List your key ids with their kind, creation time (UTC) and label. Labels are opened\n"
        "here; one that fails verification (altered on the server, or moved from another key)\n"
        "is shown as <tampered> with a warning, and cannot be used to name the key.",
        "keymgmt list --json",
    )
    ren = command(
        "rename",
        "give a key a label, change it, or remove it",
        "Give a key a label, or change it (--remove takes it away). The label is sealed here\n"
        "under your storage key, bound to the key id: the server stores only ciphertext. A\n"
        "label is unique among your keys, 1..64 bytes of UTF-8, without control characters,\n"
        "spaces at either end, or the look of a key id (32 hex digits).",
        'keymgmt rename "$KEY_ID" "backup key"',
    )
    ren.add_argument("key", metavar="KEY", help=_KEY_HELP)
    ren.add_argument("label", metavar="LABEL", nargs="?", help="the new label")
    ren.add_argument("--remove", action="store_true", help="remove the key's label")
    dele = command(
        "delete",
        "delete a key (asks first unless --yes)",
        "Delete a key on the server and from the local cache. Asks for confirmation at a\n"
        "terminal; without one (a script), --yes is required.",
        'keymgmt delete --yes "$KEY_ID"',
    )
    dele.add_argument("key", metavar="KEY", help=_KEY_HELP)
    dele.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    aud = command(
        "audit",
        "read your audit log",
        "Read your audit log: a table, or with --json the documented export (AUD-2,\n"
        "docs/protocol.md section 12.11; its times are timestamp_us, microseconds UTC, and\n"
        "each entry carries its hash). --verify reads the whole log and checks its hash chain,\n"
        "also against the newest entry verified before on this machine (kept in the local\n"
        "store); a log that does not extend it is an integrity error (exit 1). --head does\n"
        "the same and prints the newest entry's position and hash: compare it with another\n"
        "device's (see README, 'The audit chain').",
        "keymgmt audit --verify --type key --after 2026-01-01",
    )
    aud.add_argument("--type", choices=list(AUDIT_TYPES), default="all", help="which entries")
    aud.add_argument("--key", action="append", default=[], help="only this key (id or label; repeatable)")
    aud.add_argument("--verify", action="store_true", help="check the hash chain before showing entries")
    aud.add_argument(
        "--head", action="store_true", help="check the hash chain and print its newest position and hash"
    )
    aud.add_argument("--after", help="only entries at or after this ISO date/time (UTC if no zone)")
    aud.add_argument("--before", help="only entries before this ISO date/time (UTC if no zone)")
    pwd = command(
        "passwd",
        "change the account's password (asks for the current one, then the new one)",
        "Change the password. The current password is checked by a fresh login (a wrong one\n"
        "changes nothing); then the new one is registered and the storage key re-wrapped under\n"
        "it, in one step on the server. Your secrets, local cache and audit log stay as they\n"
        "are; every other session of the account ends. At a terminal the new password is asked\n"
        f"twice (a weak one, zxcvbn, only if you confirm it; {REGISTER_TRIES} tries); from stdin it is the\n"
        "next line (after the current password when that comes from stdin too), or give it with\n"
        "--new-password-file.",
        "keymgmt passwd --password-file old.txt --new-password-file new.txt",
    )
    pwd.add_argument(
        "--new-password-file",
        metavar="FILE",
        help="read the new password from the first line of FILE",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    dacc = command(
        "delete-account",
        "delete the account and every secret in it (asks first unless --yes)",
        "Delete the account: every secret, the audit log and the account itself, on the key\n"
        "server (in one step), and this machine's cached copies. Every session of the account\n"
        "ends. The key server keeps the name reserved for a while (30 days by default), so\n"
        "nobody else can take it meanwhile. Asks for confirmation at a terminal; without one\n"
        "(a script), --yes is required.",
        "keymgmt delete-account --yes --password-file pw.txt",
    )
    dacc.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    command(
        "logout",
        "log in and out again (checks the password; audited)",
        "Log in and out again: checks the password (and leaves a login in the audit log).",
        "keymgmt logout",
    )
    return parser


# --- checks made before anything else happens ---------------------------------------------


def _label(text: str) -> str:
    try:
        return check_label(text)
    except (ValueError, UnicodeEncodeError) as exc:
        raise UsageError(f"label {text!r}: {exc}") from None


def _key(text: str) -> bytes | str:
    """A KEY argument: 32 hex digits are a key id, any other text a label (resolved once
    logged in; a mistyped key id thus names no key: exit 4)."""
    if len(text) == 32 and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    return _label(text)


def _time(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO date or date/time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1_000_000)


def _format_time(microseconds: int) -> str:
    """The CLI's one time format: ISO 8601 in UTC to the second, e.g. 2026-11-30T04:00:00Z."""
    moment = datetime.datetime.fromtimestamp(microseconds / 1_000_000, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _server_address(text: str) -> tuple[str, int, bool]:
    """HOST:PORT (the TLS port) or wss://HOST:PORT (the WebSocket listener): host, port and
    whether it is the WebSocket."""
    websocket = text.startswith("wss://")
    address = text.removeprefix("wss://").removesuffix("/keymgmt") if websocket else text
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise UsageError(
            "--server (or KEYMGMT_SERVER) must be HOST:PORT or wss://HOST:PORT, e.g. 127.0.0.1:7443, "
            f"not {text!r}"
        )
    port = int(port_text)
    if not 0 < port <= 65535:
        raise UsageError(f"--server (or KEYMGMT_SERVER): port {port_text} is not in 1..65535")
    return host, port, websocket


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise UsageError(f"--backend (or KEYMGMT_BACKEND) must be asyncio or trio, not {name!r}")
    if name == "trio":
        try:
            importlib.import_module("trio")
        except ImportError:
            raise UsageError("the trio backend needs the trio package: pip install 'keymgmt[trio]'") from None


def _read_first_line(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the {what} {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


#: The most input ``import`` reads: the largest secret in the long portable form (a longer
#: file or stdin is refused after reading one byte more, never read whole).
_MAX_IMPORT_INPUT = MAX_SECRET_SIZE + PORTABLE_LONG_HEADER_SIZE


@dataclass
class _Inputs:
    """What the command needs, read and checked before connecting (secrets kept out of repr)."""

    host: str
    port: int
    account: bytes
    local_store: str
    #: --server wss://HOST:PORT: the key server's WebSocket listener.
    websocket: bool = False
    context: ssl.SSLContext | None = None
    password: bytes | None = field(default=None, repr=False)
    portable_secret: bytes = field(default=b"", repr=False)
    invitation: bytes = field(default=b"", repr=False)
    new_password: bytes | None = field(default=None, repr=False)
    stdin_taken: bool = False
    key_id: bytes = b""
    #: A KEY given as a label, resolved to ``key_id`` once logged in.
    key_label: str | None = None
    new_label: str | None = None
    audit_keys: list[bytes | str] = field(default_factory=list)
    after: int | None = None
    before: int | None = None
    #: The cache --no-local-store leaves unread: a key found deleted is still dropped from it.
    bypassed_store: str | None = None
    #: Printed once every check has passed, so a usage error stays one line.
    warnings: list[str] = field(default_factory=list)


def _read_import_secret(args: argparse.Namespace, inputs: _Inputs) -> bytes:
    """The secret to import, in the portable form; marks ``stdin_taken`` when it came from
    stdin."""
    if args.hex is not None:
        try:
            raw = bytes.fromhex(args.hex)
        except ValueError:
            raise UsageError("--hex is not hexadecimal") from None
        inputs.warnings.append(
            "--hex puts the secret in the process list and shell history; use --file, stdin or the prompt"
        )
    elif args.file is not None and args.file != "-":
        try:
            with open(args.file, "rb") as file:
                raw = file.read(_MAX_IMPORT_INPUT + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {_reason(exc)}") from None
    elif args.file is not None or not sys.stdin.isatty():
        inputs.stdin_taken = True
        raw = sys.stdin.buffer.read(_MAX_IMPORT_INPUT + 1)
    else:
        try:
            raw = bytes.fromhex(getpass.getpass("secret (hex, not echoed): "))
        except ValueError:
            raise UsageError("the secret is not hexadecimal") from None
    if args.portable:
        try:
            decode_portable(raw)
        except ValueError as exc:
            raise UsageError(f"not in the portable form: {exc}") from None
        return raw
    if not 0 < len(raw) <= MAX_SECRET_SIZE:
        raise UsageError(f"a secret must be 1..{MAX_SECRET_SIZE} bytes")
    return encode_portable(raw)


def _read_invitation(args: argparse.Namespace, inputs: _Inputs) -> bytes:
    """The registration token (REG-5): --token-file, --token (warned) or KEYMGMT_INVITATION."""
    if args.token_file is not None:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip().encode()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the invitation file {args.token_file}: {_reason(exc)}") from None
    if args.token is not None:
        inputs.warnings.append(
            "--token puts the invitation in the process list and shell history; "
            "use --token-file or KEYMGMT_INVITATION"
        )
        return str(args.token).strip().encode()
    return os.environ.get("KEYMGMT_INVITATION", "").strip().encode()


def _check_output(args: argparse.Namespace) -> None:
    output = getattr(args, "output", None)
    if output is None:
        return
    if getattr(args, "context", "local-only") == "null":
        raise UsageError("-o needs a secret to write: --context local-only or export, not null")
    if output == "-":
        if args.json:
            raise UsageError("-o - and --json both write to stdout; give -o a file")
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"-o {output}: is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"-o {output}: no such directory {target.parent}")
    if (target.exists() or target.is_symlink()) and not args.force:
        raise UsageError(f"-o {output}: the file exists (--force replaces it)")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {output}: cannot write in {target.parent}")


def _check_local_store(path: str) -> None:
    """A local store that exists must be a regular file of this user's, closed to others
    (named as it is: through a symbolic link, the file it points to)."""
    if path == ":memory:":
        return
    given = Path(path)
    if not given.exists():
        return
    real = given.resolve()
    named = f"--local-store {path}" + (f" (a link to {real})" if given.is_symlink() else "")
    if real.is_dir():
        raise UsageError(f"{named} is a directory; give a file, e.g. {given / 'local.db'}")
    if not real.is_file():
        raise UsageError(f"{named} is not a regular file")
    info = real.stat()
    if info.st_uid != os.getuid():
        raise UsageError(f"{named} belongs to another user; give a file of your own")
    if info.st_mode & 0o077:
        raise UsageError(f"{named} is accessible to other users; run `chmod 600 {real}`")


def _have_terminal() -> bool:
    """Whether getpass can prompt on a terminal (the process has a controlling one)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _confirm(question: str) -> bool:
    print(question, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        raise EOFError
    return answer.strip().lower() in ("y", "yes")


def _prepare(args: argparse.Namespace) -> _Inputs:
    """Every check that needs no server, in one place, before any connection or prompt."""
    _check_backend(args.backend)
    host, port, websocket = _server_address(args.server)
    if not args.account:
        raise UsageError("--account (or KEYMGMT_ACCOUNT) is required")
    try:
        account = args.account.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--account is not valid text") from None
    if len(account) > ACCOUNT_NAME_MAX:
        raise UsageError(
            f"--account (or KEYMGMT_ACCOUNT) is at most {ACCOUNT_NAME_MAX} bytes, not {len(account)}"
        )
    local_store = ":memory:" if args.no_local_store else str(args.local_store or default_local_store())
    _check_local_store(local_store)
    inputs = _Inputs(host, port, account, local_store, websocket=websocket)
    if args.no_local_store:
        inputs.bypassed_store = str(args.local_store or default_local_store())
    command = args.command
    if command in ("retrieve", "export", "delete", "rename"):
        key = _key(args.key)
        if isinstance(key, str):
            inputs.key_label = key
        else:
            inputs.key_id = key
    if command in ("generate", "import") and args.label is not None:
        inputs.new_label = _label(args.label)
    if command == "rename":
        if args.remove == (args.label is not None):
            raise UsageError("rename takes a new LABEL, or --remove (not both)")
        inputs.new_label = None if args.remove else _label(args.label)
    if command == "audit":
        inputs.audit_keys = [_key(k) for k in args.key]
        inputs.after, inputs.before = _time(args.after), _time(args.before)
        if inputs.after is not None and inputs.before is not None and inputs.after >= inputs.before:
            inputs.warnings.append(
                f"--after {args.after} is not before --before {args.before}: no entry can match"
            )
    _check_output(args)
    if command == "register":
        inputs.invitation = _read_invitation(args, inputs)
    if command == "import":
        inputs.portable_secret = _read_import_secret(args, inputs)
    if args.password_stdin and inputs.stdin_taken:
        raise UsageError("the secret comes from stdin; give the password with --password-file")
    if args.password_file is not None:
        inputs.password = _checked_password(_read_first_line(args.password_file, "password file"))
    elif inputs.stdin_taken and not sys.stdin.isatty() and not _have_terminal():
        raise UsageError(
            "the secret comes from stdin and there is no terminal to ask the password on; "
            "give it with --password-file"
        )
    if command == "passwd" and args.new_password_file is not None:
        inputs.new_password = _read_first_line(args.new_password_file, "new password file").encode("utf-8")
        if not inputs.new_password:
            raise UsageError("the new password is empty")
        if inputs.password is not None and hmac.compare_digest(inputs.password, inputs.new_password):
            raise UsageError("the new password is the current one")
    try:
        inputs.context = client_context(args.ca)
    except PKIError as exc:  # a missing or bad CA file: a setting to fix, before any connection
        raise UsageError(f"--ca (or KEYMGMT_CA): {exc}") from None
    if command == "delete" and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("delete asks for confirmation: give --yes when stdin is not a terminal")
        if not _confirm(f"delete key {args.key} of {args.account}? This cannot be undone. [y/N] "):
            raise _Cancelled("not confirmed; nothing deleted")
    if command == "delete-account" and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("delete-account asks for confirmation: give --yes when stdin is not a terminal")
        question = (
            f"delete the account {args.account} with every secret in it and its audit log? "
            "This cannot be undone. [y/N] "
        )
        if not _confirm(question):
            raise _Cancelled("not confirmed; nothing deleted")
    for warning in inputs.warnings:
        print(f"keymgmt: warning: {warning}", file=sys.stderr)
    return inputs


# --- passwords ------------------------------------------------------------------------------


def _weakness(password: str, account: str) -> str | None:
    """A one-line warning when zxcvbn rates ``password`` below STRONG_SCORE, else None."""
    from zxcvbn import zxcvbn  # imported here: its word lists take a moment to load

    hints = [account, *account.replace("@", " ").replace(".", " ").split()]
    # zxcvbn refuses more than 72 characters; a password that long is judged by its start.
    result = zxcvbn(password[:72], user_inputs=hints)
    score = int(result["score"])
    if score >= STRONG_SCORE:
        return None
    feedback = result.get("feedback") or {}
    advice = " ".join(
        str(part) for part in [feedback.get("warning"), *feedback.get("suggestions", [])] if part
    )
    return f"this password is weak (strength {score} of 4){': ' + advice if advice else ''}"


def _password_from_stdin(inputs: _Inputs, args: argparse.Namespace) -> bool:
    return bool(args.password_stdin) or (not sys.stdin.isatty() and not inputs.stdin_taken)


def _read_password(args: argparse.Namespace, inputs: _Inputs) -> bytes:
    """The login password: --password-file (already read), stdin, or a no-echo prompt."""
    if inputs.password is not None:
        return inputs.password
    if _password_from_stdin(inputs, args):
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
    return _checked_password(password)


def _checked_password(password: str) -> bytes:
    """``password`` as bytes; a usage error if it is empty or longer than OPAQUE takes."""
    if not password:
        raise UsageError("the password is empty")
    encoded = password.encode("utf-8")
    if len(encoded) > MAX_PASSWORD_SIZE:
        raise UsageError(f"the password is {len(encoded)} bytes; at most {MAX_PASSWORD_SIZE}")
    return encoded


def _new_password(args: argparse.Namespace, inputs: _Inputs) -> bytes:
    """A new password for ``register``. From a file or stdin it is taken as it is (a weak
    one is warned about); at a prompt it is asked twice, and asked again on a mismatch, an
    empty one or a weak one the user does not confirm, REGISTER_TRIES times at most."""
    if inputs.password is not None or _password_from_stdin(inputs, args):
        given = _read_password(args, inputs)
        _warn_if_weak(given, args.account)
        return given
    return _prompt_new_password(args.account)


def _changed_password(args: argparse.Namespace, inputs: _Inputs) -> bytes:
    """The new password for ``passwd``: --new-password-file (already read), the next line of
    stdin, or asked twice at a prompt (as for ``register``)."""
    if inputs.new_password is not None:
        given = inputs.new_password
    elif _password_from_stdin(inputs, args):
        given = sys.stdin.readline().rstrip("\r\n").encode("utf-8")
        if not given:
            raise UsageError("the new password is empty (passwd reads it from the next line of stdin)")
    else:
        return _prompt_new_password(args.account)
    _warn_if_weak(given, args.account)
    return given


def _warn_if_weak(password: bytes, account: str) -> None:
    weakness = _weakness(password.decode("utf-8", errors="replace"), account)
    if weakness:
        print(f"keymgmt: warning: {weakness}", file=sys.stderr)


def _prompt_new_password(account: str) -> bytes:
    """Ask for a new password twice at the terminal (see :func:`_new_password`)."""
    for _ in range(REGISTER_TRIES):
        password = getpass.getpass("new password: ")
        if not password or len(password.encode("utf-8")) > MAX_PASSWORD_SIZE:
            what = "empty" if not password else f"longer than {MAX_PASSWORD_SIZE} bytes"
            print(f"keymgmt: the password is {what}; try again", file=sys.stderr)
            continue
        weakness = _weakness(password, account)
        if weakness:
            print(f"keymgmt: warning: {weakness}", file=sys.stderr)
            if not _confirm("use it anyway? [y/N] "):
                continue
        again = getpass.getpass("new password again: ")
        if hmac.compare_digest(again.encode("utf-8"), password.encode("utf-8")):
            return password.encode("utf-8")
        print("keymgmt: the passwords do not match; try again", file=sys.stderr)
    raise UsageError(f"no password chosen after {REGISTER_TRIES} tries")


# --- the commands -----------------------------------------------------------------------------


def _audit_table(entries: list[AuditEntry]) -> str:
    rows = [f"{'#':>5}  {'time (UTC)':20}  {'action':21}  {'outcome':8}  {'key id':32}  context"]
    for e in entries:
        key = e.key_id.hex() if e.key_id else "-"
        context = e.context.name.lower().replace("_", "-") if e.context is not None else "-"
        rows.append(
            f"{e.entry_id:>5}  {_format_time(e.timestamp):20}  {e.action.name.lower():21}  "
            f"{e.outcome.name.lower():8}  {key:32}  {context}"
        )
    return "\n".join(rows)


def _write_output(target: str, data: bytes, force: bool) -> None:
    """Write ``data`` to ``target`` (owner-only, whole or not at all); ``-`` is stdout."""
    if target == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(target)
    try:
        _write_file(path, data, force)
    except OSError as exc:
        raise KeymgmtError(f"cannot write -o {target}: {_reason(exc)}") from None


def _write_file(path: Path, data: bytes, force: bool) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if the file appeared meanwhile: never overwritten
            except FileExistsError:
                raise UsageError(f"-o {path}: the file exists (--force replaces it)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _emit(args: argparse.Namespace, text: str, document: object) -> None:
    print(json.dumps(document, indent=2) if args.json else text)


def _select_verified(
    entries: list[AuditEntry], args: argparse.Namespace, inputs: _Inputs, keys: list[bytes]
) -> list[AuditEntry]:
    """The filters of ``audit`` applied here, to the entries a verification walk read."""
    audit_type = AUDIT_TYPES[args.type]
    chosen = []
    for e in entries:
        if audit_type is AuditType.KEY_ONLY and not e.action.is_key_action:
            continue
        if audit_type is AuditType.SYSTEM_ONLY and e.action.is_key_action:
            continue
        if keys and e.key_id not in keys:
            continue
        if inputs.after is not None and e.timestamp < inputs.after:
            continue
        if inputs.before is not None and e.timestamp >= inputs.before:
            continue
        chosen.append(e)
    return chosen


async def _audit_command(args: argparse.Namespace, inputs: _Inputs, session: KeySession) -> None:
    keys = [k if isinstance(k, bytes) else await session.resolve(k) for k in inputs.audit_keys]
    if args.verify or args.head:
        verified = await session.verify_audit()
        head = verified.head
        where = f"entries 1..{head.position}, head {head.hash.hex()}" if head else "the log is empty"
        if args.head:
            document = {"position": head.position if head else 0, "hash": head.hash.hex() if head else None}
            _emit(args, f"{head.position} {head.hash.hex()}" if head else "0 -", document)
            return
        print(f"keymgmt: audit log verified: {where}", file=sys.stderr)
        entries = _select_verified(verified.entries, args, inputs, keys)
    else:
        entries = await session.audit(AUDIT_TYPES[args.type], keys, inputs.after, inputs.before)
    print(audit_to_json(entries, session.user_id) if args.json else _audit_table(entries))


def _label_cell(key: LabeledKey) -> str:
    if key.label_tampered:
        return "<tampered>"
    return key.label if key.label is not None else "-"


async def _session_command(args: argparse.Namespace, inputs: _Inputs, session: KeySession) -> None:
    command = args.command
    if inputs.key_label is not None:
        inputs.key_id = await session.resolve(inputs.key_label)
    if command in ("generate", "import"):
        if command == "generate":
            key_id = await session.generate(inputs.new_label)
        else:
            key_id = await session.import_secret(inputs.portable_secret, inputs.new_label)
        stored: dict[str, object] = {"key_id": key_id.hex()}
        if inputs.new_label is not None:
            stored["label"] = inputs.new_label
        _emit(args, key_id.hex(), stored)
    elif command == "rename":
        had_label = await session.rename(inputs.key_id, inputs.new_label)
        renamed: dict[str, object] = {"key_id": inputs.key_id.hex(), "label": inputs.new_label}
        if inputs.new_label is not None:
            text = f"labelled {inputs.key_id.hex()} {inputs.new_label!r}"
        else:
            renamed["removed"] = had_label
            text = (
                f"removed the label of {inputs.key_id.hex()}"
                if had_label
                else f"{inputs.key_id.hex()} has no label; nothing removed"
            )
        _emit(args, text, renamed)
    elif command in ("retrieve", "export"):
        context_name = args.context if command == "retrieve" else "export"
        result = await session.retrieve(inputs.key_id, CONTEXTS[context_name])
        document: dict[str, object] = {"key_id": inputs.key_id.hex(), "context": context_name}
        if result is None:
            _emit(args, "retrievable", {**document, "retrievable": True})
        elif args.output is not None:
            _write_output(args.output, result, args.force)
            if args.json:
                _emit(args, "", {**document, "output": args.output, "bytes": len(result)})
        else:
            member = "portable_hex" if context_name == "export" else "secret_hex"
            _emit(args, result.hex(), {**document, member: result.hex()})
    elif command == "list":
        keys = await session.list_keys()
        rows = [
            {
                "key_id": k.key_id.hex(),
                "kind": k.kind.name.lower(),
                "created": _format_time(k.created),
                "label": k.label,
                "label_status": "tampered" if k.label_tampered else "none" if k.label is None else "ok",
            }
            for k in keys
        ]
        table = [f"{'key id':32}  {'kind':9}  {'created (UTC)':20}  label"]
        table += [
            f"{k.key_id.hex():32}  {k.kind.name.lower():9}  {_format_time(k.created):20}  {_label_cell(k)}"
            for k in keys
        ]
        tampered = sum(k.label_tampered for k in keys)
        if tampered:
            print(
                f"keymgmt: warning: {tampered} label(s) failed verification (altered on the key server, "
                "or moved from another key); those keys are listed by id only",
                file=sys.stderr,
            )
        _emit(args, "\n".join(table), rows)
    elif command == "delete":
        await session.delete(inputs.key_id)
        _emit(args, f"deleted {inputs.key_id.hex()}", {"key_id": inputs.key_id.hex(), "deleted": True})
    elif command == "audit":
        await _audit_command(args, inputs, session)
    elif command == "logout":
        _emit(args, "logged out", {"account": args.account, "logged_out": True})


def _forget_bypassed(inputs: _Inputs, user_id: bytes) -> None:
    """With --no-local-store, drop a deleted key from the cache left unread (if it exists),
    so a later retrieve without the option cannot answer from it."""
    if inputs.bypassed_store is None or inputs.bypassed_store == ":memory:":
        return
    if not Path(inputs.bypassed_store).exists():
        return
    try:
        store = LocalStore(inputs.bypassed_store)
    except LocalStoreError as exc:
        print(f"keymgmt: warning: the key stays in the local cache: {exc}", file=sys.stderr)
        return
    try:
        store.delete(user_id, inputs.key_id)
    finally:
        store.close()


async def _run(args: argparse.Namespace, inputs: _Inputs) -> None:
    connect = (ws_connector if inputs.websocket else tls_connector)(
        inputs.host, inputs.port, context=inputs.context, server_hostname=args.server_name
    )
    if inputs.local_store != ":memory:":
        Path(inputs.local_store).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    local = LocalStore(inputs.local_store)
    try:
        # Every local input before connecting: a prompt answered slowly must not keep an idle
        # connection open, which the key server closes (connection_idle_timeout).
        password = _new_password(args, inputs) if args.command == "register" else _read_password(args, inputs)
        new_password = None
        if args.command == "passwd":
            new_password = _changed_password(args, inputs)
            if hmac.compare_digest(password, new_password):
                raise UsageError("the new password is the current one")
        async with KeymgmtClient(connect, local_store=local, reconnect_attempts=2) as client:
            if args.command == "register":
                user_id = await client.register(inputs.account, password, invitation=inputs.invitation)
                _emit(
                    args,
                    f"registered {args.account} (user id {user_id.hex()})",
                    {"account": args.account, "user_id": user_id.hex()},
                )
                return
            if args.command == "passwd":
                assert new_password is not None
                await client.change_password(inputs.account, password, new_password)
                _emit(
                    args,
                    f"changed the password of {args.account}; its other sessions ended",
                    {"account": args.account, "password_changed": True},
                )
                return
            if args.command == "delete-account":
                await client.delete_account(inputs.account, password)
                _emit(
                    args,
                    f"deleted the account {args.account} and every secret in it",
                    {"account": args.account, "deleted": True},
                )
                return
            session = await client.login(inputs.account, password)
            try:
                await _session_command(args, inputs, session)
            except NotFoundError:
                if args.command in ("retrieve", "export", "delete"):
                    _forget_bypassed(inputs, session.user_id)
                raise
            finally:
                await session.logout()
            if args.command == "delete":
                _forget_bypassed(inputs, session.user_id)
    finally:
        local.close()


# --- errors -------------------------------------------------------------------------------------

#: What a throttled login is told when the key server names no wait (too many of the name's
#: logins at once): its default policy (README, *Configuration*, throttle.*).
THROTTLE_HINT = (
    "by default the key server locks "
    "a name for 1 s from its 5th failed login on, doubling with each further failure up to 15 min "
    "(a success does not reset the count; it is forgotten a day after the last failure), and runs "
    "at most 5 logins of one name at once"
)
RATE_LIMIT_HINT = "too many logins from this address; try again in a few seconds"
NAME_HINT = "--server-name (default: the host of --server) must be a name the certificate holds"
CA_HINT = "give the CA that signs it with --ca FILE or KEYMGMT_CA (and --server-name if the name differs)"


def _message(exc: BaseException) -> str:
    if isinstance(exc, UserRateLimitedError):  # the account's requests, not this address's logins
        return str(exc)
    if isinstance(exc, RateLimitedError):
        return RATE_LIMIT_HINT
    if isinstance(exc, ThrottledError):
        # the key server named the wait: say it; else (too many logins at once) the policy
        return str(exc) if exc.retry_after is not None else f"{exc} ({THROTTLE_HINT})"
    if isinstance(exc, CertificateNotTrustedError) and exc.name_mismatch:
        return f"{exc}; {NAME_HINT}"
    if isinstance(exc, CertificateNotTrustedError):
        return f"{exc}; {CA_HINT}"
    return str(exc)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, RegistrationError) and exc.code is ErrorCode.INVALID_ACCOUNT_NAME:
        return 5
    for kind in type(exc).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind]
    return 1


def _fail(message: str, code: int) -> int:
    print(f"keymgmt: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    inputs = _prepare(args)
    try:
        anyio.run(_run, args, inputs, backend=args.backend)
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. Never lets a traceback out, unless
    KEYMGMT_DEBUG=1 asks for it (with an unexpected error)."""
    try:
        return _main(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except _Cancelled as exc:
        return _fail(str(exc), 1)
    except (KeymgmtError, PKIError, LocalStoreError) as exc:
        return _fail(_message(exc), _exit_code(exc))
    except KeyboardInterrupt:
        print("keymgmt: interrupted", file=sys.stderr)
        return 130
    except EOFError:
        return _fail("no answer (end of input)", 2)
    except BrokenPipeError:  # e.g. `keymgmt audit | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        return _fail(_reason(exc), 1)
    except Exception as exc:  # the last resort: one line, the traceback only on request
        if os.environ.get("KEYMGMT_DEBUG") == "1":
            traceback.print_exc()
            return _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
        return _fail(f"unexpected {type(exc).__name__}: {exc} (KEYMGMT_DEBUG=1 shows the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
