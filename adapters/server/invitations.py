"""Optional authorization of registration (REG-5): a pluggable authorizer and signed invitations.

The seed architecture leaves registration unauthenticated, "although future versions may
provide this as an optional feature for the Service Provider". A key server may therefore
ask every REG_START for a token: the client sends it (opaque bytes), the core hands it to
the application in ``RegistrationRequested``, and a :class:`RegistrationAuthorizer` says
yes or no before anything else is looked at (so an unauthorized peer cannot even learn
whether a name is taken) and before any OPAQUE work.

The built-in :class:`InvitationAuthorizer` checks invitations minted by
``keymgmt-server invite``: ``kmi1.`` then base64url (no padding) of::

    expires u64 (microseconds since the epoch) || bound u8 (0 or 1) ||
    name_hash [32] (SHA3-256 of the account name, or zeros) || nonce [16] ||
    tag [32] = HMAC-SHA3-256(invitation key, everything before)

The invitation key is derived from the OPAQUE server setup (every instance already holds
it; there is no new secret to distribute). An invitation bound to a name registers that
name only, so it works once; an unbound one registers any name until it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from typing import Protocol

from keymgmt_proto import RandomSource, ServerSetup, hkdf_sha3

__all__ = ["INVITATION_PREFIX", "InvitationAuthorizer", "RegistrationAuthorizer"]

INVITATION_PREFIX = "kmi1."
_KEY_INFO = b"keymgmt v1 invitation key"
_BODY = struct.Struct(">QB32s16s")
_TAG_SIZE = 32


class RegistrationAuthorizer(Protocol):
    """Decides whether a registration may go on (REG-5)."""

    def authorize(self, account_name: bytes, token: bytes, now: float) -> bool:
        """True to let ``account_name`` register with ``token`` at wall-clock time ``now``."""
        ...


class InvitationAuthorizer:
    """Mints and checks HMAC-signed invitations (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the invitation key is 32 bytes")
        self._key = key

    @classmethod
    def from_setup(cls, setup: ServerSetup) -> InvitationAuthorizer:
        """The authorizer every instance sharing ``setup`` agrees with."""
        return cls(hkdf_sha3(setup.to_bytes(), _KEY_INFO, 32))

    def __repr__(self) -> str:
        return "InvitationAuthorizer(<secret>)"

    def _tag(self, body: bytes) -> bytes:
        return hmac.digest(self._key, body, "sha3_256")

    def mint(self, account_name: bytes | None, valid_for: float, now: float, random: RandomSource) -> str:
        """An invitation valid for ``valid_for`` seconds from ``now``, for ``account_name`` only
        (it then works once) or, with None, for any name."""
        if valid_for <= 0:
            raise ValueError("an invitation must be valid for a positive time")
        expires = int((now + valid_for) * 1_000_000)
        name_hash = hashlib.sha3_256(account_name).digest() if account_name is not None else bytes(32)
        body = _BODY.pack(expires, account_name is not None, name_hash, random(16))
        return INVITATION_PREFIX + base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode()

    def authorize(self, account_name: bytes, token: bytes, now: float) -> bool:
        """True for a genuine, unexpired invitation for this name (or for any name)."""
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            return False
        if not text.startswith(INVITATION_PREFIX):
            return False
        encoded = text[len(INVITATION_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return False
        if len(raw) != _BODY.size + _TAG_SIZE:
            return False
        body, tag = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(self._tag(body), tag):
            return False
        expires, bound, name_hash, _nonce = _BODY.unpack(body)
        if now * 1_000_000 >= expires or bound not in (0, 1):
            return False
        return not bound or hmac.compare_digest(hashlib.sha3_256(account_name).digest(), name_hash)
