"""SPEC_MAPPING.md covers every requirement of docs/requirements.md, and names only code and
tests that exist and prove something.

The checker parses the mapping's table (columns ID, Status, What the project does, Code,
Tests) and its Deviations section, and reports:

- an ID of docs/requirements.md without a row, a row for an ID it does not have, a
  duplicate row;
- a Status other than ``done``, ``partial (pending: issue #N)`` or ``pending: issue #N``;
- a row without code, or a row that is not wholly pending without tests;
- a code reference ``module:qualified.name`` that does not import, or that names something
  the module does not define itself (imported or inherited names do not count);
- a test reference ``tests/file.py::test_name`` (or ``::TestClass::test_method``) whose
  file, function or method does not exist or would not be collected, or whose body asserts
  nothing (no ``assert`` of a non-constant, no ``pytest.raises``);
- a ``done`` row naming a test that is skipped or expected to fail: a skip, skipif or xfail
  decorator, a module or class ``pytestmark``, or a ``pytest.skip``/``xfail``/
  ``importorskip`` call in its body;
- a deviation that names no test, or names one with any of the problems above.

Tests are read from their source (AST), never imported. The tests at the end show that
the checker catches a removed row, a renamed test, a misspelt symbol, an imported name, and
each way of passing a ``done`` row without a test that can fail.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPING = ROOT / "SPEC_MAPPING.md"
SPEC = ROOT / "docs" / "requirements.md"

ID_PATTERN = re.compile(r"^[A-Z]{3}-\d+$")
SPEC_ID = re.compile(r"^- ([A-Z]{3}-\d+)\b", re.MULTILINE)
STATUS = re.compile(r"^(done|partial \(pending: issue #\d+(, #\d+)*\)|pending: issue #\d+(, #\d+)*)$")
CODE_REF = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
TEST_REF = re.compile(r"^(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?$")
STATUS_WORDS = "done / partial (pending: issue #N) / pending: issue #N"
COLUMNS = ("ID", "Status", "What the project does", "Code", "Tests")


@dataclass(frozen=True)
class Row:
    id: str
    status: str
    summary: str
    code: tuple[str, ...]
    tests: tuple[str, ...]


def spec_ids(spec_text: str) -> list[str]:
    """Requirement IDs in docs/requirements.md: the ``- XXX-n`` items."""
    return SPEC_ID.findall(spec_text)


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [part.strip() for part in parts[1:-1]]


def parse_mapping(text: str) -> tuple[list[Row], list[str]]:
    """The table's rows, and problems with the table's shape."""
    rows: list[Row] = []
    problems: list[str] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if header is None and tuple(cells) == COLUMNS:
            header = cells
            continue
        if not cells or not ID_PATTERN.match(cells[0]):
            continue
        if header is None:
            problems.append(f"{cells[0]}: row before the table header {' | '.join(COLUMNS)}")
            continue
        if len(cells) != len(COLUMNS):
            problems.append(f"{cells[0]}: {len(cells)} cells, expected {len(COLUMNS)}")
            continue
        ident, status, summary, code, tests = cells
        rows.append(
            Row(
                ident,
                status.strip("`"),
                summary,
                tuple(re.findall(r"`([^`]+)`", code)),
                tuple(re.findall(r"`([^`]+)`", tests)),
            )
        )
    if header is None:
        problems.append(f"no table with the columns {' | '.join(COLUMNS)}")
    return rows, problems


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _defined_names(tree: ast.Module | ast.ClassDef) -> set[str]:
    """Names a module (or class) body defines itself: def, class, assignment."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def resolve_code(ref: str) -> str | None:
    """None if ``module:qualified.name`` exists and is *defined in that module* (a name the
    module only imports does not count), else what is wrong."""
    match = CODE_REF.match(ref)
    if match is None:
        return f"code reference {ref!r} is not module:qualified_name"
    module_name, qualname = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"code reference {ref!r}: cannot import {module_name} ({exc})"
    source = inspect.getsourcefile(module)
    assert source is not None
    scope: ast.Module | ast.ClassDef = _parse(Path(source))
    obj: object = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return f"code reference {ref!r}: {part!r} not found"
        if scope is not None and part not in _defined_names(scope):
            where = module_name if isinstance(scope, ast.Module) else scope.name
            return f"code reference {ref!r}: {part!r} is not defined in {where} (only imported or inherited)"
        obj = getattr(obj, part)
        classes = [n for n in scope.body if isinstance(n, ast.ClassDef) and n.name == part] if scope else []
        scope = classes[0] if classes else None  # type: ignore[assignment]
    return None


