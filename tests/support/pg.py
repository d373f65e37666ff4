"""Access to the test PostgreSQL server: a fresh schema per use, removed afterwards.

``KEYMGMT_TEST_POSTGRES`` is the connection string (default: 127.0.0.1, database
``test``). When the server cannot be reached the tests skip with the reason,
unless ``KEYMGMT_REQUIRE_POSTGRES=1`` (as in .ci/run), which makes it a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

CONNINFO = os.environ.get("KEYMGMT_TEST_POSTGRES", "host=127.0.0.1 dbname=test connect_timeout=3")


def postgres_or_skip() -> str:
    """The connection string, after checking the server answers."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        _unavailable(f"psycopg is not installed ({exc})")
    try:
        with psycopg.connect(CONNINFO, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable(f"PostgreSQL at {CONNINFO!r} is unreachable: {exc}")
    return CONNINFO


def _unavailable(reason: str) -> None:
    if os.environ.get("KEYMGMT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (KEYMGMT_REQUIRE_POSTGRES=1 makes this a failure)")
    pytest.skip(reason)


def fresh_schema() -> str:
    return f"kmtest_{uuid.uuid4().hex[:12]}"


def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(CONNINFO, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def schema_fixture() -> Iterator[tuple[str, str]]:
    conninfo = postgres_or_skip()
    schema = fresh_schema()
    try:
        yield conninfo, schema
    finally:
        drop_schema(schema)
