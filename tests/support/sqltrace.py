"""The SQL statements a SQLite connection runs, as the tests count them."""

from __future__ import annotations

import sqlite3


def trace_statements(db: sqlite3.Connection) -> list[str]:
    """Record every statement ``db`` runs into the returned list, once each. SQLite reports a
    trigger's program (the audit table's ``audit_owned``, migration 13) as a second run of the
    statement that fired it, with the same text (once per row): an audit INSERT equal to the
    one before it is that echo and is left out (two such INSERTs in a row would take the
    same number). Any other statement run twice in a row is recorded twice."""
    statements: list[str] = []

    def record(sql: str) -> None:
        if not (statements and statements[-1] == sql and sql.startswith("INSERT INTO audit ")):
            statements.append(sql)

    db.set_trace_callback(record)
    return statements
