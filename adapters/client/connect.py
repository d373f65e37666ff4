"""The client's way to the key server: a verified TLS 1.3 connection over TCP
(:func:`tls_connector`), or the same carried in a WebSocket (:func:`ws_connector`, the
key server's ``websocket.listen``; docs/protocol.md, *WebSocket binding*).

Written once against anyio, so it runs on asyncio and on trio.
"""

from __future__ import annotations

import os
import ssl

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from ..tls import client_context
from ..websocket import WS_PATH, WebSocketRefusedError, client_handshake
from .async_client import ConnectionLostError, Connector

__all__ = [
    "CertificateNotTrustedError",
    "TLSConnectError",
    "WebSocketConnectError",
    "tls_connector",
    "ws_connector",
]


class TLSConnectError(ConnectionLostError):
    """The client could not open a verified TLS 1.3 connection to the key server."""


class WebSocketConnectError(TLSConnectError):
    """TLS worked but the key server did not open the WebSocket (``status``: its HTTP
    answer, e.g. 403 for an origin it does not allow; 0 for none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class CertificateNotTrustedError(TLSConnectError):
    """The key server's certificate failed verification (unknown CA, wrong name, expired);
    ``name_mismatch`` is true when only the name was wrong (the CA was right)."""

    def __init__(self, message: str, *, name_mismatch: bool = False) -> None:
        super().__init__(message)
        self.name_mismatch = name_mismatch


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate verified but names another host.
_HOSTNAME_MISMATCH = 62


def tls_connector(
    host: str,
    port: int,
    *,
    cafile: str | os.PathLike[str] | None = None,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Connector:
    """An async callable that opens a verified TLS 1.3 stream to ``host:port``."""
    ssl_context = context if context is not None else client_context(cafile)

    async def connect() -> ByteStream:
        return await _open_tls(host, port, ssl_context, server_hostname, timeout)

    return connect


def ws_connector(
    host: str,
    port: int,
    *,
    origin: str | None = None,
    cafile: str | os.PathLike[str] | None = None,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    path: str = WS_PATH,
) -> Connector:
    """An async callable that opens a verified TLS 1.3 connection to ``host:port`` (the key
    server's WebSocket listener) and upgrades it to the keymgmt WebSocket. ``origin`` is
    the Origin header the server checks; by default the server's own,
    ``https://HOST:PORT`` (the key server must allow it in websocket.allowed_origins)."""
    ssl_context = context if context is not None else client_context(cafile)
    name = server_hostname or host
    authority = f"[{host}]" if ":" in host else host
    sent_origin = origin if origin is not None else f"https://{authority}:{port}"

    async def connect() -> ByteStream:
        stream = await _open_tls(host, port, ssl_context, server_hostname, timeout)
        try:
            with anyio.fail_after(timeout):
                return await client_handshake(
                    stream, host=f"{authority}:{port}", origin=sent_origin, path=path
                )
        except WebSocketRefusedError as exc:
            reason, status = f"{name}:{port}: {exc}", exc.status
            if status == 403:
                reason += f" (the key server does not allow the origin {sent_origin})"
        except TimeoutError:
            reason, status = f"the WebSocket upgrade with {host}:{port} timed out", 0
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            reason, status = (
                f"the WebSocket upgrade with {host}:{port} failed: the server closed the connection",
                0,
            )
        await anyio.aclose_forcefully(stream)
        raise WebSocketConnectError(reason, status)

    return connect


async def _open_tls(
    host: str, port: int, ssl_context: ssl.SSLContext, server_hostname: str | None, timeout: float
) -> ByteStream:
    """A verified TLS 1.3 stream to ``host:port`` (TLSConnectError with one line if not)."""
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(host, port)
    except TimeoutError:
        raise TLSConnectError(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise TLSConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        with anyio.fail_after(timeout):
            return await TLSStream.wrap(
                stream,
                hostname=server_hostname or host,
                ssl_context=ssl_context,
                standard_compatible=False,
            )
    except ssl.SSLCertVerificationError as exc:
        await anyio.aclose_forcefully(stream)
        raise CertificateNotTrustedError(
            f"the key server's certificate is not trusted: {str(exc.verify_message).rstrip('.')}",
            name_mismatch=exc.verify_code == _HOSTNAME_MISMATCH,
        ) from None
    except ssl.SSLError as exc:
        reason = f"TLS 1.3 handshake with {host}:{port} failed: {exc.reason}"
    except TimeoutError:
        reason = f"TLS 1.3 handshake with {host}:{port} timed out"
    except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):
        reason = f"TLS 1.3 handshake with {host}:{port} failed: the server closed the connection"
    await anyio.aclose_forcefully(stream)
    raise TLSConnectError(reason)
