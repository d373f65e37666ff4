"""``keymgmt-server`` with one protection broken on purpose: targets that show what the
server conformance machine reports when a key server breaks a rule of docs/protocol.md.

``python -m keymgmt.adapters.conformance broken-server VARIANT --config FILE`` applies the
variant's patch in its own process only, then runs the real ``keymgmt-server serve`` with
the rest of the arguments (one process: ``--workers`` is refused and ``KEYMGMT_WORKERS`` set
to 1, since workers would run the unbroken server). Each patch is the smallest change that
breaks one rule; :data:`VARIANTS` names them. It listens on loopback addresses only (it
refuses a configuration that would listen beyond this machine). Never serve real users with
it: it is there so
that someone with only the installed package can see the machine catch a real bug, and so
that tests/conformance/ can check that it does.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from keymgmt_proto import Action, Channel, ErrorCode, FrameType, Op, RemoteProtocolError, Status


def skip_the_replay_check() -> None:
    """A record whose sequence number is below the next expected one opens (it is a replay:
    protocol.md 5.3 says BAD_RECORD)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        (seq,) = struct.unpack_from(">Q", payload)
        if seq < self.recv_seq:
            expected = self.recv_seq
            self.recv_seq = seq
            try:
                return original(self, frame_type, payload)
            finally:
                self.recv_seq = expected
        return original(self, frame_type, payload)

    Channel.open_payload = open_payload  # type: ignore[method-assign]


def accept_a_bit_flipped_record() -> None:
    """A record that fails authentication is decrypted anyway (ChaCha20 without the Poly1305
    check) instead of ending the session with BAD_RECORD (protocol.md 5.2)."""
    original = Channel.open_payload

    def open_payload(self: Channel, frame_type: FrameType, payload: bytes) -> bytes:
        try:
            return original(self, frame_type, payload)
        except RemoteProtocolError as exc:
            if "authentication" not in str(exc):
                raise
        (seq,) = struct.unpack_from(">Q", payload)
        nonce = (self._recv_iv ^ seq).to_bytes(12, "big")
        stream = Cipher(algorithms.ChaCha20(self._recv_key, (1).to_bytes(4, "little") + nonce), None)
        self.recv_seq = seq + 1
        return stream.decryptor().update(payload[8:-16])

    Channel.open_payload = open_payload  # type: ignore[method-assign]


def reuse_a_sequence_number() -> None:
    """Every RESPONSE is sealed at the sequence number of the record before it (a nonce
    used twice; protocol.md 5.3: a sender's counter never repeats)."""
    original = Channel.seal_payload

    def seal_payload(self: Channel, frame_type: FrameType, plaintext: bytes) -> bytes:
        if frame_type is FrameType.RESPONSE and self.send_seq > 0:
            self.send_seq -= 1
        return original(self, frame_type, plaintext)

    Channel.seal_payload = seal_payload  # type: ignore[method-assign]


def answer_an_unknown_account_differently() -> None:
    """A login to a name nobody registered is refused at once, before LOGIN_RESPONSE, where
    a wrong password gets LOGIN_RESPONSE and fails later (NET-9: they must look the same)."""
    from ..server import app

    original = app.KeyServer._on_login_requested

    def on_login_requested(self: app.KeyServer, conn: Any, event: Any) -> None:
        with self.storage.transaction() as tx:
            known = tx.get_account(event.account_name) is not None
        if not known:
            conn.reject_session(event.session_id, ErrorCode.AUTHENTICATION_FAILED, "no such account")
            return
        original(self, conn, event)

    app.KeyServer._on_login_requested = on_login_requested  # type: ignore[method-assign]


def tell_that_another_users_key_exists() -> None:
    """RETRIEVE of a key id another user stores answers WRONG_USER instead of the NOT_FOUND a
    missing key gets (OPS-7: exactly the same one byte)."""
    from ..server import app

    original = app.HANDLERS[Op.RETRIEVE]

    def retrieve(self: app.KeyServer, op: Any, request: Any) -> Any:
        if op.tx.get_secret(op.user_id, request.key_id) is None and op.tx.key_id_exists(request.key_id):
            raise app._Refused(Status.WRONG_USER, Action.RETRIEVE, request.key_id)
        return original(self, op, request)

    app.HANDLERS = MappingProxyType({**app.HANDLERS, Op.RETRIEVE: retrieve})


def refuse_logins_at_random(share: float = 1 / 3) -> None:
    """Not broken: about one login or registration in three (``share``) is refused with
    ABORT(RATE_LIMITED), at random. A server may refuse by policy (protocol.md 7.1), and how
    often depends on its load and clock, so a run of the machine must not depend on which
    ones were refused."""
    import random

    from ..server import admission

    original = admission._BucketAdmission.admit

    def admit(self: admission._BucketAdmission, frame_type: FrameType, now: float) -> bool:
        if frame_type is not FrameType.RESUME and random.random() < share:  # noqa: S311 - not a secret
            return False
        return original(self, frame_type, now)

    admission._BucketAdmission.admit = admit  # type: ignore[method-assign]


