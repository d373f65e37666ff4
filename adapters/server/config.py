"""``keymgmt-server`` configuration: a TOML file, overridden by environment variables.

Every option is declared once in :data:`OPTIONS` (section, key, type, default,
environment variable, help); the ``--help`` text and the file ``init`` writes
come from the same list, and a test checks that the README's table names every
option. Relative paths are resolved against the config file's folder (see
docs/operations.md, *Configuration*, for the layering and the checks).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keymgmt_proto import DEFAULT_MAX_PAYLOAD, ServerConfig

from .app import ThrottlePolicy
from .metrics import parse_listen
from .runtime import ServerSettings
from .userrate import DEFAULT_USER_BURST, DEFAULT_USER_RATE
from .websocket import normalize_origin

__all__ = [
    "MAX_WORKERS",
    "MIN_MAX_PAYLOAD",
    "MIN_WORKERS",
    "OPTIONS",
    "ConfigError",
    "Option",
    "check_listen",
    "check_origins",
    "check_workers",
    "load_settings",
    "options_help",
    "render_config",
]

#: The smallest ``sessions.max_payload``: the core refuses less (a login's frames would not
#: fit), so a smaller value would start a server that fails every connection.
MIN_MAX_PAYLOAD = 1024

#: ``server.workers`` / ``--workers``: how many server processes may share the port.
MIN_WORKERS = 1
MAX_WORKERS = 64


class ConfigError(Exception):
    """The configuration is missing, malformed or out of range."""


@dataclass(frozen=True, slots=True)
class Option:
    section: str
    key: str
    kind: type
    default: object
    env: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("server", "host", str, "127.0.0.1", "KEYMGMT_HOST", "address to listen on"),
    Option("server", "port", int, 7443, "KEYMGMT_PORT", "TCP port (0 picks a free one)"),
    Option(
        "server",
        "workers",
        int,
        1,
        "KEYMGMT_WORKERS",
        f"server processes sharing the port ({MIN_WORKERS}..{MAX_WORKERS}; 1 = no extra process)",
    ),
    Option(
        "server",
        "health_listen",
        str,
        "",
        "KEYMGMT_HEALTH_LISTEN",
        "[HOST:]PORT of the plain-HTTP /healthz and /metrics listener (host 127.0.0.1); empty: off",
    ),
    Option("server", "storage", Path, "keyserver.db", "KEYMGMT_STORAGE", "SQLite database file"),
    Option(
        "server",
        "database_url",
        str,
        "",
        "KEYMGMT_DATABASE_URL",
        "PostgreSQL connection string; set it to use PostgreSQL instead of SQLite",
    ),
    Option(
        "server",
        "database_schema",
        str,
        "keymgmt",
        "KEYMGMT_DATABASE_SCHEMA",
        "PostgreSQL schema for the tables (one per deployment)",
    ),
    Option("server", "setup", Path, "server_setup.bin", "KEYMGMT_SETUP", "OPAQUE server setup file (init)"),
    Option("server", "tls_cert", Path, "server.pem", "KEYMGMT_TLS_CERT", "server certificate chain (PEM)"),
    Option("server", "tls_key", Path, "server.key", "KEYMGMT_TLS_KEY", "server private key (PEM, 0600)"),
    Option(
        "server",
        "tls_handshake_timeout",
        float,
        10.0,
        "KEYMGMT_TLS_HANDSHAKE_TIMEOUT",
        "seconds allowed for the TLS handshake",
    ),
    Option("server", "max_connections", int, 1000, "KEYMGMT_MAX_CONNECTIONS", "open connections at most"),
    Option(
        "server",
        "max_connections_per_address",
        int,
        64,
        "KEYMGMT_MAX_CONNECTIONS_PER_ADDRESS",
        "open connections from one client address (IPv6: one /64) at most",
    ),
    Option(
        "server",
        "connection_idle_timeout",
        float,
        10.0,
        "KEYMGMT_CONNECTION_IDLE_TIMEOUT",
        "seconds a connection may carry no session before it is closed",
    ),
    Option(
        "server",
        "frame_timeout",
        float,
        10.0,
        "KEYMGMT_FRAME_TIMEOUT",
        "seconds a frame may take to arrive whole",
    ),
    Option(
        "server",
        "send_timeout",
        float,
        30.0,
        "KEYMGMT_SEND_TIMEOUT",
        "seconds a peer may leave what the server sends unread (answers, WebSocket control "
        "frames) before its connection is dropped",
    ),
    Option(
        "server",
        "unproductive_burst",
        int,
        1024,
        "KEYMGMT_UNPRODUCTIVE_BURST",
        "units of input that does nothing (ignored frames, small TLS records and WebSocket "
        "frames, pings) a connection may send at once; past them: GOAWAY(LIMIT_EXCEEDED)",
    ),
    Option(
        "server",
        "unproductive_rate",
        float,
        64.0,
        "KEYMGMT_UNPRODUCTIVE_RATE",
        "units of that budget a connection regains per second",
    ),
    Option(
        "server",
        "shutdown_grace",
        float,
        10.0,
        "KEYMGMT_SHUTDOWN_GRACE",
        "seconds shutdown waits for connections to finish",
    ),
    Option(
        "server",
        "shutdown_delay",
        float,
        0.0,
        "KEYMGMT_SHUTDOWN_DELAY",
        "seconds SIGTERM keeps serving with /healthz at 503 before the graceful stop",
    ),
    Option(
        "sessions",
        "handshake_timeout",
        float,
        30.0,
        "KEYMGMT_HANDSHAKE_TIMEOUT",
        "seconds a registration or login may take",
    ),
    Option(
        "sessions",
        "idle_timeout",
        float,
        300.0,
        "KEYMGMT_IDLE_TIMEOUT",
        "seconds an idle session lives (NET-8)",
    ),
    Option("sessions", "lifetime", float, 3600.0, "KEYMGMT_LIFETIME", "absolute session lifetime (NET-8)"),
    Option(
        "sessions",
        "max_requests",
        int,
        1000,
        "KEYMGMT_MAX_REQUESTS",
        "requests per session; 1 = the spec's strict mode (NET-11)",
    ),
    Option("sessions", "max_in_flight", int, 16, "KEYMGMT_MAX_IN_FLIGHT", "unanswered requests per session"),
    Option(
        "sessions",
        "max_per_connection",
        int,
        256,
        "KEYMGMT_MAX_SESSIONS_PER_CONNECTION",
        "live sessions per connection",
    ),
    Option(
        "sessions",
        "max_payload",
        int,
        DEFAULT_MAX_PAYLOAD,
        "KEYMGMT_MAX_PAYLOAD",
        "largest frame payload in bytes (the default fits a 64 KiB secret)",
    ),
    Option(
        "sessions",
        "max_hot",
        int,
        64,
        "KEYMGMT_MAX_HOT_SESSIONS",
        "sessions whose ciphers stay built; idle ones beyond keep only their keys",
    ),
    Option(
        "sessions",
        "reauth_window",
        float,
        300.0,
        "KEYMGMT_REAUTH_WINDOW",
        "seconds after its login a session may change the password or delete the account",
    ),
    Option(
        "sessions",
        "credentials_check",
        float,
        5.0,
        "KEYMGMT_CREDENTIALS_CHECK",
        "seconds until a session ends whose password changed or account went elsewhere (0: at a request)",
    ),
    Option(
        "throttle",
        "threshold",
        int,
        5,
        "KEYMGMT_THROTTLE_THRESHOLD",
        "failed logins of a name before it is locked for a while (NET-10)",
    ),
    Option("throttle", "base_delay", float, 1.0, "KEYMGMT_THROTTLE_BASE_DELAY", "first wait, seconds"),
    Option("throttle", "growth", float, 2.0, "KEYMGMT_THROTTLE_GROWTH", "factor per further failure"),
    Option("throttle", "max_delay", float, 900.0, "KEYMGMT_THROTTLE_MAX_DELAY", "longest wait, seconds"),
    Option(
        "throttle",
        "forget_after",
        float,
        86400.0,
        "KEYMGMT_THROTTLE_FORGET_AFTER",
        "seconds after its last failed login a name's record is forgotten",
    ),
    Option(
        "throttle",
        "max_records",
        int,
        100_000,
        "KEYMGMT_THROTTLE_MAX_RECORDS",
        "names with a throttling record at most (the least recently used harmless ones go first)",
    ),
    Option(
        "throttle",
        "sweep_interval",
        float,
        60.0,
        "KEYMGMT_THROTTLE_SWEEP_INTERVAL",
        "seconds between sweeps of the throttling records",
    ),
    Option(
        "registration",
        "require_invitation",
        bool,
        False,
        "KEYMGMT_REQUIRE_INVITATION",
        "registration needs an invitation from `keymgmt-server invite` (REG-5)",
    ),
    Option(
        "registration",
        "name_reservation",
        float,
        2_592_000.0,
        "KEYMGMT_NAME_RESERVATION",
        "seconds a deleted account's name stays reserved (30 days)",
    ),
    Option(
        "websocket",
        "listen",
        str,
        "",
        "KEYMGMT_WEBSOCKET_LISTEN",
        "[HOST:]PORT of the wss listener for browsers (host: server.host); empty: off",
    ),
    Option(
        "websocket",
        "allowed_origins",
        list,
        (),
        "KEYMGMT_WEBSOCKET_ALLOWED_ORIGINS",
        "origins (https://host[:port]) whose pages may connect; environment: comma-separated",
    ),
    Option(
        "websocket",
        "upgrade_timeout",
        float,
        10.0,
        "KEYMGMT_WEBSOCKET_UPGRADE_TIMEOUT",
        "seconds the HTTP upgrade request may take after the TLS handshake",
    ),
    Option(
        "admission",
        "rate",
        float,
        20.0,
        "KEYMGMT_ADMISSION_RATE",
        "registrations, logins and resumptions a second from one client address",
    ),
    Option(
        "admission",
        "burst",
        float,
        100.0,
        "KEYMGMT_ADMISSION_BURST",
        "how many of those one address may start at once",
    ),
    Option(
        "requests",
        "per_user_rate",
        float,
        DEFAULT_USER_RATE,
        "KEYMGMT_REQUESTS_PER_USER_RATE",
        "requests a second one user's sessions may make, all together, on one server process; "
        "beyond it they are answered RATE_LIMITED and nothing is done",
    ),
    Option(
        "requests",
        "per_user_burst",
        float,
        DEFAULT_USER_BURST,
        "KEYMGMT_REQUESTS_PER_USER_BURST",
        "how many of those one user may make at once",
    ),
)


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(option: Option, raw: object, origin: str) -> object:
    if option.kind is list:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{origin}: {option.section}.{option.key} must be a list of strings")
        return tuple(i.strip() for i in items if i.strip())
    if option.kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _BOOLEANS:
            return _BOOLEANS[raw.lower()]
        raise ConfigError(f"{origin}: {option.section}.{option.key} must be true or false")
    try:
        if option.kind is Path:
            if not isinstance(raw, str) or not raw:
                raise TypeError
            return Path(raw)
        if option.kind is str:
            if not isinstance(raw, str):
                raise TypeError
            return raw
        if option.kind is int:
            if isinstance(raw, bool):
                raise TypeError
            value = int(raw)  # type: ignore[call-overload]
            if isinstance(raw, float) and raw != value:
                raise TypeError
        else:
            value = float(raw)  # type: ignore[arg-type]
            if not math.isfinite(value):  # nan would disable a limit, inf never fire a deadline
                raise ValueError
        if value < 0:
            raise ValueError
        return value
    except (TypeError, ValueError):
        kind = {
            Path: "a path",
            str: "a string",
            int: "a non-negative integer",
            float: "a finite non-negative number",
        }
        raise ConfigError(f"{origin}: {option.section}.{option.key} must be {kind[option.kind]}") from None


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Read the TOML file (if any), apply environment overrides, check and build the settings."""
    env = os.environ if env is None else env
    data: dict[str, object] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        base = path.resolve().parent
    known = {(o.section, o.key) for o in OPTIONS}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for key in table:
            if (section, key) not in known:
                raise ConfigError(f"{path}: unknown option {section}.{key}")
    values: dict[str, object] = {}
    for option in OPTIONS:
        name = f"{option.section}.{option.key}"
        value = option.default if option.kind is not Path else str(option.default)
        origin = "default"
        table = data.get(option.section, {})
        assert isinstance(table, dict)
        if option.key in table:
            value, origin = table[option.key], str(path)
        if option.env in env:
            value, origin = env[option.env], f"${option.env}"
        converted = _convert(option, value, origin)
        if isinstance(converted, Path) and not converted.is_absolute():
            converted = (base if origin == str(path) or origin == "default" else Path.cwd()) / converted
        values[name] = converted
    try:
        if values["sessions.max_payload"] < MIN_MAX_PAYLOAD:  # type: ignore[operator]
            raise ValueError(
                f"sessions.max_payload must be at least {MIN_MAX_PAYLOAD} bytes (a login's frames "
                f"do not fit in less; the default {DEFAULT_MAX_PAYLOAD} fits a 64 KiB secret)"
            )
        protocol = ServerConfig(
            handshake_timeout=values["sessions.handshake_timeout"],  # type: ignore[arg-type]
            idle_timeout=values["sessions.idle_timeout"],  # type: ignore[arg-type]
            session_lifetime=values["sessions.lifetime"],  # type: ignore[arg-type]
            max_requests_per_session=values["sessions.max_requests"],  # type: ignore[arg-type]
            max_requests_in_flight=values["sessions.max_in_flight"],  # type: ignore[arg-type]
            max_sessions_per_connection=values["sessions.max_per_connection"],  # type: ignore[arg-type]
            max_payload=values["sessions.max_payload"],  # type: ignore[arg-type]
            max_hot_channels=values["sessions.max_hot"],  # type: ignore[arg-type]
            connection_idle_timeout=values["server.connection_idle_timeout"],  # type: ignore[arg-type]
            frame_timeout=values["server.frame_timeout"],  # type: ignore[arg-type]
            unproductive_burst=values["server.unproductive_burst"],  # type: ignore[arg-type]
            unproductive_rate=values["server.unproductive_rate"],  # type: ignore[arg-type]
        )
        if values["server.max_connections_per_address"] < 1:  # type: ignore[operator]
            raise ValueError("server.max_connections_per_address must be at least 1")
        if values["admission.rate"] <= 0:  # type: ignore[operator]
            raise ValueError("admission.rate must be positive")
        if values["admission.burst"] < 1:  # type: ignore[operator]
            raise ValueError("admission.burst must be at least 1")
        if not values["requests.per_user_rate"] > 0:  # type: ignore[operator]
            raise ValueError("requests.per_user_rate must be positive")
        if not values["requests.per_user_burst"] >= 1:  # type: ignore[operator]
            raise ValueError("requests.per_user_burst must be at least 1")
        throttle = ThrottlePolicy(
            threshold=values["throttle.threshold"],  # type: ignore[arg-type]
            base_delay=values["throttle.base_delay"],  # type: ignore[arg-type]
            growth=values["throttle.growth"],  # type: ignore[arg-type]
            max_delay=values["throttle.max_delay"],  # type: ignore[arg-type]
            forget_after=values["throttle.forget_after"],  # type: ignore[arg-type]
            max_records=values["throttle.max_records"],  # type: ignore[arg-type]
            # A login longer than this stops counting as in flight: past any handshake.
            in_flight_for=max(60.0, 2 * protocol.handshake_timeout),
        )
        if values["throttle.sweep_interval"] <= 0:  # type: ignore[operator]
            raise ValueError("throttle.sweep_interval must be positive")
        if values["sessions.reauth_window"] <= 0:  # type: ignore[operator]
            raise ValueError("sessions.reauth_window must be positive")
        if values["registration.name_reservation"] < 0:  # type: ignore[operator]
            raise ValueError("registration.name_reservation must be 0 or more")
        if values["server.send_timeout"] <= 0:  # type: ignore[operator]
            raise ValueError("server.send_timeout must be positive")
        if values["websocket.upgrade_timeout"] <= 0:  # type: ignore[operator]
            raise ValueError("websocket.upgrade_timeout must be positive")
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
    port = values["server.port"]
    assert isinstance(port, int)
    if port > 65535:
        raise ConfigError("server.port must be at most 65535")
    workers = values["server.workers"]
    assert isinstance(workers, int)
    check_workers(workers, "server.workers")
    health_listen = check_listen(values["server.health_listen"], "server.health_listen")
    host = values["server.host"]
    assert isinstance(host, str)
    websocket_listen = check_listen(values["websocket.listen"], "websocket.listen", default_host=host)
    origins = check_origins(values["websocket.allowed_origins"], "websocket.allowed_origins")
    if websocket_listen is not None and not origins:
        raise ConfigError(
            "websocket.listen is set but websocket.allowed_origins is empty: name the origins "
            "(e.g. https://app.example.org) whose pages may connect; every other one is refused"
        )
    return ServerSettings(
        storage_path=values["server.storage"],  # type: ignore[arg-type]
        setup_path=values["server.setup"],  # type: ignore[arg-type]
        cert_path=values["server.tls_cert"],  # type: ignore[arg-type]
        key_path=values["server.tls_key"],  # type: ignore[arg-type]
        host=values["server.host"],  # type: ignore[arg-type]
        port=port,
        workers=workers,
        tls_handshake_timeout=values["server.tls_handshake_timeout"],  # type: ignore[arg-type]
        send_timeout=values["server.send_timeout"],  # type: ignore[arg-type]
        max_connections=values["server.max_connections"],  # type: ignore[arg-type]
        max_connections_per_address=values["server.max_connections_per_address"],  # type: ignore[arg-type]
        admission_rate=values["admission.rate"],  # type: ignore[arg-type]
        admission_burst=values["admission.burst"],  # type: ignore[arg-type]
        user_request_rate=values["requests.per_user_rate"],  # type: ignore[arg-type]
        user_request_burst=values["requests.per_user_burst"],  # type: ignore[arg-type]
        maintenance_interval=values["throttle.sweep_interval"],  # type: ignore[arg-type]
        require_invitation=values["registration.require_invitation"],  # type: ignore[arg-type]
        name_reservation=values["registration.name_reservation"],  # type: ignore[arg-type]
        reauth_window=values["sessions.reauth_window"],  # type: ignore[arg-type]
        credentials_check=values["sessions.credentials_check"],  # type: ignore[arg-type]
        shutdown_grace=values["server.shutdown_grace"],  # type: ignore[arg-type]
        shutdown_delay=values["server.shutdown_delay"],  # type: ignore[arg-type]
        protocol=protocol,
        throttle=throttle,
        database_url=values["server.database_url"] or None,  # type: ignore[arg-type]
        database_schema=values["server.database_schema"],  # type: ignore[arg-type]
        health_listen=health_listen,
        websocket_listen=websocket_listen,
        websocket_origins=origins,
        websocket_upgrade_timeout=values["websocket.upgrade_timeout"],  # type: ignore[arg-type]
    )


