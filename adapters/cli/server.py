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
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from ..files import ensure_private_file
from ..server.config import ConfigError, check_workers, load_settings, options_help, render_config
from ..server.invitations import InvitationAuthorizer
from ..server.runtime import KeyServerRuntime, ServerSettings, open_storage
from ..server.setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from ..server.workers import WorkerPool, bind_listeners
from ..storage.base import StorageError
from ..tls import PKIError, generate_dev_pki, server_context

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
    serve.add_argument(
        "--workers",
        metavar="N",
        help="server processes sharing the port, 1 to 64 (overrides server.workers; see the README, Workers)",
    )
    # A worker started by `serve --workers N`: serve on this inherited listening socket.
    serve.add_argument("--listen-fd", type=int, action="append", default=[], help=argparse.SUPPRESS)
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
    wait = sub.add_parser(
        "wait",
        help="wait until the configured key server accepts connections",
        description="Wait until the server of the config file accepts TCP connections on its port "
        "(after `serve ... &` in a script), then exit 0; exit 1 with one line if it does not within "
        "--timeout. It connects and closes without TLS, which the server logs at DEBUG only.",
        epilog="example:\n  keymgmt-server serve --config srv/keymgmt-server.toml 2>srv/server.log &\n"
        "  keymgmt-server wait --config srv/keymgmt-server.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wait.add_argument("--config", type=Path, help=f"TOML config file (as written by init: {CONFIG_NAME})")
    wait.add_argument("--timeout", default="30", help="how long to wait, in seconds (default 30)")
    return parser


def _wait(args: argparse.Namespace) -> int:
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout <= 3600:  # (also false for nan)
        raise ConfigError(f"--timeout {args.timeout!r} is not a number of seconds from 0 to 3600")
    settings = load_settings(args.config)
    if settings.port == 0:
        raise ConfigError("the config says port 0 (a free port picked at start): wait needs a fixed port")
    # a wildcard listen address is reached on loopback
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
    host = wildcard.get(settings.host, settings.host)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, settings.port), timeout=1.0):
                return 0
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"no key server accepted connections on {host}:{settings.port} within {timeout:g} s "
                    f"({exc.strerror or exc})"
                ) from None
            time.sleep(0.1)


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


async def _serve_worker(runtime: KeyServerRuntime) -> None:
    """A worker of ``serve --workers``: serve like ``serve_until_signal``, but take every
    further SIGTERM/SIGINT calmly (the parent and a service manager may both send one) and
    shut down if the parent that supervises this worker is gone."""
    log = logging.getLogger("keymgmt.server")
    parent = os.getppid()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def serve(*, task_status: TaskStatus[int]) -> None:
                try:
                    await runtime.run(task_status=task_status)
                finally:
                    tg.cancel_scope.cancel()  # stopped: stop watching

            async def watch_signals() -> None:
                async for received in signals:
                    log.info("received %s", signal.Signals(received).name)
                    runtime.shutdown()

            async def watch_parent() -> None:
                while os.getppid() == parent:
                    await anyio.sleep(1.0)
                log.warning("the supervising process is gone: shutting down")
                runtime.shutdown()

            port = await tg.start(serve)
            tg.start_soon(watch_signals)
            tg.start_soon(watch_parent)
            print(f"listening on {runtime.settings.host}:{port}", flush=True)


def _worker_command(args: argparse.Namespace) -> list[str]:
    config = ["--config", str(args.config.resolve())] if args.config is not None else []
    return [
        sys.executable,
        "-m",
        "keymgmt.adapters.cli.server",
        "serve",
        *config,
        "--log-level",
        args.log_level,
    ]


def _serve_workers(args: argparse.Namespace, settings: ServerSettings) -> int:
    """The parent of ``serve --workers N``: check what every worker will load (one error
    here instead of N), migrate the database once, bind, start and supervise."""
    load_server_setup_file(settings.setup_path)
    server_context(settings.cert_path, settings.key_path)
    open_storage(settings).close()
    sockets = bind_listeners(settings.host, settings.port)
    port = sockets[0].getsockname()[1]
    command = _worker_command(args)
    pool = WorkerPool(
        settings.workers,
        lambda fds: [*command, *(f"--listen-fd={fd}" for fd in fds)],
        sockets,
        stop_timeout=settings.shutdown_grace + 20.0,
    )
    return pool.run(announce=lambda: print(f"listening on {settings.host}:{port}", flush=True))


def _run(serve: Callable[[KeyServerRuntime], Awaitable[None]], runtime: KeyServerRuntime) -> None:
    try:
        anyio.run(serve, runtime)
    except BaseExceptionGroup as group:
        raise _leaf(group) from None


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
        if args.command == "wait":
            return _wait(args)
        settings = load_settings(args.config)
        if args.workers is not None:
            settings = replace(settings, workers=check_workers(args.workers, "--workers"))
        several = settings.workers > 1 or bool(args.listen_fd)
        logging.basicConfig(
            level=args.log_level,
            # With workers, each line names the process that wrote it.
            format=f"%(asctime)s %(levelname)s %(name)s{'[%(process)d]' if several else ''}: %(message)s",
            stream=sys.stderr,
        )
        if args.listen_fd:
            sockets = [socket.socket(fileno=fd) for fd in args.listen_fd]
            _run(_serve_worker, KeyServerRuntime(settings, sockets=sockets))
            return 0
        if settings.workers > 1:
            return _serve_workers(args, settings)
        _run(serve_until_signal, KeyServerRuntime(settings))
        return 0
    except (ConfigError, SetupFileError, PKIError, StorageError) as exc:
        print(f"keymgmt-server: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"keymgmt-server: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
