"""The SQL statements a SQLite connection runs, as the tests count them."""

from __future__ import annotations

import sqlite3


def trace_statements(db: sqlite3.Connection) -> list[str]:
    """Record every statement ``db`` runs into the returned list, once each. SQLite reports a
    trigger's program (the audit table's ``audit_owned``, migration 13) as a second run of the
    statement that fired it, with the same text: an entry equal to the one before it is that
    echo and is left out."""
    statements: list[str] = []

    def record(sql: str) -> None:
        if not statements or statements[-1] != sql:
            statements.append(sql)

    db.set_trace_callback(record)
    return statements
