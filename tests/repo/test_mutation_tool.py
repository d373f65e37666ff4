"""The mutation tool itself (make mutation): what it plants, that planting works in a
running process, and that a mutant's key survives edits elsewhere in the file."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mutation.mutants import ROOT, find_by_key, find_mutants
from mutation.mutants import apply as plant

SOURCE = '''
import hmac
import logging

log = logging.getLogger(__name__)


def check(a, b):
    """A docstring is never mutated."""
    log.info("logging is never mutated: %s", a == b)
    if a == b and not a:
        return a + 1
    assert a != 2, "nor are asserts"
    return hmac.compare_digest(bytes([a]), bytes([b]))


class Box:
    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Box({self.value == 1})"

    def bigger(self, other):
        return self.value > other.value
'''


def _module(tmp_path: Path, monkeypatch, source: str = SOURCE):
    path = tmp_path / "mutation_sample.py"
    path.write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mutation_sample", None)
    return path, importlib.import_module("mutation_sample")


def test_the_mutants_of_a_function(tmp_path, monkeypatch):
    path, _ = _module(tmp_path, monkeypatch)
    mutants = find_mutants(path, "mutation_sample")
    described = {(m.function, m.operator, m.original) for m in mutants}
    assert ("check", "compare0:Eq->NotEq", "a == b") in described
    assert ("check", "boolop:And->Or", "a == b and not a") in described
    assert ("check", "not:drop", "not a") in described
    assert ("check", "binop:Add->Sub", "a + 1") in described
    assert ("check", "constant:int+1", "1") in described
    assert ("check", "return:None", "return a + 1") in described
    assert ("check", "call:compare_digest->==", "hmac.compare_digest(bytes([a]), bytes([b]))") in described
    assert ("Box.bigger", "compare0:Gt->GtE", "self.value > other.value") in described
    # Logging, docstrings, asserts and __repr__ are left alone.
    assert not [m for m in mutants if m.function == "Box.__repr__"]
    assert not [m for m in mutants if "logging" in m.original or "nor are asserts" in m.original]
    assert len([m for m in mutants if m.operator == "compare0:Eq->NotEq"]) == 1  # not the one in log.info
    assert not [m for m in mutants if m.operator == "compare0:NotEq->Eq"]  # the assert's


def test_a_planted_mutant_changes_every_reference_to_the_function(tmp_path, monkeypatch):
    path, module = _module(tmp_path, monkeypatch)
    check, bigger = module.check, module.Box.bigger  # as if imported elsewhere
    assert check(1, 2) is False and check(0, 0) == 1
    by_operator = {m.operator: m for m in find_mutants(path, "mutation_sample")}
    plant(by_operator["call:compare_digest->=="])
    assert check(3, 3) is True  # == now, and through the old reference
    plant(by_operator["compare0:Gt->GtE"])
    assert bigger(module.Box(1), module.Box(1)) is True


def test_a_dropped_super_call_keeps_the_method_swappable(tmp_path, monkeypatch):
    source = """
    class Base:
        def __init__(self):
            self.ready = True


    class Child(Base):
        def __init__(self):
            super().__init__()
            self.child = True
    """
    path, module = _module(tmp_path, monkeypatch, source)
    (drop,) = [m for m in find_mutants(path, "mutation_sample") if m.original == "super().__init__()"]
    plant(drop)
    assert not hasattr(module.Child(), "ready")


def test_keys_do_not_depend_on_line_numbers(tmp_path, monkeypatch):
    path, _ = _module(tmp_path, monkeypatch)
    before = {m.key for m in find_mutants(path, "mutation_sample")}
    path.write_text("# a comment that moves every line down\n\n" + path.read_text())
    after = {m.key for m in find_mutants(path, "mutation_sample")}
    assert before == after and len(before) >= 10


def test_every_target_module_can_be_mutated():
    from mutation.mutants import TARGETS

    for module, relative in TARGETS.items():
        assert (ROOT / relative).exists(), relative
        mutants = find_mutants(ROOT / relative, module)
        if module != "keymgmt.adapters.storage.base":  # protocols only
            assert mutants, module
    key = find_mutants(ROOT / "keymgmt_proto/_wire.py", "keymgmt_proto._wire")[0].key
    assert find_by_key(key).key == key
    with pytest.raises(LookupError):
        find_by_key("keymgmt_proto._wire:nothing:here#0")


def test_a_named_mutant_planted_before_a_run_makes_its_killing_test_fail():
    """--mutation-apply: how `make mutation`'s findings are reproduced by hand. The joint
    key id's size check turned around, so every proper pair of nonces is refused (KEY-2):
    the vectors must fail."""
    (mutant,) = [
        m
        for m in find_mutants(ROOT / "keymgmt_proto/_ops.py", "keymgmt_proto._ops")
        if m.function == "joint_key_id" and m.operator == "compare0:NotEq->Eq"
    ][:1]
    test = "tests/core/test_vectors.py"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutation.plugin", test]
    assert subprocess.run(base, cwd=ROOT, capture_output=True).returncode == 0
    planted = subprocess.run([*base, f"--mutation-apply={mutant.key}"], cwd=ROOT, capture_output=True)
    assert planted.returncode == 1, planted.stdout.decode()[-2000:]