def _is_skip_or_xfail(node: ast.expr) -> bool:
    """``pytest.mark.skip``, ``skipif``, ``xfail`` (called or not), or a list of them."""
    if isinstance(node, ast.List | ast.Tuple):
        return any(_is_skip_or_xfail(item) for item in node.elts)
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr in ("skip", "skipif", "xfail")


def _pytestmark(body: list[ast.stmt]) -> bool:
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and _is_skip_or_xfail(node.value)
        for node in body
    )


def _skips_itself(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A call to pytest.skip, pytest.xfail or pytest.importorskip anywhere in the body."""
    for node in ast.walk(function):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and func.attr in ("skip", "xfail", "importorskip"):
            return True
    return False


def _asserts_something(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """An ``assert`` of something that is not a constant, or a ``pytest.raises``."""
    for node in ast.walk(function):
        if isinstance(node, ast.Assert) and not isinstance(node.test, ast.Constant):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "raises") or (
                isinstance(func, ast.Name) and func.id == "raises"
            ):
                return True
    return False


@dataclass(frozen=True)
class TestFacts:
    """What the checker learned about one named test."""

    __test__ = False  # a record, not a test class

    problem: str | None
    skipped: bool = False  # marked skip/skipif/xfail, or skips itself
    xfail: bool = False


def resolve_test(ref: str, root: Path = ROOT) -> TestFacts:
    """Whether ``tests/f.py::name[::method]`` exists, is collected, asserts something, and
    whether it is skipped or expected to fail, read from its source (nothing is imported)."""
    match = TEST_REF.match(ref)
    if match is None:
        return TestFacts(f"test reference {ref!r} is not tests/file.py::test_name[::test_method]")
    path, name, method = match.groups()
    file = root / path
    if not file.is_file():
        return TestFacts(f"test reference {ref!r}: no file {path}")
    if not Path(path).name.startswith("test_"):
        return TestFacts(f"test reference {ref!r}: pytest does not collect {path}")
    tree = _parse(file)
    top = {
        n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    node = top.get(name)
    if node is None:
        return TestFacts(f"test reference {ref!r}: no {name} in {path}")
    decorators = list(node.decorator_list)
    module_marked = _pytestmark(tree.body)
    if method is None:
        if not (name.startswith("test") and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)):
            return TestFacts(f"test reference {ref!r}: {name} is not a test function")
        function = node
    else:
        if not (name.startswith("Test") and isinstance(node, ast.ClassDef)):
            return TestFacts(f"test reference {ref!r}: {name} is not a test class")
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if not method.startswith("test") or method not in methods:
            return TestFacts(f"test reference {ref!r}: no test method {method} in {name}")
        function = methods[method]
        decorators += function.decorator_list
        module_marked = module_marked or _pytestmark(node.body)
    xfail = any(_is_skip_or_xfail(d) and "xfail" in ast.unparse(d) for d in decorators)
    skipped = module_marked or any(_is_skip_or_xfail(d) for d in decorators) or _skips_itself(function)
    if not _asserts_something(function):
        return TestFacts(f"test reference {ref!r}: asserts nothing (no assert, no pytest.raises)", skipped)
    return TestFacts(None, skipped, xfail)


DEVIATION = re.compile(
    r"^\d+\. \*\*(?P<title>.+?)\*\*(?P<body>.*?)(?=^\d+\. \*\*|\Z)", re.MULTILINE | re.DOTALL
)


def check_deviations(mapping_text: str, root: Path = ROOT) -> list[str]:
    """Every deviation names at least one test, and every test it names exists and asserts."""
    if "## Deviations" not in mapping_text:
        return ["no Deviations section"]
    section = mapping_text.split("## Deviations", 1)[1]
    problems = []
    items = list(DEVIATION.finditer(section))
    if not items:
        problems.append("the Deviations section lists nothing")
    for item in items:
        title = item["title"]
        refs = re.findall(r"`(tests/[\w/]+\.py::[\w:]+)`", item["body"])
        if not refs:
            problems.append(f"deviation {title!r}: names no test")
        for ref in refs:
            facts = resolve_test(ref, root)
            if facts.problem:
                problems.append(f"deviation {title!r}: {facts.problem}")
            elif facts.skipped:
                problems.append(f"deviation {title!r}: {ref} is skipped or expected to fail")
    return problems


def check(mapping_text: str, spec_text: str, root: Path = ROOT) -> list[str]:
    """Every problem with ``mapping_text`` against ``spec_text`` (empty if none)."""
    rows, problems = parse_mapping(mapping_text)
    required = spec_ids(spec_text)
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            problems.append(f"{row.id}: more than one row")
        seen.add(row.id)
    problems += [f"{ident}: missing from SPEC_MAPPING.md" for ident in required if ident not in seen]
    unknown = sorted(seen - set(required))
    problems += [f"{ident}: not a requirement of docs/requirements.md" for ident in unknown]
    for row in rows:
        if not STATUS.match(row.status):
            problems.append(f"{row.id}: status {row.status!r} is not {STATUS_WORDS}")
        if not row.code:
            problems.append(f"{row.id}: no code named")
        if not row.tests and not row.status.startswith("pending"):
            problems.append(f"{row.id}: no test named")
        problems += [f"{row.id}: {p}" for ref in row.code if (p := resolve_code(ref))]
        for ref in row.tests:
            facts = resolve_test(ref, root)
            if facts.problem:
                problems.append(f"{row.id}: {facts.problem}")
            elif row.status == "done" and facts.skipped:
                kind = "an expected failure" if facts.xfail else "skipped"
                problems.append(f"{row.id}: done, but {ref} is {kind}")
    return problems


# ------------------------------------------------------------------ the checks


@pytest.fixture(scope="module")
def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def mapping_text() -> str:
    return MAPPING.read_text(encoding="utf-8")


def test_spec_has_the_expected_requirement_ids(spec_text):
    ids = spec_ids(spec_text)
    assert len(ids) == len(set(ids)) >= 30
    assert {"CRY-1", "NET-11", "REG-4", "OPS-8", "KEY-1", "AUD-2", "STO-2"} <= set(ids)


def test_spec_mapping_is_complete_and_every_reference_exists(mapping_text, spec_text):
    assert check(mapping_text, spec_text) == []


def test_spec_mapping_rows_follow_spec_order(mapping_text, spec_text):
    rows, _ = parse_mapping(mapping_text)
    assert [row.id for row in rows] == spec_ids(spec_text)


def _without_row(text: str, ident: str) -> str:
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(f"| {ident} |")]
    assert len(kept) == len(lines) - 1
    return "".join(kept)


def test_checker_reports_a_removed_row(mapping_text, spec_text):
    problems = check(_without_row(mapping_text, "CRY-2"), spec_text)
    assert problems == ["CRY-2: missing from SPEC_MAPPING.md"]


def test_checker_reports_a_renamed_test(mapping_text, spec_text):
    old = "tests/client/test_ops.py::test_another_users_key_looks_exactly_like_a_missing_one`"
    new = "tests/client/test_ops.py::test_another_users_key_looks_exactly_like_a_missing_one_renamed`"
    assert old in mapping_text
    problems = check(mapping_text.replace(old, new), spec_text)
    assert problems
    assert all("test_another_users_key_looks_exactly_like_a_missing_one_renamed" in p for p in problems)
    assert all("no test_another_users_key_looks_exactly_like_a_missing_one_renamed in" in p for p in problems)


def test_checker_reports_a_missing_code_symbol_and_module(mapping_text, spec_text):
    assert "`keymgmt_proto._crypto:Channel.open`" in mapping_text
    broken = mapping_text.replace(
        "`keymgmt_proto._crypto:Channel.open`", "`keymgmt_proto._crypto:Channel.opn`"
    )
    broken = broken.replace("`keymgmt_proto._ops:derive_key_id`", "`keymgmt_proto._nope:derive_key_id`", 1)
    problems = check(broken, spec_text)
    assert any("'opn' not found" in p for p in problems)
    assert any("cannot import keymgmt_proto._nope" in p for p in problems)


def test_checker_reports_bad_rows():
    spec = "- AAA-1 one\n- AAA-2 two\n- AAA-3 three\n"
    header = "| " + " | ".join(COLUMNS) + " |\n|---|---|---|---|---|\n"
    test = "`tests/repo/test_spec_mapping.py::test_checker_reports_bad_rows`"
    xfail = "`tests/repo/test_spec_mapping.py::test_an_expected_failure_for_the_checker`"
    code = "`keymgmt_proto._wire:encode_frame`"
    table = header + "".join(
        [
            f"| AAA-1 | done | x | {code} | {test} |\n",
            f"| AAA-1 | finished | x | {code} | {test} |\n",
            f"| AAA-2 | done | x | | {xfail} |\n",
            f"| AAA-9 | pending: issue #5 | x | {code} | `tests/support/helpers.py::only` |\n",
        ]
    )
    assert check(table, spec) == [
        "AAA-1: more than one row",
        "AAA-3: missing from SPEC_MAPPING.md",
        "AAA-9: not a requirement of docs/requirements.md",
        f"AAA-1: status 'finished' is not {STATUS_WORDS}",
        "AAA-2: no code named",
        "AAA-2: done, but tests/repo/test_spec_mapping.py::test_an_expected_failure_for_the_checker is "
        "an expected failure",
        "AAA-9: test reference 'tests/support/helpers.py::only': "
        "pytest does not collect tests/support/helpers.py",
    ]
    assert check("no table here", spec)[0].startswith("no table with the columns")


@pytest.mark.xfail(strict=True, reason="an expected failure for test_checker_reports_bad_rows to point at")
def test_an_expected_failure_for_the_checker():
    assert sum([1, 1]) == 3, "deliberate: a done row resting only on this test must be reported"


FOOLING_TESTS = """
import pytest

pytestmark = [pytest.mark.anyio]


@pytest.mark.skip(reason="not today")
def test_skipped_by_a_decorator():
    assert 1 + 1 == 2


@pytest.mark.skipif(True, reason="never")
def test_skipped_if():
    assert 1 + 1 == 2


def test_skips_itself():
    pytest.skip("later")
    assert 1 + 1 == 2


def test_asserts_only_a_constant():
    assert True


def test_asserts_nothing():
    print("hello")


def test_real():
    assert sum([1, 1]) == 2


class TestGrouped:
    pytestmark = pytest.mark.xfail(reason="broken")

    def test_in_an_xfail_class(self):
        assert sum([1, 1]) == 2
"""

SKIPPED_MODULE = """
import pytest

pytestmark = pytest.mark.skip(reason="the whole file")


def test_in_a_skipped_module():
    assert sum([1, 1]) == 2
"""


def _fooling_world(tmp_path: Path) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fooling.py").write_text(FOOLING_TESTS)
    (tmp_path / "tests" / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    return tmp_path


def _one_row(test_ref: str, code: str = "`keymgmt_proto._wire:encode_frame`", status: str = "done") -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|---|---|---|---|---|\n"
    return header + f"| AAA-1 | {status} | x | {code} | `{test_ref}` |\n"


@pytest.mark.parametrize(
    ("test_ref", "problem"),
    [
        ("tests/test_fooling.py::test_skipped_by_a_decorator", "is skipped"),
        ("tests/test_fooling.py::test_skipped_if", "is skipped"),
        ("tests/test_fooling.py::test_skips_itself", "is skipped"),
        ("tests/test_skipped_module.py::test_in_a_skipped_module", "is skipped"),
        ("tests/test_fooling.py::TestGrouped::test_in_an_xfail_class", "is skipped"),
        ("tests/test_fooling.py::test_asserts_only_a_constant", "asserts nothing"),
        ("tests/test_fooling.py::test_asserts_nothing", "asserts nothing"),
    ],
)
def test_the_checker_cannot_be_fooled_by_tests(tmp_path, test_ref, problem):
    """A done row resting on a skipped or xfailed test, or on a test that asserts nothing
    (or only `assert True`), is reported."""
    root = _fooling_world(tmp_path)
    problems = check(_one_row(test_ref), "- AAA-1 one\n", root)
    assert len(problems) == 1 and problem in problems[0], problems
    assert check(_one_row("tests/test_fooling.py::test_real"), "- AAA-1 one\n", root) == []


def test_the_checker_cannot_be_fooled_by_an_imported_name():
    """`module:name` must name something the module defines, not something it imports: every
    adapters module imports ErrorCode, yet only keymgmt_proto._errors defines it."""
    assert resolve_code("keymgmt_proto._errors:ErrorCode") is None
    problem = resolve_code("keymgmt.adapters.server.app:ErrorCode")
    assert problem is not None and "not defined in keymgmt.adapters.server.app" in problem
    problem = resolve_code("keymgmt_proto._server:ServerConnection.receive_data_nope")
    assert problem is not None and "not found" in problem
    inherited = resolve_code("keymgmt_proto._server:ServerConnection.data_to_send")  # from ConnectionBase
    assert inherited is not None and "not defined in ServerConnection" in inherited
    assert resolve_code("keymgmt_proto._server:ServerConnection.accept_login") is None
    assert resolve_code("keymgmt_proto._server:ServerConfig.idle_timeout") is None


def test_every_deviation_names_a_test_that_asserts(mapping_text):
    assert check_deviations(mapping_text) == []
    stripped = re.sub(r"`tests/[\w/]+\.py::[\w:]+`", "(no test)", mapping_text)
    assert any("names no test" in p for p in check_deviations(stripped))
    renamed = mapping_text.replace("::test_deadlines_are_exact_with_a_virtual_clock`", "::test_gone`")
    assert any("no test_gone in" in p for p in check_deviations(renamed))


def test_readme_names_only_tests_that_exist():
    readme = (ROOT / "README.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py::[\w:]+)`", readme)
    assert len(references) >= 10
    problems = [facts.problem for ref in references if (facts := resolve_test(ref)).problem is not None]
    assert problems == []
