"""Keep passwords out of what the key server prints: database connection strings redacted.

PostgreSQL takes a connection string in two forms, and both may carry a password:
a URL (``postgresql://user:PASSWORD@host/db?password=PASSWORD``) and key=value pairs
(``host=db password=PASSWORD`` or ``password='with spaces'``). :func:`redact_database_url`
replaces every password (and ``sslpassword``) in either form with ``***``; it works on
any text, so an error message that quotes a connection string is safe to print too.
"""

from __future__ import annotations

import re

__all__ = ["redact_database_url"]

MASK = "***"

# scheme://authority: the authority runs to the first / ? # or whitespace; its userinfo
# ends at the last @ in it (an unencoded @ in a password is taken as part of it).
_URL_AUTHORITY = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#\s]*)")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&](?:ssl)?password=)[^&#\s]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(?<![?&\w])(?P<key>(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s'\"]+)",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    authority = match["authority"]
    if "@" not in authority:
        return match[0]
    userinfo, host = authority.rsplit("@", 1)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + MASK
    return f"{match['scheme']}{userinfo}@{host}"


def redact_database_url(text: str) -> str:
    """``text`` with every password of a PostgreSQL connection string in it replaced by ***."""
    text = _URL_AUTHORITY.sub(_userinfo, text)
    text = _QUERY_PASSWORD.sub(lambda m: m["key"] + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m["key"] + MASK, text)
