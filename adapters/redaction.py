"""Keep passwords out of what the key server prints: database connection strings redacted.

PostgreSQL takes a connection string in two forms, and both may carry a password:
a URL (``postgresql://user:PASSWORD@host/db?password=PASSWORD``) and key=value pairs
(``host=db password=PASSWORD`` or ``password='with spaces'``). :func:`redact_database_url`
replaces every password (and ``sslpassword``) in either form with ``***``; it works on
any text, so an error message that quotes a connection string is safe to print too.
"""

from __future__ import annotations

import re

__all__ = ["database_url_secrets", "redact_database_url"]

MASK = "***"

# A URL runs to the first whitespace. Its userinfo ends at the LAST @ in it: a password
# may hold an unencoded / ? # or @, so anything between "scheme://user:" and that @ is
# masked (a query holding an @ makes this mask too much, which is safe).
_URL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)(?P<rest>\S*)")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&](?:ssl)?password=)[^&\s]*", re.IGNORECASE)
# key=value: a quoted value (with backslash escapes), or an unquoted one in which libpq
# takes a backslash to escape the next character (a space, say).
_KEYWORD_PASSWORD = re.compile(
    r"(?<![?&\w])(?P<key>(?:ssl)?password\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|(?:\\.|[^\s'\"\\])+)",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    rest = match["rest"]
    at = rest.rfind("@")
    if at < 0:
        return match[0]  # "scheme://host:port/..." has no password
    return f"{match['head']}{MASK}{rest[at:]}"


def redact_database_url(text: str) -> str:
    """``text`` with every password of a PostgreSQL connection string in it replaced by ***."""
    text = _URL.sub(_userinfo, text)
    text = _QUERY_PASSWORD.sub(lambda m: m["key"] + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m["key"] + MASK, text)


def database_url_secrets(text: str) -> list[str]:
    """The password values :func:`redact_database_url` would mask in ``text`` (to remove them
    from other text, such as a library's error message that quotes part of the string)."""
    secrets: list[str] = []

    def keep(match: re.Match[str], start: int) -> str:
        value = match[0][start:]
        if value:
            secrets.append(value.strip("'\""))
        return match[0]

    for match in _URL.finditer(text):
        rest = match["rest"]
        if "@" in rest:
            secrets.append(rest[: rest.rfind("@")])
    for pattern in (_QUERY_PASSWORD, _KEYWORD_PASSWORD):
        for match in pattern.finditer(text):
            keep(match, len(match["key"]))
    return [s for s in secrets if s]
