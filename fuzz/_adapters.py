"""The adapters the harnesses use, importable by mypy as well.

At run time they come from ``keymgmt.adapters`` (the installed name). mypy
cannot follow the editable install's package-dir mapping (``keymgmt.adapters``
-> ``adapters/``), so for type checking the same source is imported under its
directory name, ``adapters``, which ``make typecheck`` checks too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters import InMemoryPair, KeyServer, MemoryServerApp, SQLiteStorage
else:
    from keymgmt.adapters import InMemoryPair, KeyServer, MemoryServerApp, SQLiteStorage

__all__ = ["InMemoryPair", "KeyServer", "MemoryServerApp", "SQLiteStorage"]
