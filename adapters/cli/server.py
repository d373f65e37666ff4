"""``keymgmt-server``: create a key server's files once (``init``), then ``serve``.

Exit codes: 0 success (and after a graceful SIGTERM/SIGINT shutdown), 1 a
runtime or configuration error (one line on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import anyio

from ..files import ensure_private_file
from ..server.config import ConfigError, load_settings, options_help, render_config
from ..server.invitations import InvitationAuthorizer
from ..server.runtime import KeyServerRuntime
from ..server.setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from ..storage.base import StorageError
from ..tls import PKIError, generate_dev_pki

__all__ = ["main", "serve_until_signal"]

CONFIG_NAME = "keymgmt-server.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keymgmt-server",
        description="Key server for keymgmt: OPAQUE logins, end-to-end encrypted secrets, TLS 1.3.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init",
        help="create the OPAQUE server setup, a development PKI and a config file",
        description="Create, in DIR: server_setup.bin (the long-term OPAQUE secret, 0600; never "
        "overwritten), a development CA and server certificate (ca.pem, server.pem, server.key) "
        f"and {CONFIG_NAME}. Production deployments replace the certificates with their own PKI.",
    )
    init.add_argument("--dir", type=Path, default=Path("keymgmt-server"), help="folder to create files in")
    init.add_argument(
        "--hostname",
        action="append",
        help="host name or IP the certificate is valid for (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    init.add_argument("--port", type=int, default=7443, help="port written into the config file")
    serve = sub.add_parser(
        "serve",
        help="run the key server",
        description="Run the key server until SIGTERM or SIGINT, then shut down gracefully.",
        epilog=options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, help=f"TOML config file (as written by init: {CONFIG_NAME})")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    invite = sub.add_parser(
        "invite",
        help="print an invitation to register (for registration.require_invitation)",
        description="Print an invitation that lets a client register (REG-5): keymgmt register "
        "--token-file FILE, or KEYMGMT_INVITATION. It is signed with a key derived from the "
        "server's OPAQUE setup, so every instance sharing the setup accepts it. With --account "
        "it registers that name only (so it works once); without, any name until it expires.",
    )
    invite.add_argument("--config", type=Path, help=f"TOML config file (as written by init: {CONFIG_NAME})")
    invite.add_argument("--account", help="the only account name the invitation registers")
    invite.add_argument(
        "--valid-for", default="7d", help="how long it is valid: seconds, or a number with s, m, h or d"
    )
    return parser


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_VALIDITY = 10 * 365 * 86400


def _duration(text: str) -> float:
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = math.nan
    if not 0 < value <= _MAX_VALIDITY:  # (also false for nan)
        raise ConfigError(
            f"--valid-for {text!r} is not a duration from 1 s to 10 years (e.g. 3600, 90m, 12h, 7d)"
        )
    return value


def _invite(args: argparse.Namespace) -> int:
    valid_for = _duration(args.valid_for)
    settings = load_settings(args.config)
    authorizer = InvitationAuthorizer.from_setup(load_server_setup_file(settings.setup_path))
    account = args.account.encode("utf-8") if args.account is not None else None
    print(authorizer.mint(account, valid_for, time.time(), os.urandom))
    return 0


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / CONFIG_NAME
    if config.exists():
        raise ConfigError(f"{config} already exists; refusing to overwrite it")
    create_server_setup_file(directory / "server_setup.bin")
    hostnames = tuple(args.hostname) if args.hostname else ("localhost", "127.0.0.1", "::1")
    pki = generate_dev_pki(directory, hostnames)
    ensure_private_file(config, ConfigError)
    config.write_text(render_config({"server.port": args.port}))
    print(f"created {directory / 'server_setup.bin'} (OPAQUE server setup, keep it secret)")
    print(f"created {pki.ca_cert} (development CA: give it to clients with --ca)")
    print(f"created {pki.server_cert} and {pki.server_key}")
    print(f"created {config}")
    print(f"next: keymgmt-server serve --config {config}")
    return 0


async def serve_until_signal(runtime: KeyServerRuntime) -> None:
    """Run ``runtime``, print "listening on HOST:PORT", shut down gracefully on SIGTERM/SIGINT."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(runtime.run)
        print(f"listening on {runtime.settings.host}:{port}", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                logging.getLogger("keymgmt.server").info("received %s", signal.Signals(received).name)
                runtime.shutdown()
                break


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real exception inside (nested) task-group exception groups."""
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "invite":
            return _invite(args)
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        settings = load_settings(args.config)
        runtime = KeyServerRuntime(settings)
        try:
            anyio.run(serve_until_signal, runtime)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
        return 0
    except (ConfigError, SetupFileError, PKIError, StorageError) as exc:
        print(f"keymgmt-server: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"keymgmt-server: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
