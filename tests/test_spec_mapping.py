"""SPEC_MAPPING.md covers every requirement of docs/requirements.md, and names only code and tests that exist.

The checker parses the mapping's table (columns ID, Status, What the project
does, Code, Tests) and reports:

- an ID of docs/requirements.md without a row, a row for an ID it does not have, a duplicate row;
- a Status other than ``done``, ``partial (pending: issue #N)`` or ``pending: issue #N``;
- a row without code, or a row that is not wholly pending without tests;
- a ``done`` row whose tests are all expected failures (xfail);
- a code reference ``module:qualified.name`` that does not import or resolve;
- a test reference ``tests/file.py::test_name`` (or ``::TestClass::test_method``) whose
  file, function or method does not exist or would not be collected by pytest.

The tests at the end show that the checker catches a removed row, a renamed test
and a misspelt symbol.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def resolve_code(ref: str) -> str | None:
    """None if ``module:qualified.name`` exists, else what is wrong."""
    match = CODE_REF.match(ref)
    if match is None:
        return f"code reference {ref!r} is not module:qualified_name"
    module_name, qualname = match.groups()
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        return f"code reference {ref!r}: cannot import {module_name} ({exc})"
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return f"code reference {ref!r}: {part!r} not found"
        obj = getattr(obj, part)
    return None


def _is_xfail(obj: object) -> bool:
    return any(mark.name == "xfail" for mark in getattr(obj, "pytestmark", []))


def resolve_test(ref: str) -> tuple[str | None, bool]:
    """(problem or None, whether the test is marked xfail) for ``tests/f.py::name[::method]``."""
    match = TEST_REF.match(ref)
    if match is None:
        return f"test reference {ref!r} is not tests/file.py::test_name[::test_method]", False
    path, name, method = match.groups()
    if not (ROOT / path).is_file():
        return f"test reference {ref!r}: no file {path}", False
    if not Path(path).name.startswith("test_"):
        return f"test reference {ref!r}: pytest does not collect {path}", False
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    obj = getattr(module, name, None)
    if obj is None:
        return f"test reference {ref!r}: no {name} in {path}", False
    if method is None:
        if not (name.startswith("test") and callable(obj)):
            return f"test reference {ref!r}: {name} is not a test function", False
        return None, _is_xfail(obj)
    if not (name.startswith("Test") and isinstance(obj, type)):
        return f"test reference {ref!r}: {name} is not a test class", False
    test = getattr(obj, method, None)
    if test is None or not method.startswith("test") or not callable(test):
        return f"test reference {ref!r}: no test method {method} in {name}", False
    return None, _is_xfail(test) or _is_xfail(obj)


def check(mapping_text: str, spec_text: str) -> list[str]:
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
        xfails = []
        for ref in row.tests:
            problem, xfail = resolve_test(ref)
            if problem:
                problems.append(f"{row.id}: {problem}")
            xfails.append(xfail)
        if row.status == "done" and row.tests and all(xfails):
            problems.append(f"{row.id}: done, but every test named is an expected failure")
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
    old = "tests/test_ops.py::test_another_users_key_looks_exactly_like_a_missing_one`"
    new = "tests/test_ops.py::test_another_users_key_looks_exactly_like_a_missing_one_renamed`"
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
    test = "`tests/test_spec_mapping.py::test_checker_reports_bad_rows`"
    xfail = "`tests/test_spec_mapping.py::test_an_expected_failure_for_the_checker`"
    code = "`keymgmt_proto._wire:encode_frame`"
    table = header + "".join(
        [
            f"| AAA-1 | done | x | {code} | {test} |\n",
            f"| AAA-1 | finished | x | {code} | {test} |\n",
            f"| AAA-2 | done | x | | {xfail} |\n",
            f"| AAA-9 | pending: issue #5 | x | {code} | `tests/helpers.py::only` |\n",
        ]
    )
    assert check(table, spec) == [
        "AAA-1: more than one row",
        "AAA-3: missing from SPEC_MAPPING.md",
        "AAA-9: not a requirement of docs/requirements.md",
        f"AAA-1: status 'finished' is not {STATUS_WORDS}",
        "AAA-2: no code named",
        "AAA-2: done, but every test named is an expected failure",
        "AAA-9: test reference 'tests/helpers.py::only': pytest does not collect tests/helpers.py",
    ]
    assert check("no table here", spec)[0].startswith("no table with the columns")


@pytest.mark.xfail(strict=True, reason="an expected failure for test_checker_reports_bad_rows to point at")
def test_an_expected_failure_for_the_checker():
    raise AssertionError("deliberate: a done row resting only on this test must be reported")


def test_readme_names_only_tests_that_exist():
    readme = (ROOT / "README.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py::[\w:]+)`", readme)
    assert len(references) >= 10
    problems = [problem for ref in references if (problem := resolve_test(ref)[0]) is not None]
    assert problems == []
