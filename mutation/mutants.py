"""Mutants: small, plausible bugs planted one at a time in a function's body.

Each mutant changes one AST node inside one top-level function or method (a comparison
flipped, a boolean operator swapped, a constant nudged, a call statement dropped, ...).
It is applied in a running process by compiling the mutated module and swapping the
function's ``__code__``, so every reference to the function, wherever it was imported,
runs the mutant (see :func:`apply`).

A mutant's ``key`` names it without line numbers (module, function, operator, the
source it changes and which occurrence of it in the function), so the list of
equivalent mutants survives edits elsewhere in the file.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "Mutant", "apply", "find_by_key", "find_mutants"]

#: What ``make mutation`` mutates: module name -> file (relative to the repository).
TARGETS: dict[str, str] = {
    **{
        f"keymgmt_proto.{name}": f"keymgmt_proto/{name}.py"
        for name in (
            "_admission",
            "_client",
            "_connection",
            "_crypto",
            "_events",
            "_messages",
            "_opaque",
            "_ops",
            "_secrets",
            "_server",
            "_sessionstate",
            "_state",
            "_wire",
        )
    },
    **{
        f"keymgmt.adapters.{name}": f"adapters/{name.replace('.', '/')}.py"
        for name in (
            "server.app",
            "server.admission",
            "server.invitations",
            "server.userrate",
            "storage.base",
            "storage.sql",
            "storage.sqlite",
            "storage.postgres",
        )
    },
}
ROOT = Path(__file__).resolve().parent.parent

_COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitOr,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.Pow: ast.Mult,
}
#: Calls whose removal changes only what is logged or warned.
_LOGGING_NAMES = {"log", "logger", "logging", "warnings", "_warnings"}
#: Functions that only describe an object: not worth mutating.
_SKIPPED_FUNCTIONS = {"__repr__", "__str__"}
PRAGMA = "pragma: no mutate"


@dataclass(frozen=True, slots=True)
class Mutant:
    """One planted bug: where, what it was, what it became."""

    module: str
    path: str
    function: str  # qualified name of the top-level function or method
    operator: str
    line: int
    col: int
    original: str
    replacement: str
    occurrence: int  # among mutants of this function with the same operator and original

    lines: tuple[int, int] = (0, 0)  # the enclosing statement's first line .. the node's last

    @property
    def key(self) -> str:
        return f"{self.module}:{self.function}:{self.operator}:{self.original}#{self.occurrence}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mutant:
        data = dict(data)
        data["lines"] = tuple(data.get("lines", (0, 0)))
        return cls(**data)


@dataclass(frozen=True, slots=True)
class _Site:
    node: ast.AST
    operator: str
    replacement: str


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Top-level functions and methods of top-level classes, with their qualified names."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item


def _is_logging_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    while isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and func.value.id in _LOGGING_NAMES:
            return True
        if isinstance(func.value, ast.Attribute) and func.value.attr in _LOGGING_NAMES:
            return True
        func = func.value
    return False


def _skipped_nodes(function: ast.AST) -> set[int]:
    """ids of nodes no mutant may touch: asserts, logging, raise messages, f-strings,
    docstrings, annotations, nested type hints."""
    skipped: set[int] = set()

    def skip(tree: ast.AST) -> None:
        skipped.update(id(n) for n in ast.walk(tree))

    for node in ast.walk(function):
        logging_call = isinstance(node, ast.Expr) and _is_logging_call(node.value)
        if isinstance(node, ast.Assert | ast.JoinedStr) or logging_call:
            skip(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip(node)  # docstring
        elif isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):  # the message of what is raised
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    skipped.add(id(sub))
        elif isinstance(node, ast.AnnAssign):
            skip(node.annotation)
        elif isinstance(node, ast.arguments):
            skip(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.returns is not None:
                skip(node.returns)
            for decorator in node.decorator_list:
                skip(decorator)
    return skipped


def _sites(node: ast.AST) -> Iterator[_Site]:
    """The mutations one node offers."""
    if isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            swap = _COMPARE_SWAPS.get(type(op))
            if swap is not None:
                yield _Site(node, f"compare{index}:{type(op).__name__}->{swap.__name__}", swap.__name__)
    elif isinstance(node, ast.BoolOp):
        swap_name = "Or" if isinstance(node.op, ast.And) else "And"
        yield _Site(node, f"boolop:{type(node.op).__name__}->{swap_name}", swap_name)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield _Site(node, "not:drop", "operand")
    elif isinstance(node, ast.BinOp | ast.AugAssign):
        binop_swap = _BINOP_SWAPS.get(type(node.op))
        if binop_swap is not None:
            yield _Site(node, f"binop:{type(node.op).__name__}->{binop_swap.__name__}", binop_swap.__name__)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield _Site(node, f"constant:{value}->{not value}", repr(not value))
        elif isinstance(value, int):
            yield _Site(node, "constant:int+1", repr(value + 1))
        elif isinstance(value, bytes) and value:
            yield _Site(node, "constant:bytes", repr(value + b"X"))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield _Site(node, "statement:drop-call", "pass")
    elif isinstance(node, ast.Raise):
        yield _Site(node, "statement:drop-raise", "pass")
    elif isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):
            yield _Site(node, "return:None", "return None")
    elif isinstance(node, ast.Call) and _is_compare_digest(node):
        yield _Site(node, "call:compare_digest->==", "==")


def _is_compare_digest(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name == "compare_digest" and len(node.args) == 2


def _walk_with_statements(body: list[ast.stmt]) -> Iterator[tuple[ast.AST, int]]:
    """Every node under ``body``, with the first line of the statement it belongs to."""
    stack: list[tuple[ast.AST, int]] = [(statement, statement.lineno) for statement in reversed(body)]
    while stack:
        node, line = stack.pop()
        if isinstance(node, ast.stmt):
            line = node.lineno
        yield node, line
        stack.extend((child, line) for child in reversed(list(ast.iter_child_nodes(node))))


def find_by_key(key: str) -> Mutant:
    """The mutant with this key, among :data:`TARGETS`."""
    module = key.split(":", 1)[0]
    for mutant in find_mutants(ROOT / TARGETS[module], module):
        if mutant.key == key:
            return mutant
    raise LookupError(f"no mutant {key}")


def find_mutants(path: Path, module: str) -> list[Mutant]:
    """Every mutant of the file's top-level functions and methods."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    mutants: list[Mutant] = []
    for qualname, function in _functions(tree):
        if function.name in _SKIPPED_FUNCTIONS:
            continue
        skipped = _skipped_nodes(function)
        seen: dict[tuple[str, str], int] = {}
        for node, statement_line in _walk_with_statements(function.body):
            if id(node) in skipped or not hasattr(node, "lineno"):
                continue
            if PRAGMA in lines[node.lineno - 1]:
                continue
            for site in _sites(node):
                original = ast.get_source_segment(source, node) or ""
                original = " ".join(original.split())[:120]
                count = seen.get((site.operator, original), 0)
                seen[(site.operator, original)] = count + 1
                mutants.append(
                    Mutant(
                        module,
                        str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                        qualname,
                        site.operator,
                        node.lineno,
                        getattr(node, "col_offset", 0),
                        original,
                        site.replacement,
                        count,
                        (statement_line, getattr(node, "end_lineno", None) or node.lineno),
                    )
                )
    return mutants


