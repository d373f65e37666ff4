"""keymgmt_proto is sans-I/O: it imports nothing that does I/O and reads no clock. Everything
outside it (adapters, tools, the core's own tests) reaches it through its public API only."""

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
#: Where code must reach the core through its public API only (issue 13): ``keymgmt_proto``,
#: ``keymgmt_proto.wire`` and ``keymgmt_proto.testing``, never a ``keymgmt_proto._*`` module
#: or a private name. The core's own tests are held to it too, with the helpers they use.
PUBLIC_ONLY = ("adapters", "keymgmt", "fuzz", "bench", "scripts", "tests/core", "tests/support")
#: What a core test may take from the adapters: the in-memory pair that joins a client and a
#: server connection without sockets, and its reference application.
CORE_TESTS_MAY_USE = {"keymgmt.adapters": {"Delivery", "InMemoryPair", "MemoryServerApp"}}


def _private(name: str) -> bool:
    """``keymgmt_proto._x``, or a private name in a public module (``keymgmt_proto.testing._h``)."""
    parts = name.split(".")
    return parts[0] == "keymgmt_proto" and any(
        part.startswith("_") and not part.startswith("__") for part in parts[1:]
    )


def _private_core_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            names = []
        found += [n for n in names if _private(n)]
    return sorted(set(found))


def _public_only_files() -> list[Path]:
    return [p for top in PUBLIC_ONLY for p in sorted((ROOT / top).rglob("*.py"))]


def test_adapters_use_only_the_public_core_api():
    files = _public_only_files()
    assert len(files) >= 60
    assert {"fuzz", "bench", "scripts", "tests"} <= {p.relative_to(ROOT).parts[0] for p in files}
    problems = {str(p.relative_to(ROOT)): v for p in files if (v := _private_core_imports(p.read_text()))}
    assert problems == {}


def _adapter_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "keymgmt"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module.split(".")[0] == "keymgmt":
                allowed = CORE_TESTS_MAY_USE.get(module, set())
                found += [f"{module}.{a.name}" for a in node.names if a.name not in allowed]
    return sorted(set(found))


def test_core_tests_use_no_adapter_but_the_in_memory_pair():
    files = sorted((ROOT / "tests" / "core").rglob("*.py"))
    assert len(files) >= 15
    problems = {str(p.relative_to(ROOT)): v for p in files if (v := _adapter_imports(p.read_text()))}
    assert problems == {}


def test_the_private_import_checker_catches_each_form():
    sample = "\n".join(
        [
            "import keymgmt_proto._wire",
            "from keymgmt_proto._ops import Op",
            "from keymgmt_proto import _crypto",
            "from keymgmt_proto.testing import FakeOpaque, _h",
            "from keymgmt_proto import __version__, ServerConfig",
            "from keymgmt_proto.wire import encode_frame",
        ]
    )
    assert _private_core_imports(sample) == [
        "keymgmt_proto._crypto",
        "keymgmt_proto._ops",
        "keymgmt_proto._ops.Op",
        "keymgmt_proto._wire",
        "keymgmt_proto.testing._h",
    ]


def test_the_adapter_import_checker_allows_only_the_in_memory_pair():
    sample = "\n".join(
        [
            "from keymgmt.adapters import InMemoryPair, MemoryServerApp, Delivery",
            "from keymgmt.adapters import KeyServer",
            "from keymgmt.adapters.testing.memory import InMemoryPair",
            "from keymgmt import Client",
            "import keymgmt.adapters.server.app",
            "from keymgmt_proto import ServerConfig",
        ]
    )
    assert _adapter_imports(sample) == [
        "keymgmt.Client",
        "keymgmt.adapters.KeyServer",
        "keymgmt.adapters.server.app",
        "keymgmt.adapters.testing.memory.InMemoryPair",
    ]
