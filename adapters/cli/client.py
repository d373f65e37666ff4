"""``keymgmt``: the asset owner's command line.

Every command opens a TLS 1.3 connection to the key server, logs in with OPAQUE
(the password comes from a prompt, or from stdin when it is not a terminal or
with ``--password-stdin``; never from the command line), does its work in one
request session and logs out.

Exit codes (also in the README; docs/operations.md names the exceptions behind each):

    0  success
    1  any other error
    2  usage error
    3  login failed (wrong password or unknown account), or throttled
    4  no such key
    5  request refused (invalid input, account name taken or not allowed)
    6  cannot reach the key server (connection or TLS failure)
    7  the session ended (expired, request limit)
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import hmac
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import anyio

from keymgmt_proto import (
    MAX_SECRET_SIZE,
    PORTABLE_LONG_HEADER_SIZE,
    AuditEntry,
    AuditType,
    Context,
    ErrorCode,
    Op,
    decode_portable,
    encode_portable,
)

from ..client.async_client import (
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    KeymgmtClient,
    KeymgmtError,
    KeySession,
    NotFoundError,
    RegistrationError,
    RequestRefusedError,
    SessionEndedError,
    ThrottledError,
    audit_to_json,
)
from ..client.connect import tls_connector
from ..client.localstore import LocalStore, LocalStoreError
from ..tls import PKIError

__all__ = ["CLI_COMMANDS", "EXIT_CODES", "main"]

EXIT_CODES: dict[type[BaseException], int] = {
    AuthenticationError: 3,
    ThrottledError: 3,
    NotFoundError: 4,
    RequestRefusedError: 5,
    RegistrationError: 5,
    ConnectionLostError: 6,
    PKIError: 6,
    SessionEndedError: 7,
    IntegrityError: 1,
    KeymgmtError: 1,
    LocalStoreError: 1,
}
CONTEXTS = {"null": Context.NULL, "local-only": Context.LOCAL_ONLY, "export": Context.EXPORT}
AUDIT_TYPES = {"all": AuditType.ALL, "system": AuditType.SYSTEM_ONLY, "key": AuditType.KEY_ONLY}


class UsageError(Exception):
    """Bad arguments found after parsing (exit code 2)."""


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
    }
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keymgmt",
        description="Store, retrieve and audit end-to-end encrypted secrets on a keymgmt key server.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 login failed, 4 no such key, 5 refused, "
        "6 cannot reach the server, 7 session ended",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("KEYMGMT_SERVER", "127.0.0.1:7443"),
        help="key server HOST:PORT (env KEYMGMT_SERVER; default 127.0.0.1:7443)",
    )
    parser.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("KEYMGMT_CA") or None,
        help="CA certificate that signs the server's (env KEYMGMT_CA; default: system store)",
    )
    parser.add_argument("--server-name", help="name to verify in the server's certificate (default: host)")
    parser.add_argument(
        "--account",
        default=os.environ.get("KEYMGMT_ACCOUNT"),
        help="account name, e.g. an email address (env KEYMGMT_ACCOUNT)",
    )
    parser.add_argument(
        "--local-store",
        type=Path,
        default=os.environ.get("KEYMGMT_LOCAL_STORE", str(Path.home() / ".keymgmt" / "local.db")),
        help="client-side ciphertext cache (env KEYMGMT_LOCAL_STORE)",
    )
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        default=os.environ.get("KEYMGMT_PASSWORD_FILE") or None,
        help="read the password from the first line of this file (env KEYMGMT_PASSWORD_FILE)",
    )
    parser.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default=os.environ.get("KEYMGMT_BACKEND", "asyncio"),
        help="event loop to run on",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    reg = sub.add_parser(
        "register",
        help="create the account (asks for a new password)",
        description="Create the account; the password is asked twice. A key server that "
        "requires invitations wants one: --token-file FILE or KEYMGMT_INVITATION (--token works "
        "but puts it on the command line, visible to other users).",
    )
    invitation = reg.add_mutually_exclusive_group()
    invitation.add_argument("--token", help="the invitation itself (visible in ps: prefer --token-file)")
    invitation.add_argument("--token-file", type=Path, help="a file holding the invitation")
    sub.add_parser("generate", help="generate and store a random 32-byte secret; prints its key id")
    imp = sub.add_parser(
        "import",
        help="store a secret of 1..65536 bytes; prints its key id",
        description="Store a secret of 1..65536 bytes and print its key id. The secret comes from "
        "--file (its raw bytes; - for stdin), from stdin when stdin is not a terminal, or else "
        "from a prompt that does not echo (hex; a terminal line holds a few KiB at most: give a "
        "large secret with --file). When the secret comes from stdin, give the password with "
        "--password-file or at the prompt.",
    )
    source = imp.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="a file holding the secret's raw bytes (- = stdin)")
    source.add_argument(
        "--hex",
        help="the secret as hex; avoid it: a command line is visible to other users (ps) and kept "
        "in shell history",
    )
    imp.add_argument(
        "--portable",
        action="store_true",
        help="the input is already in the portable form (`len || secret`, or the long form "
        "`00 01 || len u32 || secret` for more than 255 bytes)",
    )
    ret = sub.add_parser("retrieve", help="retrieve a secret")
    ret.add_argument("key_id", help="key id (hex)")
    ret.add_argument(
        "--context",
        choices=list(CONTEXTS),
        default="null",
        help="null: check it can be retrieved; local-only: print the secret (hex); "
        "export: print the portable form (hex)",
    )
    exp = sub.add_parser(
        "export",
        help="print a secret in the portable form (hex): `len || secret`, or the long form "
        "`00 01 || len u32 || secret` for more than 255 bytes",
    )
    exp.add_argument("key_id", help="key id (hex)")
    lst = sub.add_parser("list", help="list your key ids")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    dele = sub.add_parser("delete", help="delete a key")
    dele.add_argument("key_id", help="key id (hex)")
    aud = sub.add_parser("audit", help="read your audit log")
    aud.add_argument("--type", choices=list(AUDIT_TYPES), default="all", help="which entries")
    aud.add_argument("--key", action="append", default=[], help="only this key id (repeatable)")
    aud.add_argument("--after", help="only entries at or after this ISO date/time (UTC if no zone)")
    aud.add_argument("--before", help="only entries before this ISO date/time (UTC if no zone)")
    aud.add_argument("--json", action="store_true", help="the documented JSON export (AUD-2)")
    sub.add_parser("logout", help="log in and out again (checks the password; audited)")
    return parser


def _key_id(text: str) -> bytes:
    try:
        key_id = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"key id {text!r} is not hex") from None
    if len(key_id) != 16:
        raise UsageError("a key id is 16 bytes (32 hex digits)")
    return key_id


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
    moment = datetime.datetime.fromtimestamp(microseconds / 1_000_000, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


#: The most input ``import`` reads: the largest secret in the long portable form (a longer
#: file or stdin is refused after reading one byte more, never read whole).
_MAX_IMPORT_INPUT = MAX_SECRET_SIZE + PORTABLE_LONG_HEADER_SIZE


def _read_import_secret(args: argparse.Namespace) -> bytes:
    """The secret to import, in the portable form, checked before anything else happens.
    Returns it and marks ``args.stdin_taken`` when it came from stdin."""
    if args.hex is not None:
        print(
            "keymgmt: warning: --hex puts the secret in the process list and shell history; "
            "use --file, stdin or the prompt",
            file=sys.stderr,
        )
        try:
            raw = bytes.fromhex(args.hex)
        except ValueError:
            raise UsageError("--hex is not hexadecimal") from None
    elif args.file is not None and str(args.file) != "-":
        try:
            with open(args.file, "rb") as file:
                raw = file.read(_MAX_IMPORT_INPUT + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    elif args.file is not None or not sys.stdin.isatty():
        args.stdin_taken = True
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


def _read_invitation(args: argparse.Namespace) -> bytes:
    """The registration token (REG-5): --token-file, --token (warned) or KEYMGMT_INVITATION."""
    if args.token_file is not None:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip().encode()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the invitation file {args.token_file}: {exc}") from None
    if args.token is not None:
        print(
            "keymgmt: warning: --token puts the invitation in the process list and shell history; "
            "use --token-file or KEYMGMT_INVITATION",
            file=sys.stderr,
        )
        return str(args.token).strip().encode()
    return os.environ.get("KEYMGMT_INVITATION", "").strip().encode()


def _read_password(args: argparse.Namespace, confirm: bool) -> bytes:
    stdin_taken = getattr(args, "stdin_taken", False)
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as file:
                password = file.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the password file {args.password_file}: {exc}") from None
    elif args.password_stdin and stdin_taken:
        raise UsageError("the secret comes from stdin; give the password with --password-file")
    elif args.password_stdin or (not sys.stdin.isatty() and not stdin_taken):
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        again = getpass.getpass("password again: ") if confirm else password
        if not hmac.compare_digest(again.encode("utf-8"), password.encode("utf-8")):
            raise UsageError("the passwords do not match")
    if not password:
        raise UsageError("the password is empty")
    return password.encode("utf-8")


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


async def _session_command(args: argparse.Namespace, session: KeySession) -> None:
    command = args.command
    if command == "generate":
        print((await session.generate()).hex())
    elif command == "import":
        print((await session.import_secret(args.portable_secret)).hex())
    elif command in ("retrieve", "export"):
        context = CONTEXTS[args.context] if command == "retrieve" else Context.EXPORT
        result = await session.retrieve(_key_id(args.key_id), context)
        print("ok" if result is None else result.hex())
    elif command == "list":
        keys = await session.list_keys()
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "key_id": k.key_id.hex(),
                            "kind": k.kind.name.lower(),
                            "created": _format_time(k.created),
                        }
                        for k in keys
                    ],
                    indent=2,
                )
            )
        else:
            print(f"{'key id':32}  {'kind':9}  created (UTC)")
            for k in keys:
                print(f"{k.key_id.hex():32}  {k.kind.name.lower():9}  {_format_time(k.created)}")
    elif command == "delete":
        await session.delete(_key_id(args.key_id))
        print("deleted")
    elif command == "audit":
        key_ids = [_key_id(k) for k in args.key]
        entries = await session.audit(AUDIT_TYPES[args.type], key_ids, _time(args.after), _time(args.before))
        print(audit_to_json(entries, session.user_id) if args.json else _audit_table(entries))
    elif command == "logout":
        print("logged out")


async def _run(args: argparse.Namespace) -> None:
    if not args.account:
        raise UsageError("--account (or KEYMGMT_ACCOUNT) is required")
    if args.command == "register":
        args.invitation = _read_invitation(args)
    if args.command == "import":  # local input first: bad input costs no connection, no login
        args.portable_secret = _read_import_secret(args)
        if args.password_stdin and getattr(args, "stdin_taken", False):
            raise UsageError("the secret comes from stdin; give the password with --password-file")
    account = args.account.encode("utf-8")
    host, sep, port_text = args.server.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"--server must be HOST:PORT, not {args.server!r}")
    connect: Callable[[], Awaitable[object]] = tls_connector(
        host.strip("[]"), int(port_text), cafile=args.ca, server_hostname=args.server_name
    )
    local_path: Path = args.local_store
    local_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    local = LocalStore(local_path)
    try:
        async with KeymgmtClient(connect, local_store=local, reconnect_attempts=2) as client:  # type: ignore[arg-type]
            # Connected first, so an unreachable server is reported before asking for a password.
            password = _read_password(args, confirm=args.command == "register")
            if args.command == "register":
                user_id = await client.register(account, password, invitation=args.invitation)
                print(f"registered {args.account} (user id {user_id.hex()})")
                return
            session = await client.login(account, password)
            try:
                await _session_command(args, session)
            finally:
                await session.logout()
    finally:
        local.close()


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, RegistrationError) and exc.code is ErrorCode.INVALID_ACCOUNT_NAME:
        return 5
    for kind in type(exc).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind]
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        try:
            anyio.run(_run, args, backend=args.backend)
        except BaseExceptionGroup as group:
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
    except UsageError as exc:
        print(f"keymgmt: error: {exc}", file=sys.stderr)
        return 2
    except (KeymgmtError, PKIError, LocalStoreError) as exc:
        print(f"keymgmt: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("keymgmt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `keymgmt audit | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        print(f"keymgmt: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
