"""What each session kind allows, written by hand from docs/protocol.md (sections 7.2, 8.1-8.3).

This is a second statement of the legal transitions, independent of the table that
implements them (``keymgmt_proto.wire.TRANSITIONS``): it imports nothing from it and is
not generated from it. ``tests/core/test_legal_transitions.py`` checks that the two agree
exactly, so a wrong, missing or extra entry in the implementation fails a test.

Each line is ``STATE  trigger  -> NEXT``; a trigger in capitals is a frame received from
the peer, one in lower case a local command (the API call, timer or connection loss).
The client's ``AWAIT_*_STEP`` states are local (section 8.4): the client computes its
OPAQUE finish step there, and ``complete_*_step`` is handing the result back.
"""

from __future__ import annotations

# ----------------------------------------------------------------- section 8.1: registration

CLIENT_REGISTRATION = """
IDLE                  open                  -> AWAIT_REG_RESPONSE
AWAIT_REG_RESPONSE    REG_RESPONSE          -> AWAIT_REG_STEP
AWAIT_REG_STEP        complete_reg_step     -> AWAIT_LOGIN_RESPONSE
AWAIT_LOGIN_RESPONSE  LOGIN_RESPONSE        -> AWAIT_LOGIN_STEP
AWAIT_LOGIN_STEP      complete_login_step   -> AWAIT_WELCOME
AWAIT_WELCOME         WELCOME               -> AWAIT_REG_CLOSE
AWAIT_REG_CLOSE       CLOSE                 -> CLOSED
"""

SERVER_REGISTRATION = """
IDLE                  REG_START             -> AWAIT_REG_DECISION
AWAIT_REG_DECISION    accept_registration   -> AWAIT_REG_UPLOAD
AWAIT_REG_UPLOAD      REG_UPLOAD            -> AWAIT_LOGIN_START
AWAIT_LOGIN_START     LOGIN_START           -> AWAIT_LOGIN_FINISH
AWAIT_LOGIN_FINISH    LOGIN_FINISH          -> AWAIT_COMPLETION
AWAIT_COMPLETION      COMPLETE_REGISTRATION -> AWAIT_STORE
AWAIT_STORE           confirm_registration  -> CLOSED
"""

# ----------------------------------------------------------------- sections 8.2, 8.3: requests

CLIENT_REQUEST = """
IDLE                  open                  -> AWAIT_LOGIN_RESPONSE
AWAIT_LOGIN_RESPONSE  LOGIN_RESPONSE        -> AWAIT_LOGIN_STEP
AWAIT_LOGIN_STEP      complete_login_step   -> AWAIT_WELCOME
AWAIT_WELCOME         WELCOME               -> ESTABLISHED
ESTABLISHED           send_request          -> ESTABLISHED
ESTABLISHED           RESPONSE              -> ESTABLISHED
ESTABLISHED           CLOSE                 -> CLOSED
ESTABLISHED           close                 -> CLOSED
ESTABLISHED           detach                -> DETACHED
DETACHED              resume                -> AWAIT_RESUMED
AWAIT_RESUMED         RESUMED               -> ESTABLISHED
AWAIT_RESUMED         send_request          -> AWAIT_RESUMED
AWAIT_RESUMED         CLOSE                 -> CLOSED
AWAIT_RESUMED         close                 -> CLOSE_AFTER_RESUMED
AWAIT_RESUMED         detach                -> DETACHED
AWAIT_RESUMED         defer                 -> DETACHED
CLOSE_AFTER_RESUMED   RESUMED               -> CLOSED
CLOSE_AFTER_RESUMED   CLOSE                 -> CLOSED
"""

SERVER_REQUEST = """
IDLE                  LOGIN_START           -> AWAIT_LOGIN_DECISION
AWAIT_LOGIN_DECISION  accept_login          -> AWAIT_LOGIN_FINISH
AWAIT_LOGIN_FINISH    LOGIN_FINISH          -> ESTABLISHED
ESTABLISHED           REQUEST               -> ESTABLISHED
ESTABLISHED           send_response         -> ESTABLISHED
ESTABLISHED           CLOSE                 -> CLOSED
ESTABLISHED           close                 -> CLOSED
ESTABLISHED           detach                -> DETACHED
DETACHED              send_response         -> DETACHED
DETACHED              close                 -> CLOSED
IDLE                  RESUME                -> ESTABLISHED
DETACHED              resume                -> ESTABLISHED
ESTABLISHED           resume                -> ESTABLISHED
"""

#: States no session is "live" in: not yet opened, waiting to be resumed, ended.
NOT_LIVE = {"IDLE", "DETACHED", "CLOSED"}
#: Section 7.2: on a lost connection these survive (as DETACHED, or waiting to resume again);
#: every other live session ends.
SURVIVE_CONNECTION_LOSS = {"ESTABLISHED", "AWAIT_RESUMED"}


def _parse(text: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in text.strip().splitlines():
        state, trigger, arrow, target = line.split()
        assert arrow == "->", line
        rows.append((state, trigger, target))
    return rows


def expected_transitions() -> set[tuple[str, str, str, str, str]]:
    """Every legal ``(role, kind, state, trigger, next)``, with names as strings."""
    tables = {
        ("client", "registration"): CLIENT_REGISTRATION,
        ("server", "registration"): SERVER_REGISTRATION,
        ("client", "request"): CLIENT_REQUEST,
        ("server", "request"): SERVER_REQUEST,
    }
    result: set[tuple[str, str, str, str, str]] = set()
    for (role, kind), text in tables.items():
        rows = _parse(text)
        result |= {(role, kind, state, trigger, target) for state, trigger, target in rows}
        # Section 7.2: either peer may end a live session with ABORT, and this side may abort
        # it (an application refusal, a timer, a local fault); a connection lost under a
        # session that cannot survive it ends the session.
        live = {s for s, _, _ in rows if s not in NOT_LIVE} | {t for _, _, t in rows if t not in NOT_LIVE}
        for state in live:
            result.add((role, kind, state, "ABORT", "CLOSED"))
            result.add((role, kind, state, "abort", "CLOSED"))
            if state not in SURVIVE_CONNECTION_LOSS:
                result.add((role, kind, state, "detach", "CLOSED"))
    return result
