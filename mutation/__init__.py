"""``make mutation``: plant small bugs one at a time and check that a test fails.

See :mod:`mutation.mutants` (what is planted), :mod:`mutation.plugin` (how a mutant is
run against the tests that cover it) and ``python -m mutation --help``.
"""
