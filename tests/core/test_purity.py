"""keymgmt_proto is sans-I/O: it imports nothing that does I/O and reads no clock."""

from __future__ import annotations

import ast
from pathlib import Path

import keymgmt_proto

CORE = Path(keymgmt_proto.__file__).parent
FORBIDDEN_MODULES = {
    "socket",
    "ssl",
    "asyncio",
    "trio",
    "anyio",
    "sqlite3",
    "threading",
    "subprocess",
    "multiprocessing",
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "time",
    "datetime",
    "random",
    "secrets",
    "select",
    "selectors",
    "signal",
    "logging",
    "psycopg",
    "urllib",
    "http",
}
FORBIDDEN_NAMES = {"open", "input", "print", "exec", "eval", "__import__"}


def _core_files() -> list[Path]:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 10
    return files


def _violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        else:
            names = []
        found += [f"import {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_NAMES:
            found.append(f"call {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr in {"urandom", "time", "monotonic", "now"}:
            found.append(f"attribute .{node.attr}")
    return found


def test_core_imports_no_io_and_reads_no_clock():
    problems = {path.name: v for path in _core_files() if (v := _violations(path.read_text()))}
    assert problems == {}


def test_the_checker_catches_violations():
    sample = "import socket\nfrom time import monotonic\nimport os.path\nx = os.urandom(3)\nopen('f')\n"
    assert sorted(_violations(sample)) == sorted(
        ["import socket", "import time", "import os.path", "attribute .urandom", "call open()"]
    )


ROOT = CORE.parent
#: Where code must reach the core through its public API only (issue 13). Tests of the
#: core's internals and the tools that generate its vectors are listed in PRIVATE_ALLOWED.
PUBLIC_ONLY = ("adapters", "keymgmt")


def _private_core_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            names = []
        found += [n for n in names if n.startswith("keymgmt_proto._")]
    return sorted(set(found))


def test_adapters_use_only_the_public_core_api():
    files = [p for top in PUBLIC_ONLY for p in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) >= 20
    problems = {str(p.relative_to(ROOT)): v for p in files if (v := _private_core_imports(p.read_text()))}
    assert problems == {}


def test_the_private_import_checker_catches_each_form():
    sample = "\n".join(
        [
            "import keymgmt_proto._wire",
            "from keymgmt_proto._ops import Op",
            "from keymgmt_proto import _crypto",
        ]
    )
    assert _private_core_imports(sample) == [
        "keymgmt_proto._crypto",
        "keymgmt_proto._ops",
        "keymgmt_proto._ops.Op",
        "keymgmt_proto._wire",
    ]
