"""The docs stay true to the code: the generated state diagrams are current, and
docs/protocol.md names every frame type, error code, label and size constant, and
every value of the operation enums (Op, Status, SecretKind, Context, AuditType,
Action, Outcome), each in its own table.

Constants are gathered by introspection, so a new one that is not documented
fails here.

The docs also stay true to each other: every reference to a section (``README,
*Security*``, ``docs/architecture.md, "Group commit"``, ``see *Tests*``,
``protocol.md section 5.4``) and every relative Markdown link, in the documents
and in the code, names a heading and a file that exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import keymgmt_proto
from keymgmt_proto import (
    Action,
    AuditType,
    Context,
    Direction,
    ErrorCode,
    FrameType,
    Op,
    Outcome,
    SecretKind,
    Status,
)

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"
SCRIPT = ROOT / "scripts" / "gen_state_diagram.py"

_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")

#: Core modules whose constants protocol.md does not cover yet. Every other
#: ``keymgmt_proto`` module is scanned, so a new module or constant is caught.
NOT_YET_DOCUMENTED: frozenset[str] = frozenset()


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_state_diagram", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _constants(module: ModuleType, kind: type) -> dict[str, object]:
    """Module-level UPPER_CASE constants of exactly ``kind`` (not enums, not bools)."""
    return {
        name: value
        for name, value in vars(module).items()
        if _CONSTANT_NAME.match(name) and type(value) is kind
    }


def _protocol_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


SCANNED_MODULES = [
    importlib.import_module(f"keymgmt_proto.{info.name}")
    for info in pkgutil.iter_modules(keymgmt_proto.__path__)
    if info.name not in NOT_YET_DOCUMENTED
]
BYTES_CONSTANTS = {
    name: value for module in SCANNED_MODULES for name, value in _constants(module, bytes).items()
}
INT_CONSTANTS = {name: value for module in SCANNED_MODULES for name, value in _constants(module, int).items()}


# ------------------------------------------------------------ state diagrams


def test_state_diagrams_in_architecture_md_are_current():
    script = _load_script()
    assert script.is_up_to_date(ARCHITECTURE_MD.with_name("protocol.md")), (
        "docs/protocol.md is stale: run `python scripts/gen_state_diagram.py --write`"
    )
    assert script.is_up_to_date(ARCHITECTURE_MD), (
        "docs/architecture.md is stale: run `python scripts/gen_state_diagram.py --write`"
    )
    assert script.main(["--check", "--path", str(ARCHITECTURE_MD)]) == 0


def test_diagram_check_detects_a_stale_block(tmp_path):
    script = _load_script()
    stale = tmp_path / "architecture.md"
    stale.write_text(f"intro\n{script.BEGIN_MARKER}\nold\n{script.END_MARKER}\n", encoding="utf-8")
    assert script.main(["--check", "--path", str(stale)]) == 1
    assert script.main(["--write", "--path", str(stale)]) == 0
    assert script.main(["--check", "--path", str(stale)]) == 0
    text = stale.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.count("stateDiagram-v2") == 4


# ------------------------------------------------------------ protocol.md


def test_introspection_finds_the_constants():
    # Guards the introspection itself: if these vanish, the tests below prove nothing.
    assert {"CHANNEL_SALT", "MASTER_KEY_INFO", "STORAGE_KEY_AD_SUFFIX"} <= BYTES_CONSTANTS.keys()
    assert {"LABEL_HANDLE", "LABEL_C2S_KEY", "LABEL_S2C_IV"} <= BYTES_CONSTANTS.keys()
    assert {"HEADER_SIZE", "CREDENTIAL_RESPONSE_SIZE", "ENCRYPTED_STORAGE_KEY_SIZE"} <= INT_CONSTANTS.keys()
    assert {"KEY_ID_DOMAIN", "IMPORTED_KEY_AD_SUFFIX"} <= BYTES_CONSTANTS.keys()
    assert {
        "KEY_ID_SIZE",
        "GENERATED_SECRET_SIZE",
        "MAX_SECRET_SIZE",
        "MAX_AUDIT_PAGE",
    } <= INT_CONSTANTS.keys()
    scanned = {module.__name__.rpartition(".")[2] for module in SCANNED_MODULES}
    assert {"_wire", "_messages", "_crypto", "_client", "_ops"} <= scanned


def _has_row(*cells: str) -> bool:
    """True if protocol.md has a table row whose consecutive cells start with ``cells``."""
    pattern = r"^\|" + r"\|".join(rf"\s*{re.escape(cell)}\s*" for cell in cells) + r"\|"
    return re.search(pattern, _protocol_text(), re.MULTILINE) is not None


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_every_frame_type_is_documented_with_its_value(frame_type):
    value = f"0x{frame_type.value:02X}"
    assert _has_row(f"`{value}`", f"`{frame_type.name}`"), (
        f"no `| {value} | {frame_type.name} |` row in protocol.md"
    )


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_every_error_code_is_documented_with_its_value(code):
    assert _has_row(str(code.value), f"`{code.name}`"), (
        f"no `| {code.value} | {code.name} |` row in protocol.md"
    )


@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.name)
def test_every_direction_is_documented_with_its_value(direction):
    assert f"`{direction.name}` = {direction.value}" in _protocol_text(), f"{direction.name} missing"


@pytest.mark.parametrize("name", sorted(BYTES_CONSTANTS))
def test_every_label_is_documented_as_ascii(name):
    value = BYTES_CONSTANTS[name]
    assert isinstance(value, bytes)
    ascii_text = value.decode("ascii")
    assert _has_row(f"`{name}`", f'`"{ascii_text}"`', str(len(value))), (
        f'no `| {name} | "{ascii_text}" | {len(value)} |` row in protocol.md'
    )


@pytest.mark.parametrize("name", sorted(INT_CONSTANTS))
def test_every_size_constant_is_documented_with_its_value(name):
    value = INT_CONSTANTS[name]
    assert _has_row(f"`{name}`", str(value)), f"no `| {name} | {value} |` row in protocol.md"


# ------------------------------------------------------------ operation enums

#: The enums of the operation bodies. Their names and values overlap (``OK`` = 0
#: in Status and ErrorCode, ``AUDIT`` in Op and Action), so each is checked in
#: its own table: the one under the heading that ends with ``(`EnumName`)``.
OPS_ENUMS = [Op, Status, SecretKind, Context, AuditType, Action, Outcome]
_TABLE_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([A-Z][A-Z0-9_]*)`\s*\|(.*)$", re.MULTILINE)


def _enum_section(enum: type) -> str:
    """The text from the heading ending in ``(`Name`)`` up to the next heading."""
    text = _protocol_text()
    heading = re.compile(rf"^#+ .*\(`{enum.__name__}`\)\s*$", re.MULTILINE)
    matches = list(heading.finditer(text))
    assert len(matches) == 1, f"protocol.md needs exactly one heading ending in (`{enum.__name__}`)"
    start = matches[0].end()
    following = re.search(r"^#", text[start:], re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def _enum_rows(enum: type) -> dict[str, tuple[int, str]]:
    """``name -> (value, rest of the row)`` for the rows of the enum's own table."""
    return {name: (int(value), rest) for value, name, rest in _TABLE_ROW.findall(_enum_section(enum))}


