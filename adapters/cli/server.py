"""``keymgmt-server``: create a key server's files once (``init``), then ``serve``;
``invite``, ``backup`` and ``init --renew-cert`` for its operator.

Exit codes: 0 success (and after a graceful SIGTERM/SIGINT shutdown), 1 a
runtime or configuration error (one line on stderr), 2 a usage error (one line).
SIGHUP makes a running server load its TLS certificate and key again.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import anyio
from anyio.abc import TaskStatus

from ..files import ensure_private_file
from ..server.app import default_account_name_policy
from ..server.config import (
    ConfigError,
    check_listen,
    check_workers,
    load_settings,
    options_help,
    render_config,
)
from ..server.invitations import InvitationAuthorizer
from ..server.logs import LOG_FORMATS, JSONFormatter, configure_logging
from ..server.runtime import KeyServerRuntime, ServerSettings, open_storage
from ..server.setupfile import SetupFileError, create_server_setup_file, load_server_setup_file
from ..server.workers import WorkerPool, bind_listeners
from ..storage.base import StorageError
from ..tls import PKIError, generate_dev_pki, renew_server_certificate, server_context

__all__ = ["check_ports", "main", "serve_until_signal"]

CONFIG_NAME = "keymgmt-server.toml"
#: Where `init` writes without --dir; the other commands read its config file from there
#: when neither --config nor KEYMGMT_CONFIG names one.
DEFAULT_DIR = Path("keymgmt-server")


def default_config(env: dict[str, str] | os._Environ[str] = os.environ) -> Path | None:
    """The config file a command uses without --config: KEYMGMT_CONFIG, else the one `init`
    writes by default (keymgmt-server/keymgmt-server.toml) if it exists, else none (defaults)."""
    named = env.get("KEYMGMT_CONFIG")
    if named:
        return Path(named)
    path = DEFAULT_DIR / CONFIG_NAME
    return path if path.is_file() else None


BACKENDS = ("asyncio", "trio")
#: Set by ``serve --workers`` for each worker: its number (0, 1, ...), which offsets its
#: health listener's port.
WORKER_NUMBER_ENV = "KEYMGMT_WORKER_NUMBER"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"keymgmt-server: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return importlib.metadata.version("keymgmt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


CONFIG_HELP = (
    f"TOML config file (as written by init). Default: $KEYMGMT_CONFIG, else {DEFAULT_DIR / CONFIG_NAME} "
    "if it exists, else the built-in defaults (paths relative to the working directory)"
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keymgmt-server",
        description="Key server for keymgmt: OPAQUE logins, end-to-end encrypted secrets, TLS 1.3.",
    )
    parser.add_argument("--version", action="version", version=f"keymgmt-server {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init",
        help="create the OPAQUE server setup, a development PKI and a config file",
        description="Create, in DIR: server_setup.bin (the long-term OPAQUE secret, 0600; never "
        "overwritten), a development CA and server certificate (ca.pem, server.pem, server.key) "
        f"and {CONFIG_NAME}. Production deployments replace the certificates with their own PKI.",
        epilog="examples:\n  keymgmt-server init --dir srv\n"
        "  keymgmt-server init --dir srv --hostname keys.example.org --port 7443\n"
        "  keymgmt-server init --dir srv --renew-cert",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"folder to create files in (default {DEFAULT_DIR})"
    )
    init.add_argument(
        "--hostname",
        action="append",
        help="host name or IP the certificate is valid for (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    init.add_argument("--port", type=_port, default=7443, help="port written into the config file")
    init.add_argument(
        "--renew-cert",
        action="store_true",
        help="only issue a new server certificate and key from the development CA in DIR "
        "(keeps the CA, the setup file and the config; names from --hostname or the old certificate)",
    )
    serve = sub.add_parser(
        "serve",
        help="run the key server",
        description="Run the key server until SIGTERM or SIGINT, then shut down gracefully.",
        epilog="examples:\n  keymgmt-server serve --config srv/keymgmt-server.toml\n"
        "  keymgmt-server serve --config srv/keymgmt-server.toml --workers 4 --health-listen 9464 "
        "--log-format json\n\n" + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, help=CONFIG_HELP)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (timestamps in UTC either way)",
    )
    serve.add_argument(
        "--health-listen",
        metavar="[HOST:]PORT",
        help="serve /healthz and /metrics over plain HTTP there (overrides server.health_listen; "
        "host 127.0.0.1 unless given)",
    )
    serve.add_argument(
        "--backend",
        default=None,
        help="event loop: asyncio (default) or trio (needs the trio package); env KEYMGMT_BACKEND",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="server processes sharing the port, 1 to 64 (overrides server.workers; see the README, Workers)",
    )
    # A worker started by `serve --workers N`: serve on this inherited listening socket.
    serve.add_argument("--listen-fd", type=int, action="append", default=[], help=argparse.SUPPRESS)
    # ... and on this inherited WebSocket listening socket (websocket.listen).
    serve.add_argument("--websocket-fd", type=int, action="append", default=[], help=argparse.SUPPRESS)
    backup = sub.add_parser(
        "backup",
        help="copy the SQLite database to a new file, also while the server runs",
        description="Copy the server's SQLite database (server.storage) to FILE with SQLite's online "
        "backup API: a consistent copy, also while the server runs, WAL included. FILE is created "
        "0600 and never overwritten. PostgreSQL deployments use pg_dump instead; back up "
        "server_setup.bin as well (see docs/operations.md, Backups).",
        epilog="example: keymgmt-server backup --config srv/keymgmt-server.toml --to keyserver-backup.db",
    )
    backup.add_argument("--config", type=Path, help=CONFIG_HELP)
    backup.add_argument("--to", type=Path, required=True, metavar="FILE", help="the new backup file")
    invite = sub.add_parser(
        "invite",
        help="print an invitation to register (for registration.require_invitation)",
        description="Print an invitation that lets a client register (REG-5): keymgmt register "
        "--token-file FILE, or KEYMGMT_INVITATION. It is signed with a key derived from the "
        "server's OPAQUE setup, so every instance sharing the setup accepts it. With --account "
        "it registers that name only (so it works once); without, any name until it expires.",
        epilog="examples:\n"
        "  keymgmt-server invite --config srv/keymgmt-server.toml --account alice@example.org "
        "> invitation.txt\n"
        "  keymgmt-server invite --config srv/keymgmt-server.toml --valid-for 12h",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    invite.add_argument("--config", type=Path, help=CONFIG_HELP)
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
    wait.add_argument("--config", type=Path, help=CONFIG_HELP)
    wait.add_argument("--timeout", default="30", help="how long to wait, in seconds (default 30)")
    return parser


def _port(text: str) -> int:
    if not text.isdecimal() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0 to 65535)")
    return int(text)


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
    if args.account is not None:
        try:
            name: bytes | None = args.account.encode("utf-8")
        except UnicodeEncodeError:
            name = None
        if name is None or not default_account_name_policy(name):
            print(
                f"keymgmt-server: error: --account {args.account!r} can never be registered: an account "
                "name is printable UTF-8 without surrounding spaces, 1 to 255 bytes "
                "(see keymgmt-server invite --help)",
                file=sys.stderr,
            )
            return 2
    valid_for = _duration(args.valid_for)
    settings = load_settings(args.config)
    authorizer = InvitationAuthorizer.from_setup(load_server_setup_file(settings.setup_path))
    account = args.account.encode("utf-8") if args.account is not None else None
    print(authorizer.mint(account, valid_for, time.time(), os.urandom))
    return 0


def _renew(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    hostnames = tuple(args.hostname) if args.hostname else None
    cert = renew_server_certificate(directory, hostnames)
    print(f"renewed {directory / 'server.pem'} and {directory / 'server.key'}")
    print(f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    print("a running server uses it for new connections after SIGHUP (kill -HUP PID)")
    return 0


def _backup(args: argparse.Namespace) -> int:
    """SQLite's online backup of the server's database into a new 0600 file.

    The copy is written into a fresh 0700 directory next to the target (nobody else can
    reach it there) and then hard-linked into place, which fails rather than overwrite
    anything that appeared at the target meanwhile: no path is ever reopened by name where
    others could swap it. The source is opened read-only (``mode=ro``), so backing up a
    stopped server's database never checkpoints its WAL."""
    settings = load_settings(args.config)
    if settings.database_url:
        raise ConfigError(
            "this server stores its data in PostgreSQL: back it up with pg_dump (docs/operations.md)"
        )
    source, target = settings.storage_path, Path(args.to)
    if not source.exists():
        raise ConfigError(f"{source} does not exist (server.storage)")
    if os.path.lexists(target):
        raise ConfigError(f"{target} already exists; refusing to overwrite it")
    try:
        private = Path(tempfile.mkdtemp(prefix=".keymgmt-backup-", dir=target.parent))  # 0700
    except OSError as exc:
        raise ConfigError(f"cannot create {target}: {exc.strerror}") from None
    try:
        copy = private / "backup.db"
        os.close(os.open(copy, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        try:
            read_only = f"{source.resolve().as_uri()}?mode=ro"
            with (
                _closing(sqlite3.connect(read_only, uri=True, timeout=30)) as src,
                _closing(sqlite3.connect(copy)) as dst,
            ):
                src.backup(dst)  # one step: a consistent snapshot (WAL readers do not block writers)
                dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
                check = dst.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise ConfigError(f"the backup of {source} does not check out: {check}")
        except sqlite3.Error as exc:
            raise ConfigError(f"backup of {source} failed: {exc}") from None
        size = copy.stat().st_size
        try:
            os.link(copy, target)  # never replaces an existing name
        except FileExistsError:
            raise ConfigError(f"{target} already exists; refusing to overwrite it") from None
        except OSError as exc:
            raise ConfigError(f"cannot create {target}: {exc.strerror}") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    print(f"backed up {source} to {target} ({size} bytes)")
    print("keep server_setup.bin with it: without that file nobody can log in")
    return 0


class _closing:
    """Close a SQLite connection on leaving (sqlite3's own context manager only commits)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.close()


def _init(args: argparse.Namespace) -> int:
    if args.renew_cert:
        return _renew(args)
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
    print(f"created {pki.ca_key} (the CA's key, keep it secret: init --renew-cert uses it)")
    print(f"created {pki.server_cert} and {pki.server_key}")
    print(f"created {config}")
    print(f"next: keymgmt-server serve --config {config}")
    return 0


async def serve_until_signal(runtime: KeyServerRuntime) -> None:
    """Run ``runtime``, print "listening on HOST:PORT", shut down gracefully on SIGTERM/SIGINT
    (a second one ends ``server.shutdown_delay`` at once); on SIGHUP load the TLS certificate
    and key again."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def serve(*, task_status: TaskStatus[int]) -> None:
                # Not in a finally: cancelling here would swallow an error raised at start.
                await runtime.run(task_status=task_status)
                tg.cancel_scope.cancel()  # stopped: stop watching the signals

            port = await tg.start(serve)
            print(f"listening on {runtime.settings.host}:{port}", flush=True)
            async for received in signals:
                logging.getLogger("keymgmt.server").info("received %s", signal.Signals(received).name)
                if received == signal.SIGHUP:
                    runtime.reload_tls()
                else:
                    runtime.shutdown()


async def _serve_worker(runtime: KeyServerRuntime) -> None:
    """A worker of ``serve --workers``: serve like ``serve_until_signal``, but take every
    further SIGTERM/SIGINT calmly (the parent and a service manager may both send one) and
    shut down if the parent that supervises this worker is gone."""
    log = logging.getLogger("keymgmt.server")
    parent = os.getppid()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def serve(*, task_status: TaskStatus[int]) -> None:
                # Not in a finally: cancelling here would swallow an error raised at start
                # (the worker exited 0 and its cause was lost).
                await runtime.run(task_status=task_status)
                tg.cancel_scope.cancel()  # stopped: stop watching

            async def watch_signals() -> None:
                async for received in signals:
                    log.info("received %s", signal.Signals(received).name)
                    if received == signal.SIGHUP:
                        runtime.reload_tls()
                    else:
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


def _worker_command(args: argparse.Namespace, backend: str) -> list[str]:
    config = ["--config", str(args.config.resolve())] if args.config is not None else []
    health = ["--health-listen", args.health_listen] if args.health_listen is not None else []
    return [
        sys.executable,
        "-m",
        "keymgmt.adapters.cli.server",
        "serve",
        *config,
        *health,
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
        "--backend",
        backend,
    ]


def _serve_workers(args: argparse.Namespace, settings: ServerSettings, backend: str) -> int:
    """The parent of ``serve --workers N``: check what every worker will load (one error
    here instead of N), migrate the database once, bind, start and supervise."""
    if settings.health_listen is not None and settings.health_listen[1]:
        last = settings.health_listen[1] + settings.workers - 1
        if last > 65535:
            raise ConfigError(f"health ports {settings.health_listen[1]}..{last} (one per worker) pass 65535")
    load_server_setup_file(settings.setup_path)
    server_context(settings.cert_path, settings.key_path)
    open_storage(settings).close()
    try:
        sockets = bind_listeners(settings.host, settings.port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OSError(exc.errno, f"TLS listener {settings.host}:{settings.port}: {why}") from None
    websocket: list[socket.socket] = []
    if settings.websocket_listen is not None:
        ws_host, ws_port = settings.websocket_listen
        try:
            websocket = bind_listeners(ws_host, ws_port)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            why = exc.strerror or str(exc)
            raise OSError(exc.errno, f"WebSocket listener {ws_host}:{ws_port}: {why}") from None
    port = sockets[0].getsockname()[1]
    command = _worker_command(args, backend)
    tls_fds = {s.fileno() for s in sockets}
    pool = WorkerPool(
        settings.workers,
        lambda fds: [
            *command,
            *(f"--listen-fd={fd}" if fd in tls_fds else f"--websocket-fd={fd}" for fd in fds),
        ],
        [*sockets, *websocket],
        stop_timeout=settings.shutdown_delay + settings.shutdown_grace + 20.0,
    )
    return pool.run(announce=lambda: print(f"listening on {settings.host}:{port}", flush=True))


_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - compared, not bound


def check_ports(settings: ServerSettings) -> None:
    """A ConfigError if a health port (worker K's: the given port + K) is the TLS port or the
    WebSocket port, or the WebSocket port is the TLS port, on an address both listen on:
    caught here, with both named, instead of a worker failing."""
    if settings.websocket_listen is not None and settings.websocket_listen[1]:
        ws_host, ws_port = settings.websocket_listen
        overlap = ws_host == settings.host or ws_host in _WILDCARDS or settings.host in _WILDCARDS
        if overlap and ws_port == settings.port:
            raise ConfigError(
                f"websocket.listen's port {ws_port} is the TLS port (server.port): pick another port"
            )
        if settings.health_listen is not None and settings.health_listen[1]:
            host, first = settings.health_listen
            last = first + settings.workers - 1
            overlap = host == ws_host or host in _WILDCARDS or ws_host in _WILDCARDS
            if overlap and first <= ws_port <= last:
                raise ConfigError(
                    f"the health listener's port(s) {first}..{last} include the WebSocket port {ws_port} "
                    "(websocket.listen): pick a health port outside it"
                )
    if settings.health_listen is None or not settings.health_listen[1] or not settings.port:
        return
    host, first = settings.health_listen
    last = first + settings.workers - 1
    overlap = host == settings.host or host in _WILDCARDS or settings.host in _WILDCARDS
    if overlap and first <= settings.port <= last:
        ports = f"port {first}" if first == last else f"ports {first}..{last} (one per worker)"
        raise ConfigError(
            f"the health listener's {ports} include the TLS port {settings.port} (server.port): "
            "pick a health port outside it"
        )


def _backend(args: argparse.Namespace) -> str:
    """The event loop asked for (--backend, else KEYMGMT_BACKEND, else asyncio), checked."""
    backend = args.backend if args.backend is not None else os.environ.get("KEYMGMT_BACKEND", "asyncio")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} (--backend or KEYMGMT_BACKEND): asyncio or trio")
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        raise ConfigError("the trio backend needs the trio package: pip install 'keymgmt[trio]'")
    return backend


def _worker_settings(settings: ServerSettings) -> ServerSettings:
    """A worker of ``serve --workers``: worker K's health listener is on the given port + K
    (port 0: a free port each; every worker logs its own)."""
    number = os.environ.get(WORKER_NUMBER_ENV, "0")
    if settings.health_listen is None or not settings.health_listen[1] or not number.isdecimal():
        return settings
    host, port = settings.health_listen
    return replace(settings, health_listen=(host, port + int(number)))


def _run(
    serve: Callable[[KeyServerRuntime], Awaitable[None]], runtime: KeyServerRuntime, backend: str = "asyncio"
) -> None:
    try:
        anyio.run(serve, runtime, backend=backend)
    except BaseExceptionGroup as group:
        raise _leaf(group) from None


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real exception inside (nested) task-group exception groups."""
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "config", False) is None:
        args.config = default_config()
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "invite":
            return _invite(args)
        if args.command == "backup":
            return _backup(args)
        if args.command == "wait":
            return _wait(args)
        settings = load_settings(args.config)
        if args.workers is not None:
            settings = replace(settings, workers=check_workers(args.workers, "--workers"))
        if args.health_listen is not None:
            settings = replace(settings, health_listen=check_listen(args.health_listen, "--health-listen"))
        check_ports(settings)
        backend = _backend(args)
        several = settings.workers > 1 or bool(args.listen_fd)
        # With workers, each line names the process that wrote it.
        configure_logging(args.log_level, args.log_format, sys.stderr, with_process=several)
        if args.listen_fd:
            sockets = [socket.socket(fileno=fd) for fd in args.listen_fd]
            ws_sockets = [socket.socket(fileno=fd) for fd in args.websocket_fd]
            runtime = KeyServerRuntime(
                _worker_settings(settings), sockets=sockets, websocket_sockets=ws_sockets
            )
            _run(_serve_worker, runtime, backend)
            return 0
        if settings.workers > 1:
            return _serve_workers(args, settings, backend)
        _run(serve_until_signal, KeyServerRuntime(settings), backend)
        return 0
    except (ConfigError, SetupFileError, PKIError, StorageError) as exc:
        return _fatal(args, str(exc))
    except ModuleNotFoundError as exc:  # an optional dependency (psycopg for database_url)
        return _fatal(args, _missing(exc))
    except OSError as exc:
        return _fatal(args, exc.strerror or str(exc))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place
        print("keymgmt-server: interrupted", file=sys.stderr)
        return 130


def _fatal(args: argparse.Namespace, message: str) -> int:
    """Report an error that stops the command, as one line; 1. A worker of ``serve --workers``
    writes it to its stdout, where the parent reads it and logs it as the cause; with
    ``--log-format json`` it is a JSON log line like the others."""
    if getattr(args, "listen_fd", None):
        print(f"error: {message}", flush=True)
    elif getattr(args, "log_format", "text") == "json":
        record = logging.LogRecord("keymgmt-server", logging.ERROR, __file__, 0, "%s", (message,), None)
        print(JSONFormatter().format(record), file=sys.stderr)
    else:
        print(f"keymgmt-server: error: {message}", file=sys.stderr)
    return 1


def _missing(exc: ModuleNotFoundError) -> str:
    name = (exc.name or "").split(".")[0]
    if name in ("psycopg", "psycopg_pool"):
        return f"server.database_url needs the {name} package: pip install 'keymgmt[postgres]'"
    return f"a module this needs is not installed: {exc.name}"


if __name__ == "__main__":
    sys.exit(main())