class _Planter(ast.NodeTransformer):
    """Replaces the one node a mutant names."""

    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant
        self.done = False

    def _is_target(self, node: ast.AST) -> bool:
        return (
            not self.done
            and getattr(node, "lineno", None) == self.mutant.line
            and getattr(node, "col_offset", None) == self.mutant.col
            and any(site.operator == self.mutant.operator for site in _sites(node))
        )

    def visit(self, node: ast.AST) -> Any:
        if self._is_target(node):
            self.done = True
            return ast.copy_location(_mutated(node, self.mutant.operator), node)
        return self.generic_visit(node)


def _mutated(node: ast.AST, operator: str) -> ast.AST:
    kind, _, detail = operator.partition(":")
    if kind.startswith("compare") and isinstance(node, ast.Compare):
        index = int(kind.removeprefix("compare"))
        ops = list(node.ops)
        ops[index] = _COMPARE_SWAPS[type(ops[index])]()
        return ast.Compare(node.left, ops, node.comparators)
    if kind == "boolop" and isinstance(node, ast.BoolOp):
        return ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
    if kind == "not" and isinstance(node, ast.UnaryOp):
        return node.operand
    if kind == "binop" and isinstance(node, ast.BinOp):
        return ast.BinOp(node.left, _BINOP_SWAPS[type(node.op)](), node.right)
    if kind == "binop" and isinstance(node, ast.AugAssign):
        return ast.AugAssign(node.target, _BINOP_SWAPS[type(node.op)](), node.value)
    if kind == "constant" and isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return ast.Constant(not value)
        if isinstance(value, int):
            return ast.Constant(value + 1)
        assert isinstance(value, bytes)
        return ast.Constant(value + b"X")
    if kind == "statement":
        uses_super = any(isinstance(n, ast.Name) and n.id == "super" for n in ast.walk(node))
        # Keep the method's implicit __class__ cell, or its code could not be swapped in.
        return ast.Expr(ast.Name("__class__", ast.Load())) if uses_super else ast.Pass()
    if kind == "return" and isinstance(node, ast.Return):
        return ast.Return(ast.Constant(None))
    if kind == "call" and isinstance(node, ast.Call):
        return ast.Compare(node.args[0], [ast.Eq()], [node.args[1]])
    raise ValueError(f"cannot apply {operator} to {type(node).__name__} ({detail})")


def _find_code(code: types.CodeType, qualname: str) -> types.CodeType | None:
    if code.co_qualname == qualname:
        return code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found = _find_code(const, qualname)
            if found is not None:
                return found
    return None


def _function_object(module: types.ModuleType, qualname: str) -> types.FunctionType:
    owner: Any = module
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    raw = owner.__dict__[parts[-1]] if isinstance(owner, type) else getattr(owner, parts[-1])
    if isinstance(raw, property):
        raw = raw.fget
    elif isinstance(raw, staticmethod | classmethod):
        raw = raw.__func__
    function = inspect.unwrap(raw)
    if not isinstance(function, types.FunctionType):
        raise TypeError(f"{qualname} is not a plain function ({type(function).__name__})")
    return function


def apply(mutant: Mutant) -> None:
    """Plant the mutant in the running process (swap the function's code)."""
    path = ROOT / mutant.path
    source = path.read_text()
    tree = ast.parse(source)
    planter = _Planter(mutant)
    tree = planter.visit(tree)
    if not planter.done:
        raise LookupError(f"mutant site not found: {mutant.key}")
    ast.fix_missing_locations(tree)
    code = compile(tree, str(path), "exec")
    new_code = _find_code(code, mutant.function)
    if new_code is None:
        raise LookupError(f"function not found in the mutated module: {mutant.function}")
    function = _function_object(importlib.import_module(mutant.module), mutant.function)
    function.__code__ = new_code