@pytest.mark.parametrize("enum", OPS_ENUMS, ids=lambda e: e.__name__)
def test_every_ops_enum_table_lists_exactly_its_members(enum):
    rows = _TABLE_ROW.findall(_enum_section(enum))
    documented = sorted((name, int(value)) for value, name, _rest in rows)
    assert documented == sorted((member.name, member.value) for member in enum), (
        f"the (`{enum.__name__}`) table in protocol.md does not match the code"
    )


@pytest.mark.parametrize(
    "member",
    [member for enum in OPS_ENUMS for member in enum],
    ids=lambda m: f"{type(m).__name__}.{m.name}",
)
def test_every_ops_enum_member_is_documented_with_its_value(member):
    rows = _enum_rows(type(member))
    assert rows.get(member.name, (None, ""))[0] == member.value, (
        f"no `| {member.value} | {member.name} |` row under (`{type(member).__name__}`) in protocol.md"
    )


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.name)
def test_key_actions_are_marked_in_the_action_table(action):
    _value, rest = _enum_rows(Action)[action.name]
    marker = rest.split("|")[0].strip()
    assert marker == ("yes" if action.is_key_action else "no"), (
        f"{action.name}: the key action column says {marker!r}"
    )


def test_audit_entry_no_context_marker_is_documented():
    # AuditEntry encodes "no context" as 0xFF; it must not be a Context value.
    assert 0xFF not in {c.value for c in Context}
    assert "`0xFF` = none" in _protocol_text()


