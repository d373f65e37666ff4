"""A database made by the code of an earlier schema, for the tests that upgrade one in place."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from keymgmt.adapters.storage import postgres as pg_backend
from keymgmt.adapters.storage import sqlite as sqlite_backend

#: Runs one statement with its parameters on the database of the earlier schema.
Execute = Callable[[str, tuple[Any, ...]], Any]


@contextmanager
def sqlite_at(path: Path, migrations: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Execute]:
    """A SQLite file made by the code whose schema is ``migrations`` (checked), open for the
    block to fill it (placeholder ``?``); closed after the block."""
    with monkeypatch.context() as m:
        m.setattr(sqlite_backend, "_MIGRATIONS", migrations)
        sqlite_backend.SQLiteStorage(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(migrations)
        yield lambda statement, params: db.execute(statement, params)
    finally:
        db.close()


@contextmanager
def postgres_at(
    conninfo: str, schema: str, migrations: list[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Execute]:
    """The same in a PostgreSQL schema (placeholder ``%s``)."""
    import psycopg
    from psycopg import sql

    with monkeypatch.context() as m:
        m.setattr(pg_backend, "_MIGRATIONS", migrations)
        pg_backend.PostgresStorage(conninfo, schema=schema).close()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(migrations)
        yield lambda statement, params: conn.execute(statement, params)
