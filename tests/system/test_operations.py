"""Each operation is declared once (``keymgmt_proto.OPERATIONS``) and served, sent and offered
everywhere: a request and a response type with their codecs, an audit action, a key-server
handler, a client method and a CLI command. Adding an ``Op`` without the rest fails here, and
an ``Op`` the table does not declare is refused on the wire, never decoded as another one."""

from __future__ import annotations

import argparse
import inspect

import pytest

from keymgmt.adapters.cli.client import CLI_COMMANDS, _parser
from keymgmt.adapters.client.async_client import CLIENT_METHODS, KeySession
from keymgmt.adapters.client.sync_client import SyncKeySession
from keymgmt.adapters.server.app import HANDLERS
from keymgmt_proto import (
    OPERATIONS,
    Action,
    AuditRequest,
    AuditResponse,
    AuditType,
    Empty,
    KeyIdResponse,
    KeyListResponse,
    Op,
    OpRequest,
    OpResponse,
    PasswordRegistrationResponse,
    RemoteProtocolError,
    SecretKind,
    SecretResponse,
    Status,
    StorageKeyResponse,
    StoredResponse,
    decode_request,
    decode_response,
    encode_response,
)
from keymgmt_proto import _ops as ops_module


def _cli_commands() -> set[str]:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.mark.parametrize("op", list(Op), ids=[op.name for op in Op])
def test_every_operation_is_declared_served_sent_and_offered(op: Op) -> None:
    operation = OPERATIONS[op]
    assert operation.op is op
    assert issubclass(operation.request, OpRequest) and operation.request.OP is op
    assert issubclass(operation.response, OpResponse)
    assert isinstance(operation.action, Action)
    assert op in HANDLERS, f"the key server has no handler for {op.name}"
    method = getattr(KeySession, CLIENT_METHODS[op])
    assert inspect.iscoroutinefunction(method), f"KeySession.{CLIENT_METHODS[op]} is not a method"
    assert CLI_COMMANDS[op] in _cli_commands(), f"no CLI command runs {op.name}"


def test_the_blocking_client_offers_every_public_operation_with_the_same_signature() -> None:
    """The sync facade is one line per KeySession method: an operation added to the async
    client without its blocking twin (or with another signature) fails here."""
    for name in sorted(set(CLIENT_METHODS.values())):
        if name.startswith("_"):
            continue  # internal steps of other operations (the storage key, OPS-1)
        twin = getattr(SyncKeySession, name, None)
        assert twin is not None, f"SyncKeySession has no {name}"
        asynchronous = inspect.signature(getattr(KeySession, name))
        assert inspect.signature(twin).parameters.keys() == asynchronous.parameters.keys(), name
    public = {
        n for n, v in vars(KeySession).items() if not n.startswith("_") and inspect.iscoroutinefunction(v)
    }
    assert public <= set(vars(SyncKeySession)), public - set(vars(SyncKeySession))


def test_the_table_and_the_maps_name_no_operation_that_does_not_exist() -> None:
    assert set(OPERATIONS) == set(HANDLERS) == set(CLIENT_METHODS) == set(CLI_COMMANDS) == set(Op)
    assert len({o.request for o in OPERATIONS.values()}) == len(Op)  # one request type each


def test_an_op_the_table_does_not_declare_is_refused_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: an Op added without its declaration must not decode as some other request
    (the old decoder's last ``else`` made it a DELETE_KEY)."""
    body = bytes([Op.DELETE_KEY]) + bytes(16) + bytes(16)
    assert decode_request(body).op is Op.DELETE_KEY
    undeclared = {op: o for op, o in OPERATIONS.items() if op is not Op.DELETE_KEY}
    # The decoders read the table from their own (private) module; the public one is read-only.
    monkeypatch.setattr(ops_module, "OPERATIONS", undeclared)
    with pytest.raises(RemoteProtocolError, match="not supported"):
        decode_request(body)
    with pytest.raises(RemoteProtocolError, match="not supported"):
        decode_response(Op.DELETE_KEY, bytes([Status.OK]))


def test_an_unknown_op_byte_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown op"):
        decode_request(bytes([max(Op) + 1]) + bytes(16))


def test_an_audit_request_with_an_optional_flag_other_than_0_or_1_is_refused() -> None:
    good = AuditRequest(bytes(16), AuditType.ALL, after=5).encode()
    assert decode_request(good) == AuditRequest(bytes(16), AuditType.ALL, after=5)
    flag_at = 1 + 16 + 1 + 2  # op, user id, audit type, key-id count
    assert good[flag_at] == 1
    with pytest.raises(RemoteProtocolError, match="flag"):
        decode_request(good[:flag_at] + b"\x02" + good[flag_at + 1 :])


@pytest.mark.parametrize("op", list(Op), ids=[op.name for op in Op])
def test_a_response_with_a_trailing_byte_is_refused(op: Op) -> None:
    assert decode_response(op, bytes([Status.NOT_FOUND])) == (Status.NOT_FOUND, None)
    with pytest.raises(RemoteProtocolError):
        decode_response(op, bytes([Status.NOT_FOUND, 0]))
    ok = {
        Op.RETRIEVE_STORAGE_KEY: StorageKeyResponse(bytes(60)),
        Op.CREATE_KEY_ID: KeyIdResponse(bytes(16), bytes(32)),
        Op.STORE_SECRET: StoredResponse(bytes(16), bytes(32)),
        Op.RETRIEVE: SecretResponse(SecretKind.GENERATED, bytes(60), b"ad"),
        Op.AUDIT: AuditResponse((), 0),
        Op.LIST_KEYS: KeyListResponse((), 0),
        Op.DELETE_KEY: Empty(),
        Op.CHANGE_PASSWORD_START: PasswordRegistrationResponse(bytes(64)),
        Op.CHANGE_PASSWORD_FINISH: Empty(),
        Op.DELETE_ACCOUNT: Empty(),
        Op.RENAME_KEY: Empty(),
    }[op]
    body = encode_response(Status.OK, ok)
    assert decode_response(op, body) == (Status.OK, ok)
    with pytest.raises(RemoteProtocolError):
        decode_response(op, body + b"\x00")