# ------------------------------------------------------------ references between documents

#: A reference that names its document: ``README, *Security*``, ``docs/architecture.md,
#: *Threats*``, ``(architecture.md, "Group commit")``, or ``[operations.md, *Logs*](...)``.
_QUALIFIED_REFERENCE = re.compile(
    r"\b(?P<document>README(?:\.md)?|SPEC_MAPPING\.md|(?:docs/)?[a-z_]+\.md),\s+"
    r"(?:\*(?P<starred>[^*]+)\*|\"(?P<quoted>[^\"]+)\")"
)
#: A reference to a section of the same document: ``see *Tests*``, ``under *Network runtime*``.
_LOCAL_REFERENCE = re.compile(r"\b(?:see|under)\s+\*(?P<section>[A-Z][^*]*)\*")
#: ``protocol.md section 5.4``, ``docs/protocol.md, section 12``, ``sections 4.2 and 5.2-5.3``.
_PROTOCOL_SECTIONS = re.compile(
    r"protocol\.md,?\s+sections?\s+(?P<numbers>\d+(?:\.\d+)*(?:(?:\s*,\s*|\s+and\s+|-)\d+(?:\.\d+)*)*)"
)
#: A Markdown link (not an image): ``[text](target)``.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
_SECTION_NUMBER = re.compile(r"^(?P<number>\d+(?:\.\d+)*)\.?\s+")
_SKIPPED_DIRECTORIES = {"__pycache__", "build", "dist", "mutants", "node_modules"}


def _repository_texts() -> dict[Path, str]:
    """Every Markdown and Python file of the repository (not .venv, caches, build output)."""
    texts: dict[Path, str] = {}
    for folder, directories, files in os.walk(ROOT):
        directories[:] = [
            d
            for d in directories
            if not d.startswith(".") and not d.endswith(".egg-info") and d not in _SKIPPED_DIRECTORIES
        ]
        for name in files:
            if name.endswith((".md", ".py")):
                path = Path(folder) / name
                texts[path] = path.read_text(encoding="utf-8")
    return texts


