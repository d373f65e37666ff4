"""The public strategies (keymgmt_proto.strategies, issue 18) generate what they say: valid
values that decode and re-encode to the same bytes, malformed ones that every decoder
refuses, records sealed at the sequence number asked for, and scripts within their limits.
Importing the core does not import Hypothesis."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keymgmt_proto import (
    MAX_SECRET_SIZE,
    OPERATIONS,
    Channel,
    ErrorCode,
    FrameType,
    Op,
    RemoteProtocolError,
    Status,
    check_label,
    decode_portable,
    decode_request,
    decode_response,
    encode_response,
)
from keymgmt_proto import strategies as S
from keymgmt_proto.wire import (
    HEADER_SIZE,
    MESSAGE_TYPES,
    Record,
    ResumedEnvelope,
    ResumeEnvelope,
    decode_header,
)


def test_importing_the_package_does_not_import_hypothesis() -> None:
    code = (
        "import sys, keymgmt_proto, keymgmt_proto.wire, keymgmt_proto.testing, keymgmt, keymgmt.adapters; "
        "import keymgmt.adapters.cli.client, keymgmt.adapters.cli.server; "
        "assert 'hypothesis' not in sys.modules, sorted(m for m in sys.modules if 'hypothesis' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_public_name_is_documented() -> None:
    for name in S.__all__:
        value = getattr(S, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
    wanted = {"frames", "corrupted_frames", "op_requests", "sealed_records", "scripted_sessions"}
    assert set(S.__all__) >= wanted


@pytest.mark.parametrize("op", sorted(OPERATIONS), ids=lambda op: op.name)
@given(data=st.data())
def test_request_bodies_decode_to_what_was_drawn(op: Op, data: st.DataObject) -> None:
    request = data.draw(S.op_requests(op))
    body = request.encode()
    assert decode_request(body) == request
    assert decode_request(body).encode() == body


@given(body=S.malformed_request_bodies())
def test_malformed_request_bodies_never_decode(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(body)


@pytest.mark.parametrize("op", sorted(OPERATIONS), ids=lambda op: op.name)
@given(data=st.data())
def test_response_bodies_decode_for_their_op(op: Op, data: st.DataObject) -> None:
    status, response = data.draw(S.op_responses(op))
    body = encode_response(status, response)
    assert decode_response(op, body) == (status, response)
    assert data.draw(S.response_bodies(op))[:1] in {bytes([s]) for s in Status}


@given(encoded=S.portable_secrets(max_size=300))
def test_portable_secrets_read_back(encoded: bytes) -> None:
    secret = decode_portable(encoded)
    assert 1 <= len(secret) <= MAX_SECRET_SIZE
    assert (encoded[0] == 0) == (len(secret) > 255)


@given(data=S.invalid_portable_secrets())
def test_invalid_portable_secrets_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_portable(data)


@given(label=S.labels())
def test_labels_are_accepted_by_the_client(label: str) -> None:
    assert check_label(label) == label


@given(name=S.policy_account_names())
def test_policy_account_names_are_printable_utf8_without_surrounding_space(name: bytes) -> None:
    text = name.decode("utf-8")
    assert 1 <= len(name) <= 255 and text.isprintable() and text == text.strip()


@given(name=S.invalid_account_names())
def test_invalid_account_names_do_not_fit_the_wire(name: bytes) -> None:
    assert not 1 <= len(name) <= 255


@given(frame=S.frames())
def test_frames_are_well_formed(frame: bytes) -> None:
    frame_type, session_id, length = decode_header(frame[:HEADER_SIZE], 2**32 - 1)
    assert length == len(frame) - HEADER_SIZE
    assert (session_id == 0) == (frame_type is FrameType.GOAWAY)
    payload = frame[HEADER_SIZE:]
    if frame_type is FrameType.RESUME:
        ResumeEnvelope.decode(payload)
    elif frame_type is FrameType.RESUMED:
        ResumedEnvelope.decode(payload)
    elif frame_type.sealed:
        Record.decode(payload)
    else:
        MESSAGE_TYPES[frame_type].decode(payload)


@given(frame=S.corrupted_frames())
def test_corrupted_frames_are_decoded_or_refused_cleanly(frame: bytes) -> None:
    try:
        decode_header(frame[:HEADER_SIZE], 66560)
    except RemoteProtocolError as exc:
        assert exc.code in {
            ErrorCode.UNSUPPORTED_VERSION,
            ErrorCode.MALFORMED,
            ErrorCode.BAD_SESSION_ID,
            ErrorCode.FRAME_TOO_LARGE,
        }


@given(data=st.data(), key=S.fixed_bytes(64))
def test_sealed_records_open_at_their_sequence_number_only(data: st.DataObject, key: bytes) -> None:
    frame_type, record = data.draw(S.sealed_records(key, seqs=st.integers(0, 50)))
    server = Channel(key, is_client=False)
    server.recv_seq = record.seq + 1  # a replay from here
    with pytest.raises(RemoteProtocolError):
        server.open(frame_type, record)
    server.recv_seq = record.seq
    server.open(frame_type, record)
    # the same plaintext sealed by the server does not open on the server (the direction)
    back = S.seal_at(key, frame_type, b"x", 0, from_client=False)
    with pytest.raises(RemoteProtocolError):
        Channel(key, is_client=False).open(frame_type, back)
    assert Channel(key, is_client=True).open(frame_type, back) == b"x"


@given(script=S.scripted_sessions())
def test_scripts_keep_at_most_16_requests_in_flight(script: S.SessionScript) -> None:
    in_flight = 0
    for step in script.steps:
        assert step.action in ("request", "drop", "goaway", "logout")
        if step.action == "request":
            assert step.op in S.SCRIPT_OPS
            in_flight = 0 if step.wait else in_flight + 1
            assert in_flight <= 16
    assert "logout" not in [s.action for s in script.steps[:-1]]
    assert script.describe()


def test_messages_of_a_class_that_is_no_payload_are_refused() -> None:
    with pytest.raises(ValueError, match="not a frame payload class"):
        S.messages(int)
