"""The transition table agrees exactly with the hand-written statement of what each session
kind allows (tests/core/legal_transitions.py, written from docs/protocol.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import keymgmt_proto
from keymgmt_proto import Command, FrameType
from keymgmt_proto.wire import TRANSITIONS

from .legal_transitions import expected_transitions


def _name(trigger: FrameType | Command) -> str:
    return trigger.name if isinstance(trigger, FrameType) else trigger.value


def test_the_table_is_exactly_what_the_protocol_document_allows():
    implemented = {
        (role.value, kind.value, state.value, _name(trigger), target.value)
        for (role, kind, state, trigger), target in TRANSITIONS.items()
    }
    expected = expected_transitions()
    assert sorted(implemented - expected) == [], "in the table, not allowed by the protocol"
    assert sorted(expected - implemented) == [], "allowed by the protocol, missing from the table"


def test_the_statement_is_not_empty_or_trivial():
    expected = expected_transitions()
    assert len(expected) > 60
    # A REQUEST is legal only in an established request session, and only for the server.
    requests = {(role, kind, state) for role, kind, state, trigger, _ in expected if trigger == "REQUEST"}
    assert requests == {("server", "request", "ESTABLISHED")}


def _state_assignments(source: str) -> list[int]:
    """Lines that assign a session's ``state`` directly (instead of through transition())."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign | ast.AugAssign)
            else []
        )
        lines += [node.lineno for t in targets if isinstance(t, ast.Attribute) and t.attr == "state"]
    return lines


def test_every_state_change_goes_through_the_transition_table():
    """Issue 13: one transition function (keymgmt_proto._state.transition) changes states;
    it looks the target up in TRANSITIONS, so no state change can bypass the table."""
    core = Path(keymgmt_proto.__file__).parent
    assigning = {
        p.name: lines for p in sorted(core.glob("*.py")) if (lines := _state_assignments(p.read_text()))
    }
    assert list(assigning) == ["_state.py"] and len(assigning["_state.py"]) == 1  # in transition()
    assert _state_assignments("session.state = State.CLOSED\nx = 1\n") == [1]