def headings(markdown: str) -> list[str]:
    """The headings of a Markdown text, in order, outside fenced code blocks."""
    found: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            found.append(match["text"])
    return found


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings (lower case, punctuation dropped, spaces to
    hyphens; a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for heading in headings(markdown):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def _section_names(heading: str) -> set[str]:
    """What a reference may call a heading: all of it, without its number
    (``10. Limits and defaults``), and without a trailing parenthesis as well
    (``Several instances (PostgreSQL)``, ``Network runtime (adapters/server/, ...)``)."""
    name = " ".join(heading.replace("`", "").split())
    unnumbered = _SECTION_NUMBER.sub("", name)
    return {name, unnumbered, re.sub(r"\s*\([^()]*\)$", "", unnumbered)}


def _document_path(name: str) -> Path:
    if name in ("README", "README.md"):
        return ROOT / "README.md"
    if "/" in name or name == "SPEC_MAPPING.md":
        return ROOT / name
    return ROOT / "docs" / name


def reference_problems(texts: dict[Path, str]) -> list[str]:
    """Every section reference or relative link in ``texts`` that names no existing
    heading or file. Documents are read from ``texts`` when they are in it (so a test can
    hand in a changed copy), else from the disk."""

    def document(path: Path) -> str | None:
        if path in texts:
            return texts[path]
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def has_section(path: Path, section: str) -> bool:
        markdown = document(path)
        wanted = " ".join(section.replace("`", "").split())
        return markdown is not None and any(wanted in _section_names(h) for h in headings(markdown))

    protocol = document(ROOT / "docs" / "protocol.md") or ""
    protocol_numbers = {m["number"] for h in headings(protocol) if (m := _SECTION_NUMBER.match(h))}
    problems: list[str] = []
    for path, raw in sorted(texts.items()):
        where = path.relative_to(ROOT)
        # One line of prose, even when a reference is wrapped (in Python, across "#" comments too).
        text = " ".join((re.sub(r"\n\s*#", "\n", raw) if path.suffix == ".py" else raw).split())
        for match in _QUALIFIED_REFERENCE.finditer(text):
            section = match["starred"] or match["quoted"]
            target = _document_path(match["document"])
            if document(target) is None:
                problems.append(f"{where}: {match[0]!r} names no document")
            elif not has_section(target, section):
                problems.append(f"{where}: {match[0]!r}: no such heading in {target.relative_to(ROOT)}")
        for match in _PROTOCOL_SECTIONS.finditer(text):
            for number in re.findall(r"\d+(?:\.\d+)*", match["numbers"]):
                if number not in protocol_numbers:
                    problems.append(f"{where}: {match[0]!r}: protocol.md has no section {number}")
        if path.suffix != ".md":
            continue
        for match in _LOCAL_REFERENCE.finditer(text):
            start = match.start()
            if _QUALIFIED_REFERENCE.search(text[max(0, start - 60) : match.end()]):
                continue  # "README, see *X*" and the like name their document
            if not has_section(path, match["section"]):
                problems.append(f"{where}: {match[0]!r}: no such heading in this file")
        for match in _LINK.finditer(text):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{where}: link {target!r}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(document(linked) or ""):
                problems.append(f"{where}: link {target!r}: no such heading")
    return problems


def test_every_section_reference_and_link_resolves():
    texts = _repository_texts()
    assert {ROOT / "README.md", ROOT / "docs" / "operations.md", ROOT / "SPEC_MAPPING.md"} <= texts.keys()
    assert reference_problems(texts) == []


def test_reference_check_finds_broken_references():
    readme, operations = ROOT / "README.md", ROOT / "docs" / "operations.md"
    sample = ROOT / "docs" / "sample.md"
    s, q = "*", '"'  # so that this file itself holds no broken reference
    broken = {
        f"README, {s}No such section{s}": "no such heading in README.md",
        f"docs/architecture.md, {q}Gone{q}": "no such heading in docs/architecture.md",
        "protocol.md section " + "99.1": "protocol.md has no section 99.1",
        f"nowhere.md, {s}Anything{s}": "names no document",
        f"see {s}Missing{s}": "no such heading in this file",
        "[text](operations.md#" + "no-such-anchor)": "no such heading",
        "[text](" + "missing.md)": "no such file",
    }
    for reference, complaint in broken.items():
        problems = reference_problems({sample: f"# Sample\n\nAs the text says ({reference}).\n"})
        assert len(problems) == 1 and complaint in problems[0], (reference, problems)
    fine = (
        "# Sample\n\nREADME, *Security*; docs/architecture.md, *Several instances*;"
        " protocol.md, *Limits and defaults*; protocol.md sections 4.2 and 5.2-5.3;"
        " see *Sample*; [logs](operations.md#logs); [home](../README.md#security)\n"
    )
    assert reference_problems({sample: fine}) == []
    # Renaming a heading breaks the references to it, wherever they are.
    renamed = readme.read_text(encoding="utf-8").replace("\n## Workers\n", "\n## Processes\n")
    problems = reference_problems({readme: renamed, operations: operations.read_text(encoding="utf-8")})
    assert any("docs/operations.md" in p and "workers" in p for p in problems)
    assert any("README.md" in p and "see *Workers*" in p for p in problems)