def check_listen(value: object, name: str, default_host: str = "127.0.0.1") -> tuple[str, int] | None:
    """``value`` as a listener's (host, port), None when empty, else one ConfigError line."""
    try:
        return parse_listen(str(value), default_host)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def check_origins(value: object, name: str) -> frozenset[str]:
    """``value`` (a sequence of origins) normalized, else one ConfigError line."""
    assert isinstance(value, tuple)
    try:
        return frozenset(normalize_origin(origin) for origin in value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def check_workers(value: object, name: str) -> int:
    """``value`` as a worker count from MIN_WORKERS to MAX_WORKERS, else one ConfigError line."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdecimal() or not MIN_WORKERS <= int(text) <= MAX_WORKERS:
        raise ConfigError(f"{name} must be a whole number from {MIN_WORKERS} to {MAX_WORKERS}, not {text!r}")
    return int(text)


def options_help() -> str:
    """The option table for ``keymgmt-server serve --help``."""
    lines = ["configuration (TOML section.key, environment override, default):"]
    for o in OPTIONS:
        default = "[]" if o.kind is list else str(o.default)
        lines.append(f"  {o.section}.{o.key:22s} ${o.env:36s} {default:>16s}  {o.help}")
    return "\n".join(lines)


def render_config(overrides: Mapping[str, object]) -> str:
    """A complete TOML config with defaults, ``overrides`` keyed by ``section.key``."""
    out: list[str] = []
    for section in ("server", "sessions", "throttle", "admission", "requests", "registration", "websocket"):
        out.append(f"[{section}]")
        for o in OPTIONS:
            if o.section != section:
                continue
            value = overrides.get(f"{section}.{o.key}", o.default)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list | tuple):
                text = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            else:
                text = f'"{value}"' if isinstance(value, str | Path) else repr(value)
            out.append(f"{f'{o.key} = {text}':44s} # {o.help}")
        out.append("")
    return "\n".join(out)