def refuse_every_login() -> None:
    """Every login and registration refused with ABORT(RATE_LIMITED): allowed, but the
    machine cannot start a run, and says so."""
    refuse_logins_at_random(share=1.0)


def refuse_each_request_once() -> None:
    """Not broken: every request is answered RATE_LIMITED (its user's rate: nothing done) the
    first time its body comes, and served when the same body comes again. A server may refuse
    any request so (protocol.md 10), a malformed body or an account deletion too; a client
    sends it again after a pause."""
    from keymgmt_proto import RequestReceived

    from ..server import app

    original = app.KeyServer._dispatch
    refused: set[tuple[bytes, bytes]] = set()

    def dispatch(self: app.KeyServer, conn: Any, event: Any) -> None:
        if isinstance(event, RequestReceived):
            sent = (event.user_id, event.body)
            if sent not in refused:
                refused.add(sent)
                self._refuse_rate(conn, event)
                return
            refused.discard(sent)
        original(self, conn, event)

    app.KeyServer._dispatch = dispatch  # type: ignore[method-assign]


#: Variant name -> the patch that makes it.
VARIANTS: dict[str, Callable[[], None]] = {
    "replay": skip_the_replay_check,
    "bit-flip": accept_a_bit_flipped_record,
    "sequence-reuse": reuse_a_sequence_number,
    "unknown-account": answer_an_unknown_account_differently,
    "other-users-key": tell_that_another_users_key_exists,
    "random-refusals": refuse_logins_at_random,  # not broken: policy the machine must allow
    "all-refusals": refuse_every_login,
    "request-refusals": refuse_each_request_once,  # not broken either
}


#: The variants that are not broken: a server's policy the machine must allow.
HONEST_VARIANTS = frozenset({"random-refusals", "all-refusals", "request-refusals"})


#: Variant name -> what it does, in one line (``--list``; the server's first log line).
SUMMARIES: dict[str, str] = {
    "replay": "opens a replayed record (protocol.md 5.3)",
    "bit-flip": "opens a record whose tag does not verify (protocol.md 5.2)",
    "sequence-reuse": "seals each RESPONSE at the sequence number before it (protocol.md 5.3)",
    "unknown-account": "refuses a login to an unknown name at once, unlike a wrong password (NET-9)",
    "other-users-key": "answers WRONG_USER for another user's key, not NOT_FOUND (OPS-7)",
    "random-refusals": "refuses a third of the openings RATE_LIMITED, at random",
    "all-refusals": "refuses every opening RATE_LIMITED (no run can start)",
    "request-refusals": "answers each request RATE_LIMITED once, then serves it (per-user rate)",
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def beyond_this_machine(serve_args: list[str]) -> str | None:
    """Why ``serve *serve_args`` would listen beyond loopback (or on sockets it is handed),
    in one line; None when every listener is on a loopback address."""
    if any(arg.startswith(("--listen-fd", "--websocket-fd")) for arg in serve_args):
        return "broken-server opens its own listeners: it takes no --listen-fd or --websocket-fd"
    from ..cli.server import default_config
    from ..server.config import ConfigError, load_settings

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    known, _ = parser.parse_known_args(serve_args)
    try:
        settings = load_settings(known.config or default_config())
    except ConfigError as exc:
        return str(exc)
    listeners = [("server.host", settings.host)]
    if settings.websocket_listen is not None:
        listeners.append(("websocket.listen", settings.websocket_listen[0]))
    for name, host in listeners:
        if not _is_loopback(host):
            return (
                f"broken-server listens on loopback only, and {name} is {host!r} "
                "(a broken server must not be reachable from other machines)"
            )
    return None


def serve_broken(variant: str, serve_args: list[str]) -> int:
    """Apply ``variant``'s patch to this process, then run ``keymgmt-server serve
    *serve_args`` in it (one process, every listener on a loopback address). Returns its
    exit status; 2, with one line and nothing patched, for ``--workers`` or a listener that
    other machines could reach."""
    if any(arg == "--workers" or arg.startswith("--workers=") for arg in serve_args):
        print("error: broken-server runs one process: --workers would serve unbroken", file=sys.stderr)
        return 2
    why = beyond_this_machine(serve_args)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    os.environ["KEYMGMT_WORKERS"] = "1"
    VARIANTS[variant]()
    kind = "policy" if variant in HONEST_VARIANTS else "BROKEN on purpose"
    print(
        f"keymgmt-server, {kind} ({variant}): {SUMMARIES[variant]}; for testing the conformance "
        "machine only, never for real users",
        file=sys.stderr,
        flush=True,
    )
    from ..cli.server import main as server_main

    return server_main(["serve", *serve_args])
